"""The PIN pad: PC_to_RDR_Secure parsing, PIN insertion, the keypad, the reader's answers.

The structures are what libccid 1.5.2 sends (commands.c SecurePINVerify/SecurePINModify:
the PC/SC v2 part 10 structure without bTimeOut2 and ulDataLength) for what OpenSC 0.23
builds (reader-pcsc.c part10_build_verify_pin_block / part10_build_modify_pin_block, the
templates from iso7816.c iso7816_build_pin_apdu + sec.c sc_build_pin); the CAC's PIN
settings come from pkcs15-cac.c (ASCII numeric, 4..8 digits, stored length 8, pad FFh,
NEEDS_PADDING, reference 00h).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cac.conftest import PIN, make_profile
from tests.ccid.helpers import block, drain, drive, exchange, read, read_reply, send
from usbccid.cac.card import CacCard
from usbccid.cac.profile import MemoryPinStateStore
from usbccid.card import Card
from usbccid.ccid import CcidError, CcidReader, CommandStatus, ReaderConfig, SlotError
from usbccid.ccid.descriptor import class_descriptor
from usbccid.ccid.identity import make_identity
from usbccid.ccid.pinpad import (
    MODIFY_OFFSETS,
    TRANSITIONS,
    VERIFY_OFFSETS,
    EntryState,
    Key,
    PinPadConfig,
    PinPrompt,
    Stage,
    Step,
    pin_request,
)
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import (
    Abort,
    DataBlock,
    GetSlotStatus,
    IccPowerOff,
    IccPowerOn,
    PinFormat,
    PinModify,
    PinType,
    PinVerify,
    Reply,
    Secure,
    SlotStatus,
    XfrBlock,
    build_secure_data,
    parse_secure_data,
)
from usbccid.usbip.function import SetupPacket

FF8 = b"\xff" * 8
#: OpenSC's CAC VERIFY template on a PIN pad: 8 bytes of FFh (sc_build_pin pads to the
#: stored length with the pad character; the PIN itself is empty).
CAC_VERIFY = bytes.fromhex("0020000008") + FF8
#: OpenSC's CAC CHANGE REFERENCE DATA template: current and new PIN blocks, 8 bytes each.
CAC_CHANGE = bytes.fromhex("0024000010") + FF8 + FF8
#: part10_build_verify_pin_block for the CAC: ASCII, units bytes, position 0 (the PIN
#: offset is 5, the first data byte), block size 8 (pad_length), no length field.
CAC_FORMAT = PinFormat(units_bytes=True, position=0, pin_type=PinType.ASCII, block_size=8)
#: part10_build_modify_pin_block for the CAC: ASCII without the units bit (it is set for
#: BCD only), the blocks at bInsertionOffsetOld 0 / bInsertionOffsetNew 8.
CAC_MODIFY_FORMAT = PinFormat(units_bytes=False, position=0, pin_type=PinType.ASCII, block_size=8)


def opensc_verify(apdu: bytes = CAC_VERIFY, *, display: bool = False, **kw: object) -> PinVerify:
    """What libccid passes on for OpenSC's part10_build_verify_pin_block."""
    args: dict[str, object] = {
        "format": CAC_FORMAT,
        "apdu": apdu,
        "timeout": 30,  # SC_CCID_PIN_TIMEOUT
        "min_digits": 4,
        "max_digits": 8,
        "entry_validation": 0x02,  # keypress only
        "number_message": 0xFF if display else 0x00,
        "lang_id": 0x0000,
        "msg_index": 0x00,
    }
    args.update(kw)
    return PinVerify(**args)  # type: ignore[arg-type]


def opensc_modify(
    apdu: bytes = CAC_CHANGE, *, display: bool = False, implicit: bool = False, **kw: object
) -> PinModify:
    """What libccid passes on for OpenSC's part10_build_modify_pin_block (with libccid's
    message-index layout: bMsgIndex2 only for bNumberMessage != 0, bMsgIndex3 for >= 3)."""
    number = (2 if implicit else 3) if display else 0
    indexes = {0: (0x00,), 2: (0x01, 0x02), 3: (0x00, 0x01, 0x02)}[number]
    args: dict[str, object] = {
        "format": CAC_MODIFY_FORMAT,
        "apdu": apdu,
        "timeout": 30,
        "insertion_offset_old": 0,
        "insertion_offset_new": 8,
        "min_digits": 4,
        "max_digits": 8,
        "confirm_pin": 0x01 if implicit else 0x03,
        "entry_validation": 0x02,
        "number_message": number,
        "lang_id": 0x0000,
        "msg_indexes": indexes,
    }
    args.update(kw)
    return PinModify(**args)  # type: ignore[arg-type]


def keyed_apdu(structure: PinVerify | PinModify, *entries: str) -> bytes:
    """The APDU the reader builds from ``structure`` and the entries, stage by stage."""
    request = pin_request(build_secure_data(structure))
    by_stage = dict(zip(request.stages, entries, strict=True))
    by_stage.pop(Stage.CONFIRM, None)
    return request.apdu(by_stage)


