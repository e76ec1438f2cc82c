"""CCID Rev 1.1 wire formats: bulk messages, interrupt messages, the class descriptor.

Every format is declared once with construct and used both to parse and to build. All
multi-byte fields are little-endian (CCID Rev 1.1 §6: "all multi-byte fields are
little-endian"). construct Containers do not leave this module: parsed messages become the
frozen dataclasses below, and every ConstructError is wrapped once, here, into
:class:`~usbccid.ccid.errors.CcidError` (wrong length, bError 0x01).

Bulk messages (CCID Rev 1.1 §6.1, §6.2) share a 10-byte header::

    0 bMessageType  1..4 dwLength (bytes of abData)  5 bSlot  6 bSeq  7..9 specific

In RDR_to_PC messages bytes 7 and 8 are bStatus (bmICCStatus bits 1..0, bmCommandStatus
bits 7..6) and bError; byte 9 is message-specific.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from construct import (
    BitsInteger,
    BitStruct,
    Bytes,
    Const,
    Construct,
    ConstructError,
    Container,
    Flag,
    GreedyBytes,
    GreedyRange,
    If,
    Int8ul,
    Int16ul,
    Int32ul,
    Padding,
    Rebuild,
    Struct,
    Switch,
    Terminated,
    len_,
    this,
)

from usbccid.ccid.errors import CcidError, CommandStatus, IccStatus, SlotError
from usbccid.compiled import StructLayout, parse_fast

HEADER_SIZE = 10


class PcToRdr(enum.IntEnum):
    """bMessageType of the bulk-OUT messages (CCID Rev 1.1 §6.1)."""

    SET_PARAMETERS = 0x61  # §6.1.7
    ICC_POWER_ON = 0x62  # §6.1.1
    ICC_POWER_OFF = 0x63  # §6.1.2
    GET_SLOT_STATUS = 0x65  # §6.1.3
    SECURE = 0x69  # §6.1.11
    T0_APDU = 0x6A  # §6.1.10
    ESCAPE = 0x6B  # §6.1.8
    GET_PARAMETERS = 0x6C  # §6.1.5
    RESET_PARAMETERS = 0x6D  # §6.1.6
    ICC_CLOCK = 0x6E  # §6.1.9
    XFR_BLOCK = 0x6F  # §6.1.4
    MECHANICAL = 0x71  # §6.1.12
    ABORT = 0x72  # §6.1.13
    SET_DATA_RATE_AND_CLOCK_FREQUENCY = 0x73  # §6.1.14


class RdrToPc(enum.IntEnum):
    """bMessageType of the bulk-IN (§6.2) and interrupt-IN (§6.3) messages."""

    DATA_BLOCK = 0x80  # §6.2.1
    SLOT_STATUS = 0x81  # §6.2.2
    PARAMETERS = 0x82  # §6.2.3
    ESCAPE = 0x83  # §6.2.4
    DATA_RATE_AND_CLOCK_FREQUENCY = 0x84  # §6.2.5
    NOTIFY_SLOT_CHANGE = 0x50  # §6.3.1
    HARDWARE_ERROR = 0x51  # §6.3.2


# Which reply answers which command (CCID Rev 1.1 §6.1, each command's "Response" line).
# Anything else, including an unknown bMessageType, is answered with SlotStatus (§6.2.6:
# "command not supported" is reported in the slot error register of a SlotStatus).
REPLY_TYPE: dict[int, RdrToPc] = {
    PcToRdr.ICC_POWER_ON: RdrToPc.DATA_BLOCK,
    PcToRdr.XFR_BLOCK: RdrToPc.DATA_BLOCK,
    PcToRdr.SECURE: RdrToPc.DATA_BLOCK,
    PcToRdr.GET_PARAMETERS: RdrToPc.PARAMETERS,
    PcToRdr.RESET_PARAMETERS: RdrToPc.PARAMETERS,
    PcToRdr.SET_PARAMETERS: RdrToPc.PARAMETERS,
    PcToRdr.ESCAPE: RdrToPc.ESCAPE,
    PcToRdr.SET_DATA_RATE_AND_CLOCK_FREQUENCY: RdrToPc.DATA_RATE_AND_CLOCK_FREQUENCY,
}


def reply_type(message_type: int) -> RdrToPc:
    return REPLY_TYPE.get(message_type, RdrToPc.SLOT_STATUS)


# --------------------------------------------------------------------------------------
# construct declarations

_RFU3 = Struct(Padding(3))

# Bytes 7..9 of each PC_to_RDR message (CCID Rev 1.1 §6.1.1 .. §6.1.14). RFU bytes are
# ignored on parse and built as zeros.
_PC_TO_RDR_SPECIFIC: dict[int, Construct[Any, Any]] = {
    PcToRdr.ICC_POWER_ON: Struct("bPowerSelect" / Int8ul, Padding(2)),
    PcToRdr.ICC_POWER_OFF: _RFU3,
    PcToRdr.GET_SLOT_STATUS: _RFU3,
    PcToRdr.XFR_BLOCK: Struct("bBWI" / Int8ul, "wLevelParameter" / Int16ul),
    PcToRdr.GET_PARAMETERS: _RFU3,
    PcToRdr.RESET_PARAMETERS: _RFU3,
    PcToRdr.SET_PARAMETERS: Struct("bProtocolNum" / Int8ul, Padding(2)),
    PcToRdr.ESCAPE: _RFU3,
    PcToRdr.ICC_CLOCK: Struct("bClockCommand" / Int8ul, Padding(2)),
    PcToRdr.T0_APDU: Struct(
        "bmChanges" / Int8ul, "bClassGetResponse" / Int8ul, "bClassEnvelope" / Int8ul
    ),
    PcToRdr.SECURE: Struct("bBWI" / Int8ul, "wLevelParameter" / Int16ul),
    PcToRdr.MECHANICAL: Struct("bFunction" / Int8ul, Padding(2)),
    PcToRdr.ABORT: _RFU3,
    PcToRdr.SET_DATA_RATE_AND_CLOCK_FREQUENCY: _RFU3,
}

PC_TO_RDR = Struct(
    "bMessageType" / Int8ul,
    "dwLength" / Rebuild(Int32ul, len_(this.abData)),
    "bSlot" / Int8ul,
    "bSeq" / Int8ul,
    # An unknown bMessageType keeps its three bytes raw: it is still answered (§6.2.6).
    # (plain int keys: construct's compiler writes the keys out as Python literals)
    "specific"
    / Switch(
        this.bMessageType,
        {int(kind): specific for kind, specific in _PC_TO_RDR_SPECIFIC.items()},
        default=Bytes(3),
    ),
    "abData" / Bytes(this.dwLength),
    Terminated,
)

# The header alone, to frame a message before all of it has arrived.
PC_TO_RDR_HEADER = Struct(
    "bMessageType" / Int8ul,
    "dwLength" / Int32ul,
    "bSlot" / Int8ul,
    "bSeq" / Int8ul,
    "specific" / Bytes(3),
)

# bStatus (CCID Rev 1.1 §6.2.6): bits 7..6 bmCommandStatus, 5..2 RFU, 1..0 bmICCStatus.
# BitStruct reads the most significant bit first.
_STATUS = BitStruct(
    "bmCommandStatus" / BitsInteger(2),
    Padding(4),
    "bmICCStatus" / BitsInteger(2),
)

RDR_TO_PC = Struct(
    "bMessageType" / Int8ul,
    "dwLength" / Rebuild(Int32ul, len_(this.abData)),
    "bSlot" / Int8ul,
    "bSeq" / Int8ul,
    "bStatus" / _STATUS,
    "bError" / Int8ul,
    # byte 9: bChainParameter (DataBlock §6.2.1), bClockStatus (SlotStatus §6.2.2),
    # bProtocolNum (Parameters §6.2.3), RFU otherwise (§6.2.4, §6.2.5).
    "bSpecific" / Int8ul,
    "abData" / Bytes(this.dwLength),
    Terminated,
)

# RDR_to_PC_NotifySlotChange (§6.3.1): bmSlotICCState, 2 bits per slot rounded up to bytes.
NOTIFY_SLOT_CHANGE = Struct(
    "bMessageType" / Const(RdrToPc.NOTIFY_SLOT_CHANGE.value, Int8ul),
    "bmSlotICCState" / GreedyBytes,
)

# RDR_to_PC_HardwareError (§6.3.2).
HARDWARE_ERROR = Struct(
    "bMessageType" / Const(RdrToPc.HARDWARE_ERROR.value, Int8ul),
    "bSlot" / Int8ul,
    "bSeq" / Int8ul,
    "bHardwareErrorCode" / Int8ul,
    Terminated,
)

# abProtocolDataStructure for T=0 (§6.1.7, Table 6.1-8): 5 bytes.
T0_PARAMETERS = Struct(
    "bmFindexDindex" / Int8ul,
    "bmTCCKST0" / Int8ul,
    "bGuardTimeT0" / Int8ul,
    "bWaitingIntegerT0" / Int8ul,
    "bClockStop" / Int8ul,
    Terminated,
)

# abProtocolDataStructure for T=1 (§6.1.7, Table 6.1-9): 7 bytes.
T1_PARAMETERS = Struct(
    "bmFindexDindex" / Int8ul,
    "bmTCCKST1" / Int8ul,
    "bGuardTimeT1" / Int8ul,
    "bmWaitingIntegersT1" / Int8ul,
    "bClockStop" / Int8ul,
    "bIFSC" / Int8ul,
    "bNadValue" / Int8ul,
    Terminated,
)

# abData of PC_to_RDR_SetDataRateAndClockFrequency (§6.1.14) and its reply (§6.2.5).
DATA_RATE_AND_CLOCK = Struct(
    "dwClockFrequency" / Int32ul,
    "dwDataRate" / Int32ul,
    Terminated,
)

# Data stage of GET_CLOCK_FREQUENCIES / GET_DATA_RATES (§5.3.2, §5.3.3): an array of
# dwords (kHz, bps).
DWORD_ARRAY = GreedyRange(Int32ul)

# The CCID class descriptor (CCID Rev 1.1 §5.1, Table 5.1-1): 54 bytes, type 0x21.
CLASS_DESCRIPTOR = Struct(
    "bLength" / Const(54, Int8ul),
    "bDescriptorType" / Const(0x21, Int8ul),
    "bcdCCID" / Int16ul,
    "bMaxSlotIndex" / Int8ul,
    "bVoltageSupport" / Int8ul,
    "dwProtocols" / Int32ul,
    "dwDefaultClock" / Int32ul,
    "dwMaximumClock" / Int32ul,
    "bNumClockSupported" / Int8ul,
    "dwDataRate" / Int32ul,
    "dwMaxDataRate" / Int32ul,
    "bNumDataRatesSupported" / Int8ul,
    "dwMaxIFSD" / Int32ul,
    "dwSynchProtocols" / Int32ul,
    "dwMechanical" / Int32ul,
    "dwFeatures" / Int32ul,
    "dwMaxCCIDMessageLength" / Int32ul,
    "bClassGetResponse" / Int8ul,
    "bClassEnvelope" / Int8ul,
    "wLcdLayout" / Int16ul,
    "bPINSupport" / Int8ul,
    "bMaxCCIDBusySlots" / Int8ul,
    Terminated,
)

# The hot path (every APDU is one XfrBlock and one DataBlock) frames and builds these
# headers with precompiled struct.Structs derived from the declarations above
# (usbccid.compiled.StructLayout); the names are checked here, at import, against the
# order the code below uses, and tests check that they agree with the declarations on
# every field.
HEADER_LAYOUT = StructLayout(PC_TO_RDR_HEADER)
REPLY_LAYOUT = StructLayout(RDR_TO_PC, raw=("bStatus",), stop="abData")
XFR_BLOCK_LAYOUT = StructLayout(_PC_TO_RDR_SPECIFIC[PcToRdr.XFR_BLOCK])
# bStatus as one byte: where the two bit fields of _STATUS sit in it, asked of the
# declaration itself.
_COMMAND_STATUS_UNIT = _STATUS.build({"bmCommandStatus": 1, "bmICCStatus": 0})[0]
_ICC_STATUS_UNIT = _STATUS.build({"bmCommandStatus": 0, "bmICCStatus": 1})[0]
if (
    HEADER_LAYOUT.names != ("bMessageType", "dwLength", "bSlot", "bSeq", "specific")
    or REPLY_LAYOUT.names
    != ("bMessageType", "dwLength", "bSlot", "bSeq", "bStatus", "bError", "bSpecific")
    or XFR_BLOCK_LAYOUT.names != ("bBWI", "wLevelParameter")
    or HEADER_LAYOUT.size != HEADER_SIZE
    or REPLY_LAYOUT.size != HEADER_SIZE
    or (_COMMAND_STATUS_UNIT, _ICC_STATUS_UNIT) != (0x40, 0x01)
):  # pragma: no cover - a declaration changed without the code below
    raise ImportError("the CCID header layouts no longer match their declarations")
_unpack_header = HEADER_LAYOUT.unpack_from
_pack_reply_header = REPLY_LAYOUT.pack
unpack_xfr_block = XFR_BLOCK_LAYOUT.unpack
"""``(bBWI, wLevelParameter)`` from the three message-specific bytes of an XfrBlock."""


def unpack_header(data: bytes | bytearray) -> tuple[int, int, int, int, bytes]:
    """``(bMessageType, dwLength, bSlot, bSeq, specific)`` of a PC_to_RDR message; ``data``
    holds at least its 10 bytes. Every 10 bytes are a header: nothing here can fail."""
    return _unpack_header(data)


def build_data_block(
    slot: int,
    seq: int,
    icc_status: int,
    data: bytes,
    chain_parameter: int = 0,
    command_status: int = CommandStatus.OK,
    error: int = 0,
) -> bytes:
    """RDR_to_PC_DataBlock (§6.2.1), the hot path's reply: the same bytes as
    :func:`build_reply` of the :class:`DataBlock` with these fields."""
    return (
        _pack_reply_header(
            RdrToPc.DATA_BLOCK,
            len(data),
            slot,
            seq,
            command_status * _COMMAND_STATUS_UNIT + icc_status * _ICC_STATUS_UNIT,
            error,
            chain_parameter,
        )
        + data
    )


CLASS_DESCRIPTOR_TYPE = 0x21
CLASS_DESCRIPTOR_LENGTH = 54


def _parse(
    struct: Construct[Any, Any], data: bytes, what: str, length: int | None = None
) -> Container[Any]:
    """The one place where construct errors become CCID errors.

    ``length``: the whole message's length by its own dwLength, for the variable-size
    messages, so that the fast compiled form can take it (usbccid.compiled).
    """
    fast = parse_fast(struct, data, length)
    if fast is not None:
        return fast
    try:
        parsed: Container[Any] = struct.parse(data)
    except ConstructError as exc:
        raise CcidError(SlotError.BAD_LENGTH, f"malformed {what}: {exc}") from exc
    return parsed


def _message_length(data: bytes) -> int | None:
    """10 + dwLength (CCID Rev 1.1 §6.1, §6.2: bytes 1..4, little-endian), if present."""
    if len(data) < HEADER_SIZE:
        return None
    return HEADER_SIZE + int.from_bytes(data[1:5], "little")


# --------------------------------------------------------------------------------------
# PC_to_RDR messages (bulk OUT)


@dataclass(frozen=True, slots=True)
class Header:
    """The first 10 bytes of a PC_to_RDR message: enough to frame and to answer it."""

    message_type: int
    length: int
    slot: int
    seq: int


def parse_header(data: bytes) -> Header:
    """The header of a PC_to_RDR message; ``data`` holds at least its 10 bytes."""
    if len(data) < HEADER_SIZE:
        raise CcidError(SlotError.BAD_LENGTH, f"message header: {len(data)} bytes")
    message_type, length, slot, seq, _ = unpack_header(data)
    return Header(message_type, length, slot, seq)


@dataclass(frozen=True, slots=True)
class Command:
    """Base of the parsed PC_to_RDR messages."""

    slot: int
    seq: int


@dataclass(frozen=True, slots=True)
class IccPowerOn(Command):
    power_select: int = 0  # 0 automatic, 1 5 V, 2 3 V, 3 1.8 V


@dataclass(frozen=True, slots=True)
class IccPowerOff(Command):
    pass


@dataclass(frozen=True, slots=True)
class GetSlotStatus(Command):
    pass


@dataclass(frozen=True, slots=True)
class XfrBlock(Command):
    data: bytes = b""
    bwi: int = 0
    level_parameter: int = 0  # APDU level: chaining (§6.1.4, Table 6.1-4)


@dataclass(frozen=True, slots=True)
class GetParameters(Command):
    pass


@dataclass(frozen=True, slots=True)
class ResetParameters(Command):
    pass


@dataclass(frozen=True, slots=True)
class SetParameters(Command):
    protocol_num: int = 0
    data: bytes = b""  # abProtocolDataStructure: 5 bytes for T=0, 7 for T=1


@dataclass(frozen=True, slots=True)
class Escape(Command):
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class IccClock(Command):
    clock_command: int = 0  # 0 restart, 1 stop


@dataclass(frozen=True, slots=True)
class T0Apdu(Command):
    changes: int = 0
    class_get_response: int = 0
    class_envelope: int = 0


@dataclass(frozen=True, slots=True)
class Secure(Command):
    data: bytes = b""
    bwi: int = 0
    level_parameter: int = 0


@dataclass(frozen=True, slots=True)
class Mechanical(Command):
    function: int = 0


@dataclass(frozen=True, slots=True)
class Abort(Command):
    pass


@dataclass(frozen=True, slots=True)
class SetDataRateAndClockFrequency(Command):
    data: bytes = b""  # dwClockFrequency, dwDataRate (8 bytes)


@dataclass(frozen=True, slots=True)
class UnknownCommand(Command):
    message_type: int = 0
    data: bytes = b""


# Messages whose dwLength is 00000000h (CCID Rev 1.1 §6.1): abData there is a length error.
_NO_DATA = frozenset(
    {
        PcToRdr.ICC_POWER_ON,
        PcToRdr.ICC_POWER_OFF,
        PcToRdr.GET_SLOT_STATUS,
        PcToRdr.GET_PARAMETERS,
        PcToRdr.RESET_PARAMETERS,
        PcToRdr.ICC_CLOCK,
        PcToRdr.T0_APDU,
        PcToRdr.MECHANICAL,
        PcToRdr.ABORT,
    }
)


def _command_from(c: Container[Any]) -> Command:
    slot, seq, s, data = int(c.bSlot), int(c.bSeq), c.specific, bytes(c.abData)
    message_type = int(c.bMessageType)
    if message_type in _NO_DATA and data:
        raise CcidError(SlotError.BAD_LENGTH, f"0x{message_type:02X} with dwLength {len(data)}")
    match message_type:
        case PcToRdr.ICC_POWER_ON:
            return IccPowerOn(slot, seq, power_select=s.bPowerSelect)
        case PcToRdr.ICC_POWER_OFF:
            return IccPowerOff(slot, seq)
        case PcToRdr.GET_SLOT_STATUS:
            return GetSlotStatus(slot, seq)
        case PcToRdr.XFR_BLOCK:
            return XfrBlock(slot, seq, data, bwi=s.bBWI, level_parameter=s.wLevelParameter)
        case PcToRdr.GET_PARAMETERS:
            return GetParameters(slot, seq)
        case PcToRdr.RESET_PARAMETERS:
            return ResetParameters(slot, seq)
        case PcToRdr.SET_PARAMETERS:
            return SetParameters(slot, seq, protocol_num=s.bProtocolNum, data=data)
        case PcToRdr.ESCAPE:
            return Escape(slot, seq, data)
        case PcToRdr.ICC_CLOCK:
            return IccClock(slot, seq, clock_command=s.bClockCommand)
        case PcToRdr.T0_APDU:
            return T0Apdu(slot, seq, s.bmChanges, s.bClassGetResponse, s.bClassEnvelope)
        case PcToRdr.SECURE:
            return Secure(slot, seq, data, bwi=s.bBWI, level_parameter=s.wLevelParameter)
        case PcToRdr.MECHANICAL:
            return Mechanical(slot, seq, function=s.bFunction)
        case PcToRdr.ABORT:
            return Abort(slot, seq)
        case PcToRdr.SET_DATA_RATE_AND_CLOCK_FREQUENCY:
            return SetDataRateAndClockFrequency(slot, seq, data)
    return UnknownCommand(slot, seq, message_type=message_type, data=data)


def parse_command(data: bytes) -> Command:
    """One whole PC_to_RDR message (header and exactly dwLength bytes of abData).

    Raises:
        CcidError: BAD_LENGTH when the bytes do not form the message its header announces,
            or a message without abData carries some.
    """
    data = bytes(data)
    return _command_from(_parse(PC_TO_RDR, data, "PC_to_RDR message", _message_length(data)))


def _specific(command: Command) -> tuple[int, dict[str, int] | bytes, bytes]:
    match command:
        case IccPowerOn(power_select=p):
            return PcToRdr.ICC_POWER_ON, {"bPowerSelect": p}, b""
        case IccPowerOff():
            return PcToRdr.ICC_POWER_OFF, {}, b""
        case GetSlotStatus():
            return PcToRdr.GET_SLOT_STATUS, {}, b""
        case XfrBlock(data=d, bwi=b, level_parameter=w):
            return PcToRdr.XFR_BLOCK, {"bBWI": b, "wLevelParameter": w}, d
        case GetParameters():
            return PcToRdr.GET_PARAMETERS, {}, b""
        case ResetParameters():
            return PcToRdr.RESET_PARAMETERS, {}, b""
        case SetParameters(protocol_num=p, data=d):
            return PcToRdr.SET_PARAMETERS, {"bProtocolNum": p}, d
        case Escape(data=d):
            return PcToRdr.ESCAPE, {}, d
        case IccClock(clock_command=k):
            return PcToRdr.ICC_CLOCK, {"bClockCommand": k}, b""
        case T0Apdu(changes=m, class_get_response=g, class_envelope=e):
            specific = {"bmChanges": m, "bClassGetResponse": g, "bClassEnvelope": e}
            return PcToRdr.T0_APDU, specific, b""
        case Secure(data=d, bwi=b, level_parameter=w):
            return PcToRdr.SECURE, {"bBWI": b, "wLevelParameter": w}, d
        case Mechanical(function=f):
            return PcToRdr.MECHANICAL, {"bFunction": f}, b""
        case Abort():
            return PcToRdr.ABORT, {}, b""
        case SetDataRateAndClockFrequency(data=d):
            return PcToRdr.SET_DATA_RATE_AND_CLOCK_FREQUENCY, {}, d
        case UnknownCommand(message_type=t, data=d):
            if t in _PC_TO_RDR_SPECIFIC:
                raise ValueError(f"0x{t:02X} is a known message type: use its own class")
            return t, b"\x00\x00\x00", d
    raise TypeError(f"not a CCID command: {command!r}")


def build_command(command: Command) -> bytes:
    """The bytes of a PC_to_RDR message (what a host sends; used by tests and tools)."""
    message_type, specific, data = _specific(command)
    return bytes(
        PC_TO_RDR.build(
            {
                "bMessageType": message_type,
                "bSlot": command.slot,
                "bSeq": command.seq,
                "specific": specific,
                "abData": data,
            }
        )
    )


# --------------------------------------------------------------------------------------
# RDR_to_PC messages (bulk IN)


@dataclass(frozen=True, slots=True)
class Reply:
    """Base of the RDR_to_PC bulk messages; slot and seq echo the command's."""

    slot: int
    seq: int
    icc_status: IccStatus = IccStatus.ACTIVE
    command_status: CommandStatus = CommandStatus.OK
    error: int = 0


