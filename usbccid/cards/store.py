"""Where card state lives on disk: the state directory, stored cards, PIN state.

This module does file I/O; it sits outside the sans-IO layers and feeds them. Layout::

    <state_dir>/                    created 0700 if we create it
      cards/                        0700
        <name>/                     0700, one per card ("default" unless named)
          card.json                 manifest: labels, card ID, PIN policy   (0600)
          ca.pem                    the test CA: what a host should trust  (0600)
          container-NN.cert.pem     certificate of PKI container NN        (0600)
          container-NN.key.pem      its private key, PKCS#8 PEM            (0600)
          pin-state.json            current PIN and retry counters         (0600)

Everything but ``pin-state.json`` is written once, when the card is created: into a
temporary sibling directory that is then renamed into place, so a card directory is either
complete or absent. ``pin-state.json`` changes whenever the PIN or a retry counter does;
:class:`FilePinStateStore` replaces it atomically and durably (temp file, fsync, rename,
fsync of the directory).

The byte formats are ``usbccid.cards.provision``'s (:func:`~usbccid.cards.provision.card_to_files`);
this module only decides where they go.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from usbccid.cac.profile import CardProfile, PinState
from usbccid.cards.generate import ProvisionedCard, generate_card
from usbccid.cards.manifest import card_from_files, card_to_files
from usbccid.cards.provision import KeyFactory, ProvisionError, RandomSource, generate_rsa_key
from usbccid.errors import UsbccidError

__all__ = [
    "CARDS_DIR",
    "DEFAULT_CARD_NAME",
    "PIN_STATE_FILE",
    "STATE_DIR_NAME",
    "SYSTEM_STATE_DIR",
    "CardExistsError",
    "FilePinStateStore",
    "StateError",
    "card_directory",
    "default_state_dir",
    "load_card",
    "load_or_create_card",
    "load_or_create_default_card",
    "save_card",
]

STATE_DIR_NAME = "usbccid"
SYSTEM_STATE_DIR = Path("/var/lib") / STATE_DIR_NAME
CARDS_DIR = "cards"
PIN_STATE_FILE = "pin-state.json"
DEFAULT_CARD_NAME = "default"

_PIN_STATE_FORMAT = "usbccid-pin-state"
_PIN_STATE_VERSION = 1
_CARD_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_DIR_MODE = 0o700


class StateError(UsbccidError):
    """The state directory, a stored card or its PIN state cannot be read or written.

    The message is one line for stderr: it names the path and what to do, never secrets.
    """


class CardExistsError(StateError):
    """:func:`save_card` found a card of that name already stored."""


# --------------------------------------------------------------------------------------
# Where


def default_state_dir(environ: Mapping[str, str] | None = None, euid: int | None = None) -> Path:
    """The state directory to use when none is given, by platform convention:

    1. ``$STATE_DIRECTORY`` when set: systemd sets it for a unit with
       ``StateDirectory=usbccid`` (to ``/var/lib/usbccid``, or under ``~/.local/state``
       for a user unit), and has already created it with the right owner. If the unit
       lists several state directories, systemd joins them with ``:``; we use the first.
    2. ``/var/lib/usbccid`` when running as root (a system service, FHS §5.8 "variable
       state information"): root's home is no place for a service's card.
    3. ``$XDG_STATE_HOME/usbccid`` for a user, ``$XDG_STATE_HOME`` defaulting to
       ``~/.local/state`` (XDG Base Directory spec 0.8: state that persists across
       restarts but is not important or portable enough for ``$XDG_DATA_HOME``). A
       relative ``$XDG_STATE_HOME`` is invalid per the spec and ignored.

    ``environ`` and ``euid`` default to the process's own (tests inject them).
    """
    env = os.environ if environ is None else environ
    uid = os.geteuid() if euid is None else euid
    systemd_dirs = env.get("STATE_DIRECTORY", "")
    first = systemd_dirs.split(":", 1)[0]
    if first:
        return Path(first)
    if uid == 0:
        return SYSTEM_STATE_DIR
    xdg = env.get("XDG_STATE_HOME", "")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / STATE_DIR_NAME
    home = env.get("HOME")
    base = Path(home) if home else Path.home()
    return base / ".local" / "state" / STATE_DIR_NAME


def card_directory(state_dir: Path, name: str = DEFAULT_CARD_NAME) -> Path:
    """``<state_dir>/cards/<name>``; ``name`` is a plain name (letters, digits, ``._-``)."""
    if not _CARD_NAME.fullmatch(name):
        raise StateError(f"bad card name {name!r}: use up to 64 letters, digits, '.', '_' or '-'")
    return Path(state_dir) / CARDS_DIR / name


# --------------------------------------------------------------------------------------
# Durable file primitives


def _fsync_directory(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX needs the directory synced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        # A few filesystems cannot fsync a directory; the data itself is synced.
        if exc.errno != errno.EINVAL:
            raise
    finally:
        os.close(fd)


def _make_private_dirs(path: Path) -> None:
    """Create ``path`` and any missing parents with mode 0700; leave existing ones alone
    (e.g. a systemd-made ``$STATE_DIRECTORY`` keeps the mode systemd gave it)."""
    missing = []
    for candidate in (path, *path.parents):
        if candidate.is_dir():
            break
        missing.append(candidate)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):  # another process made it meanwhile
            directory.mkdir(mode=_DIR_MODE)
            os.chmod(directory, _DIR_MODE)  # mkdir's mode is filtered by the umask


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (which must not exist) with mode 0600 and durable contents."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _replace_file(path: Path, data: bytes) -> None:
    """Atomically and durably make ``data`` the contents of ``path`` (mode 0600).

    Write a temp file in the same directory (same filesystem, so the rename is atomic),
    fsync it, ``os.replace`` it over ``path``, fsync the directory. A crash at any point
    leaves either the old or the new file; a failure removes the temp file.
    """
    fd, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as file:  # mkstemp creates it with mode 0600
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise
    _fsync_directory(path.parent)


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --------------------------------------------------------------------------------------
# PIN state


def _pin_state_bytes(state: PinState) -> bytes:
    document = {
        "format": _PIN_STATE_FORMAT,
        "version": _PIN_STATE_VERSION,
        # Hex, so any PIN bytes the card accepted round-trip exactly.
        "pin_hex": state.pin.hex(),
        "tries_left": state.tries_left,
        "unblock_tries_left": state.unblock_tries_left,
    }
    if state.unblock_code is not None:
        document["unblock_code_hex"] = state.unblock_code.hex()
    return (json.dumps(document, indent=2) + "\n").encode("ascii")


def _counter(document: Mapping[str, Any], key: str) -> int:
    value = document.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 255:
        raise ValueError(f"'{key}' is missing or not a counter")
    return value


def _parse_pin_state(data: bytes) -> PinState:
    """A :class:`PinState` from file contents; ValueError saying what is wrong."""
    try:
        document = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not valid JSON") from None
    if not isinstance(document, dict) or document.get("format") != _PIN_STATE_FORMAT:
        raise ValueError("not a usbccid PIN state")
    if document.get("version") != _PIN_STATE_VERSION:
        raise ValueError(f"unsupported version {document.get('version')!r}")
    pin_hex = document.get("pin_hex")
    if not isinstance(pin_hex, str):
        raise ValueError("'pin_hex' is missing")
    try:
        pin = bytes.fromhex(pin_hex)
    except ValueError:
        raise ValueError("'pin_hex' is not hex") from None
    if not pin:
        raise ValueError("'pin_hex' is empty")
    unblock_code = None
    if "unblock_code_hex" in document:  # only once the unblock code was changed (PIV)
        code_hex = document["unblock_code_hex"]
        try:
            unblock_code = bytes.fromhex(code_hex) if isinstance(code_hex, str) else None
        except ValueError:
            unblock_code = None
        if not unblock_code:
            raise ValueError("'unblock_code_hex' is not hex")
    return PinState(
        pin=pin,
        tries_left=_counter(document, "tries_left"),
        unblock_tries_left=_counter(document, "unblock_tries_left"),
        unblock_code=unblock_code,
    )


_CARD_LOCKS: dict[Path, threading.Lock] = {}
_CARD_LOCKS_GUARD = threading.Lock()


def _card_lock(path: Path) -> threading.Lock:
    """The process's one lock for the PIN state file ``path`` (however it is spelled)."""
    key = Path(os.path.abspath(path))
    with contextlib.suppress(OSError):
        key = key.resolve()
    with _CARD_LOCKS_GUARD:
        return _CARD_LOCKS.setdefault(key, threading.Lock())


class FilePinStateStore:
    """A :class:`~usbccid.cac.profile.PinStateStore` backed by one JSON file (mode 0600).

    ``save`` is crash-safe: once it returns, the new state is on disk, and a crash or
    error before that leaves the previous file intact (see :func:`_replace_file`). Errors
    are :class:`StateError`.

    ``load`` returns None when the file does not exist: a new card, whose state the card
    derives from its :class:`~usbccid.cac.profile.PinPolicy`. A file that exists but
    cannot be parsed is an error, not "no state": falling back to the initial state would
    restore the full retry count, so corrupting the file (or a disk fault) would become a
    way around the PIN retry limit; falling back to "blocked" would lock the user out
    with no hint why. Since ``save`` never leaves a partial file, a corrupt one means
    something outside usbccid touched it, and a human should decide; the message says the
    file may be deleted to reset the PIN to the card's initial PIN and full retries.
    """

    def __init__(self, path: Path | str) -> None:
        self._path = Path(path)

    @property
    def path(self) -> Path:
        return self._path

    def load(self) -> PinState | None:
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateError(f"cannot read PIN state {self._path}: {_describe(exc)}") from exc
        try:
            return _parse_pin_state(data)
        except ValueError as exc:
            raise StateError(
                f"PIN state {self._path} is corrupt ({exc}); not guessing the retry "
                "counters: delete the file to reset the card's PIN and retries"
            ) from None

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The card's one lock: a lock per file within this process (card jobs run on
        threads), and ``flock`` on the file's directory across processes (``usbccid card``
        commands, a second server). The directory is opened read-only, so a read-only
        state directory can still be locked, and then ``save`` fails closed."""
        with _card_lock(self._path):
            try:
                fd = os.open(self._path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
            except OSError as exc:
                raise StateError(f"cannot lock PIN state {self._path}: {_describe(exc)}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                os.close(fd)  # closing the last descriptor releases the flock

    def save(self, state: PinState) -> None:
        data = _pin_state_bytes(state)
        try:
            _replace_file(self._path, data)
        except OSError as exc:
            raise StateError(f"cannot save PIN state {self._path}: {_describe(exc)}") from exc

    def __repr__(self) -> str:
        return f"FilePinStateStore({str(self._path)!r})"


# --------------------------------------------------------------------------------------
# Cards


def save_card(state_dir: Path, card: ProvisionedCard, name: str = DEFAULT_CARD_NAME) -> Path:
    """Store a new card as ``<state_dir>/cards/<name>`` and return that directory.

    All-or-nothing: the files are written (0600, fsynced) into a temporary directory
    next to the target, which is then renamed into place. Raises :class:`CardExistsError`
    if a card of that name exists (cards are never overwritten: their certificates may
    be trusted or enrolled somewhere), :class:`StateError` on I/O errors.
    """
    directory = card_directory(state_dir, name)
    files = card_to_files(card)
    cards = directory.parent
    try:
        _make_private_dirs(cards)
        if directory.exists():
            raise CardExistsError(f"a card named {name!r} already exists in {directory}")
        temp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=cards))  # 0700
        try:
            for file_name, data in files.items():
                _write_new_file(temp / file_name, data)
            _fsync_directory(temp)
            os.rename(temp, directory)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        _fsync_directory(cards)
    except OSError as exc:
        if directory.exists() and exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise CardExistsError(f"a card named {name!r} already exists in {directory}") from exc
        where = exc.filename or cards
        raise StateError(f"cannot store card {name!r} at {where}: {_describe(exc)}") from exc
    return directory


def load_card(state_dir: Path, name: str = DEFAULT_CARD_NAME) -> ProvisionedCard:
    """The card stored as ``<state_dir>/cards/<name>``; :class:`StateError` if it is
    missing, incomplete or damaged."""
    directory = card_directory(state_dir, name)

    def read(file_name: str) -> bytes:
        return (directory / file_name).read_bytes()

    try:
        return card_from_files(read)
    except FileNotFoundError as exc:
        if not directory.is_dir():
            raise StateError(f"no card named {name!r} in {state_dir}") from exc
        raise StateError(
            f"card {directory} is incomplete ({Path(exc.filename or '?').name} is missing);"
            " move it away to create a new card"
        ) from exc
    except OSError as exc:
        raise StateError(f"cannot read card {directory}: {_describe(exc)}") from exc
    except ProvisionError as exc:
        raise StateError(f"card {directory} is damaged: {exc}") from exc


def load_or_create_card(
    state_dir: Path,
    now: datetime,
    *,
    name: str = DEFAULT_CARD_NAME,
    random: RandomSource = os.urandom,
    new_key: KeyFactory = generate_rsa_key,
) -> tuple[ProvisionedCard, FilePinStateStore]:
    """The card ``name`` and its PIN state store, generating a default test card
    (:func:`usbccid.cards.provision.generate_card`, validity from ``now``) on first use.

    Later calls load the same card: same certificates, keys and card ID. A card
    directory that exists but is damaged is an error, never silently replaced. The PIN
    state file is read once here so that a corrupt one stops the program at startup,
    not in the middle of an APDU.
    """
    directory = card_directory(state_dir, name)
    if not directory.exists():
        card = generate_card(now, random=random, new_key=new_key)
        # Another process may create it at the same moment; then its card wins.
        with contextlib.suppress(CardExistsError):
            save_card(state_dir, card, name)
    card = load_card(state_dir, name)
    store = FilePinStateStore(directory / PIN_STATE_FILE)
    store.load()
    return card, store


def load_or_create_default_card(
    state_dir: Path,
    now: datetime,
    *,
    name: str = DEFAULT_CARD_NAME,
    random: RandomSource = os.urandom,
    new_key: KeyFactory = generate_rsa_key,
) -> tuple[CardProfile, FilePinStateStore]:
    """:func:`load_or_create_card`, returning the profile only (the CA certificate stays
    in ``<card dir>/ca.pem``)."""
    card, store = load_or_create_card(state_dir, now, name=name, random=random, new_key=new_key)
    return card.profile, store
