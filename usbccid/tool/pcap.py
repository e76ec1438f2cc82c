"""Capture of the exported devices' USB traffic, as a pcap file Wireshark decodes.

Each URB becomes two records of ``LINKTYPE_USB_LINUX_MMAPPED`` (220, the Linux usbmon
binary format, 64-byte header): its submission (``S``) and its completion (``C``), the way
``usbmon`` on the host would see them. Wireshark's and tshark's ``usb`` dissector matches
them, learns from the GET_DESCRIPTOR(configuration) completion which endpoints belong to a
CCID interface (class 0x0B), and hands their bulk payloads to its ``usbccid`` dissector,
which names every CCID message (``PC_to_RDR_XfrBlock``, ``RDR_to_PC_DataBlock``...) and the
APDUs inside. The host asks for the configuration descriptor whenever it attaches a
device, so a capture started with the server has it; for a device already imported when
a capture starts, :meth:`UsbPcapWriter.descriptors` writes the device's descriptors first.

The USB/IP ``devid`` is ``busnum << 16 | devnum``; the records use those numbers, so the
devices of one capture stay apart.

Record building is pure (:func:`global_header`, :func:`usbmon_record`); the writer only
appends them to a binary stream.
"""

from __future__ import annotations

import enum
import errno
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Final

from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice

LINKTYPE_USB_LINUX_MMAPPED: Final = 220
PCAP_MAGIC: Final = 0xA1B2C3D4
SNAPLEN: Final = 0x40000
_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
# struct usbmon_packet (Documentation/usb/usbmon.rst, "binary API"), little-endian here
# and in the file's byte order: id, type, xfer_type, epnum, devnum, busnum, flag_setup,
# flag_data, ts_sec, ts_usec, status, length, len_cap, setup[8], interval, start_frame,
# xfer_flags, ndesc.
_USBMON = struct.Struct("<QBBBBHbbqiiII8siiII")
assert _USBMON.size == 64

EINPROGRESS: Final = -errno.EINPROGRESS


class XferType(enum.IntEnum):
    """usbmon's transfer type numbers (not the USB descriptor's)."""

    ISOCHRONOUS = 0
    INTERRUPT = 1
    CONTROL = 2
    BULK = 3


@dataclass(frozen=True, slots=True)
class UrbKey:
    """Which device and endpoint a URB is for, as usbmon names them."""

    busnum: int
    devnum: int
    endpoint: int  # bEndpointAddress: bit 7 set for IN
    xfer_type: XferType

    @classmethod
    def from_devid(cls, devid: int, endpoint: int, xfer_type: XferType) -> UrbKey:
        return cls(
            busnum=devid >> 16, devnum=devid & 0xFFFF, endpoint=endpoint, xfer_type=xfer_type
        )


def global_header(snaplen: int = SNAPLEN) -> bytes:
    return _GLOBAL.pack(PCAP_MAGIC, 2, 4, 0, 0, snaplen, LINKTYPE_USB_LINUX_MMAPPED)


def usbmon_record(
    *,
    event: str,
    urb_id: int,
    key: UrbKey,
    timestamp: float,
    status: int,
    length: int,
    data: bytes = b"",
    setup: bytes | None = None,
    interval: int = 0,
    data_flag: int = 0,
) -> bytes:
    """One pcap record (record header + usbmon header + data).

    ``event`` is ``"S"`` (submit), ``"C"`` (complete) or ``"E"`` (error).
    ``length`` is the URB's transfer length (requested for S, actual for C); ``data`` the
    bytes that went with the event (OUT data on S, IN data on C); ``data_flag`` is the
    usbmon flag when there is no data: ``"<"`` (IN submission) or ``">"`` (OUT completion).
    """
    sec = int(timestamp)
    usec = round((timestamp - sec) * 1_000_000)
    if usec >= 1_000_000:
        sec, usec = sec + 1, usec - 1_000_000
    if setup is not None and len(setup) != 8:
        raise ValueError("a SETUP packet is 8 bytes")
    header = _USBMON.pack(
        urb_id & 0xFFFFFFFFFFFFFFFF,
        ord(event),
        int(key.xfer_type),
        key.endpoint & 0xFF,
        key.devnum & 0xFF,
        key.busnum & 0xFFFF,
        0 if setup is not None else ord("-"),
        0 if data else data_flag,
        sec,
        usec,
        status,
        length,
        len(data),
        setup if setup is not None else bytes(8),
        interval,
        0,
        0,
        0,
    )
    packet = header + data
    return _RECORD.pack(sec, usec, len(packet), len(packet)) + packet


