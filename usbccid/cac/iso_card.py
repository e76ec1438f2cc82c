"""The :class:`~usbccid.card.Card` protocol around an ISO 7816-4 command processor.

The emulated cards (CAC, PIV) answer one APDU at a time; what they do alike is here: a
power-on or power-off is a cold reset (ISO 7816-3 §6.2.2) that answers the ATR, and a
:class:`~usbccid.cac.errors.CardError` raised while processing a command becomes its
status word (ISO 7816-4 §5.6), here and nowhere else.
"""

from __future__ import annotations

from usbccid.cac.apdu import ResponseApdu
from usbccid.cac.errors import CardError


class IsoCard:
    """A card made of :meth:`reset` and :meth:`_process`; implements ``Card``."""

    atr: bytes
    _blocking: bool  # transmit may take long (RSA-3072+, a token): run it on a thread

    @property
    def blocking(self) -> bool:
        return self._blocking

    def power_on(self) -> bytes:
        self.reset()
        return self.atr

    def power_off(self) -> None:
        self.reset()

    def transmit(self, command: bytes) -> bytes:
        try:
            response = self._process(command)
        except CardError as exc:  # the one place a CardError becomes a status word
            response = ResponseApdu(b"", exc.sw)
        return response.encode()

    def reset(self) -> None:
        """Cold reset: nothing selected, no security status, nothing pending."""
        raise NotImplementedError

    def _process(self, raw: bytes) -> ResponseApdu:
        """The response to the command APDU ``raw``; raises CardError for an error SW."""
        raise NotImplementedError
