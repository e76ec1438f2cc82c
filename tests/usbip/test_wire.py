"""Golden bytes for every USB/IP message and USB descriptor, both directions.

The hex below is written from the tables of usbip_protocol.rst and USB 2.0 §9.6, not
produced by the code under test.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.usbip import wire
from usbccid.usbip.errors import UsbipLocalError, UsbipRemoteError
from usbccid.usbip.function import SetupPacket


def h(text: str) -> bytes:
    return bytes.fromhex("".join(text.split()))


def pad(text: str, size: int) -> str:
    return text.encode().ljust(size, b"\0").hex()


PATH = "/sys/devices/pci0000:00/0000:00:1d.1/usb3/3-2"

DEVICE_INFO = wire.UsbDeviceInfo(
    path=PATH,
    busid="3-2",
    busnum=3,
    devnum=2,
    speed=wire.Speed.FULL,
    vendor_id=0x08E6,
    product_id=0x4433,
    bcd_device=0x0100,
    device_class=0,
    device_subclass=0,
    device_protocol=0,
    configuration_value=1,
    num_configurations=1,
    num_interfaces=1,
)
DEVICE_HEX = (
    pad(PATH, 256)
    + pad("3-2", 32)
    + "00000003 00000002 00000002"  # busnum, devnum, speed (BE)
    + "08e6 4433 0100"  # idVendor, idProduct, bcdDevice (BE)
    + "00 00 00 01 01 01"  # class, subclass, protocol, bConfigurationValue, nconf, nintf
)


def roundtrip(parse: Callable[[bytes], Any], data: bytes, obj: Any) -> None:
    """parse(data) == obj and encode(obj) == data (construct's common() idea, ours)."""
    assert parse(data) == obj
    assert wire.encode(obj) == data


def test_usb_device_is_312_bytes() -> None:
    assert len(h(DEVICE_HEX)) == wire.USB_DEVICE_SIZE == 312


def test_op_req_devlist() -> None:
    roundtrip(wire.parse_op_req_devlist, h("0111 8005 00000000"), wire.OpReqDevlist())


def test_op_rep_devlist_one_device() -> None:
    data = h("0111 0005 00000000 00000001" + DEVICE_HEX + "0b 00 00 00")
    obj = wire.OpRepDevlist(
        devices=(wire.DevlistEntry(DEVICE_INFO, (wire.UsbInterfaceInfo(0x0B, 0, 0),)),)
    )
    assert len(data) == 12 + 312 + 4
    roundtrip(wire.parse_op_rep_devlist, data, obj)


def test_op_rep_devlist_empty() -> None:
    roundtrip(wire.parse_op_rep_devlist, h("0111 0005 00000000 00000000"), wire.OpRepDevlist(()))


def test_op_rep_devlist_interface_count_must_match() -> None:
    entry = wire.DevlistEntry(DEVICE_INFO, ())
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.OpRepDevlist((entry,)))


def test_op_req_import() -> None:
    data = h("0111 8003 00000000" + pad("1-1", 32))
    roundtrip(wire.parse_op_req_import, data, wire.OpReqImport("1-1"))


def test_op_rep_import_ok() -> None:
    data = h("0111 0003 00000000" + DEVICE_HEX)
    roundtrip(wire.parse_op_rep_import, data, wire.OpRepImport(wire.OpStatus.OK, DEVICE_INFO))
    assert DEVICE_INFO.devid == 0x0003_0002


def test_op_rep_import_refused_is_8_bytes() -> None:
    data = h("0111 0003 00000002")
    roundtrip(wire.parse_op_rep_import, data, wire.OpRepImport(wire.OpStatus.DEV_BUSY))


def test_op_rep_import_inconsistent() -> None:
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.OpRepImport(wire.OpStatus.OK))
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.OpRepImport(wire.OpStatus.NA, DEVICE_INFO))
    with pytest.raises(UsbipRemoteError):
        wire.parse_op_rep_import(h("0111 0003 00000000"))
    with pytest.raises(UsbipRemoteError):
        wire.parse_op_rep_import(h("0111 0003 00000001" + DEVICE_HEX))


def test_op_header_version_and_code() -> None:
    assert wire.parse_op_header(h("0111 8005 00000000")) == wire.OpHeader(0x8005, 0)
    with pytest.raises(UsbipRemoteError, match=r"version|expected"):
        wire.parse_op_header(h("0110 8005 00000000"))
    with pytest.raises(UsbipRemoteError):
        wire.parse_op_req_devlist(h("0111 8003 00000000"))


GET_DEVICE_DESCRIPTOR = SetupPacket(0x80, 6, 0x0100, 0, 0x40)

CMD_SUBMIT_CONTROL_IN = h(
    "00000001 00000005 00010002 00000001 00000000"  # command, seqnum, devid, IN, ep 0
    "00000200 00000040 00000000 ffffffff 00000000"  # flags DIR_IN, length, frame, npk, intvl
    "80 06 0001 0000 4000"  # setup, little-endian inside
)


