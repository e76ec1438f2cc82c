"""The USB/IP front end: each configured reader becomes a CCID-class USB device.

A reader is a :class:`usbccid.ccid.reader.CcidReader` (the USB function) inside a
:class:`usbccid.usbip.device.VirtualDevice`, exported by one
:class:`usbccid.usbip.exporter.Exporter` under bus ids 1-1, 1-2, ... in reader order and
served over TCP by :class:`usbccid.frontends.usbip.server.UsbipServer`, which enforces the
configuration's allow-list and keeps TCP keepalive on every connection (``[server]
keepalive_*``).

Readers added while running (``ctl add-reader``, ``ctl reload``) get their configured
``bus_id`` if it is free, else the bus id a reader of that name had before in this run,
else the next bus id never used: a host never finds another reader under a bus id it
knew. A removed reader is unplugged: its importer's connection is closed, as when the
server stops.
"""

from __future__ import annotations

import errno
import hashlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from usbccid.card import Card
from usbccid.ccid.descriptor import ReaderConfig as CcidConfig
from usbccid.ccid.identity import DEFAULT_PRESET, make_identity
from usbccid.ccid.pinpad import PinPad, PinPadConfig
from usbccid.ccid.reader import CcidReader
from usbccid.ccid.slot import SlotState
from usbccid.frontends.base import FrontendError, FrontendReader
from usbccid.frontends.usbip.server import Keepalive, UsbipServer
from usbccid.tool import config as cfg
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import DeviceIdentity, UsbFunction

#: Builds the virtual device around a reader that will be exported under the bus id (the
#: third argument; ``--pcap`` passes a factory whose devices also record).
DeviceFactory = Callable[[DeviceIdentity, UsbFunction, str], VirtualDevice]


def plain_device(identity: DeviceIdentity, function: UsbFunction, busid: str) -> VirtualDevice:
    return VirtualDevice(identity, function)


_SLOT_STATES = {
    SlotState.ABSENT: "empty",
    SlotState.PRESENT_INACTIVE: "present",
    SlotState.ACTIVE: "active",
}


def reader_identity(config: cfg.ReaderConfig, state_dir: Path) -> DeviceIdentity:
    """The USB identity of a configured reader.

    The serial number, unless configured, is derived from the state directory and the
    reader's name: stable across restarts (pcscd names readers by it) and different for
    two servers with different state directories attached to one host.

    Raises:
        FrontendError: unknown preset.
    """
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
        raise FrontendError(f"{config.origin}: reader {config.name}: {exc}") from None


class UsbipReader:
    """One exported reader: a CCID reader in a virtual USB device with a bus id."""

    def __init__(
        self, exporter: Exporter, reader: CcidReader, device: VirtualDevice, bus_id: str
    ) -> None:
        self._exporter = exporter
        self.reader = reader
        self.device = device
        self.bus_id = exporter.add(device, bus_id)

    @property
    def address(self) -> str:
        return self.bus_id

    @property
    def identity(self) -> DeviceIdentity:
        return self.reader.identity

    @property
    def client(self) -> str | None:
        for status in self._exporter.status():
            if status.busid == self.bus_id:
                return status.imported_by
        return None

    def insert(self, slot: int, card: Card) -> None:
        self.reader.insert(slot, card)

    def remove(self, slot: int) -> None:
        self.reader.remove(slot)

    def slot_state(self, slot: int) -> str:
        return _SLOT_STATES[self.reader.slot_state(slot)]

    def slot_detail(self, slot: int) -> str | None:
        return None

    @property
    def pinpad(self) -> PinPad | None:
        """The reader's PIN pad (its keypad), if it has one."""
        return self.reader.pinpad


def ccid_config(config: cfg.ReaderConfig) -> CcidConfig:
    """The CCID layer's view of a configured reader: its PIN pad, if any."""
    pad = config.pinpad
    if pad is None:
        return CcidConfig()
    lines, columns = pad.display if pad.display is not None else (0, 0)
    return CcidConfig(
        pinpad=PinPadConfig(default_timeout=pad.timeout, lcd_lines=lines, lcd_columns=columns)
    )


