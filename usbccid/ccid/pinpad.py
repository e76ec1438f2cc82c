"""The reader's PIN pad: PC_to_RDR_Secure (CCID Rev 1.1 §6.1.11), sans-IO.

A reader built with a :class:`PinPadConfig` says so in its class descriptor (bPINSupport
03h: verification and modification; wLcdLayout: a small display), so that libccid 1.5.2
offers FEATURE_VERIFY_PIN_DIRECT and FEATURE_MODIFY_PIN_DIRECT (ifdhandler.c IFDHControl,
CM_IOCTL_GET_FEATURE_REQUEST) and OpenSC marks the reader "PIN pad" (reader-pcsc.c
detect_reader_features) and the token CKF_PROTECTED_AUTHENTICATION_PATH.

What happens to a Secure message:

1. :func:`pin_request` checks the PIN data structure (:mod:`usbccid.ccid.wire`
   declares it) and the APDU template; a field that cannot be served fails the command
   with bError = that field's offset in the message (§6.2.6: "bError ... index of the
   first bad parameter"), e.g. 0Ch for an RFU PIN type in bmFormatString.
2. The slot waits for the keypad (:class:`PinPad`): it is busy (CMD_SLOT_BUSY to other
   commands) and the reader sends time extensions meanwhile. Keys come from the local API
   (``usbccid ctl pinpad``, the pytest fixture) or from a :class:`KeypadPolicy` that
   types by itself (unattended CI). A modification asks up to three entries: the current
   PIN (bConfirmPIN bit 1), the new PIN, and the new PIN again (bit 0).
3. The entry ends (:class:`EntryState`, a table that tests enumerate):

   * entered: the digits go into the template as bmFormatString / bmPINBlockString /
     bmPINLengthFormat say (:meth:`PinRequest.apdu`), the APDU goes to the card as a
     *keyed* transmit (:func:`usbccid.card.transmit_keyed`: tracing wrappers redact all of
     its data), and the card's response is the answer (RDR_to_PC_DataBlock);
   * refused by the reader: an entry shorter than the minimum answers ``64 03``, a new PIN
     confirmed differently answers ``64 02`` (PC/SC v2 part 10 §2.5.x reader status words,
     which OpenSC's reader-pcsc.c pcsc_pin_cmd maps to SC_ERROR_INVALID_PIN_LENGTH and
     SC_ERROR_KEYPAD_PIN_MISMATCH); the card is not asked;
   * cancelled: bError PIN_CANCELLED (EFh), timed out: PIN_TIMEOUT (F0h); libccid
     CCID_Receive turns them into ``64 01`` / ``64 00`` for the application.

The digits are never logged and never put into an exception or a repr.

Insertion rules (CCID Rev 1.1 §6.1.11, with what libccid and OpenSC send):

* Positions are relative to the first data byte after Lc; a modification's PIN blocks
  start at bInsertionOffsetOld / bInsertionOffsetNew (bytes), and the PIN position
  (bmFormatString bits 6..3) and the PIN length position (bmPINLengthFormat) are relative
  to the block's start (for OpenSC's GLP format: length nibble at bit 4, digits from bit
  8, in each block). Bit positions count from the most significant bit of a byte.
* A fixed PIN block (bmPINBlockString bits 3..0 > 0) lies inside the template's data; the
  digits overwrite it left- or right-justified and the rest keeps the template's bytes
  (OpenSC's CAC template is the block filled with FFh). A variable block (size 0) is as
  long as the PIN: the data grows as needed and Lc with it (also for a template without
  Lc); in a modification the new PIN then follows the current one.
* Digits beyond the maximum (wPINMaxExtraDigit low byte, lowered to what the block and
  the length field can hold) are ignored by the keypad, as on a real one.
"""

from __future__ import annotations

import enum
import hmac
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from usbccid.ccid.errors import CcidError
from usbccid.ccid.wire import (
    PinFormat,
    PinModify,
    PinOperation,
    PinType,
    PinVerify,
    parse_secure_data,
)

