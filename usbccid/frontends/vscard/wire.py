"""The VSCard wire format (libcacard ``vscard_common.h``), declared once with construct.

VSCard is what QEMU's ``ccid-card-passthru`` device speaks over its chardev. The
"host" is QEMU (it uses the card), the "client" is us (we own the card). Every message
is a 12-byte header and a payload; all header and numeric payload fields are
**big-endian** (``htonl`` in ccid-card-passthru.c ``ccid_card_vscard_send_msg`` and
vscclient.c ``send_msg``)::

    0 type   4 reader_id   8 length (of the payload, header excluded)   12 payload

The ``VSC_Init`` magic is the four bytes ``"VSCD"`` as they are (``VSCARD_MAGIC`` is
built byte by byte and never byte-swapped); version and capabilities are big-endian.

construct Containers do not leave this module: parsed messages are the frozen
dataclasses below. A ConstructError while parsing peer bytes becomes
:class:`VscardProtocolError` here, once; while building our own message,
:class:`VscardLocalError`. Nothing here decides whether enough bytes have arrived: the
caller (``client.py``) frames with :data:`HEADER_SIZE` and the header's ``length``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from construct import (
    Bytes,
    Construct,
    ConstructError,
    Container,
    GreedyBytes,
    GreedyRange,
    Int32ub,
    Prefixed,
    Struct,
    Switch,
    Terminated,
    this,
)

from usbccid.frontends.vscard.errors import (
    UNDEFINED_READER_ID,
    ErrorCode,
    VscardLocalError,
    VscardProtocolError,
)

__all__ = [
    "HEADER_SIZE",
    "MAGIC",
    "MINIMAL_READER_ID",
    "UNDEFINED_READER_ID",
    "VERSION",
    "Apdu",
    "Atr",
    "CardRemove",
    "Error",
    "ErrorCode",
    "Flush",
    "FlushComplete",
    "Header",
    "Init",
    "Message",
    "MsgType",
    "ReaderAdd",
    "ReaderRemove",
    "Unknown",
    "encode",
    "make_version",
    "parse_header",
    "parse_message",
    "split_version",
]

HEADER_SIZE: Final = 12
MAGIC: Final = b"VSCD"
MINIMAL_READER_ID: Final = 0  # VSCARD_MINIMAL_READER_ID: the id QEMU gives its one reader

# MAKE_VERSION(major, middle, minor): 11, 11 and 10 bits (vscard_common.h).
_MINOR_BITS, _MIDDLE_BITS = 10, 11


def make_version(major: int, middle: int, minor: int) -> int:
    return major << (_MINOR_BITS + _MIDDLE_BITS) | middle << _MINOR_BITS | minor


def split_version(version: int) -> tuple[int, int, int]:
    """(major, middle, minor) of a VSCard version number."""
    return (
        version >> (_MINOR_BITS + _MIDDLE_BITS),
        version >> _MINOR_BITS & (1 << _MIDDLE_BITS) - 1,
        version & (1 << _MINOR_BITS) - 1,
    )


VERSION: Final = make_version(0, 0, 2)
"""``VSCARD_VERSION``: 0.0.2, what QEMU 7.2 and libcacard 2.8 send."""


class MsgType(enum.IntEnum):
    """``VSCMsgType`` (vscard_common.h); direction as the header's comments give it."""

    INIT = 1  # both: magic, version, capabilities
    ERROR = 2  # both: a status code (the answer to ReaderAdd/Remove, ATR, CardRemove)
    READER_ADD = 3  # client -> host: optional UTF-8 name
    READER_REMOVE = 4  # client -> host
    ATR = 5  # client -> host: card inserted (or reset), with its ATR
    CARD_REMOVE = 6  # client -> host
    APDU = 7  # both: C-APDU from the host, R-APDU (data + SW1 SW2) from the client
    FLUSH = 8  # host -> client: answer with FlushComplete once every APDU is answered
    FLUSH_COMPLETE = 9  # client -> host


# --------------------------------------------------------------------------------------
# construct declarations

# The header alone, to frame a message before all of it has arrived.
HEADER = Struct("type" / Int32ub, "reader_id" / Int32ub, "length" / Int32ub)

_EMPTY = Struct(Terminated)

# Payload of each type (vscard_common.h VSCMsgInit ... VSCMsgFlushComplete). Each one
# must use its whole payload: Prefixed gives it exactly ``length`` bytes.
_PAYLOADS: dict[int, Construct[Any, Any]] = {
    # VSCMsgInit: capabilities[1] "receiver must check length, array may grow".
    MsgType.INIT: Struct(
        "magic" / Bytes(4),
        "version" / Int32ub,
        "capabilities" / GreedyRange(Int32ub),
        Terminated,
    ),
    MsgType.ERROR: Struct("code" / Int32ub, Terminated),
    MsgType.READER_ADD: Struct("name" / GreedyBytes),
    MsgType.READER_REMOVE: _EMPTY,
    MsgType.ATR: Struct("atr" / GreedyBytes),
    MsgType.CARD_REMOVE: _EMPTY,
    MsgType.APDU: Struct("data" / GreedyBytes),
    MsgType.FLUSH: _EMPTY,
    MsgType.FLUSH_COMPLETE: _EMPTY,
}

MESSAGE = Struct(
    "type" / Int32ub,
    "reader_id" / Int32ub,
    "payload"
    / Prefixed(
        Int32ub,
        Switch(
            this.type,
            {int(kind): payload for kind, payload in _PAYLOADS.items()},
            default=Struct("raw" / GreedyBytes),  # an unknown type keeps its bytes
        ),
    ),
    Terminated,
)


