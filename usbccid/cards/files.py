"""Cards made from certificate and key files (``[[reader.slot]]`` with ``containers``).

Each container is a certificate with its RSA key as PEM/DER files, or one PKCS#12 file
(``usbccid.cards.keys.load_container`` reads them); each PIV key the same, RSA or EC
(``load_piv_slot``). The PIN state is kept in
``<state>/pin-state/<card id>.json``, the card ID being ``card_id`` from the configuration
or else derived from the certificates, so the same files give the same card (and the same
PIN state) across restarts.
"""

from __future__ import annotations

import hashlib
import os
from datetime import datetime
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from usbccid.cac.profile import CardProfile, Container
from usbccid.cards.cac import CardConfig, CertKeyFiles, PivKeyFiles, Pkcs12File
from usbccid.cards.keys import load_container, load_piv_slot
from usbccid.cards.piv import EmulatedPiv, describe, emulated
from usbccid.cards.provision import CARD_ID_LENGTH, ProvisionError, container_label, make_pin_policy
from usbccid.cards.source import CardLoadError, EmulatedCac
from usbccid.cards.store import FilePinStateStore
from usbccid.piv.profile import PivSlot

PIN_STATE_DIR = "pin-state"


def load(config: CardConfig, state_dir: Path, now: datetime) -> EmulatedCac | EmulatedPiv:
    """The card ``config``'s files describe.

    Raises:
        CardLoadError: a file cannot be read or used; the message names it.
        usbccid.cards.store.StateError: the PIN state file is unusable.
    """
    containers = [_container(index, source) for index, source in enumerate(config.containers)]
    piv_slots = tuple(_piv_key(entry) for entry in config.piv)
    pin = config.pin
    try:
        policy = make_pin_policy(
            **({"pin": pin.pin.encode()} if pin.pin else {}),
            **({"unblock_code": pin.unblock_code.encode()} if pin.unblock_code else {}),
            max_tries=pin.tries,
            max_unblock_tries=pin.unblock_tries,
        )
    except ProvisionError as exc:
        raise CardLoadError(f"{config.origin}: {exc}") from None
    card_id = config.card_id
    if card_id is None:
        digest = hashlib.sha256()
        for c in containers:
            digest.update(c.certificate.fingerprint(hashes.SHA256()))
        for slot in piv_slots:  # a CAC's card ID stays what it was before PIV existed
            digest.update(bytes((slot.ref,)) + slot.certificate.fingerprint(hashes.SHA256()))
        card_id = digest.digest()[:CARD_ID_LENGTH]
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)
    store = FilePinStateStore(_pin_state_path(state_dir, card_id))
    store.load()  # a corrupt file stops us now, not in the middle of an APDU
    what = describe(config.edges, len(containers), len(piv_slots))
    return emulated(profile, piv_slots, config.edges, store, f"card from files ({what})")


def _piv_key(entry: PivKeyFiles) -> PivSlot:
    source = entry.source
    try:
        if isinstance(source, CertKeyFiles):
            return load_piv_slot(
                _read(source.cert, source.origin),
                _read(source.key, source.origin),
                ref=entry.ref,
                passphrase=_passphrase(source),
                source=str(source.cert),
                key_source=str(source.key),
            )
        return load_piv_slot(
            _read(source.path, source.origin),
            ref=entry.ref,
            passphrase=_passphrase(source),
            source=str(source.path),
        )
    except ProvisionError as exc:
        raise CardLoadError(f"{source.origin}: {exc}") from None


def _container(index: int, source: CertKeyFiles | Pkcs12File) -> Container:
    label = source.label or container_label(index)
    try:
        if isinstance(source, CertKeyFiles):
            return load_container(
                _read(source.cert, source.origin),
                _read(source.key, source.origin),
                label=label,
                passphrase=_passphrase(source),
                source=str(source.cert),
                key_source=str(source.key),
            )
        return load_container(
            _read(source.path, source.origin),
            label=label,
            passphrase=_passphrase(source),
            source=str(source.path),
        )
    except ProvisionError as exc:
        raise CardLoadError(f"{source.origin}: {exc}") from None


def _passphrase(source: CertKeyFiles | Pkcs12File) -> str | None:
    if source.passphrase_file is not None:
        data = _read(source.passphrase_file, source.origin)
        return data.decode("utf-8", "replace").rstrip("\r\n")
    if source.passphrase_env is not None:
        value = os.environ.get(source.passphrase_env)
        if value is None:
            raise CardLoadError(
                f"{source.origin}: environment variable {source.passphrase_env} is not set"
            )
        return value
    return source.passphrase


def _pin_state_path(state_dir: Path, card_id: bytes) -> Path:
    directory = state_dir / PIN_STATE_DIR
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise CardLoadError(f"cannot create {directory}: {exc.strerror or exc}") from None
    return directory / f"{card_id.hex()}.json"


def _read(path: Path, origin: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CardLoadError(f"{origin}: cannot read {path}: {exc.strerror or exc}") from None
