"""Cards with a PIV edge (``edges`` "piv" or "cac+piv"), as the other modules load them.

:class:`EmulatedPiv` is the :class:`~usbccid.cards.source.LoadedCard` of a card whose
edges include PIV: each insertion gets a fresh :class:`usbccid.piv.card.PivCard`
(``piv``) or :class:`usbccid.piv.dual.DualCard` (``cac+piv``), its PIN state in the store
a CAC card would use (``pin-state.json`` of a stored card, ``pin-state/<card id>.json``
of a card from files). :func:`emulated` picks the loaded card for a card's edges: a plain
CAC stays :class:`~usbccid.cards.source.EmulatedCac`, exactly as before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from usbccid.cac.profile import CardProfile, PinStateStore
from usbccid.card import Card
from usbccid.cards.provision import DEFAULT_EDGES
from usbccid.cards.source import EmulatedCac, LoadedCard, pin_state_place, plural
from usbccid.piv.profile import PivProfile, PivSlot


@dataclass(frozen=True)
class EmulatedPiv:
    """A card with a PIV edge; ``cac`` holds its card ID, PIN policy and (for "cac+piv")
    its CAC containers."""

    cac: CardProfile
    piv_slots: tuple[PivSlot, ...]
    edges: str
    pin_store: PinStateStore
    description: str
    ca_file: Path | None = None

    @property
    def piv(self) -> PivProfile:
        return PivProfile(
            card_id=self.cac.card_id, slots=self.piv_slots, pin_policy=self.cac.pin_policy
        )

    @property
    def current_pin(self) -> str:
        state = self.pin_store.load()
        pin = state.pin if state is not None else self.cac.pin_policy.pin
        return pin.decode("ascii", "replace")

    def new_card(self) -> Card:
        from usbccid.piv.card import PivCard
        from usbccid.piv.dual import DualCard

        if self.edges == "cac+piv":
            return DualCard(self.cac, self.piv, self.pin_store)
        return PivCard(self.piv, self.pin_store)

    def same_card(self, other: LoadedCard) -> bool:
        return isinstance(other, EmulatedPiv) and _key(self) == _key(other)

    @property
    def place(self) -> object:
        return pin_state_place(self.pin_store, self.cac.card_id)


def _key(card: EmulatedPiv) -> tuple[object, ...]:
    p = card.cac
    return (
        card.edges,
        p.card_id,
        p.pin_policy,
        tuple((c.label, c.certificate.fingerprint(hashes.SHA256())) for c in p.containers),
        tuple((s.ref, s.certificate.fingerprint(hashes.SHA256())) for s in card.piv_slots),
    )


def describe(edges: str, containers: int, piv_keys: int) -> str:
    """'3 containers', 'PIV, 4 keys', 'CAC+PIV, 3 containers, 4 PIV keys'."""
    if edges == DEFAULT_EDGES:
        return plural(containers, "container")
    if edges == "piv":
        return f"PIV, {plural(piv_keys, 'key')}"
    return f"CAC+PIV, {plural(containers, 'container')}, {plural(piv_keys, 'PIV key')}"


def emulated(
    profile: CardProfile,
    piv_slots: tuple[PivSlot, ...],
    edges: str,
    pin_store: PinStateStore,
    description: str,
    ca_file: Path | None = None,
) -> EmulatedCac | EmulatedPiv:
    """The loaded card for a card with these edges."""
    if edges == DEFAULT_EDGES:
        return EmulatedCac(profile, pin_store, description, ca_file)
    return EmulatedPiv(profile, piv_slots, edges, pin_store, description, ca_file)