def h(text: str) -> bytes:
    return bytes.fromhex(text)


# --------------------------------------------------------------------------- structures


def test_descriptor_announces_the_pin_pad() -> None:
    plain = class_descriptor(ReaderConfig(), 1)
    assert (plain.pin_support, plain.lcd_layout) == (0, 0)
    pad = class_descriptor(ReaderConfig(pinpad=PinPadConfig()), 1)
    assert pad.pin_support == 0x03  # verification and modification
    assert pad.lcd_layout == 0x0210  # 2 lines of 16 characters
    verify_only = class_descriptor(
        ReaderConfig(pinpad=PinPadConfig(modify=False, lcd_lines=0, lcd_columns=0)), 1
    )
    assert (verify_only.pin_support, verify_only.lcd_layout) == (0x01, 0)
    # bytes 50..52 of the 54-byte descriptor, where libccid ccid_usb.c reads them
    raw = pad.build()
    assert raw[50:53] == bytes([0x10, 0x02, 0x03])


def test_verify_structure_round_trips_and_offsets_match_the_declaration() -> None:
    structure = opensc_verify(display=True)
    data = build_secure_data(structure)
    assert parse_secure_data(data) == structure
    # libccid's CCID frame for OpenSC's CAC VERIFY (bTimeOut2 and ulDataLength dropped)
    assert data[:15] == h("00 1e 82 08 00 08 04 02 ff 00 00 00 00 00 00")
    # Every named offset (message offsets: abData starts at 10) points at its field.
    marked = PinVerify(
        format=PinFormat(units_bytes=True, position=9, pin_type=PinType.BCD),
        apdu=b"\xa0\xa1\xa2\xa3",
        timeout=0x11,
        min_digits=0x15,
        max_digits=0x16,
        entry_validation=0x17,
        number_message=0x18,
        lang_id=0x1920,
        msg_index=0x21,
        teo_prologue=b"\x22\x23\x24",
    )
    raw = bytes(10) + build_secure_data(marked)
    assert raw[VERIFY_OFFSETS["bTimeOut"]] == 0x11
    assert raw[VERIFY_OFFSETS["bmFormatString"]] == 0x80 | 9 << 3 | PinType.BCD
    assert raw[VERIFY_OFFSETS["wPINMaxExtraDigit"]] == 0x16  # little-endian: max first
    assert raw[VERIFY_OFFSETS["wPINMaxExtraDigit"] + 1] == 0x15
    assert raw[VERIFY_OFFSETS["bEntryValidationCondition"]] == 0x17
    assert raw[VERIFY_OFFSETS["bNumberMessage"]] == 0x18
    assert raw[VERIFY_OFFSETS["wLangId"]] == 0x20
    assert raw[VERIFY_OFFSETS["bMsgIndex"]] == 0x21
    assert raw[VERIFY_OFFSETS["bTeoPrologue"]] == 0x22
    assert raw[VERIFY_OFFSETS["abPINApdu"]] == 0xA0


@pytest.mark.parametrize(
    ("number_message", "indexes"),
    [(0x00, (0x31,)), (0x01, (0x31, 0x32)), (0x02, (0x31, 0x32)), (0x03, (0x31, 0x32, 0x33))],
)
def test_modify_structure_message_index_layout(
    number_message: int, indexes: tuple[int, ...]
) -> None:
    """libccid 1.5.2 SecurePINModify: bMsgIndex2 only when bNumberMessage != 0,
    bMsgIndex3 only when bNumberMessage >= 3; the APDU follows bTeoPrologue."""
    structure = opensc_modify(number_message=number_message, msg_indexes=indexes)
    data = build_secure_data(structure)
    assert parse_secure_data(data) == structure
    raw = bytes(10) + data
    assert raw[MODIFY_OFFSETS["bMsgIndex1"] : MODIFY_OFFSETS["bMsgIndex1"] + len(indexes)] == (
        bytes(indexes)
    )
    apdu_at = MODIFY_OFFSETS["bMsgIndex1"] + len(indexes) + 3
    assert raw[apdu_at:] == CAC_CHANGE
    for name, value in (
        ("bInsertionOffsetNew", 8),
        ("bConfirmPIN", 0x03),
        ("bEntryValidationCondition", 0x02),
        ("bNumberMessage", number_message),
    ):
        assert raw[MODIFY_OFFSETS[name]] == value, name


def test_gemalto_readers_get_all_three_message_indexes() -> None:
    """has_gemalto_modify_pin_bug: libccid sends bMsgIndex1..3 and restores the real
    bNumberMessage, so a Gemalto-VID reader must read three indexes whatever it says."""
    structure = opensc_modify(number_message=0, msg_indexes=(0, 1, 2))
    data = build_secure_data(structure, all_message_indexes=True)
    assert len(data) == len(build_secure_data(opensc_modify())) + 2
    assert parse_secure_data(data, all_message_indexes=True) == structure
    request = pin_request(data, gemalto=True)
    assert request.apdu({Stage.CURRENT: "1234", Stage.NEW: "5678"}) == (
        h("0024000010") + b"1234\xff\xff\xff\xff5678\xff\xff\xff\xff"
    )
    # Read with the standard layout, the two extra bytes would shift the APDU.
    assert parse_secure_data(data).apdu != CAC_CHANGE