class UsbipFrontend:
    """Every ``frontend = "usbip"`` reader, on one USB/IP server (``[server]``)."""

    hot_plug: ClassVar[bool] = True

    def __init__(self, config: cfg.Config, make_device: DeviceFactory = plain_device) -> None:
        assert config.state_dir is not None
        self.config = config
        self.state_dir: Path = config.state_dir
        self.make_device = make_device
        self.exporter = Exporter()
        self.readers: list[UsbipReader] = []
        self.address: tuple[str, int] | None = None
        self._server: UsbipServer | None = None
        self._bus_ids: dict[str, str] = {}  # reader name -> the bus id it had in this run

    def _bus_id(self, config: cfg.ReaderConfig) -> str:
        taken = self.exporter.devices
        if self._server is None:
            # Before the start: in reader order, so that a configuration reads as it runs.
            bus_id = self.exporter.next_busid()
            if config.bus_id is not None and config.bus_id != bus_id:
                raise FrontendError(
                    f"{config.origin}: reader {config.name!r} asks for bus id {config.bus_id}, "
                    "but this server numbers bus ids 1-1, 1-2, ... in reader order (it would "
                    f"be {bus_id})"
                )
            return bus_id
        if config.bus_id is not None:
            if config.bus_id in taken:
                raise FrontendError(
                    f"{config.origin}: reader {config.name!r} asks for bus id {config.bus_id}, "
                    "which another reader has"
                )
            return config.bus_id
        before = self._bus_ids.get(config.name)
        if before is not None and before not in taken:
            return before
        return self.exporter.next_busid()

    def add_reader(self, config: cfg.ReaderConfig) -> UsbipReader:
        """Build and export the reader ``config`` describes (before or after the start).

        Raises:
            FrontendError: its bus id or identity cannot be had.
        """
        assert config.frontend == "usbip", config.frontend
        # pcscd puts iInterface into the reader's name: "VMware Virtual USB CCID
        # [usbccid desk] (serial) 00 00", so the configured name shows on the host.
        reader = CcidReader(
            len(config.slots),
            identity=reader_identity(config, self.state_dir),
            config=ccid_config(config),
            interface_name=f"usbccid {config.name}",
        )
        bus_id = self._bus_id(config)
        try:
            device = self.make_device(reader.identity, reader, bus_id)
            exported = UsbipReader(self.exporter, reader, device, bus_id)
        except ValueError as exc:
            raise FrontendError(f"{config.origin}: reader {config.name!r}: {exc}") from None
        self._bus_ids[config.name] = exported.bus_id
        self.readers.append(exported)
        self.poke()
        return exported

    def remove_reader(self, reader: FrontendReader) -> None:
        """Unplug ``reader``: it leaves the device list, its importer is disconnected."""
        mine = next(r for r in self.readers if r is reader)
        self.readers.remove(mine)
        self.exporter.remove(mine.bus_id)
        self.poke()  # the driver closes the importer's connection

    async def start(self) -> None:
        server = UsbipServer(
            self.exporter, allow=self.config.server.is_allowed, keepalive=keepalive(self.config)
        )
        host, port = self.config.server.host, self.config.server.port
        try:
            self.address = await server.start(host, port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "the port is in use (another usbccid, or usbipd?)"
            raise FrontendError(f"cannot listen on {hostport(host, port)}: {reason}") from None
        self._server = server

    async def close(self) -> None:
        if self._server is not None:
            await self._server.close()

    def poke(self) -> None:
        if self._server is not None:
            self._server.poke()

    def counters(self) -> dict[str, int]:
        server = self._server
        if server is None:
            return {"connections": 0, "refused": 0}
        return {"connections": server.accepted, "refused": server.refused}

    def listen(self) -> str:
        host, port = self.address or (self.config.server.host, self.config.server.port)
        return hostport(host, port)

    def banner(self) -> list[str]:
        host, port = self.address or (self.config.server.host, self.config.server.port)
        attach_host = host
        if host in ("0.0.0.0", "::", ""):  # noqa: S104 - recognising it, not binding
            attach_host = "<this machine's address>"
        port_opt = f" --tcp-port {port}" if port != cfg.DEFAULT_PORT else ""
        lines = ["attach on the host (as root, after 'modprobe vhci-hcd'):"]
        lines += [f"  usbip{port_opt} attach -r {attach_host} -b {r.bus_id}" for r in self.readers]
        return lines


def keepalive(config: cfg.Config) -> Keepalive:
    server = config.server
    return Keepalive(
        idle=server.keepalive_idle, interval=server.keepalive_interval, count=server.keepalive_count
    )


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