@dataclass(frozen=True, slots=True)
class DataBlock(Reply):
    """RDR_to_PC_DataBlock (§6.2.1): ATR, response APDU, or a time extension."""

    data: bytes = b""
    chain_parameter: int = 0


@dataclass(frozen=True, slots=True)
class SlotStatus(Reply):
    """RDR_to_PC_SlotStatus (§6.2.2)."""

    clock_status: int = 0  # 0 clock running


@dataclass(frozen=True, slots=True)
class Parameters(Reply):
    """RDR_to_PC_Parameters (§6.2.3)."""

    protocol_num: int = 0
    data: bytes = b""


@dataclass(frozen=True, slots=True)
class EscapeReply(Reply):
    """RDR_to_PC_Escape (§6.2.4)."""

    data: bytes = b""


@dataclass(frozen=True, slots=True)
class DataRateAndClockFrequency(Reply):
    """RDR_to_PC_DataRateAndClockFrequency (§6.2.5): dwLength is always 8."""

    clock_frequency: int = 0
    data_rate: int = 0


def _reply_fields(reply: Reply) -> tuple[RdrToPc, int, bytes]:
    match reply:
        case DataBlock(data=d, chain_parameter=p):
            return RdrToPc.DATA_BLOCK, p, d
        case SlotStatus(clock_status=k):
            return RdrToPc.SLOT_STATUS, k, b""
        case Parameters(protocol_num=p, data=d):
            return RdrToPc.PARAMETERS, p, d
        case EscapeReply(data=d):
            return RdrToPc.ESCAPE, 0, d
        case DataRateAndClockFrequency(clock_frequency=f, data_rate=r):
            data = DATA_RATE_AND_CLOCK.build({"dwClockFrequency": f, "dwDataRate": r})
            return RdrToPc.DATA_RATE_AND_CLOCK_FREQUENCY, 0, bytes(data)
    raise TypeError(f"not a CCID reply: {reply!r}")