# --------------------------------------------------------------------------- insertion

_ASCII_BYTES = PinFormat(units_bytes=True, pin_type=PinType.ASCII)
_BCD_BYTES = PinFormat(units_bytes=True, pin_type=PinType.BCD)
#: OpenSC's GLP (ISO 9564 format 2) PINs: BCD from bit 8, a 4-bit length at bit 4,
#: 8-byte block (part10_build_verify_pin_block: 0x40 | 0x08, bmPINLengthFormat 0x04).
_GLP = PinFormat(
    units_bytes=False, position=8, pin_type=PinType.BCD, length_size=4, block_size=8,
    length_position=4,
)  # fmt: skip

INSERTIONS: list[tuple[str, PinFormat, bytes, str, bytes]] = [
    ("OpenSC CAC: ASCII in an FF-padded block", CAC_FORMAT, CAC_VERIFY, "1234",
     h("0020000008 31323334 ffffffff")),
    ("the full 8 digits", CAC_FORMAT, CAC_VERIFY, "12345678", h("0020000008 3132333435363738")),
    ("OpenSC ASCII without padding: variable block, Lc grows from 00",
     _ASCII_BYTES, h("0020000100"), "123456", h("0020000106 313233343536")),
    ("a template without Lc (case 1): the PIN brings it", _ASCII_BYTES, h("00200080"), "1234",
     h("0020008004 31323334")),
    ("OpenSC BCD with padding: pre-padded frame, block size 0",
     _BCD_BYTES, h("0020000104 ffffffff"), "1234", h("0020000104 1234ffff")),
    ("BCD, odd length: the last nibble keeps the padding",
     _BCD_BYTES, h("0020000104 ffffffff"), "12345", h("0020000104 12345fff")),
    ("OpenSC GLP: control nibble 2, length nibble, BCD, FF padding",
     _GLP, h("0020000108 20ffffffffffffff"), "1234", h("0020000108 241234ffffffffff")),
    ("GLP, odd length", _GLP, h("0020000108 20ffffffffffffff"), "12345",
     h("0020000108 2512345fffffffff")),
    ("GLP, 12 digits", _GLP, h("0020000108 20ffffffffffffff"), "123456789012",
     h("0020000108 2c123456789012ff")),
    ("ASCII right-justified", PinFormat(units_bytes=True, right_justify=True, block_size=8),
     CAC_VERIFY, "1234", h("0020000008 ffffffff 31323334")),
    ("BCD right-justified, odd length",
     PinFormat(units_bytes=True, right_justify=True, pin_type=PinType.BCD, block_size=4),
     h("0020000004 ffffffff"), "12345", h("0020000004 fff12345")),
    ("binary: one byte per digit",
     PinFormat(units_bytes=True, pin_type=PinType.BINARY, block_size=6),
     h("0020000006 000000000000"), "9087", h("0020000006 090008070000")),
    ("a length byte before the PIN (units bytes)",
     PinFormat(units_bytes=True, position=1, length_size=8, block_size=9,
               length_units_bytes=True),
     h("0020000009") + b"\xff" * 9, "1234", h("0020000009 04 31323334 ffffffff")),
    ("PIN position in bits, after a 4-bit length at bit 0",
     PinFormat(units_bytes=False, position=4, pin_type=PinType.BCD, length_size=4,
               block_size=3),
     h("0020000003 ffffff"), "123", h("0020000003 3123ff")),
    ("position 2 bytes into the data, the header bytes kept",
     PinFormat(units_bytes=True, position=2, block_size=6), h("0020000006 a5a5 ffffffff"),
     "12", h("0020000006 a5a5 3132ffff")),
    ("extended Lc template", CAC_FORMAT, h("00200000000008") + FF8, "4321",
     h("00200000000008 34333231 ffffffff")),
    ("a template with Le keeps it", CAC_FORMAT, h("0020000008") + FF8 + h("00"), "1234",
     h("0020000008 31323334ffffffff 00")),
    ("variable block with Le (case 2 template)", _ASCII_BYTES, h("0020000010"), "12",
     h("0020000002 3132 10")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "fmt", "template", "digits", "expected"),
    INSERTIONS,
    ids=[case[0] for case in INSERTIONS],
)
def test_pin_insertion(
    why: str, fmt: PinFormat, template: bytes, digits: str, expected: bytes
) -> None:
    structure = opensc_verify(template, format=fmt, min_digits=1, max_digits=12)
    assert keyed_apdu(structure, digits) == expected


