"""The raw RSA private-key operation (RSADP / RSASP1, RFC 8017 §5.1.2 and §5.2.1).

A CAC card signs and decrypts with the same command (GSC-IS 2.1 VM card edge, SIGN/DECRYPT
``42``): the host sends an already padded, modulus-sized block and gets ``block^d mod n``
back. ``cryptography`` deliberately offers no raw RSA (pyca/cryptography #2735, #3604), so
this is the one place that does it, from ``private_numbers()`` with the CRT, blinded
(the random blinding factor comes from :mod:`secrets`) and checked with the public key
before the result leaves the card.

:class:`SoftwareKey` is the software implementation of the container-key protocol
(:class:`usbccid.cac.profile.ContainerKey`); keys on a token implement the same protocol
elsewhere and use :func:`check_input` and :func:`verify_result` for the same input rules
and self-check.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.errors import CardError
from usbccid.cac.sw import SW


def check_input(public: rsa.RSAPublicNumbers, block: bytes) -> int:
    """The input rules of the raw operation (RFC 8017 §5.1.2 step 1); returns ``c``.

    Raises:
        CardError: 67 00 if ``block`` is not exactly the modulus length; 6A 80 if the
            integer is not in ``0 <= c < n``.
    """
    n = public.n
    if len(block) != (n.bit_length() + 7) // 8:
        raise CardError(SW.WRONG_LENGTH, "input is not modulus-sized")
    c = int.from_bytes(block, "big")
    if not 0 <= c < n:
        raise CardError(SW.INCORRECT_DATA, "input out of range for the modulus")
    return c


def verify_result(public: rsa.RSAPublicNumbers, c: int, m: int) -> bool:
    """True when ``m`` is the raw private operation's result on ``c`` (``m^e mod n == c``)."""
    return 0 <= m < public.n and pow(m, public.e, public.n) == c


def rsa_private_raw(key: rsa.RSAPrivateKey, block: bytes) -> bytes:
    """Return ``block^d mod n`` as a modulus-sized big-endian string (leading zeros kept).

    Raises:
        CardError: 67 00 if ``block`` is not exactly the modulus length; 6A 80 if the
            integer is not in ``0 <= c < n`` (RFC 8017 §5.1.2 step 1).
    """
    numbers = key.private_numbers()
    public = numbers.public_numbers
    n = public.n
    k = (n.bit_length() + 7) // 8
    c = check_input(public, block)
    p, q, e = numbers.p, numbers.q, public.e
    # Blinding: Python's pow() is not constant-time, so work on c * r^e instead of c
    # and unblind with r^-1 (the result is identical; the timing no longer follows c).
    while True:
        r = secrets.randbelow(n - 2) + 2
        try:
            r_inv = pow(r, -1, n)
        except ValueError:  # gcd(r, n) != 1: only if r hits p or q
            continue
        break
    blinded = (c * pow(r, e, n)) % n
    # CRT (RFC 8017 §5.1.2, step 2b): m1 = c^dP mod p, m2 = c^dQ mod q, h = qInv (m1 - m2) mod p.
    m1 = pow(blinded, numbers.dmp1, p)
    m2 = pow(blinded, numbers.dmq1, q)
    h = (numbers.iqmp * (m1 - m2)) % p
    m = ((m2 + h * q) * r_inv) % n
    # Check before answering: a wrong CRT result would leak a factor of n (Boneh-DeMillo-Lipton).
    if pow(m, e, n) != c:
        raise CardError(SW.NO_PRECISE_DIAGNOSIS, "RSA self-check failed")
    return m.to_bytes(k, "big")


class _Sized(Protocol):
    @property
    def key_size(self) -> int: ...


def modulus_bytes(key: _Sized) -> int:
    """The modulus length in bytes (``k`` in RFC 8017)."""
    return (key.key_size + 7) // 8


@dataclass(frozen=True)
class SoftwareKey:
    """A container key held in memory (``cryptography``): the raw operation is done here."""

    private_key: rsa.RSAPrivateKey

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, rsa.RSAPrivateKey):
            raise ValueError("CAC PKI containers hold RSA keys only (GSC-IS 2.1 Table 5-6)")

    @property
    def key_size(self) -> int:
        return self.private_key.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self.private_key.public_key()

    def raw_rsa(self, block: bytes) -> bytes:
        return rsa_private_raw(self.private_key, block)
