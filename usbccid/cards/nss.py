"""Cards from an NSS database: QEMU's ``ccid-card-emulated,backend=certificates``.

The inputs are QEMU's (hw/usb/ccid-card-emulated.c, passed on to libcacard as
``db="..." use_hw=no soft=(,Virtual Reader,CAC,,cert1,cert2,cert3)``): a database
directory and certificate nicknames, in container order. As in libcacard
(vcard_emul_nss.c): the private keys never leave the database; the host's VERIFY logs
in to it with the PIN it sends (the database password is the card PIN; a database
without a password needs none), and power off logs out.

NSS itself does the private operations: its softoken (``libsoftokn3.so``) is loaded as
a plain PKCS#11 module through the same machinery as the ``pkcs11`` source
(:mod:`usbccid.cards.pkcs11`). Softokn is initialised once per process without a
database (its default parameters, pkcs11.c ``LIB_PARAM_DEFAULT``, plus ``readOnly``);
each database is then opened read-only as a slot of its own, the way NSS opens extra
databases (pk11util.c ``SECMOD_OpenNewSlot``: a ``CKO_NSS_NEWSLOT`` pseudo-object whose
``CKA_NSS_MODULE_SPEC`` is ``tokens=[0xID=<configdir=...>]``, slot IDs 4..100,
softoken/pkcs11.c ``sftk_CreateNewSlot``). So several databases work side by side, and a
database can be closed again (``CKO_NSS_DELSLOT``), which to the slot is a token removal.

A certificate's nickname is its ``CKA_LABEL``; its key has the same ``CKA_ID`` (NSS
sets both to the SHA-1 of the modulus, pk11wrap/pk11akey.c ``PK11_MakeIDFromPubKey``).
"""

from __future__ import annotations

import contextlib
import ctypes.util
import sqlite3
import struct
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

import pkcs11
from cryptography.hazmat.primitives.asymmetric import rsa
from pkcs11 import exceptions as p11x

from usbccid.cac.applets.pki import MAX_PKI_CONTAINERS
from usbccid.cac.card import CacCard
from usbccid.cac.errors import CardError
from usbccid.cac.profile import TokenCardProfile
from usbccid.cards import _cryptoki
from usbccid.cards.pkcs11 import (
    Module,
    SourceInfo,
    TokenCard,
    TokenCertificate,
    TokenConnection,
    TokenSourceError,
    card_id_for,
    container_info,
    make_card,
    read_secret,
    token_certificates,
)
from usbccid.tool.schema import Checker, KeyPath

#: Softokn with no database of its own (its built-in default, read-only).
LIBRARY_PARAMETERS = (
    "configdir='' certPrefix='' keyPrefix='' secmod='' flags=readOnly,noCertDB,noModDB"
)
SOFTOKN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/libsoftokn3.so",
    "/usr/lib/aarch64-linux-gnu/libsoftokn3.so",
    "/usr/lib64/libsoftokn3.so",
    "/usr/lib/libsoftokn3.so",
)

CKO_NSS = 0x80000000 | 0x4E534350  # CKO_VENDOR_DEFINED | NSSCK_VENDOR_NSS (pkcs11n.h)
CKO_NSS_NEWSLOT = CKO_NSS + 5
CKO_NSS_DELSLOT = CKO_NSS + 6
CKA_NSS_MODULE_SPEC = CKO_NSS + 24
CKA_CLASS = 0x0
NETSCAPE_SLOT_ID = 1  # softoken/pkcs11i.h: the crypto slot, which may create new slots
MIN_USER_SLOT_ID = 4  # softoken/pkcs11ni.h SFTK_MIN_USER_SLOT_ID / SFTK_MAX_USER_SLOT_ID
MAX_USER_SLOT_ID = 100

_VENDOR_ERRORS = {
    CKO_NSS + 1: "CKR_NSS_CERTDB_FAILED",
    CKO_NSS + 2: "CKR_NSS_KEYDB_FAILED",
}


def softokn_path() -> str:
    """Where NSS's softoken is (Debian: package libnss3)."""
    for path in SOFTOKN_PATHS:
        if Path(path).exists():
            return path
    found = ctypes.util.find_library("softokn3")
    if found is None:
        raise TokenSourceError("NSS softoken (libsoftokn3.so, Debian libnss3) is not installed")
    return found


