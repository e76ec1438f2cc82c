"""Generating test cards shaped like a real DoD CAC.

:func:`generate_card` makes a throwaway test CA and three containers, "CAC ID Certificate"
(digitalSignature; clientAuth + smartcardLogon), "CAC Email Signature Certificate"
(digitalSignature + nonRepudiation; emailProtection) and "CAC Email Encryption Certificate"
(keyEncipherment + dataEncipherment; emailProtection), each issued by the CA so that chains
validate. The labels are the ones OpenSC's CAC driver gives the first three PKI applets
(its ``cac_labels[]``); further containers get its generic "CAC Cert <n>" labels.

A card with a PIV edge (:attr:`CardSpec.edges`) gets PIV keys from the same CA
(:func:`default_piv_spec`): 9A PIV Authentication, 9C Digital Signature, 9D Key Management,
9E Card Authentication and optionally retired key management keys, RSA or EC
(P-256, P-384), with the usages of :func:`piv_usage`.

These are test cards: the CA certificate says TEST in its name, and its private key is
thrown away once the containers are issued, so trusting ``ca.pem`` on a host cannot let
anyone mint further certificates under it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import Enum

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from usbccid.cac.profile import CardProfile, Container, PinPolicy
from usbccid.cards.provision import (
    DEFAULT_BACKDATE,
    DEFAULT_EDGES,
    DEFAULT_PIV_KEY_TYPE,
    DEFAULT_VALIDITY,
    EDGES,
    MAX_CONTAINERS,
    PIV_KEY_TYPES,
    SUPPORTED_KEY_SIZES,
    KeyFactory,
    ProvisionError,
    RandomSource,
    container_label,
    generate_rsa_key,
    make_pin_policy,
    new_card_id,
    validate_pin_policy,
)
from usbccid.piv.keys import PivPrivateKey
from usbccid.piv.profile import SLOT_ORDER, PivSlot

# --------------------------------------------------------------------------------------
# Generating a test card


#: Microsoft User Principal Name otherName (used by smart-card logon; real CACs carry
#: "<EDIPI>@mil" here).
_UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


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
    key_agreement: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=content_commitment,  # X.509's renamed nonRepudiation bit
        key_encipherment=key_encipherment,
        data_encipherment=data_encipherment,
        key_agreement=key_agreement,
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
class PivSlotSpec:
    """How to make one PIV key: its key reference, key type (``PIV_KEY_TYPES``), subject,
    SAN entries. Its certificate's usages follow the key reference (usbccid.cards.piv)."""

    ref: int
    key_type: str
    subject: x509.Name
    email: str | None = None
    upn: str | None = None


@dataclass(frozen=True)
class CardSpec:
    """How to make a whole card. Build one with :func:`default_card_spec` and adjust it
    with :func:`dataclasses.replace`. ``edges`` says which card edges it answers
    (``EDGES``); a card with a PIV edge has ``piv`` keys, one with a CAC edge containers."""

    containers: tuple[ContainerSpec, ...]
    ca_subject: x509.Name
    ca_key_size: int = 2048
    validity: timedelta = DEFAULT_VALIDITY
    backdate: timedelta = DEFAULT_BACKDATE
    pin_policy: PinPolicy = field(default_factory=make_pin_policy)
    piv: tuple[PivSlotSpec, ...] = ()
    edges: str = DEFAULT_EDGES


@dataclass(frozen=True)
class ProvisionedCard:
    """A card profile plus the CA certificate that issued its certificates, when known
    (generated cards always have one; imported cards may not). A card with a PIV edge
    (``edges`` "piv" or "cac+piv") has its PIV keys in ``piv_slots``; a PIV-only card's
    ``profile`` has no containers (its card ID and PIN policy are the card's)."""

    profile: CardProfile
    ca_certificate: x509.Certificate | None = None
    piv_slots: tuple[PivSlot, ...] = ()
    edges: str = DEFAULT_EDGES


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
    check_edges(spec.edges, len(spec.containers), len(spec.piv))
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
    piv_slots = tuple(
        _issue_piv(
            slot_spec, spec.ca_subject, ca_key, ca_ski, not_before, not_after, random, new_key
        )
        for slot_spec in spec.piv
    )
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=pin_policy)
    return ProvisionedCard(
        profile=profile, ca_certificate=ca_certificate, piv_slots=piv_slots, edges=spec.edges
    )


def check_edges(edges: str, containers: int, piv_slots: int) -> None:
    """ProvisionError unless ``edges`` is known and the card has what its edges need."""
    if edges not in EDGES:
        raise ProvisionError(f"unknown card edges {edges!r}; use one of {', '.join(EDGES)}")
    if "cac" in edges.split("+"):
        if not 1 <= containers <= MAX_CONTAINERS:
            raise ProvisionError(f"a CAC holds 1 to {MAX_CONTAINERS} containers")
    elif containers:
        raise ProvisionError("a card without a CAC edge has no CAC containers")
    if "piv" in edges.split("+"):
        if not piv_slots:
            raise ProvisionError("a PIV card needs at least one key")
    elif piv_slots:
        raise ProvisionError("a card without a PIV edge has no PIV keys")


