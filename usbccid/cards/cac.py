"""The CAC cards ``usbccid.cac`` emulates (``type = "cac"``, the default): their slot table.

A CAC slot holds either a stored card of the state directory (``card = "NAME"``, loaded by
``usbccid.cards.stored``) or a card made from certificate/key files (``containers = [...]``
with its PIN policy, loaded by ``usbccid.cards.files``)::

    [[reader.slot]]
    card = "default"

    [[reader.slot]]
    containers = [{ cert = "id.pem", key = "id.key" }, { pkcs12 = "sig.p12", passphrase = "x" }]
    pin = "123456"
    unblock_code = "12345678"
    tries = 3
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from usbccid.cards.source import LoadedCard
from usbccid.tool.schema import Checker, KeyPath

TYPE: Final = "cac"
#: the keys of a CAC slot table, beside the keys every slot has (type, inserted)
KEYS: Final = ("card", "containers", "pin", "unblock_code", "tries", "unblock_tries", "card_id")
_CONTAINER_KEYS: Final = (
    "cert",
    "key",
    "pkcs12",
    "passphrase",
    "passphrase_file",
    "passphrase_env",
    "label",
)
_CARD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_DIGITS = re.compile(r"^[0-9]{4,8}$")


@dataclass(frozen=True)
class CertKeyFiles:
    """A container from a certificate file and a private key file (PEM or DER)."""

    cert: Path
    key: Path
    passphrase: str | None = None
    passphrase_file: Path | None = None  # read when the card is loaded
    passphrase_env: str | None = None  # an environment variable, read when loaded
    label: str | None = None
    origin: str = ""  # "FILE:LINE" of the entry, for errors found when loading the files


@dataclass(frozen=True)
class Pkcs12File:
    """A container from a PKCS#12 file (certificate and key)."""

    path: Path
    passphrase: str | None = None
    passphrase_file: Path | None = None
    passphrase_env: str | None = None
    label: str | None = None
    origin: str = ""


ContainerSource = CertKeyFiles | Pkcs12File


@dataclass(frozen=True)
class PinConfig:
    """PIN policy of a card made from files. None: generated (and printed) at first use."""

    pin: str | None = None
    unblock_code: str | None = None
    tries: int = 3
    unblock_tries: int = 10


@dataclass(frozen=True)
class CardConfig:
    """What is in a slot.

    ``stored`` names a card of the state directory (``"default"`` is the generated default
    card, others are made by ``usbccid card new --name``); otherwise ``containers`` lists
    the certificate/key files the card is made of.
    """

    type: str = "cac"
    stored: str | None = "default"
    containers: tuple[ContainerSource, ...] = ()
    pin: PinConfig = field(default_factory=PinConfig)
    card_id: bytes | None = None
    origin: str = ""


