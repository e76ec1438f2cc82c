"""Where cards come from: generated test cards and imported PEM/DER/PKCS#12 containers.

Pure: every function takes bytes or objects and returns profiles or bytes. Nothing here
reads a file, the clock or (unless the caller lets it default) the system random source;
``usbccid.state`` does the file I/O and passes ``now`` in.

Three things live here:

* :func:`load_container` turns a certificate and its RSA private key, given as PEM, DER or
  PKCS#12 bytes, into a :class:`~usbccid.cac.profile.Container`. Every failure (wrong
  passphrase, key that does not match the certificate, unsupported key type ...) is one
  :class:`ProvisionError` whose message fits on one line of stderr and never contains key
  material or the passphrase.
* :func:`generate_card` makes a test card shaped like a real DoD CAC: a throwaway test CA
  and three containers, "CAC ID Certificate" (digitalSignature; clientAuth +
  smartcardLogon), "CAC Email Signature Certificate" (digitalSignature + nonRepudiation;
  emailProtection) and "CAC Email Encryption Certificate" (keyEncipherment +
  dataEncipherment; emailProtection), each issued by the CA so that chains validate. The
  labels are the ones OpenSC's CAC driver gives the first three PKI applets (its
  ``cac_labels[]``); further containers get its generic "CAC Cert <n>" labels.
* :func:`card_to_files` / :func:`card_from_files` turn a card into a set of named byte
  strings (a JSON manifest, PEM certificates, PKCS#8 PEM keys, the CA certificate) and back,
  for ``usbccid.state`` to store in a directory.

The default PIN is ``12345678`` and the default unblock code ``87654321``: the user PIN of
OpenSC's CI card (virt_cacard's SoftHSM token, ``p11test -p 12345678``), so that the tests
and habits of that ecosystem work unchanged. These are test cards: the CA certificate says
TEST in its name, and its private key is thrown away once the containers are issued, so
trusting ``ca.pem`` on a host cannot let anyone mint further certificates under it.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usbccid.cac.profile import CardProfile, Container, PinPolicy
from usbccid.errors import UsbccidError

__all__ = [
    "CAC_LABELS",
    "CAC_ROLES",
    "CARD_ID_LENGTH",
    "CA_CERT_FILE",
    "DEFAULT_BACKDATE",
    "DEFAULT_PIN",
    "DEFAULT_UNBLOCK_CODE",
    "DEFAULT_VALIDITY",
    "MANIFEST_FILE",
    "MAX_CONTAINERS",
    "SUPPORTED_KEY_SIZES",
    "CardSpec",
    "ContainerRole",
    "ContainerSpec",
    "KeyFactory",
    "ProvisionError",
    "ProvisionedCard",
    "RandomSource",
    "card_from_files",
    "card_to_files",
    "container_label",
    "default_card_spec",
    "generate_card",
    "generate_rsa_key",
    "load_container",
    "make_pin_policy",
    "new_card_id",
    "validate_pin_policy",
]


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

CARD_ID_LENGTH = 16
DEFAULT_VALIDITY = timedelta(days=3652)  # ten years
#: Certificates start this long before ``now``, so that a host (or VM guest) whose clock
#: is a little behind the server's does not see them as not yet valid.
DEFAULT_BACKDATE = timedelta(hours=1)

MANIFEST_FILE = "card.json"
CA_CERT_FILE = "ca.pem"
_MANIFEST_FORMAT = "usbccid-card"
_MANIFEST_VERSION = 1

#: PIN length limits: OpenSC's CAC emulation declares min 4, max 8 (pkcs15-cac.c) and the
#: VERIFY data field is the PIN padded with FF to 8 bytes.
_PIN_MIN, _PIN_MAX = 4, 8
#: The retry counter is reported as 63 Cx, one nibble (ISO/IEC 7816-4 §5.6).
_TRIES_MAX = 15

#: Microsoft User Principal Name otherName (used by smart-card logon; real CACs carry
#: "<EDIPI>@mil" here).
_UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")

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


# --------------------------------------------------------------------------------------
# Loading containers from PEM, DER and PKCS#12


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z0-9 ]+)-----\r?\n.*?-----END \1-----", re.DOTALL)
_PEM_KEY_LABELS = frozenset(
    {b"PRIVATE KEY", b"ENCRYPTED PRIVATE KEY", b"RSA PRIVATE KEY", b"EC PRIVATE KEY"}
)


def _is_pem(data: bytes) -> bool:
    return b"-----BEGIN " in data


def _pem_blocks(data: bytes) -> list[tuple[bytes, bytes]]:
    return [(m.group(1), m.group(0)) for m in _PEM_BLOCK.finditer(data)]


def _looks_like_pkcs12(data: bytes) -> bool:
    """Whether ``data`` starts like a PFX (RFC 7292 §4): SEQUENCE { INTEGER 3, ... }."""
    if len(data) < 5 or data[0] != 0x30:
        return False
    first = data[1]
    offset = 2 + (first & 0x7F if first & 0x80 else 0)  # long or indefinite length form
    return data[offset : offset + 3] == b"\x02\x01\x03"


def _passphrase_bytes(passphrase: bytes | str | None) -> bytes | None:
    if passphrase is None or isinstance(passphrase, bytes):
        return passphrase
    return passphrase.encode("utf-8")


def _load_private_key(data: bytes, passphrase: bytes | None, where: str) -> PrivateKeyTypes:
    """One private key from a PEM block or DER (PKCS#8 or PKCS#1)."""
    loader = (
        serialization.load_pem_private_key if _is_pem(data) else serialization.load_der_private_key
    )
    try:
        return loader(data, password=passphrase)
    except TypeError as exc:
        # cryptography raises TypeError both for "encrypted, no password given" and for
        # "password given, key not encrypted". The second is harmless: load without it.
        if passphrase is not None:
            try:
                return loader(data, password=None)
            except (TypeError, ValueError):
                pass
            raise ProvisionError(f"cannot read the private key in {where}") from exc
        raise ProvisionError(
            f"the private key in {where} is encrypted: a passphrase is needed"
        ) from exc
    except ValueError as exc:
        if passphrase is not None:
            raise ProvisionError(
                f"cannot decrypt the private key in {where}: wrong passphrase or corrupt data"
            ) from exc
        raise ProvisionError(f"cannot read the private key in {where}") from exc


def _load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
    try:
        if _is_pem(data):
            return [
                x509.load_pem_x509_certificate(block)
                for label, block in _pem_blocks(data)
                if label == b"CERTIFICATE"
            ]
        return [x509.load_der_x509_certificate(data)]
    except ValueError as exc:
        raise ProvisionError(f"cannot parse the certificate in {where}") from exc


def _read_pem_bundle(
    data: bytes, passphrase: bytes | None, where: str
) -> tuple[list[x509.Certificate], list[PrivateKeyTypes]]:
    blocks = _pem_blocks(data)
    if not blocks:
        raise ProvisionError(f"no PEM block found in {where}")
    certificates = _load_certificates(data, where)
    keys = [
        _load_private_key(block, passphrase, where)
        for label, block in blocks
        if label in _PEM_KEY_LABELS
    ]
    return certificates, keys


def _read_pkcs12(
    data: bytes, passphrase: bytes | None, where: str
) -> tuple[list[x509.Certificate], list[PrivateKeyTypes]]:
    try:
        bundle = pkcs12.load_pkcs12(data, passphrase)
    except ValueError as exc:
        # OpenSSL cannot tell a wrong password from a damaged file (both fail the MAC).
        if passphrase is None:
            raise ProvisionError(
                f"cannot read the PKCS#12 data in {where}: it may need a passphrase"
            ) from exc
        raise ProvisionError(
            f"cannot read the PKCS#12 data in {where}: wrong passphrase or corrupt file"
        ) from exc
    except TypeError as exc:  # pragma: no cover - depends on the cryptography version
        raise ProvisionError(f"cannot read the PKCS#12 data in {where}") from exc
    certificates = [c.certificate for c in bundle.additional_certs]
    if bundle.cert is not None:
        certificates.insert(0, bundle.cert.certificate)
    return certificates, [] if bundle.key is None else [bundle.key]


def _read_der(
    data: bytes, passphrase: bytes | None, where: str
) -> tuple[list[x509.Certificate], list[PrivateKeyTypes]]:
    """DER data given alone: PKCS#12, or a lone certificate (whose key is missing)."""
    if _looks_like_pkcs12(data):
        return _read_pkcs12(data, passphrase, where)
    try:
        return [x509.load_der_x509_certificate(data)], []
    except ValueError:
        pass
    try:
        return [], [serialization.load_der_private_key(data, password=passphrase)]
    except (ValueError, TypeError):
        pass
    raise ProvisionError(f"{where} is not a certificate or key in PEM, DER or PKCS#12 form")


def _check_rsa_key(key: PrivateKeyTypes, where: str) -> rsa.RSAPrivateKey:
    if not isinstance(key, rsa.RSAPrivateKey):
        # OpenSC's CAC driver skips non-RSA keys silently; refuse them up front.
        raise ProvisionError(f"the private key in {where} is not RSA (CAC supports RSA only)")
    if key.key_size not in SUPPORTED_KEY_SIZES:
        raise ProvisionError(
            f"the RSA key in {where} has {key.key_size} bits; supported: "
            + ", ".join(map(str, SUPPORTED_KEY_SIZES))
        )
    return key


def load_container(
    data: bytes,
    key_data: bytes | None = None,
    *,
    label: str,
    passphrase: bytes | str | None = None,
    source: str = "the container data",
    key_source: str = "the key data",
) -> Container:
    """A :class:`Container` from a certificate and its RSA private key.

    Accepted forms:

    * ``data`` alone: a PEM bundle holding the certificate and the private key (extra
      chain certificates are fine), or PKCS#12 (``.p12``/``.pfx``) DER;
    * ``data`` and ``key_data``: the certificate (PEM or DER) and the private key (PEM or
      DER, PKCS#8 or PKCS#1, encrypted or not).

    ``passphrase`` decrypts encrypted PEM/DER keys and PKCS#12 files. When several
    certificates are present, the one whose public key matches the private key is used.
    ``source``/``key_source`` name the inputs in error messages (e.g. the file names).

    Raises :class:`ProvisionError` for anything unusable: no key, no certificate, wrong
    passphrase, a key that is not RSA or of an unsupported size, or a certificate that does
    not belong to the key.
    """
    password = _passphrase_bytes(passphrase)
    if key_data is None:
        if _is_pem(data):
            certificates, keys = _read_pem_bundle(data, password, source)
        else:
            certificates, keys = _read_der(data, password, source)
    else:
        certificates = _load_certificates(data, source)
        if _is_pem(key_data):
            _, keys = _read_pem_bundle(key_data, password, key_source)
        else:
            keys = [_load_private_key(key_data, password, key_source)]
    key_where = source if key_data is None else key_source
    if not certificates:
        raise ProvisionError(f"no certificate found in {source}")
    if not keys:
        if key_data is None and not _is_pem(data) and not _looks_like_pkcs12(data):
            raise ProvisionError(f"{source} holds a DER certificate only: give its key too")
        raise ProvisionError(f"no private key found in {key_where}")
    if len(keys) > 1:
        raise ProvisionError(f"{key_where} holds more than one private key")
    key = _check_rsa_key(keys[0], key_where)
    public_key = key.public_key()
    for certificate in certificates:
        if certificate.public_key() == public_key:
            return Container(label=label, certificate=certificate, private_key=key)
    raise ProvisionError(f"the private key in {key_where} does not match the certificate")


# --------------------------------------------------------------------------------------
# Generating a test card


class ContainerRole(Enum):
    """What a container's certificate is for; fixes its keyUsage and extKeyUsage."""

    IDENTITY = "identity"  # CAC ID Certificate: authentication, smart-card logon
    EMAIL_SIGNATURE = "email-signature"  # S/MIME signing
    EMAIL_ENCRYPTION = "email-encryption"  # S/MIME encryption
    GENERAL = "general"  # sign and decrypt, like virt_cacard's certtool-made certs


#: The roles of the first three containers of a real CAC, in PKI-applet order.
CAC_ROLES = (ContainerRole.IDENTITY, ContainerRole.EMAIL_SIGNATURE, ContainerRole.EMAIL_ENCRYPTION)


def _key_usage(
    *,
    digital_signature: bool = False,
    content_commitment: bool = False,
    key_encipherment: bool = False,
    data_encipherment: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,  # X.509's renamed nonRepudiation bit
        key_encipherment=key_encipherment,
        data_encipherment=data_encipherment,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


# RFC 5280 §4.2.1.3 keyUsage and §4.2.1.12 extKeyUsage per role. OpenSC derives the
# PKCS#11 key flags (CKA_SIGN, CKA_DECRYPT, ...) from keyUsage, so these choices are
# visible to clients: the ID key signs only, the encryption key decrypts only.
_ROLE_USAGES: dict[ContainerRole, tuple[x509.KeyUsage, tuple[x509.ObjectIdentifier, ...]]] = {
    ContainerRole.IDENTITY: (
        _key_usage(digital_signature=True),
        (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SMARTCARD_LOGON),
    ),
    ContainerRole.EMAIL_SIGNATURE: (
        _key_usage(digital_signature=True, content_commitment=True),
        (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    ),
    ContainerRole.EMAIL_ENCRYPTION: (
        _key_usage(key_encipherment=True, data_encipherment=True),
        (ExtendedKeyUsageOID.EMAIL_PROTECTION,),
    ),
    ContainerRole.GENERAL: (
        _key_usage(digital_signature=True, key_encipherment=True),
        (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.EMAIL_PROTECTION),
    ),
}


@dataclass(frozen=True)
class ContainerSpec:
    """How to make one container: label, purpose, subject name, key size, SAN entries."""

    label: str
    role: ContainerRole
    subject: x509.Name
    key_size: int = 2048
    email: str | None = None  # subjectAltName rfc822Name (S/MIME needs it)
    upn: str | None = None  # subjectAltName otherName UPN (Windows smart-card logon)


@dataclass(frozen=True)
class CardSpec:
    """How to make a whole card. Build one with :func:`default_card_spec` and adjust it
    with :func:`dataclasses.replace`."""

    containers: tuple[ContainerSpec, ...]
    ca_subject: x509.Name
    ca_key_size: int = 2048
    validity: timedelta = DEFAULT_VALIDITY
    backdate: timedelta = DEFAULT_BACKDATE
    pin_policy: PinPolicy = field(default_factory=make_pin_policy)


@dataclass(frozen=True)
class ProvisionedCard:
    """A card profile plus the CA certificate that issued its certificates, when known
    (generated cards always have one; imported cards may not)."""

    profile: CardProfile
    ca_certificate: x509.Certificate | None = None


def _edipi(card_id: bytes) -> str:
    """A 10-digit stand-in for the DoD EDIPI, derived from the card ID so that each card
    gets its own CN (OpenSC's token label is the CN of the first certificate, and NSS
    caches per token)."""
    return f"{int.from_bytes(card_id[-8:], 'big') % 10**10:010d}"


def _test_name(common_name: str) -> x509.Name:
    # Shaped like a DoD name (C, O, OU=DoD, OU=PKI, ..., CN) but marked TEST everywhere a
    # human looks, so nobody mistakes it for a real CAC.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "U.S. Government (TEST)"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "DoD"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "PKI"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "USBCCID TEST CARD"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def default_card_spec(
    card_id: bytes,
    *,
    containers: int = 3,
    key_size: int | Sequence[int] = 2048,
    ca_key_size: int = 2048,
    common_name: str | None = None,
    email: str | None = None,
    upn: str | None = None,
    all_purpose: bool = False,
    pin_policy: PinPolicy | None = None,
    validity: timedelta = DEFAULT_VALIDITY,
) -> CardSpec:
    """The spec of a test card shaped like a DoD CAC.

    ``containers`` (1..16): the first three get the CAC roles and labels (ID, email
    signature, email encryption); the rest are :attr:`ContainerRole.GENERAL` with OpenSC's
    labels "CAC Cert 4" ... "CAC Cert 16". ``key_size`` is one size for all containers or
    one per container. ``common_name`` defaults to ``USBCCID.TEST.<10 digits from the card
    ID>``; ``email`` to ``usbccid.test.<digits>@usbccid.example`` (RFC 2606 domain);
    ``upn`` to ``<digits>@mil`` as on real CACs.

    ``all_purpose=True`` makes every container :attr:`ContainerRole.GENERAL`
    (digitalSignature + keyEncipherment), as virt_cacard's certificates are: then every
    key signs and decrypts, which is what OpenSC's ``virt_cacard_ref.json`` p11test
    expectations assume.
    """
    if not 1 <= containers <= MAX_CONTAINERS:
        raise ProvisionError(f"a card holds 1 to {MAX_CONTAINERS} containers, not {containers}")
    sizes = [key_size] * containers if isinstance(key_size, int) else list(key_size)
    if len(sizes) != containers:
        raise ProvisionError(f"{len(sizes)} key sizes given for {containers} containers")
    digits = _edipi(card_id)
    common_name = common_name or f"USBCCID.TEST.{digits}"
    email = email or f"usbccid.test.{digits}@usbccid.example"
    upn = upn or f"{digits}@mil"
    subject = _test_name(common_name)
    specs = []
    for index, bits in enumerate(sizes):
        role = (
            CAC_ROLES[index]
            if index < len(CAC_ROLES) and not all_purpose
            else ContainerRole.GENERAL
        )
        specs.append(
            ContainerSpec(
                label=container_label(index),
                role=role,
                subject=subject,
                key_size=bits,
                email=None if role is ContainerRole.IDENTITY else email,
                upn=upn if role in (ContainerRole.IDENTITY, ContainerRole.GENERAL) else None,
            )
        )
    return CardSpec(
        containers=tuple(specs),
        ca_subject=_test_name(f"USBCCID TEST CA {card_id.hex()[:8].upper()}"),
        ca_key_size=ca_key_size,
        validity=validity,
        pin_policy=make_pin_policy() if pin_policy is None else validate_pin_policy(pin_policy),
    )


def _serial_number(random: RandomSource) -> int:
    # RFC 5280 §4.1.2.2: a positive integer of at most 20 octets, unique per CA. 159
    # random bits keep the DER INTEGER within 20 octets (no sign-padding byte needed).
    value = int.from_bytes(random(20), "big") >> 1
    return value or 1


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _upn_other_name(upn: str) -> x509.OtherName:
    # otherName value for UPN is a UTF8String (tag 0x0C); cryptography adds the [0] wrapper.
    encoded = upn.encode("utf-8")
    return x509.OtherName(_UPN_OID, b"\x0c" + _der_length(len(encoded)) + encoded)


def _check_key_size(bits: int, what: str) -> None:
    if bits not in SUPPORTED_KEY_SIZES:
        raise ProvisionError(
            f"{what} key size {bits} not supported; use one of "
            + ", ".join(map(str, SUPPORTED_KEY_SIZES))
        )


def _new_key(new_key: KeyFactory, bits: int) -> rsa.RSAPrivateKey:
    key = new_key(bits)
    if key.key_size != bits:
        raise ValueError(f"key factory returned a {key.key_size}-bit key, not {bits}")
    return key


def generate_card(
    now: datetime,
    spec: CardSpec | None = None,
    *,
    card_id: bytes | None = None,
    random: RandomSource = os.urandom,
    new_key: KeyFactory = generate_rsa_key,
) -> ProvisionedCard:
    """A new test card: a self-signed test CA and one container per ``spec.containers``.

    ``now`` (timezone-aware) starts the validity window (less ``spec.backdate``), which
    lasts ``spec.validity`` for the CA and every certificate. ``card_id`` defaults to 16
    bytes from ``random``, which also supplies the certificate serial numbers; ``spec``
    defaults to :func:`default_card_spec` for that card ID. Keys come from ``new_key``
    (tests pass a factory handing out cached keys).

    The CA private key is used to issue the containers and then dropped: it is not part of
    the result, so the CA can never sign anything else.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    if card_id is None:
        card_id = new_card_id(random)
    if not card_id:
        raise ProvisionError("the card ID must not be empty")
    if spec is None:
        spec = default_card_spec(card_id)
    if not 1 <= len(spec.containers) <= MAX_CONTAINERS:
        raise ProvisionError(f"a card holds 1 to {MAX_CONTAINERS} containers")
    _check_key_size(spec.ca_key_size, "CA")
    for container_spec in spec.containers:
        _check_key_size(container_spec.key_size, repr(container_spec.label))
    pin_policy = validate_pin_policy(spec.pin_policy)

    not_before = now - spec.backdate
    not_after = now + spec.validity
    ca_key = _new_key(new_key, spec.ca_key_size)
    ca_public = ca_key.public_key()
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_public)
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(spec.ca_subject)
        .issuer_name(spec.ca_subject)
        .public_key(ca_public)
        .serial_number(_serial_number(random))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        # §4.2.1.9: a CA certificate has basicConstraints cA=TRUE, marked critical;
        # pathLenConstraint 0 forbids intermediate CAs below it.
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        # §4.2.1.3: keyCertSign is what lets it sign certificates (cRLSign for CRLs);
        # "conforming CAs SHOULD mark this extension as critical".
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        # §4.2.1.2: SKI MUST appear in CA certificates (method 1: SHA-1 of the key).
        .add_extension(ca_ski, critical=False)
        # §4.2.1.1: AKI MAY be omitted in a self-signed certificate; we include it.
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    containers = []
    for container_spec in spec.containers:
        key = _new_key(new_key, container_spec.key_size)
        key_usage, ekus = _ROLE_USAGES[container_spec.role]
        names: list[x509.GeneralName] = []
        if container_spec.email:
            names.append(x509.RFC822Name(container_spec.email))
        if container_spec.upn:
            names.append(_upn_other_name(container_spec.upn))
        builder = (
            x509.CertificateBuilder()
            .subject_name(container_spec.subject)
            .issuer_name(spec.ca_subject)
            .public_key(key.public_key())
            .serial_number(_serial_number(random))
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            # §4.2.1.9: an end-entity certificate asserts cA=FALSE.
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)  # §4.2.1.3
            # §4.2.1.12: extKeyUsage may be non-critical; consumers still honour it.
            .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
            # §4.2.1.2: SKI SHOULD be in end-entity certificates.
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            # §4.2.1.1: AKI MUST be in every certificate not self-signed; it names the
            # CA's SKI so path builders find the issuer.
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                critical=False,
            )
        )
        if names:
            # §4.2.1.6: non-critical because the subject name is not empty.
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        certificate = builder.sign(ca_key, hashes.SHA256())
        containers.append(
            Container(label=container_spec.label, certificate=certificate, private_key=key)
        )
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=pin_policy)
    return ProvisionedCard(profile=profile, ca_certificate=ca_certificate)


# --------------------------------------------------------------------------------------
# To and from named byte strings (stored as files by usbccid.state)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _certificate_file(index: int) -> str:
    return f"container-{index:02d}.cert.pem"


def _key_file(index: int) -> str:
    return f"container-{index:02d}.key.pem"


def card_to_files(card: ProvisionedCard) -> dict[str, bytes]:
    """The card as ``{file name: contents}``: :data:`MANIFEST_FILE` (JSON), the CA
    certificate as :data:`CA_CERT_FILE` (when known) and, per container, its certificate
    (PEM) and private key (unencrypted PKCS#8 PEM: the files are protected by their mode).

    The manifest holds the labels, the card ID (hex) and the PIN policy. The PIN and
    unblock code are stored in clear, like the keys next to them: the card must compare
    them, and whoever can read these files holds the keys anyway.
    """
    profile = card.profile
    policy = validate_pin_policy(profile.pin_policy)
    if not 1 <= len(profile.containers) <= MAX_CONTAINERS:
        raise ProvisionError(f"a card holds 1 to {MAX_CONTAINERS} containers")
    files: dict[str, bytes] = {}
    entries = []
    for index, container in enumerate(profile.containers):
        cert_name, key_name = _certificate_file(index), _key_file(index)
        files[cert_name] = container.certificate.public_bytes(serialization.Encoding.PEM)
        files[key_name] = container.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        entries.append({"label": container.label, "certificate": cert_name, "key": key_name})
    if card.ca_certificate is not None:
        files[CA_CERT_FILE] = card.ca_certificate.public_bytes(serialization.Encoding.PEM)
    manifest = {
        "format": _MANIFEST_FORMAT,
        "version": _MANIFEST_VERSION,
        "card_id": profile.card_id.hex(),
        "pin_policy": {
            "pin": policy.pin.decode("ascii"),
            "unblock_code": policy.unblock_code.decode("ascii"),
            "max_tries": policy.max_tries,
            "max_unblock_tries": policy.max_unblock_tries,
        },
        "ca_certificate": CA_CERT_FILE if card.ca_certificate is not None else None,
        "containers": entries,
    }
    files[MANIFEST_FILE] = (json.dumps(manifest, indent=2) + "\n").encode("utf-8")
    return files


def _field(mapping: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProvisionError(f"{what}: '{key}' is missing or not a {kind.__name__}")
    return value


def _file_name(value: Any, what: str) -> str:
    # Names come from the manifest and become paths: allow plain file names only.
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value):
        raise ProvisionError(f"{what}: bad file name in the manifest")
    return value


def card_from_files(read: Callable[[str], bytes]) -> ProvisionedCard:
    """The card :func:`card_to_files` stored; ``read(name)`` returns a file's contents.

    Only names of the form ``[A-Za-z0-9][A-Za-z0-9._-]*`` are ever passed to ``read``, so
    a path cannot escape the card's directory. Exceptions ``read`` raises pass through;
    bad contents raise :class:`ProvisionError`.
    """
    what = MANIFEST_FILE
    try:
        manifest = json.loads(read(MANIFEST_FILE).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProvisionError(f"{what} is not valid JSON") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != _MANIFEST_FORMAT:
        raise ProvisionError(f"{what} is not a usbccid card manifest")
    if manifest.get("version") != _MANIFEST_VERSION:
        raise ProvisionError(f"{what} has unsupported version {manifest.get('version')!r}")
    try:
        card_id = bytes.fromhex(_field(manifest, "card_id", str, what))
    except ValueError as exc:
        raise ProvisionError(f"{what}: 'card_id' is not hex") from exc
    if not card_id:
        raise ProvisionError(f"{what}: 'card_id' is empty")
    pin = _field(manifest, "pin_policy", dict, what)
    policy = validate_pin_policy(
        PinPolicy(
            pin=_field(pin, "pin", str, what).encode("utf-8"),
            unblock_code=_field(pin, "unblock_code", str, what).encode("utf-8"),
            max_tries=_field(pin, "max_tries", int, what),
            max_unblock_tries=_field(pin, "max_unblock_tries", int, what),
        )
    )
    entries = _field(manifest, "containers", list, what)
    if not 1 <= len(entries) <= MAX_CONTAINERS:
        raise ProvisionError(f"{what}: a card holds 1 to {MAX_CONTAINERS} containers")
    containers = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise ProvisionError(f"{what}: a container entry is not an object")
        cert_name = _file_name(entry.get("certificate"), what)
        key_name = _file_name(entry.get("key"), what)
        containers.append(
            load_container(
                read(cert_name),
                read(key_name),
                label=_field(entry, "label", str, what),
                source=cert_name,
                key_source=key_name,
            )
        )
    ca_name = manifest.get("ca_certificate")
    ca_certificate = None
    if ca_name is not None:
        ca_name = _file_name(ca_name, what)
        ca_certs = _load_certificates(read(ca_name), ca_name)
        if len(ca_certs) != 1:
            raise ProvisionError(f"{ca_name} must hold exactly one certificate")
        ca_certificate = ca_certs[0]
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)
    return ProvisionedCard(profile=profile, ca_certificate=ca_certificate)
