"""The boundary between a CCID reader slot and the card in it (ISO 7816-3 / 7816-4).

The reader knows cards only through this protocol; the CAC emulation (``usbccid.cac``)
and the test cards implement it. A card knows nothing of the reader.
"""

from __future__ import annotations

from typing import Protocol


class Card(Protocol):
    @property
    def blocking(self) -> bool:
        """True when ``transmit`` may be slow enough to run off the event loop."""
        ...

    def power_on(self) -> bytes:
        """Cold reset (ISO 7816-3 §6.2.2): forget all volatile state; return the ATR."""
        ...

    def power_off(self) -> None:
        """Deactivate the card; volatile state (selection, security status) is lost."""
        ...

    def transmit(self, command: bytes) -> bytes:
        """Process one command APDU and return the response APDU (data + SW1 SW2).

        Never raises for anything the host sent: a malformed APDU is answered with a
        status word (ISO 7816-4 §5.6), so that an exception here is always a bug.
        """
        ...


class KeyedCard(Protocol):
    """A card (or a wrapper around one) that wants to know which APDUs carry PIN digits
    typed on the reader's keypad (PC_to_RDR_Secure): a trace must redact all their data,
    whatever the instruction."""

    def transmit_keyed(self, command: bytes) -> bytes: ...


def transmit_keyed(card: Card, command: bytes) -> bytes:
    """``card.transmit(command)`` for an APDU built by the reader's PIN pad: through the
    card's ``transmit_keyed`` when it has one (the tracing wrappers do), else as usual."""
    keyed = getattr(type(card), "transmit_keyed", None)
    if keyed is not None:
        response: bytes = keyed(card, command)
        return response
    return card.transmit(command)
