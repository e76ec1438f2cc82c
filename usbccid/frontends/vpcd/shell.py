"""The asyncio shell of the vpcd front end: the socket, reconnection, threads. No parsing.

:class:`VpcdFrontend` holds one card slot of a vpcd reader. While a card is inserted it
keeps a TCP connection to vpcd (which listens: pcscd's ``libifdvpcd.so``, port 35963 for
the reader's first slot) and feeds it to a sans-IO
:class:`~usbccid.frontends.vpcd.protocol.VpcdConnection`. When the connection drops
(pcscd restarts, vpcd ejects the card) it connects again, backing off exponentially while
nothing listens. Removing the card closes the connection; inserting one connects.

Card work runs inline, or on a thread when ``card.blocking`` (as
:mod:`usbccid.server` runs CCID jobs), and is finished on the loop.

Two socket options matter. TCP_NODELAY, so that our answers leave at once. And
TCP_QUICKACK after every read: vpcd up to vsmartcard 0.9 (Debian 12's 3.3 package) writes
a frame's length and its payload with two ``send()`` calls (vpcd.c ``sendToVICC``, until
commit 76e2679 of 2023), so with Nagle on its side the payload waits for our ACK of the
length, which Linux delays by 40 ms: measured 50 ms per APDU without, 0.4 ms with.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from usbccid.card import Card
from usbccid.frontends.vpcd.keepalive import PcscdKeepAlive
from usbccid.frontends.vpcd.protocol import Counters, VpcdConnection, VpcdJob
from usbccid.frontends.vpcd.wire import VPCD_PORT

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)  # Linux only


@dataclass(frozen=True, slots=True)
class VpcdStatus:
    """A snapshot of one vpcd front end, for ``ctl status``."""

    host: str
    port: int
    inserted: bool  # a card is in the slot
    connected: bool  # a TCP connection to vpcd is up
    card_state: str | None  # the connection's State value, None when not connected
    atr: bytes | None
    connections: int  # TCP connections made so far
    last_error: str | None  # why the last connection attempt failed or closed
    counters: Counters = field(default_factory=Counters)  # of the current connection

    def describe(self) -> str:
        where = f"vpcd {self.host}:{self.port}"
        if not self.inserted:
            return f"{where}: no card"
        if not self.connected:
            why = f" ({self.last_error})" if self.last_error else ""
            return f"{where}: card inserted, not connected{why}"
        c = self.counters
        return (
            f"{where}: card inserted, connected, {self.card_state}; "
            f"{c.apdus} APDUs, {c.atr_requests} ATR requests"
        )


class _Link(asyncio.Protocol):
    """One TCP connection to vpcd: bytes to the sans-IO connection and back."""

    def __init__(self, frontend: VpcdFrontend, card: Card) -> None:
        self.frontend = frontend
        self.conn = VpcdConnection(card)
        self.loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self.loop.create_future()
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def data_received(self, data: bytes) -> None:
        self._quickack()
        self.guard(self.conn.receive_data, data)

    def eof_received(self) -> bool:
        self.guard(self.conn.receive_data, b"")
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(str(exc) if exc is not None else "connection lost")
        if not self.closed.done():
            self.closed.set_result(None)

    # driving the connection

    def guard(self, call: Callable[..., None], *args: object) -> None:
        """Call into the connection, then flush; an exception here is a bug: close."""
        try:
            call(*args)
            self.flush()
        except Exception as e:
            log.exception("vpcd %s: internal error, closing", self.frontend.address)
            self.conn.connection_lost(f"internal error: {e!r}")
            self.close()

    def flush(self) -> None:
        while (job := self.conn.next_job()) is not None:
            if job.blocking:
                task = self.loop.create_task(self.run_blocking(job))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                job.run()
                job.finish()
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)
        if self.conn.should_close:
            self.close()

    async def run_blocking(self, job: VpcdJob) -> None:
        await asyncio.to_thread(job.run)  # run() catches what the card raises
        if not self.closed.done():
            self.guard(job.finish)

    def remove(self) -> None:
        self.guard(self.conn.remove)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _quickack(self) -> None:
        if _QUICKACK is None or self.transport is None:
            return
        sock = self.transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)


class VpcdFrontend:
    """One vpcd slot: connects to ``host:port`` while a card is inserted.

    Args:
        host, port: where vpcd listens (slot N of a vpcd reader: 35963 + N).
        card: the card inserted at the start (None: an empty slot).
        name: for logs.
        backoff_initial, backoff_max: seconds between connection attempts, doubling
            from the first to the second while vpcd is not there.
        connect_timeout: seconds one connection attempt may take.
        keepalive: for a vpcd of the local pcscd: a PC/SC context to hold while a card
            is in the slot (:mod:`.keepalive`: starts a socket-activated pcscd and keeps
            it from exiting); None holds nothing.

    Use on one event loop: ``await start()``, then :meth:`insert` / :meth:`remove` /
    :meth:`status` from that loop, ``await close()`` at the end.
    """

    def __init__(
        self,
        host: str = DEFAULT_HOST,
        port: int = VPCD_PORT,
        card: Card | None = None,
        *,
        name: str = "vpcd",
        backoff_initial: float = 0.1,
        backoff_max: float = 1.0,
        connect_timeout: float = 5.0,
        keepalive: PcscdKeepAlive | None = None,
    ) -> None:
        if not 0 < backoff_initial <= backoff_max:
            raise ValueError("need 0 < backoff_initial <= backoff_max")
        self.host = host
        self.port = port
        self.name = name
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.connect_timeout = connect_timeout
        self.keepalive = keepalive
        self._card = card
        self._link: _Link | None = None
        self._connections = 0
        self._last_error: str | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected_waiters: list[asyncio.Future[None]] = []

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def card(self) -> Card | None:
        return self._card

    # ---------------------------------------------------------------- control

    def insert(self, card: Card) -> None:
        """Put ``card`` into the slot: connect to vpcd (pcscd sees it at its next poll).

        Raises:
            ValueError: the slot already holds a card.
        """
        if self._card is not None:
            raise ValueError(f"{self.name}: the slot already holds a card")
        self._card = card
        self._poke()

    def remove(self) -> Card | None:
        """Take the card out: close the connection. Returns it (None if empty)."""
        card, self._card = self._card, None
        if self._link is not None:
            self._link.remove()
        self._poke()
        return card

    def status(self) -> VpcdStatus:
        link = self._link
        connected = link is not None and not link.closed.done()
        return VpcdStatus(
            host=self.host,
            port=self.port,
            inserted=self._card is not None,
            connected=connected,
            card_state=link.conn.state.value if link is not None and connected else None,
            atr=link.conn.atr if link is not None and connected else None,
            connections=self._connections,
            last_error=self._last_error,
            counters=link.conn.counters if link is not None and connected else Counters(),
        )

    # ---------------------------------------------------------------- lifetime

    async def start(self) -> None:
        """Start connecting (in the background) whenever a card is inserted."""
        assert self._task is None, "already started"
        self._changed = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def close(self) -> None:
        """Disconnect and stop."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        link, self._link = self._link, None
        if link is not None and not link.closed.done():
            link.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(link.closed), 5)
        if self.keepalive is not None:
            await asyncio.to_thread(self.keepalive.release)

    async def wait_connected(self, timeout: float) -> None:
        """Until a connection to vpcd is up (for tests and ``--check``-like callers)."""
        if self.status().connected:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._connected_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._connected_waiters.remove(waiter)

    # ---------------------------------------------------------------- internals

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once when a card is inserted or removed."""
        assert self._changed is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def _supervise(self) -> None:
        assert self._changed is not None
        loop = asyncio.get_running_loop()
        delay = self.backoff_initial
        while True:
            self._changed.clear()
            card = self._card
            where = (self.host, self.port)
            if card is None:
                if self.keepalive is not None:
                    await asyncio.to_thread(self.keepalive.release)  # nothing to keep up
                await self._changed.wait()
                delay = self.backoff_initial
                continue
            if self.keepalive is not None and not await asyncio.to_thread(self.keepalive.ensure):
                log.debug("vpcd %s: %s", self.address, self.keepalive.last_error)
            try:
                _, link = await asyncio.wait_for(
                    loop.create_connection(functools.partial(_Link, self, card), *where),
                    self.connect_timeout,
                )
            except (OSError, TimeoutError) as e:
                reason = f"cannot connect: {e or 'timeout'}"
                if reason != self._last_error:
                    log.warning("vpcd %s (%s): %s; retrying", self.address, self.name, reason)
                self._last_error = reason
                await self._pause(delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            if self._card is not card:  # removed (or swapped) while connecting
                link.close()
                await asyncio.shield(link.closed)
                continue
            self._link = link
            self._connections += 1
            log.info("vpcd %s (%s): connected, card inserted", self.address, self.name)
            for waiter in self._connected_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            started = loop.time()
            await asyncio.shield(link.closed)  # cancelling us must not cancel it
            self._link = None
            self._last_error = link.conn.close_reason
            log.info("vpcd %s (%s): disconnected: %s", self.address, self.name, self._last_error)
            if loop.time() - started >= self.backoff_max:
                delay = self.backoff_initial  # it worked for a while: start afresh
            if self._card is card:  # still inserted: vpcd went away or dropped us
                await self._pause(delay)
                delay = min(delay * 2, self.backoff_max)
