"""A real card passed through from the server host's PC/SC (``type = "pcsc"``).

The slot holds whatever card sits in a PC/SC reader of the server's host (pcscd, through
pyscard)::

    [[reader.slot]]
    type = "pcsc"
    reader = "Gemalto"          # a substring of the PC/SC reader's name
    exclusive = true            # default: no other program on this host can interleave

The host sees the real card's ATR; every APDU is relayed unchanged (T=0 61xx/6Cxx
included: the host's stack resolves them, as with the card in a local reader). CCID
power off and on are a card reset: power off unpowers the card (``SCardReconnect`` with
``SCARD_UNPOWER_CARD``, keeping the handle so an exclusive hold is not lost), power on
resets it and reads its ATR. The card's insertion and removal, the reader's unplugging
and return, and pcscd's restarts are watched with ``SCardGetStatusChange``
(:meth:`PcscLink.wait_presence`, run by the composition root on a worker thread); the slot
is empty while there is no card, and starts empty when the reader or pcscd is not there.

Nothing here is sans-IO: this is I/O by nature. Every PC/SC call goes through one
:class:`PcscLink` per slot, under one lock, so the watcher thread and the card's job
thread never use a handle at the same time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from usbccid.card import Card
from usbccid.cards.source import LoadedCard
from usbccid.tool.schema import Checker, KeyPath

log = logging.getLogger(__name__)

TYPE: Final = "pcsc"
KEYS: Final = ("reader", "exclusive")

#: Readers that are our own virtual ones: relaying from them would make a card talk to
#: itself (vpcd's "Virtual PCD", usbccid's own USB reader seen by a local pcscd).
OWN_READER_MARKERS: Final = ("usbccid",)


@dataclass(frozen=True)
class PcscConfig:
    """A slot relaying the card of the PC/SC reader whose name contains ``reader``."""

    reader: str
    exclusive: bool = True
    type: str = TYPE
    origin: str = ""


def parse(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> PcscConfig:
    reader = ck.get(t, path, "reader", str)
    if reader is None:
        raise ck.fail(path, "missing key 'reader' (a substring of the PC/SC reader's name)")
    if not reader.strip():
        raise ck.fail((*path, "reader"), "must not be empty")
    exclusive = ck.get(t, path, "exclusive", bool, True)
    return PcscConfig(reader=reader, exclusive=exclusive, origin=ck.origin(path))


def load(config: PcscConfig, state_dir: Path, now: datetime) -> PcscPassthrough:
    """The passed-through card. Never fails for a missing reader or pcscd: the slot waits.

    Raises:
        usbccid.cards.source.CardLoadError: pyscard is not installed.
    """
    from usbccid.cards.source import CardLoadError

    try:
        import smartcard.scard as scard
    except ImportError:
        raise CardLoadError(
            f"{config.origin}: a pcsc slot needs pyscard (pip install 'usbccid[pcsc]')"
        ) from None
    return PcscPassthrough(config, PcscLink(config.reader, config.exclusive, scard))


class PcscError(Exception):
    """A PC/SC call failed; ``code`` is its SCARD_* result."""

    def __init__(self, call: str, code: int, message: str) -> None:
        super().__init__(f"{call}: {message} (0x{code & 0xFFFFFFFF:08X})")
        self.code = code


class PcscLink:
    """One slot's connection to pcscd: a context, the matching reader, a card handle.

    ``scard`` is pyscard's ``smartcard.scard`` module (or a stand-in with its names).
    Thread-safe: every call holds the lock.
    """

    def __init__(self, pattern: str, exclusive: bool, scard: Any) -> None:
        self.pattern = pattern
        self.exclusive = exclusive
        self.s = scard
        self._lock = threading.RLock()
        self._context: int | None = None
        self._watch_context: int | None = None
        self._reader: str | None = None
        self._reader_state = 0
        self._handle: int | None = None
        self._protocol = 0
        self.reason = "not watched yet"  # why the slot is empty, for humans

    # -- the card (on the reader's job thread) -------------------------------------

    def power_on(self) -> bytes:
        """Connect (or reset the card held) and return its ATR."""
        with self._lock:
            if self._handle is None:
                self._connect()
            else:
                self._reconnect(self.s.SCARD_RESET_CARD)
            return self._atr()

    def power_off(self) -> None:
        """Unpower the card; the handle (and an exclusive hold) stays."""
        with self._lock:
            if self._handle is not None:
                try:
                    self._reconnect(self.s.SCARD_UNPOWER_CARD)
                except PcscError as exc:
                    log.info("pcsc %s: power off: %s", self._reader, exc)
                    self._drop_handle()

    def transmit(self, apdu: bytes) -> bytes:
        with self._lock:
            if self._handle is None:
                raise PcscError("SCardTransmit", self.s.SCARD_E_NO_SMARTCARD, "no card")
            pci = (
                self.s.SCARD_PCI_T1
                if self._protocol == self.s.SCARD_PROTOCOL_T1
                else (self.s.SCARD_PCI_T0)
            )
            hr, response = self.s.SCardTransmit(self._handle, pci, list(apdu))
            if hr != self.s.SCARD_S_SUCCESS:
                if hr in (self.s.SCARD_W_REMOVED_CARD, self.s.SCARD_E_INVALID_HANDLE):
                    self._drop_handle()
                raise self._error("SCardTransmit", hr)
            return bytes(response)

    # -- presence (on the watcher's thread) ----------------------------------------

    def wait_presence(self, known: bool | None, timeout: float) -> bool:
        """Whether a card is in the reader, once it differs from ``known`` or after
        ``timeout`` seconds (at once when ``known`` is None)."""
        wait_ms = 0 if known is None else max(0, int(timeout * 1000))
        try:
            present = self._poll(wait_ms)
        except PcscError as exc:
            self._lost(str(exc))
            time.sleep(wait_ms / 1000)  # pcscd is away: try again after the timeout
            present = False
        if not present:
            with self._lock:
                self._drop_handle()
        return present

    def _poll(self, wait_ms: int) -> bool:
        s = self.s
        context = self._watch()
        if self._reader is None:
            self._reader = self._find_reader(context)
            self._reader_state = s.SCARD_STATE_UNAWARE
            if self._reader is None:
                self.reason = f"no PC/SC reader matching {self.pattern!r}"
                # woken when a reader comes (pcsc-lite's "\\?PnP?\Notification" pseudo reader)
                s.SCardGetStatusChange(context, wait_ms, [(r"\\?PnP?\Notification", 0)])
                return False
            log.info("pcsc: relaying reader %r", self._reader)
        hr, states = s.SCardGetStatusChange(context, wait_ms, [(self._reader, self._reader_state)])
        if hr == s.SCARD_E_TIMEOUT:
            return bool(self._reader_state & s.SCARD_STATE_PRESENT) and not (
                self._reader_state & s.SCARD_STATE_MUTE
            )
        if hr in (s.SCARD_E_UNKNOWN_READER, s.SCARD_E_READER_UNAVAILABLE):
            self.reason = f"PC/SC reader {self._reader!r} is gone"
            self._reader = None
            return False
        if hr != s.SCARD_S_SUCCESS:
            raise self._error("SCardGetStatusChange", hr)
        _, event, _ = states[0]
        self._reader_state = event & ~s.SCARD_STATE_CHANGED
        if event & s.SCARD_STATE_UNAVAILABLE:
            self.reason = f"PC/SC reader {self._reader!r} is gone"
            self._reader = None
            return False
        present = bool(event & s.SCARD_STATE_PRESENT) and not event & s.SCARD_STATE_MUTE
        self.reason = "" if present else f"no card in {self._reader!r}"
        return present

    def _lost(self, why: str) -> None:
        """pcscd went away (or never was there): start over next time."""
        self.reason = f"pcscd: {why}"
        for attr in ("_watch_context", "_context"):
            context = getattr(self, attr)
            if context is not None:
                self.s.SCardReleaseContext(context)
                setattr(self, attr, None)
        self._reader = None

    def close(self) -> None:
        with self._lock:
            if self._handle is not None:
                self.s.SCardDisconnect(self._handle, self.s.SCARD_UNPOWER_CARD)
                self._handle = None
            self._lost("closed")

    # -- helpers -------------------------------------------------------------------

    def _watch(self) -> int:
        if self._watch_context is None:
            self._watch_context = self._establish()
        return self._watch_context

    def _establish(self) -> int:
        hr, context = self.s.SCardEstablishContext(self.s.SCARD_SCOPE_USER)
        if hr != self.s.SCARD_S_SUCCESS:
            raise self._error("SCardEstablishContext (is pcscd running?)", hr)
        return int(context)

    def _find_reader(self, context: int) -> str | None:
        hr, readers = self.s.SCardListReaders(context, [])
        if hr == self.s.SCARD_E_NO_READERS_AVAILABLE:
            return None
        if hr != self.s.SCARD_S_SUCCESS:
            raise self._error("SCardListReaders", hr)
        for name in readers:
            if self.pattern.lower() in name.lower() and not any(
                marker in name.lower() for marker in OWN_READER_MARKERS
            ):
                return str(name)
        return None

    def _connect(self) -> None:
        s = self.s
        if self._context is None:
            self._context = self._establish()
        if self._reader is None:
            self._reader = self._find_reader(self._context)
            if self._reader is None:
                raise PcscError("SCardConnect", s.SCARD_E_UNKNOWN_READER, self.reason)
        share = s.SCARD_SHARE_EXCLUSIVE if self.exclusive else s.SCARD_SHARE_SHARED
        hr, handle, protocol = s.SCardConnect(
            self._context, self._reader, share, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1
        )
        if hr != s.SCARD_S_SUCCESS:
            if hr == s.SCARD_E_NO_SERVICE:
                self._lost("no service")
            raise self._error(f"SCardConnect({self._reader!r})", hr)
        self._handle, self._protocol = handle, protocol

    def _reconnect(self, disposition: int) -> None:
        s = self.s
        assert self._handle is not None
        share = s.SCARD_SHARE_EXCLUSIVE if self.exclusive else s.SCARD_SHARE_SHARED
        hr, protocol = s.SCardReconnect(
            self._handle, share, s.SCARD_PROTOCOL_T0 | s.SCARD_PROTOCOL_T1, disposition
        )
        if hr != s.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error("SCardReconnect", hr)
        self._protocol = protocol

    def _atr(self) -> bytes:
        assert self._handle is not None
        hr, _reader, _state, _protocol, atr = self.s.SCardStatus(self._handle)
        if hr != self.s.SCARD_S_SUCCESS:
            self._drop_handle()
            raise self._error("SCardStatus", hr)
        return bytes(atr)

    def _drop_handle(self) -> None:
        if self._handle is not None:
            self.s.SCardDisconnect(self._handle, self.s.SCARD_LEAVE_CARD)
            self._handle = None

    def _error(self, call: str, hr: int) -> PcscError:
        return PcscError(call, hr, str(self.s.SCardGetErrorMessage(hr)))


class PcscCard:
    """The card in the slot, as the reader sees it (one per insertion; the link is shared)."""

    blocking = True  # every call is a round trip to pcscd and the card

    def __init__(self, link: PcscLink) -> None:
        self.link = link

    def power_on(self) -> bytes:
        return self.link.power_on()

    def power_off(self) -> None:
        self.link.power_off()

    def transmit(self, command: bytes) -> bytes:
        return self.link.transmit(command)


@dataclass(frozen=True)
class PcscPassthrough:
    """A LoadedCard whose card comes and goes with the real one."""

    config: PcscConfig
    link: PcscLink

    @property
    def description(self) -> str:
        return f"PC/SC passthrough of reader {self.config.reader!r}"

    @property
    def ca_file(self) -> Path | None:
        return None

    @property
    def current_pin(self) -> str | None:
        return None  # the real card's own

    def new_card(self) -> Card:
        return PcscCard(self.link)

    def same_card(self, other: LoadedCard) -> bool:
        return isinstance(other, PcscPassthrough) and other.config == self.config

    @property
    def place(self) -> object:
        # The configured name: two different substrings that match one reader are not
        # caught here, but the second connection then fails (SCARD_E_SHARING_VIOLATION).
        return ("pcsc", self.config.reader)

    def wait_presence(self, known: bool | None, timeout: float) -> bool:
        return self.link.wait_presence(known, timeout)

    @property
    def absence_reason(self) -> str:
        return self.link.reason

    def close(self) -> None:
        self.link.close()