def test_cmd_submit_control_in() -> None:
    obj = wire.CmdSubmit(
        seqnum=5,
        devid=0x00010002,
        direction=wire.Direction.IN,
        ep=0,
        transfer_buffer_length=0x40,
        setup=GET_DEVICE_DESCRIPTOR,
        transfer_flags=0x200,
        number_of_packets=-1,  # 0xffffffff: "not ISO" (usbip_protocol.rst)
    )
    assert len(CMD_SUBMIT_CONTROL_IN) == 48
    roundtrip(wire.parse_urb, CMD_SUBMIT_CONTROL_IN, obj)
    header = wire.parse_urb_header(CMD_SUBMIT_CONTROL_IN)
    assert header.payload_length == 0


def test_cmd_submit_bulk_out_with_payload() -> None:
    data = h(
        "00000001 00000007 00010002 00000000 00000001"
        "00000000 00000003 00000000 00000000 00000000"
        "0000000000000000"
        "616263"
    )
    obj = wire.CmdSubmit(7, 0x00010002, wire.Direction.OUT, 1, 3, data=b"abc")
    roundtrip(wire.parse_urb, data, obj)
    assert wire.parse_urb_header(data[:48]).payload_length == 3


def test_cmd_submit_length_mismatch_is_local_error() -> None:
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.CmdSubmit(1, 1, wire.Direction.OUT, 1, 4, data=b"abc"))
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.CmdSubmit(1, 1, wire.Direction.IN, 1, 4, data=b"abc"))


DEVICE_DESCRIPTOR_HEX = "12 01 0002 00 00 00 40 0912 0100 0001 01 02 03 01"


def test_ret_submit_in_with_payload() -> None:
    payload = h(DEVICE_DESCRIPTOR_HEX)
    data = (
        h(
            "00000003 00000005 00000000 00000000 00000000"  # devid/direction/ep are 0 in replies
            "00000000 00000012 00000000 00000000 00000000"  # status, actual_length, frame, np, ec
            "0000000000000000"
        )
        + payload
    )
    obj = wire.RetSubmit(seqnum=5, status=0, actual_length=18, data=payload)
    assert wire.parse_urb(data, in_reply=True) == obj
    assert wire.encode(obj) == data


def test_ret_submit_stall_and_out() -> None:
    data = h(
        "00000003 00000009 00000000 00000000 00000000"
        "ffffffe0 00000000 00000000 00000000 00000000 0000000000000000"
    )
    roundtrip(wire.parse_urb, data, wire.RetSubmit(9, -32, 0))
    out = h(
        "00000003 0000000a 00000000 00000000 00000000"
        "00000000 00000040 00000000 00000000 00000000 0000000000000000"
    )
    # An OUT completion reports the length but carries no payload.
    roundtrip(wire.parse_urb, out, wire.RetSubmit(10, 0, 64))


def test_ret_submit_data_length_must_match() -> None:
    with pytest.raises(UsbipLocalError):
        wire.encode(wire.RetSubmit(1, 0, 5, data=b"abc"))


def test_cmd_unlink() -> None:
    data = h("00000002 00000006 00010002 00000000 00000000 00000005" + "00" * 24)
    roundtrip(wire.parse_urb, data, wire.CmdUnlink(6, 0x00010002, wire.Direction.OUT, 0, 5))


def test_ret_unlink() -> None:
    data = h("00000004 00000006 00000000 00000000 00000000 ffffff98" + "00" * 24)
    roundtrip(wire.parse_urb, data, wire.RetUnlink(6, -104))


def test_urb_header_errors() -> None:
    with pytest.raises(UsbipRemoteError, match="48"):
        wire.parse_urb_header(CMD_SUBMIT_CONTROL_IN[:47])
    with pytest.raises(UsbipRemoteError, match="unknown USB/IP command"):
        wire.parse_urb_header(h("00000009") + CMD_SUBMIT_CONTROL_IN[4:])
    bad_dir = CMD_SUBMIT_CONTROL_IN[:12] + h("00000002") + CMD_SUBMIT_CONTROL_IN[16:]
    with pytest.raises(UsbipRemoteError, match="direction"):
        wire.parse_urb_header(bad_dir)
    with pytest.raises(UsbipRemoteError, match="payload"):
        wire.parse_urb(CMD_SUBMIT_CONTROL_IN + b"x")
    unlink = wire.encode(wire.RetUnlink(1, 0))
    with pytest.raises(UsbipRemoteError):
        wire.with_payload(wire.parse_urb(unlink), b"x")


def test_setup_packet_is_little_endian() -> None:
    data = h("80 06 0001 0904 ff00")
    setup = SetupPacket(0x80, 6, 0x0100, 0x0409, 0x00FF)
    assert wire.parse_setup(data) == setup
    assert wire.encode_setup(setup) == data
    with pytest.raises(UsbipRemoteError):
        wire.parse_setup(data[:7])