def new_piv_key(key_type: str, new_key: KeyFactory = generate_rsa_key) -> PivPrivateKey:
    """A fresh key of ``key_type`` (``PIV_KEY_TYPES``: rsaBITS, p256, p384)."""
    if key_type not in PIV_KEY_TYPES:
        raise ProvisionError(
            f"PIV key type {key_type!r} not supported; use one of {', '.join(PIV_KEY_TYPES)}"
        )
    if key_type == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    return _new_key(new_key, int(key_type.removeprefix("rsa")))


def piv_usage(
    ref: int, key: PivPrivateKey
) -> tuple[x509.KeyUsage, tuple[x509.ObjectIdentifier, ...]]:
    """keyUsage and extKeyUsage of the certificate in key reference ``ref`` (FIPS 201-3
    §4.2.2, and the X.509 Certificate and CRL Profile for the PIV: PIV Authentication and
    Card Authentication sign only, Digital Signature signs with nonRepudiation, Key
    Management decrypts (RSA: keyEncipherment) or agrees (EC: keyAgreement)). OpenSC takes
    the PKCS#11 key flags from these (pkcs15-piv.c), so they are visible to clients."""
    if ref in (0x9A, 0x9E):
        ekus = (
            (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SMARTCARD_LOGON)
            if ref == 0x9A
            else (_PIV_CARD_AUTH_EKU,)
        )
        return _key_usage(digital_signature=True), ekus
    if ref == 0x9C:
        return _key_usage(digital_signature=True, content_commitment=True), (
            ExtendedKeyUsageOID.EMAIL_PROTECTION,
        )
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return _key_usage(key_agreement=True), (ExtendedKeyUsageOID.EMAIL_PROTECTION,)
    return _key_usage(key_encipherment=True), (ExtendedKeyUsageOID.EMAIL_PROTECTION,)


#: id-PIV-cardAuth (FIPS 201-3, the PIV Certificate Profile): the Card Authentication EKU.
_PIV_CARD_AUTH_EKU = x509.ObjectIdentifier("2.16.840.1.101.3.6.8")


def _issue_piv(
    slot_spec: PivSlotSpec,
    ca_subject: x509.Name,
    ca_key: rsa.RSAPrivateKey,
    ca_ski: x509.SubjectKeyIdentifier,
    not_before: datetime,
    not_after: datetime,
    random: RandomSource,
    new_key: KeyFactory,
) -> PivSlot:
    key = new_piv_key(slot_spec.key_type, new_key)
    key_usage, ekus = piv_usage(slot_spec.ref, key)
    names: list[x509.GeneralName] = []
    if slot_spec.email:
        names.append(x509.RFC822Name(slot_spec.email))
    if slot_spec.upn:
        names.append(_upn_other_name(slot_spec.upn))
    builder = (
        x509.CertificateBuilder()
        .subject_name(slot_spec.subject)
        .issuer_name(ca_subject)
        .public_key(key.public_key())
        .serial_number(_serial_number(random))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(key_usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    certificate = builder.sign(ca_key, hashes.SHA256())
    try:
        return PivSlot(ref=slot_spec.ref, certificate=certificate, private_key=key)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None


def default_piv_spec(
    card_id: bytes,
    *,
    key_types: str | Sequence[str] = DEFAULT_PIV_KEY_TYPE,
    retired: int = 0,
    common_name: str | None = None,
    email: str | None = None,
    upn: str | None = None,
) -> tuple[PivSlotSpec, ...]:
    """The PIV keys of a test card: 9A, 9C, 9D, 9E, then ``retired`` retired key
    management keys 82.... ``key_types`` is one type for all, or one per key in that order
    (the last one repeats)."""
    if not 0 <= retired <= 20:
        raise ProvisionError(f"a PIV card holds 0 to 20 retired keys, not {retired}")
    refs = SLOT_ORDER[: 4 + retired]
    types = [key_types] if isinstance(key_types, str) else list(key_types)
    if not types or len(types) > len(refs):
        raise ProvisionError(f"{len(types)} key types given for {len(refs)} PIV keys")
    types += [types[-1]] * (len(refs) - len(types))
    digits = _edipi(card_id)
    subject = _test_name(common_name or f"USBCCID.TEST.{digits}")
    email = email or f"usbccid.test.{digits}@usbccid.example"
    upn = upn or f"{digits}@mil"
    return tuple(
        PivSlotSpec(
            ref=ref,
            key_type=key_type,
            subject=subject,
            email=email if ref not in (0x9A, 0x9E) else None,
            upn=upn if ref == 0x9A else None,
        )
        for ref, key_type in zip(refs, types, strict=True)
    )
