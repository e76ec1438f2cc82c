"""The asyncio shell around :class:`~usbccid.frontends.vscard.client.VscardClient`.

One :class:`VscardServer` is one virtual reader seen by QEMU through its
``ccid-card-passthru`` device. It either listens (TCP or a UNIX socket) for QEMU's chardev
to connect (``-chardev socket,id=ccid,host=127.0.0.1,port=N,reconnect=1,nodelay=on``), or
connects to a QEMU that listens (``-chardev socket,...,server=on,wait=off``) and
reconnects whenever that connection ends.

It parses nothing. Per connection it feeds what it reads to a ``VscardClient``, writes
what that returns, and runs the card calls it hands out (inline, or on a thread when
``job.blocking``; ``finish()`` always on the loop). The card belongs to one connection at
a time: the first one, and, when it ends, the next one still open; the others see a
reader without a card. A peer that breaks the protocol (:class:`VscardError`) loses its
own connection and nothing else; any other exception is a bug, logged with its
traceback, and also closes only that connection.

Bounded memory: reads of at most :data:`READ_SIZE` bytes, no read while our writes to
that peer are not drained or the card still has work from the last read
(back-pressure), and a peer whose unread replies pass ``max_write_buffer`` bytes is cut
off.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from usbccid.card import Card
from usbccid.frontends.loop_thread import LoopThread
from usbccid.frontends.vscard.client import (
    MAX_PENDING,
    Answered,
    CardInserted,
    CardRefused,
    CardRemoved,
    Closed,
    Event,
    HostInit,
    ReaderAdded,
    VscardClient,
    VscardStatus,
)
from usbccid.frontends.vscard.errors import VscardError
from usbccid.jobs import Job

log = logging.getLogger(__name__)

READ_SIZE = 1 << 16
MAX_WRITE_BUFFER = 1 << 20
"""Replies a peer may leave unread before it is cut off."""
CLOSE_TIMEOUT = 5.0
"""Seconds a closing connection may take to flush its last bytes before it is aborted."""
RECONNECT_DELAYS = (0.5, 1.0, 2.0, 5.0)
"""Seconds between attempts to reach a listening QEMU (the last one repeats)."""

T = TypeVar("T")

Opener = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


@dataclass(frozen=True, slots=True)
class ConnectionStatus:
    peer: str  # "HOST:PORT" of the QEMU (or the socket path)
    holds_card: bool
    client: VscardStatus
    unsent: int  # bytes written that the peer has not read yet (transport buffer)
    buffered: int  # bytes read that do not make a whole message yet


@dataclass(frozen=True, slots=True)
class VscardServerStatus:
    """One reader's server, for ``usbccid ctl status``."""

    name: str
    listening: tuple[str, ...]  # "127.0.0.1:2001", "/run/usbccid/vscard.sock"
    connecting: str | None  # the QEMU we keep connecting to
    card: bool  # a card is in the reader (whether or not a QEMU has it now)
    connections: tuple[ConnectionStatus, ...]


