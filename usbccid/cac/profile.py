"""What a CAC card is made of: its containers, keys, PIN policy and persistent PIN state.

The card emulation (``usbccid.cac.card``) takes a :class:`CardProfile`; where profiles come
from (generated default cards, PEM/DER/PKCS#12 files) is ``usbccid.cards.provision``. The
card never touches the disk itself: it saves its PIN state through an injected
:class:`PinStateStore`, before it answers the APDU that changed it.

A card can also mirror an external token (a PKCS#11 token, an NSS database; libcacard's
``use_hw``): a :class:`TokenCardProfile` whose containers hold a :class:`ContainerKey`
handle instead of key material, and whose PIN is the token's login (:class:`TokenLogin`).
Both protocols are implemented outside this sans-IO layer (``usbccid.cards``); their
methods may do slow I/O, so a card built from a token profile runs off the event loop
(``blocking``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.rsa_raw import SoftwareKey


class ContainerKey(Protocol):
    """The private half of a container: what the PKI applet's SIGN/DECRYPT needs."""

    @property
    def key_size(self) -> int:
        """The modulus length in bits."""
        ...

    def public_key(self) -> rsa.RSAPublicKey: ...

    def raw_rsa(self, block: bytes) -> bytes:
        """``block^d mod n`` (RFC 8017 RSADP/RSASP1) as a modulus-sized string.

        Raises:
            usbccid.cac.errors.CardError: with the status word for the host (67 00 wrong
                length, 6A 80 out of range, 69 82 token not logged in, ...).
        """
        ...


@dataclass(frozen=True)
class Container:
    """One PKI container (GSC-IS 2.1 §5.3): a certificate and its private key."""

    label: str
    certificate: x509.Certificate
    private_key: rsa.RSAPrivateKey

    @property
    def key(self) -> ContainerKey:
        return SoftwareKey(self.private_key)


@dataclass(frozen=True)
class TokenContainer:
    """A PKI container whose private key stays on a token: ``key`` is only a handle."""

    label: str
    certificate: x509.Certificate
    key: ContainerKey


@dataclass(frozen=True)
class TokenPinInfo:
    """The token's view of its user PIN (PKCS#11 ``CK_TOKEN_INFO.flags``, v2.40 §3.2).

    PKCS#11 reports no number of tries left, only these flags.
    """

    login_required: bool  # CKF_LOGIN_REQUIRED
    count_low: bool = False  # CKF_USER_PIN_COUNT_LOW: a wrong PIN since the last login
    final_try: bool = False  # CKF_USER_PIN_FINAL_TRY
    locked: bool = False  # CKF_USER_PIN_LOCKED
    logged_in: bool | None = None  # the token's user is logged in now (None: unknown)


class TokenLogin(Protocol):
    """The card PIN of a mirrored token is the token's own user login (C_Login).

    Implementations translate token failures other than a wrong PIN into
    :class:`~usbccid.cac.errors.CardError` (for example 69 83 when the PIN is locked).
    """

    def pin_info(self) -> TokenPinInfo: ...

    def login(self, pin: bytes) -> bool:
        """Log the token's user in with ``pin``; False when the token says it is wrong."""
        ...

    def logout(self) -> None:
        """Log out (idempotent); handles of private objects become invalid."""
        ...


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


@dataclass(frozen=True)
class TokenCardProfile:
    """A card that mirrors a token: its keys stay there, its PIN is the token's login."""

    card_id: bytes
    containers: tuple[TokenContainer, ...]
    login: TokenLogin


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
