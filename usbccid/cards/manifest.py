"""A card as named byte strings, and back (``usbccid.cards.store`` keeps them as files).

:func:`card_to_files` gives a JSON manifest, PEM certificates, PKCS#8 PEM keys and the CA
certificate; :func:`card_from_files` reads them back. The manifest records the SHA-256 of
each key file it wrote: every key stored was generated here or validated when it was
imported, so reading those same bytes back skips cryptography's RSA key validation (tens
of milliseconds per key, which made a server of many readers slow to start).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization

from usbccid.cac.profile import CardProfile, PinPolicy
from usbccid.cards.generate import ProvisionedCard
from usbccid.cards.keys import load_certificates, load_container
from usbccid.cards.provision import (
    CA_CERT_FILE,
    MANIFEST_FILE,
    MAX_CONTAINERS,
    ProvisionError,
    validate_pin_policy,
)

# --------------------------------------------------------------------------------------
# To and from named byte strings (stored as files by usbccid.cards.store)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


_MANIFEST_FORMAT = "usbccid-card"
_MANIFEST_VERSION = 1


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
        entries.append(
            {
                "label": container.label,
                "certificate": cert_name,
                "key": key_name,
                # The key object was generated here or validated when it was imported
                # (load_container): record which bytes hold it, so that loading them
                # again can skip the RSA key validation (see card_from_files).
                "key_sha256": hashlib.sha256(files[key_name]).hexdigest(),
            }
        )
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
        key_data = read(key_name)
        # A key file that is still the one card_to_files wrote (and validated) loads
        # without the validation; anything else (an older manifest, an edited file) is
        # validated in full.
        recorded = entry.get("key_sha256")
        checked = isinstance(recorded, str) and recorded == hashlib.sha256(key_data).hexdigest()
        containers.append(
            load_container(
                read(cert_name),
                key_data,
                label=_field(entry, "label", str, what),
                source=cert_name,
                key_source=key_name,
                key_checked=checked,
            )
        )
    ca_name = manifest.get("ca_certificate")
    ca_certificate = None
    if ca_name is not None:
        ca_name = _file_name(ca_name, what)
        ca_certs = load_certificates(read(ca_name), ca_name)
        if len(ca_certs) != 1:
            raise ProvisionError(f"{ca_name} must hold exactly one certificate")
        ca_certificate = ca_certs[0]
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)
    return ProvisionedCard(profile=profile, ca_certificate=ca_certificate)