def build_reply(reply: Reply) -> bytes:
    """The bytes of an RDR_to_PC bulk message."""
    message_type, specific, data = _reply_fields(reply)
    status = reply.command_status
    if not 0 <= status <= 3 or not 0 <= reply.icc_status <= 3:  # two bits each (§6.2.6)
        raise ValueError(f"bStatus out of range: {reply!r}")
    return (
        _pack_reply_header(
            message_type,
            len(data),
            reply.slot,
            reply.seq,
            status * _COMMAND_STATUS_UNIT + reply.icc_status * _ICC_STATUS_UNIT,
            reply.error,
            specific,
        )
        + data
    )


def parse_reply(data: bytes) -> Reply:
    """An RDR_to_PC bulk message (what a host receives; used by tests and tools).

    Raises:
        CcidError: the bytes are not exactly one well-formed RDR_to_PC bulk message.
    """
    data = bytes(data)
    c = _parse(RDR_TO_PC, data, "RDR_to_PC message", _message_length(data))
    try:
        icc = IccStatus(c.bStatus.bmICCStatus)
        status = CommandStatus(c.bStatus.bmCommandStatus)
        message_type = RdrToPc(c.bMessageType)
    except ValueError as exc:
        raise CcidError(SlotError.CMD_NOT_SUPPORTED, f"not an RDR_to_PC reply: {exc}") from exc
    common = (int(c.bSlot), int(c.bSeq), icc, status, int(c.bError))
    data_ = bytes(c.abData)
    match message_type:
        case RdrToPc.DATA_BLOCK:
            return DataBlock(*common, data=data_, chain_parameter=c.bSpecific)
        case RdrToPc.SLOT_STATUS if not data_:
            return SlotStatus(*common, clock_status=c.bSpecific)
        case RdrToPc.PARAMETERS:
            return Parameters(*common, protocol_num=c.bSpecific, data=data_)
        case RdrToPc.ESCAPE:
            return EscapeReply(*common, data=data_)
        case RdrToPc.DATA_RATE_AND_CLOCK_FREQUENCY:
            rates = _parse(DATA_RATE_AND_CLOCK, data_, "DataRateAndClockFrequency")
            return DataRateAndClockFrequency(
                *common, clock_frequency=rates.dwClockFrequency, data_rate=rates.dwDataRate
            )
    raise CcidError(SlotError.BAD_LENGTH, f"not an RDR_to_PC bulk reply: 0x{c.bMessageType:02X}")


