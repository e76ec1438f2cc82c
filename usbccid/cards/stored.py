"""Stored cards: a card of the state directory (``card = "NAME"``, ``"default"`` included).

The card lives in ``<state>/cards/NAME/`` (``usbccid.cards.store``); the first use of a
name that does not exist yet generates it (a test card under a throwaway test CA). Its PIN
state is ``<state>/cards/NAME/pin-state.json``.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from usbccid.cards.source import EmulatedCac, plural
from usbccid.cards.store import load_or_create_card


def load(name: str, state_dir: Path, now: datetime) -> EmulatedCac:
    """The stored card ``name``, generated on first use.

    Raises:
        usbccid.cards.store.StateError: the state directory or the card is unusable.
    """
    card, store = load_or_create_card(state_dir, now, name=name)
    ca = store.path.parent / "ca.pem" if card.ca_certificate is not None else None
    return EmulatedCac(
        profile=card.profile,
        pin_store=store,
        description=f'stored card "{name}" ({plural(len(card.profile.containers), "container")})',
        ca_file=ca,
    )
