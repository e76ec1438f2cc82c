"""What every card source gives the rest of the program: a :class:`LoadedCard`.

A card source (one module of ``usbccid.cards`` each: ``stored``, ``files``; the registry
in ``usbccid.cards.registry`` maps a slot's kind to it) turns its part of the
configuration into a :class:`LoadedCard`: something that can make a fresh
:class:`usbccid.card.Card` for each insertion, describe itself to a human, and tell
whether a reload changed it. Failures are one :class:`CardLoadError` line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from cryptography.hazmat.primitives import hashes

from usbccid.cac.profile import CardProfile, PinStateStore
from usbccid.card import Card
from usbccid.errors import UsbccidError


class CardLoadError(UsbccidError):
    """A configured card cannot be built (unreadable key, wrong passphrase...). One line."""


class LoadedCard(Protocol):
    """A card ready to be inserted into a reader slot."""

    @property
    def description(self) -> str:
        """For a human: 'stored card "default" (3 containers)'."""
        ...

    @property
    def ca_file(self) -> Path | None:
        """The test CA certificate a host should trust, when there is one."""
        ...

    @property
    def current_pin(self) -> str | None:
        """The PIN as it is now (for the banner of test cards), or None if not ours to tell."""
        ...

    def new_card(self) -> Card:
        """A fresh card object for one insertion."""
        ...

    def same_card(self, other: LoadedCard) -> bool:
        """Whether ``other`` (a reload of the configuration) is this same card."""
        ...

    @property
    def place(self) -> object | None:
        """Where the card's state lives, hashable: two slots never hold cards with equal
        places at once (they would share one PIN retry counter, one token login, one real
        card). None: nothing to share."""
        ...


@runtime_checkable
class LiveCard(LoadedCard, Protocol):
    """A card that comes and goes by itself: a real card in a PC/SC reader, a token.

    The composition root asks :meth:`wait_presence` once when it builds the slot (the
    card is inserted at once if it is there), then over and over on a worker thread,
    and inserts or removes the card as it answers.
    """

    def wait_presence(self, known: bool | None, timeout: float) -> bool:
        """Whether the card is there: at once when ``known`` is None, else once it
        differs from ``known``, or after about ``timeout`` seconds. Blocks; never raises.
        A card replaced by another between two calls is reported absent once."""
        ...

    @property
    def absence_reason(self) -> str:
        """Why the card is not there (for the log)."""
        ...

    def close(self) -> None:
        """Let go of the card and its connections (the server stops, a reload)."""
        ...


@dataclass(frozen=True)
class EmulatedCac:
    """A CAC emulated by ``usbccid.cac`` from a profile, its PIN state kept in ``pin_store``."""

    profile: CardProfile
    pin_store: PinStateStore
    description: str
    ca_file: Path | None = None

    @property
    def current_pin(self) -> str:
        state = self.pin_store.load()
        pin = state.pin if state is not None else self.profile.pin_policy.pin
        return pin.decode("ascii", "replace")

    def new_card(self) -> Card:
        from usbccid.cac.card import CacCard

        return CacCard(self.profile, self.pin_store)

    def same_card(self, other: LoadedCard) -> bool:
        # key objects do not compare equal: compare what defines the card instead
        return isinstance(other, EmulatedCac) and _profile_key(self.profile) == _profile_key(
            other.profile
        )

    @property
    def place(self) -> object:
        return pin_state_place(self.pin_store, self.profile.card_id)


def pin_state_place(store: PinStateStore, card_id: bytes) -> object:
    """An emulated card's place: its PIN state file (a stored card's directory), or its
    card ID when the state has no file of its own."""
    path = getattr(store, "path", None)
    if isinstance(path, Path):
        return ("pin-state", Path(os.path.abspath(path)))
    return ("card-id", card_id)


def _profile_key(p: CardProfile) -> tuple[object, ...]:
    return (
        p.card_id,
        p.pin_policy,
        tuple((c.label, c.certificate.fingerprint(hashes.SHA256())) for c in p.containers),
    )


def plural(n: int, word: str) -> str:
    """``plural(1, "container")`` -> "1 container"; ``plural(3, ...)`` -> "3 containers"."""
    return f"{n} {word}{'s' * (n != 1)}"
