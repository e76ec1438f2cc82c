"""What a PIV card application is made of: keys in key references, certificates, a PIN.

The card (:mod:`usbccid.piv.card`) takes a :class:`PivProfile`; where profiles come from
(generated cards, PEM/DER/PKCS#12 files) is ``usbccid.cards``. The PIN policy and the
persistent PIN state are the CAC card's (:class:`usbccid.cac.profile.PinPolicy`,
:class:`~usbccid.cac.profile.PinStateStore`): the PIV Card Application PIN is the PIN,
the PUK its unblock code, and a card with both edges has one PIN for both, as a DoD CAC
does.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509

from usbccid.cac.profile import PinPolicy
from usbccid.piv.keys import (
    ASYMMETRIC_REFERENCES,
    KEY_REFERENCES,
    RETIRED_COUNT,
    RETIRED_FIRST,
    PivPrivateKey,
    algorithm_of,
)

#: Key references in the order ``usbccid card new --piv`` fills them.
SLOT_ORDER: tuple[int, ...] = (
    0x9A,
    0x9C,
    0x9D,
    0x9E,
    *range(RETIRED_FIRST, RETIRED_FIRST + RETIRED_COUNT),
)


def slot_name(ref: int) -> str:
    """``"9a"`` for key reference 9A: how configuration files and the CLI name slots."""
    return f"{ref:02x}"


#: "9a" -> 0x9A, for every key reference a PIV key can be in (SLOT_ORDER)
SLOT_REFS: dict[str, int] = {slot_name(ref): ref for ref in SLOT_ORDER}


@dataclass(frozen=True)
class PivSlot:
    """One key reference holding a private key and the certificate of its public key."""

    ref: int
    certificate: x509.Certificate
    private_key: PivPrivateKey

    def __post_init__(self) -> None:
        if self.ref not in ASYMMETRIC_REFERENCES:
            raise ValueError(f"{self.ref:02X} is not a PIV key reference for a cardholder key")
        algorithm_of(self.private_key)  # raises ValueError for keys PIV cannot hold

    @property
    def name(self) -> str:
        return KEY_REFERENCES[self.ref].name


@dataclass(frozen=True)
class PivProfile:
    """Everything that defines one PIV card application."""

    card_id: bytes
    slots: tuple[PivSlot, ...]
    pin_policy: PinPolicy

    def __post_init__(self) -> None:
        refs = [s.ref for s in self.slots]
        if not refs:
            raise ValueError("a PIV card needs at least one key")
        if len(set(refs)) != len(refs):
            raise ValueError("a key reference holds one key")
        retired = sorted(r for r in refs if RETIRED_FIRST <= r < RETIRED_FIRST + RETIRED_COUNT)
        # The Key History object counts retired keys from 82 on (SP 800-73-4 Part 1 §3.3.2);
        # OpenSC reads retired certificates 1..n only.
        if retired != list(range(RETIRED_FIRST, RETIRED_FIRST + len(retired))):
            raise ValueError("retired key references are used in order from 82")

    def slot(self, ref: int) -> PivSlot | None:
        return next((s for s in self.slots if s.ref == ref), None)

    @property
    def retired_count(self) -> int:
        return sum(1 for s in self.slots if RETIRED_FIRST <= s.ref < RETIRED_FIRST + RETIRED_COUNT)
