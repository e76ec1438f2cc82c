"""A card operation the CCID reader hands to its driver (see :mod:`usbccid.jobs`).

The reader never calls the card itself: power-on, power-off and every APDU become a
:class:`CardJob` that the driver runs (``run()``, possibly on another thread: it touches
nothing but the card) and then hands back (``finish()``, on the driver's thread).
"""

from __future__ import annotations

import enum
from typing import Protocol

from usbccid.card import Card, transmit_keyed
from usbccid.ccid.slot import SlotState
from usbccid.ccid.wire import PcToRdr


class _Finisher(Protocol):
    def _finish(self, job: CardJob) -> None: ...


class CardOp(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    POWER_ON = enum.auto()
    POWER_OFF = enum.auto()
    TRANSMIT = enum.auto()


#: the command whose reply a job's result becomes
OP_MESSAGE = {
    CardOp.POWER_ON: PcToRdr.ICC_POWER_ON,
    CardOp.POWER_OFF: PcToRdr.ICC_POWER_OFF,
    CardOp.TRANSMIT: PcToRdr.XFR_BLOCK,
}


class CardJob:
    """One card operation for one slot, run by the driver (see :mod:`usbccid.jobs`)."""

    def __init__(
        self,
        reader: _Finisher,
        *,
        epoch: int,
        slot: int,
        generation: int,
        seq: int,
        op: CardOp,
        card: Card,
        next_state: SlotState,
        apdu: bytes = b"",
        keyed: bool = False,
    ) -> None:
        self._reader = reader
        self.epoch = epoch
        self.slot = slot
        self.generation = generation
        self.seq = seq
        self.op = op
        self.card = card
        self.next_state = next_state
        self.apdu = apdu
        self.keyed = keyed  # the APDU holds PIN digits from the keypad (PC_to_RDR_Secure)
        self.result: bytes | None = None
        self.exception: BaseException | None = None
        self.started = False
        self.aborted = False

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def run(self) -> None:
        """Call the card. Touches nothing but the card; may run on another thread."""
        try:
            if self.op is CardOp.POWER_ON:
                self.result = self.card.power_on()
            elif self.op is CardOp.POWER_OFF:
                self.card.power_off()
                self.result = b""
            elif self.keyed:
                self.result = transmit_keyed(self.card, self.apdu)
            else:
                self.result = self.card.transmit(self.apdu)
        except Exception as exc:  # a card bug must not leave the host waiting forever
            self.exception = exc

    def finish(self) -> None:
        """Hand the result to the reader (on the driver's thread)."""
        self._reader._finish(self)

    def __repr__(self) -> str:
        keyed = " keyed" if self.keyed else ""
        return f"<CardJob slot={self.slot} seq={self.seq} {self.op.name}{keyed}>"