# Offsets in the Secure message of the fields a request can be refused for (the header is
# 10 bytes, bPINOperation is at 10, the structure starts at 11; CCID Rev 1.1 §6.1.11).
VERIFY_OFFSETS: Final = {
    "bTimeOut": 11,
    "bmFormatString": 12,
    "bmPINBlockString": 13,
    "bmPINLengthFormat": 14,
    "wPINMaxExtraDigit": 15,
    "bEntryValidationCondition": 17,
    "bNumberMessage": 18,
    "wLangId": 19,
    "bMsgIndex": 21,
    "bTeoPrologue": 22,
    "abPINApdu": 25,
}
MODIFY_OFFSETS: Final = {
    "bTimeOut": 11,
    "bmFormatString": 12,
    "bmPINBlockString": 13,
    "bmPINLengthFormat": 14,
    "bInsertionOffsetOld": 15,
    "bInsertionOffsetNew": 16,
    "wPINMaxExtraDigit": 17,
    "bConfirmPIN": 19,
    "bEntryValidationCondition": 20,
    "bNumberMessage": 21,
    "wLangId": 22,
    "bMsgIndex1": 24,
    # then bMsgIndex2, bMsgIndex3 as present, bTeoPrologue (3), abPINApdu
}
OFFSET_LEVEL_PARAMETER: Final = 8  # wLevelParameter: APDU chaining of a Secure

# bEntryValidationCondition bits (§6.1.11)
VALIDATE_MAX_SIZE: Final = 0x01  # the maximum size is reached
VALIDATE_KEY: Final = 0x02  # the validation key is pressed
VALIDATE_TIMEOUT: Final = 0x04  # the timeout occurred

# bConfirmPIN bits (§6.1.11, modification)
CONFIRM_NEW: Final = 0x01  # the new PIN is entered twice
ENTER_CURRENT: Final = 0x02  # the current PIN is entered first

# Reader status words answered without asking the card (PC/SC v2 part 10; OpenSC
# reader-pcsc.c pcsc_pin_cmd; libccid answers 64 00 / 64 01 itself for F0h / EFh).
SW_PIN_MISMATCH: Final = b"\x64\x02"  # the new PIN and its confirmation differ
SW_PIN_LENGTH: Final = b"\x64\x03"  # the entered PIN is not in the length limits

#: The reader's message table (bMsgIndex; bNumberMessage FFh uses 0, 1, 2 by stage),
#: the prompts libccid's examples/scardcontrol.c describes for index 00h..02h.
MESSAGES: Final = {0: "Enter PIN", 1: "Enter new PIN", 2: "Confirm new PIN"}


class Stage(enum.Enum):
    """One entry of a PIN operation."""

    CURRENT = "current PIN"
    NEW = "new PIN"
    CONFIRM = "new PIN again"


_DEFAULT_MESSAGE = {Stage.CURRENT: 0, Stage.NEW: 1, Stage.CONFIRM: 2}


@dataclass(frozen=True, slots=True)
class PinPadConfig:
    """The PIN pad of a reader: what the descriptor says and how long it waits."""

    default_timeout: float = 30.0  # seconds per entry when bTimeOut is 00h
    lcd_lines: int = 2  # wLcdLayout high byte (0 with lcd_columns 0: no display)
    lcd_columns: int = 16  # wLcdLayout low byte
    verify: bool = True  # bPINSupport bit 0
    modify: bool = True  # bPINSupport bit 1

    def __post_init__(self) -> None:
        if not self.default_timeout > 0:
            raise ValueError("the PIN pad's default timeout must be positive")
        if not (0 <= self.lcd_lines <= 0xFF and 0 <= self.lcd_columns <= 0xFF):
            raise ValueError("wLcdLayout holds one byte of lines and one of columns")
        if (self.lcd_lines == 0) != (self.lcd_columns == 0):
            raise ValueError("a display has both lines and columns, or neither")
        if not (self.verify or self.modify):
            raise ValueError("a PIN pad verifies or modifies PINs")

    @property
    def lcd_layout(self) -> int:
        """wLcdLayout (§5.1): XXYYh, XX lines, YY characters per line; 0 no display."""
        return self.lcd_lines << 8 | self.lcd_columns

    @property
    def pin_support(self) -> int:
        """bPINSupport (§5.1): bit 0 verification, bit 1 modification."""
        return int(self.verify) | int(self.modify) << 1