# --------------------------------------------------------------------------------------
# Interrupt IN


def notify_slot_change_size(slot_count: int) -> int:
    """Bytes of RDR_to_PC_NotifySlotChange: 1 + 2 bits per slot rounded up (§6.3.1)."""
    return 1 + (2 * slot_count + 7) // 8


def build_notify_slot_change(present: list[bool], changed: list[bool]) -> bytes:
    """RDR_to_PC_NotifySlotChange (§6.3.1): per slot, bit 2n = ICC present, bit 2n+1 =
    changed since the last NotifySlotChange."""
    bitmap = 0
    for index, (is_present, has_changed) in enumerate(zip(present, changed, strict=True)):
        bitmap |= (int(is_present) | int(has_changed) << 1) << (2 * index)
    state = bitmap.to_bytes(notify_slot_change_size(len(present)) - 1, "little")
    return bytes(NOTIFY_SLOT_CHANGE.build({"bmSlotICCState": state}))


def parse_notify_slot_change(data: bytes, slot_count: int) -> tuple[list[bool], list[bool]]:
    """(present, changed) per slot from an RDR_to_PC_NotifySlotChange."""
    c = _parse(NOTIFY_SLOT_CHANGE, bytes(data), "NotifySlotChange")
    state = bytes(c.bmSlotICCState)
    if len(state) != notify_slot_change_size(slot_count) - 1:
        raise CcidError(SlotError.BAD_LENGTH, "NotifySlotChange of the wrong size")
    bitmap = int.from_bytes(state, "little")
    present = [bool(bitmap >> (2 * i) & 1) for i in range(slot_count)]
    changed = [bool(bitmap >> (2 * i + 1) & 1) for i in range(slot_count)]
    return present, changed


