"""Reading a container (a certificate and its RSA private key) or a PIV key (RSA or EC)
from PEM, DER or PKCS#12.

:func:`load_container` turns the bytes into a :class:`~usbccid.cac.profile.Container`. Every
failure (wrong passphrase, key that does not match the certificate, unsupported key type
...) is one :class:`~usbccid.cards.provision.ProvisionError` whose message fits on one line
of stderr and never contains key material or the passphrase.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs12

from usbccid.cac.profile import Container
from usbccid.cards.provision import SUPPORTED_KEY_SIZES, ProvisionError
from usbccid.piv.keys import algorithm_of
from usbccid.piv.profile import PivSlot

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


def _load_private_key(
    data: bytes, passphrase: bytes | None, where: str, *, checked: bool = False
) -> PrivateKeyTypes:
    """One private key from a PEM block or DER (PKCS#8 or PKCS#1).

    ``checked``: these exact bytes are a key this program validated before (a stored
    card's key, by the hash its manifest records): skip cryptography's RSA key validation,
    which costs tens of milliseconds per key. Never for bytes from anywhere else.
    """
    loader = (
        serialization.load_pem_private_key if _is_pem(data) else serialization.load_der_private_key
    )
    try:
        return loader(data, password=passphrase, unsafe_skip_rsa_key_validation=checked)
    except TypeError as exc:
        # cryptography raises TypeError both for "encrypted, no password given" and for
        # "password given, key not encrypted". The second is harmless: load without it.
        if passphrase is not None:
            try:
                return loader(data, password=None, unsafe_skip_rsa_key_validation=checked)
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


def load_certificates(data: bytes, where: str) -> list[x509.Certificate]:
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
    data: bytes, passphrase: bytes | None, where: str, *, checked: bool = False
) -> tuple[list[x509.Certificate], list[PrivateKeyTypes]]:
    blocks = _pem_blocks(data)
    if not blocks:
        raise ProvisionError(f"no PEM block found in {where}")
    certificates = load_certificates(data, where)
    keys = [
        _load_private_key(block, passphrase, where, checked=checked)
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


def _check_rsa_key(key: PrivateKeyTypes, where: str) -> PrivateKeyTypes:
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
    key_checked: bool = False,
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

    ``key_checked``: ``key_data`` is a key this program validated before, byte for byte
    (see :func:`_load_private_key`); only a stored card's manifest can say so.

    Raises :class:`ProvisionError` for anything unusable: no key, no certificate, wrong
    passphrase, a key that is not RSA or of an unsupported size, or a certificate that does
    not belong to the key.
    """
    certificate, key = _load_pair(
        data, key_data, passphrase, source, key_source, _check_rsa_key, key_checked=key_checked
    )
    assert isinstance(key, rsa.RSAPrivateKey)
    return Container(label=label, certificate=certificate, private_key=key)


def load_piv_slot(
    data: bytes,
    key_data: bytes | None = None,
    *,
    ref: int,
    passphrase: bytes | str | None = None,
    source: str = "the key data",
    key_source: str = "the key data",
) -> PivSlot:
    """A PIV key (key reference ``ref``) from its certificate and private key, in the forms
    :func:`load_container` accepts; the key is RSA 1024-4096 or EC P-256/P-384."""
    certificate, key = _load_pair(data, key_data, passphrase, source, key_source, _check_piv_key)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    try:
        return PivSlot(ref=ref, certificate=certificate, private_key=key)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from None


def _check_piv_key(key: PrivateKeyTypes, where: str) -> PrivateKeyTypes:
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ProvisionError(f"the private key in {where} is neither RSA nor EC")
    try:
        algorithm_of(key)
    except ValueError as exc:
        raise ProvisionError(f"the key in {where}: {exc} (RSA 1024-4096, P-256, P-384)") from None
    return key


def _load_pair(
    data: bytes,
    key_data: bytes | None,
    passphrase: bytes | str | None,
    source: str,
    key_source: str,
    check_key: Callable[[PrivateKeyTypes, str], PrivateKeyTypes],
    *,
    key_checked: bool = False,
) -> tuple[x509.Certificate, PrivateKeyTypes]:
    password = _passphrase_bytes(passphrase)
    if key_data is None:
        if _is_pem(data):
            certificates, keys = _read_pem_bundle(data, password, source)
        else:
            certificates, keys = _read_der(data, password, source)
    else:
        certificates = load_certificates(data, source)
        if _is_pem(key_data):
            _, keys = _read_pem_bundle(key_data, password, key_source, checked=key_checked)
        else:
            keys = [_load_private_key(key_data, password, key_source, checked=key_checked)]
    key_where = source if key_data is None else key_source
    if not certificates:
        raise ProvisionError(f"no certificate found in {source}")
    if not keys:
        if key_data is None and not _is_pem(data) and not _looks_like_pkcs12(data):
            raise ProvisionError(f"{source} holds a DER certificate only: give its key too")
        raise ProvisionError(f"no private key found in {key_where}")
    if len(keys) > 1:
        raise ProvisionError(f"{key_where} holds more than one private key")
    key = check_key(keys[0], key_where)
    public_key = key.public_key()
    for certificate in certificates:
        if certificate.public_key() == public_key:
            return certificate, key
    raise ProvisionError(f"the private key in {key_where} does not match the certificate")
