"""What a CAC card is made of: its containers, keys, PIN policy and persistent PIN state.

The card emulation (``usbccid.cac.card``) takes a :class:`CardProfile`; where profiles come
from (generated default cards, PEM/DER/PKCS#12 files) is ``usbccid.cards.provision``. The
card never touches the disk itself: it saves its PIN state through an injected
:class:`PinStateStore`, before it answers the APDU that changed it.
"""

from __future__ import annotations

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
    #: the unblock code once changed on the card (PIV CHANGE REFERENCE DATA of the PUK);
    #: None: still the policy's
    unblock_code: bytes | None = None


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


class MemoryPinStateStore:
    """A :class:`PinStateStore` that keeps the state in memory (tests, throwaway cards)."""

    def __init__(self, state: PinState | None = None) -> None:
        self._state = state

    def load(self) -> PinState | None:
        return self._state

    def save(self, state: PinState) -> None:
        self._state = state
