"""The server's configuration: a TOML file, validated into frozen dataclasses.

Pure: :func:`parse_config` takes the text (and the file's directory, to resolve relative
paths and check that referenced files exist) and returns a :class:`Config` or raises
:class:`ConfigError`, whose message names the file, the line and the reason. tomllib
reports syntax errors with their line; for semantic errors (unknown keys, bad types,
duplicate names, a PIN of the wrong length) the key's line is found by scanning the text
(:class:`KeyLocator`).

The file looks like ``examples/usbccid.toml``::

    [server]
    host = "127.0.0.1"
    port = 3240
    allow = ["127.0.0.0/8", "::1/128"]

    [[reader]]
    name = "desk"
    identity = "omnikey-3121"     # a preset, "VVVV:PPPP", or a table

    [[reader.slot]]
    card = "default"              # the generated default card of the state directory

    [[reader.slot]]
    type = "cac"
    containers = [{ cert = "id.pem", key = "id.key" }, { pkcs12 = "sig.p12", passphrase = "x" }]
    pin = "123456"
    unblock_code = "12345678"
    tries = 3
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from usbccid.errors import UsbccidError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
KeyPath = tuple[str | int, ...]

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3240  # the IANA port of USB/IP
LOOPBACK_NETWORKS: Final = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
CARD_TYPES: Final = ("cac",)
MAX_SLOTS: Final = 8  # bMaxSlotIndex is a byte, but hosts and pcscd expect few slots
_BUS_ID = re.compile(r"^[0-9]+-[0-9]+(\.[0-9]+)*$")
_READER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
_VID_PID = re.compile(r"^([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$")
_DIGITS = re.compile(r"^[0-9]{4,8}$")


class ConfigError(UsbccidError):
    """The configuration is invalid. ``str()`` is one line: ``FILE:LINE: reason``."""

    def __init__(self, reason: str, source: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        where = source or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {reason}")


# --------------------------------------------------------------------------- the model


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


@dataclass(frozen=True)
class SlotConfig:
    card: CardConfig | None = field(default_factory=CardConfig)
    inserted: bool = True


@dataclass(frozen=True)
class IdentityConfig:
    """The reader's USB identity: a preset of ``usbccid.ccid``, overridden field by field."""

    preset: str | None = None
    vendor_id: int | None = None
    product_id: int | None = None
    manufacturer: str | None = None
    product: str | None = None
    serial_number: str | None = None
    bcd_device: int | None = None


@dataclass(frozen=True)
class ReaderConfig:
    name: str
    bus_id: str | None = None
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    slots: tuple[SlotConfig, ...] = (SlotConfig(),)
    origin: str = ""


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS

    def is_allowed(self, address: str) -> bool:
        """Whether a client at ``address`` (an IP address string) may connect."""
        return address_allowed(address, self.allow)


