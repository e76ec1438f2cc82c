"""CCID wire formats against the CCID Rev 1.1 layouts, checked independently with struct."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.ccid.descriptor import ReaderConfig, class_descriptor
from usbccid.ccid.errors import CcidError, CommandStatus, IccStatus, SlotError
from usbccid.ccid.wire import (
    Abort,
    ClassDescriptor,
    Command,
    DataBlock,
    DataRateAndClockFrequency,
    Escape,
    EscapeReply,
    GetParameters,
    GetSlotStatus,
    IccClock,
    IccPowerOff,
    IccPowerOn,
    Mechanical,
    Parameters,
    PcToRdr,
    RdrToPc,
    Reply,
    ResetParameters,
    Secure,
    SetDataRateAndClockFrequency,
    SetParameters,
    SlotStatus,
    T0Apdu,
    T0Parameters,
    T1Parameters,
    UnknownCommand,
    XfrBlock,
    build_command,
    build_dwords,
    build_notify_slot_change,
    build_reply,
    notify_slot_change_size,
    parse_command,
    parse_dwords,
    parse_header,
    parse_notify_slot_change,
    parse_reply,
    reply_type,
)

# (command, bMessageType, bytes 7..9, abData) — the CCID Rev 1.1 §6.1 layouts.
GOLDEN_COMMANDS: list[tuple[Command, int, bytes, bytes]] = [
    (IccPowerOn(0, 1, power_select=2), 0x62, b"\x02\x00\x00", b""),
    (IccPowerOff(0, 2), 0x63, b"\x00\x00\x00", b""),
    (GetSlotStatus(1, 3), 0x65, b"\x00\x00\x00", b""),
    (
        XfrBlock(0, 4, b"\x00\xa4\x04\x00", bwi=5, level_parameter=0x0201),
        0x6F,
        b"\x05\x01\x02",
        b"\x00\xa4\x04\x00",
    ),
    (GetParameters(0, 5), 0x6C, b"\x00\x00\x00", b""),
    (ResetParameters(0, 6), 0x6D, b"\x00\x00\x00", b""),
    (
        SetParameters(0, 7, protocol_num=1, data=b"\x11\x10\x00\x4d\x00\x20\x00"),
        0x61,
        b"\x01\x00\x00",
        b"\x11\x10\x00\x4d\x00\x20\x00",
    ),
    (Escape(0, 8, b"\x6a"), 0x6B, b"\x00\x00\x00", b"\x6a"),
    (IccClock(0, 9, clock_command=1), 0x6E, b"\x01\x00\x00", b""),
    (T0Apdu(0, 10, 3, 0x00, 0x80), 0x6A, b"\x03\x00\x80", b""),
    (Secure(0, 11, b"\x00\x01", bwi=0, level_parameter=0x0010), 0x69, b"\x00\x10\x00", b"\x00\x01"),
    (Mechanical(0, 12, function=4), 0x71, b"\x04\x00\x00", b""),
    (Abort(0, 13), 0x72, b"\x00\x00\x00", b""),
    (SetDataRateAndClockFrequency(0, 14, bytes(8)), 0x73, b"\x00\x00\x00", bytes(8)),
    (UnknownCommand(0, 15, message_type=0x99, data=b"zz"), 0x99, b"\x00\x00\x00", b"zz"),
]


@pytest.mark.parametrize(("command", "code", "specific", "data"), GOLDEN_COMMANDS)
def test_command_layout(command: Command, code: int, specific: bytes, data: bytes) -> None:
    raw = build_command(command)
    # Independent check: bMessageType, dwLength (LE), bSlot, bSeq, 3 specific bytes.
    assert raw == struct.pack("<BIBB", code, len(data), command.slot, command.seq) + specific + data
    assert parse_command(raw) == command
    header = parse_header(raw)
    assert (header.message_type, header.length, header.slot, header.seq) == (
        code,
        len(data),
        command.slot,
        command.seq,
    )


def test_every_pc_to_rdr_message_has_a_golden_vector() -> None:
    covered = {code for _, code, _, _ in GOLDEN_COMMANDS}
    assert {m.value for m in PcToRdr} <= covered


def test_rfu_bytes_are_ignored_on_parse() -> None:
    raw = struct.pack("<BIBB", 0x65, 0, 0, 7) + b"\xff\xff\xff"
    assert parse_command(raw) == GetSlotStatus(0, 7)


@pytest.mark.parametrize("code", [0x62, 0x63, 0x65, 0x6C, 0x6D, 0x6E, 0x6A, 0x71, 0x72])
def test_data_on_a_message_without_data_is_a_length_error(code: int) -> None:
    raw = struct.pack("<BIBB", code, 1, 0, 0) + b"\x00\x00\x00" + b"x"
    with pytest.raises(CcidError) as info:
        parse_command(raw)
    assert info.value.error == SlotError.BAD_LENGTH


@pytest.mark.parametrize("raw", [b"", b"\x65" * 9, struct.pack("<BIBB", 0x6F, 5, 0, 0) + bytes(4)])
def test_truncated_command_is_wrapped_into_ccid_error(raw: bytes) -> None:
    with pytest.raises(CcidError) as info:
        parse_command(raw)
    assert info.value.error == SlotError.BAD_LENGTH
    assert info.value.__cause__ is not None  # the ConstructError, wrapped once


def test_trailing_bytes_are_a_length_error() -> None:
    raw = build_command(XfrBlock(0, 1, b"abc")) + b"!"
    with pytest.raises(CcidError):
        parse_command(raw)


GOLDEN_REPLIES: list[tuple[Reply, int, int, bytes]] = [
    # (reply, bMessageType, byte 9, abData)
    (
        DataBlock(0, 1, IccStatus.ACTIVE, data=b"\x3b\x00", chain_parameter=0x01),
        0x80,
        1,
        b"\x3b\x00",
    ),
    (SlotStatus(2, 3, IccStatus.ABSENT, CommandStatus.FAILED, 0xFE, clock_status=0), 0x81, 0, b""),
    (Parameters(0, 4, IccStatus.INACTIVE, protocol_num=1, data=bytes(7)), 0x82, 1, bytes(7)),
    (EscapeReply(0, 5, IccStatus.ACTIVE, CommandStatus.FAILED, 0), 0x83, 0, b""),
    (
        DataRateAndClockFrequency(0, 6, clock_frequency=4000, data_rate=10752),
        0x84,
        0,
        struct.pack("<II", 4000, 10752),
    ),
]


@pytest.mark.parametrize(("reply", "code", "byte9", "data"), GOLDEN_REPLIES)
def test_reply_layout(reply: Reply, code: int, byte9: int, data: bytes) -> None:
    raw = build_reply(reply)
    # §6.2.6 bStatus: bmICCStatus in bits 1..0, bmCommandStatus in bits 7..6.
    status = reply.icc_status | reply.command_status << 6
    expected = (
        struct.pack("<BIBBBBB", code, len(data), reply.slot, reply.seq, status, reply.error, byte9)
        + data
    )
    assert raw == expected
    assert parse_reply(raw) == reply


def test_time_extension_status_byte() -> None:
    raw = build_reply(DataBlock(0, 9, IccStatus.ACTIVE, CommandStatus.TIME_EXTENSION, 1))
    assert raw == bytes.fromhex("80 00000000 00 09 80 01 00")


def test_status_bits_rfu_are_zero() -> None:
    for icc in IccStatus:
        for command_status in CommandStatus:
            raw = build_reply(SlotStatus(0, 0, icc, command_status, 0))
            assert raw[7] & 0b0011_1100 == 0


def test_parse_reply_rejects_non_replies() -> None:
    with pytest.raises(CcidError):
        parse_reply(build_command(GetSlotStatus(0, 0)))
    with pytest.raises(CcidError):
        parse_reply(bytes.fromhex("81 00000000 00 00 03 00 00"))  # bmICCStatus 3 is RFU


def test_reply_type_per_command() -> None:
    assert reply_type(PcToRdr.ICC_POWER_ON) is RdrToPc.DATA_BLOCK
    assert reply_type(PcToRdr.XFR_BLOCK) is RdrToPc.DATA_BLOCK
    assert reply_type(PcToRdr.SECURE) is RdrToPc.DATA_BLOCK
    assert reply_type(PcToRdr.SET_PARAMETERS) is RdrToPc.PARAMETERS
    assert reply_type(PcToRdr.ESCAPE) is RdrToPc.ESCAPE
    assert reply_type(PcToRdr.SET_DATA_RATE_AND_CLOCK_FREQUENCY) is (
        RdrToPc.DATA_RATE_AND_CLOCK_FREQUENCY
    )
    for code in (0x63, 0x65, 0x6E, 0x6A, 0x71, 0x72, 0x00, 0xFF):
        assert reply_type(code) is RdrToPc.SLOT_STATUS


@pytest.mark.parametrize(
    ("slots", "present", "changed", "expected"),
    [
        (1, [True], [True], b"\x50\x03"),
        (1, [False], [True], b"\x50\x02"),
        (1, [True], [False], b"\x50\x01"),
        (3, [True, False, True], [False, True, True], b"\x50\x39"),
        (5, [False] * 4 + [True], [False] * 4 + [True], b"\x50\x00\x03"),
    ],
)
def test_notify_slot_change(
    slots: int, present: list[bool], changed: list[bool], expected: bytes
) -> None:
    raw = build_notify_slot_change(present, changed)
    assert raw == expected
    assert len(raw) == notify_slot_change_size(slots)
    assert parse_notify_slot_change(raw, slots) == (present, changed)


def test_parameter_structures() -> None:
    t0 = T0Parameters()
    assert t0.build() == bytes.fromhex("1100000a00")  # libccid's T=0 defaults
    assert T0Parameters.parse(t0.build()) == t0
    t1 = T1Parameters()
    assert t1.build() == bytes.fromhex("1110004d002000")  # libccid T=1 defaults
    assert T1Parameters.parse(t1.build()) == t1
    with pytest.raises(CcidError):
        T0Parameters.parse(bytes(7))
    with pytest.raises(CcidError):
        T1Parameters.parse(bytes(5))


def test_dwords() -> None:
    assert build_dwords([4000, 10752]) == struct.pack("<II", 4000, 10752)
    assert parse_dwords(struct.pack("<II", 1, 2)) == [1, 2]


# CCID Rev 1.1 §5.1 Table 5.1-1, written out independently of wire.py.
_SPEC_LAYOUT = "<BBHBBIIIBIIBIIIIIBBHBB"
_SPEC_FIELDS = [
    "bLength",
    "bDescriptorType",
    "bcdCCID",
    "bMaxSlotIndex",
    "bVoltageSupport",
    "dwProtocols",
    "dwDefaultClock",
    "dwMaximumClock",
    "bNumClockSupported",
    "dwDataRate",
    "dwMaxDataRate",
    "bNumDataRatesSupported",
    "dwMaxIFSD",
    "dwSynchProtocols",
    "dwMechanical",
    "dwFeatures",
    "dwMaxCCIDMessageLength",
    "bClassGetResponse",
    "bClassEnvelope",
    "wLcdLayout",
    "bPINSupport",
    "bMaxCCIDBusySlots",
]


def test_class_descriptor_field_by_field() -> None:
    raw = class_descriptor(ReaderConfig(), slot_count=1).build()
    assert struct.calcsize(_SPEC_LAYOUT) == 54
    assert len(raw) == 54
    fields = dict(zip(_SPEC_FIELDS, struct.unpack(_SPEC_LAYOUT, raw), strict=True))
    assert fields == {
        "bLength": 54,
        "bDescriptorType": 0x21,
        "bcdCCID": 0x0110,
        "bMaxSlotIndex": 0,
        "bVoltageSupport": 0x07,
        "dwProtocols": 0x03,
        "dwDefaultClock": 4000,
        "dwMaximumClock": 4000,
        "bNumClockSupported": 0,
        "dwDataRate": 10752,
        "dwMaxDataRate": 10752,
        "bNumDataRatesSupported": 0,
        "dwMaxIFSD": 254,
        "dwSynchProtocols": 0,
        "dwMechanical": 0,
        "dwFeatures": 0x000400FE,
        "dwMaxCCIDMessageLength": 65554,
        "bClassGetResponse": 0xFF,
        "bClassEnvelope": 0xFF,
        "wLcdLayout": 0,
        "bPINSupport": 0,
        "bMaxCCIDBusySlots": 1,
    }
    # the offsets libccid 1.5.2 ccid_usb.c reads (dw2i(device_descriptor, n))
    assert raw[4] == 0  # bMaxSlotIndex
    assert struct.unpack_from("<I", raw, 40)[0] == 0x000400FE  # dwFeatures
    assert struct.unpack_from("<I", raw, 44)[0] == 65554  # dwMaxCCIDMessageLength
    assert raw[27] == 0  # bNumDataRatesSupported: libccid skips GET_DATA_RATES
    assert raw[53] == 1  # bMaxCCIDBusySlots


def test_class_descriptor_roundtrip_and_multislot() -> None:
    descriptor = class_descriptor(ReaderConfig(max_message_length=271), slot_count=3)
    assert ClassDescriptor.parse(descriptor.build()) == descriptor
    raw = descriptor.build()
    assert raw[4] == 2
    assert raw[53] == 3
    assert struct.unpack_from("<I", raw, 44)[0] == 271
    with pytest.raises(CcidError):
        ClassDescriptor.parse(raw[:-1])
    with pytest.raises(CcidError):
        ClassDescriptor.parse(b"\x35" + raw[1:])  # bLength must be 54


# Real readers' descriptors from LudovicRousseau/CCID readers/*.txt (the fields as parse
# prints them), to check the parser against values we did not produce.
def test_class_descriptor_parses_a_real_reader() -> None:
    # readers/Canokeys_Canokey.txt (libccid corpus): T=1, 4 MHz, 307200 bps, IFSD 1342,
    # dwFeatures 0x000400FE, dwMaxCCIDMessageLength 1352.
    raw = struct.pack(
        _SPEC_LAYOUT,
        54,
        0x21,
        0x0110,
        0,
        0x07,
        0x02,
        4000,
        4000,
        0,
        307200,
        307200,
        0,
        1342,
        0,
        0,
        0x000400FE,
        1352,
        0xFF,
        0xFF,
        0,
        0,
        1,
    )
    descriptor = ClassDescriptor.parse(raw)
    assert descriptor.protocols == 2
    assert descriptor.max_ifsd == 1342
    assert descriptor.max_ccid_message_length == 1352
    assert descriptor.build() == raw


_commands = st.one_of(
    st.builds(IccPowerOn, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    st.builds(
        XfrBlock,
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=300),
        st.integers(0, 255),
        st.integers(0, 0xFFFF),
    ),
    st.builds(
        SetParameters,
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.binary(max_size=10),
    ),
    st.builds(Escape, st.integers(0, 255), st.integers(0, 255), st.binary(max_size=40)),
    st.builds(
        T0Apdu,
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
        st.integers(0, 255),
    ),
    st.builds(GetSlotStatus, st.integers(0, 255), st.integers(0, 255)),
)


@settings(max_examples=150)
@given(_commands)
def test_command_roundtrip(command: Command) -> None:
    assert parse_command(build_command(command)) == command


_replies = st.one_of(
    st.builds(
        DataBlock,
        st.integers(0, 255),
        st.integers(0, 255),
        st.sampled_from(IccStatus),
        st.sampled_from(CommandStatus),
        st.integers(0, 255),
        st.binary(max_size=300),
        st.integers(0, 255),
    ),
    st.builds(
        SlotStatus,
        st.integers(0, 255),
        st.integers(0, 255),
        st.sampled_from(IccStatus),
        st.sampled_from(CommandStatus),
        st.integers(0, 255),
        st.integers(0, 255),
    ),
)


@settings(max_examples=150)
@given(_replies)
def test_reply_roundtrip(reply: Reply) -> None:
    assert parse_reply(build_reply(reply)) == reply
