"""usbccid.cards.provision: loading containers, generating test cards, card <-> files."""

from __future__ import annotations

import dataclasses
import json
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store

from tests.conftest import require_tool
from usbccid.cac.profile import Container, PinPolicy
from usbccid.cards.generate import ContainerRole, ProvisionedCard, default_card_spec, generate_card
from usbccid.cards.keys import load_container
from usbccid.cards.manifest import card_from_files, card_to_files
from usbccid.cards.provision import (
    CA_CERT_FILE,
    CAC_LABELS,
    DEFAULT_BACKDATE,
    DEFAULT_PIN,
    DEFAULT_UNBLOCK_CODE,
    DEFAULT_VALIDITY,
    MANIFEST_FILE,
    MAX_CONTAINERS,
    ProvisionError,
    container_label,
    make_pin_policy,
    new_card_id,
)
from usbccid.errors import UsbccidError

NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
PASSPHRASE = b"correct horse battery staple"
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


# --------------------------------------------------------------------------------------
# Key material is slow to make: one pool per test session, shared with test_state.


class KeyPool:
    """Hands out pre-generated RSA keys. Each :meth:`factory` gives distinct keys (so a
    card's CA and containers never share a key); different factories reuse them."""

    def __init__(self) -> None:
        self._keys: dict[int, list[rsa.RSAPrivateKey]] = {}

    def key(self, bits: int, index: int = 0) -> rsa.RSAPrivateKey:
        keys = self._keys.setdefault(bits, [])
        while len(keys) <= index:
            keys.append(rsa.generate_private_key(public_exponent=65537, key_size=bits))
        return keys[index]

    def factory(self) -> Callable[[int], rsa.RSAPrivateKey]:
        used: dict[int, int] = {}

        def new_key(bits: int) -> rsa.RSAPrivateKey:
            index = used.get(bits, 0)
            used[bits] = index + 1
            return self.key(bits, index)

        return new_key


KEYS = KeyPool()


def counting_random(start: int = 0) -> Callable[[int], bytes]:
    """A deterministic random source: 0x00, 0x01, ... (wrapping)."""
    state = {"next": start}

    def random(n: int) -> bytes:
        first = state["next"]
        state["next"] = first + n
        return bytes((first + i) % 256 for i in range(n))

    return random


@pytest.fixture(scope="session")
def default_card() -> ProvisionedCard:
    """A default card as users get it (RSA-2048), from pooled keys."""
    return generate_card(NOW, random=counting_random(), new_key=KEYS.factory())


@pytest.fixture(scope="session")
def small_card() -> ProvisionedCard:
    card_id = bytes(range(16))
    spec = default_card_spec(card_id, key_size=1024, ca_key_size=1024)
    return generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())


def make_cert(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str = "import test"
) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )


@pytest.fixture(scope="module")
def material() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = KEYS.key(1024, 10)
    return key, make_cert(key)


def pem_key(
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    password: bytes | None = None,
    fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.NoEncryption()
        if password is None
        else serialization.BestAvailableEncryption(password)
    )
    return key.private_bytes(serialization.Encoding.PEM, fmt, encryption)


def assert_same_container(
    container: Container, key: rsa.RSAPrivateKey, cert: x509.Certificate, label: str = "L"
) -> None:
    assert container.label == label
    assert container.certificate == cert
    assert container.private_key.private_numbers() == key.private_numbers()


def assert_one_line_no_secret(exc: BaseException) -> None:
    message = str(exc)
    assert message
    assert "\n" not in message
    assert PASSPHRASE.decode() not in message
    # Walk the whole chain too: a traceback must not show the passphrase either.
    seen: BaseException | None = exc
    while seen is not None:
        assert PASSPHRASE.decode() not in repr(seen)
        assert PASSPHRASE.decode() not in str(seen)
        seen = seen.__cause__ or seen.__context__


# --------------------------------------------------------------------------------------
# Loading


