"""The sans-IO USB/IP client against golden bytes from the kernel's protocol document.

Golden vectors: Linux ``Documentation/usb/usbip_protocol.rst`` (torvalds/linux
1260ed77), section "EXAMPLE" ("captured from wire with Human Interface Devices (HID)
payload") and the offset tables of OP_REP_DEVLIST / OP_REP_IMPORT. The op-phase replies
below are assembled by offset from those tables, not with the client's own structs.
"""

from __future__ import annotations

import errno

import pytest

from usbccid.host.pdu import (
    ClientConnection,
    DeviceList,
    HostError,
    ImportReply,
    ProtocolError,
    State,
    SubmitDone,
    UnlinkDone,
    encode_cmd_submit,
)

# usbip_protocol.rst "EXAMPLE", one 32-bit word per group.
CMD_INTR_IN = bytes.fromhex(
    "00000001 00000d05 0001000f 00000001 00000001 00000200 00000040 ffffffff"
    " 00000000 00000004 00000000 00000000"
)
CMD_INTR_OUT = bytes.fromhex(
    "00000001 00000d06 0001000f 00000000 00000001 00000000 00000040 ffffffff"
    " 00000000 00000004 00000000 00000000"
)
CMD_INTR_OUT_DATA = bytes.fromhex(
    "ffffffff860008a784ce5ae21237630000000000000000000000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
)
RET_INTR_OUT = bytes.fromhex(
    "00000003 00000d06 00000000 00000000 00000000 00000000 00000040 ffffffff"
    " 00000000 00000000 00000000 00000000"
)
RET_INTR_IN = bytes.fromhex(
    "00000003 00000d05 00000000 00000000 00000000 00000000 00000040 ffffffff"
    " 00000000 00000000 00000000 00000000"
)
RET_INTR_IN_DATA = bytes.fromhex(
    "ffffffff860011a784ce5ae2123763612891b102010000040000000000000000"
    "0000000000000000000000000000000000000000000000000000000000000000"
)


def usb_device_bytes(busid: str, busnum: int, devnum: int, n_interfaces: int = 1) -> bytes:
    """A 312-byte struct usbip_usb_device laid out by the document's offsets (from 0)."""
    raw = bytearray(312)
    path = f"/sys/devices/pci0000:00/0000:00:1d.1/usb3/{busid}".encode()
    raw[0 : len(path)] = path
    raw[0x100 : 0x100 + len(busid)] = busid.encode()
    raw[0x120:0x124] = busnum.to_bytes(4, "big")
    raw[0x124:0x128] = devnum.to_bytes(4, "big")
    raw[0x128:0x12C] = (2).to_bytes(4, "big")  # speed: full
    raw[0x12C:0x12E] = (0x08E6).to_bytes(2, "big")  # idVendor
    raw[0x12E:0x130] = (0x3437).to_bytes(2, "big")  # idProduct
    raw[0x130:0x132] = (0x0100).to_bytes(2, "big")  # bcdDevice
    raw[0x132:0x138] = bytes([0, 0, 0, 1, 1, n_interfaces])
    return bytes(raw)


def op_reply(code: int, status: int = 0) -> bytes:
    return bytes([0x01, 0x11]) + code.to_bytes(2, "big") + status.to_bytes(4, "big")


def imported(busid: str = "3-2", busnum: int = 1, devnum: int = 15, **kw: int) -> ClientConnection:
    conn = ClientConnection(**kw)
    conn.request_import(busid)
    events = conn.receive_data(op_reply(0x0003) + usb_device_bytes(busid, busnum, devnum))
    assert len(events) == 1
    assert isinstance(events[0], ImportReply)
    return conn


def test_op_requests_match_the_document() -> None:
    assert ClientConnection().request_devlist() == bytes.fromhex("0111 8005 00000000")
    req = ClientConnection().request_import("3-2")
    assert req[:8] == bytes.fromhex("0111 8003 00000000")
    assert req[8:] == b"3-2" + bytes(29)
    assert len(req) == 40