# --------------------------------------------------------------------------------------
# Parameters structures and the class descriptor


@dataclass(frozen=True, slots=True)
class T0Parameters:
    """abProtocolDataStructure for T=0 (§6.1.7)."""

    findex_dindex: int = 0x11
    tccks: int = 0x00  # bit 1: inverse convention
    guard_time: int = 0x00  # TC1
    waiting_integer: int = 0x0A  # TC2 (WI)
    clock_stop: int = 0x00

    def build(self) -> bytes:
        return bytes(
            T0_PARAMETERS.build(
                {
                    "bmFindexDindex": self.findex_dindex,
                    "bmTCCKST0": self.tccks,
                    "bGuardTimeT0": self.guard_time,
                    "bWaitingIntegerT0": self.waiting_integer,
                    "bClockStop": self.clock_stop,
                }
            )
        )

    @classmethod
    def parse(cls, data: bytes) -> T0Parameters:
        c = _parse(T0_PARAMETERS, data, "T=0 parameters")
        return cls(c.bmFindexDindex, c.bmTCCKST0, c.bGuardTimeT0, c.bWaitingIntegerT0, c.bClockStop)


@dataclass(frozen=True, slots=True)
class T1Parameters:
    """abProtocolDataStructure for T=1 (§6.1.7)."""

    findex_dindex: int = 0x11
    tccks: int = 0x10  # bit 0: CRC (else LRC), bit 1: inverse convention; bits 7..2 = 000100b
    guard_time: int = 0x00  # TC1
    waiting_integers: int = 0x4D  # TB3: BWI << 4 | CWI
    clock_stop: int = 0x00
    ifsc: int = 0x20  # TA3
    nad: int = 0x00

    def build(self) -> bytes:
        return bytes(
            T1_PARAMETERS.build(
                {
                    "bmFindexDindex": self.findex_dindex,
                    "bmTCCKST1": self.tccks,
                    "bGuardTimeT1": self.guard_time,
                    "bmWaitingIntegersT1": self.waiting_integers,
                    "bClockStop": self.clock_stop,
                    "bIFSC": self.ifsc,
                    "bNadValue": self.nad,
                }
            )
        )

    @classmethod
    def parse(cls, data: bytes) -> T1Parameters:
        c = _parse(T1_PARAMETERS, data, "T=1 parameters")
        return cls(
            c.bmFindexDindex,
            c.bmTCCKST1,
            c.bGuardTimeT1,
            c.bmWaitingIntegersT1,
            c.bClockStop,
            c.bIFSC,
            c.bNadValue,
        )