def parse(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> CardConfig:
    """The card of the CAC slot table ``t`` (at ``path``)."""
    card_type = TYPE
    stored = ck.get(t, path, "card", str)
    containers_raw = ck.get(t, path, "containers", list)
    file_keys = [k for k in ("pin", "unblock_code", "tries", "unblock_tries", "card_id") if k in t]
    if stored is not None and containers_raw is not None:
        raise ck.fail(
            (*path, "containers"),
            'give either card = "NAME" (a stored card) or containers, not both',
        )
    if stored is not None:
        if not _CARD_NAME.match(stored):
            raise ck.fail((*path, "card"), f"invalid card name {stored!r}")
        if file_keys:
            raise ck.fail(
                (*path, file_keys[0]),
                f"a stored card ({stored!r}) keeps its own PIN "
                "policy; set it with 'usbccid card new'",
            )
        return CardConfig(type=card_type, stored=stored, origin=ck.origin(path))
    if containers_raw is None:
        if file_keys:
            raise ck.fail((*path, file_keys[0]), 'no card: add containers = [...] or card = "NAME"')
        return CardConfig(type=card_type, origin=ck.origin(path))
    if not containers_raw:
        raise ck.fail((*path, "containers"), "a card needs at least one container")
    containers = tuple(
        _container(ck, c, (*path, "containers", i)) for i, c in enumerate(containers_raw)
    )
    pin = PinConfig(
        pin=_digits(ck, t, path, "pin"),
        unblock_code=_digits(ck, t, path, "unblock_code"),
        tries=_count(ck, t, path, "tries", 3),
        unblock_tries=_count(ck, t, path, "unblock_tries", 10),
    )
    card_id = None
    raw_id = ck.get(t, path, "card_id", str)
    if raw_id is not None:
        try:
            card_id = bytes.fromhex(raw_id)
        except ValueError:
            raise ck.fail((*path, "card_id"), "expected hexadecimal digits") from None
        if not 1 <= len(card_id) <= 16:
            raise ck.fail((*path, "card_id"), "must be 1 to 16 bytes")
    return CardConfig(
        type=card_type,
        stored=None,
        containers=containers,
        pin=pin,
        card_id=card_id,
        origin=ck.origin(path),
    )


def load(config: CardConfig, state_dir: Path, now: datetime) -> LoadedCard:
    """The card: a stored one, or one made from files.

    Raises:
        usbccid.cards.source.CardLoadError: a file cannot be read or used (one line).
        usbccid.cards.store.StateError: the state directory is unusable.
    """
    from usbccid.cards import files, stored

    if config.stored is not None:
        return stored.load(config.stored, state_dir, now)
    return files.load(config, state_dir, now)


def _digits(ck: Checker, t: Mapping[str, Any], path: KeyPath, key: str) -> str | None:
    value: str | int | None = ck.get(t, path, key, (str, int))
    if value is None:
        return None
    if isinstance(value, int):
        raise ck.fail((*path, key), 'write it as a string ("0123"), so that leading zeros stay')
    if not _DIGITS.match(value):
        what = "PIN" if key == "pin" else "unblock code"
        raise ck.fail(
            (*path, key),
            f"the {what} must be 4 to 8 digits, got {len(value)} "
            f"character{'s' if len(value) != 1 else ''}"
            + ("" if value.isdigit() else " (digits only)"),
        )
    return value


def _count(ck: Checker, t: Mapping[str, Any], path: KeyPath, key: str, default: int) -> int:
    value: int = ck.get(t, path, key, int, default)
    if not 1 <= value <= 15:
        raise ck.fail((*path, key), f"must be 1 to 15, got {value}")
    return value


def _container(ck: Checker, raw: object, path: KeyPath) -> ContainerSource:
    t = ck.table(raw, path, _CONTAINER_KEYS)
    passphrase = ck.get(t, path, "passphrase", str)
    given = [k for k in ("passphrase", "passphrase_file", "passphrase_env") if k in t]
    if len(given) > 1:
        raise ck.fail((*path, given[1]), f"give only one of {', '.join(given)}")
    passphrase_file = ck.file(t, path, "passphrase_file") if "passphrase_file" in t else None
    passphrase_env: str | None = ck.get(t, path, "passphrase_env", str)
    label = ck.get(t, path, "label", str)
    if "pkcs12" in t:
        if "cert" in t or "key" in t:
            raise ck.fail((*path, "pkcs12"), "give either pkcs12 or cert + key, not both")
        return Pkcs12File(
            path=ck.file(t, path, "pkcs12"),
            passphrase=passphrase,
            passphrase_file=passphrase_file,
            passphrase_env=passphrase_env,
            label=label,
            origin=ck.origin(path),
        )
    if "cert" not in t or "key" not in t:
        raise ck.fail(path, "a container needs cert and key (or pkcs12)")
    return CertKeyFiles(
        cert=ck.file(t, path, "cert"),
        key=ck.file(t, path, "key"),
        passphrase=passphrase,
        passphrase_file=passphrase_file,
        passphrase_env=passphrase_env,
        label=label,
        origin=ck.origin(path),
    )
