"""Fixtures for the PIV card tests: throwaway keys, certificates and cards.

The default card holds one key of every algorithm PIV tests need: 9A RSA-2048, 9C ECC
P-256, 9D ECC P-384 (key agreement), 9E RSA-1024 (card authentication, no PIN) and a
retired key 82 (P-256). Certificates use fixed dates, so nothing reads the clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tests.piv.helpers import Session
from usbccid.cac.profile import MemoryPinStateStore, PinPolicy
from usbccid.piv.card import PivCard
from usbccid.piv.keys import PivPrivateKey
from usbccid.piv.profile import PivProfile, PivSlot

PIN = b"12345678"
PUK = b"87654321"
CARD_ID = bytes.fromhex("00112233445566778899AABBCCDDEEFF")
NOT_AFTER = datetime.datetime(2036, 1, 1, tzinfo=datetime.UTC)

_KEYS: dict[str, PivPrivateKey] = {}


def key(kind: str) -> PivPrivateKey:
    """A cached test key: "rsa1024", "rsa2048", "rsa4096", "p256", "p384" (+ "-2"...)."""
    if kind not in _KEYS:
        base = kind.split("-")[0]
        if base == "p256":
            _KEYS[kind] = ec.generate_private_key(ec.SECP256R1())
        elif base == "p384":
            _KEYS[kind] = ec.generate_private_key(ec.SECP384R1())
        else:
            _KEYS[kind] = rsa.generate_private_key(65537, int(base.removeprefix("rsa")))
    return _KEYS[kind]


def certificate(private_key: PivPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(0x1234 + len(cn))
        .not_valid_before(datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC))
        .not_valid_after(NOT_AFTER)
        .sign(private_key, hashes.SHA256())
    )


def slot(ref: int, kind: str) -> PivSlot:
    k = key(kind)
    return PivSlot(ref, certificate(k, f"PIV TEST {ref:02X}"), k)


def make_profile(
    slots: list[tuple[int, str]] | None = None, *, max_tries: int = 3, max_unblock_tries: int = 10
) -> PivProfile:
    chosen = slots or [
        (0x9A, "rsa2048"),
        (0x9C, "p256"),
        (0x9D, "p384"),
        (0x9E, "rsa1024"),
        (0x82, "p256-2"),
    ]
    return PivProfile(
        card_id=CARD_ID,
        slots=tuple(slot(ref, kind) for ref, kind in chosen),
        pin_policy=PinPolicy(PIN, PUK, max_tries, max_unblock_tries),
    )


def counting_random() -> Callable[[int], bytes]:
    state = [0]

    def random_bytes(n: int) -> bytes:
        out = bytes((state[0] + i + 1) & 0xFF for i in range(n))
        state[0] += n
        return out

    return random_bytes


@pytest.fixture(scope="session")
def profile() -> PivProfile:
    return make_profile()


@pytest.fixture
def store() -> MemoryPinStateStore:
    return MemoryPinStateStore()


@pytest.fixture
def card(profile: PivProfile, store: MemoryPinStateStore) -> PivCard:
    c = PivCard(profile, store, random_bytes=counting_random())
    c.power_on()
    return c


@pytest.fixture
def s(card: PivCard) -> Session:
    return Session(card)
