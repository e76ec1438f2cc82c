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

    [[reader]]
    name = "pad"
    pinpad = true                 # or { timeout = 30, display = "2x16" | "none" }
    keypad = { enter = "card-pin" }   # types by itself: the card's PIN, or "DIGITS"
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from usbccid.cards import cac
from usbccid.cards.cac import CardConfig
from usbccid.cards.registry import SOURCES, CardSourceConfig, source_module
from usbccid.tool.schema import Checker, ConfigError, KeyPath, toml_error, type_name

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

DEFAULT_HOST: Final = "127.0.0.1"
DEFAULT_PORT: Final = 3240  # the IANA port of USB/IP
LOOPBACK_NETWORKS: Final = (
    ipaddress.ip_network("127.0.0.0/8"),
    ipaddress.ip_network("::1/128"),
)
MAX_SLOTS: Final = 8  # bMaxSlotIndex is a byte, but hosts and pcscd expect few slots
FRONTENDS: Final = ("usbip", "vpcd", "vscard")  # usbccid.frontends.registry, by name
VPCD_PORT: Final = 35963  # vsmartcard vpcd.h VPCDPORT: where vpcd's slot 0 listens
_BUS_ID = re.compile(r"^[0-9]+-[0-9]+(\.[0-9]+)*$")
_READER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,31}$")
READER_NAME = _READER_NAME  # also for readers added at run time (usbccid.tool.app)
_VID_PID = re.compile(r"^([0-9A-Fa-f]{4}):([0-9A-Fa-f]{4})$")


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class SlotConfig:
    #: a card source's configuration (``usbccid.cards.registry``); None: an empty slot
    card: CardSourceConfig | None = field(default_factory=CardConfig)
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


#: ``keypad = { enter = "card-pin" }``: type the PIN the card has now.
CARD_PIN: Final = "card-pin"
MAX_KEYPAD_DIGITS: Final = 32


@dataclass(frozen=True)
class PinpadConfig:
    """A PIN pad on the reader (``pinpad = true`` or a table)."""

    timeout: float = 30.0  # seconds an entry waits when the host's bTimeOut is 00h
    display: tuple[int, int] | None = (2, 16)  # (lines, columns) of the LCD, or none


@dataclass(frozen=True)
class KeypadConfig:
    """Who types on the PIN pad when nobody does: ``keypad = { enter = ..., new = ... }``.

    ``enter``: digits, or :data:`CARD_PIN` (the card's current PIN) -- every entry of a
    verification, the current PIN of a change; ``new``: the new PIN of a change (and its
    confirmation), default ``enter``.
    """

    enter: str
    new: str | None = None


@dataclass(frozen=True)
class VpcdConfig:
    """Where a ``frontend = "vpcd"`` reader finds vpcd: slot N connects to ``port + N``."""

    host: str = DEFAULT_HOST
    port: int = VPCD_PORT


@dataclass(frozen=True)
class VscardConfig:
    """Where a ``frontend = "vscard"`` reader meets QEMU's ccid-card-passthru chardev:
    ``listen`` (QEMU connects: ``-chardev socket,host=H,port=P`` or ``path=P``) or
    ``connect`` (QEMU listens: ``server=on``), on TCP (host, port) or a UNIX socket
    (path)."""

    mode: str  # "listen" or "connect"
    host: str | None = None
    port: int | None = None
    path: Path | None = None

    def describe(self) -> str:
        if self.path is not None:
            return str(self.path)
        assert self.host is not None
        assert self.port is not None
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ReaderConfig:
    name: str
    bus_id: str | None = None
    identity: IdentityConfig = field(default_factory=IdentityConfig)
    slots: tuple[SlotConfig, ...] = (SlotConfig(),)
    origin: str = ""
    frontend: str = "usbip"  # how hosts reach it: a name of FRONTENDS
    vpcd: VpcdConfig | None = None  # frontend "vpcd" only
    vscard: VscardConfig | None = None  # frontend "vscard" only
    pinpad: PinpadConfig | None = None
    keypad: KeypadConfig | None = None


@dataclass(frozen=True)
class ServerConfig:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    allow: tuple[IPNetwork, ...] = LOOPBACK_NETWORKS
    # TCP keepalive on every USB/IP connection (tcp(7) TCP_KEEPIDLE, TCP_KEEPINTVL,
    # TCP_KEEPCNT; TCP_USER_TIMEOUT = idle + interval * count): an importer that vanished
    # without a FIN or RST (powered off, network gone) frees its device after
    # idle + interval * count seconds (50 by default) instead of the kernel's 2 h 11 min.
    keepalive_idle: int = 20
    keepalive_interval: int = 10
    keepalive_count: int = 3

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