def test_devlist_parsed_from_byte_at_a_time_input() -> None:
    # Two devices; the second starts at 0xC + 0x138 + m_0 * 4 (the document's formula).
    reply = (
        op_reply(0x0005)
        + (2).to_bytes(4, "big")
        + usb_device_bytes("1-1", 1, 2)
        + bytes([0x0B, 0, 0, 0])
        + usb_device_bytes("1-2", 1, 3, n_interfaces=2)
        + bytes([0x0B, 0, 0, 0, 0xFF, 1, 2, 0])
    )
    assert reply[0xC + 0x138 + 4 + 0x100 : 0xC + 0x138 + 4 + 0x103] == b"1-2"
    conn = ClientConnection()
    conn.request_devlist()
    events = []
    for i in range(len(reply)):
        events += conn.receive_data(reply[i : i + 1])
    assert len(events) == 1
    assert isinstance(events[0], DeviceList)
    first, second = events[0].devices
    assert (first.busid, first.busnum, first.devnum, first.speed) == ("1-1", 1, 2, 2)
    assert (first.idVendor, first.idProduct, first.bcdDevice) == (0x08E6, 0x3437, 0x0100)
    assert first.path.endswith("/usb3/1-1")
    assert first.interfaces == ((0x0B, 0, 0),)
    assert second.interfaces == ((0x0B, 0, 0), (0xFF, 1, 2))
    assert conn.state is State.CLOSED


def test_empty_devlist() -> None:
    conn = ClientConnection()
    conn.request_devlist()
    assert conn.receive_data(op_reply(0x0005) + bytes(4)) == [DeviceList(())]


def test_import_refused_is_only_the_header() -> None:
    conn = ClientConnection()
    conn.request_import("1-1")
    assert conn.receive_data(op_reply(0x0003, status=1)) == [ImportReply(1, None)]


def test_import_answered_for_another_busid_is_refused() -> None:
    # usbip_attach.c compares the echoed busid with the requested one.
    conn = ClientConnection()
    conn.request_import("1-1")
    with pytest.raises(ProtocolError, match="answered for"):
        conn.receive_data(op_reply(0x0003) + usb_device_bytes("1-2", 1, 2))


def test_wrong_version_is_refused() -> None:
    conn = ClientConnection()
    conn.request_devlist()
    with pytest.raises(ProtocolError, match="version"):
        conn.receive_data(bytes.fromhex("0106 0005 00000000 00000000"))


def test_cmd_submit_encodes_the_documented_capture() -> None:
    header = encode_cmd_submit(
        seqnum=0xD05,
        devid=0x0001000F,
        direction=1,
        ep=1,
        transfer_flags=0x200,
        transfer_buffer_length=0x40,
        start_frame=-1,
        number_of_packets=0,
        interval=4,
        setup=bytes(8),
    )
    assert header == CMD_INTR_IN
    assert len(CMD_INTR_OUT_DATA) == 64
    out = encode_cmd_submit(
        seqnum=0xD06,
        devid=0x0001000F,
        direction=0,
        ep=1,
        transfer_flags=0,
        transfer_buffer_length=0x40,
        start_frame=-1,
        interval=4,
        setup=bytes(8),
        data=CMD_INTR_OUT_DATA,
    )
    assert out == CMD_INTR_OUT + CMD_INTR_OUT_DATA


def test_connection_submit_header_fields() -> None:
    conn = imported(busnum=1, devnum=15, first_seqnum=0xD05)
    seqnum, pdu = conn.submit(endpoint=0x81, length=64, interval=4)
    assert seqnum == 0xD05
    # devid (busnum << 16 | devnum), direction IN, ep number without bit 7, URB_DIR_IN.
    assert pdu[:0x1C] == CMD_INTR_IN[:0x1C]
    assert pdu[0x24:] == CMD_INTR_IN[0x24:]
    # Control: direction from bmRequestType bit 7; setup passed through (little-endian).
    setup = bytes.fromhex("8006000100001200")  # GET_DESCRIPTOR(DEVICE), wLength 18
    _, ctrl = conn.submit(endpoint=0x00, length=18, setup=setup)
    assert ctrl[12:20] == bytes.fromhex("00000001 00000000")
    assert ctrl[0x18:0x1C] == (18).to_bytes(4, "big")
    assert ctrl[0x28:0x30] == setup
    _, out = conn.submit(endpoint=0x02, data=b"abc")
    assert out[12:20] == bytes.fromhex("00000000 00000002")
    assert out[48:] == b"abc"