class _Connection:
    """One chardev connection: a VscardClient and a task running its card calls."""

    def __init__(
        self,
        server: VscardServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        address: str,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.address = address
        self.peer = f"{server.name} {address}"  # for logs
        self.client = VscardClient(reader_name=server.reader_name, max_pending=server.max_pending)
        self.closed = False
        self.ended = asyncio.Event()
        self._wake = asyncio.Event()  # card work may be waiting
        self._idle = asyncio.Event()  # no card work waiting: read on
        self._idle.set()
        self._worker: asyncio.Task[None] | None = None
        sock = writer.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Our messages go out in one write each; QEMU's come in two (header, then
            # payload: ccid_card_vscard_send_msg), so it needs nodelay=on on its side.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    @property
    def holds_card(self) -> bool:
        return self.server._holder is self

    async def run(self) -> None:
        log.info("%s: QEMU connected", self.peer)
        self._worker = asyncio.create_task(self._work(), name=f"vscard-jobs {self.peer}")
        self.flush()  # our Init
        try:
            while not self.closed:
                data = await self.reader.read(READ_SIZE)
                self.guard(self.client.receive_data, data)
                if not data or self.closed:
                    break
                await self.writer.drain()  # back-pressure: a peer that does not read
                await self._idle.wait()  # and one that sends faster than the card answers
        except ConnectionError as e:
            log.info("%s: %s", self.peer, e)
        finally:
            self.close()
            if self._worker is not None:
                self._worker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._worker
            try:
                # A last answer is flushed; a peer that does not read gets no say.
                await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
            except (ConnectionError, TimeoutError):
                self.writer.transport.abort()
            log.info("%s: closed (%s)", self.peer, self.client.close_reason or "closed")
            self.ended.set()

    def guard(self, call: Callable[..., None], *args: object) -> None:
        """Call into the client, then flush; any exception closes this connection only."""
        if self.closed:
            return
        try:
            call(*args)
        except VscardError as e:
            log.warning("%s: protocol error, closing: %s", self.peer, e)
        except Exception:
            log.exception("%s: internal error, closing", self.peer)
            self.close()
            return
        self.flush()

    def flush(self) -> None:
        """Write the pending output, report events, wake the card worker, maybe close."""
        data = self.client.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)
        for event in self.client.events():
            self._report(event)
        self._wake.set()
        if self.client.pending:
            self._idle.clear()
        else:
            self._idle.set()
        if self.client.should_close:
            self.close()
        elif self.writer.transport.get_write_buffer_size() > self.server.max_write_buffer:
            log.warning("%s: does not read its replies, closing", self.peer)
            self.close(abort=True)

    def _report(self, event: Event) -> None:
        if isinstance(event, HostInit):
            log.debug("%s: VSCard host version %#x", self.peer, event.version)
        elif isinstance(event, ReaderAdded):
            log.info("%s: reader added (id %d)", self.peer, event.reader_id)
        elif isinstance(event, CardInserted):
            log.info("%s: card inserted, ATR %s", self.peer, event.atr.hex(" "))
        elif isinstance(event, CardRefused):
            log.warning("%s: card not inserted: %s", self.peer, event.reason)
        elif isinstance(event, CardRemoved):
            log.info("%s: card removed", self.peer)
        elif isinstance(event, Answered):
            log.info("%s: answered Error(%d): %s", self.peer, event.code, event.reason)
        elif isinstance(event, Closed):
            pass  # logged once the socket is closed
        else:
            log.debug("%s: %s", self.peer, event)

    async def _work(self) -> None:
        """Run the card calls one by one; the card lock keeps two connections (a new one
        and one still finishing a call on a thread) from calling the card at once."""
        while not self.closed:
            job = self.client.next_job()
            if job is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                async with self.server._card_lock:
                    await self._run(job)
            except Exception:  # only a bug gets here: Job.run catches the card's errors
                log.exception("%s: card job failed, closing", self.peer)
                self.close()
                return
            self.guard(job.finish)

    async def _run(self, job: Job) -> None:
        if job.blocking:
            await asyncio.to_thread(job.run)
        else:
            job.run()

    def close(self, *, abort: bool = False) -> None:
        """Close (``abort``: without flushing what the peer has not read)."""
        if self.closed:
            return
        self.closed = True
        self._wake.set()
        self._idle.set()
        if abort:
            self.writer.transport.abort()
        else:
            self.writer.close()
        self.server._forget(self)


