"""The composition root: builds readers, cards and front ends from a Config, and runs them.

It only composes. The cards come from their sources (``usbccid.cards.registry``), the
readers from their front ends (``usbccid.frontends.registry``: USB/IP, vpcd, VSCard); this module
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
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from usbccid import __version__
from usbccid.card import Card
from usbccid.cards.cac import CardConfig
from usbccid.cards.piv import EmulatedPiv
from usbccid.cards.registry import CardSourceConfig, load_card
from usbccid.cards.source import EmulatedCac, LiveCard, LoadedCard
from usbccid.cards.store import StateError, card_directory
from usbccid.ccid.pinpad import PinPad
from usbccid.ccid.pinpad import PinPrompt as Prompt
from usbccid.errors import UsbccidError
from usbccid.frontends.base import Frontend, FrontendError, FrontendReader
from usbccid.frontends.registry import frontend_class
from usbccid.frontends.usbip.frontend import UsbipFrontend
from usbccid.tool import config as cfg
from usbccid.tool.control import (
    ControlError,
    PinPrompt,
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


#: how long one wait for a live card's presence lasts (a stop waits at most this long)
_WATCH_TIMEOUT = 0.5


class AppError(UsbccidError):
    """The server cannot start or run as configured. One line, for stderr."""


@dataclass
class _Slot:
    config: cfg.SlotConfig
    card: LoadedCard | None = None
    inserted: bool = False  # a card object is in the reader's slot
    wanted: bool = False  # the user's word: configured inserted, ctl insert / remove
    # the card source's word: a live card (a real card, a token) may be out by itself
    present: bool = True


@dataclass
class _Reader:
    config: cfg.ReaderConfig
    reader: FrontendReader
    slots: list[_Slot]
    counters: dict[str, int] = field(default_factory=dict)

    @property
    def busid(self) -> str:
        return self.reader.address

    @property
    def pinpad(self) -> PinPad | None:
        pad: PinPad | None = getattr(self.reader, "pinpad", None)
        return pad


class KeypadPolicy:
    """Who types on a reader's PIN pad: the configured ``keypad`` policy, or nobody (the
    prompt waits for ``usbccid ctl pinpad``). Logs every prompt, never a digit."""

    def __init__(self, reader: _Reader) -> None:
        self._reader = reader

    def digits(self, prompt: Prompt) -> str | None:
        r = self._reader
        keypad = r.config.keypad
        what = (
            f"reader {r.config.name} slot {prompt.slot}: PIN pad asks for the "
            f"{prompt.stage.value} ({prompt.operation}, entry {prompt.stage_number} of "
            f"{prompt.stage_count}, {prompt.min_digits}-{prompt.max_digits} digits)"
        )
        if keypad is None:
            hint = f"usbccid ctl pinpad {r.config.name}:{prompt.slot} --digits ..."
            log.info("%s: type it with '%s'", what, hint)
            return None
        entry = keypad.enter
        if prompt.stage.name != "CURRENT" and keypad.new is not None:
            entry = keypad.new
        if entry != cfg.CARD_PIN:
            log.info("%s: the keypad policy types the configured digits", what)
            return entry
        slot = r.slots[prompt.slot] if prompt.slot < len(r.slots) else None
        pin = slot.card.current_pin if slot is not None and slot.card is not None else None
        if pin is None:
            log.warning("%s: the keypad policy has no card PIN to type; waiting", what)
            return None
        log.info("%s: the keypad policy types the card's PIN", what)
        return pin


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
        self._watchers: dict[tuple[str, int], asyncio.Task[None]] = {}
        self._counters: dict[str, int] = {}
        _ensure_dir(self.state_dir)
        self.usbip = UsbipFrontend(config, self._make_device)
        #: the front ends in use, by name (built when a reader needs one)
        self.frontends: dict[str, Frontend] = {}
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
        loaded = [[self._load(sc.card) for sc in rc.slots] for rc in self.config.readers]
        try:
            _one_place(
                (rc.name, index, sc, card)
                for rc, cards in zip(self.config.readers, loaded, strict=True)
                for index, (sc, card) in enumerate(zip(rc.slots, cards, strict=True))
            )
        except ControlError as exc:
            _close_live(card for cards in loaded for card in cards)
            raise AppError(str(exc)) from None
        readers: list[_Reader] = []
        for rc, cards in zip(self.config.readers, loaded, strict=True):
            try:
                readers.append(self._plug(rc, cards))
            except FrontendError as exc:
                raise AppError(str(exc)) from None
        return readers

    def _frontend(self, name: str) -> Frontend:
        frontend = self.frontends.get(name)
        if frontend is None:
            # USB/IP's devices record to --pcap: its front end is built with our factory
            frontend = self.usbip if name == "usbip" else frontend_class(name)(self.config)
            self.frontends[name] = frontend
        return frontend

    def _plug(self, rc: cfg.ReaderConfig, cards: Sequence[LoadedCard | None]) -> _Reader:
        """Export a new reader with ``cards`` in its slots (inserted as configured).

        Raises:
            FrontendError: the front end cannot have it (bus id, identity).
        """
        slots = [_Slot(sc, card) for sc, card in zip(rc.slots, cards, strict=True)]
        r = _Reader(rc, self._frontend(rc.frontend).add_reader(rc), slots)
        if r.pinpad is not None:
            r.pinpad.policy = KeypadPolicy(r)
        for index, slot in enumerate(slots):
            self._fill(r, index, slot.config.inserted)
        if self._control is not None:
            self._start_watching()  # running: its live cards are followed from now on
        return r

    def _unplug(self, r: _Reader) -> None:
        """Take a reader away: its cards out, its importer disconnected."""
        for index in range(len(r.slots)):
            self._remove(r, index)
            self._let_go(r, index)
        self._frontend(r.config.frontend).remove_reader(r.reader)
        self.readers.remove(r)

    def _let_go(self, r: _Reader, index: int) -> None:
        """A slot's card is done with (replaced, or its reader removed): close a live
        card and stop following it."""
        card = r.slots[index].card
        if isinstance(card, LiveCard):
            card.close()  # wakes its watcher's wait
        task = self._watchers.pop((r.config.name, index), None)
        if task is not None:
            task.cancel()

    def _make_device(
        self, identity: DeviceIdentity, function: UsbFunction, busid: str
    ) -> VirtualDevice:
        if self._pcap is None:
            return VirtualDevice(identity, function)  # nothing to record: no hook per URB
        device = CapturedDevice(identity, function)
        types = {ep.address: int(ep.transfer_type) for ep in function.interface.endpoints}
        devnum = parse_busid(busid)
        assert devnum is not None
        device.capture = UsbipCapture(self._pcap, types, devnum)
        return device

    def _load(self, card: CardSourceConfig | None) -> LoadedCard | None:
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

    def _fill(self, r: _Reader, index: int, wanted: bool) -> None:
        """A freshly loaded slot: a live card goes in if it is there now."""
        slot = r.slots[index]
        if isinstance(slot.card, LiveCard):
            slot.present = slot.card.wait_presence(None, 0)
            if not slot.present:
                log.warning(
                    "%s slot %d: %s; waiting", r.config.name, index, slot.card.absence_reason
                )
        slot.wanted = wanted and slot.card is not None
        self._sync(r, index)

    def _insert(self, r: _Reader, index: int) -> None:
        slot = r.slots[index]
        if slot.card is None:
            raise ControlError(f"reader {r.config.name} slot {index} is configured empty")
        slot.wanted = True
        try:
            self._sync(r, index)
        except UsbccidError as exc:  # a live card that left just now
            raise ControlError(str(exc)) from None

    def _remove(self, r: _Reader, index: int) -> None:
        r.slots[index].wanted = False
        self._sync(r, index)

    def _sync(self, r: _Reader, index: int) -> None:
        """Put the card in or take it out so that it is in exactly when it is wanted and
        there (the host sees each change as a real insertion or removal)."""
        slot = r.slots[index]
        should = slot.card is not None and slot.wanted and slot.present
        if should == slot.inserted:
            return
        if should:
            assert slot.card is not None
            r.reader.insert(index, self._card(r, index, slot.card))
            r.counters["insertions"] = r.counters.get("insertions", 0) + 1
        else:
            r.reader.remove(index)
            r.counters["removals"] = r.counters.get("removals", 0) + 1
        slot.inserted = should

    async def _watch(self, r: _Reader, index: int, card: LiveCard) -> None:
        """Follow a live card's comings and goings (its source blocks, so on a thread)."""
        known = r.slots[index].present
        reason = "" if known else card.absence_reason
        while r.slots[index].card is card:
            present = await asyncio.to_thread(card.wait_presence, known, _WATCH_TIMEOUT)
            if r.slots[index].card is not card:
                return  # reloaded meanwhile
            if not present and card.absence_reason != reason:
                reason = card.absence_reason
                log.warning("%s slot %d: %s; waiting", r.config.name, index, reason)
            if present == known:
                continue
            known = present
            if present:
                reason = ""
                log.info("%s slot %d: %s is there", r.config.name, index, card.description)
            r.slots[index].present = present
            try:
                self._sync(r, index)
            except UsbccidError as exc:  # gone again before it could be made a card
                log.warning("%s slot %d: %s", r.config.name, index, exc)
                r.slots[index].present = known = False
            self.poke()

    def _watcher_done(self, task: asyncio.Task[None]) -> None:
        for key, t in list(self._watchers.items()):
            if t is task:
                del self._watchers[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("a card watcher failed", exc_info=task.exception())

    def _start_watching(self) -> None:
        for r in self.readers:
            for index, slot in enumerate(r.slots):
                key = (r.config.name, index)
                if isinstance(slot.card, LiveCard) and key not in self._watchers:
                    task = asyncio.get_running_loop().create_task(
                        self._watch(r, index, slot.card), name=f"watch {key}"
                    )
                    self._watchers[key] = task
                    task.add_done_callback(self._watcher_done)

    # -- running -------------------------------------------------------------------

    async def start(self) -> tuple[str, int] | None:
        """Listen for control requests, start the front ends; returns the USB/IP
        server's bound (host, port), None when no reader is on USB/IP.

        The control socket comes first: it is how a second server on the same state
        directory finds out, before it touches any port.
        """
        control = ControlServer(
            socket_path(self.state_dir, os.environ.get("RUNTIME_DIRECTORY")), self
        )
        await control.start()
        started: list[Frontend] = []
        try:
            for frontend in self.frontends.values():
                await frontend.start()
                started.append(frontend)
        except FrontendError as exc:
            for frontend in started:
                await frontend.close()
            await control.close()
            raise AppError(str(exc)) from None
        self._control = control
        self._start_watching()
        return self.address

    @property
    def address(self) -> tuple[str, int] | None:
        """The USB/IP server's (host, port), once listening; None without one."""
        return self.usbip.address if "usbip" in self.frontends else None

    @property
    def control_path(self) -> Path | None:
        return self._control.path if self._control is not None else None

    async def close(self) -> None:
        for r in self.readers:
            for slot in r.slots:
                if isinstance(slot.card, LiveCard):
                    slot.card.close()  # wakes its watcher's wait
        tasks = list(self._watchers.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._control is not None:
            await self._control.close()
        for frontend in self.frontends.values():
            await frontend.close()
        if self._pcap_file is not None:
            self._pcap_file.close()
            self._pcap_file = None

    def poke(self) -> None:
        for frontend in self.frontends.values():
            frontend.poke()

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
            pad = r.pinpad
            for index, slot in enumerate(r.slots):
                state = r.reader.slot_state(index) if slot.inserted else "empty"
                card = slot.card.description if slot.card is not None else None
                prompt = _prompt(pad.prompt(index), self._clock()) if pad is not None else None
                detail = r.reader.slot_detail(index)
                slots.append(
                    SlotStatus(index=index, state=state, card=card, detail=detail, pinpad=prompt)
                )
            identity = r.reader.identity
            readers.append(
                ReaderStatus(
                    name=r.config.name,
                    bus_id=r.reader.address,
                    vendor_id=identity.vendor_id if identity is not None else None,
                    product_id=identity.product_id if identity is not None else None,
                    product=identity.product if identity is not None else None,
                    client=r.reader.client,
                    slots=tuple(slots),
                    counters=dict(r.counters),
                    frontend=r.config.frontend,
                    pinpad=pad is not None,
                )
            )
        counters: dict[str, int] = {}
        for frontend in self.frontends.values():
            counters.update(frontend.counters())
        return ServerStatus(
            version=__version__,
            listen=self.usbip.listen() if "usbip" in self.frontends else "",
            pid=os.getpid(),
            uptime=time.monotonic() - self.started,
            readers=tuple(readers),
            counters={**counters, **self._counters},
        )

    def insert(self, reader: str, slot: int, card: str | None = None) -> None:
        """Insert the slot's card, or (``card``) the stored card of that name into the
        empty slot; the slot keeps that card until a reload."""
        r = self._find(reader)
        self._check_slot(r, slot)
        if card is not None:
            if r.slots[slot].wanted:
                raise ControlError(
                    f"reader {r.config.name} slot {slot} holds a card: remove it first"
                )
            self._check_stored(card)
            config = CardConfig(stored=card, origin=f"ctl insert {r.config.name}:{slot}")
            try:
                loaded = self._load(config)
            except UsbccidError as exc:
                raise ControlError(str(exc)) from None
            current = r.slots[slot]
            try:
                _one_place(
                    [
                        *self._slots_except(r, slot),
                        (r.config.name, slot, replace(current.config, card=config), loaded),
                    ]
                )
            except ControlError:
                _close_live([loaded])
                raise
            self._let_go(r, slot)
            r.slots[slot] = _Slot(replace(current.config, card=config), loaded)
            self._fill(r, slot, True)
            if self._control is not None:
                self._start_watching()
        else:
            self._insert(r, slot)
        self.poke()

    def remove(self, reader: str, slot: int) -> None:
        r = self._find(reader)
        self._check_slot(r, slot)
        self._remove(r, slot)
        self.poke()

    def pinpad(
        self, reader: str, slot: int, entries: Sequence[str], cancel: bool
    ) -> Mapping[str, Any]:
        r = self._find(reader)
        self._check_slot(r, slot)
        pad = r.pinpad
        if pad is None:
            raise ControlError(f"reader {r.config.name} has no PIN pad (pinpad = true)")
        now = self._clock()
        try:
            report = pad.enter(slot, entries, now, cancel=cancel)
        except ValueError as exc:
            raise ControlError(str(exc)) from None
        self.poke()
        if not report.waiting:
            return {"waiting": False}
        assert report.state is not None
        # Not how many digits: the log would tell the PIN's length.
        log.info(
            "reader %s slot %d: keys typed on the PIN pad%s: %s",
            r.config.name,
            slot,
            ", then Cancel" if cancel else "",
            report.state.name.lower(),
        )
        result: dict[str, Any] = {
            "waiting": True,
            "accepted": report.accepted,
            "ignored": report.ignored,
            "state": report.state.name.lower(),
        }
        prompt = _prompt(report.prompt, now)
        if prompt is not None:
            result["next"] = asdict(prompt)
        return result

    def _clock(self) -> float:
        """The time the USB/IP shell gives the readers (its event loop's clock)."""
        try:
            return asyncio.get_running_loop().time()
        except RuntimeError:  # not on the loop (App.check, tests): the same clock
            return time.monotonic()

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
            loaded = [self._load(sc.card) for sc in slots]
        except UsbccidError as exc:
            raise ControlError(str(exc)) from None
        try:
            _one_place(
                [
                    *self._slots_except(),
                    *(
                        (name, i, sc, card)
                        for i, (sc, card) in enumerate(zip(slots, loaded, strict=True))
                    ),
                ]
            )
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
        if not frontend_class(r.config.frontend).hot_plug:
            raise ControlError(
                f"reader {r.config.name} is on {r.config.frontend}, whose readers are fixed "
                "while running (only USB/IP readers are added and removed)"
            )
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
                loaded[rc.name] = [self._load(sc.card) for sc in rc.slots]
            except UsbccidError as exc:
                _close_live(card for cards in loaded.values() for card in cards)
                raise ControlError(f"cards not reloaded: {exc}") from None

        def replugged(r: _Reader, rc: cfg.ReaderConfig) -> bool:
            return (
                len(rc.slots) != len(r.slots)
                or rc.identity != r.config.identity
                or (rc.bus_id is not None and rc.bus_id != r.busid)
                or (rc.frontend, rc.vpcd, rc.vscard)
                != (r.config.frontend, r.config.vpcd, r.config.vscard)
                or rc.pinpad != r.config.pinpad
            )

        removed = [name for name in running if name not in wanted]
        replaced = [n for n, r in running.items() if n in wanted and replugged(r, wanted[n])]
        added = [name for name in wanted if name not in running]

        # Readers of a front end without hot plug (vpcd, VSCard: a connection or an
        # endpoint of their own) are plugged in and out only by a restart.
        def hot_plug(rc: cfg.ReaderConfig) -> bool:
            return frontend_class(rc.frontend).hot_plug

        fixed = {n for n in removed + replaced if not hot_plug(running[n].config)}
        fixed |= {n for n in added if not hot_plug(wanted[n])}
        restart = [
            f"reader {n}: on {(running[n].config if n in running else wanted[n]).frontend}, "
            "fixed while running"
            for n in sorted(fixed)
        ]
        removed = [n for n in removed if n not in fixed]
        replaced = [n for n in replaced if n not in fixed]
        added = [n for n in added if n not in fixed]
        # The readers as they will be: the new configuration's, except the fixed ones,
        # which keep what they hold now.
        after = [
            (rc.name, index, sc, card)
            for rc in new.readers
            if rc.name not in fixed
            for index, (sc, card) in enumerate(zip(rc.slots, loaded[rc.name], strict=True))
        ]
        after += [
            (name, index, slot.config, slot.card)
            for name in sorted(fixed & set(running))
            for index, slot in enumerate(running[name].slots)
        ]
        try:
            _one_place(after)
        except ControlError as exc:
            _close_live(card for cards in loaded.values() for card in cards)
            raise ControlError(f"configuration not reloaded: {exc}") from None
        for name in fixed & set(wanted):
            _close_live(loaded[name])
        for name in removed + replaced:
            self._unplug(running[name])
        changed: list[str] = []
        for r in list(self.readers):
            if r.config.name in fixed:
                continue
            rc = wanted[r.config.name]
            for index, sc in enumerate(rc.slots):
                card = loaded[rc.name][index]
                old = r.slots[index]
                same = (card is not None and old.card is not None and card.same_card(old.card)) or (
                    card is None and old.card is None
                )
                if same:
                    if card is not old.card:
                        _close_live([card])  # the running one stays
                    r.slots[index] = replace(old, config=sc)
                    continue
                was_in = old.wanted
                self._remove(r, index)
                self._let_go(r, index)
                r.slots[index] = _Slot(sc, card)
                self._fill(r, index, card is not None and (was_in or sc.inserted))
                changed.append(f"{r.config.name}:{index}")
            r.config = rc
        if self._control is not None:
            self._start_watching()  # the live cards that came with the reload
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
        kept = [r.config for r in self.readers if r.config.name in fixed]
        self.config = replace(
            self.config,
            readers=tuple(rc for rc in new.readers if rc.name not in fixed) + tuple(kept),
        )
        self.poke()
        message = f"reloaded: {len(changed)} card(s) changed"
        if changed:
            message += f" ({', '.join(changed)})"
        for what, names in (("added", added), ("removed", removed), ("replaced", replaced)):
            if names:
                message += f"; reader(s) {what}: {', '.join(names)}"
        if failed:
            message += "; not added: " + "; ".join(failed)
        if restart:
            message += "; restart needed for: " + "; ".join(restart)
        log.info("%s", message)
        return {
            "changed": changed,
            "added": added,
            "removed": removed,
            "replaced": replaced,
            "failed": failed,
            "restart_needed": restart,
            "message": message,
        }

    # -- for humans ----------------------------------------------------------------

    def banner(self) -> list[str]:
        if "usbip" in self.frontends:
            lines = [f"usbccid {__version__}: USB/IP server listening on {self.usbip.listen()}"]
        else:
            lines = [f"usbccid {__version__}: no USB/IP server (no reader is on USB/IP)"]
        for r in self.readers:
            identity = r.reader.identity
            if identity is None:
                lines.append(f"reader {r.config.name}: {r.config.frontend} {r.reader.address}")
            else:
                lines.append(
                    f"reader {r.config.name}: bus id {r.reader.address}, "
                    f"{identity.vendor_id:04x}:{identity.product_id:04x} {identity.product}"
                )
            for index, slot in enumerate(r.slots):
                if slot.card is None:
                    lines.append(f"  slot {index}: empty")
                    continue
                if slot.inserted:
                    where = "inserted"
                elif slot.wanted and not slot.present:
                    where = "waiting for the card"
                else:
                    where = "removed"
                pin = slot.card.current_pin
                pin_text = f", PIN {pin}" if pin is not None else ", PIN: the card's own"
                lines.append(f"  slot {index}: {slot.card.description}, {where}{pin_text}")
                if slot.card.ca_file is not None:
                    lines.append(f"    test CA certificate: {slot.card.ca_file}")
        for frontend in self.frontends.values():
            lines += frontend.banner()
        if self._control is not None:
            lines.append(f"control socket: {self._control.path}")
        return lines


def _prompt(prompt: Prompt | None, now: float) -> PinPrompt | None:
    """The control plane's view of a waiting PIN pad (no digits in it, ever)."""
    if prompt is None:
        return None
    return PinPrompt(
        operation=prompt.operation,
        stage=prompt.stage.value,
        entry=prompt.stage_number,
        entries=prompt.stage_count,
        typed=prompt.typed,
        min_digits=prompt.min_digits,
        max_digits=prompt.max_digits,
        seconds_left=prompt.seconds_left(now),
        display=prompt.display,
    )


def _close_live(cards: Iterable[LoadedCard | None]) -> None:
    """Let go of live cards that were loaded but will not be used."""
    for card in cards:
        if isinstance(card, LiveCard):
            card.close()


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
        key = card.place
        if key is None:
            continue
        place = _place(reader, index, slot)
        if key in seen:
            what = card.description
            if isinstance(card, EmulatedCac | EmulatedPiv):
                card_id = (
                    card.profile.card_id if isinstance(card, EmulatedCac) else card.cac.card_id
                )
                what += f", card ID {card_id.hex()},"
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
        address = await app.start()
    except BaseException:
        await app.close()
        raise
    host = address[0] if address is not None else None
    if (
        host is not None
        and host not in ("127.0.0.1", "::1", "localhost")
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
