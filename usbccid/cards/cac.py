"""The cards ``usbccid.cac`` and ``usbccid.piv`` emulate (``type = "cac"``, the default):
their slot table.

A slot holds either a stored card of the state directory (``card = "NAME"``, loaded by
``usbccid.cards.stored``; its edges are its own) or a card made from certificate/key files
(``containers = [...]`` and/or ``piv = [...]`` with its PIN policy, loaded by
``usbccid.cards.files``). ``edges`` says which card edges a card made from files answers:
``"cac"`` (the default: the CAC applets, from ``containers``), ``"piv"`` (the PIV Card
Application, from ``piv``), or ``"cac+piv"`` (both, one PIN)::

    [[reader.slot]]
    card = "default"

    [[reader.slot]]
    containers = [{ cert = "id.pem", key = "id.key" }, { pkcs12 = "sig.p12", passphrase = "x" }]
    pin = "123456"
    unblock_code = "12345678"
    tries = 3

    [[reader.slot]]
    edges = "piv"
    piv = [{ slot = "9a", cert = "auth.pem", key = "auth.key" }, { slot = "9c", pkcs12 = "s.p12" }]
    pin = "123456"                      # a PIV PIN is 6 to 8 digits (SP 800-73-4)
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from usbccid.cards.provision import DEFAULT_EDGES, EDGES
from usbccid.cards.source import LoadedCard
from usbccid.piv.profile import SLOT_REFS, slot_name
from usbccid.tool.schema import Checker, KeyPath

TYPE: Final = "cac"
#: the keys of a CAC slot table, beside the keys every slot has (type, inserted)
KEYS: Final = (
    "card",
    "containers",
    "pin",
    "unblock_code",
    "tries",
    "unblock_tries",
    "card_id",
    "edges",
    "piv",
)
_FILE_KEYS: Final = ("cert", "key", "pkcs12", "passphrase", "passphrase_file", "passphrase_env")
_CONTAINER_KEYS: Final = (*_FILE_KEYS, "label")
_PIV_KEYS: Final = ("slot", *_FILE_KEYS)
_PIV_PIN = re.compile(r"^[0-9]{6,8}$")
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
class PivKeyFiles:
    """A PIV key in key reference ``ref`` (9A...), from files as a container is."""

    ref: int
    source: ContainerSource


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
    edges: str = DEFAULT_EDGES
    piv: tuple[PivKeyFiles, ...] = ()


def parse(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> CardConfig:
    """The card of the CAC slot table ``t`` (at ``path``)."""
    card_type = TYPE
    stored = ck.get(t, path, "card", str)
    containers_raw = ck.get(t, path, "containers", list)
    piv_raw = ck.get(t, path, "piv", list)
    file_keys = [
        k for k in ("pin", "unblock_code", "tries", "unblock_tries", "card_id", "edges") if k in t
    ]
    if stored is not None and (containers_raw is not None or piv_raw is not None):
        key = "containers" if containers_raw is not None else "piv"
        raise ck.fail(
            (*path, key),
            f'give either card = "NAME" (a stored card) or {key}, not both',
        )
    if stored is not None:
        if not _CARD_NAME.match(stored):
            raise ck.fail((*path, "card"), f"invalid card name {stored!r}")
        if file_keys:
            what = "edges" if file_keys[0] == "edges" else "PIN policy"
            raise ck.fail(
                (*path, file_keys[0]),
                f"a stored card ({stored!r}) keeps its own {what}; set it with 'usbccid card new'",
            )
        return CardConfig(type=card_type, stored=stored, origin=ck.origin(path))
    if containers_raw is None and piv_raw is None:
        if file_keys:
            raise ck.fail((*path, file_keys[0]), 'no card: add containers = [...] or card = "NAME"')
        return CardConfig(type=card_type, origin=ck.origin(path))
    edges = ck.get(t, path, "edges", str, DEFAULT_EDGES)
    if edges not in EDGES:
        raise ck.fail((*path, "edges"), f"expected one of {', '.join(EDGES)}, got {edges!r}")
    has_cac, has_piv = "cac" in edges.split("+"), "piv" in edges.split("+")
    for key, raw, needed in (("containers", containers_raw, has_cac), ("piv", piv_raw, has_piv)):
        if raw is not None and not needed:
            raise ck.fail((*path, key), f'edges = "{edges}" has no use for {key}')
        if needed and not raw:
            what = (
                "a card needs at least one container"
                if key == "containers"
                else ("a PIV card needs at least one key")
            )
            raise ck.fail((*path, key) if raw is not None else path, what)
    containers = tuple(
        _container(ck, c, (*path, "containers", i)) for i, c in enumerate(containers_raw or [])
    )
    piv = tuple(_piv_key(ck, k, (*path, "piv", i)) for i, k in enumerate(piv_raw or []))
    seen: dict[int, int] = {}
    for i, entry in enumerate(piv):
        if entry.ref in seen:
            raise ck.fail(
                (*path, "piv", i, "slot"), f"key reference {slot_name(entry.ref)} given twice"
            )
        seen[entry.ref] = i
    retired = sorted(r for r in seen if r >= 0x82 and r <= 0x95)
    if retired != list(range(0x82, 0x82 + len(retired))):
        raise ck.fail((*path, "piv"), "retired key references are used in order from 82")
    if has_piv and "pin" in t:
        pin_value = ck.get(t, path, "pin", (str, int))
        if isinstance(pin_value, str) and not _PIV_PIN.match(pin_value):
            raise ck.fail((*path, "pin"), "a PIV PIN is 6 to 8 digits (SP 800-73-4 Part 2 §2.4.3)")
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
        edges=edges,
        piv=piv,
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


def _piv_key(ck: Checker, raw: object, path: KeyPath) -> PivKeyFiles:
    t = ck.table(raw, path, _PIV_KEYS)
    name = ck.get(t, path, "slot", str)
    if name is None:
        raise ck.fail(path, 'a PIV key needs its key reference: slot = "9a" (9a 9c 9d 9e 82-95)')
    ref = SLOT_REFS.get(name.lower())
    if ref is None:
        raise ck.fail(
            (*path, "slot"), f"unknown PIV key reference {name!r} (9a 9c 9d 9e, 82 to 95)"
        )
    return PivKeyFiles(ref=ref, source=_files(ck, t, path))


def _container(ck: Checker, raw: object, path: KeyPath) -> ContainerSource:
    return _files(ck, ck.table(raw, path, _CONTAINER_KEYS), path)


def _files(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> ContainerSource:
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
