"""What every card source gives the rest of the program: a :class:`LoadedCard`.

A card source (one module of ``usbccid.cards`` each: ``stored``, ``files``; the registry
in ``usbccid.cards.registry`` maps a slot's kind to it) turns its part of the
configuration into a :class:`LoadedCard`: something that can make a fresh
:class:`usbccid.card.Card` for each insertion, describe itself to a human, and tell
whether a reload changed it. Failures are one :class:`CardLoadError` line.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
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


class CardChange(enum.Enum):
    """What a watched card's source saw happen to the card (a token left or came back)."""

    REMOVED = "removed"
    INSERTED = "inserted"


@runtime_checkable
class WatchedCard(Protocol):
    """A loaded card that comes and goes by itself (a token in a slot): the composition
    root calls :meth:`poll` every ``poll_interval`` seconds, off the event loop, and
    removes or inserts the card in its slot accordingly."""

    @property
    def poll_interval(self) -> float | None:
        """Seconds between polls; None: not watched."""
        ...

    def poll(self) -> Sequence[CardChange]:
        """Look (slow I/O: call it on a worker thread); the changes since the last poll."""
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


def _profile_key(p: CardProfile) -> tuple[object, ...]:
    return (
        p.card_id,
        p.pin_policy,
        tuple((c.label, c.certificate.fingerprint(hashes.SHA256())) for c in p.containers),
    )


def plural(n: int, word: str) -> str:
    """``plural(1, "container")`` -> "1 container"; ``plural(3, ...)`` -> "3 containers"."""
    return f"{n} {word}{'s' * (n != 1)}"
