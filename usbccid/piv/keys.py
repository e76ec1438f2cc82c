"""PIV key references and algorithms, and the private-key operations behind them.

Two tables a test enumerates:

* :data:`ALGORITHMS` — algorithm identifiers (SP 800-78-4 Table 6-2, P1 of GENERAL
  AUTHENTICATE): ``06`` RSA 1024, ``07`` RSA 2048, ``05`` RSA 3072 (SP 800-78-5), ``16``
  RSA 4096 (not NIST: Yubico's identifier, which OpenSC 0.26 also knows), ``11`` ECC P-256,
  ``14`` ECC P-384; ``00``/``03`` three-key Triple DES for the card management key.
* :data:`KEY_REFERENCES` — key references (SP 800-73-4 Part 1 Table 4b, P2): ``9A`` PIV
  Authentication (PIN), ``9C`` Digital Signature (PIN Always), ``9D`` Key Management
  (PIN), ``9E`` Card Authentication (Always: no PIN), ``82``-``95`` Retired Key Management
  1-20 (PIN), ``9B`` PIV Card Application Administration (the card management key).

The operations (SP 800-73-4 Part 2 §3.2.4 and Appendix A):

* RSA: the host sends a modulus-sized, already padded block; the card answers the raw
  private-key operation (signature or decryption alike), modulus-sized;
* ECDSA: the host sends the hash; the card answers the DER ``Ecdsa-Sig-Value``
  (SEQUENCE { r, s }, RFC 5480 §2.2 / X9.62);
* ECDH (tag 85): the host sends the peer's public point (uncompressed, SP 800-73-4 Part 2
  §A.5); the card answers the shared secret ``Z``, the x-coordinate, field-sized
  (SP 800-56A §5.7.1.2).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa, utils

from usbccid.cac.rsa_raw import rsa_private_raw
from usbccid.cac.sw import SW
from usbccid.piv.errors import PivError

PivPrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


class KeyKind(Enum):
    RSA = "rsa"
    EC = "ec"
    TDES = "3des"


@dataclass(frozen=True)
class Algorithm:
    """One algorithm identifier: what kind of key, how big, which curve."""

    ident: int
    name: str
    kind: KeyKind
    bits: int
    curve: str | None = None  # cryptography's curve name (secp256r1, secp384r1)

    @property
    def size(self) -> int:
        """The size in bytes of a modulus (RSA) or of a field element (EC)."""
        return (self.bits + 7) // 8


ALGORITHMS: dict[int, Algorithm] = {
    a.ident: a
    for a in (
        Algorithm(0x00, "3DES", KeyKind.TDES, 192),  # SP 800-78-4: '00' (deprecated form)
        Algorithm(0x03, "3DES", KeyKind.TDES, 192),
        Algorithm(0x06, "RSA 1024", KeyKind.RSA, 1024),
        Algorithm(0x07, "RSA 2048", KeyKind.RSA, 2048),
        Algorithm(0x05, "RSA 3072", KeyKind.RSA, 3072),
        Algorithm(0x16, "RSA 4096", KeyKind.RSA, 4096),
        Algorithm(0x11, "ECC P-256", KeyKind.EC, 256, "secp256r1"),
        Algorithm(0x14, "ECC P-384", KeyKind.EC, 384, "secp384r1"),
    )
}
RSA_ALGORITHMS: dict[int, int] = {
    a.bits: a.ident for a in ALGORITHMS.values() if a.kind is KeyKind.RSA
}
EC_ALGORITHMS: dict[str, int] = {
    a.curve: a.ident for a in ALGORITHMS.values() if a.kind is KeyKind.EC and a.curve
}


class Access(Enum):
    """Access rules of SP 800-73-4 Part 1 Table 4b / Table 3."""

    ALWAYS = "always"
    PIN = "pin"
    PIN_ALWAYS = "pin always"  # the PIN verified again before every use
    ADMIN = "card management key"  # never satisfied: we implement no admin authentication


@dataclass(frozen=True)
class KeyReference:
    ref: int
    name: str
    access: Access
    #: the certificate object holding this key's certificate (SP 800-73-4 Part 1 Table 3)
    certificate_tag: int | None


CARD_MANAGEMENT_KEY = 0x9B
PIV_AUTHENTICATION = 0x9A
DIGITAL_SIGNATURE = 0x9C
KEY_MANAGEMENT = 0x9D
CARD_AUTHENTICATION = 0x9E
RETIRED_FIRST = 0x82
RETIRED_COUNT = 20

KEY_REFERENCES: dict[int, KeyReference] = {
    k.ref: k
    for k in (
        KeyReference(0x9A, "PIV Authentication", Access.PIN, 0x5FC105),
        KeyReference(0x9B, "PIV Card Application Administration", Access.ADMIN, None),
        KeyReference(0x9C, "Digital Signature", Access.PIN_ALWAYS, 0x5FC10A),
        KeyReference(0x9D, "Key Management", Access.PIN, 0x5FC10B),
        KeyReference(0x9E, "Card Authentication", Access.ALWAYS, 0x5FC101),
        *(
            KeyReference(
                RETIRED_FIRST + i, f"Retired Key Management {i + 1}", Access.PIN, 0x5FC10D + i
            )
            for i in range(RETIRED_COUNT)
        ),
    )
}
#: The key references that hold an asymmetric key of the cardholder (all but 9B).
ASYMMETRIC_REFERENCES = tuple(r for r in KEY_REFERENCES if r != CARD_MANAGEMENT_KEY)


def algorithm_of(key: PivPrivateKey) -> Algorithm:
    """The algorithm identifier of ``key``; ValueError if PIV has none for it."""
    if isinstance(key, rsa.RSAPrivateKey):
        ident = RSA_ALGORITHMS.get(key.key_size)
        if ident is None:
            raise ValueError(f"PIV has no algorithm for {key.key_size}-bit RSA")
        return ALGORITHMS[ident]
    if isinstance(key, ec.EllipticCurvePrivateKey):
        ident = EC_ALGORITHMS.get(key.curve.name)
        if ident is None:
            raise ValueError(f"PIV has no algorithm for the curve {key.curve.name}")
        return ALGORITHMS[ident]
    raise ValueError("PIV keys are RSA or EC")


_HASH_FOR_SIZE = {32: hashes.SHA256(), 48: hashes.SHA384()}


def rsa_operation(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """The raw RSA private-key operation on a modulus-sized block (RFC 8017 §5.1.2)."""
    if len(block) != (key.key_size + 7) // 8:
        raise PivError(SW.INCORRECT_DATA, "RSA input is not modulus-sized")
    return rsa_private_raw(key, block)


def ecdsa_sign(key: ec.EllipticCurvePrivateKey, digest: bytes) -> bytes:
    """ECDSA over a hash computed by the host: the DER signature (X9.62, RFC 5480 §2.2).

    A hash shorter than the field is an integer all the same (FIPS 186-4 §6.4: ``e`` is
    the leftmost bits of the hash, as an integer), so it is left-padded with zeros; a
    longer one keeps its leftmost field-size bytes (OpenSC truncates before sending; the
    curves here have byte-aligned orders, so bytes are bits).
    """
    size = (key.curve.key_size + 7) // 8
    if not 1 <= len(digest) <= 64:
        raise PivError(SW.INCORRECT_DATA, "ECDSA input is not a hash")
    e = digest[:size].rjust(size, b"\x00")
    return key.sign(e, ec.ECDSA(utils.Prehashed(_HASH_FOR_SIZE[size])))


def ecdh(key: ec.EllipticCurvePrivateKey, point: bytes) -> bytes:
    """ECC CDH with the peer's uncompressed public point (SP 800-56A §5.7.1.2): ``Z``."""
    size = (key.curve.key_size + 7) // 8
    if len(point) != 1 + 2 * size or point[0] != 0x04:
        raise PivError(SW.INCORRECT_DATA, "the peer point must be uncompressed, on this curve")
    try:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(key.curve, point)
    except (ValueError, UnsupportedAlgorithm):
        raise PivError(SW.INCORRECT_DATA, "the peer point is not on the curve") from None
    return key.exchange(ec.ECDH(), peer)
