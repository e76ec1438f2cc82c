"""The composition root: builds readers, cards and the server from a Config, and runs it.

:func:`serve` is ``usbccid serve``: it loads the cards, builds one virtual USB device per
configured reader (a CCID reader function holding CAC cards), exports them with a
USB/IP server that enforces the allow-list, opens the control socket, optionally wraps the
cards for ``--trace`` and the devices for ``--pcap``, prints how to attach, and runs until
SIGINT/SIGTERM (SIGHUP reloads the cards, like ``usbccid ctl reload``).

:class:`App` is the part that does not own the event loop; ``usbccid.testing`` runs it
inside a test process.

Cards from the configuration (:func:`load_card`): a stored card (``card = "NAME"``,
``"default"`` included) keeps its PIN state in its own directory
(``<state>/cards/NAME/pin-state.json``); a card made from certificate/key files keeps it in
``<state>/pin-state/<card id>.json``, its card ID being ``card_id`` from the configuration
or else derived from its certificates, so the same files give the same card (and the same
PIN state) across restarts.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import logging
import os
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Protocol

from cryptography.hazmat.primitives import hashes

from usbccid import __version__
from usbccid import config as cfg
from usbccid.cac.profile import CardProfile, PinStateStore
from usbccid.cac.provision import (
    CARD_ID_LENGTH,
    ProvisionError,
    container_label,
    load_container,
    make_pin_policy,
)
from usbccid.card import Card
from usbccid.config import CardConfig, CertKeyFiles, Pkcs12File
from usbccid.control import (
    ControlError,
    ReaderStatus,
    ServerStatus,
    SlotStatus,
    find_reader,
)
from usbccid.control_server import ControlServer, socket_path
from usbccid.errors import UsbccidError
from usbccid.pcap import UsbipCapture, UsbPcapWriter
from usbccid.server import UsbipServer
from usbccid.state import FilePinStateStore, StateError, load_or_create_card
from usbccid.trace import TracingCard
from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import DeviceIdentity, UsbFunction

log = logging.getLogger(__name__)

PIN_STATE_DIR = "pin-state"


class CardLoadError(UsbccidError):
    """A configured card cannot be built (unreadable key, wrong passphrase...). One line."""


@dataclass(frozen=True)
class LoadedCard:
    profile: CardProfile
    pin_store: PinStateStore
    description: str  # for a human: 'stored card "default"' or 'files (2 containers)'
    ca_file: Path | None = None  # the test CA a host should trust, when there is one

    @property
    def current_pin(self) -> str:
        """The PIN as it is now (the user may have changed it on the card)."""
        state = self.pin_store.load()
        pin = state.pin if state is not None else self.profile.pin_policy.pin
        return pin.decode("ascii", "replace")


def load_card(config: CardConfig, state_dir: Path, now: datetime | None = None) -> LoadedCard:
    """The card ``config`` describes (generating a stored card on first use).

    Raises:
        CardLoadError: a file cannot be read or used; the message names it.
        usbccid.state.StateError: the state directory is unusable.
    """
    if config.type != "cac":
        raise CardLoadError(f"{config.origin}: unsupported card type {config.type!r}")
    if config.stored is not None:
        when = now or datetime.now(UTC)
        card, store = load_or_create_card(state_dir, when, name=config.stored)
        ca = store.path.parent / "ca.pem" if card.ca_certificate is not None else None
        n = len(card.profile.containers)
        return LoadedCard(
            profile=card.profile,
            pin_store=store,
            description=f'stored card "{config.stored}" ({n} container{"s" * (n != 1)})',
            ca_file=ca,
        )
    containers = []
    for index, source in enumerate(config.containers):
        label = source.label or container_label(index)
        try:
            if isinstance(source, CertKeyFiles):
                containers.append(
                    load_container(
                        _read(source.cert, source.origin),
                        _read(source.key, source.origin),
                        label=label,
                        passphrase=_passphrase(source),
                        source=str(source.cert),
                        key_source=str(source.key),
                    )
                )
            else:
                assert isinstance(source, Pkcs12File)
                containers.append(
                    load_container(
                        _read(source.path, source.origin),
                        label=label,
                        passphrase=_passphrase(source),
                        source=str(source.path),
                    )
                )
        except ProvisionError as exc:
            raise CardLoadError(f"{source.origin}: {exc}") from None
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
        card_id = digest.digest()[:CARD_ID_LENGTH]
    profile = CardProfile(card_id=card_id, containers=tuple(containers), pin_policy=policy)
    store = FilePinStateStore(_pin_state_path(state_dir, card_id))
    store.load()  # a corrupt file stops us now, not in the middle of an APDU
    n = len(containers)
    return LoadedCard(
        profile=profile,
        pin_store=store,
        description=f"card from files ({n} container{'s' * (n != 1)})",
    )


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


class AppError(UsbccidError):
    """The server cannot start or run as configured. One line, for stderr."""


# --------------------------------------------------------------------------- readers


class Reader(Protocol):
    """What the app needs of a reader: its USB function, and the local card hot-plug."""

    @property
    def function(self) -> UsbFunction: ...

    @property
    def identity(self) -> DeviceIdentity: ...

    def insert(self, slot: int, card: Card) -> None: ...

    def remove(self, slot: int) -> None: ...

    def slot_state(self, slot: int) -> str:
        """ "empty", "present" (card in, not powered) or "active" (powered)."""
        ...


ReaderFactory = Callable[[cfg.ReaderConfig, DeviceIdentity], Reader]


def reader_identity(config: cfg.ReaderConfig, state_dir: Path) -> DeviceIdentity:
    """The USB identity of a configured reader.

    The serial number, unless configured, is derived from the state directory and the
    reader's name: stable across restarts (pcscd names readers by it) and different for
    two servers with different state directories attached to one host.

    Raises:
        AppError: unknown preset.
    """
    from usbccid.ccid.identity import DEFAULT_PRESET, make_identity

    ident = config.identity
    vid_pid = None
    if ident.vendor_id is not None and ident.product_id is not None:
        vid_pid = (ident.vendor_id, ident.product_id)
    serial = ident.serial_number
    if serial is None:
        digest = hashlib.sha256(f"{state_dir.resolve()}\0{config.name}".encode()).hexdigest()
        serial = f"USBCCID-{digest[:10].upper()}"
    extra: dict[str, Any] = {}
    if ident.manufacturer is not None:
        extra["manufacturer"] = ident.manufacturer
    if ident.product is not None:
        extra["product"] = ident.product
    if ident.bcd_device is not None:
        extra["bcd_device"] = ident.bcd_device
    try:
        return make_identity(
            ident.preset or DEFAULT_PRESET, vid_pid=vid_pid, serial_number=serial, **extra
        )
    except ValueError as exc:
        raise AppError(f"{config.origin}: reader {config.name}: {exc}") from None


def ccid_reader(config: cfg.ReaderConfig, identity: DeviceIdentity) -> Reader:
    """The real thing: a ``usbccid.ccid`` reader with ``config``'s identity and slots."""
    return _CcidReaderAdapter(config, identity)