def test_ret_submit_golden_replies_split_anywhere() -> None:
    conn = imported(first_seqnum=0xD05)
    conn.submit(endpoint=0x81, length=64, interval=4)
    conn.submit(endpoint=0x01, data=CMD_INTR_OUT_DATA, interval=4)
    stream = RET_INTR_OUT + RET_INTR_IN + RET_INTR_IN_DATA
    events = conn.receive_data(stream[:47]) + conn.receive_data(stream[47:100])
    events += conn.receive_data(stream[100:])
    assert events == [
        SubmitDone(0xD06, 0, 64, b"", start_frame=-1),
        SubmitDone(0xD05, 0, 64, RET_INTR_IN_DATA, start_frame=-1),
    ]
    assert conn.outstanding == frozenset()


def ret_submit(seqnum: int, status: int = 0, actual: int = 0) -> bytes:
    return (
        (3).to_bytes(4, "big")
        + seqnum.to_bytes(4, "big")
        + bytes(12)
        + status.to_bytes(4, "big", signed=True)
        + actual.to_bytes(4, "big")
        + bytes(20)
    )


def ret_unlink(seqnum: int, status: int) -> bytes:
    return (
        (4).to_bytes(4, "big")
        + seqnum.to_bytes(4, "big")
        + bytes(12)
        + status.to_bytes(4, "big", signed=True)
        + bytes(24)
    )


def test_unlink_of_a_pending_urb_and_no_late_completion() -> None:
    conn = imported()
    seq, _ = conn.submit(endpoint=0x81, length=8)
    own, pdu = conn.unlink(seq)
    assert own == seq + 1  # one counter for SUBMIT and UNLINK, like vhci
    assert pdu[:20] == (2).to_bytes(4, "big") + own.to_bytes(4, "big") + bytes.fromhex(
        "0001000f 00000000 00000000"
    )
    assert pdu[20:24] == seq.to_bytes(4, "big")
    assert pdu[24:] == bytes(24)
    assert conn.receive_data(ret_unlink(own, -errno.ECONNRESET)) == [
        UnlinkDone(own, seq, -errno.ECONNRESET, cancelled=True)
    ]
    # usbip_protocol.rst: after RET_UNLINK no RET_SUBMIT for it; vhci drops the device.
    with pytest.raises(ProtocolError, match="unknown seqnum"):
        conn.receive_data(ret_submit(seq, 0, 0))
    assert conn.state is State.CLOSED


def test_unlink_after_completion_reports_not_cancelled() -> None:
    conn = imported()
    seq, _ = conn.submit(endpoint=0x82, length=4)
    own, _ = conn.unlink(seq)
    events = conn.receive_data(ret_submit(seq, 0, 2) + b"hi" + ret_unlink(own, 0))
    assert events == [SubmitDone(seq, 0, 2, b"hi"), UnlinkDone(own, seq, 0, cancelled=False)]


@pytest.mark.parametrize(
    ("reply", "match"),
    [
        (ret_submit(99), "unknown seqnum"),
        (ret_submit(1, 0, 9), "actual_length 9 > 8"),
        (ret_submit(1, 1), "not a -errno"),
        (ret_unlink(1, -104), "RET_UNLINK for unknown"),
        (b"\0\0\0\x07" + bytes(44), "unknown command"),
    ],
)
def test_protocol_errors(reply: bytes, match: str) -> None:
    conn = imported()
    conn.submit(endpoint=0x82, length=8)
    with pytest.raises(ProtocolError, match=match):
        conn.receive_data(reply)
    with pytest.raises(ProtocolError):
        conn.receive_data(b"")


def test_stall_status_is_an_event_not_an_error() -> None:
    conn = imported()
    seq, _ = conn.submit(endpoint=0x00, setup=bytes.fromhex("8006000600000a00"), length=10)
    assert conn.receive_data(ret_submit(seq, -errno.EPIPE)) == [SubmitDone(seq, -32, 0, b"")]


def test_calls_out_of_order_are_refused() -> None:
    conn = ClientConnection()
    with pytest.raises(HostError):
        conn.submit(endpoint=0x82, length=1)
    conn.request_devlist()
    with pytest.raises(HostError):
        conn.request_import("1-1")
    with pytest.raises(ValueError, match="busid"):
        ClientConnection().request_import("x" * 32)