@dataclass(frozen=True, slots=True)
class ClassDescriptor:
    """The CCID class descriptor (CCID Rev 1.1 §5.1), field by field."""

    bcd_ccid: int
    max_slot_index: int
    voltage_support: int
    protocols: int
    default_clock: int
    maximum_clock: int
    num_clock_supported: int
    data_rate: int
    max_data_rate: int
    num_data_rates_supported: int
    max_ifsd: int
    synch_protocols: int
    mechanical: int
    features: int
    max_ccid_message_length: int
    class_get_response: int
    class_envelope: int
    lcd_layout: int
    pin_support: int
    max_ccid_busy_slots: int

    def build(self) -> bytes:
        return bytes(
            CLASS_DESCRIPTOR.build(
                {
                    "bcdCCID": self.bcd_ccid,
                    "bMaxSlotIndex": self.max_slot_index,
                    "bVoltageSupport": self.voltage_support,
                    "dwProtocols": self.protocols,
                    "dwDefaultClock": self.default_clock,
                    "dwMaximumClock": self.maximum_clock,
                    "bNumClockSupported": self.num_clock_supported,
                    "dwDataRate": self.data_rate,
                    "dwMaxDataRate": self.max_data_rate,
                    "bNumDataRatesSupported": self.num_data_rates_supported,
                    "dwMaxIFSD": self.max_ifsd,
                    "dwSynchProtocols": self.synch_protocols,
                    "dwMechanical": self.mechanical,
                    "dwFeatures": self.features,
                    "dwMaxCCIDMessageLength": self.max_ccid_message_length,
                    "bClassGetResponse": self.class_get_response,
                    "bClassEnvelope": self.class_envelope,
                    "wLcdLayout": self.lcd_layout,
                    "bPINSupport": self.pin_support,
                    "bMaxCCIDBusySlots": self.max_ccid_busy_slots,
                }
            )
        )

    @classmethod
    def parse(cls, data: bytes) -> ClassDescriptor:
        c = _parse(CLASS_DESCRIPTOR, data, "CCID class descriptor")
        return cls(
            c.bcdCCID,
            c.bMaxSlotIndex,
            c.bVoltageSupport,
            c.dwProtocols,
            c.dwDefaultClock,
            c.dwMaximumClock,
            c.bNumClockSupported,
            c.dwDataRate,
            c.dwMaxDataRate,
            c.bNumDataRatesSupported,
            c.dwMaxIFSD,
            c.dwSynchProtocols,
            c.dwMechanical,
            c.dwFeatures,
            c.dwMaxCCIDMessageLength,
            c.bClassGetResponse,
            c.bClassEnvelope,
            c.wLcdLayout,
            c.bPINSupport,
            c.bMaxCCIDBusySlots,
        )


def build_dwords(values: list[int]) -> bytes:
    """The data stage of GET_CLOCK_FREQUENCIES / GET_DATA_RATES."""
    return bytes(DWORD_ARRAY.build(values))


def parse_dwords(data: bytes) -> list[int]:
    return [int(v) for v in _parse(DWORD_ARRAY, data, "dword array")]


# --------------------------------------------------------------------------------------
# PC_to_RDR_Secure: the PIN operation and its data structures (CCID Rev 1.1 §6.1.11)
#
# abData of a Secure message is bPINOperation (message offset 10) followed by
# abPINDataStructure (offset 11). For a verification (bPINOperation 00h) that is the "PIN
# Verification Data Structure" of §6.1.11, for a modification (01h) the "PIN Modification
# Data Structure"; both end with the APDU template abPINApdu. libccid 1.5.2 (commands.c
# SecurePINVerify / SecurePINModify) builds them from the PC/SC v2 part 10
# PIN_VERIFY_STRUCTURE / PIN_MODIFY_STRUCTURE by dropping bTimeOut2 and ulDataLength,
# and, for a modification, bMsgIndex2 when bNumberMessage is 0 and bMsgIndex3 when
# bNumberMessage is below 3 (FFh counts as 3).


class PinOperation(enum.IntEnum):
    """bPINOperation (CCID Rev 1.1 §6.1.11)."""

    VERIFY = 0x00
    MODIFY = 0x01
    TRANSFER = 0x02  # transfer PIN from secure memory
    WAIT_ICC_RESPONSE = 0x03
    CANCEL = 0x04  # cancel PIN function
    RESEND_LAST_I_BLOCK = 0x05
    SEND_NEXT_PART = 0x06  # send next part of APDU (T=1)


class PinType(enum.IntEnum):
    """bmFormatString bits 1..0: how each digit is coded."""

    BINARY = 0  # one byte per digit, 00h..09h
    BCD = 1  # one nibble per digit
    ASCII = 2  # one byte per digit, 30h..39h