def vscard_config(endpoint: str) -> Config:
    """``usbccid serve --vscard ENDPOINT``: the default card, for QEMU's ccid-card-passthru
    listening on ENDPOINT (see :func:`parse_vscard_endpoint`), and no USB/IP.

    Raises:
        ConfigError: ENDPOINT is not an endpoint.
    """
    try:
        vscard = parse_vscard_endpoint(endpoint, "listen", Path.cwd())
    except ValueError as exc:
        raise ConfigError(str(exc), "--vscard") from None
    reader = ReaderConfig(name="reader0", frontend="vscard", vscard=vscard, origin="--vscard")
    return Config(readers=(reader,))


# --------------------------------------------------------------------------- locating keys


# --------------------------------------------------------------------------- validation


_TOP_KEYS = ("server", "reader", "state_dir", "trace", "pcap", "log_level")
_SERVER_KEYS = (
    "host",
    "port",
    "allow",
    "keepalive_idle",
    "keepalive_interval",
    "keepalive_count",
)
_READER_KEYS = (
    "name",
    "frontend",
    "bus_id",
    "identity",
    "vpcd",
    "vscard",
    "slot",
    "pinpad",
    "keypad",
)
_VPCD_KEYS = ("host", "port")
_PINPAD_KEYS = ("timeout", "display")
_KEYPAD_KEYS = ("enter", "new")
_DISPLAY = re.compile(r"^([0-9]{1,3})x([0-9]{1,3})$")
_IDENTITY_KEYS = (
    "preset",
    "vendor_id",
    "product_id",
    "manufacturer",
    "product",
    "serial_number",
    "bcd_device",
)
_SLOT_KEYS = ("type", "inserted")
_VSCARD_KEYS = ("listen", "connect")
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
        raise toml_error(exc, source) from None
    ck = Checker(text, source, base_dir or Path.cwd())
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
        state_dir=ck.relative(state_dir),
        trace=ck.get(top, (), "trace", bool, False),
        pcap=ck.relative(pcap),
        log_level=log_level.lower() if log_level else None,
        path=path,
    )


def _server(ck: Checker, raw: object) -> ServerConfig:
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
                raise ck.fail((*path, "allow", i), f"expected a string, got {type_name(item)}")
            try:
                nets.append(parse_network(item))
            except ValueError as exc:
                raise ck.fail((*path, "allow", i), str(exc)) from None
        allow = tuple(nets)
    defaults = ServerConfig()
    keepalive = {}
    for key, top in (
        ("keepalive_idle", 3600),
        ("keepalive_interval", 600),
        ("keepalive_count", 20),
    ):
        value = ck.get(t, path, key, int, getattr(defaults, key))
        if not 1 <= value <= top:
            raise ck.fail((*path, key), f"must be 1 to {top}, got {value}")
        keepalive[key] = value
    return ServerConfig(host=host, port=port, allow=allow, **keepalive)


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
    ck: Checker,
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
    frontend = ck.get(t, path, "frontend", str, "usbip")
    if frontend not in FRONTENDS:
        raise ck.fail(
            (*path, "frontend"), f"unknown front end {frontend!r} (known: {', '.join(FRONTENDS)})"
        )
    vpcd = None
    if frontend == "vpcd":
        for key in ("bus_id", "identity"):
            if key in t:
                raise ck.fail(
                    (*path, key),
                    f"a vpcd reader has no {key.replace('_', ' ')} (it is no USB device: "
                    "pcscd names it after vpcd's reader.conf)",
                )
        vpcd = _vpcd(ck, t.get("vpcd", {}), (*path, "vpcd"), len(slots))
    elif "vpcd" in t:
        raise ck.fail((*path, "vpcd"), 'only for a reader with frontend = "vpcd"')
    vscard = None
    if frontend == "vscard":
        for key in ("bus_id", "identity"):
            if key in t:
                raise ck.fail(
                    (*path, key),
                    f"a vscard reader has no {key.replace('_', ' ')} (the USB device is "
                    "QEMU's usb-ccid)",
                )
        if len(slots) != 1:
            raise ck.fail(
                (*path, "slot", 1), "a vscard reader has one slot (QEMU's usb-ccid has one)"
            )
        if "vscard" not in t:
            raise ck.fail(
                path, 'a vscard reader needs vscard = { listen = "HOST:PORT" } or connect'
            )
        vscard = _vscard(ck, t["vscard"], (*path, "vscard"))
    elif "vscard" in t:
        raise ck.fail((*path, "vscard"), 'only for a reader with frontend = "vscard"')
    pinpad = _pinpad(ck, t.get("pinpad"), (*path, "pinpad"))
    keypad = _keypad(ck, t.get("keypad"), (*path, "keypad"))
    if keypad is not None and pinpad is None:
        raise ck.fail((*path, "keypad"), "a keypad policy needs a PIN pad (pinpad = true)")
    if pinpad is not None and frontend == "vpcd":
        raise ck.fail(
            (*path, "pinpad"), "a vpcd reader has no PIN pad (vpcd carries APDUs, not CCID)"
        )
    if pinpad is not None and frontend == "vscard":
        raise ck.fail(
            (*path, "pinpad"), "a vscard reader has no PIN pad (its USB device is QEMU's usb-ccid)"
        )
    return ReaderConfig(
        name=name,
        bus_id=bus_id,
        identity=identity,
        slots=slots,
        origin=ck.origin(path),
        frontend=frontend,
        vpcd=vpcd,
        vscard=vscard,
        pinpad=pinpad,
        keypad=keypad,
    )


