"""Stored cards: a card of the state directory (``card = "NAME"``, ``"default"`` included).

The card lives in ``<state>/cards/NAME/`` (``usbccid.cards.store``); the first use of a
name that does not exist yet generates it (a test card under a throwaway test CA). Its PIN
state is ``<state>/cards/NAME/pin-state.json``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from usbccid.cards.piv import EmulatedPiv, describe, emulated
from usbccid.cards.source import EmulatedCac
from usbccid.cards.store import load_or_create_card


def load(name: str, state_dir: Path, now: datetime) -> EmulatedCac | EmulatedPiv:
    """The stored card ``name``, generated on first use (a CAC: ``usbccid card new --piv``
    makes PIV cards).

    Raises:
        usbccid.cards.store.StateError: the state directory or the card is unusable.
    """
    card, store = load_or_create_card(state_dir, now, name=name)
    ca = store.path.parent / "ca.pem" if card.ca_certificate is not None else None
    what = describe(card.edges, len(card.profile.containers), len(card.piv_slots))
    return emulated(
        card.profile, card.piv_slots, card.edges, store, f'stored card "{name}" ({what})', ca
    )