def test_load_pem_bundle_cert_and_key(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = cert.public_bytes(serialization.Encoding.PEM) + pem_key(key)
    assert_same_container(load_container(data, label="L"), key, cert)


def test_load_pem_bundle_key_first_with_chain(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    other = make_cert(KEYS.key(1024, 11), "some CA")
    data = (
        pem_key(key, fmt=serialization.PrivateFormat.TraditionalOpenSSL)
        + other.public_bytes(serialization.Encoding.PEM)
        + cert.public_bytes(serialization.Encoding.PEM)
    )
    # The certificate matching the key is picked, whatever the order.
    assert_same_container(load_container(data, label="L"), key, cert)


def test_load_pem_separate_files_encrypted_key(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    container = load_container(
        cert.public_bytes(serialization.Encoding.PEM),
        pem_key(key, PASSPHRASE),
        label="L",
        passphrase=PASSPHRASE.decode(),  # str is accepted too
    )
    assert_same_container(container, key, cert)


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL]
)
def test_load_der_cert_and_der_key(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate], fmt: serialization.PrivateFormat
) -> None:
    key, cert = material
    der_key = key.private_bytes(serialization.Encoding.DER, fmt, serialization.NoEncryption())
    container = load_container(cert.public_bytes(serialization.Encoding.DER), der_key, label="L")
    assert_same_container(container, key, cert)