# bmFormatString: bit 7 the unit of bits 6..3 (0 bits, 1 bytes); bits 6..3 the PIN's
# position after formatting, relative to the first data byte after Lc; bit 2 justification
# (0 left, 1 right); bits 1..0 the PIN type (00 binary, 01 BCD, 10 ASCII, 11 RFU).
# BitStruct reads the most significant bit first.
PIN_FORMAT_STRING = BitStruct(
    "bmUnitsBytes" / Flag,
    "bmPINPosition" / BitsInteger(4),
    "bmRightJustify" / Flag,
    "bmPINType" / BitsInteger(2),
)
# bmPINBlockString: bits 7..4 the size of the PIN length field in bits (0: no length
# field); bits 3..0 the PIN block size in bytes after justification and formatting.
PIN_BLOCK_STRING = BitStruct("bmPINLengthSize" / BitsInteger(4), "bmPINBlockSize" / BitsInteger(4))
# bmPINLengthFormat: bits 7..5 RFU; bit 4 the unit of bits 3..0 (0 bits, 1 bytes); bits
# 3..0 the PIN length field's position, relative to the first data byte after Lc.
PIN_LENGTH_FORMAT = BitStruct(
    "bmRFU" / BitsInteger(3),
    "bmUnitsBytes" / Flag,
    "bmPINLengthPosition" / BitsInteger(4),
)

PIN_VERIFY = Struct(
    "bTimeOut" / Int8ul,  # seconds; 00h: the reader's default
    "bmFormatString" / PIN_FORMAT_STRING,
    "bmPINBlockString" / PIN_BLOCK_STRING,
    "bmPINLengthFormat" / PIN_LENGTH_FORMAT,
    "wPINMaxExtraDigit" / Int16ul,  # XXYYh: XX minimum, YY maximum PIN size in digits
    "bEntryValidationCondition" / Int8ul,  # bit 0 max size, bit 1 key, bit 2 timeout
    "bNumberMessage" / Int8ul,  # 00h none, 01h bMsgIndex, FFh the reader's default
    "wLangId" / Int16ul,
    "bMsgIndex" / Int8ul,
    "bTeoPrologue" / Bytes(3),  # T=1 TPDU readers only
    "abPINApdu" / GreedyBytes,
)


def _has_index(n: int) -> Any:
    """Whether bMsgIndex``n`` (2 or 3) is in a modification structure: libccid's layout,
    or all three when the reader is a Gemalto one (``_params.all_indexes``, below)."""

    def present(ctx: Any) -> bool:
        if ctx._params.get("all_indexes", False):
            return True
        number = int(ctx.bNumberMessage)
        return number != 0 if n == 2 else number >= 3

    return present


PIN_MODIFY = Struct(
    "bTimeOut" / Int8ul,
    "bmFormatString" / PIN_FORMAT_STRING,
    "bmPINBlockString" / PIN_BLOCK_STRING,
    "bmPINLengthFormat" / PIN_LENGTH_FORMAT,
    "bInsertionOffsetOld" / Int8ul,  # bytes, relative to the first data byte after Lc
    "bInsertionOffsetNew" / Int8ul,
    "wPINMaxExtraDigit" / Int16ul,
    "bConfirmPIN" / Int8ul,  # bit 0 confirm the new PIN, bit 1 enter the current PIN
    "bEntryValidationCondition" / Int8ul,
    "bNumberMessage" / Int8ul,  # 00h, 01h..03h, FFh
    "wLangId" / Int16ul,
    "bMsgIndex1" / Int8ul,
    "bMsgIndex2" / If(_has_index(2), Int8ul),
    "bMsgIndex3" / If(_has_index(3), Int8ul),
    "bTeoPrologue" / Bytes(3),
    "abPINApdu" / GreedyBytes,
)

SECURE_DATA = Struct(
    "bPINOperation" / Int8ul,
    "abPINDataStructure"
    / Switch(
        this.bPINOperation,
        {int(PinOperation.VERIFY): PIN_VERIFY, int(PinOperation.MODIFY): PIN_MODIFY},
        default=GreedyBytes,
    ),
)


@dataclass(frozen=True, slots=True)
class PinFormat:
    """bmFormatString, bmPINBlockString and bmPINLengthFormat, field by field."""

    units_bytes: bool = True  # bmFormatString bit 7: position in bytes (else bits)
    position: int = 0  # bits 6..3
    right_justify: bool = False  # bit 2
    pin_type: int = PinType.ASCII  # bits 1..0 (3 is RFU)
    length_size: int = 0  # bmPINBlockString bits 7..4: PIN length field, in bits
    block_size: int = 0  # bits 3..0: PIN block, in bytes (0: as long as the PIN)
    length_units_bytes: bool = False  # bmPINLengthFormat bit 4
    length_position: int = 0  # bits 3..0
    length_rfu: int = 0  # bits 7..5

    def _containers(self) -> dict[str, dict[str, int | bool]]:
        return {
            "bmFormatString": {
                "bmUnitsBytes": self.units_bytes,
                "bmPINPosition": self.position,
                "bmRightJustify": self.right_justify,
                "bmPINType": self.pin_type,
            },
            "bmPINBlockString": {
                "bmPINLengthSize": self.length_size,
                "bmPINBlockSize": self.block_size,
            },
            "bmPINLengthFormat": {
                "bmRFU": self.length_rfu,
                "bmUnitsBytes": self.length_units_bytes,
                "bmPINLengthPosition": self.length_position,
            },
        }

    @classmethod
    def _from(cls, c: Container[Any]) -> PinFormat:
        f, b, n = c.bmFormatString, c.bmPINBlockString, c.bmPINLengthFormat
        return cls(
            units_bytes=bool(f.bmUnitsBytes),
            position=int(f.bmPINPosition),
            right_justify=bool(f.bmRightJustify),
            pin_type=int(f.bmPINType),
            length_size=int(b.bmPINLengthSize),
            block_size=int(b.bmPINBlockSize),
            length_units_bytes=bool(n.bmUnitsBytes),
            length_position=int(n.bmPINLengthPosition),
            length_rfu=int(n.bmRFU),
        )

    @property
    def bytes(self) -> bytes:
        """The three bytes bmFormatString, bmPINBlockString, bmPINLengthFormat."""
        c = self._containers()
        return (
            PIN_FORMAT_STRING.build(c["bmFormatString"])
            + PIN_BLOCK_STRING.build(c["bmPINBlockString"])
            + PIN_LENGTH_FORMAT.build(c["bmPINLengthFormat"])
        )