MODIFICATIONS: list[tuple[str, PinModify, tuple[str, ...], bytes]] = [
    ("OpenSC CAC change: current + new PIN, FF-padded blocks at 0 and 8", opensc_modify(),
     ("1234", "654321", "654321"), h("0024000010 31323334ffffffff 363534333231ffff")),
    ("with a display: bNumberMessage 3, indexes 0/1/2", opensc_modify(display=True),
     ("12345678", "87654321", "87654321"), h("0024000010") + b"12345678" + b"87654321"),
    ("implicit change (bConfirmPIN 01h): only the new PIN, at bInsertionOffsetNew",
     opensc_modify(h("0024010008") + FF8, implicit=True, insertion_offset_new=0),
     ("13572468", "13572468"), h("0024010008") + b"13572468"),
    ("GLP blocks: each with its control and length nibbles",
     opensc_modify(h("0024000010 20ffffffffffffff 20ffffffffffffff"), format=_GLP),
     ("1234", "56789", "56789"), h("0024000010 241234ffffffffff 2556789fffffffff")),
    ("BCD variable blocks: the new PIN follows the current one",
     opensc_modify(h("0024000000"), format=_BCD_BYTES, insertion_offset_new=0),
     ("1234", "567890", "567890"), h("0024000005 1234 567890")),
    ("no confirmation (bConfirmPIN 02h)", opensc_modify(confirm_pin=0x02),
     ("1111", "2222"), h("0024000010 31313131ffffffff 32323232ffffffff")),
]  # fmt: skip


@pytest.mark.parametrize(
    ("why", "structure", "entries", "expected"),
    MODIFICATIONS,
    ids=[case[0] for case in MODIFICATIONS],
)
def test_pin_modification_insertion(
    why: str, structure: PinModify, entries: tuple[str, ...], expected: bytes
) -> None:
    assert keyed_apdu(structure, *entries) == expected


def test_stages_and_messages() -> None:
    verify = pin_request(build_secure_data(opensc_verify(display=True)))
    assert verify.stages == (Stage.CURRENT,)
    assert verify.messages == ("Enter PIN",)
    assert pin_request(build_secure_data(opensc_verify())).messages == (None,)
    one = pin_request(build_secure_data(opensc_verify(number_message=1, msg_index=2)))
    assert one.messages == ("Confirm new PIN",)
    modify = pin_request(build_secure_data(opensc_modify(display=True)))
    assert modify.stages == (Stage.CURRENT, Stage.NEW, Stage.CONFIRM)
    assert modify.messages == ("Enter PIN", "Enter new PIN", "Confirm new PIN")
    implicit = pin_request(build_secure_data(opensc_modify(display=True, implicit=True)))
    assert implicit.stages == (Stage.NEW, Stage.CONFIRM)
    assert implicit.messages == ("Enter new PIN", "Confirm new PIN")
    default = pin_request(
        build_secure_data(opensc_modify(number_message=0xFF, msg_indexes=(0, 0, 0)))
    )
    assert default.messages == ("Enter PIN", "Enter new PIN", "Confirm new PIN")


def test_maximum_is_what_the_template_holds() -> None:
    # wPINMaxExtraDigit says 12, the 8-byte ASCII block holds 8
    assert pin_request(build_secure_data(opensc_verify(max_digits=12))).max_digits == 8
    # a 4-bit length field counts to 15
    glp = opensc_verify(h("0020000108 20ffffffffffffff"), format=_GLP, max_digits=20)
    assert pin_request(build_secure_data(glp)).max_digits == 14  # 7 bytes of BCD digits
    assert pin_request(build_secure_data(opensc_verify(max_digits=3, min_digits=1))).max_digits == 3


# --------------------------------------------------------------------------- refusals

REFUSALS: list[tuple[str, bytes, int]] = [
    ("cut short", build_secure_data(opensc_verify())[:10], SlotError.BAD_LENGTH),
    ("empty abData", b"", SlotError.BAD_LENGTH),
    ("bPINOperation 04h (cancel)", b"\x04", 10),
    ("bPINOperation 02h (transfer)", b"\x02" + bytes(20), 10),
    ("PIN type 11b", build_secure_data(opensc_verify(format=PinFormat(pin_type=3))), 12),
    ("bmPINLengthFormat RFU bits",
     build_secure_data(opensc_verify(format=PinFormat(block_size=8, length_rfu=1))), 14),
    ("maximum 0", build_secure_data(opensc_verify(min_digits=0, max_digits=0)), 15),
    ("minimum above maximum", build_secure_data(opensc_verify(min_digits=9, max_digits=8)), 15),
    ("bEntryValidationCondition 0", build_secure_data(opensc_verify(entry_validation=0)), 17),
    ("bEntryValidationCondition 08h", build_secure_data(opensc_verify(entry_validation=8)), 17),
    ("bNumberMessage 05h", build_secure_data(opensc_verify(number_message=5)), 18),
    ("not an APDU", build_secure_data(opensc_verify(h("0020"))), 25),
    ("Lc disagrees", build_secure_data(opensc_verify(h("0020000009") + FF8)), 25),
    ("fixed block beyond the data",
     build_secure_data(opensc_verify(h("0020000004 ffffffff"))), 13),
    ("PIN position past its block",
     build_secure_data(opensc_verify(format=PinFormat(position=8, block_size=8))), 12),
    ("length field after the PIN",
     build_secure_data(opensc_verify(format=PinFormat(block_size=8, length_size=8,
                                                      length_position=1,
                                                      length_units_bytes=True)))
     , 14),
    ("right-justified variable block",
     build_secure_data(opensc_verify(h("00200000"), format=PinFormat(right_justify=True))), 12),
    ("the block cannot hold the minimum",
     build_secure_data(opensc_verify(h("0020000002 ffff"), format=PinFormat(block_size=2))), 15),
    ("modify: bConfirmPIN 04h", build_secure_data(opensc_modify(confirm_pin=0x04)), 19),
    ("modify: bEntryValidationCondition FFh",
     build_secure_data(opensc_modify(entry_validation=0xFF)), 20),
    ("modify: bNumberMessage 04h",
     build_secure_data(opensc_modify(number_message=4, msg_indexes=(0, 0, 0))), 21),
    ("modify: overlapping blocks", build_secure_data(opensc_modify(insertion_offset_new=4)), 16),
    ("modify: the new block past the data",
     build_secure_data(opensc_modify(insertion_offset_new=16)), 16),
    ("modify: the current block past the data",
     build_secure_data(opensc_modify(insertion_offset_old=16, insertion_offset_new=0)), 15),
    ("modify: not an APDU (at 24 + 1 index + 3)", build_secure_data(opensc_modify(h("00"))),
     28),
]  # fmt: skip


