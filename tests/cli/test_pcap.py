"""The --pcap capture: usbmon records that tshark decodes down to CCID messages."""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

from tests.conftest import require_tool
from usbccid.ccid.descriptor import ReaderConfig, interface_spec
from usbccid.jobs import Job
from usbccid.tool.pcap import (
    LINKTYPE_USB_LINUX_MMAPPED,
    CapturedDevice,
    UrbKey,
    UsbipCapture,
    UsbPcapWriter,
    XferType,
    global_header,
    usbmon_record,
)
from usbccid.usbip import wire
from usbccid.usbip.function import DeviceIdentity, InterfaceSpec, SetupPacket

ATR = bytes.fromhex("3b8900564341524400534e53")


class FakeCcid:
    """Just enough of a CCID function to answer IccPowerOn and XfrBlock."""

    def __init__(self) -> None:
        self.interface: InterfaceSpec = interface_spec(ReaderConfig(), 1)
        self.out: list[bytes] = []

    def reset(self) -> None:
        self.out.clear()

    def control(self, setup: SetupPacket, data: bytes) -> bytes:
        return b""

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        seq = data[6]
        payload = ATR if data[0] == 0x62 else bytes.fromhex("9000")
        self.out.append(
            bytes([0x80]) + struct.pack("<I", len(payload)) + bytes([0, seq, 0, 0, 0]) + payload
        )

    def poll_in(self, endpoint: int, max_length: int) -> bytes | None:
        if endpoint == 0x82 and self.out:
            return self.out.pop(0)
        return None

    def next_job(self, now: float) -> Job | None:
        return None

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def ccid(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    return bytes([msg_type]) + struct.pack("<I", len(payload)) + bytes([0, seq, 0, 0, 0]) + payload


def capture(path: Path) -> None:
    devid = 0x00010001
    identity = DeviceIdentity(0x0E0F, 0x0004, 0x0100, "usbccid", "test reader", "T1")
    device = CapturedDevice(identity, FakeCcid())
    with path.open("wb") as f:
        writer = UsbPcapWriter(f)
        types = {ep.address: int(ep.transfer_type) for ep in device.function.interface.endpoints}
        device.capture = UsbipCapture(writer, types, 1)
        clock = iter(range(1000, 2000))
        device.clock = lambda: float(next(clock))
        get_config = SetupPacket(0x80, 6, 0x0200, 0, 255)
        seq = iter(range(1, 100))
        device.submit(wire.CmdSubmit(next(seq), devid, wire.Direction.IN, 0, 255, get_config))
        device.submit(wire.CmdSubmit(next(seq), devid, wire.Direction.IN, 3, 8))  # parked forever
        for message in (ccid(0x62, 0), ccid(0x6F, 1, bytes.fromhex("00a4040007a000000079010000"))):
            device.submit(wire.CmdSubmit(next(seq), devid, wire.Direction.IN, 2, 65554))
            device.submit(
                wire.CmdSubmit(next(seq), devid, wire.Direction.OUT, 1, len(message), data=message)
            )
        parked = next(seq)
        device.submit(wire.CmdSubmit(parked, devid, wire.Direction.IN, 2, 65554))
        device.unlink(wire.CmdUnlink(next(seq), devid, wire.Direction.IN, 2, parked))


def test_record_layout() -> None:
    assert len(global_header()) == 24
    assert struct.unpack("<I", global_header()[20:24])[0] == LINKTYPE_USB_LINUX_MMAPPED
    key = UrbKey(1, 2, 0x82, XferType.BULK)
    rec = usbmon_record(
        event="C", urb_id=7, key=key, timestamp=1.5, status=0, length=3, data=b"abc"
    )
    sec, usec, incl, orig = struct.unpack("<IIII", rec[:16])
    assert (sec, usec, incl, orig) == (1, 500000, 67, 67)
    header = rec[16:80]
    assert header[8:12] == b"C\x03\x82\x02"
    assert rec[80:] == b"abc"


def test_capture_matches_submissions_and_unlinks(tmp_path: Path) -> None:
    path = tmp_path / "x.pcap"
    capture(path)
    data = path.read_bytes()
    events = []
    offset = 24
    while offset < len(data):
        incl = struct.unpack("<I", data[offset + 8 : offset + 12])[0]
        header = data[offset + 16 : offset + 80]
        events.append((chr(header[8]), header[10], struct.unpack("<i", header[28:32])[0]))
        offset += 16 + incl
    # the cancelled URB completes with -ECONNRESET, as usbmon shows it
    assert events[-1] == ("C", 0x82, -104)
    assert sum(1 for e in events if e[0] == "S") == 7
    assert sum(1 for e in events if e[0] == "C") == 6  # the interrupt URB stays pending


def test_tshark_decodes_ccid(tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    path = tmp_path / "x.pcap"
    capture(path)
    out = subprocess.run(
        [tshark, "-r", str(path), "-V"], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    assert "USB CCID" in out
    assert "PC_to_RDR_IccPowerOn" in out
    assert "RDR_to_PC_DataBlock" in out
    assert "PC_to_RDR_XfrBlock" in out
    assert "GET DESCRIPTOR Response CONFIGURATION" in out or "CONFIGURATION DESCRIPTOR" in out


def test_writer_flushes_each_record() -> None:
    buffer = io.BytesIO()
    writer = UsbPcapWriter(buffer)
    writer.submit(1, UrbKey(1, 1, 0x01, XferType.BULK), 0.0, 3, b"abc")
    assert len(buffer.getvalue()) == 24 + 16 + 64 + 3