@dataclass(frozen=True)
class DbLocation:
    """``sql:/dir`` (cert9.db, key4.db), ``dbm:/dir`` (legacy cert8.db, key3.db) or a bare
    directory (``sql:``, NSS's default since 3.35)."""

    kind: str
    directory: Path

    @classmethod
    def parse(cls, db: str) -> DbLocation:
        kind, sep, rest = db.partition(":")
        if sep and kind in ("sql", "dbm"):
            return cls(kind, Path(rest).expanduser().absolute())
        return cls("sql", Path(db).expanduser().absolute())

    def __str__(self) -> str:
        return f"{self.kind}:{self.directory}"

    @property
    def files(self) -> tuple[str, str]:
        return ("cert9.db", "key4.db") if self.kind == "sql" else ("cert8.db", "key3.db")

    def check(self) -> None:
        """Fail early, and clearly, on a database that is not there."""
        if not self.directory.is_dir():
            raise TokenSourceError(f"NSS database {self}: no such directory")
        missing = [f for f in self.files if not (self.directory / f).is_file()]
        if missing:
            raise TokenSourceError(
                f"NSS database {self}: not an NSS {self.kind}: database (no {', '.join(missing)})"
            )

    def diagnose(self) -> str:
        """Why softokn could not open it, as far as we can tell (after the fact)."""
        if self.kind == "sql":
            for name in self.files:
                uri = f"file:{self.directory / name}?mode=ro"
                try:
                    with sqlite3.connect(uri, uri=True, timeout=0.1) as db:
                        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
                except sqlite3.OperationalError as exc:
                    if "locked" in str(exc):
                        return f"{name} is locked by another process"
                    return f"{name}: {exc}"
                except sqlite3.DatabaseError as exc:
                    return f"{name}: {exc}"
        return "damaged, or not readable"


def _quote(value: str) -> str:
    """A value for NSS's parameter parser (utilpars.c): single quotes, ``\\`` escapes."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _double_escape(spec: str) -> str:
    """NSSUTIL_DoubleEscape(spec, '>', ']'): the spec inside ``tokens=[0xN=<...>]``."""
    once = spec.replace("\\", "\\\\").replace(">", "\\>")
    return once.replace("\\", "\\\\").replace("]", "\\]")


class Softokn:
    """NSS's softoken in this process, and the databases open in it (one slot each)."""

    _lock = threading.Lock()
    _open: dict[str, int] = {}  # noqa: RUF012 - str(DbLocation) -> slot ID, process-wide

    def __init__(self, path: str | None = None) -> None:
        self.path = path or softokn_path()
        self.module = Module.load(self.path, LIBRARY_PARAMETERS)

    def _session(self, slot_id: int) -> pkcs11.Session:
        for slot in self.module.lib.get_slots():
            if slot.slot_id == slot_id:
                return slot.get_token().open()
        raise TokenSourceError(f"NSS softoken {self.path}: no slot {slot_id}")  # pragma: no cover

    def _slot_op(self, cls: int, slot_id: int, spec: str) -> None:
        """Create the pseudo-object: NEWSLOT on the crypto slot, DELSLOT on the slot itself."""
        session = self._session(NETSCAPE_SLOT_ID if cls == CKO_NSS_NEWSLOT else slot_id)
        try:
            handle = int(session.handle)  # type: ignore[attr-defined]
            self.module.functions.create_pseudo_object(
                handle,
                [
                    (CKA_CLASS, struct.pack("=L", cls)),
                    (CKA_NSS_MODULE_SPEC, spec.encode() + b"\0"),
                ],
            )
        finally:
            # After DELSLOT the slot's sessions are gone, this one included.
            with contextlib.suppress(p11x.PKCS11Error):
                session.close()

    def token_label(self, slot_id: int) -> str:
        return f"usbccid NSS db {slot_id}"

    def open_database(self, location: DbLocation) -> pkcs11.Token:
        """The token of ``location``, opening it read-only as a new slot if needed.

        Raises:
            TokenSourceError: not a database, or softokn cannot open it (locked, ...).
        """
        location.check()
        key = str(location)
        with self._lock:
            slot_id = self._open.get(key)
            if slot_id is None:
                used = set(self._open.values())
                free = [i for i in range(MIN_USER_SLOT_ID, MAX_USER_SLOT_ID) if i not in used]
                if not free:
                    raise TokenSourceError(f"NSS database {location}: too many databases open")
                slot_id = free[0]
                params = " ".join(
                    (
                        f"configdir={_quote(key)}",
                        "certPrefix='' keyPrefix=''",
                        f"tokenDescription={_quote(self.token_label(slot_id))}",
                        "flags=readOnly",
                    )
                )
                spec = f"tokens=[0x{slot_id:x}=<{_double_escape(params)}>]"
                try:
                    self._slot_op(CKO_NSS_NEWSLOT, slot_id, spec)
                except _cryptoki.CryptokiError as exc:
                    name = _VENDOR_ERRORS.get(exc.rv, _cryptoki.rv_name(exc.rv))
                    raise TokenSourceError(
                        f"NSS database {location}: cannot open it ({name}): {location.diagnose()}"
                    ) from None
                self._open[key] = slot_id
        for slot in self.module.lib.get_slots(token_present=True):
            if slot.slot_id == slot_id:
                try:
                    return slot.get_token()
                except p11x.PKCS11Error as exc:
                    raise TokenSourceError(f"NSS database {location}: {exc!r}") from None
        raise TokenSourceError(f"NSS database {location}: its slot has no token")

    def close_database(self, location: DbLocation) -> None:
        """Close ``location``'s slot (``CKO_NSS_DELSLOT``): its token is removed."""
        key = str(location)
        with self._lock:
            slot_id = self._open.pop(key, None)
            if slot_id is None:
                return
            self._slot_op(CKO_NSS_DELSLOT, slot_id, f"tokens=[0x{slot_id:x}=<>]")