# ------------------------------------------------------------------------------ requests


@dataclass(frozen=True, slots=True)
class _Template:
    """abPINApdu split into its header, data field and Le field (ISO/IEC 7816-4 §5.1)."""

    header: bytes
    data: bytes
    le: bytes
    extended: bool

    @classmethod
    def parse(cls, apdu: bytes) -> _Template | None:
        header, body = apdu[:4], apdu[4:]
        if len(header) < 4:
            return None
        if not body:
            return cls(header, b"", b"", False)  # case 1: the PIN brings Lc
        if len(body) == 1:
            # "CLA INS P1 P2 00": OpenSC's template for a PIN of variable length (an
            # empty data field); anything else is a bare Le (case 2), kept.
            return cls(header, b"", b"" if body[0] == 0 else body, False)
        if body[0] != 0:
            lc = body[0]
            if len(body) == 1 + lc:
                return cls(header, body[1:], b"", False)
            if len(body) == 2 + lc:
                return cls(header, body[1:-1], body[-1:], False)
            return None
        if len(body) >= 3:
            lc = int.from_bytes(body[1:3], "big")
            if lc and len(body) == 3 + lc:
                return cls(header, body[3:], b"", True)
            if lc and len(body) == 5 + lc:
                return cls(header, body[3:-2], body[-2:], True)
        return None

    @property
    def max_data(self) -> int:
        return 65535 if self.extended else 255

    def build(self, data: bytes) -> bytes:
        assert len(data) <= self.max_data
        if not data:
            return self.header + self.le
        if self.extended:
            return self.header + b"\x00" + len(data).to_bytes(2, "big") + data + self.le
        return self.header + bytes([len(data)]) + data + self.le


def _digit_bits(pin_type: int) -> int:
    return 4 if pin_type == PinType.BCD else 8


def _digit_value(pin_type: int, digit: int) -> int:
    return 0x30 + digit if pin_type == PinType.ASCII else digit


