"""The card OS of an emulated PIV card: APDUs in, the PIV Card Application, APDUs out.

:class:`PivCard` implements :class:`usbccid.card.Card`. The PIV Card Application is its only
application, selected from the reset on (implicitly selected, as ISO 7816-4 allows; SELECT
of the PIV AID answers its property template, any other AID ``6A 82``). Per command it:

1. drops any unfetched response unless the command is GET RESPONSE (ISO 7816-4 §5.3.4);
2. parses the APDU strictly (:meth:`usbccid.cac.apdu.CommandApdu.parse`, ``67 00``);
3. checks the class byte: the PIV card edge is interindustry class ``00``, with ``10``
   for command chaining (SP 800-73-4 Part 2 §3); a logical channel answers ``68 81``,
   secure messaging ``68 82``, another class ``6E 00``;
4. assembles command chains (ISO 7816-4 §5.3.3, up to 65535 bytes; a chain broken by
   another command answers ``68 83``);
5. runs the application's handler;
6. sizes the answer (ISO 7816-4 §5.3.4; SP 800-73-4 Part 2 §3.1.2): up to Ne bytes now,
   and when more remain, ``61 xx`` (xx = what is left, ``00`` for 256 or more) for GET
   RESPONSE ``00 C0 00 00 Le`` to fetch. Without Le all of it waits for GET RESPONSE.

:class:`~usbccid.cac.errors.CardError` (of which :class:`~usbccid.piv.errors.PivError` is
one) becomes a status word only in :meth:`PivCard.transmit`.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from usbccid.cac.apdu import CommandApdu, ResponseApdu
from usbccid.cac.iso_card import IsoCard
from usbccid.cac.profile import PinStateStore
from usbccid.cac.sw import SW, bytes_remaining
from usbccid.piv.application import INS_GET_RESPONSE, PivApplication
from usbccid.piv.errors import PivError
from usbccid.piv.keys import KeyKind, algorithm_of
from usbccid.piv.profile import PivProfile

#: TS 3B, T0 8A (TD1 follows, 10 historical bytes), TD1 00 (T=0), "usbccidPIV": no OpenSC
#: ATR table knows it, so OpenSC's drivers find the PIV applet by its APDUs.
ATR_PIV = bytes.fromhex("3B 8A 00") + b"usbccidPIV"

MAX_CHAIN_DATA = 65535
#: Key size from which an operation is slow enough to leave the event loop.
BLOCKING_KEY_BITS = 3072


@dataclass
class _Chain:
    header: tuple[int, int, int]
    data: bytearray


def check_class(cla: int) -> None:
    """Interindustry class bytes 00 and 10 only (ISO 7816-4 §5.4.1 Tables 2 and 3)."""
    if 0x40 <= cla <= 0x7F:  # further interindustry class: logical channels 4 to 19
        raise PivError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
    if cla > 0x1F:  # proprietary (8x-Fx), RFU (2x, 3x) and the invalid FF
        raise PivError(SW.CLA_NOT_SUPPORTED)
    if cla & 0x03:
        raise PivError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
    if cla & 0x0C:
        raise PivError(SW.SECURE_MESSAGING_NOT_SUPPORTED)


class PivCard(IsoCard):
    """A card holding one PIV Card Application made from ``profile``; implements ``Card``."""

    def __init__(
        self,
        profile: PivProfile,
        pin_store: PinStateStore,
        *,
        atr: bytes = ATR_PIV,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        self.atr = atr
        self.application = PivApplication(profile, pin_store, random_bytes)
        self._blocking = any(
            algorithm_of(s.private_key).kind is KeyKind.RSA
            and algorithm_of(s.private_key).bits >= BLOCKING_KEY_BITS
            for s in profile.slots
        )
        self._pending = b""
        self._chain: _Chain | None = None

    # -- state ----------------------------------------------------------------------

    def reset(self) -> None:
        """Cold reset or deselection: no security status, nothing pending, no chain."""
        self._pending = b""
        self._chain = None
        self.application.pins.reset_security_status()

    def reload(self) -> None:
        """Reset, and re-read the PIN state (another edge of the card may have changed it)."""
        self.reset()
        self.application.pins.reload()

    # -- command processing -----------------------------------------------------------

    def _process(self, raw: bytes) -> ResponseApdu:
        pending, self._pending = self._pending, b""
        apdu = CommandApdu.parse(raw)
        check_class(apdu.cla)
        if apdu.ins == INS_GET_RESPONSE:
            if self._chain is not None:
                self._chain = None
                raise PivError(SW.LAST_COMMAND_OF_CHAIN_EXPECTED)
            return self._get_response(apdu, pending)
        full = self._assemble(apdu)
        if full is None:
            return ResponseApdu(b"", SW.NO_ERROR)
        return self._size(self.application.process(full), full.ne)

    def _get_response(self, apdu: CommandApdu, pending: bytes) -> ResponseApdu:
        """GET RESPONSE ``00 C0 00 00 Le`` (ISO 7816-4 §5.3.4)."""
        if (apdu.p1, apdu.p2) != (0x00, 0x00):
            self._pending = pending
            raise PivError(SW.INCORRECT_P1P2)
        if apdu.data:
            raise PivError(SW.WRONG_LENGTH)
        if not pending:
            raise PivError(SW.CONDITIONS_NOT_SATISFIED, "no response data pending")
        return self._size(pending, 256 if apdu.ne is None else apdu.ne)

    def _assemble(self, apdu: CommandApdu) -> CommandApdu | None:
        """Command chaining (ISO 7816-4 §5.3.3): None while the chain is incomplete."""
        header = (apdu.ins, apdu.p1, apdu.p2)
        chain = self._chain
        if chain is not None and chain.header != header:
            self._chain = None
            raise PivError(SW.LAST_COMMAND_OF_CHAIN_EXPECTED)
        if apdu.chained:
            if chain is None:
                chain = self._chain = _Chain(header, bytearray())
            if len(chain.data) + len(apdu.data) > MAX_CHAIN_DATA:
                self._chain = None
                raise PivError(SW.WRONG_LENGTH, "chained data too long")
            chain.data += apdu.data
            return None
        if chain is None:
            return apdu
        self._chain = None
        data = bytes(chain.data) + apdu.data
        if len(data) > MAX_CHAIN_DATA:
            raise PivError(SW.WRONG_LENGTH, "chained data too long")
        extended = len(data) > 255 or (apdu.ne is not None and apdu.ne > 256)
        return CommandApdu(apdu.cla, apdu.ins, apdu.p1, apdu.p2, data, apdu.ne, extended)

    def _size(self, data: bytes, ne: int | None) -> ResponseApdu:
        """Up to Ne bytes now; announce the rest with 61 xx (ISO 7816-4 §5.3.4)."""
        if not data:
            return ResponseApdu(b"", SW.NO_ERROR)
        n = 0 if ne is None else ne
        out, rest = data[:n], data[n:]
        if rest:
            self._pending = rest
            return ResponseApdu(out, bytes_remaining(len(rest)))
        return ResponseApdu(out, SW.NO_ERROR)
