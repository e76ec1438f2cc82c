"""Fixtures for the CAC card tests: throwaway RSA keys, self-signed certificates, cards.

Keys are generated once per session (RSA-1024 for speed, RSA-2048 where a test replays
the real 2048-bit traces). Certificates use fixed dates, so nothing reads the clock.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.cac.helpers import Session
from usbccid.cac.card import CacCard
from usbccid.cac.profile import CardProfile, Container, MemoryPinStateStore, PinPolicy

PIN = b"12345678"
UNBLOCK_CODE = b"87654321"
CARD_ID = bytes.fromhex("00112233445566778899AABBCCDDEEFF")

_NOT_BEFORE = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
_NOT_AFTER = datetime.datetime(2036, 1, 1, tzinfo=datetime.UTC)

_KEYS: dict[tuple[int, int], rsa.RSAPrivateKey] = {}


def rsa_key(bits: int, n: int = 0) -> rsa.RSAPrivateKey:
    """The ``n``-th cached test key of ``bits`` bits (generated on first use)."""
    if (bits, n) not in _KEYS:
        _KEYS[bits, n] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[bits, n]


def self_signed(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "OpenSC"),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(0x464CF7111E4D15BAFC1D4BF1B3EB2C6267CC450C + key.key_size)
        .not_valid_before(_NOT_BEFORE)
        .not_valid_after(_NOT_AFTER)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )


def make_profile(
    bits: list[int],
    *,
    card_id: bytes = CARD_ID,
    max_tries: int = 3,
    max_unblock_tries: int = 10,
) -> CardProfile:
    containers = []
    for i, b in enumerate(bits):
        key = rsa_key(b, i)
        containers.append(Container(f"Container {i}", self_signed(key, f"TEST.CARD.{i}"), key))
    policy = PinPolicy(PIN, UNBLOCK_CODE, max_tries, max_unblock_tries)
    return CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)


def counting_random() -> Callable[[int], bytes]:
    """A deterministic stand-in for secrets.token_bytes: 01 02 03 ..."""
    state = [0]

    def random_bytes(n: int) -> bytes:
        out = bytes((state[0] + i + 1) & 0xFF for i in range(n))
        state[0] += n
        return out

    return random_bytes


@pytest.fixture(scope="session")
def profile_2048() -> CardProfile:
    """Three RSA-2048 containers, PIN 12345678: the card of the virt_cacard traces."""
    return make_profile([2048, 2048, 2048])


@pytest.fixture(scope="session")
def profile_1024() -> CardProfile:
    return make_profile([1024, 1024, 1024])


@pytest.fixture
def store() -> MemoryPinStateStore:
    return MemoryPinStateStore()


@pytest.fixture
def card(profile_2048: CardProfile, store: MemoryPinStateStore) -> Iterator[CacCard]:
    c = CacCard(profile_2048, store, random_bytes=counting_random())
    c.power_on()
    yield c
    c.power_off()


@pytest.fixture
def card_1024(profile_1024: CardProfile, store: MemoryPinStateStore) -> CacCard:
    c = CacCard(profile_1024, store, random_bytes=counting_random())
    c.power_on()
    return c


@pytest.fixture
def s(card: CacCard) -> Session:
    return Session(card)


@pytest.fixture
def s1024(card_1024: CacCard) -> Session:
    return Session(card_1024)