@dataclass(frozen=True, slots=True)
class PinVerify:
    """The PIN verification data structure (bPINOperation 00h)."""

    format: PinFormat = PinFormat()
    apdu: bytes = b""  # abPINApdu: the template the PIN goes into
    timeout: int = 0  # bTimeOut, seconds (0: the reader's default)
    min_digits: int = 4  # wPINMaxExtraDigit high byte
    max_digits: int = 8  # wPINMaxExtraDigit low byte
    entry_validation: int = 0x02  # bEntryValidationCondition
    number_message: int = 0x00  # bNumberMessage
    lang_id: int = 0x0409  # wLangId
    msg_index: int = 0x00  # bMsgIndex
    teo_prologue: bytes = b"\0\0\0"


@dataclass(frozen=True, slots=True)
class PinModify:
    """The PIN modification data structure (bPINOperation 01h)."""

    format: PinFormat = PinFormat()
    apdu: bytes = b""
    timeout: int = 0
    insertion_offset_old: int = 0  # bInsertionOffsetOld, bytes
    insertion_offset_new: int = 0  # bInsertionOffsetNew, bytes
    min_digits: int = 4
    max_digits: int = 8
    confirm_pin: int = 0x03  # bConfirmPIN
    entry_validation: int = 0x02
    number_message: int = 0x00
    lang_id: int = 0x0409
    msg_indexes: tuple[int, ...] = (0x00,)  # bMsgIndex1 [, bMsgIndex2 [, bMsgIndex3]]
    teo_prologue: bytes = b"\0\0\0"


def parse_secure_data(data: bytes, *, all_message_indexes: bool = False) -> PinVerify | PinModify:
    """abData of a PC_to_RDR_Secure: bPINOperation and its PIN data structure.

    ``all_message_indexes``: the modification structure carries bMsgIndex1..3 whatever
    bNumberMessage says (what libccid sends to a Gemalto reader: commands.c
    has_gemalto_modify_pin_bug).

    Raises:
        CcidError: BAD_LENGTH when the structure is cut short; bError 0Ah (the offset of
            bPINOperation) for an operation other than verification or modification.
    """
    c = _parse_with(SECURE_DATA, bytes(data), "PIN data structure", all_message_indexes)
    operation = int(c.bPINOperation)
    s = c.abPINDataStructure
    if operation == PinOperation.VERIFY:
        return PinVerify(
            format=PinFormat._from(s),
            apdu=bytes(s.abPINApdu),
            timeout=int(s.bTimeOut),
            min_digits=int(s.wPINMaxExtraDigit) >> 8,
            max_digits=int(s.wPINMaxExtraDigit) & 0xFF,
            entry_validation=int(s.bEntryValidationCondition),
            number_message=int(s.bNumberMessage),
            lang_id=int(s.wLangId),
            msg_index=int(s.bMsgIndex),
            teo_prologue=bytes(s.bTeoPrologue),
        )
    if operation == PinOperation.MODIFY:
        indexes = tuple(int(i) for i in (s.bMsgIndex1, s.bMsgIndex2, s.bMsgIndex3) if i is not None)
        return PinModify(
            format=PinFormat._from(s),
            apdu=bytes(s.abPINApdu),
            timeout=int(s.bTimeOut),
            insertion_offset_old=int(s.bInsertionOffsetOld),
            insertion_offset_new=int(s.bInsertionOffsetNew),
            min_digits=int(s.wPINMaxExtraDigit) >> 8,
            max_digits=int(s.wPINMaxExtraDigit) & 0xFF,
            confirm_pin=int(s.bConfirmPIN),
            entry_validation=int(s.bEntryValidationCondition),
            number_message=int(s.bNumberMessage),
            lang_id=int(s.wLangId),
            msg_indexes=indexes,
            teo_prologue=bytes(s.bTeoPrologue),
        )
    raise CcidError(SECURE_PIN_OPERATION_OFFSET, f"bPINOperation {operation:02X}h")


#: Offset of bPINOperation in the Secure message (header 10 bytes, then abData).
SECURE_PIN_OPERATION_OFFSET = HEADER_SIZE


def _parse_with(
    struct: Construct[Any, Any], data: bytes, what: str, all_indexes: bool
) -> Container[Any]:
    try:
        parsed: Container[Any] = struct.parse(data, all_indexes=all_indexes)
    except ConstructError as exc:
        raise CcidError(SlotError.BAD_LENGTH, f"malformed {what}: {exc}") from exc
    return parsed


def build_secure_data(
    structure: PinVerify | PinModify, *, all_message_indexes: bool = False
) -> bytes:
    """abData of a PC_to_RDR_Secure (what libccid sends; used by tests and tools).

    A modification structure's ``msg_indexes`` must hold as many indexes as the layout
    for its bNumberMessage has (see :func:`parse_secure_data`).
    """
    common: dict[str, Any] = {
        "bTimeOut": structure.timeout,
        **structure.format._containers(),
        "wPINMaxExtraDigit": structure.min_digits << 8 | structure.max_digits,
        "bEntryValidationCondition": structure.entry_validation,
        "bNumberMessage": structure.number_message,
        "wLangId": structure.lang_id,
        "bTeoPrologue": structure.teo_prologue,
        "abPINApdu": structure.apdu,
    }
    if isinstance(structure, PinVerify):
        operation = PinOperation.VERIFY
        common["bMsgIndex"] = structure.msg_index
    else:
        operation = PinOperation.MODIFY
        indexes = [*structure.msg_indexes, None, None][:3]
        common.update(
            bInsertionOffsetOld=structure.insertion_offset_old,
            bInsertionOffsetNew=structure.insertion_offset_new,
            bConfirmPIN=structure.confirm_pin,
            bMsgIndex1=indexes[0],
            bMsgIndex2=indexes[1],
            bMsgIndex3=indexes[2],
        )
    return bytes(
        SECURE_DATA.build(
            {"bPINOperation": int(operation), "abPINDataStructure": common},
            all_indexes=all_message_indexes,
        )
    )