@dataclass(frozen=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    readers: tuple[ReaderConfig, ...] = (ReaderConfig(name="reader0"),)
    state_dir: Path | None = None
    trace: bool = False
    pcap: Path | None = None
    log_level: str | None = None
    path: Path | None = None  # the file it was read from


def address_allowed(address: str, networks: Sequence[IPNetwork]) -> bool:
    """Whether ``address`` lies in one of ``networks`` (IPv4-mapped IPv6 counts as IPv4)."""
    try:
        ip: IPAddress = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def default_config() -> Config:
    """No configuration file: one reader holding the default card, on loopback."""
    return Config()


# --------------------------------------------------------------------------- locating keys


class KeyLocator:
    """Maps key paths of a (valid) TOML document to the line where they are written.

    A path is a tuple of table keys and array indices, e.g. ``("reader", 1, "slot", 0,
    "pin")``. Headers, dotted keys, arrays of tables and inline tables/arrays are followed;
    :meth:`line_of` falls back to the nearest enclosing key that was found.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        self._text = text
        self._pos = 0
        self._line = 1
        self._aot: dict[KeyPath, int] = {}
        with contextlib.suppress(IndexError, ValueError):  # best effort: keep what was found
            self._document()

    def line_of(self, path: KeyPath) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    # the scanner -----------------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self._text[self._pos : self._pos + n]

    def _advance(self, n: int = 1) -> None:
        self._line += self._text.count("\n", self._pos, self._pos + n)
        self._pos += n

    def _skip(self, newlines: bool) -> None:
        while self._pos < len(self._text):
            c = self._text[self._pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self._advance()
            elif c == "#":
                end = self._text.find("\n", self._pos)
                self._advance((len(self._text) if end < 0 else end) - self._pos)
            else:
                return

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            if self._peek() == "[":
                aot = self._peek(2) == "[["
                self._advance(2 if aot else 1)
                line = self._line
                keys = self._key()
                self._skip(newlines=False)
                self._advance(2 if aot else 1)
                table = self._resolve(keys, last_plain=aot)
                if aot:
                    index = self._aot.get(table, -1) + 1
                    self._aot[table] = index
                    table = (*table, index)
                self.lines.setdefault(table, line)
            else:
                self._keyval(table)

    def _resolve(self, keys: Sequence[str], last_plain: bool) -> KeyPath:
        path: KeyPath = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            if path in self._aot and not (last_plain and i == len(keys) - 1):
                path = (*path, self._aot[path])
        return path

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip(newlines=False)
            c = self._peek()
            if c in "\"'":
                end = self._pos + 1
                while self._text[end] != c:
                    end += 2 if c == '"' and self._text[end] == "\\" else 1
                parts.append(self._text[self._pos + 1 : end])
                self._advance(end + 1 - self._pos)
            else:
                m = re.compile(r"[A-Za-z0-9_-]+").match(self._text, self._pos)
                if m is None:
                    raise ValueError("not a key")
                parts.append(m.group())
                self._advance(m.end() - self._pos)
            self._skip(newlines=False)
            if self._peek() != ".":
                return parts
            self._advance()

    def _keyval(self, table: KeyPath) -> None:
        line = self._line
        path = (*table, *self._key())
        self.lines.setdefault(path, line)
        self._skip(newlines=False)
        if self._peek() != "=":
            raise ValueError("expected =")
        self._advance()
        self._skip(newlines=False)
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        c = self._peek()
        if c == "[":
            self._advance()
            index = 0
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._advance()
                    return
                if self._peek() == ",":
                    self._advance()
                    index += 1
                    continue
                self.lines.setdefault((*path, index), self._line)
                self._value((*path, index))
        elif c == "{":
            self._advance()
            while True:
                self._skip(newlines=False)
                if self._peek() == "}":
                    self._advance()
                    return
                if self._peek() == ",":
                    self._advance()
                    continue
                self._keyval(path)
        elif c in "\"'":
            quote = self._peek(3) if self._peek(3) in ('"""', "'''") else c
            end = self._pos + len(quote)
            while not self._text.startswith(quote, end):
                end += 2 if quote[0] == '"' and self._text[end] == "\\" else 1
            while self._text.startswith(quote[0], end + len(quote)):
                end += 1  # """a"""" : up to two quotes may end the content
            self._advance(end + len(quote) - self._pos)
        else:
            m = re.compile(r"[^,\]\}\s#]+").match(self._text, self._pos)
            if m is None:
                raise ValueError("not a value")
            self._advance(m.end() - self._pos)


# --------------------------------------------------------------------------- validation


class _Checker:
    def __init__(self, text: str, source: str, base_dir: Path) -> None:
        self.text = text
        self.source = source
        self.base_dir = base_dir
        self._locator: KeyLocator | None = None

    def line(self, path: KeyPath) -> int | None:
        if self._locator is None:
            self._locator = KeyLocator(self.text)
        return self._locator.line_of(path)

    def fail(self, path: KeyPath, reason: str) -> ConfigError:
        return ConfigError(
            f"{_dotted(path)}: {reason}" if path else reason, self.source, self.line(path)
        )

    def origin(self, path: KeyPath) -> str:
        line = self.line(path)
        return self.source if line is None else f"{self.source}:{line}"

    def table(self, value: object, path: KeyPath, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {_type_name(value)}")
        for key in value:
            if key not in allowed:
                hint = ", ".join(allowed)
                raise self.fail((*path, key), f"unknown key (expected one of: {hint})")
        return value

    def get(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, not in TOML
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail((*path, key), f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail((*path, key), f"expected {_kind_name(kinds)}, got {_type_name(value)}")
        return value

    def file(self, table: Mapping[str, Any], path: KeyPath, key: str) -> Path:
        raw = self.get(table, path, key, str)
        if raw is None:
            raise self.fail(path, f"missing key {key!r}")
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = self.base_dir / p
        if not p.is_file():
            raise self.fail((*path, key), f"no such file: {p}")
        return p


def _dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _type_name(value: object) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(_type_name(k()) for k in kinds)


_TOP_KEYS = ("server", "reader", "state_dir", "trace", "pcap", "log_level")
_SERVER_KEYS = ("host", "port", "allow")
_READER_KEYS = ("name", "bus_id", "identity", "slot")
_IDENTITY_KEYS = (
    "preset",
    "vendor_id",
    "product_id",
    "manufacturer",
    "product",
    "serial_number",
    "bcd_device",
)
_SLOT_KEYS = (
    "type",
    "card",
    "containers",
    "pin",
    "unblock_code",
    "tries",
    "unblock_tries",
    "card_id",
    "inserted",
)
_CONTAINER_KEYS = (
    "cert",
    "key",
    "pkcs12",
    "passphrase",
    "passphrase_file",
    "passphrase_env",
    "label",
)
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


def load_config(path: Path) -> Config:
    """Read and validate the configuration file ``path``."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("no such file", str(path)) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read: {_os_reason(exc)}", str(path)) from None
    return parse_config(
        text,
        source=str(path),
        base_dir=path.parent.resolve(),
        path=path,
        preset_names=_preset_names,
    )


def _preset_names() -> Sequence[str]:
    try:
        from usbccid.ccid.identity import PRESETS
    except ImportError:  # pragma: no cover - the reader layer is always there
        return ()
    return sorted(PRESETS)


def _os_reason(exc: Exception) -> str:
    return exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)


def parse_config(
    text: str,
    source: str = "<config>",
    base_dir: Path | None = None,
    path: Path | None = None,
    preset_names: Callable[[], Sequence[str]] | None = None,
) -> Config:
    """Validate the TOML ``text``. Relative file names are relative to ``base_dir``.

    ``preset_names``, when given, lists the valid reader identity presets.
    """
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise _toml_error(exc, source) from None
    ck = _Checker(text, source, base_dir or Path.cwd())
    top = ck.table(doc, (), _TOP_KEYS)

    server = _server(ck, top.get("server", {}))
    readers_raw = ck.get(top, (), "reader", list, [])
    readers = tuple(_reader(ck, r, ("reader", i), preset_names) for i, r in enumerate(readers_raw))
    if not readers:
        readers = (ReaderConfig(name="reader0"),)
    _check_unique(ck, readers)

    state_dir = ck.get(top, (), "state_dir", str)
    pcap = ck.get(top, (), "pcap", str)
    log_level = ck.get(top, (), "log_level", str)
    if log_level is not None and log_level.lower() not in LOG_LEVELS:
        raise ck.fail(("log_level",), f"expected one of {', '.join(LOG_LEVELS)}")
    return Config(
        server=server,
        readers=readers,
        state_dir=_rel(ck, state_dir),
        trace=ck.get(top, (), "trace", bool, False),
        pcap=_rel(ck, pcap),
        log_level=log_level.lower() if log_level else None,
        path=path,
    )


def _rel(ck: _Checker, raw: str | None) -> Path | None:
    if raw is None:
        return None
    p = Path(raw).expanduser()
    return p if p.is_absolute() else ck.base_dir / p


def _toml_error(exc: tomllib.TOMLDecodeError, source: str) -> ConfigError:
    # "Invalid value (at line 3, column 7)"
    msg = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m:
        reason = f"{msg[: m.start()]} (column {m.group(2)})"
        return ConfigError(f"invalid TOML: {reason}", source, int(m.group(1)))
    m = re.search(r"\s*\(at end of document\)$", msg)
    if m:
        return ConfigError(f"invalid TOML: {msg[: m.start()]} at end of file", source)
    return ConfigError(f"invalid TOML: {msg}", source)


def _server(ck: _Checker, raw: object) -> ServerConfig:
    path: KeyPath = ("server",)
    t = ck.table(raw, path, _SERVER_KEYS)
    host = ck.get(t, path, "host", str, DEFAULT_HOST)
    if not host:
        raise ck.fail((*path, "host"), "must not be empty")
    port = ck.get(t, path, "port", int, DEFAULT_PORT)
    if not 0 <= port <= 65535:
        raise ck.fail((*path, "port"), f"port {port} is out of range 0-65535")
    allow_raw = ck.get(t, path, "allow", list)
    allow: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    if allow_raw is not None:
        nets: list[IPNetwork] = []
        for i, item in enumerate(allow_raw):
            if not isinstance(item, str):
                raise ck.fail((*path, "allow", i), f"expected a string, got {_type_name(item)}")
            try:
                nets.append(parse_network(item))
            except ValueError as exc:
                raise ck.fail((*path, "allow", i), str(exc)) from None
        allow = tuple(nets)
    return ServerConfig(host=host, port=port, allow=allow)


def parse_network(text: str) -> IPNetwork:
    """A CIDR network ("10.0.0.0/8"), or a single address ("192.0.2.7")."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            raise ValueError(
                f"{text!r} has host bits set (did you mean "
                f"{ipaddress.ip_network(text, strict=False)}?)"
            ) from None
        raise ValueError(f"{text!r} is not an IP network (like 192.0.2.0/24)") from None


def _reader(
    ck: _Checker,
    raw: object,
    path: KeyPath,
    preset_names: Callable[[], Sequence[str]] | None,
) -> ReaderConfig:
    t = ck.table(raw, path, _READER_KEYS)
    index = path[-1]
    name = ck.get(t, path, "name", str, f"reader{index}")
    if not _READER_NAME.match(name):
        raise ck.fail(
            (*path, "name"),
            f"invalid reader name {name!r} (letters, digits, '_', '.', '-', at most 32)",
        )
    bus_id = ck.get(t, path, "bus_id", str)
    if bus_id is not None and not _BUS_ID.match(bus_id):
        raise ck.fail((*path, "bus_id"), f'invalid bus id {bus_id!r} (like "1-1" or "2-1.3")')
    identity = _identity(ck, t.get("identity"), (*path, "identity"), preset_names)
    slots_raw = ck.get(t, path, "slot", list)
    if slots_raw is None:
        slots: tuple[SlotConfig, ...] = (SlotConfig(),)
    else:
        if not slots_raw:
            raise ck.fail((*path, "slot"), "a reader needs at least one slot")
        if len(slots_raw) > MAX_SLOTS:
            raise ck.fail((*path, "slot"), f"at most {MAX_SLOTS} slots per reader")
        slots = tuple(_slot(ck, s, (*path, "slot", i)) for i, s in enumerate(slots_raw))
    return ReaderConfig(
        name=name, bus_id=bus_id, identity=identity, slots=slots, origin=ck.origin(path)
    )


def _identity(
    ck: _Checker,
    raw: object,
    path: KeyPath,
    preset_names: Callable[[], Sequence[str]] | None,
) -> IdentityConfig:
    if raw is None:
        return IdentityConfig()
    if isinstance(raw, str):
        m = _VID_PID.match(raw)
        if m:
            return IdentityConfig(vendor_id=int(m.group(1), 16), product_id=int(m.group(2), 16))
        _check_preset(ck, raw, path, preset_names)
        return IdentityConfig(preset=raw)
    t = ck.table(raw, path, _IDENTITY_KEYS)
    preset = ck.get(t, path, "preset", str)
    if preset is not None:
        _check_preset(ck, preset, (*path, "preset"), preset_names)
    ints: dict[str, int | None] = {}
    for key in ("vendor_id", "product_id", "bcd_device"):
        value = ck.get(t, path, key, (int, str))
        if isinstance(value, str):
            try:
                value = int(value, 16)
            except ValueError:
                raise ck.fail((*path, key), f"{value!r} is not a hexadecimal number") from None
        if value is not None and not 0 <= value <= 0xFFFF:
            raise ck.fail((*path, key), f"{value:#x} does not fit in 16 bits")
        ints[key] = value
    if preset is None and (ints["vendor_id"] is None) != (ints["product_id"] is None):
        raise ck.fail(path, "give both vendor_id and product_id, or a preset")
    strings = {k: ck.get(t, path, k, str) for k in ("manufacturer", "product", "serial_number")}
    for key, value in strings.items():
        if value is not None and not 0 < len(value) <= 126:
            raise ck.fail((*path, key), "must be 1 to 126 characters")
    return IdentityConfig(
        preset=preset,
        vendor_id=ints["vendor_id"],
        product_id=ints["product_id"],
        bcd_device=ints["bcd_device"],
        manufacturer=strings["manufacturer"],
        product=strings["product"],
        serial_number=strings["serial_number"],
    )


def _check_preset(
    ck: _Checker,
    name: str,
    path: KeyPath,
    preset_names: Callable[[], Sequence[str]] | None,
) -> None:
    if preset_names is None:
        return
    names = preset_names()
    if names and name not in names:
        raise ck.fail(
            path, f'unknown identity preset {name!r} (known: {", ".join(names)}; or "VVVV:PPPP")'
        )


def _slot(ck: _Checker, raw: object, path: KeyPath) -> SlotConfig:
    t = ck.table(raw, path, _SLOT_KEYS)
    inserted = ck.get(t, path, "inserted", bool, True)
    card_type = ck.get(t, path, "type", str, "cac")
    if card_type not in CARD_TYPES:
        raise ck.fail(
            (*path, "type"), f"unknown card type {card_type!r} (supported: {', '.join(CARD_TYPES)})"
        )
    stored = ck.get(t, path, "card", str)
    containers_raw = ck.get(t, path, "containers", list)
    file_keys = [k for k in ("pin", "unblock_code", "tries", "unblock_tries", "card_id") if k in t]
    if stored is not None and stored.lower() == "none":
        if containers_raw is not None or file_keys:
            raise ck.fail((*path, "card"), 'an empty slot (card = "none") takes no card keys')
        return SlotConfig(card=None, inserted=False)
    if stored is not None and containers_raw is not None:
        raise ck.fail(
            (*path, "containers"),
            'give either card = "NAME" (a stored card) or containers, not both',
        )
    if stored is not None:
        if not _READER_NAME.match(stored):
            raise ck.fail((*path, "card"), f"invalid card name {stored!r}")
        if file_keys:
            raise ck.fail(
                (*path, file_keys[0]),
                f"a stored card ({stored!r}) keeps its own PIN "
                "policy; set it with 'usbccid card new'",
            )
        return SlotConfig(
            card=CardConfig(type=card_type, stored=stored, origin=ck.origin(path)),
            inserted=inserted,
        )
    if containers_raw is None:
        if file_keys:
            raise ck.fail((*path, file_keys[0]), 'no card: add containers = [...] or card = "NAME"')
        return SlotConfig(
            card=CardConfig(type=card_type, origin=ck.origin(path)), inserted=inserted
        )
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
    card = CardConfig(
        type=card_type,
        stored=None,
        containers=containers,
        pin=pin,
        card_id=card_id,
        origin=ck.origin(path),
    )
    return SlotConfig(card=card, inserted=inserted)


def _digits(ck: _Checker, t: Mapping[str, Any], path: KeyPath, key: str) -> str | None:
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


def _count(ck: _Checker, t: Mapping[str, Any], path: KeyPath, key: str, default: int) -> int:
    value: int = ck.get(t, path, key, int, default)
    if not 1 <= value <= 15:
        raise ck.fail((*path, key), f"must be 1 to 15, got {value}")
    return value


def _container(ck: _Checker, raw: object, path: KeyPath) -> ContainerSource:
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


def _check_unique(ck: _Checker, readers: Sequence[ReaderConfig]) -> None:
    names: dict[str, int] = {}
    bus_ids: dict[str, int] = {}
    for i, r in enumerate(readers):
        if r.name in names:
            raise ck.fail(
                ("reader", i, "name"),
                f"duplicate reader name {r.name!r} (also reader[{names[r.name]}])",
            )
        names[r.name] = i
        if r.bus_id is not None:
            if r.bus_id in bus_ids:
                raise ck.fail(
                    ("reader", i, "bus_id"),
                    f"duplicate bus id {r.bus_id!r} (also reader[{bus_ids[r.bus_id]}])",
                )
            bus_ids[r.bus_id] = i


def with_overrides(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    allow: Sequence[IPNetwork] | None = None,
    state_dir: Path | None = None,
    trace: bool | None = None,
    pcap: Path | None = None,
) -> Config:
    """``config`` with the command line's options applied over it."""
    from dataclasses import replace

    server = replace(
        config.server,
        host=host if host is not None else config.server.host,
        port=port if port is not None else config.server.port,
        allow=tuple(allow) if allow else config.server.allow,
    )
    return replace(
        config,
        server=server,
        state_dir=state_dir if state_dir is not None else config.state_dir,
        trace=trace if trace else config.trace,
        pcap=pcap if pcap is not None else config.pcap,
    )
