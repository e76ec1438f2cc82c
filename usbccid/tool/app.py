"""The composition root: builds readers, cards and front ends from a Config, and runs them.

It only composes. The cards come from their sources (``usbccid.cards.registry``), the
readers from their front ends (``usbccid.frontends.registry``: USB/IP today); this module
puts a fresh card object into each slot, wraps it for the status counters and ``--trace``
(``usbccid.tool.trace``), gives the USB/IP front end a recording device factory for
``--pcap`` (``usbccid.tool.pcap``), and answers the control socket
(``usbccid.tool.control``).

:func:`serve` is ``usbccid serve``: it builds the :class:`App`, opens the control socket,
starts the front ends, prints how to attach, and runs until SIGINT/SIGTERM (SIGHUP
reloads the cards, like ``usbccid ctl reload``). :class:`App` is the part that does not
own the event loop; ``usbccid.testing`` runs it inside a test process.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from usbccid import __version__
from usbccid.card import Card
from usbccid.cards.cac import CardConfig
from usbccid.cards.registry import CardSourceConfig, load_card
from usbccid.cards.source import EmulatedCac, LoadedCard
from usbccid.cards.store import StateError, card_directory
from usbccid.errors import UsbccidError
from usbccid.frontends.base import FrontendError, FrontendReader
from usbccid.frontends.usbip.frontend import UsbipFrontend
from usbccid.tool import config as cfg
from usbccid.tool.control import (
    ControlError,
    ReaderStatus,
    ServerStatus,
    SlotStatus,
    find_reader,
)
from usbccid.tool.control_server import ControlServer, socket_path
from usbccid.tool.pcap import CapturedDevice, UsbipCapture, UsbPcapWriter
from usbccid.tool.schema import ConfigError
from usbccid.tool.trace import CountingCard, TracingCard
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import parse_busid
from usbccid.usbip.function import DeviceIdentity, UsbFunction

log = logging.getLogger(__name__)


class AppError(UsbccidError):
    """The server cannot start or run as configured. One line, for stderr."""


@dataclass
class _Slot:
    config: cfg.SlotConfig
    card: LoadedCard | None = None
    inserted: bool = False


@dataclass
class _Reader:
    config: cfg.ReaderConfig
    reader: FrontendReader
    slots: list[_Slot]
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def busid(self) -> str:
        return self.reader.address


class App:
    """The built server: readers, exporter, USB/IP server, control socket.

    Implements :class:`usbccid.tool.control.ServerState`. All methods run on the event loop's
    thread (the control socket's handler is called there).
    """

    def __init__(
        self,
        config: cfg.Config,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        if config.state_dir is None:
            raise AppError("no state directory")
        self.config = config
        self.state_dir: Path = config.state_dir
        self._now = now
        self.started = time.monotonic()
        self._pcap: UsbPcapWriter | None = None
        self._pcap_file: IO[bytes] | None = None
        self._control: ControlServer | None = None
        self._counters: dict[str, int] = {}
        _ensure_dir(self.state_dir)
        self.usbip = UsbipFrontend(config, self._make_device)
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
        loaded = [[self._load(sc.card, rc.origin) for sc in rc.slots] for rc in self.config.readers]
        try:
            _one_place(
                (rc.name, index, sc, card)
                for rc, cards in zip(self.config.readers, loaded, strict=True)
                for index, (sc, card) in enumerate(zip(rc.slots, cards, strict=True))
            )
        except ControlError as exc:
            raise AppError(str(exc)) from None
        readers: list[_Reader] = []
        for rc, cards in zip(self.config.readers, loaded, strict=True):
            try:
                readers.append(self._plug(rc, cards))
            except FrontendError as exc:
                raise AppError(str(exc)) from None
        return readers

    def _plug(self, rc: cfg.ReaderConfig, cards: Sequence[LoadedCard | None]) -> _Reader:
        """Export a new reader with ``cards`` in its slots (inserted as configured).

        Raises:
            FrontendError: the front end cannot have it (bus id, identity).
        """
        slots = [_Slot(sc, card) for sc, card in zip(rc.slots, cards, strict=True)]
        r = _Reader(rc, self.usbip.add_reader(rc), slots)
        for index, slot in enumerate(slots):
            if slot.card is not None and slot.config.inserted:
                self._insert(r, index)
        return r

    def _unplug(self, r: _Reader) -> None:
        """Take a reader away: its cards out, its importer disconnected."""
        for index in range(len(r.slots)):
            self._remove(r, index)
        self.usbip.remove_reader(r.reader)
        self.readers.remove(r)

    def _make_device(
        self, identity: DeviceIdentity, function: UsbFunction, busid: str
    ) -> VirtualDevice:
        device = CapturedDevice(identity, function)
        if self._pcap is not None:
            types = {ep.address: int(ep.transfer_type) for ep in function.interface.endpoints}
            devnum = parse_busid(busid)
            assert devnum is not None
            device.capture = UsbipCapture(self._pcap, types, devnum)
        return device

    def _load(self, card: CardSourceConfig | None, origin: str) -> LoadedCard | None:
        if card is None:
            return None
        try:
            return load_card(card, self.state_dir, self._now())
        except StateError as exc:
            raise AppError(str(exc)) from None

    def _card(self, r: _Reader, index: int, loaded: LoadedCard) -> Card:
        card: Card = CountingCard(loaded.new_card(), r.counters)
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
        try:
            await self.usbip.start()
        except FrontendError as exc:
            await control.close()
            raise AppError(str(exc)) from None
        self._control = control
        assert self.usbip.address is not None
        return self.usbip.address

    @property
    def address(self) -> tuple[str, int] | None:
        return self.usbip.address

    @property
    def control_path(self) -> Path | None:
        return self._control.path if self._control is not None else None

    async def close(self) -> None:
        if self._control is not None:
            await self._control.close()
        await self.usbip.close()
        if self._pcap_file is not None:
            self._pcap_file.close()
            self._pcap_file = None

    def poke(self) -> None:
        self.usbip.poke()

    # -- ServerState ---------------------------------------------------------------

    def _find(self, reader: str) -> _Reader:
        index = find_reader([(r.config.name, r.reader.address) for r in self.readers], reader)
        return self.readers[index]

    def _check_slot(self, r: _Reader, slot: int) -> None:
        if not 0 <= slot < len(r.slots):
            raise ControlError(
                f"reader {r.config.name} has no slot {slot} (slots 0-{len(r.slots) - 1})"
            )

    def status(self) -> ServerStatus:
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
                    bus_id=r.reader.address,
                    vendor_id=identity.vendor_id,
                    product_id=identity.product_id,
                    product=identity.product,
                    client=r.reader.client,
                    slots=tuple(slots),
                    counters=dict(r.counters),
                )
            )
        return ServerStatus(
            version=__version__,
            listen=self.usbip.listen(),
            pid=os.getpid(),
            uptime=time.monotonic() - self.started,
            readers=tuple(readers),
            counters={**self.usbip.counters(), **self._counters},
        )

    def insert(self, reader: str, slot: int, card: str | None = None) -> None:
        """Insert the slot's card, or (``card``) the stored card of that name into the
        empty slot; the slot keeps that card until a reload."""
        r = self._find(reader)
        self._check_slot(r, slot)
        if card is not None:
            if r.slots[slot].inserted:
                raise ControlError(
                    f"reader {r.config.name} slot {slot} holds a card: remove it first"
                )
            self._check_stored(card)
            config = CardConfig(stored=card, origin=f"ctl insert {r.config.name}:{slot}")
            try:
                loaded = load_card(config, self.state_dir, self._now())
            except UsbccidError as exc:
                raise ControlError(str(exc)) from None
            current = r.slots[slot]
            _one_place(
                [
                    *self._slots_except(r, slot),
                    (r.config.name, slot, replace(current.config, card=config), loaded),
                ]
            )
            r.slots[slot] = _Slot(replace(current.config, card=config), loaded)
        self._insert(r, slot)
        self.poke()

    def remove(self, reader: str, slot: int) -> None:
        r = self._find(reader)
        self._check_slot(r, slot)
        self._remove(r, slot)
        self.poke()

    def _check_stored(self, name: str) -> None:
        """At run time a stored card must exist already: generating one takes seconds,
        and the control socket answers on the event loop that serves the hosts."""
        try:
            directory = card_directory(self.state_dir, name)
        except StateError as exc:
            raise ControlError(str(exc)) from None
        if not directory.is_dir():
            raise ControlError(
                f"no card named {name!r} in {self.state_dir} (make it with "
                f"'usbccid card new --name {name}')"
            )

    def _slots_except(
        self, skip: _Reader | None = None, skip_slot: int | None = None
    ) -> list[tuple[str, int, cfg.SlotConfig | None, LoadedCard | None]]:
        return [
            (r.config.name, index, slot.config, slot.card)
            for r in self.readers
            for index, slot in enumerate(r.slots)
            if not (r is skip and (skip_slot is None or index == skip_slot))
        ]

    def add_reader(
        self,
        name: str,
        cards: Sequence[str | None] = ("default",),
        identity: str | None = None,
        bus_id: str | None = None,
    ) -> Mapping[str, Any]:
        """Export a new reader at once (``ctl add-reader``): one slot per entry of
        ``cards``, each a stored card's name (inserted) or None (an empty slot). It lasts
        until removed, or until a reload of a configuration that does not have it."""
        if any(r.config.name == name for r in self.readers):
            raise ControlError(f"a reader named {name!r} exists")
        if not cfg.READER_NAME.match(name):
            raise ControlError(f"invalid reader name {name!r}")
        if not 1 <= len(cards) <= 16:
            raise ControlError("a reader has 1 to 16 slots")
        for card in cards:
            if card is not None:
                self._check_stored(card)
        origin = f"ctl add-reader {name}"
        slots = tuple(
            cfg.SlotConfig(card=CardConfig(stored=c, origin=f"{origin} slot {i}"))
            if c is not None
            else cfg.SlotConfig(card=None, inserted=False)
            for i, c in enumerate(cards)
        )
        rc = cfg.ReaderConfig(
            name=name,
            bus_id=bus_id,
            identity=cfg.IdentityConfig(preset=identity),
            slots=slots,
            origin=origin,
        )
        try:
            loaded = [self._load(sc.card, origin) for sc in slots]
        except UsbccidError as exc:
            raise ControlError(str(exc)) from None
        _one_place(
            [
                *self._slots_except(),
                *(
                    (name, i, sc, card)
                    for i, (sc, card) in enumerate(zip(slots, loaded, strict=True))
                ),
            ]
        )
        try:
            r = self._plug(rc, loaded)
        except FrontendError as exc:
            raise ControlError(str(exc)) from None
        self.readers.append(r)
        self._counters["readers_added"] = self._counters.get("readers_added", 0) + 1
        log.info("reader %s added as bus id %s", name, r.busid)
        self.poke()
        return {"reader": name, "bus_id": r.busid}

    def remove_reader(self, reader: str) -> Mapping[str, Any]:
        """Unplug a reader (``ctl remove-reader``): its importer sees it disconnected."""
        r = self._find(reader)
        self._unplug(r)
        self._counters["readers_removed"] = self._counters.get("readers_removed", 0) + 1
        log.info("reader %s (bus id %s) removed", r.config.name, r.busid)
        self.poke()
        return {"reader": r.config.name, "bus_id": r.busid}

    def reload(self) -> Mapping[str, Any]:
        """Re-read the configuration file and make the running server match it.

        Cards that changed are swapped (the host sees a removal and an insertion); readers
        that are new are added, readers no longer configured are removed (their importer
        sees an unplug), and readers whose identity, slot count or bus id changed are
        replaced (unplugged, then added again, under the same bus id when it is free).
        Runtime changes (``add-reader``, ``insert --card``) give way to the file. Every card
        is loaded and checked first: if one fails, nothing changes.
        """
        if self.config.path is not None:
            try:
                new = cfg.load_config(self.config.path)
            except ConfigError as exc:
                raise ControlError(f"configuration not reloaded: {exc}") from None
        else:
            new = self.config
        running = {r.config.name: r for r in self.readers}
        wanted = {rc.name: rc for rc in new.readers}
        loaded: dict[str, list[LoadedCard | None]] = {}
        for rc in new.readers:
            try:
                loaded[rc.name] = [self._load(sc.card, rc.origin) for sc in rc.slots]
            except UsbccidError as exc:
                raise ControlError(f"cards not reloaded: {exc}") from None
        try:
            _one_place(
                (rc.name, index, sc, card)
                for rc in new.readers
                for index, (sc, card) in enumerate(zip(rc.slots, loaded[rc.name], strict=True))
            )
        except ControlError as exc:
            raise ControlError(f"configuration not reloaded: {exc}") from None

        def replugged(r: _Reader, rc: cfg.ReaderConfig) -> bool:
            return (
                len(rc.slots) != len(r.slots)
                or rc.identity != r.config.identity
                or (rc.bus_id is not None and rc.bus_id != r.busid)
            )

        removed = [name for name in running if name not in wanted]
        replaced = [n for n, r in running.items() if n in wanted and replugged(r, wanted[n])]
        for name in removed + replaced:
            self._unplug(running[name])
        changed: list[str] = []
        for r in list(self.readers):
            rc = wanted[r.config.name]
            for index, sc in enumerate(rc.slots):
                card = loaded[rc.name][index]
                old = r.slots[index]
                same = (card is not None and old.card is not None and card.same_card(old.card)) or (
                    card is None and old.card is None
                )
                if same:
                    r.slots[index] = _Slot(sc, old.card, old.inserted)
                    continue
                was_in = old.inserted
                self._remove(r, index)
                r.slots[index] = _Slot(sc, card)
                if card is not None and (was_in or sc.inserted):
                    self._insert(r, index)
                changed.append(f"{r.config.name}:{index}")
            r.config = rc
        added = [name for name in wanted if name not in running]
        failed: list[str] = []
        for name in replaced + added:
            try:
                self.readers.append(self._plug(wanted[name], loaded[name]))
            except FrontendError as exc:
                failed.append(str(exc))
        self._counters["readers_added"] = self._counters.get("readers_added", 0) + len(added)
        self._counters["readers_removed"] = self._counters.get("readers_removed", 0) + len(removed)
        order = {name: i for i, name in enumerate(wanted)}
        self.readers.sort(key=lambda r: order.get(r.config.name, len(order)))
        self.config = replace(self.config, readers=new.readers)
        self.poke()
        message = f"reloaded: {len(changed)} card(s) changed"
        if changed:
            message += f" ({', '.join(changed)})"
        for what, names in (("added", added), ("removed", removed), ("replaced", replaced)):
            if names:
                message += f"; reader(s) {what}: {', '.join(names)}"
        if failed:
            message += "; not added: " + "; ".join(failed)
        log.info("%s", message)
        return {
            "changed": changed,
            "added": added,
            "removed": removed,
            "replaced": replaced,
            "failed": failed,
            "restart_needed": [],
            "message": message,
        }

    # -- for humans ----------------------------------------------------------------

    def banner(self) -> list[str]:
        lines = [f"usbccid {__version__}: USB/IP server listening on {self.usbip.listen()}"]
        for r in self.readers:
            lines.append(
                f"reader {r.config.name}: bus id {r.reader.address}, "
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
        lines += self.usbip.banner()
        if self._control is not None:
            lines.append(f"control socket: {self._control.path}")
        return lines


def card_key(card: LoadedCard) -> object | None:
    """What makes two loaded cards the same card: the PIN state they share (a stored card's
    directory, a files card's card ID). None: a source whose cards cannot clash."""
    if isinstance(card, EmulatedCac):
        path = getattr(card.pin_store, "path", None)
        if isinstance(path, Path):
            return ("pin-state", Path(os.path.abspath(path)))
        return ("card-id", card.profile.card_id)
    return None


def _place(reader: str, index: int, slot: cfg.SlotConfig | None) -> str:
    origin = getattr(slot.card, "origin", "") if slot is not None else ""
    where = f"reader {reader} slot {index}"
    return f"{origin} ({where})" if origin else where


def _one_place(
    slots: Iterable[tuple[str, int, cfg.SlotConfig | None, LoadedCard | None]],
) -> None:
    """Refuse a card that is in two slots: each slot's card object would keep its own
    security status over one PIN state, and the card is one card (one place, one counter).

    Raises:
        ControlError: one line naming both places.
    """
    seen: dict[object, str] = {}
    for reader, index, slot, card in slots:
        if card is None:
            continue
        key = card_key(card)
        if key is None:
            continue
        place = _place(reader, index, slot)
        if key in seen:
            what = card.description
            if isinstance(card, EmulatedCac):
                what += f", card ID {card.profile.card_id.hex()},"
            raise ControlError(
                f"{what} is in two slots: {seen[key]} and {place}; "
                "a card can be in one slot only (it has one PIN retry counter)"
            )
        seen[key] = place


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise AppError(f"cannot create state directory {path}: {exc.strerror or exc}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise AppError(f"state directory {path} is not writable")


# --------------------------------------------------------------------------- entry points


def check(config: cfg.Config) -> str:
    """Build everything without listening (``usbccid serve --check``); a summary."""
    app = App(replace(config, pcap=None))
    slots = sum(len(r.slots) for r in app.readers)
    n = len(app.readers)
    return f"{n} reader{'s' * (n != 1)}, {slots} slot{'s' * (slots != 1)}"


def serve(config: cfg.Config, announce: Callable[[str], None]) -> None:
    """Run the server until SIGINT or SIGTERM (``usbccid serve``)."""
    asyncio.run(_serve(config, announce))


async def _serve(config: cfg.Config, announce: Callable[[str], None]) -> None:
    app = App(config)
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