def _vpcd(ck: Checker, raw: object, path: KeyPath, slots: int) -> VpcdConfig:
    t = ck.table(raw, path, _VPCD_KEYS)
    host = ck.get(t, path, "host", str, DEFAULT_HOST)
    if not host:
        raise ck.fail((*path, "host"), "must not be empty")
    port = ck.get(t, path, "port", int, VPCD_PORT)
    if not 1 <= port <= 65536 - slots:
        raise ck.fail(
            (*path, "port"),
            f"port {port} is out of range 1-{65536 - slots} (slot N connects to port + N)",
        )
    return VpcdConfig(host=host, port=port)


def _vscard(ck: Checker, raw: object, path: KeyPath) -> VscardConfig:
    t = ck.table(raw, path, _VSCARD_KEYS)
    given = [k for k in _VSCARD_KEYS if k in t]
    if len(given) != 1:
        raise ck.fail(path, "give either listen or connect (one endpoint per reader)")
    mode = given[0]
    text = ck.get(t, path, mode, str)
    assert text is not None
    try:
        return parse_vscard_endpoint(text, mode, ck.base_dir)
    except ValueError as exc:
        raise ck.fail((*path, mode), str(exc)) from None


def parse_vscard_endpoint(
    text: str, mode: str = "listen", base_dir: Path | None = None
) -> VscardConfig:
    """``HOST:PORT``, ``[V6ADDR]:PORT``, ``PORT`` (on 127.0.0.1) or a UNIX socket path
    (anything with a ``/``; relative to ``base_dir``).

    Raises:
        ValueError: none of these (the message says why).
    """
    if "/" in text:
        path = Path(text)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return VscardConfig(mode=mode, path=path)
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = DEFAULT_HOST, text
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not host or not port_text.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT, PORT or a socket path (with a /)")
    port = int(port_text)
    low = 0 if mode == "listen" else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}-65535")
    return VscardConfig(mode=mode, host=host, port=port)


def _pinpad(ck: Checker, raw: object, path: KeyPath) -> PinpadConfig | None:
    """``pinpad = true | false | { timeout = SECONDS, display = "LxC" | "none" }``."""
    if raw is None or raw is False:
        return None
    if raw is True:
        return PinpadConfig()
    if not isinstance(raw, dict):
        raise ck.fail(path, f"expected true, false or a table, got {type_name(raw)}")
    t = ck.table(raw, path, _PINPAD_KEYS)
    timeout = ck.get(t, path, "timeout", (int, float), 30.0)
    if not 1 <= timeout <= 3600:
        raise ck.fail((*path, "timeout"), "seconds, 1 to 3600")
    display_raw = ck.get(t, path, "display", str, "2x16")
    display: tuple[int, int] | None = None
    if display_raw != "none":
        m = _DISPLAY.match(display_raw)
        if m is None or not (1 <= int(m.group(1)) <= 255 and 1 <= int(m.group(2)) <= 255):
            raise ck.fail(
                (*path, "display"), f'{display_raw!r}: "LINESxCOLUMNS" (e.g. "2x16") or "none"'
            )
        display = (int(m.group(1)), int(m.group(2)))
    return PinpadConfig(timeout=float(timeout), display=display)