class VscardServer:
    """One reader for QEMU's ccid-card-passthru, holding ``card`` (or none).

    Args:
        card: the card in the reader, or None (see :meth:`insert`).
        name: for logs and status.
        reader_name: sent to QEMU in ReaderAdd (QEMU does not show it).
        allow: for TCP, whether a client address may connect at all; None allows all.
        max_write_buffer: replies a peer may leave unread before it is cut off.
        max_pending: APDUs a peer may have waiting for the card (QEMU: one).
    """

    def __init__(
        self,
        card: Card | None = None,
        *,
        name: str = "vscard",
        reader_name: str = "usbccid",
        allow: Callable[[str], bool] | None = None,
        max_write_buffer: int = MAX_WRITE_BUFFER,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.name = name
        self.reader_name = reader_name
        self.allow = allow
        self.max_write_buffer = max_write_buffer
        self.max_pending = max_pending
        self.accepted = 0
        self.refused = 0
        self._card = card
        self._holder: _Connection | None = None
        self._connections: list[_Connection] = []
        self._servers: list[asyncio.Server] = []
        self._listening: list[str] = []
        self._unix_paths: list[Path] = []
        self._connecting: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._card_lock = asyncio.Lock()
        self._closing = False

    # -- the card -----------------------------------------------------------------------

    @property
    def card(self) -> Card | None:
        return self._card

    def insert(self, card: Card) -> None:
        """Put ``card`` in the reader (replacing any); the connection holding the reader's
        card, or else the oldest one, gets it."""
        self._card = card
        holder = self._holder or next((c for c in self._connections if not c.closed), None)
        if holder is not None:
            self._holder = holder
            holder.guard(holder.client.insert, card)

    def remove(self) -> None:
        """Take the card out of the reader (QEMU sees it removed)."""
        self._card = None
        holder, self._holder = self._holder, None
        if holder is not None:
            holder.guard(holder.client.remove)

    def status(self) -> VscardServerStatus:
        return VscardServerStatus(
            name=self.name,
            listening=tuple(self._listening),
            connecting=self._connecting,
            card=self._card is not None,
            connections=tuple(
                ConnectionStatus(
                    c.address,
                    c.holds_card,
                    c.client.status(),
                    c.writer.transport.get_write_buffer_size(),
                    c.client.buffered,
                )
                for c in self._connections
            ),
        )

    # -- connections --------------------------------------------------------------------

    def _adopt(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> _Connection:
        peername = writer.get_extra_info("peername")
        if isinstance(peername, tuple) and len(peername) >= 2:
            address = f"{peername[0]}:{peername[1]}"
        else:
            address = str(peername or writer.get_extra_info("sockname") or "?")
        conn = _Connection(self, reader, writer, address)
        self._connections.append(conn)
        if self._card is not None and self._holder is None:
            self._holder = conn
            conn.client.insert(self._card)
        return conn

    def _forget(self, conn: _Connection) -> None:
        with contextlib.suppress(ValueError):
            self._connections.remove(conn)
        if self._holder is conn:
            self._holder = None
            nxt = next((c for c in self._connections if not c.closed), None)
            if nxt is not None and self._card is not None and not self._closing:
                log.info("%s: the card goes to %s", conn.peer, nxt.peer)
                self._holder = nxt
                nxt.guard(nxt.client.insert, self._card)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peername = writer.get_extra_info("peername")
        if isinstance(peername, tuple) and self.allow is not None:
            host = str(peername[0])
            if not self.allow(host):
                self.refused += 1
                log.warning("refused VSCard connection from %s (not in the allow-list)", host)
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()
                return
        if self._closing:
            writer.close()
            return
        self.accepted += 1
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._adopt(reader, writer).run()
        finally:
            if task is not None:
                self._tasks.discard(task)

    async def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        """Listen for QEMU on TCP; returns the bound (host, port), useful with port 0."""
        server = await asyncio.start_server(self._serve, host, port)
        self._servers.append(server)
        address = server.sockets[0].getsockname()
        shown = (
            f"[{address[0]}]:{address[1]}" if ":" in address[0] else f"{address[0]}:{address[1]}"
        )
        self._listening.append(shown)
        log.info("%s: VSCard listening on %s", self.name, shown)
        return address[0], address[1]

    async def listen_unix(self, path: Path | str) -> Path:
        """Listen for QEMU on a UNIX socket (QEMU: ``-chardev socket,path=PATH``). A stale
        socket file nobody listens on is replaced; one in use is an OSError."""
        path = Path(path)
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(self._serve, str(path))
        self._servers.append(server)
        self._unix_paths.append(path)
        self._listening.append(str(path))
        log.info("%s: VSCard listening on %s", self.name, path)
        return path

    def connect_tcp(self, host: str, port: int) -> None:
        """Keep connecting to a QEMU listening on TCP (``server=on``), one connection at
        a time, reconnecting when it ends."""

        async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_connection(host, port)

        self._start_connecting(f"{host}:{port}", opener)

    def connect_unix(self, path: Path | str) -> None:
        """Keep connecting to a QEMU listening on a UNIX socket."""

        async def opener() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            return await asyncio.open_unix_connection(str(path))

        self._start_connecting(str(path), opener)

    def _start_connecting(self, where: str, opener: Opener) -> None:
        if self._connecting is not None:
            raise RuntimeError(f"{self.name}: already connecting to {self._connecting}")
        self._connecting = where
        task = asyncio.create_task(self._connect_loop(where, opener), name=f"vscard {where}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _connect_loop(self, where: str, opener: Opener) -> None:
        failures = 0
        while not self._closing:
            try:
                reader, writer = await opener()
            except OSError as e:
                if failures == 0:
                    log.warning("%s: cannot reach QEMU at %s (%s); retrying", self.name, where, e)
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.accepted += 1
            await self._adopt(reader, writer).run()
            if not self._closing:
                await asyncio.sleep(RECONNECT_DELAYS[0])

    async def close(self) -> None:
        """Leave every QEMU cleanly (CardRemove + ReaderRemove), stop listening."""
        self._closing = True
        for server in self._servers:
            server.close()
        for conn in list(self._connections):
            conn.guard(conn.client.leave, "server shutting down")
            conn.close()
        for conn in list(self._connections):
            conn.close()
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=5)
            for task in list(self._tasks):
                task.cancel()
        for server in self._servers:
            await server.wait_closed()
        for path in self._unix_paths:
            with contextlib.suppress(OSError):
                path.unlink()


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        os.unlink(path)  # nobody listens there any more
        return
    finally:
        probe.close()
    raise OSError(f"{path}: another server is listening there")


class VscardServerThread(LoopThread[VscardServer]):
    """A :class:`VscardServer` on its own event loop in a background thread (tests).

    ``with VscardServerThread(card) as t: t.listen_tcp()`` ... The server is single-threaded:
    change it only through :meth:`call`, which runs ``fn(server)`` on its loop.
    """

    def __init__(self, card: Card | None = None, **kwargs: Any) -> None:
        super().__init__("vscard", "VSCard server")
        self._card = card
        self._kwargs = kwargs

    async def open(self) -> VscardServer:
        return VscardServer(self._card, **self._kwargs)

    async def shut(self, server: VscardServer) -> None:
        await server.close()

    def start(self) -> VscardServerThread:
        self.start_thread()
        return self

    def call(self, fn: Callable[[VscardServer], T]) -> T:
        """``fn(server)`` on the server's loop; its result."""

        async def in_loop(server: VscardServer) -> T:
            return fn(server)

        return self.on_loop(in_loop)

    def run(self, coro: Callable[[VscardServer], Awaitable[T]]) -> T:
        """``await coro(server)`` on the server's loop; its result."""
        return self.on_loop(coro)

    def listen_tcp(self, host: str = "127.0.0.1", port: int = 0) -> tuple[str, int]:
        return self.run(lambda f: f.listen_tcp(host, port))

    def __enter__(self) -> VscardServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