# --------------------------------------------------------------------------------------
# the boundary: frozen dataclasses


@dataclass(frozen=True, slots=True)
class Header:
    type: int
    reader_id: int
    length: int


@dataclass(frozen=True, slots=True)
class Init:
    version: int = VERSION
    capabilities: tuple[int, ...] = (0,)  # QEMU sends one, 0: none defined
    magic: bytes = MAGIC
    reader_id: int = UNDEFINED_READER_ID


@dataclass(frozen=True, slots=True)
class Error:
    code: int
    reader_id: int = UNDEFINED_READER_ID


@dataclass(frozen=True, slots=True)
class ReaderAdd:
    name: bytes = b""
    reader_id: int = UNDEFINED_READER_ID


@dataclass(frozen=True, slots=True)
class ReaderRemove:
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Atr:
    atr: bytes
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class CardRemove:
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Apdu:
    data: bytes
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Flush:
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class FlushComplete:
    reader_id: int = MINIMAL_READER_ID


@dataclass(frozen=True, slots=True)
class Unknown:
    """A message of a type vscard_common.h does not define."""

    type: int
    payload: bytes
    reader_id: int


Message: TypeAlias = (
    Init
    | Error
    | ReaderAdd
    | ReaderRemove
    | Atr
    | CardRemove
    | Apdu
    | Flush
    | FlushComplete
    | Unknown
)


# --------------------------------------------------------------------------------------
# parse and build


def parse_header(raw: bytes) -> Header:
    """The 12-byte header (``raw`` must be exactly :data:`HEADER_SIZE` bytes)."""
    if len(raw) != HEADER_SIZE:
        raise VscardLocalError(f"a header is {HEADER_SIZE} bytes, not {len(raw)}")
    c = HEADER.parse(raw)
    return Header(c.type, c.reader_id, c.length)


def parse_message(raw: bytes) -> Message:
    """One whole message, header included.

    Raises:
        VscardProtocolError: the payload does not fit its type (an ``Init`` shorter than
            magic + version or with a partial capability, an ``Error`` that is not 4
            bytes, a payload on a type that has none).
    """
    try:
        c = MESSAGE.parse(raw)
    except ConstructError as e:
        header = parse_header(raw[:HEADER_SIZE]) if len(raw) >= HEADER_SIZE else None
        kind = _type_name(header.type) if header else "message"
        raise VscardProtocolError(
            f"malformed {kind} ({len(raw) - HEADER_SIZE} payload bytes): {e}",
            reader_id=header.reader_id if header else UNDEFINED_READER_ID,
        ) from e
    return _from_container(c)


def _type_name(kind: int) -> str:
    try:
        return f"VSC_{MsgType(kind).name}"
    except ValueError:
        return f"message of type {kind:#x}"


def _from_container(c: Container[Any]) -> Message:
    p, rid = c.payload, c.reader_id
    kind = c.type
    if kind == MsgType.INIT:
        return Init(p.version, tuple(p.capabilities), bytes(p.magic), rid)
    if kind == MsgType.ERROR:
        return Error(p.code, rid)
    if kind == MsgType.READER_ADD:
        return ReaderAdd(bytes(p.name), rid)
    if kind == MsgType.READER_REMOVE:
        return ReaderRemove(rid)
    if kind == MsgType.ATR:
        return Atr(bytes(p.atr), rid)
    if kind == MsgType.CARD_REMOVE:
        return CardRemove(rid)
    if kind == MsgType.APDU:
        return Apdu(bytes(p.data), rid)
    if kind == MsgType.FLUSH:
        return Flush(rid)
    if kind == MsgType.FLUSH_COMPLETE:
        return FlushComplete(rid)
    return Unknown(kind, bytes(p.raw), rid)


def _to_container(m: Message) -> tuple[int, dict[str, Any]]:
    if isinstance(m, Init):
        return MsgType.INIT, {
            "magic": m.magic,
            "version": m.version,
            "capabilities": list(m.capabilities),
        }
    if isinstance(m, Error):
        return MsgType.ERROR, {"code": m.code}
    if isinstance(m, ReaderAdd):
        return MsgType.READER_ADD, {"name": m.name}
    if isinstance(m, Atr):
        return MsgType.ATR, {"atr": m.atr}
    if isinstance(m, Apdu):
        return MsgType.APDU, {"data": m.data}
    if isinstance(m, Unknown):
        return m.type, {"raw": m.payload}
    kinds = {
        ReaderRemove: MsgType.READER_REMOVE,
        CardRemove: MsgType.CARD_REMOVE,
        Flush: MsgType.FLUSH,
        FlushComplete: MsgType.FLUSH_COMPLETE,
    }
    return kinds[type(m)], {}


def encode(message: Message) -> bytes:
    """The bytes of ``message``, header included.

    Raises:
        VscardLocalError: a field does not fit (a number over 32 bits, a magic that is
            not 4 bytes): a bug of ours.
    """
    kind, payload = _to_container(message)
    try:
        data: bytes = MESSAGE.build(
            {"type": int(kind), "reader_id": message.reader_id, "payload": payload}
        )
    except (ConstructError, ValueError, TypeError) as e:  # construct lets some through
        raise VscardLocalError(f"cannot build {message!r}: {e}") from e
    return data