@dataclass(frozen=True)
class NssConfig:
    """An ``nss`` card source: QEMU's ``db=`` and ``cert1=``, ``cert2=``, ... nicknames."""

    db: str
    certs: tuple[str, ...]
    softokn: str | None = None

    def describe(self) -> str:
        return f"NSS database {DbLocation.parse(self.db)}"


def pick_certificates(
    certificates: Sequence[TokenCertificate], nicknames: Sequence[str], where: str
) -> list[TokenCertificate]:
    """The certificates named ``nicknames`` (``CKA_LABEL``), in that order.

    Several certificates with one nickname (a renewed one next to the old): the one
    valid longest, as NSS prefers the newest.

    Raises:
        TokenSourceError: nicknames that name no certificate (all of them, in one line).
    """
    if not nicknames:
        raise TokenSourceError(f"{where}: no certificate nicknames given")
    if len(nicknames) > MAX_PKI_CONTAINERS:
        raise TokenSourceError(
            f"{where}: {len(nicknames)} certificates; a CAC holds at most {MAX_PKI_CONTAINERS}"
        )
    by_label: dict[str, TokenCertificate] = {}
    for cert in certificates:
        best = by_label.get(cert.label)
        after = cert.certificate.not_valid_after_utc
        if best is None or after > best.certificate.not_valid_after_utc:
            by_label[cert.label] = cert
    unknown = [n for n in nicknames if n not in by_label]
    if unknown:
        have = ", ".join(sorted(by_label)) or "none"
        names = ", ".join(repr(n) for n in unknown)
        raise TokenSourceError(
            f"{where}: no certificate with nickname {names} (the database has: {have})"
        )
    chosen = [by_label[n] for n in nicknames]
    for cert in chosen:
        if not isinstance(cert.certificate.public_key(), rsa.RSAPublicKey):
            raise TokenSourceError(f"{where}: {cert.label!r} has no RSA key (a CAC holds RSA only)")
    return chosen


class NssSource:
    """Certificates of an NSS database, by nickname, as one card; keys stay in NSS."""

    kind = "nss"

    def __init__(self, config: NssConfig) -> None:
        self.config = config
        self.location = DbLocation.parse(config.db)
        self.card: CacCard | None = None
        self._connection: TokenConnection | None = None

    def softokn(self) -> Softokn:
        return Softokn(self.config.softokn)

    @property
    def place(self) -> object:
        return ("nss", self.location)

    def _where(self) -> str:
        return f"NSS database {self.location}"

    def _connect(self) -> tuple[TokenConnection, list[TokenCertificate]]:
        softokn = self.softokn()
        token = softokn.open_database(self.location)
        connection = TokenConnection(softokn.module, token)
        try:
            certificates = token_certificates(connection.session, self._where(), rsa_only=False)
            chosen = pick_certificates(certificates, self.config.certs, self._where())
        except BaseException:
            connection.close()
            raise
        return connection, chosen

    def open(self) -> CacCard:
        """The card: one container per nickname, in order.

        Raises:
            TokenSourceError: missing or locked database, unknown nicknames, ...
        """
        connection, chosen = self._connect()
        card_id = card_id_for(self.kind, str(self.location), chosen[0].certificate)
        self.card = make_card(connection, chosen, card_id)
        if self._connection is not None:
            self._connection.close()
        self._connection = connection
        return self.card

    @property
    def alive(self) -> bool:
        return self._connection is not None and self._connection.alive

    @property
    def profile(self) -> TokenCardProfile | None:
        if self.card is None:
            return None
        profile = self.card.profile
        assert isinstance(profile, TokenCardProfile)
        return profile

    def check(self, password: str | None = None) -> SourceInfo:
        """The start-up checks; with ``password``, that it opens the database's keys.

        Raises:
            TokenSourceError: the first problem, in one line.
        """
        connection, chosen = self._connect()
        try:
            info = connection.pin_info()
            checked = False
            if password is not None and info.login_required:
                connection.logout()
                if not connection.login(password.encode()):
                    raise TokenSourceError(f"{self._where()}: wrong password")
                connection.logout()
                checked = True
            return SourceInfo(
                description=self._where(),
                token_label=connection.token.label.strip(),
                token_serial=connection.serial,
                raw_rsa=connection.has_raw_rsa,
                login_required=info.login_required,
                containers=container_info(chosen),
                pin_checked=checked,
            )
        except CardError as exc:
            raise TokenSourceError(f"{self._where()}: {exc}") from None
        finally:
            connection.close()


