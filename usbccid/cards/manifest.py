"""A card as named byte strings, and back (``usbccid.cards.store`` keeps them as files).

:func:`card_to_files` gives a JSON manifest, PEM certificates, PKCS#8 PEM keys (CAC
containers ``container-NN.*``, PIV keys ``piv-<key reference>.*``) and the CA certificate;
:func:`card_from_files` reads them back. The manifest records the SHA-256 of each container
key file it wrote: every key stored was generated here or validated when it was imported,
so reading those same bytes back skips cryptography's RSA key validation (tens of
milliseconds per key, which made a server of many readers slow to start).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization

from usbccid.cac.profile import CardProfile, PinPolicy
from usbccid.cards.generate import ProvisionedCard, check_edges
from usbccid.cards.keys import load_certificates, load_container, load_piv_slot
from usbccid.cards.provision import (
    CA_CERT_FILE,
    DEFAULT_EDGES,
    MANIFEST_FILE,
    ProvisionError,
    validate_pin_policy,
)
from usbccid.piv.keys import PivPrivateKey
from usbccid.piv.profile import SLOT_REFS, slot_name

# --------------------------------------------------------------------------------------
# To and from named byte strings (stored as files by usbccid.cards.store)

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


_MANIFEST_FORMAT = "usbccid-card"
#: Version 1: a CAC (containers only). Version 2 adds "edges" and "piv_slots"; a card with
#: only a CAC edge is still written as version 1, so older usbccid versions read it.
_MANIFEST_VERSION = 1
_MANIFEST_VERSION_PIV = 2


def _certificate_file(index: int) -> str:
    return f"container-{index:02d}.cert.pem"


def _key_file(index: int) -> str:
    return f"container-{index:02d}.key.pem"


def _piv_file(ref: int, what: str) -> str:
    return f"piv-{slot_name(ref)}.{what}.pem"


def _private_pem(key: PivPrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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
    check_edges(card.edges, len(profile.containers), len(card.piv_slots))
    files: dict[str, bytes] = {}
    entries = []
    for index, container in enumerate(profile.containers):
        cert_name, key_name = _certificate_file(index), _key_file(index)
        files[cert_name] = container.certificate.public_bytes(serialization.Encoding.PEM)
        files[key_name] = _private_pem(container.private_key)
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
    piv_entries = []
    for slot in card.piv_slots:
        cert_name, key_name = _piv_file(slot.ref, "cert"), _piv_file(slot.ref, "key")
        files[cert_name] = slot.certificate.public_bytes(serialization.Encoding.PEM)
        files[key_name] = _private_pem(slot.private_key)
        piv_entries.append({"slot": slot_name(slot.ref), "certificate": cert_name, "key": key_name})
    if card.ca_certificate is not None:
        files[CA_CERT_FILE] = card.ca_certificate.public_bytes(serialization.Encoding.PEM)
    piv = card.edges != DEFAULT_EDGES
    manifest: dict[str, object] = {
        "format": _MANIFEST_FORMAT,
        "version": _MANIFEST_VERSION_PIV if piv else _MANIFEST_VERSION,
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
    if piv:
        manifest["edges"] = card.edges
        manifest["piv_slots"] = piv_entries
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
    version = manifest.get("version")
    if version not in (_MANIFEST_VERSION, _MANIFEST_VERSION_PIV):
        raise ProvisionError(f"{what} has unsupported version {version!r}")
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
    edges = DEFAULT_EDGES
    piv_entries: list[Any] = []
    if version == _MANIFEST_VERSION_PIV:
        edges = _field(manifest, "edges", str, what)
        piv_entries = _field(manifest, "piv_slots", list, what)
    entries = _field(manifest, "containers", list, what)
    try:
        check_edges(edges, len(entries), len(piv_entries))
    except ProvisionError as exc:
        raise ProvisionError(f"{what}: {exc}") from None
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
    piv_slots = []
    for entry in piv_entries:
        if not isinstance(entry, dict):
            raise ProvisionError(f"{what}: a PIV key entry is not an object")
        ref = _slot_ref(_field(entry, "slot", str, what), what)
        cert_name = _file_name(entry.get("certificate"), what)
        key_name = _file_name(entry.get("key"), what)
        piv_slots.append(
            load_piv_slot(
                read(cert_name), read(key_name), ref=ref, source=cert_name, key_source=key_name
            )
        )
    if len({s.ref for s in piv_slots}) != len(piv_slots):
        raise ProvisionError(f"{what}: a PIV key reference is used twice")
    ca_name = manifest.get("ca_certificate")
    ca_certificate = None
    if ca_name is not None:
        ca_name = _file_name(ca_name, what)
        ca_certs = load_certificates(read(ca_name), ca_name)
        if len(ca_certs) != 1:
            raise ProvisionError(f"{ca_name} must hold exactly one certificate")
        ca_certificate = ca_certs[0]
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)
    return ProvisionedCard(
        profile=profile, ca_certificate=ca_certificate, piv_slots=tuple(piv_slots), edges=edges
    )


def _slot_ref(name: str, what: str) -> int:
    ref = SLOT_REFS.get(name.lower())
    if ref is None:
        raise ProvisionError(f"{what}: unknown PIV key reference {name!r}")
    return ref
