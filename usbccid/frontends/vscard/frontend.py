"""The VSCard front end: each ``frontend = "vscard"`` reader is one ``ccid-card-passthru``
device of a QEMU, inside QEMU's own usb-ccid reader.

A reader is a :class:`~usbccid.frontends.vscard.server.VscardServer` on its own endpoint
(``[reader.vscard]``: ``listen`` or ``connect``, TCP or a UNIX socket). It has one slot
(usb-ccid has one) and no USB identity of ours: QEMU's usb-ccid is the USB device the
guest sees (08e6:4433 "QEMU USB CCID"). TCP listeners obey ``[server] allow``.
"""

from __future__ import annotations

import errno
from typing import ClassVar

from usbccid.card import Card
from usbccid.frontends.base import FrontendError, FrontendReader
from usbccid.frontends.vscard.server import VscardServer
from usbccid.tool import config as cfg
from usbccid.usbip.function import DeviceIdentity


class VscardReader:
    """One configured reader: its server, and where QEMU finds it."""

    def __init__(self, config: cfg.ReaderConfig, server: VscardServer) -> None:
        assert config.vscard is not None
        self.config = config
        self.endpoint: cfg.VscardConfig = config.vscard
        self.server = server
        self._where = self.endpoint.describe()

    @property
    def address(self) -> str:
        """Where it listens or what it connects to (the bound port once listening)."""
        return self._where

    @property
    def identity(self) -> DeviceIdentity | None:
        return None  # the USB device is QEMU's usb-ccid

    @property
    def client(self) -> str | None:
        """The QEMU holding the card (or the first connected one)."""
        connections = self.server.status().connections
        holder = next((c for c in connections if c.holds_card), None)
        chosen = holder or (connections[0] if connections else None)
        return chosen.peer if chosen is not None else None

    def insert(self, slot: int, card: Card) -> None:
        self._check(slot)
        self.server.insert(card)

    def remove(self, slot: int) -> None:
        self._check(slot)
        self.server.remove()

    def slot_state(self, slot: int) -> str:
        """ "active" once a QEMU took the card's ATR, "present" while none has it yet."""
        self._check(slot)
        if self.server.card is None:
            return "empty"
        holders = [c for c in self.server.status().connections if c.holds_card]
        return "active" if holders and holders[0].client.card_inserted else "present"

    def slot_detail(self, slot: int) -> str | None:
        self._check(slot)
        status = self.server.status()
        holder = next((c for c in status.connections if c.holds_card), None)
        if holder is not None:
            return f"QEMU {holder.peer}: {holder.client.state}"
        if status.connections:
            return f"{len(status.connections)} QEMU connected, none holds the card"
        verb = "connecting to" if self.endpoint.mode == "connect" else "waiting for QEMU on"
        return f"{verb} {self._where}"

    def _check(self, slot: int) -> None:
        if slot != 0:
            raise FrontendError(f"reader {self.config.name} has one slot (0), not {slot}")

    async def start(self) -> None:
        e = self.endpoint
        try:
            if e.mode == "listen":
                if e.path is not None:
                    self._where = str(await self.server.listen_unix(e.path))
                else:
                    assert e.host is not None
                    assert e.port is not None
                    host, port = await self.server.listen_tcp(e.host, e.port)
                    self._where = cfg.VscardConfig("listen", host, port).describe()
            elif e.path is not None:
                self.server.connect_unix(e.path)
            else:
                assert e.host is not None
                assert e.port is not None
                self.server.connect_tcp(e.host, e.port)
        except OSError as exc:
            reason = exc.strerror or str(exc)
            if exc.errno == errno.EADDRINUSE:
                reason = "the address is in use"
            raise FrontendError(
                f"reader {self.config.name}: cannot listen on {self._where}: {reason}"
            ) from None

    def qemu_options(self) -> str:
        """The QEMU command-line options that plug this reader in."""
        e, chardev = self.endpoint, f"usbccid-{self.config.name}"
        if e.path is not None:
            where = f"path={e.path}"
        else:
            host, _, port = self._where.rpartition(":")
            where = f"host={host.strip('[]')},port={port}"
        if e.mode == "listen":
            # QEMU 7.2: reconnect=SECONDS (QEMU 9.2 adds reconnect-ms); nodelay: QEMU
            # writes header and payload separately, Nagle would hold the payload back.
            opts = f"{where},reconnect=1" + (",nodelay=on" if e.path is None else "")
        else:
            opts = f"{where},server=on,wait=off" + (",nodelay=on" if e.path is None else "")
        return (
            f"-usb -device usb-ccid -chardev socket,id={chardev},{opts} "
            f"-device ccid-card-passthru,chardev={chardev}"
        )


class VscardFrontend:
    """Every ``frontend = "vscard"`` reader, each on its own endpoint."""

    hot_plug: ClassVar[bool] = False  # each reader listens on its own endpoint from start

    def __init__(self, config: cfg.Config) -> None:
        self.config = config
        self.readers: list[VscardReader] = []
        self._started = False

    def add_reader(self, config: cfg.ReaderConfig) -> VscardReader:
        if self._started:
            raise FrontendError(
                f"{config.origin}: reader {config.name!r}: VSCard readers are fixed while "
                "running (restart the server)"
            )
        if config.vscard is None:
            raise FrontendError(f"{config.origin}: reader {config.name}: no vscard endpoint")
        server = VscardServer(
            name=config.name,
            reader_name=f"usbccid {config.name}",
            allow=self.config.server.is_allowed,
        )
        reader = VscardReader(config, server)
        self.readers.append(reader)
        return reader

    def remove_reader(self, reader: FrontendReader) -> None:
        if self._started:
            raise FrontendError("VSCard readers are fixed while running (restart the server)")
        self.readers = [r for r in self.readers if r is not reader]

    async def start(self) -> None:
        self._started = True
        started: list[VscardReader] = []
        try:
            for reader in self.readers:
                await reader.start()
                started.append(reader)
        except FrontendError:
            for reader in started:
                await reader.server.close()
            raise

    async def close(self) -> None:
        for reader in self.readers:
            await reader.server.close()

    def poke(self) -> None:
        pass  # insertions and removals reach QEMU as they happen

    def counters(self) -> dict[str, int]:
        return {
            "vscard_connections": sum(r.server.accepted for r in self.readers),
            "vscard_refused": sum(r.server.refused for r in self.readers),
        }

    def banner(self) -> list[str]:
        lines = []
        for r in self.readers:
            lines.append(f"QEMU options for reader {r.config.name} (ccid-card-passthru):")
            lines.append(f"  {r.qemu_options()}")
        return lines