# --------------------------------------------------------------------------- as a slot's card

TYPE: Final = "nss"
#: the keys of an nss slot table, beside the keys every slot has (type, inserted)
KEYS: Final = ("db", "certs", "softokn", "check_password_file", "check_password_env")

_SOURCES: dict[NssConfig, NssSource] = {}
_SOURCES_LOCK = threading.Lock()


@dataclass(frozen=True)
class NssSlotConfig:
    """``[[reader.slot]] type = "nss"``: QEMU's ``db=`` and ``cert1=``..``cert3=``::

    [[reader.slot]]
    type = "nss"
    db = "sql:/etc/pki/nssdb"          # sql:DIR, dbm:DIR, or DIR (sql:); relative to this file
    certs = ["cert1", "cert2", "cert3"] # nicknames, in container order (1 to 16)
    check_password_file = "db.pw"       # optional: check the password at start-up
    """

    source: NssConfig
    check_password_file: Path | None = None
    check_password_env: str | None = None
    type: str = TYPE
    origin: str = ""


def parse(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> NssSlotConfig:
    """The card of the nss slot table ``t`` (at ``path``)."""
    db = ck.get(t, path, "db", str)
    if db is None:
        raise ck.fail(path, "missing key 'db' (the NSS database, \"sql:/path\")")
    kind, sep, rest = db.partition(":")
    if not (sep and kind in ("sql", "dbm")):
        kind, rest = "sql", db
    directory = ck.relative(rest)  # relative to the configuration file
    assert directory is not None
    location = DbLocation(kind, directory.absolute())
    certs = ck.get(t, path, "certs", list)
    if certs is None:
        raise ck.fail(path, "missing key 'certs' (certificate nicknames, in container order)")
    if not 1 <= len(certs) <= MAX_PKI_CONTAINERS:
        raise ck.fail((*path, "certs"), f"1 to {MAX_PKI_CONTAINERS} nicknames")
    for i, nick in enumerate(certs):
        if not isinstance(nick, str) or not nick:
            raise ck.fail((*path, "certs", i), "expected a certificate nickname (a string)")
    softokn = ck.get(t, path, "softokn", str)
    if softokn is not None and "/" in softokn:
        softokn = str(ck.file(t, path, "softokn"))
    if "check_password_file" in t and "check_password_env" in t:
        raise ck.fail(
            (*path, "check_password_env"),
            "give only one of check_password_file, check_password_env",
        )
    pw_file = ck.file(t, path, "check_password_file") if "check_password_file" in t else None
    return NssSlotConfig(
        source=NssConfig(str(location), tuple(certs), softokn),
        check_password_file=pw_file,
        check_password_env=ck.get(t, path, "check_password_env", str),
        origin=ck.origin(path),
    )


def load(config: NssSlotConfig, state_dir: Path, now: datetime) -> TokenCard:
    """The database's card (its start-up checks, and the password check if configured).

    Raises:
        TokenSourceError: a ``CardLoadError``: database, nicknames, password; one line.
    """
    with _SOURCES_LOCK:
        source = _SOURCES.get(config.source)
        if source is None:
            source = _SOURCES[config.source] = NssSource(config.source)
    try:
        if not source.alive:
            source.open()
            # Checked when the card is made only (the check logs the database out).
            password = read_secret(
                config.check_password_file, config.check_password_env, "database password"
            )
            if password is not None:
                source.check(password)
    except TokenSourceError as exc:
        raise TokenSourceError(f"{config.origin}: {exc}") from None
    names = ", ".join(config.source.certs)
    return TokenCard(source, f"NSS database {source.location} ({names})")