@pytest.mark.parametrize(("why", "data", "error"), REFUSALS, ids=[r[0] for r in REFUSALS])
def test_refusals_name_the_field(why: str, data: bytes, error: int) -> None:
    with pytest.raises(CcidError) as info:
        pin_request(data)
    assert info.value.error == error


def test_chained_secure_is_refused() -> None:
    with pytest.raises(CcidError) as info:
        pin_request(build_secure_data(opensc_verify()), level_parameter=1)
    assert info.value.error == 8  # wLevelParameter


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=80), st.booleans(), st.integers(0, 3))
def test_garbage_structures_raise_only_ccid_errors(data: bytes, gemalto: bool, op: int) -> None:
    try:
        request = pin_request(bytes([op]) + data, gemalto=gemalto)
    except CcidError as exc:
        error: int | None = exc.error
    else:
        error = None
    if error is not None:
        assert 0 <= error <= 0xFF
        return
    # Anything accepted builds an APDU for any entries within the limits.
    digits = "9" * request.max_digits
    apdu = request.apdu({stage: digits for stage in request.stages})
    assert len(apdu) >= 4


# --------------------------------------------------------------------------- keypad table


def test_entry_table_is_complete_and_only_entering_reacts() -> None:
    assert set(TRANSITIONS) == {(s, k) for s in EntryState for k in Key}
    for (state, key), step in TRANSITIONS.items():
        if state is EntryState.ENTERING:
            assert step is not Step.IGNORE, key
        else:
            assert step is Step.IGNORE, (state, key)


# --------------------------------------------------------------------------- the reader