class UsbPcapWriter:
    """Appends usbmon records to ``stream``, flushing each so a reader can follow it."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._stream.write(global_header())
        self._stream.flush()
        self._synthetic_id = 1 << 63  # URB ids of :meth:`descriptors`, apart from seqnums

    def close(self) -> None:
        self._stream.close()

    def _write(self, record: bytes) -> None:
        self._stream.write(record)
        self._stream.flush()

    def submit(
        self,
        urb_id: int,
        key: UrbKey,
        timestamp: float,
        length: int,
        data: bytes = b"",
        setup: bytes | None = None,
        interval: int = 0,
    ) -> None:
        """A URB is submitted: ``length`` bytes asked (IN) or ``data`` sent (OUT)."""
        is_in = bool(key.endpoint & 0x80)
        self._write(
            usbmon_record(
                event="S",
                urb_id=urb_id,
                key=key,
                timestamp=timestamp,
                status=EINPROGRESS,
                length=length,
                data=b"" if is_in else data,
                setup=setup,
                interval=interval,
                data_flag=ord("<") if is_in else 0,
            )
        )

    def complete(
        self,
        urb_id: int,
        key: UrbKey,
        timestamp: float,
        status: int,
        actual_length: int,
        data: bytes = b"",
        interval: int = 0,
    ) -> None:
        """A URB completes with ``status`` (0 or a negative errno) and, for IN, ``data``."""
        is_in = bool(key.endpoint & 0x80)
        self._write(
            usbmon_record(
                event="C",
                urb_id=urb_id,
                key=key,
                timestamp=timestamp,
                status=status,
                length=actual_length,
                data=data if is_in else b"",
                interval=interval,
                data_flag=ord(">") if not is_in else 0,
            )
        )

    def control(
        self,
        urb_id: int,
        busnum: int,
        devnum: int,
        timestamp: float,
        setup: bytes,
        data_out: bytes,
        status: int,
        data_in: bytes,
    ) -> None:
        """A whole control transfer on endpoint 0 (submission and completion)."""
        direction_in = bool(setup[0] & 0x80)
        key = UrbKey(busnum, devnum, 0x80 if direction_in else 0x00, XferType.CONTROL)
        w_length = int.from_bytes(setup[6:8], "little")
        self.submit(urb_id, key, timestamp, w_length, data_out, setup=setup)
        actual = len(data_in) if direction_in else (len(data_out) if status == 0 else 0)
        self.complete(urb_id, key, timestamp, status, actual, data_in)

    def descriptors(
        self, busnum: int, devnum: int, timestamp: float, device: bytes, configuration: bytes
    ) -> None:
        """Write GET_DESCRIPTOR(device) and GET_DESCRIPTOR(configuration) exchanges.

        For a device imported before the capture started: they tell Wireshark which
        endpoints belong to which interface class.
        """
        for dtype, blob in ((1, device), (2, configuration)):
            setup = struct.pack("<BBHHH", 0x80, 6, dtype << 8, 0, len(blob))
            self._synthetic_id += 1
            self.control(self._synthetic_id, busnum, devnum, timestamp, setup, b"", 0, blob)


_XFER_OF_DESCRIPTOR_TYPE: Final = {
    0: XferType.CONTROL,
    1: XferType.ISOCHRONOUS,
    2: XferType.BULK,
    3: XferType.INTERRUPT,
}


class UsbipCapture:
    """Turns one exported device's USB/IP URB traffic into usbmon records.

    Fed with the ``usbccid.usbip.wire`` messages as the device sees them: each CMD_SUBMIT
    (:meth:`submitted`), each RET_SUBMIT (:meth:`returned`, matched to its CMD_SUBMIT by
    seqnum) and each CMD_UNLINK with its RET_UNLINK (:meth:`unlinked`: an URB cancelled
    while pending completes with -ECONNRESET, as usbmon shows it).

    ``transfer_types`` maps endpoint addresses to their bmAttributes transfer type (0-3);
    endpoint 0 is control. ``device_number`` keeps URB ids of different devices apart.
    """

    def __init__(
        self,
        writer: UsbPcapWriter,
        transfer_types: dict[int, int],
        device_number: int = 0,
    ) -> None:
        self._writer = writer
        self._types = {a: _XFER_OF_DESCRIPTOR_TYPE[t & 3] for a, t in transfer_types.items()}
        self._device = device_number & 0xFFFF
        self._pending: dict[int, tuple[UrbKey, int]] = {}  # seqnum -> (key, interval)

    def _key(self, devid: int, direction_in: bool, ep: int) -> UrbKey:
        address = (ep & 0x0F) | (0x80 if direction_in else 0)
        xfer = XferType.CONTROL if ep & 15 == 0 else self._types.get(address, XferType.BULK)
        return UrbKey.from_devid(devid, address, xfer)

    def _urb_id(self, seqnum: int) -> int:
        return (self._device << 32) | (seqnum & 0xFFFFFFFF)

    def submitted(
        self,
        seqnum: int,
        devid: int,
        direction_in: bool,
        ep: int,
        transfer_buffer_length: int,
        setup: bytes,
        data: bytes,
        interval: int,
        now: float,
    ) -> None:
        key = self._key(devid, direction_in, ep)
        self._pending[seqnum] = (key, interval)
        self._writer.submit(
            self._urb_id(seqnum),
            key,
            now,
            transfer_buffer_length,
            data,
            setup=setup if key.xfer_type is XferType.CONTROL else None,
            interval=interval,
        )

    def returned(
        self, seqnum: int, status: int, actual_length: int, data: bytes, now: float
    ) -> None:
        pending = self._pending.pop(seqnum, None)
        if pending is None:
            return  # submitted before the capture started
        key, interval = pending
        self._writer.complete(
            self._urb_id(seqnum), key, now, status, actual_length, data, interval=interval
        )

    def unlinked(self, unlink_seqnum: int, status: int, now: float) -> None:
        if status != 0:  # it was pending: it completes now, cancelled
            self.returned(unlink_seqnum, status, 0, b"", now)

    def reset(self) -> None:
        """The device was reset (a new import, a lost connection): its URBs are gone."""
        self._pending.clear()


class CapturedDevice(VirtualDevice):
    """A :class:`VirtualDevice` whose URB traffic also goes to a pcap (``--pcap``)."""

    capture: UsbipCapture | None = None
    clock: Callable[[], float] = time.time

    def submit_fast(self, cmd: wire.Submit) -> list[wire.Ret]:
        capture = self.capture
        if capture is None:
            return super().submit_fast(cmd)
        capture.submitted(
            cmd.seqnum,
            cmd.devid,
            cmd.direction == wire.Direction.IN,
            cmd.ep,
            cmd.transfer_buffer_length,
            cmd.setup,
            cmd.data,
            cmd.interval,
            self.clock(),
        )
        replies = super().submit_fast(cmd)
        self._record(replies)
        return replies

    def poll_fast(self) -> list[wire.Ret]:
        # submit_fast() completes parked URBs without calling poll_fast(): no reply is
        # recorded twice (submit() and poll() go through these two)
        replies = super().poll_fast()
        self._record(replies)
        return replies

    def unlink(self, cmd: wire.CmdUnlink) -> wire.RetUnlink:
        reply = super().unlink(cmd)
        if self.capture is not None:
            self.capture.unlinked(cmd.unlink_seqnum, reply.status, self.clock())
        return reply

    def reset(self) -> None:
        super().reset()
        if self.capture is not None:
            self.capture.reset()

    def _record(self, replies: list[wire.Ret]) -> None:
        if self.capture is None:
            return
        now = self.clock()
        for r in replies:
            self.capture.returned(r.seqnum, r.status, r.actual_length, r.data, now)