class _CcidReaderAdapter:
    """Adapts :class:`usbccid.ccid.reader.CcidReader` to :class:`Reader`."""

    def __init__(self, config: cfg.ReaderConfig, identity: DeviceIdentity) -> None:
        from usbccid.ccid.reader import CcidReader

        # pcscd puts iInterface into the reader's name: "VMware Virtual USB CCID
        # [usbccid desk] (serial) 00 00", so the configured name shows on the host.
        self.reader = CcidReader(
            len(config.slots), identity=identity, interface_name=f"usbccid {config.name}"
        )

    @property
    def function(self) -> UsbFunction:
        return self.reader

    @property
    def identity(self) -> DeviceIdentity:
        return self.reader.identity

    def insert(self, slot: int, card: Card) -> None:
        self.reader.insert(slot, card)

    def remove(self, slot: int) -> None:
        self.reader.remove(slot)

    def slot_state(self, slot: int) -> str:
        from usbccid.ccid.slot import SlotState

        return {
            SlotState.ABSENT: "empty",
            SlotState.PRESENT_INACTIVE: "present",
            SlotState.ACTIVE: "active",
        }[self.reader.slot_state(slot)]


# --------------------------------------------------------------------------- devices


class _CapturedDevice(VirtualDevice):
    """A :class:`VirtualDevice` whose URB traffic also goes to a pcap (``--pcap``)."""

    capture: UsbipCapture | None = None
    clock: Callable[[], float] = time.time

    def submit(self, cmd: wire.CmdSubmit) -> list[wire.RetSubmit]:
        capture = self.capture
        if capture is None:
            return super().submit(cmd)
        capture.submitted(
            cmd.seqnum,
            cmd.devid,
            cmd.direction == wire.Direction.IN,
            cmd.ep,
            cmd.transfer_buffer_length,
            wire.encode_setup(cmd.setup),
            cmd.data,
            cmd.interval,
            self.clock(),
        )
        replies = super().submit(cmd)
        self._record(replies)
        return replies

    def poll(self) -> list[wire.RetSubmit]:
        # submit() completes parked URBs without calling poll(): no reply is recorded twice
        replies = super().poll()
        self._record(replies)
        return replies

    def unlink(self, cmd: wire.CmdUnlink) -> wire.RetUnlink:
        reply = super().unlink(cmd)
        if self.capture is not None:
            self.capture.unlinked(cmd.unlink_seqnum, reply.status, self.clock())
        return reply

    def reset(self) -> None:
        super().reset()
        if self.capture is not None:
            self.capture.reset()

    def _record(self, replies: list[wire.RetSubmit]) -> None:
        if self.capture is None:
            return
        now = self.clock()
        for r in replies:
            self.capture.returned(r.seqnum, r.status, r.actual_length, r.data, now)