# --- descriptors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hex_", "obj"),
    [
        (
            DEVICE_DESCRIPTOR_HEX,
            wire.DeviceDescriptor(0x0200, 0, 0, 0, 64, 0x1209, 0x0001, 0x0100, 1, 2, 3, 1),
        ),
        ("0a 06 0002 00 00 00 40 01 00", wire.DeviceQualifierDescriptor(0x0200, 0, 0, 0, 64, 1)),
        ("09 02 2000 01 01 00 80 32", wire.ConfigurationDescriptor(32, 1, 1, 0, 0x80, 50)),
        ("09 04 00 00 03 ff 00 00 04", wire.InterfaceDescriptor(0, 0, 3, 0xFF, 0, 0, 4)),
        ("07 05 82 02 4000 00", wire.EndpointDescriptor(0x82, 2, 64, 0)),
        ("07 05 83 03 0800 0a", wire.EndpointDescriptor(0x83, 3, 8, 10)),
    ],
)
def test_descriptors(hex_: str, obj: wire.Descriptor) -> None:
    assert wire.parse_descriptor(h(hex_)) == obj
    assert wire.encode_descriptor(obj) == h(hex_)


def test_descriptor_errors() -> None:
    with pytest.raises(UsbipRemoteError):
        wire.parse_descriptor(b"\x12")
    with pytest.raises(UsbipRemoteError):
        wire.parse_descriptor(h("09 0f 0000 00 00 00 00 00"))  # BOS: not declared here
    with pytest.raises(UsbipRemoteError):
        wire.parse_descriptor(h("08 05 82 02 4000 00"))  # bLength wrong
    with pytest.raises(UsbipLocalError):
        wire.encode_descriptor(wire.EndpointDescriptor(0x182, 2, 64, 0))


def test_string_descriptors() -> None:
    assert wire.encode_string_descriptor("ab") == h("06 03 6100 6200")
    assert wire.parse_string_descriptor(h("06 03 6100 6200")) == "ab"
    assert wire.encode_string_descriptor("é€") == h("06 03 e900 ac20")
    assert wire.encode_langid_descriptor() == h("04 03 0904")
    assert wire.parse_langid_descriptor(h("06 03 0904 0704")) == (0x0409, 0x0407)
    with pytest.raises(UsbipRemoteError):
        wire.parse_langid_descriptor(h("05 03 0904 07"))
    with pytest.raises(UsbipRemoteError):
        wire.parse_string_descriptor(h("04 03 00d8"))  # lone surrogate
    with pytest.raises(UsbipRemoteError):
        wire.parse_string_descriptor(h("06 03 6100"))  # bLength says more than there is
    with pytest.raises(UsbipLocalError):
        wire.encode_string_descriptor("x" * 127)


# --- property tests -------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
s32 = st.integers(-(2**31), 2**31 - 1)
u16 = st.integers(0, 0xFFFF)
u8 = st.integers(0, 0xFF)
setups = st.builds(SetupPacket, u8, u8, u16, u16, u16)
directions = st.sampled_from(list(wire.Direction))


@st.composite
def urb_messages(draw: st.DrawFn) -> tuple[wire.UrbMessage, bool]:
    kind = draw(st.integers(0, 3))
    if kind == 0:
        direction = draw(directions)
        data = draw(st.binary(max_size=64)) if direction == wire.Direction.OUT else b""
        length = len(data) if direction == wire.Direction.OUT else draw(u32)
        msg: wire.UrbMessage = wire.CmdSubmit(
            draw(u32), draw(u32), direction, draw(st.integers(0, 15)), length,
            setup=draw(setups), data=data, transfer_flags=draw(u32),
            start_frame=draw(s32), number_of_packets=draw(s32), interval=draw(s32),
        )  # fmt: skip
        return msg, False
    if kind == 1:
        data = draw(st.binary(max_size=64))
        return wire.RetSubmit(draw(u32), draw(s32), len(data), data=data), True
    if kind == 2:
        return wire.CmdUnlink(draw(u32), draw(u32), draw(directions), draw(u32), draw(u32)), False
    return wire.RetUnlink(draw(u32), draw(s32)), False


@settings(max_examples=150)
@given(urb_messages())
def test_urb_roundtrip(case: tuple[wire.UrbMessage, bool]) -> None:
    msg, in_reply = case
    assert wire.parse_urb(wire.encode(msg), in_reply=in_reply) == msg


@settings(max_examples=150)
@given(st.binary(max_size=120))
def test_parsers_raise_only_remote_errors(data: bytes) -> None:
    parsers: list[Callable[[bytes], object]] = [
        wire.parse_op_header,
        wire.parse_op_req_devlist,
        wire.parse_op_req_import,
        wire.parse_op_rep_devlist,
        wire.parse_op_rep_import,
        wire.parse_urb,
        wire.parse_setup,
        wire.parse_descriptor,
        wire.parse_string_descriptor,
        wire.parse_langid_descriptor,
    ]
    for parse in parsers:
        with contextlib.suppress(UsbipRemoteError):
            parse(data)
