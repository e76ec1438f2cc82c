"""A card with both edges, CAC and PIV (profile ``cac+piv``): what a DoD CAC is.

:class:`DualCard` implements :class:`usbccid.card.Card` over a
:class:`~usbccid.cac.card.CacCard` and a :class:`~usbccid.piv.card.PivCard` sharing one
card ID and one PIN state (the CAC PIN is the PIV Card Application PIN, the unblock code
its PUK). After a reset the CAC edge answers, exactly as a ``cac`` card would; SELECT of
the PIV AID switches to the PIV edge, SELECT of a CAC applet back (any other SELECT by AID
goes to the CAC edge, which answers ``6A 82`` for an AID it does not know). :data:`ROUTES`
is the table: (active edge, kind of command) -> (edge that answers, whether it becomes
active).

Switching edges loses the security status of the edge left (OpenSC's card-piv.c knows
this of dual cards: ``CI_PIV_AID_LOSE_STATE``, ``CI_OTHER_AID_LOSE_STATE``) and re-reads
the PIN state, which the other edge may have changed: the PIV edge reloads it, the CAC
edge is a fresh :class:`CacCard` (which loads it when made). A SELECT that fails switches
nothing.

Through PIV GET DATA the Card Capability Container is a PIV one (the card ID is the same).
Dual cards of the SP 800-73-1 era showed the CAC's CCC there, and OpenSC's PIV driver,
finding CAC PKI CardURLs in it, calls such a card ``PIV_II_*_DUAL_CAC`` and works around
their PIV applets' gaps (card-piv.c ``piv_match_card_continued``: no random numbers, no
Discovery Object, VERIFY status unusable). Our PIV edge is a full SP 800-73-4 one, so its
CCC lets OpenSC use all of it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from enum import Enum

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.card import ATR_VCARD_NSS, CacCard
from usbccid.cac.errors import ApduFormatError
from usbccid.cac.profile import CardProfile, PinStateStore
from usbccid.piv.application import INS_SELECT
from usbccid.piv.card import PivCard
from usbccid.piv.objects import PIV_AID, PIV_AID_SHORT
from usbccid.piv.profile import PivProfile


class Edge(Enum):
    CAC = "cac"
    PIV = "piv"


class Kind(Enum):
    SELECT_PIV = "SELECT of the PIV AID"
    SELECT_OTHER = "SELECT of another AID (a CAC applet, or nothing)"
    OTHER = "anything else"


#: (active edge, command) -> (the edge that answers, switch to it if the command succeeds)
ROUTES: dict[tuple[Edge, Kind], tuple[Edge, bool]] = {
    (Edge.CAC, Kind.SELECT_PIV): (Edge.PIV, True),
    (Edge.CAC, Kind.SELECT_OTHER): (Edge.CAC, False),
    (Edge.CAC, Kind.OTHER): (Edge.CAC, False),
    (Edge.PIV, Kind.SELECT_PIV): (Edge.PIV, False),
    (Edge.PIV, Kind.SELECT_OTHER): (Edge.CAC, True),
    (Edge.PIV, Kind.OTHER): (Edge.PIV, False),
}


def _succeeded(response: bytes) -> bool:
    return response[-2:] == b"\x90\x00" or response[-2:-1] == b"\x61"


class DualCard:
    """The ``cac+piv`` card; ``piv`` shares ``cac``'s card ID and PIN policy."""

    def __init__(
        self,
        cac: CardProfile,
        piv: PivProfile,
        pin_store: PinStateStore,
        *,
        atr: bytes = ATR_VCARD_NSS,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if piv.card_id != cac.card_id or piv.pin_policy != cac.pin_policy:
            raise ValueError("both edges are one card: one card ID, one PIN")
        self.atr = atr
        self._cac_args = (cac, pin_store, atr, random_bytes)
        self.cac = self._new_cac()
        self.piv = PivCard(piv, pin_store, atr=atr, random_bytes=random_bytes)
        self.active = Edge.CAC

    def _new_cac(self) -> CacCard:
        profile, store, atr, random_bytes = self._cac_args
        return CacCard(profile, store, atr=atr, random_bytes=random_bytes)

    # -- Card protocol ------------------------------------------------------------

    @property
    def blocking(self) -> bool:
        return self.cac.blocking or self.piv.blocking

    def power_on(self) -> bytes:
        self._reset()
        return self.atr

    def power_off(self) -> None:
        self._reset()

    def transmit(self, command: bytes) -> bytes:
        target, switch = ROUTES[self.active, self.classify(command)]
        if target is self.active:
            return self._edge(target).transmit(command)
        # Switching: the edge we go to starts from a reset with the current PIN state.
        if target is Edge.PIV:
            self.piv.reload()
            response = self.piv.transmit(command)
            if switch and _succeeded(response):
                self.active = Edge.PIV
            return response
        fresh = self._new_cac()
        fresh.power_on()
        response = fresh.transmit(command)
        if switch and _succeeded(response):
            self.cac = fresh
            self.active = Edge.CAC
            self.piv.reset()
        return response

    # -- routing --------------------------------------------------------------------

    def classify(self, command: bytes) -> Kind:
        """What kind of command ``command`` is, for :data:`ROUTES`."""
        if len(command) < 5 or command[1] != INS_SELECT or command[2] != 0x04:
            return Kind.OTHER
        try:
            apdu = CommandApdu.parse(command)
        except ApduFormatError:
            return Kind.OTHER
        if apdu.chained:
            return Kind.OTHER
        return Kind.SELECT_PIV if apdu.data in (PIV_AID, PIV_AID_SHORT) else Kind.SELECT_OTHER

    def _edge(self, edge: Edge) -> CacCard | PivCard:
        return self.cac if edge is Edge.CAC else self.piv

    def _reset(self) -> None:
        if self.active is Edge.PIV:
            self.cac = self._new_cac()  # its PIN state may be stale
        self.cac.power_on()
        self.piv.reload()
        self.active = Edge.CAC