@dataclass
class Pad:
    """A reader with a PIN pad, its card powered, and a clock."""

    reader: CcidReader
    card: Card
    now: float = 0.0
    seq: int = 10
    sent: list[int] = field(default_factory=list)

    def secure(self, structure: PinVerify | PinModify, slot: int = 0) -> int:
        self.seq += 1
        send(self.reader, Secure(slot, self.seq, build_secure_data(structure)))
        drive(self.reader, self.now)
        return self.seq

    def tick(self, seconds: float) -> None:
        """Let time pass in 0.5 s steps, firing the reader's timers as a driver would."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + 0.5)
            timer = self.reader.get_timer()
            if timer is not None and timer <= self.now:
                self.reader.handle_timer(self.now)
            drive(self.reader, self.now)

    def enter(self, *entries: str, cancel: bool = False) -> None:
        pad = self.reader.pinpad
        assert pad is not None
        report = pad.enter(0, list(entries), self.now, cancel=cancel)
        assert report.waiting
        drive(self.reader, self.now)

    def replies(self) -> list[Reply]:
        return drain(self.reader)

    def final(self) -> DataBlock:
        """The one non-time-extension reply queued (time extensions before it dropped)."""
        replies = [r for r in self.replies() if r.command_status != CommandStatus.TIME_EXTENSION]
        assert len(replies) == 1, replies
        return block(replies[0])

    @property
    def prompt(self) -> PinPrompt | None:
        assert self.reader.pinpad is not None
        return self.reader.pinpad.prompt(0)


def make_pad(
    card: Card | None = None, config: PinPadConfig | None = None, **identity: object
) -> Pad:
    card = card if card is not None else EchoCard()
    reader = CcidReader(
        [card],
        config=ReaderConfig(pinpad=config or PinPadConfig()),
        identity=make_identity(**identity),  # type: ignore[arg-type]
    )
    assert block(exchange(reader, IccPowerOn(0, 1))).command_status == CommandStatus.OK
    return Pad(reader, card)


@pytest.fixture
def pad() -> Pad:
    return make_pad()


def echo_verify(**kw: Any) -> PinVerify:
    """A verify whose template the EchoCard echoes back (CLA 80, INS 10)."""
    return opensc_verify(h("8010000008") + FF8, **kw)


def test_secure_without_pin_pad_is_not_supported() -> None:
    reader = CcidReader([EchoCard()])
    exchange(reader, IccPowerOn(0, 1))
    reply = exchange(reader, Secure(0, 2, build_secure_data(opensc_verify())))
    assert (reply.command_status, reply.error) == (CommandStatus.FAILED, 0x00)


def test_secure_to_an_unpowered_card_is_mute() -> None:
    reader = CcidReader([EchoCard()], config=ReaderConfig(pinpad=PinPadConfig()))
    reply = exchange(reader, Secure(0, 2, build_secure_data(opensc_verify())))
    assert (reply.command_status, reply.error) == (CommandStatus.FAILED, SlotError.ICC_MUTE)
    assert isinstance(reply, DataBlock)


def test_verify_waits_for_the_keypad_with_time_extensions(pad: Pad) -> None:
    seq = pad.secure(echo_verify())
    assert read(pad.reader) is None  # no answer yet: the pad waits
    prompt = pad.prompt
    assert prompt is not None
    assert (prompt.operation, prompt.stage, prompt.typed) == ("verify", Stage.CURRENT, 0)
    assert (prompt.min_digits, prompt.max_digits) == (4, 8)
    assert prompt.deadline == 30.0  # bTimeOut 30 s from when the driver saw it
    assert prompt.display == ("", "")  # bNumberMessage 0: nothing shown
    # the slot is busy meanwhile
    busy = exchange(pad.reader, GetSlotStatus(0, 99), pad.now)
    assert (busy.command_status, busy.error) == (CommandStatus.FAILED, SlotError.CMD_SLOT_BUSY)
    for _ in range(3):  # one per second, read by the host as it comes (at most one waits)
        pad.tick(1.0)
        extensions = pad.replies()
        assert [(e.command_status, e.seq) for e in extensions] == [
            (CommandStatus.TIME_EXTENSION, seq)
        ]
    pad.enter("2468")
    reply = pad.final()
    assert reply.seq == seq
    assert reply.command_status == CommandStatus.OK
    assert reply.data == b"2468\xff\xff\xff\xff\x90\x00"  # the echo of the keyed APDU
    assert pad.prompt is None
    assert pad.reader.get_timer() is None


def test_display_shows_the_message_and_stars() -> None:
    pad = make_pad()
    pad.secure(echo_verify(number_message=0xFF))
    assert pad.reader.pinpad is not None
    pad.reader.pinpad.enter(0, [], pad.now)  # nothing typed, nothing pressed
    assert pad.prompt is not None
    assert pad.prompt.display == ("Enter PIN", "")
    no_lcd = make_pad(config=PinPadConfig(lcd_lines=0, lcd_columns=0))
    no_lcd.secure(echo_verify())
    assert no_lcd.prompt is not None
    assert no_lcd.prompt.display is None


def test_cancel_answers_pin_cancelled(pad: Pad) -> None:
    seq = pad.secure(echo_verify())
    pad.enter("12", cancel=True)
    reply = pad.final()
    assert (reply.seq, reply.command_status, reply.error) == (
        seq,
        CommandStatus.FAILED,
        SlotError.PIN_CANCELLED,
    )
    assert isinstance(pad.card, EchoCard)
    assert len(pad.card.commands) == 0  # the card never saw it
    assert exchange(pad.reader, GetSlotStatus(0, 50)).command_status == CommandStatus.OK


def test_timeout_from_btimeout_then_the_default() -> None:
    pad = make_pad(config=PinPadConfig(default_timeout=5.0))
    seq = pad.secure(echo_verify(timeout=3))
    pad.tick(2.5)
    assert pad.prompt is not None
    pad.tick(1.0)
    assert pad.prompt is None
    reply = pad.final()
    assert (reply.seq, reply.error) == (seq, SlotError.PIN_TIMEOUT)
    pad.secure(echo_verify(timeout=0))  # bTimeOut 00h: the reader's default (5 s)
    pad.tick(4.5)
    assert pad.prompt is not None
    pad.tick(1.0)
    assert pad.final().error == SlotError.PIN_TIMEOUT


def test_validation_on_timeout_takes_the_digits(pad: Pad) -> None:
    # bEntryValidationCondition 04h only: OK is no validation, the timeout is
    pad.secure(echo_verify(timeout=2, entry_validation=0x04))
    assert pad.reader.pinpad is not None
    report = pad.reader.pinpad.enter(0, ["9753"], pad.now)
    assert (report.accepted, report.ignored, report.state) == (4, 1, EntryState.ENTERING)
    pad.tick(2.5)
    assert pad.final().data == b"9753\xff\xff\xff\xff\x90\x00"
    # nothing typed when the time is up: a timeout all the same
    pad.secure(echo_verify(timeout=2, entry_validation=0x04))
    pad.tick(2.5)
    assert pad.final().error == SlotError.PIN_TIMEOUT


def test_max_size_validates_by_itself(pad: Pad) -> None:
    pad.secure(echo_verify(entry_validation=0x01, max_digits=6))
    assert pad.reader.pinpad is not None
    report = pad.reader.pinpad.enter(0, ["1234567"], pad.now)
    assert (report.accepted, report.ignored) == (6, 1)  # the seventh key is ignored
    drive(pad.reader, pad.now)
    assert pad.final().data == b"123456\xff\xff\x90\x00"


def test_too_short_and_too_long_entries(pad: Pad) -> None:
    seq = pad.secure(echo_verify())
    pad.enter("123")  # below the minimum of 4: the reader refuses, the card is not asked
    reply = pad.final()
    assert (reply.seq, reply.command_status, reply.data) == (seq, CommandStatus.OK, h("6403"))
    pad.secure(echo_verify())
    assert pad.reader.pinpad is not None
    report = pad.reader.pinpad.enter(0, ["1234567890"], pad.now)
    assert (report.accepted, report.ignored) == (8, 2)  # a real keypad stops at the maximum
    drive(pad.reader, pad.now)
    assert pad.final().data == b"12345678\x90\x00"


def test_modify_asks_three_entries_and_checks_the_confirmation(pad: Pad) -> None:
    structure = opensc_modify(h("8010000010") + FF8 + FF8, display=True)
    pad.secure(structure)
    assert pad.prompt is not None
    assert (pad.prompt.stage, pad.prompt.stage_number, pad.prompt.stage_count) == (
        Stage.CURRENT,
        1,
        3,
    )
    assert pad.prompt.display == ("Enter PIN", "")
    pad.enter("1234")
    assert pad.prompt is not None
    assert (pad.prompt.stage, pad.prompt.display) == (Stage.NEW, ("Enter new PIN", ""))
    pad.enter("567890")
    assert pad.prompt is not None
    assert pad.prompt.stage is Stage.CONFIRM
    pad.enter("567890")
    assert pad.final().data == b"1234\xff\xff\xff\xff567890\xff\xff\x90\x00"
    # all three in one call, the confirmation differing: 64 02, the card not asked
    assert isinstance(pad.card, EchoCard)
    before = len(pad.card.commands)
    pad.secure(structure)
    pad.enter("1234", "567890", "567899")
    assert pad.final().data == h("6402")
    assert len(pad.card.commands) == before


def test_each_entry_gets_its_own_timeout(pad: Pad) -> None:
    pad.secure(opensc_modify(h("8010000010") + FF8 + FF8, timeout=4))
    pad.tick(3.0)
    pad.enter("1234")  # the new PIN's stage starts now: 4 more seconds
    pad.tick(3.0)
    assert pad.prompt is not None
    assert pad.prompt.stage is Stage.NEW
    pad.tick(1.5)
    assert pad.final().error == SlotError.PIN_TIMEOUT


def test_policy_types_by_itself(pad: Pad) -> None:
    class Always:
        def __init__(self) -> None:
            self.prompts: list[PinPrompt] = []

        def digits(self, prompt: PinPrompt) -> str | None:
            self.prompts.append(prompt)
            return {Stage.CURRENT: "1111"}.get(prompt.stage, "2222")

    policy = Always()
    assert pad.reader.pinpad is not None
    pad.reader.pinpad.policy = policy
    pad.secure(echo_verify())
    assert pad.final().data == b"1111\xff\xff\xff\xff\x90\x00"
    pad.secure(opensc_modify(h("8010000010") + FF8 + FF8))
    assert pad.final().data == b"1111\xff\xff\xff\xff2222\xff\xff\xff\xff\x90\x00"
    assert [p.stage for p in policy.prompts] == [
        Stage.CURRENT,
        Stage.CURRENT,
        Stage.NEW,
        Stage.CONFIRM,
    ]

    class Nobody:
        def digits(self, prompt: PinPrompt) -> str | None:
            return None

    pad.reader.pinpad.policy = Nobody()
    pad.secure(echo_verify())
    assert pad.prompt is not None  # waits for a human


def test_removal_abort_and_reset_end_the_wait(pad: Pad) -> None:
    seq = pad.secure(echo_verify())
    pad.tick(1.0)
    pad.reader.remove(0)
    replies = [r for r in pad.replies() if r.command_status != CommandStatus.TIME_EXTENSION]
    assert [(r.seq, r.error) for r in replies] == [(seq, SlotError.ICC_MUTE)]
    assert pad.prompt is None
    assert pad.reader.get_timer() is None

    pad = make_pad()
    seq = pad.secure(echo_verify())
    # CCID §5.3.1: the ABORT class request, then PC_to_RDR_Abort with the same bSeq
    pad.reader.control(SetupPacket(0x21, 0x01, 0x07 << 8 | 0, 0, 0), b"")
    send(pad.reader, Abort(0, 7))
    replies = pad.replies()
    assert [(type(r), r.seq, r.error) for r in replies] == [
        (DataBlock, seq, SlotError.CMD_ABORTED),
        (SlotStatus, 7, 0),
    ]
    assert pad.prompt is None

    pad = make_pad()
    pad.secure(echo_verify())
    pad.reader.reset()
    assert pad.prompt is None
    assert pad.reader.get_timer() is None


def test_other_slots_are_not_busy() -> None:
    cards = [EchoCard(), EchoCard()]
    reader = CcidReader(cards, config=ReaderConfig(pinpad=PinPadConfig()))
    exchange(reader, IccPowerOn(0, 1))
    exchange(reader, IccPowerOn(1, 2))
    send(reader, Secure(0, 3, build_secure_data(echo_verify())))
    drive(reader)
    echo = exchange(reader, XfrBlock(1, 4, h("8010000001aa")))
    assert block(echo).data == h("aa9000")
    assert reader.pinpad is not None
    assert reader.pinpad.enter(1, ["1234"], 0.0).waiting is False
    assert reader.pinpad.enter(0, ["1234"], 0.0).state is EntryState.ENTERED


def test_malformed_structure_answers_the_offset(pad: Pad) -> None:
    send(pad.reader, Secure(0, 5, build_secure_data(opensc_verify(entry_validation=9))))
    reply = read_reply(pad.reader)
    assert isinstance(reply, DataBlock)
    assert (reply.seq, reply.command_status, reply.error) == (5, CommandStatus.FAILED, 17)
    assert pad.prompt is None
    assert exchange(pad.reader, IccPowerOff(0, 6)).command_status == CommandStatus.OK


def test_keypad_rejects_anything_but_digits(pad: Pad) -> None:
    pad.secure(echo_verify())
    assert pad.reader.pinpad is not None
    with pytest.raises(ValueError, match="digits"):
        pad.reader.pinpad.enter(0, ["12a4"], pad.now)
    assert pad.prompt is not None
    assert pad.prompt.typed == 0


def test_keyed_apdu_is_marked_for_the_trace(pad: Pad) -> None:
    @dataclass
    class Marking(EchoCard):
        keyed: list[bytes] = field(default_factory=list)

        def transmit_keyed(self, command: bytes) -> bytes:
            self.keyed.append(command)
            return self.transmit(command)

    card = Marking()
    pad = make_pad(card)
    pad.secure(echo_verify())
    pad.enter("8642")
    assert card.keyed == [h("8010000008") + b"8642" + b"\xff" * 4]
    pad.final()
    exchange(pad.reader, XfrBlock(0, 60, h("8010000001aa")))
    assert len(card.keyed) == 1  # an ordinary XfrBlock is not keyed


# --------------------------------------------------------------------------- the PIN limit


def _cac() -> tuple[CacCard, MemoryPinStateStore]:
    store = MemoryPinStateStore()
    return CacCard(make_profile([1024], max_tries=3), store), store


def test_keyed_pins_count_against_the_limit_like_verify() -> None:
    card, store = _cac()
    pad = make_pad(card)
    assert block(exchange(pad.reader, XfrBlock(0, 2, h("00200000")))).data == h("63c3")
    for expected in ("63c2", "63c1"):
        pad.secure(opensc_verify())
        pad.enter("11112222")
        assert pad.final().data == h(expected)
    pad.secure(opensc_verify())
    pad.enter(PIN.decode())
    assert pad.final().data == h("9000")
    saved = store.load()
    assert saved is not None
    assert saved.tries_left == 3
    for expected in ("63c2", "63c1", "63c0", "6983"):
        pad.secure(opensc_verify())
        pad.enter("99999999")
        assert pad.final().data == h(expected)
    pad.secure(opensc_verify())
    pad.enter(PIN.decode())
    assert pad.final().data == h("6983")  # locked: the right PIN no longer works


def test_change_pin_through_the_pad() -> None:
    card, store = _cac()
    pad = make_pad(card)
    pad.secure(opensc_modify())
    pad.enter(PIN.decode(), "24681357", "24681357")
    assert pad.final().data == h("9000")
    saved = store.load()
    assert saved is not None
    assert saved.pin == b"24681357"
    pad.secure(opensc_verify())
    pad.enter("24681357")
    assert pad.final().data == h("9000")
    pad.secure(opensc_modify())
    pad.enter("00000000", "11111111", "11111111")  # a wrong current PIN counts too
    assert pad.final().data == h("63c2")


def test_slot_table_with_and_without_a_pin_pad() -> None:
    from usbccid.ccid.slot import Action, SlotInput, SlotState, rule

    for state in SlotState:
        plain = rule(state, SlotInput.SECURE)
        assert (plain.action, plain.error) == (Action.FAIL, SlotError.CMD_NOT_SUPPORTED)
        with_pad = rule(state, SlotInput.SECURE, pinpad=True)
        if state is SlotState.ACTIVE:
            assert (with_pad.action, with_pad.next_state) == (Action.PIN_ENTRY, state)
        else:
            assert (with_pad.action, with_pad.error) == (Action.FAIL, SlotError.ICC_MUTE)
        busy = rule(state, SlotInput.SECURE, busy=True, pinpad=True)
        assert busy.error == SlotError.CMD_SLOT_BUSY
        for other in SlotInput:  # nothing else changes
            if other is not SlotInput.SECURE:
                assert rule(state, other, pinpad=True) == rule(state, other)