class _CountingCard:
    """Counts a card's APDUs and resets for the status display."""

    def __init__(self, card: Card, counters: dict[str, int]) -> None:
        self.card = card
        self.counters = counters

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def power_on(self) -> bytes:
        self.counters["power_ons"] = self.counters.get("power_ons", 0) + 1
        return self.card.power_on()

    def power_off(self) -> None:
        self.card.power_off()

    def transmit(self, command: bytes) -> bytes:
        self.counters["apdus"] = self.counters.get("apdus", 0) + 1
        return self.card.transmit(command)


# --------------------------------------------------------------------------- the app


@dataclass
class _Slot:
    config: cfg.SlotConfig
    card: LoadedCard | None = None
    inserted: bool = False


@dataclass
class _Reader:
    config: cfg.ReaderConfig
    reader: Reader
    device: VirtualDevice
    busid: str
    slots: list[_Slot]
    counters: dict[str, int] = field(default_factory=dict)


class App:
    """The built server: readers, exporter, USB/IP server, control socket.

    Implements :class:`usbccid.control.ServerState`. All methods run on the event loop's
    thread (the control socket's handler is called there).
    """

    def __init__(
        self,
        config: cfg.Config,
        reader_factory: ReaderFactory = ccid_reader,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if config.state_dir is None:
            raise AppError("no state directory")
        self.config = config
        self.state_dir: Path = config.state_dir
        self._reader_factory = reader_factory
        self._now = now
        self.started = time.monotonic()
        self.address: tuple[str, int] | None = None
        self._pcap: UsbPcapWriter | None = None
        self._pcap_file: IO[bytes] | None = None
        self._server: UsbipServer | None = None
        self._control: ControlServer | None = None
        _ensure_dir(self.state_dir)
        self.readers = self._build()

    # -- building ------------------------------------------------------------------

    def _build(self) -> list[_Reader]:
        if self.config.pcap is not None:
            try:
                # 0600: the capture holds everything the host sent, PINs included
                fd = os.open(self.config.pcap, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                self._pcap_file = os.fdopen(fd, "wb")
            except OSError as exc:
                raise AppError(
                    f"cannot write pcap {self.config.pcap}: {exc.strerror or exc}"
                ) from None
            self._pcap = UsbPcapWriter(self._pcap_file)
            log.warning(
                "capturing USB traffic to %s: it is not redacted (PINs, signatures); "
                "do not share it as is",
                self.config.pcap,
            )
        readers: list[_Reader] = []
        self.exporter = Exporter()
        for rc in self.config.readers:
            slots = [_Slot(sc, self._load(sc.card, rc.origin)) for sc in rc.slots]
            reader = self._reader_factory(rc, reader_identity(rc, self.state_dir))
            device = _CapturedDevice(reader.identity, reader.function)
            busid = self.exporter.add(device)
            if rc.bus_id is not None and rc.bus_id != busid:
                raise AppError(
                    f"{rc.origin}: reader {rc.name!r} asks for bus id {rc.bus_id}, but this "
                    f"server numbers bus ids 1-1, 1-2, ... in reader order (it would be {busid})"
                )
            if self._pcap is not None:
                types = {
                    ep.address: int(ep.transfer_type) for ep in reader.function.interface.endpoints
                }
                devnum = int(busid.split("-")[1].split(".")[0])
                device.capture = UsbipCapture(self._pcap, types, devnum)
            r = _Reader(rc, reader, device, busid, slots)
            for index, slot in enumerate(slots):
                if slot.card is not None and slot.config.inserted:
                    self._insert(r, index)
            readers.append(r)
        return readers

    def _load(self, card: CardConfig | None, origin: str) -> LoadedCard | None:
        if card is None:
            return None
        try:
            return load_card(card, self.state_dir, self._now())
        except StateError as exc:
            raise AppError(str(exc)) from None

    def _card(self, r: _Reader, index: int, loaded: LoadedCard) -> Card:
        from usbccid.cac.card import CacCard

        card: Card = _CountingCard(CacCard(loaded.profile, loaded.pin_store), r.counters)
        if self.config.trace:
            card = TracingCard(card, f"{r.config.name}/{index}")
        return card

    def _insert(self, r: _Reader, index: int) -> None:
        slot = r.slots[index]
        if slot.card is None:
            raise ControlError(f"reader {r.config.name} slot {index} is configured empty")
        if slot.inserted:
            return
        r.reader.insert(index, self._card(r, index, slot.card))
        slot.inserted = True
        r.counters["insertions"] = r.counters.get("insertions", 0) + 1

    def _remove(self, r: _Reader, index: int) -> None:
        slot = r.slots[index]
        if not slot.inserted:
            return
        r.reader.remove(index)
        slot.inserted = False
        r.counters["removals"] = r.counters.get("removals", 0) + 1

    # -- running -------------------------------------------------------------------

    async def start(self) -> tuple[str, int]:
        """Listen for control requests and USB/IP; returns the bound (host, port).

        The control socket comes first: it is how a second server on the same state
        directory finds out, before it touches any port.
        """
        control = ControlServer(
            socket_path(self.state_dir, os.environ.get("RUNTIME_DIRECTORY")), self
        )
        await control.start()
        server = UsbipServer(self.exporter, allow=self.config.server.is_allowed)
        host, port = self.config.server.host, self.config.server.port
        try:
            self.address = await server.start(host, port)
        except OSError as exc:
            await control.close()
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "the port is in use (another usbccid, or usbipd?)"
            raise AppError(f"cannot listen on {_hostport(host, port)}: {reason}") from None
        self._server = server
        self._control = control
        return self.address

    @property
    def control_path(self) -> Path | None:
        return self._control.path if self._control is not None else None

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()
        if self._server is not None:
            await self._server.close()
        if self._pcap_file is not None:
            self._pcap_file.close()
            self._pcap_file = None

    def poke(self) -> None:
        if self._server is not None:
            self._server.poke()

    # -- ServerState ---------------------------------------------------------------

    def _find(self, reader: str) -> _Reader:
        index = find_reader([(r.config.name, r.busid) for r in self.readers], reader)
        return self.readers[index]

    def _check_slot(self, r: _Reader, slot: int) -> None:
        if not 0 <= slot < len(r.slots):
            raise ControlError(
                f"reader {r.config.name} has no slot {slot} (slots 0-{len(r.slots) - 1})"
            )

    def status(self) -> ServerStatus:
        imported = {s.busid: s.imported_by for s in self.exporter.status()}
        readers = []
        for r in self.readers:
            slots = []
            for index, slot in enumerate(r.slots):
                state = r.reader.slot_state(index) if slot.inserted else "empty"
                card = slot.card.description if slot.card is not None else None
                slots.append(SlotStatus(index=index, state=state, card=card))
            identity = r.reader.identity
            readers.append(
                ReaderStatus(
                    name=r.config.name,
                    bus_id=r.busid,
                    vendor_id=identity.vendor_id,
                    product_id=identity.product_id,
                    product=identity.product,
                    client=imported.get(r.busid),
                    slots=tuple(slots),
                    counters=dict(r.counters),
                )
            )
        host, port = self.address or (self.config.server.host, self.config.server.port)
        return ServerStatus(
            version=__version__,
            listen=_hostport(host, port),
            pid=os.getpid(),
            uptime=time.monotonic() - self.started,
            readers=tuple(readers),
            counters=self._server_counters(),
        )

    def _server_counters(self) -> dict[str, int]:
        server = self._server
        if server is None:
            return {"connections": 0, "refused": 0}
        return {"connections": server.accepted, "refused": server.refused}

    def insert(self, reader: str, slot: int) -> None:
        r = self._find(reader)
        self._check_slot(r, slot)
        self._insert(r, slot)
        self.poke()

    def remove(self, reader: str, slot: int) -> None:
        r = self._find(reader)
        self._check_slot(r, slot)
        self._remove(r, slot)
        self.poke()

    def reload(self) -> Mapping[str, Any]:
        """Re-read the configuration file and the cards; swap the cards that changed.

        Readers and their slots are fixed while running (the host has enumerated them):
        a change there is reported as needing a restart.
        """
        if self.config.path is not None:
            try:
                new = cfg.load_config(self.config.path)
            except cfg.ConfigError as exc:
                raise ControlError(f"configuration not reloaded: {exc}") from None
        else:
            new = self.config
        changed: list[str] = []
        restart: list[str] = []
        by_name = {rc.name: rc for rc in new.readers}
        if [rc.name for rc in new.readers] != [r.config.name for r in self.readers]:
            restart.append("the set of readers changed")
        for r in self.readers:
            rc = by_name.get(r.config.name)
            if rc is None:
                continue
            if len(rc.slots) != len(r.slots) or rc.identity != r.config.identity:
                restart.append(f"reader {r.config.name}: identity or slot count changed")
                continue
            for index, sc in enumerate(rc.slots):
                try:
                    loaded = self._load(sc.card, rc.origin)
                except UsbccidError as exc:
                    raise ControlError(f"cards not reloaded: {exc}") from None
                old = r.slots[index]
                same = (
                    loaded is not None
                    and old.card is not None
                    and _same_card(loaded.profile, old.card.profile)
                ) or (loaded is None and old.card is None)
                if same:
                    continue
                was_in = old.inserted
                self._remove(r, index)
                r.slots[index] = _Slot(sc, loaded)
                if loaded is not None and (was_in or sc.inserted):
                    self._insert(r, index)
                changed.append(f"{r.config.name}:{index}")
        self.poke()
        message = f"reloaded: {len(changed)} card(s) changed"
        if changed:
            message += f" ({', '.join(changed)})"
        if restart:
            message += "; restart needed for: " + "; ".join(restart)
        log.info("%s", message)
        return {"changed": changed, "restart_needed": restart, "message": message}

    # -- for humans ----------------------------------------------------------------

    def banner(self) -> list[str]:
        host, port = self.address or (self.config.server.host, self.config.server.port)
        attach_host = _attach_host(host)
        lines = [f"usbccid {__version__}: USB/IP server listening on {_hostport(host, port)}"]
        for r in self.readers:
            lines.append(
                f"reader {r.config.name}: bus id {r.busid}, "
                f"{r.reader.identity.vendor_id:04x}:{r.reader.identity.product_id:04x} "
                f"{r.reader.identity.product}"
            )
            for index, slot in enumerate(r.slots):
                if slot.card is None:
                    lines.append(f"  slot {index}: empty")
                    continue
                where = "inserted" if slot.inserted else "removed"
                lines.append(
                    f"  slot {index}: {slot.card.description}, {where}, PIN {slot.card.current_pin}"
                )
                if slot.card.ca_file is not None:
                    lines.append(f"    test CA certificate: {slot.card.ca_file}")
        port_opt = f" --tcp-port {port}" if port != cfg.DEFAULT_PORT else ""
        lines.append("attach on the host (as root, after 'modprobe vhci-hcd'):")
        for r in self.readers:
            lines.append(f"  usbip{port_opt} attach -r {attach_host} -b {r.busid}")
        if self._control is not None:
            lines.append(f"control socket: {self._control.path}")
        return lines


def _same_card(a: CardProfile, b: CardProfile) -> bool:
    """Whether two profiles describe the same card (key objects do not compare equal)."""

    def key(p: CardProfile) -> tuple[object, ...]:
        return (
            p.card_id,
            p.pin_policy,
            tuple((c.label, c.certificate.fingerprint(hashes.SHA256())) for c in p.containers),
        )

    return key(a) == key(b)


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _attach_host(host: str) -> str:
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - recognising it, not binding
        return "<this machine's address>"
    return host


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise AppError(f"cannot create state directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise AppError(f"state directory {path} is not writable")


# --------------------------------------------------------------------------- entry points


def check(config: cfg.Config, reader_factory: ReaderFactory = ccid_reader) -> str:
    """Build everything without listening (``usbccid serve --check``); a summary."""
    app = App(replace(config, pcap=None), reader_factory)
    slots = sum(len(r.slots) for r in app.readers)
    n = len(app.readers)
    return f"{n} reader{'s' * (n != 1)}, {slots} slot{'s' * (slots != 1)}"


def serve(
    config: cfg.Config,
    announce: Callable[[str], None],
    reader_factory: ReaderFactory = ccid_reader,
) -> None:
    """Run the server until SIGINT or SIGTERM (``usbccid serve``)."""
    asyncio.run(_serve(config, announce, reader_factory))


async def _serve(
    config: cfg.Config, announce: Callable[[str], None], reader_factory: ReaderFactory
) -> None:
    app = App(config, reader_factory)
    try:
        host, _ = await app.start()
    except BaseException:
        await app.close()
        raise
    if (
        host not in ("127.0.0.1", "::1", "localhost")
        and config.server.allow == cfg.LOOPBACK_NETWORKS
    ):
        log.warning(
            "listening on %s but only loopback clients are allowed: add [server] allow "
            "or --allow CIDR for the clients' networks",
            host,
        )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    def on_hup() -> None:
        try:
            app.reload()
        except ControlError as exc:
            log.error("%s", exc)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    for line in app.banner():
        announce(line)
    try:
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        await app.close()
