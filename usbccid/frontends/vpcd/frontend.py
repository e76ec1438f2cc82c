"""The vpcd front end for the composition root: ``frontend = "vpcd"`` readers.

A configured reader is one vpcd reader of pcscd (one ``/etc/reader.conf.d`` entry of
vsmartcard-vpcd); its slot N is vpcd's slot N, which listens on ``port + N``
(ifd-vpcd.c ``IFDHCreateChannel``: ``Channel + slot``). Each slot is a
:class:`~usbccid.frontends.vpcd.shell.VpcdFrontend` that connects while a card is in it.
pcscd names the slots "Virtual PCD 00 00", "Virtual PCD 00 01", ... (its FRIENDLYNAME,
then the reader and slot numbers); Debian 12's vpcd has two slots, so a reader on the
default port may have at most two (a third would find nothing listening).
"""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from usbccid.card import Card
from usbccid.frontends.base import FrontendError, FrontendReader
from usbccid.frontends.vpcd.keepalive import PcscdKeepAlive
from usbccid.frontends.vpcd.shell import VpcdFrontend, VpcdStatus
from usbccid.frontends.vpcd.wire import VPCD_PORT
from usbccid.tool import config as cfg
from usbccid.usbip.function import DeviceIdentity

#: The reader.conf FRIENDLYNAME of Debian's vsmartcard-vpcd (/etc/reader.conf.d/vpcd).
DEBIAN_FRIENDLY_NAME = "Virtual PCD"
DEBIAN_SLOTS = 2  # vsmartcard's --enable-vpcdslots default, Debian 12's build


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class VpcdReader:
    """One configured reader: one :class:`VpcdFrontend` per slot, on consecutive ports."""

    def __init__(self, config: cfg.ReaderConfig) -> None:
        vpcd = config.vpcd if config.vpcd is not None else cfg.VpcdConfig()
        self.config = config
        self.host = vpcd.host
        self.port = vpcd.port
        local = is_loopback(vpcd.host)
        self.slots = [
            VpcdFrontend(
                vpcd.host,
                vpcd.port + index,
                name=f"{config.name}/{index}",
                keepalive=PcscdKeepAlive() if local else None,  # the local pcscd's vpcd
            )
            for index in range(len(config.slots))
        ]

    @property
    def address(self) -> str:
        return _hostport(self.host, self.port)

    @property
    def identity(self) -> DeviceIdentity | None:
        return None  # not a USB device: pcscd names it after vpcd's reader.conf

    @property
    def client(self) -> str | None:
        connected = [s for s in self.slots if s.status().connected]
        return f"vpcd {self.address}" if connected else None

    def insert(self, slot: int, card: Card) -> None:
        self.slots[slot].insert(card)

    def remove(self, slot: int) -> None:
        self.slots[slot].remove()

    def slot_state(self, slot: int) -> str:
        status = self.slots[slot].status()
        if not status.inserted:
            return "empty"
        return "active" if status.card_state == "on" else "present"

    def slot_detail(self, slot: int) -> str | None:
        return describe(self.slots[slot].status())

    def status(self, slot: int) -> VpcdStatus:
        return self.slots[slot].status()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pcscd_name(port: int) -> str | None:
    """The name pcscd gives the slot on ``port`` with Debian's vpcd configuration."""
    index = port - VPCD_PORT
    if 0 <= index < DEBIAN_SLOTS:
        return f"{DEBIAN_FRIENDLY_NAME} 00 {index:02X}"
    return None


def describe(status: VpcdStatus) -> str:
    """One line for ``ctl status``: where the slot connects and how it goes."""
    where = f"vpcd {_hostport(status.host, status.port)}"
    if not status.inserted:
        return where
    if not status.connected:
        why = f": {status.last_error}" if status.last_error else ""
        return f"{where}, not connected{why}"
    c = status.counters
    return f"{where}, connected; {c.apdus} APDUs, {c.atr_requests} ATR requests"


class VpcdFrontends:
    """Every ``frontend = "vpcd"`` reader of the configuration."""

    hot_plug: ClassVar[bool] = False  # each slot is a connection to vpcd, made at start

    def __init__(self, config: cfg.Config) -> None:
        self.config = config
        self.readers: list[VpcdReader] = []
        self._started = False

    def add_reader(self, config: cfg.ReaderConfig) -> VpcdReader:
        reader = VpcdReader(config)
        for other in self.readers:
            mine = {(s.host, s.port) for s in reader.slots}
            if mine & {(s.host, s.port) for s in other.slots}:
                raise FrontendError(
                    f"{config.origin}: reader {config.name!r} uses the vpcd ports of reader "
                    f"{other.config.name!r} (slot N connects to port + N)"
                )
        if self._started:
            raise FrontendError(
                f"{config.origin}: reader {config.name!r}: vpcd readers are fixed while "
                "running (restart the server)"
            )
        self.readers.append(reader)
        return reader

    def remove_reader(self, reader: FrontendReader) -> None:
        if self._started:
            raise FrontendError("vpcd readers are fixed while running (restart the server)")
        self.readers = [r for r in self.readers if r is not reader]

    async def start(self) -> None:
        """Start connecting; never fails for want of vpcd (each slot retries, backing off)."""
        for reader in self.readers:
            for slot in reader.slots:
                await slot.start()
        self._started = True

    async def close(self) -> None:
        for reader in self.readers:
            for slot in reader.slots:
                if self._started:
                    await slot.close()

    def poke(self) -> None:
        """Nothing to do: a slot connects or disconnects as soon as its card moves."""

    def counters(self) -> dict[str, int]:
        connections = sum(s.status().connections for r in self.readers for s in r.slots)
        return {"vpcd_connections": connections}

    def banner(self) -> list[str]:
        lines = []
        for reader in self.readers:
            for index, slot in enumerate(reader.slots):
                name = pcscd_name(slot.port)
                seen = f" (pcscd: {name!r})" if name else ""
                lines.append(
                    f"reader {reader.config.name} slot {index}: connects to vpcd at "
                    f"{_hostport(slot.host, slot.port)}{seen}"
                )
        lines.append(
            "pcscd needs vsmartcard's vpcd driver (Debian: apt-get install pcscd "
            "vsmartcard-vpcd, then restart pcscd); the card appears once it connects"
        )
        return lines
