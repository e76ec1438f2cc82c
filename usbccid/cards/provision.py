"""The vocabulary of CAC cards made by usbccid: defaults, limits, PIN policy, ProvisionError.

Pure, like every module of card provisioning: ``usbccid.cards.keys`` reads containers from
PEM/DER/PKCS#12 bytes, ``usbccid.cards.generate`` makes test cards, and
``usbccid.cards.manifest`` turns a card into named byte strings and back; nothing here reads
a file, the clock or (unless the caller lets it default) the system random source;
``usbccid.cards.store`` does the file I/O and passes ``now`` in.

The default PIN is ``12345678`` and the default unblock code ``87654321``: the user PIN of
OpenSC's CI card (virt_cacard's SoftHSM token, ``p11test -p 12345678``), so that the tests
and habits of that ecosystem work unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta

from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.profile import PinPolicy
from usbccid.errors import UsbccidError


class ProvisionError(UsbccidError):
    """A card or container could not be built or read from the material given.

    The message is one line, fit for stderr, and never contains key material or
    passphrases. This is not a wire error: it happens before any card exists.
    """


# --------------------------------------------------------------------------------------
# Constants

#: PIN and unblock code of every generated card unless the caller picks others. 12345678
#: is the user PIN OpenSC's CI (virt_cacard, p11test -p 12345678) and pkcs11-tool examples
#: use; 87654321 mirrors it for the PUK.
DEFAULT_PIN = b"12345678"
DEFAULT_UNBLOCK_CODE = b"87654321"

#: Labels OpenSC's CAC driver gives the PKI applets A0 00 00 00 79 01 00 .. 01 0F by
#: position (card-cac-common.c ``cac_labels[]``, MAX_CAC_SLOTS = 16). coolkey uses the
#: first three only and loads at most three containers.
CAC_LABELS: tuple[str, ...] = (
    "CAC ID Certificate",
    "CAC Email Signature Certificate",
    "CAC Email Encryption Certificate",
    *(f"CAC Cert {n}" for n in range(4, 17)),
)

#: One container per PKI applet; CAC has 16 of them (…79 01 00 to …79 01 0F).
MAX_CONTAINERS = len(CAC_LABELS)

#: RSA sizes a container may have. OpenSC's CAC driver registers 1024, 2048 and 3072 only;
#: 4096 is accepted for other clients but OpenSC will not offer it.
SUPPORTED_KEY_SIZES: tuple[int, ...] = (1024, 2048, 3072, 4096)

#: Which card edges a card answers (usbccid.piv.dual): the CAC applets (the default, and
#: exactly what usbccid always emulated), the PIV Card Application, or both.
EDGES: tuple[str, ...] = ("cac", "piv", "cac+piv")
DEFAULT_EDGES = "cac"

#: PIV key types of ``usbccid card new --piv --key-type``: RSA sizes and NIST curves.
PIV_KEY_TYPES: tuple[str, ...] = ("rsa1024", "rsa2048", "rsa3072", "rsa4096", "p256", "p384")
DEFAULT_PIV_KEY_TYPE = "rsa2048"

CARD_ID_LENGTH = 16
DEFAULT_VALIDITY = timedelta(days=3652)  # ten years
#: Certificates start this long before ``now``, so that a host (or VM guest) whose clock
#: is a little behind the server's does not see them as not yet valid.
DEFAULT_BACKDATE = timedelta(hours=1)

MANIFEST_FILE = "card.json"
CA_CERT_FILE = "ca.pem"

#: PIN length limits: OpenSC's CAC emulation declares min 4, max 8 (pkcs15-cac.c) and the
#: VERIFY data field is the PIN padded with FF to 8 bytes.
_PIN_MIN, _PIN_MAX = 4, 8
#: The retry counter is reported as 63 Cx, one nibble (ISO/IEC 7816-4 §5.6).
_TRIES_MAX = 15


RandomSource = Callable[[int], bytes]
"""``random(n)`` returns ``n`` random bytes (default :func:`os.urandom`)."""

KeyFactory = Callable[[int], rsa.RSAPrivateKey]
"""``new_key(bits)`` returns a fresh RSA private key (default :func:`generate_rsa_key`)."""


def generate_rsa_key(bits: int) -> rsa.RSAPrivateKey:
    """A new RSA key with public exponent 65537 (OpenSSL's random source)."""
    return rsa.generate_private_key(public_exponent=65537, key_size=bits)


def container_label(index: int) -> str:
    """The label OpenSC shows for the container in PKI applet ``index`` (0-based)."""
    if not 0 <= index < MAX_CONTAINERS:
        raise ValueError(f"container index {index} outside 0..{MAX_CONTAINERS - 1}")
    return CAC_LABELS[index]


def new_card_id(random: RandomSource = os.urandom) -> bytes:
    """A fresh 16-byte card identifier (distinct cards must not share one: OpenSC caches
    per serial, and the serial comes from the card ID)."""
    card_id = random(CARD_ID_LENGTH)
    if len(card_id) != CARD_ID_LENGTH:
        raise ValueError(f"random source returned {len(card_id)} bytes, not {CARD_ID_LENGTH}")
    return card_id


# --------------------------------------------------------------------------------------
# PIN policy


def _check_code(value: bytes, what: str) -> None:
    if not isinstance(value, bytes):
        raise ProvisionError(f"the {what} must be bytes")
    if not (_PIN_MIN <= len(value) <= _PIN_MAX and value.isdigit()):
        # Never echo the value: it is a secret.
        raise ProvisionError(f"the {what} must be {_PIN_MIN} to {_PIN_MAX} ASCII digits")


def validate_pin_policy(policy: PinPolicy) -> PinPolicy:
    """``policy`` itself if clients can use it, else :class:`ProvisionError`.

    PIN and unblock code: 4 to 8 ASCII digits (what OpenSC's CAC PKCS#15 emulation
    accepts). Retry limits: 1 to 15, since ``63 Cx`` reports the count in one nibble.
    """
    _check_code(policy.pin, "PIN")
    _check_code(policy.unblock_code, "unblock code")
    for what, tries in (("PIN", policy.max_tries), ("unblock code", policy.max_unblock_tries)):
        if isinstance(tries, bool) or not isinstance(tries, int) or not 1 <= tries <= _TRIES_MAX:
            raise ProvisionError(f"the {what} retry limit must be an integer 1..{_TRIES_MAX}")
    return policy


def make_pin_policy(
    pin: bytes = DEFAULT_PIN,
    unblock_code: bytes = DEFAULT_UNBLOCK_CODE,
    *,
    max_tries: int = 3,
    max_unblock_tries: int = 10,
) -> PinPolicy:
    """A validated :class:`PinPolicy` (see :func:`validate_pin_policy`)."""
    return validate_pin_policy(PinPolicy(pin, unblock_code, max_tries, max_unblock_tries))
