"""The vpcd wire format, declared once with construct.

Source: vsmartcard ``virtualsmartcard/src/vpcd/vpcd.{h,c}`` (``sendToVICC`` /
``recvFromVICC``) and the reference card side ``vpicc/virtualsmartcard/VirtualSmartcard.py``
(``VirtualICC.run``). Both directions carry frames: a big-endian ``uint16`` length
(``htons``) and that many payload bytes; vpcd refuses to send more than 0xFFFF.

What vpcd sends to the card (``vpcd.h``):

* a frame of length 1 is always a control byte (``VPCD_CTRL_LEN``): power off (0), power on
  (1), reset (2), or get ATR (4). Only get ATR is answered (with the ATR);
* a frame of any other length is a command APDU, answered with the response APDU.

vpcd always speaks first and waits for each answer (``vicc_transmit`` holds the I/O lock
from the send to the receive), so the card side never sends unasked.

construct Containers stay in this module: messages are frozen dataclasses. This module
parses a payload whose length is already known (the stream decoder in ``protocol.py``
waits for whole frames); it never guesses from a short buffer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from construct import Bytes, Construct, Int16ub, Rebuild, Struct, len_, this

from usbccid.frontends.vpcd.errors import VpcdCardError, VpcdProtocolError

VPCD_PORT: Final = 35963
"""vpcd.h ``VPCDPORT`` (0x8C7B); slot N of a vpcd reader listens on VPCD_PORT + N."""

LENGTH: Final[Construct[int, int]] = Int16ub
"""The frame's length field (network byte order, vpcd.c ``htons``/``ntohs``)."""

FRAME: Final[Construct[Any, Any]] = Struct(
    "length" / Rebuild(LENGTH, len_(this.payload)),
    "payload" / Bytes(this.length),
)
"""One frame, either direction: length, then that many bytes."""

HEADER_SIZE: Final = LENGTH.sizeof()
MAX_PAYLOAD: Final = 0xFFFF  # the largest length the field holds (vpcd.c sendToVICC)
MAX_FRAME: Final = HEADER_SIZE + MAX_PAYLOAD
CONTROL_LENGTH: Final = 1  # vpcd.h VPCD_CTRL_LEN


class Control(enum.IntEnum):
    """Control bytes (vpcd.h ``VPCD_CTRL_*``)."""

    POWER_OFF = 0
    POWER_ON = 1
    RESET = 2
    GET_ATR = 4


@dataclass(frozen=True, slots=True)
class PowerOff:
    """Deactivate the card (IFDHPowerICC IFD_POWER_DOWN). Not answered."""


@dataclass(frozen=True, slots=True)
class PowerOn:
    """Activate the card (IFD_POWER_UP); vpcd asks for the ATR next. Not answered."""


@dataclass(frozen=True, slots=True)
class Reset:
    """Reset the card (IFD_RESET); vpcd asks for the ATR next. Not answered."""


@dataclass(frozen=True, slots=True)
class GetAtr:
    """The ATR, please. Sent on every presence poll (vpcd.c ``vicc_present``) and after each
    power on or reset; answered with the ATR (a 0-length answer means "card removed")."""


@dataclass(frozen=True, slots=True)
class Apdu:
    """A command APDU (any frame whose length is not 1); answered with the response APDU."""

    command: bytes

    def __repr__(self) -> str:
        return f"Apdu({len(self.command)} bytes)"


Message: TypeAlias = PowerOff | PowerOn | Reset | GetAtr | Apdu
"""What vpcd sends."""

_CONTROL_MESSAGES: Final[dict[int, Message]] = {
    Control.POWER_OFF: PowerOff(),
    Control.POWER_ON: PowerOn(),
    Control.RESET: Reset(),
    Control.GET_ATR: GetAtr(),
}


def frame_length(header: bytes) -> int:
    """The total size of the frame whose first :data:`HEADER_SIZE` bytes are ``header``."""
    return HEADER_SIZE + LENGTH.parse(header[:HEADER_SIZE])


def parse_message(frame: bytes) -> Message:
    """One whole frame from vpcd as a message.

    Raises:
        VpcdProtocolError: a control byte vpcd does not define. vpicc ignores those; we
            close instead, because vpcd may be waiting for an answer we cannot know.
    """
    payload: bytes = FRAME.parse(frame).payload
    if len(payload) != CONTROL_LENGTH:
        return Apdu(payload)
    message = _CONTROL_MESSAGES.get(payload[0])
    if message is None:
        raise VpcdProtocolError(f"unknown control byte 0x{payload[0]:02X}")
    return message


def build_frame(payload: bytes) -> bytes:
    """A frame carrying ``payload`` to vpcd (an ATR or a response APDU).

    Raises:
        VpcdCardError: ``payload`` is empty (vpcd would take the card as removed) or
            longer than a frame can carry.
    """
    if not payload:
        raise VpcdCardError("empty answer: vpcd would take the card as removed")
    if len(payload) > MAX_PAYLOAD:
        raise VpcdCardError(f"answer of {len(payload)} bytes; a vpcd frame holds {MAX_PAYLOAD}")
    frame: bytes = FRAME.build({"payload": payload})
    return frame


def build_message(message: Message) -> bytes:
    """The frame vpcd would send for ``message`` (for tests and for the fuzz target)."""
    if isinstance(message, Apdu):
        if len(message.command) == CONTROL_LENGTH or len(message.command) > MAX_PAYLOAD:
            raise ValueError(f"a {len(message.command)}-byte APDU cannot travel over vpcd")
        frame: bytes = FRAME.build({"payload": message.command})
        return frame
    code = next(c for c, m in _CONTROL_MESSAGES.items() if m == message)
    control: bytes = FRAME.build({"payload": bytes([code])})
    return control