def _write_bits(buf: bytearray, start: int, width: int, value: int) -> None:
    """Write ``value`` in ``width`` bits from bit ``start`` (bit 0 = MSB of byte 0)."""
    for i in range(width):
        position = start + i
        shift = 7 - position % 8
        bit = value >> (width - 1 - i) & 1
        buf[position // 8] = buf[position // 8] & ~(1 << shift) & 0xFF | bit << shift


@dataclass(frozen=True, slots=True)
class PinRequest:
    """A checked PIN verification or modification: what the keypad asks and where the
    digits go. Made by :func:`pin_request`."""

    operation: PinOperation
    stages: tuple[Stage, ...]
    messages: tuple[str | None, ...]  # the display's first line, per stage
    min_digits: int
    max_digits: int  # wPINMaxExtraDigit's maximum, lowered to what the template holds
    entry_validation: int
    timeout: float | None  # bTimeOut; None: the reader's default
    format: PinFormat
    template: _Template
    block_offsets: dict[Stage, int]  # first byte of each inserted PIN's block, in data

    def apdu(self, entries: dict[Stage, str]) -> bytes:
        """The template with the entered PIN(s) inserted (``entries``: digits by stage)."""
        fmt = self.format
        data = bytearray(self.template.data)
        end_of_previous = 0
        for stage in (Stage.CURRENT, Stage.NEW):
            if stage not in self.block_offsets:
                continue
            digits = entries[stage]
            start = self.block_offsets[stage] * 8
            if fmt.block_size == 0:
                start = max(start, end_of_previous)  # variable blocks follow each other
            end_of_previous = self._insert(data, start, digits)
        return self.template.build(bytes(data))

    def _insert(self, data: bytearray, block: int, digits: str) -> int:
        """Put ``digits`` into the block at bit ``block``; returns the bit after the PIN,
        rounded up to a byte."""
        fmt = self.format
        width = _digit_bits(fmt.pin_type)
        pin_bits = width * len(digits)
        pin_start = block + _pin_position(fmt)
        if fmt.block_size and fmt.right_justify:
            pin_start = block + 8 * fmt.block_size - pin_bits
        end = pin_start + pin_bits
        if fmt.length_size:
            length_start = block + _length_position(fmt)
            end = max(end, length_start + fmt.length_size)
        needed = (end + 7) // 8
        if len(data) < needed:
            data.extend(bytes(needed - len(data)))  # only a variable block gets here
        for i, digit in enumerate(digits):
            _write_bits(data, pin_start + i * width, width, _digit_value(fmt.pin_type, int(digit)))
        if fmt.length_size:
            _write_bits(data, block + _length_position(fmt), fmt.length_size, len(digits))
        return (pin_start + pin_bits + 7) // 8 * 8

    def __repr__(self) -> str:
        return f"<PinRequest {self.operation.name} {[s.name for s in self.stages]}>"


def _pin_position(fmt: PinFormat) -> int:
    return fmt.position * (8 if fmt.units_bytes else 1)


def _length_position(fmt: PinFormat) -> int:
    return fmt.length_position * (8 if fmt.length_units_bytes else 1)


def pin_request(data: bytes, level_parameter: int = 0, *, gemalto: bool = False) -> PinRequest:
    """Check the abData of a PC_to_RDR_Secure; ``gemalto``: the reader's vendor ID is
    Gemalto's (08E6h), for which libccid always sends three message indexes in a
    modification (commands.c has_gemalto_modify_pin_bug).

    Raises:
        CcidError: bError = the offset of the first field this reader cannot serve,
            BAD_LENGTH for a structure cut short (never anything else).
    """
    if level_parameter != 0:
        # Extended APDU level (§6.1.11 as §6.1.4): a Secure in several parts. Ours always
        # fits one message (dwMaxCCIDMessageLength 65554); libccid sends 0000h.
        raise CcidError(OFFSET_LEVEL_PARAMETER, "chained PC_to_RDR_Secure")
    structure = parse_secure_data(data, all_message_indexes=gemalto)
    if isinstance(structure, PinVerify):
        return _verify_request(structure)
    return _modify_request(structure)


def _fail(offsets: dict[str, int], name: str, why: str) -> CcidError:
    return CcidError(offsets[name], f"PIN data structure: {name}: {why}")


def _common_checks(s: PinVerify | PinModify, offsets: dict[str, int]) -> None:
    fmt = s.format
    if fmt.pin_type not in tuple(PinType):
        raise _fail(offsets, "bmFormatString", "PIN type 11b is RFU")
    if fmt.length_rfu:
        raise _fail(offsets, "bmPINLengthFormat", "bits 7..5 are RFU")
    if s.max_digits == 0 or s.min_digits > s.max_digits:
        raise _fail(offsets, "wPINMaxExtraDigit", f"{s.min_digits}..{s.max_digits} digits")
    if not 0 < s.entry_validation <= 0x07:
        raise _fail(offsets, "bEntryValidationCondition", f"{s.entry_validation:02X}h")


def _message(index: int) -> str:
    return MESSAGES.get(index, f"message {index:02X}h")


def _verify_request(s: PinVerify) -> PinRequest:
    offsets = VERIFY_OFFSETS
    _common_checks(s, offsets)
    # 00h no message, 01h the message bMsgIndex, FFh the reader's default (§6.1.11)
    if s.number_message == 0x00:
        messages: tuple[str | None, ...] = (None,)
    elif s.number_message == 0x01:
        messages = (_message(s.msg_index),)
    elif s.number_message == 0xFF:
        messages = (MESSAGES[0],)
    else:
        raise _fail(offsets, "bNumberMessage", f"{s.number_message:02X}h")
    template = _Template.parse(s.apdu)
    if template is None:
        raise _fail(offsets, "abPINApdu", "not an APDU")
    stages = (Stage.CURRENT,)
    block_offsets = {Stage.CURRENT: 0}
    max_digits = _check_layout(s, offsets, template, block_offsets, "bmFormatString")
    return PinRequest(
        operation=PinOperation.VERIFY,
        stages=stages,
        messages=messages,
        min_digits=s.min_digits,
        max_digits=max_digits,
        entry_validation=s.entry_validation,
        timeout=float(s.timeout) if s.timeout else None,
        format=s.format,
        template=template,
        block_offsets=block_offsets,
    )


def _modify_request(s: PinModify) -> PinRequest:
    offsets = dict(MODIFY_OFFSETS)
    offsets["abPINApdu"] = offsets["bMsgIndex1"] + len(s.msg_indexes) + 3
    _common_checks(s, offsets)
    if s.confirm_pin & ~(CONFIRM_NEW | ENTER_CURRENT):
        raise _fail(offsets, "bConfirmPIN", f"{s.confirm_pin:02X}h")
    if s.number_message not in (0x00, 0x01, 0x02, 0x03, 0xFF):
        raise _fail(offsets, "bNumberMessage", f"{s.number_message:02X}h")
    stages = tuple(
        stage
        for stage, wanted in (
            (Stage.CURRENT, s.confirm_pin & ENTER_CURRENT),
            (Stage.NEW, True),
            (Stage.CONFIRM, s.confirm_pin & CONFIRM_NEW),
        )
        if wanted
    )
    messages: tuple[str | None, ...]
    if s.number_message == 0xFF:
        messages = tuple(MESSAGES[_DEFAULT_MESSAGE[stage]] for stage in stages)
    else:
        shown = min(s.number_message, len(s.msg_indexes))
        messages = tuple(
            _message(s.msg_indexes[i]) if i < shown else None for i in range(len(stages))
        )
    template = _Template.parse(s.apdu)
    if template is None:
        raise _fail(offsets, "abPINApdu", "not an APDU")
    block_offsets = {Stage.NEW: s.insertion_offset_new}
    if Stage.CURRENT in stages:
        block_offsets[Stage.CURRENT] = s.insertion_offset_old
    max_digits = _check_layout(s, offsets, template, block_offsets, "bmFormatString")
    if s.format.block_size and Stage.CURRENT in stages:
        old, new = s.insertion_offset_old, s.insertion_offset_new
        if abs(old - new) < s.format.block_size:
            raise _fail(offsets, "bInsertionOffsetNew", "the two PIN blocks overlap")
    return PinRequest(
        operation=PinOperation.MODIFY,
        stages=stages,
        messages=messages,
        min_digits=s.min_digits,
        max_digits=max_digits,
        entry_validation=s.entry_validation,
        timeout=float(s.timeout) if s.timeout else None,
        format=s.format,
        template=template,
        block_offsets=block_offsets,
    )


def _check_layout(
    s: PinVerify | PinModify,
    offsets: dict[str, int],
    template: _Template,
    block_offsets: dict[Stage, int],
    position_field: str,
) -> int:
    """Check that each PIN block fits the template; return the maximum PIN size it holds."""
    fmt = s.format
    width = _digit_bits(fmt.pin_type)
    pin_position = _pin_position(fmt)
    data_bits = 8 * len(template.data)
    if fmt.length_size and _length_position(fmt) + fmt.length_size > pin_position:
        raise _fail(offsets, "bmPINLengthFormat", "the PIN length field is not before the PIN")
    capacity = 0xFF
    for stage, offset in block_offsets.items():
        offset_field = {
            Stage.CURRENT: "bInsertionOffsetOld",
            Stage.NEW: "bInsertionOffsetNew",
        }[stage]
        where = offset_field if offset_field in offsets else position_field
        block = 8 * offset
        if fmt.block_size:
            if block >= data_bits:
                raise _fail(offsets, where, "the PIN block starts after the APDU's data")
            if block + 8 * fmt.block_size > data_bits:
                raise _fail(offsets, "bmPINBlockString", "the PIN block ends after the data")
            room = 8 * fmt.block_size - pin_position
            if room < width:
                raise _fail(offsets, position_field, "the PIN starts after its block")
            capacity = min(capacity, room // width)
        else:
            if fmt.right_justify:
                raise _fail(offsets, position_field, "right justified in a variable block")
            if block > data_bits:
                raise _fail(offsets, where, "the PIN block starts after the APDU's data")
            # The data grows with the PIN; every PIN of the request must fit.
            limit = 8 * template.max_data - block - pin_position
            capacity = min(capacity, limit // (width * len(block_offsets)))
    if fmt.length_size:
        capacity = min(capacity, (1 << fmt.length_size) - 1)
    max_digits = min(s.max_digits, capacity)
    if max_digits < max(s.min_digits, 1):
        raise _fail(offsets, "wPINMaxExtraDigit", f"the template holds {capacity} digits")
    return max_digits


# ------------------------------------------------------------------------------ the keypad


class EntryState(enum.Enum):
    ENTERING = enum.auto()  # a stage waits for keys
    ENTERED = enum.auto()  # every stage validated: the APDU goes to the card
    REFUSED = enum.auto()  # the reader refused the entry: 64 02 / 64 03, no card
    CANCELLED = enum.auto()  # bError PIN_CANCELLED
    TIMED_OUT = enum.auto()  # bError PIN_TIMEOUT


class Key(enum.Enum):
    DIGIT = enum.auto()
    OK = enum.auto()  # the validation key
    CANCEL = enum.auto()
    TIMEOUT = enum.auto()  # not a key: the stage's time ran out


class Step(enum.Enum):
    APPEND = enum.auto()  # take the digit (unless the entry is full); full + bit 0: VALIDATE
    VALIDATE = enum.auto()  # end the stage if bEntryValidationCondition allows this way
    CANCEL = enum.auto()
    EXPIRE = enum.auto()  # bit 2 and digits typed: VALIDATE; else time out
    IGNORE = enum.auto()  # the entry is over


_ENTERING = EntryState.ENTERING
#: What each key does to an entry, by state; the guards are in :meth:`_Entry.press`.
TRANSITIONS: dict[tuple[EntryState, Key], Step] = {
    (_ENTERING, Key.DIGIT): Step.APPEND,
    (_ENTERING, Key.OK): Step.VALIDATE,
    (_ENTERING, Key.CANCEL): Step.CANCEL,
    (_ENTERING, Key.TIMEOUT): Step.EXPIRE,
}
for _state in EntryState:
    for _key in Key:
        TRANSITIONS.setdefault((_state, _key), Step.IGNORE)


@dataclass(frozen=True, slots=True)
class PinPrompt:
    """What a waiting PIN pad shows: for ``usbccid ctl status``, the fixture, policies."""

    slot: int
    operation: str  # "verify" or "modify"
    stage: Stage
    stage_number: int  # 1-based
    stage_count: int
    typed: int  # digits typed so far in this stage
    min_digits: int
    max_digits: int
    display: tuple[str, str] | None  # the LCD's two lines, None without a display
    deadline: float | None  # None until the driver's clock reached the reader

    def seconds_left(self, now: float) -> float | None:
        return None if self.deadline is None else max(0.0, self.deadline - now)


@dataclass(frozen=True, slots=True)
class KeyReport:
    """What a call of :meth:`PinPad.enter` did."""

    waiting: bool  # a PIN entry was waiting when the keys came
    accepted: int = 0  # digit keys taken
    ignored: int = 0  # keys the pad ignored (a full entry; OK where only size validates)
    state: EntryState | None = None  # the entry's state afterwards
    prompt: PinPrompt | None = None  # what waits now (the next stage), if anything


@dataclass(frozen=True, slots=True)
class PinOutcome:
    """How an entry ended, for the reader to answer the Secure command."""

    seq: int
    state: EntryState
    apdu: bytes = field(default=b"", repr=False)  # ENTERED: the keyed APDU (secret)
    status_word: bytes = b""  # REFUSED: the reader's own 64 0x


class KeypadPolicy(Protocol):
    """Types for an unattended keypad: the digits for ``prompt``, or None to wait for a
    human (``usbccid ctl pinpad``)."""

    def digits(self, prompt: PinPrompt) -> str | None: ...


class _Entry:
    """One Secure command waiting at the keypad (its digits are secret)."""

    def __init__(self, slot: int, seq: int, request: PinRequest, columns: int) -> None:
        self.slot = slot
        self.seq = seq
        self.request = request
        self.display = columns > 0
        self.columns = columns
        self.state = EntryState.ENTERING
        self.stage_index = 0
        self.typed: list[str] = []
        self.entries: dict[Stage, str] = {}
        self.deadline: float | None = None
        self.armed = False  # the first stage has its deadline and policy applied
        self.outcome: PinOutcome | None = None

    def __repr__(self) -> str:
        return f"<PIN entry slot={self.slot} seq={self.seq} {self.state.name}>"

    @property
    def stage(self) -> Stage:
        return self.request.stages[self.stage_index]

    def prompt(self) -> PinPrompt:
        request = self.request
        display = None
        if self.display:
            message = request.messages[self.stage_index] or ""
            display = (message[: self.columns], "*" * min(len(self.typed), self.columns))
        return PinPrompt(
            slot=self.slot,
            operation="verify" if request.operation is PinOperation.VERIFY else "modify",
            stage=self.stage,
            stage_number=self.stage_index + 1,
            stage_count=len(request.stages),
            typed=len(self.typed),
            min_digits=request.min_digits,
            max_digits=request.max_digits,
            display=display,
            deadline=self.deadline,
        )

    def type_entry(self, digits: str, end: Key, now: float, timeout: float) -> tuple[int, int]:
        """Type one entry and end it with ``end`` (OK or Cancel); (accepted, ignored).

        Keys after the stage ended by itself (the maximum size reached, with
        bEntryValidationCondition bit 0) are ignored, and so is then an OK: it belongs to
        the entry just validated, not to the next one. Cancel always applies.
        """
        stage, accepted, ignored = self.stage_index, 0, 0
        for digit in digits:
            if self.state is not EntryState.ENTERING or self.stage_index != stage:
                ignored += 1
            elif self.press(Key.DIGIT, now, timeout, digit):
                accepted += 1
            else:
                ignored += 1
        same_stage = self.state is EntryState.ENTERING and self.stage_index == stage
        if (end is Key.CANCEL or same_stage) and not self.press(end, now, timeout):
            ignored += 1
        return accepted, ignored

    def press(self, key: Key, now: float, timeout: float, digit: str = "") -> bool:
        """Apply one key (or the timeout); returns False when the pad ignored it."""
        step = TRANSITIONS[(self.state, key)]
        condition = self.request.entry_validation
        match step:
            case Step.IGNORE:
                return False
            case Step.APPEND:
                if len(self.typed) >= self.request.max_digits:
                    return False
                self.typed.append(digit)
                if len(self.typed) == self.request.max_digits and condition & VALIDATE_MAX_SIZE:
                    self._validate(now, timeout)
                return True
            case Step.VALIDATE:
                if not condition & VALIDATE_KEY:
                    return False
                self._validate(now, timeout)
                return True
            case Step.CANCEL:
                self._end(EntryState.CANCELLED)
                return True
            case Step.EXPIRE:
                if condition & VALIDATE_TIMEOUT and self.typed:
                    self._validate(now, timeout)
                else:
                    self._end(EntryState.TIMED_OUT)
                return True
        raise AssertionError(step)

    def _validate(self, now: float, timeout: float) -> None:
        digits, self.typed = "".join(self.typed), []
        request = self.request
        if len(digits) < request.min_digits:
            self._end(EntryState.REFUSED, SW_PIN_LENGTH)
            return
        stage = self.stage
        if stage is Stage.CONFIRM:
            if not hmac.compare_digest(digits.encode(), self.entries[Stage.NEW].encode()):
                self._end(EntryState.REFUSED, SW_PIN_MISMATCH)
                return
        else:
            self.entries[stage] = digits
        if self.stage_index + 1 < len(request.stages):
            self.stage_index += 1
            self.deadline = now + (request.timeout or timeout)
            return
        self._end(EntryState.ENTERED)

    def _end(self, state: EntryState, status_word: bytes = b"") -> None:
        self.state = state
        apdu = self.request.apdu(self.entries) if state is EntryState.ENTERED else b""
        self.entries.clear()
        self.typed.clear()
        self.outcome = PinOutcome(self.seq, state, apdu=apdu, status_word=status_word)


class PinPad:
    """The keypad of one reader: at most one waiting entry per slot.

    The reader starts entries (:meth:`start`) and hears how each ended through
    ``on_outcome(slot, outcome)``; keys come through :meth:`enter` (local API) or the
    ``policy``; time comes in through :meth:`arm` (with every ``next_job``) and
    :meth:`expire` (the reader's ``handle_timer``).
    """

    def __init__(
        self,
        config: PinPadConfig,
        on_outcome: Callable[[int, PinOutcome], None],
        policy: KeypadPolicy | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self._on_outcome = on_outcome
        self._entries: dict[int, _Entry] = {}

    def start(self, slot: int, seq: int, request: PinRequest) -> None:
        assert slot not in self._entries, "the slot is busy"
        self._entries[slot] = _Entry(slot, seq, request, self.config.lcd_columns)

    def waiting(self, slot: int) -> bool:
        return slot in self._entries

    def seq(self, slot: int) -> int | None:
        entry = self._entries.get(slot)
        return entry.seq if entry is not None else None

    def prompt(self, slot: int) -> PinPrompt | None:
        entry = self._entries.get(slot)
        return entry.prompt() if entry is not None else None

    def drop(self, slot: int) -> int | None:
        """Forget the slot's entry (card removed, abort, reset); its bSeq, if any."""
        entry = self._entries.pop(slot, None)
        return entry.seq if entry is not None else None

    def clear(self) -> None:
        self._entries.clear()

    def get_timer(self) -> float | None:
        deadlines = [e.deadline for e in self._entries.values() if e.deadline is not None]
        return min(deadlines) if deadlines else None

    def arm(self, now: float) -> list[int]:
        """Give new entries their deadline and let the policy type; returns the slots
        whose entries it armed (the reader starts their time extensions)."""
        armed = []
        for slot, entry in list(self._entries.items()):
            if entry.armed:
                continue
            entry.armed = True
            entry.deadline = now + (entry.request.timeout or self.config.default_timeout)
            armed.append(slot)
            self._apply_policy(entry, now)
            self._settle(entry)
        return armed

    def expire(self, now: float) -> None:
        for entry in list(self._entries.values()):
            if entry.deadline is not None and now >= entry.deadline:
                entry.press(Key.TIMEOUT, now, self.config.default_timeout)
                self._apply_policy(entry, now)
                self._settle(entry)

    def enter(
        self, slot: int, entries: Sequence[str], now: float, *, cancel: bool = False
    ) -> KeyReport:
        """Type each of ``entries`` and press OK after it; with ``cancel``, press Cancel
        instead of the last OK (no entries and ``cancel``: just Cancel).

        Raises:
            ValueError: an entry holds something else than the digits 0-9.
        """
        for digits in entries:
            if digits and not (digits.isascii() and digits.isdigit()):
                raise ValueError("a keypad entry is digits 0-9 only")
        entry = self._entries.get(slot)
        if entry is None:
            return KeyReport(waiting=False)
        accepted = ignored = 0
        timeout = self.config.default_timeout
        if cancel and not entries:
            entries = [""]
        for index, digits in enumerate(entries):
            end = Key.CANCEL if cancel and index == len(entries) - 1 else Key.OK
            taken, skipped = entry.type_entry(digits, end, now, timeout)
            accepted += taken
            ignored += skipped
        self._apply_policy(entry, now)
        state = entry.state
        self._settle(entry)
        waiting = self._entries.get(slot)
        return KeyReport(
            waiting=True,
            accepted=accepted,
            ignored=ignored,
            state=state,
            prompt=waiting.prompt() if waiting is not None else None,
        )

    def _apply_policy(self, entry: _Entry, now: float) -> None:
        """Let the policy type each stage it knows the digits for (each stage once)."""
        asked: set[int] = set()
        while (
            self.policy is not None
            and entry.state is EntryState.ENTERING
            and not entry.typed
            and entry.stage_index not in asked
        ):
            asked.add(entry.stage_index)
            digits = self.policy.digits(entry.prompt())
            if digits is None:
                return
            entry.type_entry(
                "".join(d for d in digits if d.isascii() and d.isdigit()),
                Key.OK,
                now,
                self.config.default_timeout,
            )

    def _settle(self, entry: _Entry) -> None:
        if entry.outcome is None:
            return
        del self._entries[entry.slot]
        self._on_outcome(entry.slot, entry.outcome)
