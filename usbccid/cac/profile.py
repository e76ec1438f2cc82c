"""What a CAC card is made of: its containers, keys, PIN policy and persistent PIN state.

The card emulation (``usbccid.cac.card``) takes a :class:`CardProfile`; where profiles come
from (generated default cards, PEM/DER/PKCS#12 files) is ``usbccid.cards.provision``. The
card never touches the disk itself: it saves its PIN state through an injected
:class:`PinStateStore`, before it answers the APDU that changed it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True)
class Container:
    """One PKI container (GSC-IS 2.1 §5.3): a certificate and its private key."""

    label: str
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey


@dataclass(frozen=True)
class PinPolicy:
    """The card's one global PIN and its unblock code (PUK), with their retry limits."""

    pin: bytes
    unblock_code: bytes
    max_tries: int = 3
    max_unblock_tries: int = 10


@dataclass(frozen=True)
class PinState:
    """The mutable part of the PIN: survives power cycles and server restarts."""

    pin: bytes
    tries_left: int
    unblock_tries_left: int


@dataclass(frozen=True)
class CardProfile:
    """Everything that defines one card."""

    card_id: bytes  # unique per card; appears in the CCC card identifier
    containers: tuple[Container, ...]
    pin_policy: PinPolicy


class PinStateStore(Protocol):
    def load(self) -> PinState | None:
        """The saved state, or None when there is none yet (a new card)."""
        ...

    def save(self, state: PinState) -> None:
        """Persist ``state`` atomically; when this returns, a crash cannot lose it."""
        ...

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the card's one lock: every read-compare-write of the counters runs inside
        it, so two card objects over the same state (two threads, two processes) take
        turns and each sees the other's decrement. Not re-entrant."""
        ...


class MemoryPinStateStore:
    """A :class:`PinStateStore` that keeps the state in memory (tests, throwaway cards)."""

    def __init__(self, state: PinState | None = None) -> None:
        self._state = state

    def load(self) -> PinState | None:
        return self._state

    def save(self, state: PinState) -> None:
        self._state = state

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        # One object, used by one card from one thread: nothing to take turns with.
        yield
