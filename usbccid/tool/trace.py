"""APDU trace logging (``usbccid serve --trace``), with secrets redacted.

:class:`TracingCard` wraps a :class:`~usbccid.card.Card` and logs every exchange on the
``usbccid.tool.trace`` logger::

    desk/0 ATR 3b 8f 80 01 ...
    desk/0 > 00 a4 04 00 07 a0 00 00 00 79 01 00 00
    desk/0 < 90 00
    desk/0 > 00 20 00 80 08 [8 bytes redacted]
    desk/0 < 90 00

What is never logged (:class:`Redactor`):

* the data of VERIFY (INS 20), CHANGE REFERENCE DATA (24) and RESET RETRY COUNTER (2C):
  PINs and unblock codes (the CAC's global PIN, and the PIV PIN 80 and PUK 81 alike);
* all the data of an APDU the reader's PIN pad built (PC_to_RDR_Secure: the digits typed
  on the keypad went into its template), whatever its instruction
  (:meth:`TracingCard.transmit_keyed`)::

      desk/0 > 00 20 00 00 08 [8 bytes keyed on the PIN pad, redacted]
* the data of the key operations, in both directions: the CAC/GSC-IS private key
  operation (INS 42, "SIGN/DECRYPT"), GENERAL AUTHENTICATE (87: PIV signatures,
  decryptions, ECDH, chained or not), PERFORM SECURITY
  OPERATION (2A) and INTERNAL AUTHENTICATE (88) -- plaintexts, signatures, decrypted
  session keys -- including what comes back through GET RESPONSE (C0) after a ``61 xx``.

Headers, lengths and status words stay, so a trace still shows what happened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from usbccid.card import Card, transmit_keyed

log = logging.getLogger("usbccid.tool.trace")

PIN_INSTRUCTIONS: Final = frozenset({0x20, 0x24, 0x2C})
KEY_INSTRUCTIONS: Final = frozenset({0x42, 0x87, 0x2A, 0x88})
GET_RESPONSE: Final = 0xC0


def hexdump(data: bytes) -> str:
    return data.hex(" ")


def _redacted(n: int, how: str = "") -> str:
    return f"[{n} byte{'s' if n != 1 else ''}{how} redacted]"


@dataclass
class Redactor:
    """Formats one card's APDUs for the trace; remembers a pending key-operation response.

    Pure: feed it every command and then its response, in order.
    """

    _secret_response: bool = field(default=False, init=False)
    _last_ins: int | None = field(default=None, init=False)
    _keyed: bool = field(default=False, init=False)

    def command(self, apdu: bytes) -> str:
        if len(apdu) < 4:
            self._last_ins = None
            self._keyed = False
            return f"{hexdump(apdu)} (malformed: {len(apdu)} bytes)"
        ins = apdu[1]
        self._last_ins = ins
        self._keyed = False
        if ins not in PIN_INSTRUCTIONS | KEY_INSTRUCTIONS:
            return hexdump(apdu)
        return _without_data(apdu, "")

    def keyed_command(self, apdu: bytes) -> str:
        """A command the reader's PIN pad built: its data holds digits typed on the
        keypad, so all of it is redacted whatever the instruction (and the data of the
        response too: a card could echo it)."""
        how = " keyed on the PIN pad,"
        self._keyed = True
        if len(apdu) < 4:
            self._last_ins = None
            return _redacted(len(apdu), how)
        self._last_ins = apdu[1]
        return _without_data(apdu, how)

    def response(self, rapdu: bytes) -> str:
        ins = self._last_ins
        secret = (
            self._keyed
            or ins in KEY_INSTRUCTIONS
            or (ins == GET_RESPONSE and self._secret_response)
        )
        self._keyed = False
        sw = rapdu[-2:] if len(rapdu) >= 2 else b""
        # 61 xx after a key operation: the rest of its response follows in GET RESPONSE
        self._secret_response = secret and sw[:1] == b"\x61"
        if not secret or len(rapdu) <= 2:
            return hexdump(rapdu)
        return f"{_redacted(len(rapdu) - 2)} {hexdump(sw)}"


def _without_data(apdu: bytes, how: str) -> str:
    header, body = apdu[:4], apdu[4:]
    lc_bytes, data, le_bytes = _split_body(body)
    parts = [hexdump(header)]
    if lc_bytes:
        parts.append(hexdump(lc_bytes))
    if data:
        parts.append(_redacted(len(data), how))
    if le_bytes:
        parts.append(hexdump(le_bytes))
    return " ".join(parts)


def _split_body(body: bytes) -> tuple[bytes, bytes, bytes]:
    """(Lc field, data, Le field) of an APDU body (ISO/IEC 7816-4 §5.1 cases 1-4)."""
    n = len(body)
    if n == 0:
        return b"", b"", b""
    if n == 1:
        return b"", b"", body  # case 2 short
    if body[0] != 0:
        lc = body[0]
        if n == 1 + lc:
            return body[:1], body[1:], b""  # case 3 short
        if n == 2 + lc:
            return body[:1], body[1:-1], body[-1:]  # case 4 short
    elif n >= 3:
        if n == 3:
            return b"", b"", body  # case 2 extended
        lc = int.from_bytes(body[1:3], "big")
        if n == 3 + lc:
            return body[:3], body[3:], b""  # case 3 extended
        if n == 5 + lc:
            return body[:3], body[3:-2], body[-2:]  # case 4 extended
    return b"", body, b""  # malformed: all of it is data (and so redacted if secret)


class TracingCard:
    """A :class:`Card` that logs what passes through it; ``name`` is e.g. ``"desk/0"``."""

    def __init__(self, card: Card, name: str, logger: logging.Logger = log) -> None:
        self.card = card
        self.name = name
        self._log = logger
        self._redactor = Redactor()

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def power_on(self) -> bytes:
        atr = self.card.power_on()
        self._redactor = Redactor()
        self._log.info("%s ATR %s", self.name, hexdump(atr))
        return atr

    def power_off(self) -> None:
        self.card.power_off()
        self._log.info("%s power off", self.name)

    def transmit(self, command: bytes) -> bytes:
        self._log.info("%s > %s", self.name, self._redactor.command(command))
        response = self.card.transmit(command)
        self._log.info("%s < %s", self.name, self._redactor.response(response))
        return response

    def transmit_keyed(self, command: bytes) -> bytes:
        """An APDU holding PIN digits from the reader's keypad (PC_to_RDR_Secure)."""
        self._log.info("%s > %s", self.name, self._redactor.keyed_command(command))
        response = transmit_keyed(self.card, command)
        self._log.info("%s < %s", self.name, self._redactor.response(response))
        return response

    def __getattr__(self, name: str) -> object:
        # Everything else (e.g. the CAC card's own attributes) is the wrapped card's.
        return getattr(self.card, name)


class CountingCard:
    """Counts a card's APDUs and resets for the status display."""

    def __init__(self, card: Card, counters: dict[str, int]) -> None:
        self.card = card
        self.counters = counters

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def power_on(self) -> bytes:
        self.counters["power_ons"] = self.counters.get("power_ons", 0) + 1
        return self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def transmit(self, command: bytes) -> bytes:
        self.counters["apdus"] = self.counters.get("apdus", 0) + 1
        return self.card.transmit(command)

    def transmit_keyed(self, command: bytes) -> bytes:
        self.counters["apdus"] = self.counters.get("apdus", 0) + 1
        self.counters["pinpad_entries"] = self.counters.get("pinpad_entries", 0) + 1
        return transmit_keyed(self.card, command)