def test_load_der_cert_with_pem_key(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    container = load_container(
        cert.public_bytes(serialization.Encoding.DER), pem_key(key), label="L"
    )
    assert_same_container(container, key, cert)


def test_load_pkcs12_with_passphrase_and_chain(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    ca = make_cert(KEYS.key(1024, 11), "some CA")
    data = pkcs12.serialize_key_and_certificates(
        b"friendly", key, cert, [ca], serialization.BestAvailableEncryption(PASSPHRASE)
    )
    assert_same_container(load_container(data, label="L", passphrase=PASSPHRASE), key, cert)


def test_load_pkcs12_unencrypted(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = pkcs12.serialize_key_and_certificates(
        None, key, cert, None, serialization.NoEncryption()
    )
    assert_same_container(load_container(data, label="L"), key, cert)


def test_pkcs12_wrong_passphrase(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = pkcs12.serialize_key_and_certificates(
        None, key, cert, None, serialization.BestAvailableEncryption(b"other secret")
    )
    with pytest.raises(ProvisionError, match="wrong passphrase") as info:
        load_container(data, label="L", passphrase=PASSPHRASE, source="card.p12")
    assert "card.p12" in str(info.value)
    assert isinstance(info.value, UsbccidError)
    assert_one_line_no_secret(info.value)


def test_pkcs12_needs_passphrase(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = pkcs12.serialize_key_and_certificates(
        None, key, cert, None, serialization.BestAvailableEncryption(PASSPHRASE)
    )
    with pytest.raises(ProvisionError, match="passphrase") as info:
        load_container(data, label="L")
    assert_one_line_no_secret(info.value)


def test_pem_wrong_passphrase(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = cert.public_bytes(serialization.Encoding.PEM) + pem_key(key, b"other secret")
    with pytest.raises(ProvisionError, match="wrong passphrase") as info:
        load_container(data, label="L", passphrase=PASSPHRASE)
    assert_one_line_no_secret(info.value)


def test_pem_encrypted_key_without_passphrase(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    data = cert.public_bytes(serialization.Encoding.PEM) + pem_key(key, PASSPHRASE)
    with pytest.raises(ProvisionError, match="passphrase is needed") as info:
        load_container(data, label="L")
    assert_one_line_no_secret(info.value)


def test_passphrase_for_unencrypted_key_is_harmless(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    data = cert.public_bytes(serialization.Encoding.PEM) + pem_key(key)
    assert_same_container(load_container(data, label="L", passphrase=PASSPHRASE), key, cert)


def test_key_certificate_mismatch(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    _, cert = material
    other_key = KEYS.key(1024, 12)
    with pytest.raises(ProvisionError, match="does not match the certificate") as info:
        load_container(
            cert.public_bytes(serialization.Encoding.PEM),
            pem_key(other_key),
            label="L",
            key_source="id.key",
        )
    assert "id.key" in str(info.value)
    assert_one_line_no_secret(info.value)
    with pytest.raises(ProvisionError, match="does not match"):
        load_container(
            cert.public_bytes(serialization.Encoding.PEM) + pem_key(other_key), label="L"
        )


def test_ec_key_refused() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    data = make_cert(key).public_bytes(serialization.Encoding.PEM) + pem_key(key)
    with pytest.raises(ProvisionError, match="not RSA"):
        load_container(data, label="L")


def test_unsupported_rsa_size_refused() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1536)
    data = make_cert(key).public_bytes(serialization.Encoding.PEM) + pem_key(key)
    with pytest.raises(ProvisionError, match="1536 bits"):
        load_container(data, label="L")


def test_der_certificate_alone(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    _, cert = material
    with pytest.raises(ProvisionError, match="give its key too"):
        load_container(cert.public_bytes(serialization.Encoding.DER), label="L")


def test_pem_without_key_or_certificate(
    material: tuple[rsa.RSAPrivateKey, x509.Certificate],
) -> None:
    key, cert = material
    with pytest.raises(ProvisionError, match="no private key"):
        load_container(cert.public_bytes(serialization.Encoding.PEM), label="L")
    with pytest.raises(ProvisionError, match="no certificate"):
        load_container(pem_key(key), label="L")


def test_two_keys_refused(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, cert = material
    data = (
        cert.public_bytes(serialization.Encoding.PEM) + pem_key(key) + pem_key(KEYS.key(1024, 12))
    )
    with pytest.raises(ProvisionError, match="more than one private key"):
        load_container(data, label="L")


@pytest.mark.parametrize(
    "data",
    [b"", b"garbage", b"\x30\x03\x02\x01\x03", b"-----BEGIN NOTHING-----\n"],
    ids=["empty", "text", "truncated-pfx", "bad-pem"],
)
def test_garbage_is_one_clear_error(data: bytes) -> None:
    with pytest.raises(ProvisionError) as info:
        load_container(data, label="L")
    assert "\n" not in str(info.value)


def test_corrupt_pem_certificate(material: tuple[rsa.RSAPrivateKey, x509.Certificate]) -> None:
    key, _ = material
    bad = b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
    with pytest.raises(ProvisionError, match="cannot parse the certificate"):
        load_container(bad + pem_key(key), label="L")


# --------------------------------------------------------------------------------------
# Generated cards


def test_default_card_shape(default_card: ProvisionedCard) -> None:
    profile = default_card.profile
    assert [c.label for c in profile.containers] == [
        "CAC ID Certificate",
        "CAC Email Signature Certificate",
        "CAC Email Encryption Certificate",
    ]
    for container in profile.containers:
        assert container.private_key.key_size == 2048
        assert container.certificate.public_key() == container.private_key.public_key()
    assert default_card.ca_certificate is not None
    ca_public = default_card.ca_certificate.public_key()
    assert isinstance(ca_public, rsa.RSAPublicKey)
    assert ca_public.key_size == 2048
    # The card ID is the first 16 bytes of the random source.
    assert profile.card_id == bytes(range(16))
    assert profile.pin_policy == PinPolicy(b"12345678", b"87654321", 3, 10)
    assert (DEFAULT_PIN, DEFAULT_UNBLOCK_CODE) == (b"12345678", b"87654321")


def test_default_names_say_test(default_card: ProvisionedCard) -> None:
    cert = default_card.profile.containers[0].certificate
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(cn, str)
    assert cn.startswith("USBCCID.TEST.")
    assert len(cn.rsplit(".", 1)[1]) == 10
    assert "TEST" in cert.subject.rfc4514_string()
    assert default_card.ca_certificate is not None
    assert "TEST" in default_card.ca_certificate.subject.rfc4514_string()
    # Every container has the same subject, as on a real CAC.
    assert {c.certificate.subject for c in default_card.profile.containers} == {cert.subject}


def test_card_id_differs_per_card() -> None:
    a, b = new_card_id(), new_card_id()
    assert len(a) == len(b) == 16
    assert a != b
    spec_a, spec_b = default_card_spec(a), default_card_spec(b)
    assert spec_a.containers[0].subject != spec_b.containers[0].subject
    assert spec_a.ca_subject != spec_b.ca_subject


def test_ca_certificate(default_card: ProvisionedCard) -> None:
    ca = default_card.ca_certificate
    assert ca is not None
    assert ca.subject == ca.issuer
    ca.verify_directly_issued_by(ca)  # self-signed
    constraints = ca.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value.ca
    assert constraints.value.path_length == 0
    usage = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert usage.critical
    assert usage.value.key_cert_sign
    assert usage.value.crl_sign
    assert not usage.value.digital_signature
    ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest


def test_chain_validates(default_card: ProvisionedCard) -> None:
    ca = default_card.ca_certificate
    assert ca is not None
    ca_public = ca.public_key()
    assert isinstance(ca_public, rsa.RSAPublicKey)
    ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    for container in default_card.profile.containers:
        cert = container.certificate
        assert cert.issuer == ca.subject
        # The signature, checked by hand with the CA public key ...
        assert cert.signature_hash_algorithm is not None
        ca_public.verify(
            cert.signature,
            cert.tbs_certificate_bytes,
            padding.PKCS1v15(),
            cert.signature_hash_algorithm,
        )
        cert.verify_directly_issued_by(ca)
        # ... and the identifiers path builders use (RFC 5280 §4.2.1.1, §4.2.1.2).
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        assert aki.key_identifier == ca_ski
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        assert ski == x509.SubjectKeyIdentifier.from_public_key(container.private_key.public_key())
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        assert not constraints.ca
        # A full path validation (RFC 5280 profile checks) by cryptography's verifier.
        verifier = (
            PolicyBuilder()
            .store(Store([ca]))
            .time(NOW)
            .extension_policies(
                ca_policy=ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        chain = verifier.verify(cert, []).chain
        assert chain == [cert, ca]
    # The ID certificate passes the stricter client-authentication policy unmodified.
    identity = default_card.profile.containers[0].certificate
    PolicyBuilder().store(Store([ca])).time(NOW).build_client_verifier().verify(identity, [])


def test_chain_validates_with_openssl(default_card: ProvisionedCard, tmp_path: Path) -> None:
    openssl = require_tool("openssl")
    assert default_card.ca_certificate is not None
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(default_card.ca_certificate.public_bytes(serialization.Encoding.PEM))
    purposes = ["sslclient", "smimesign", "smimeencrypt"]
    for purpose, container in zip(purposes, default_card.profile.containers, strict=True):
        cert_file = tmp_path / f"{purpose}.pem"
        cert_file.write_bytes(container.certificate.public_bytes(serialization.Encoding.PEM))
        result = subprocess.run(
            [
                openssl,
                "verify",
                "-x509_strict",
                "-attime",
                str(int(NOW.timestamp())),
                "-purpose",
                purpose,
                "-CAfile",
                str(ca_file),
                str(cert_file),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stdout + result.stderr


def key_usage_bits(cert: x509.Certificate) -> set[str]:
    extension = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert extension.critical
    usage = extension.value
    names = [
        "digital_signature",
        "content_commitment",
        "key_encipherment",
        "data_encipherment",
        "key_agreement",
        "key_cert_sign",
        "crl_sign",
    ]
    return {name for name in names if getattr(usage, name)}


def ekus(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_key_usages_and_ekus(default_card: ProvisionedCard) -> None:
    identity, signature, encryption = (c.certificate for c in default_card.profile.containers)
    assert key_usage_bits(identity) == {"digital_signature"}
    assert ekus(identity) == {ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SMARTCARD_LOGON}
    assert key_usage_bits(signature) == {"digital_signature", "content_commitment"}
    assert ekus(signature) == {ExtendedKeyUsageOID.EMAIL_PROTECTION}
    assert key_usage_bits(encryption) == {"key_encipherment", "data_encipherment"}
    assert ekus(encryption) == {ExtendedKeyUsageOID.EMAIL_PROTECTION}


def test_subject_alt_names(default_card: ProvisionedCard) -> None:
    identity, signature, encryption = (c.certificate for c in default_card.profile.containers)
    san = identity.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    (upn,) = san.get_values_for_type(x509.OtherName)
    assert upn.type_id == UPN_OID
    digits = identity.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert isinstance(digits, str)
    expected = f"{digits.rsplit('.', 1)[1]}@mil".encode()
    assert upn.value == b"\x0c" + bytes([len(expected)]) + expected  # DER UTF8String
    assert not san.get_values_for_type(x509.RFC822Name)
    for cert in (signature, encryption):
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        (email,) = san.get_values_for_type(x509.RFC822Name)
        assert email.endswith("@usbccid.example")


def test_validity_from_now(default_card: ProvisionedCard) -> None:
    assert default_card.ca_certificate is not None
    certs = [default_card.ca_certificate, *(c.certificate for c in default_card.profile.containers)]
    for cert in certs:
        assert cert.not_valid_before_utc == NOW - DEFAULT_BACKDATE
        assert cert.not_valid_after_utc == NOW + DEFAULT_VALIDITY
    assert timedelta(days=3650) <= DEFAULT_VALIDITY


def test_serial_numbers_positive_unique_20_octets(default_card: ProvisionedCard) -> None:
    assert default_card.ca_certificate is not None
    certs = [default_card.ca_certificate, *(c.certificate for c in default_card.profile.containers)]
    serials = [cert.serial_number for cert in certs]
    assert len(set(serials)) == len(serials)
    assert all(0 < s < 2**159 for s in serials)


def test_naive_now_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        generate_card(datetime(2026, 1, 1), new_key=KEYS.factory())


@pytest.mark.parametrize("count", [1, 4, 10, MAX_CONTAINERS])
def test_container_count(count: int) -> None:
    card_id = bytes(16)
    spec = default_card_spec(card_id, containers=count, key_size=1024, ca_key_size=1024)
    card = generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())
    labels = [c.label for c in card.profile.containers]
    assert labels == list(CAC_LABELS[:count])
    if count > 3:
        assert labels[3] == "CAC Cert 4"
        fourth = card.profile.containers[3].certificate
        assert key_usage_bits(fourth) == {"digital_signature", "key_encipherment"}
    assert (
        len({c.private_key.public_key().public_numbers().n for c in card.profile.containers})
        == count
    )


@pytest.mark.parametrize("count", [0, MAX_CONTAINERS + 1])
def test_container_count_limits(count: int) -> None:
    with pytest.raises(ProvisionError, match="containers"):
        default_card_spec(bytes(16), containers=count)


def test_container_label() -> None:
    assert container_label(0) == "CAC ID Certificate"
    assert container_label(15) == "CAC Cert 16"
    with pytest.raises(ValueError, match="index"):
        container_label(16)


def test_key_size_per_container() -> None:
    card_id = bytes(16)
    spec = default_card_spec(card_id, key_size=[1024, 2048, 1024], ca_key_size=1024)
    assert [c.key_size for c in spec.containers] == [1024, 2048, 1024]
    card = generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())
    assert [c.private_key.key_size for c in card.profile.containers] == [1024, 2048, 1024]
    with pytest.raises(ProvisionError, match="2 key sizes"):
        default_card_spec(card_id, key_size=[1024, 2048])


def test_bad_key_size_refused() -> None:
    spec = default_card_spec(bytes(16), key_size=1536)
    with pytest.raises(ProvisionError, match="1536 not supported"):
        generate_card(NOW, spec, card_id=bytes(16), new_key=KEYS.factory())


def test_custom_names_and_all_purpose() -> None:
    card_id = bytes(16)
    spec = default_card_spec(
        card_id,
        key_size=1024,
        ca_key_size=1024,
        common_name="DOE.JOHN.TEST.0000000001",
        email="john@example.org",
        all_purpose=True,
    )
    card = generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())
    for container in card.profile.containers:
        cert = container.certificate
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
            "DOE.JOHN.TEST.0000000001"
        )
        assert key_usage_bits(cert) == {"digital_signature", "key_encipherment"}
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.RFC822Name) == ["john@example.org"]
    # Labels stay OpenSC's, whatever the roles.
    assert [c.label for c in card.profile.containers] == list(CAC_LABELS[:3])


def test_replace_spec_fields() -> None:
    card_id = bytes(16)
    spec = default_card_spec(card_id, key_size=1024, ca_key_size=1024)
    spec = dataclasses.replace(
        spec,
        validity=timedelta(days=30),
        containers=(dataclasses.replace(spec.containers[0], role=ContainerRole.EMAIL_ENCRYPTION),),
    )
    card = generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())
    (container,) = card.profile.containers
    assert container.certificate.not_valid_after_utc == NOW + timedelta(days=30)
    assert key_usage_bits(container.certificate) == {"key_encipherment", "data_encipherment"}


# --------------------------------------------------------------------------------------
# PIN policy


def test_pin_policy_defaults() -> None:
    assert make_pin_policy() == PinPolicy(b"12345678", b"87654321", 3, 10)
    assert make_pin_policy(b"1234", b"00000000").pin == b"1234"


@pytest.mark.parametrize(
    ("pin", "puk", "tries"),
    [
        (b"123", b"87654321", 3),  # too short
        (b"123456789", b"87654321", 3),  # too long
        (b"1234abcd", b"87654321", 3),  # not digits
        (b"12345678", b"8765432x", 3),
        (b"12345678", b"87654321", 0),
        (b"12345678", b"87654321", 16),  # does not fit 63 Cx
    ],
)
def test_pin_policy_validation(pin: bytes, puk: bytes, tries: int) -> None:
    with pytest.raises(ProvisionError) as info:
        make_pin_policy(pin, puk, max_tries=tries)
    assert pin.decode() not in str(info.value)


def test_card_uses_given_pin_policy() -> None:
    card_id = bytes(16)
    policy = make_pin_policy(b"2468", b"13572468", max_tries=5)
    spec = default_card_spec(
        card_id, containers=1, key_size=1024, ca_key_size=1024, pin_policy=policy
    )
    card = generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())
    assert card.profile.pin_policy == policy


# --------------------------------------------------------------------------------------
# Card <-> files


def read_from(files: dict[str, bytes]) -> Callable[[str], bytes]:
    return files.__getitem__


def test_files_round_trip(small_card: ProvisionedCard) -> None:
    files = card_to_files(small_card)
    assert set(files) == {
        MANIFEST_FILE,
        CA_CERT_FILE,
        *(f"container-{i:02d}.{kind}.pem" for i in range(3) for kind in ("cert", "key")),
    }
    loaded = card_from_files(read_from(files))
    assert loaded.ca_certificate == small_card.ca_certificate
    assert loaded.profile.card_id == small_card.profile.card_id
    assert loaded.profile.pin_policy == small_card.profile.pin_policy
    for got, want in zip(loaded.profile.containers, small_card.profile.containers, strict=True):
        assert got.label == want.label
        assert got.certificate == want.certificate
        assert got.private_key.private_numbers() == want.private_key.private_numbers()
    assert card_to_files(loaded) == files  # stable bytes


def test_manifest_contents(small_card: ProvisionedCard) -> None:
    files = card_to_files(small_card)
    manifest = json.loads(files[MANIFEST_FILE])
    assert manifest["card_id"] == bytes(range(16)).hex()
    assert manifest["pin_policy"] == {
        "pin": "12345678",
        "unblock_code": "87654321",
        "max_tries": 3,
        "max_unblock_tries": 10,
    }
    assert [c["label"] for c in manifest["containers"]] == list(CAC_LABELS[:3])
    assert b"PRIVATE KEY" not in files[MANIFEST_FILE]
    assert files["container-00.key.pem"].startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8


def test_files_without_ca(small_card: ProvisionedCard) -> None:
    card = ProvisionedCard(small_card.profile, None)
    files = card_to_files(card)
    assert CA_CERT_FILE not in files
    assert card_from_files(read_from(files)).ca_certificate is None


def tampered(
    files: dict[str, bytes], change: Callable[[dict[str, object]], None]
) -> dict[str, bytes]:
    manifest = json.loads(files[MANIFEST_FILE])
    change(manifest)
    return {**files, MANIFEST_FILE: json.dumps(manifest).encode()}


def set_path(key: str, value: object) -> Callable[[dict[str, object]], None]:
    def change(manifest: dict[str, object]) -> None:
        containers = manifest["containers"]
        assert isinstance(containers, list)
        containers[0][key] = value

    return change


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (set_path("key", "../../etc/shadow"), "bad file name"),
        (set_path("certificate", "/etc/passwd"), "bad file name"),
        (set_path("key", "container-01.key.pem"), "does not match"),
        (set_path("label", 7), "'label'"),
        (lambda m: m.update(card_id="zz"), "not hex"),
        (lambda m: m.update(card_id=""), "empty"),
        (lambda m: m.update(version=3), "version"),
        (lambda m: m.update(version=2), "'edges'"),  # version 2 is a card with PIV edges
        (lambda m: m.update(version=2, edges="piv", piv_slots=[]), "no CAC containers"),
        (lambda m: m.update(format="other"), "not a usbccid card manifest"),
        (lambda m: m.update(containers=[]), "1 to 16"),
        (
            lambda m: m.update(
                pin_policy={
                    "pin": "1",
                    "unblock_code": "87654321",
                    "max_tries": 3,
                    "max_unblock_tries": 10,
                }
            ),
            "PIN",
        ),
        (lambda m: m.update(pin_policy={"pin": "12345678"}), "unblock_code"),
    ],
)
def test_damaged_manifest(
    small_card: ProvisionedCard, change: Callable[[dict[str, object]], None], message: str
) -> None:
    files = tampered(card_to_files(small_card), change)
    with pytest.raises(ProvisionError, match=message):
        card_from_files(read_from(files))


def test_manifest_not_json(small_card: ProvisionedCard) -> None:
    files = {**card_to_files(small_card), MANIFEST_FILE: b"\xff{"}
    with pytest.raises(ProvisionError, match="not valid JSON"):
        card_from_files(read_from(files))


def test_read_errors_pass_through(small_card: ProvisionedCard) -> None:
    files = card_to_files(small_card)
    del files["container-02.key.pem"]
    with pytest.raises(KeyError):
        card_from_files(read_from(files))