def keypad_entry(value: str) -> str:
    """A keypad policy's entry: :data:`CARD_PIN` or 1 to 32 digits.

    Raises:
        ValueError: anything else.
    """
    if value == CARD_PIN or (value.isascii() and value.isdigit() and len(value) <= 32):
        return value
    raise ValueError(f'{value!r}: "{CARD_PIN}" or 1 to {MAX_KEYPAD_DIGITS} digits')


def _keypad(ck: Checker, raw: object, path: KeyPath) -> KeypadConfig | None:
    if raw is None:
        return None
    t = ck.table(raw, path, _KEYPAD_KEYS)
    values: dict[str, str | None] = {}
    for key in _KEYPAD_KEYS:
        value = ck.get(t, path, key, str)
        if value is not None:
            try:
                keypad_entry(value)
            except ValueError as exc:
                raise ck.fail((*path, key), str(exc)) from None
        values[key] = value
    enter = values["enter"]
    if enter is None:
        raise ck.fail(path, "missing key 'enter' (the digits to type, or \"card-pin\")")
    return KeypadConfig(enter=enter, new=values["new"])


def _identity(
    ck: Checker,
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
    ck: Checker,
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


def _slot(ck: Checker, raw: object, path: KeyPath) -> SlotConfig:
    if not isinstance(raw, dict):
        raise ck.fail(path, f"expected a table, got {type_name(raw)}")
    card_type = ck.get(raw, path, "type", str, cac.TYPE)
    if card_type not in SOURCES:
        raise ck.fail(
            (*path, "type"),
            f"unknown card type {card_type!r} (supported: {', '.join(SOURCES)})",
        )
    card_source = source_module(card_type)
    t = ck.table(raw, path, (*_SLOT_KEYS, *card_source.KEYS))
    inserted = ck.get(t, path, "inserted", bool, True)
    stored = ck.get(t, path, "card", str)
    if stored is not None and stored.lower() == "none":
        if [k for k in t if k not in (*_SLOT_KEYS, "card")]:
            raise ck.fail((*path, "card"), 'an empty slot (card = "none") takes no card keys')
        return SlotConfig(card=None, inserted=False)
    return SlotConfig(card=card_source.parse(ck, t, path), inserted=inserted)


def _check_unique(ck: Checker, readers: Sequence[ReaderConfig]) -> None:
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


def parse_hostport(text: str, default_port: int) -> tuple[str, int]:
    """``HOST[:PORT]`` (``[IPv6]:PORT`` with brackets, ``:PORT`` for the default host).

    Raises:
        ValueError: malformed, or the port is out of range.
    """
    host, port_text = text, ""
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: expected [ADDRESS]:PORT")
        port_text = rest[1:]
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    host = host or DEFAULT_HOST
    if not port_text:
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: the port must be a number 1-65535")
    return host, int(port_text)


def with_vpcd(config: Config, host: str, port: int) -> Config:
    """``config`` with every reader reached through vpcd at ``host:port`` (``serve --vpcd``:
    the default reader, with the default card, in pcscd's "Virtual PCD 00 00")."""
    from dataclasses import replace

    readers = tuple(
        replace(r, frontend="vpcd", vpcd=VpcdConfig(host, port), bus_id=None)
        for r in config.readers
    )
    return replace(config, readers=readers)


def with_overrides(
    config: Config,
    host: str | None = None,
    port: int | None = None,
    allow: Sequence[IPNetwork] | None = None,
    state_dir: Path | None = None,
    trace: bool | None = None,
    pcap: Path | None = None,
    pinpad: bool = False,
    keypad: str | None = None,
) -> Config:
    """``config`` with the command line's options applied over it.

    ``pinpad`` gives every USB/IP reader that has none a PIN pad; ``keypad`` (digits or
    :data:`CARD_PIN`) gives every USB/IP reader a PIN pad and that keypad policy (a vpcd
    reader has no PC_to_RDR_Secure: they stay as they are).
    """
    from dataclasses import replace

    if pinpad or keypad is not None:
        config = replace(
            config,
            readers=tuple(
                replace(
                    r,
                    pinpad=r.pinpad or PinpadConfig(),
                    keypad=KeypadConfig(enter=keypad) if keypad is not None else r.keypad,
                )
                if r.frontend == "usbip"
                else r
                for r in config.readers
            ),
        )

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
