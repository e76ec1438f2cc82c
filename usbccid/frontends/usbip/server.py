"""The asyncio shell around the sans-IO USB/IP stack: sockets, the clock, threads.

It parses nothing. Per TCP connection (an :class:`asyncio.Protocol`) it feeds what it
reads to an :class:`~usbccid.usbip.exporter.ExportConnection`, writes what that returns
(one write per batch read), pauses reading a peer that does not read, runs the jobs
it hands out (``run()`` inline, or on a thread when ``job.blocking``; ``finish()`` always
on the loop) and drives its timer with ``loop.call_at``. A peer that breaks the protocol
(:class:`UsbipRemoteError`) loses its own connection and nothing else; any other
exception is a bug, logged with its traceback, and also closes only that connection.

Tests (and the pyusb backend) start a server on a free port with :class:`ServerThread`.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TypeVar, cast

from usbccid.frontends.loop_thread import LoopThread
from usbccid.jobs import Job
from usbccid.usbip.errors import UsbipRemoteError
from usbccid.usbip.exporter import ExportConnection, Exporter

log = logging.getLogger(__name__)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3240  # IANA "usbip"
#: the write-buffer marks of each connection's transport: above WRITE_HIGH unsent bytes
#: (a peer that does not read) the server stops reading that peer, below WRITE_LOW it
#: reads again. The largest single reply (a 64 KiB CCID message) fits under WRITE_HIGH.
WRITE_HIGH = 256 * 1024
WRITE_LOW = 64 * 1024

T = TypeVar("T")


@dataclass(frozen=True)
class Keepalive:
    """TCP keepalive for every accepted connection (tcp(7)): after ``idle`` seconds of
    silence, a probe every ``interval`` seconds; ``count`` unanswered probes close the
    connection. TCP_USER_TIMEOUT gets the same window, so that unacknowledged data (a peer
    that vanished while we were sending) is given up as soon, not after tcp_retries2."""

    idle: int = 20
    interval: int = 10
    count: int = 3

    @property
    def window(self) -> int:
        """Seconds from a peer's last sign of life until its connection is closed."""
        return self.idle + self.interval * self.count


def configure_socket(sock: socket.socket, keepalive: Keepalive) -> None:
    """TCP_NODELAY and keepalive on an accepted USB/IP socket.

    usbipd and the usbip tool set TCP_NODELAY (usbip_network.c); without it Nagle and
    delayed ACKs add tens of ms per URB. Keepalive finds peers that vanished without a FIN
    or RST, which would otherwise keep a device imported for the kernel's default 2 h 11 min.
    """
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, keepalive.idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, keepalive.interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive.count)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, keepalive.window * 1000)


#: The head of struct tcp_info (linux/tcp.h): 8 bytes of u8 fields and bit fields, then
#: u32s: rto, ato, snd_mss, rcv_mss, unacked, sacked, lost, retrans, fackets,
#: last_data_sent, last_ack_sent, last_data_recv, last_ack_recv (ms ago).
_TCP_INFO = struct.Struct("=8B13I")


def silent_for(sock: socket.socket) -> float | None:
    """Seconds since the peer last sent anything (data, or an ACK, such as the answer to
    a keepalive probe), from the kernel's TCP_INFO; None if unknown."""
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO.size)
    except OSError:
        return None
    if len(raw) < _TCP_INFO.size:
        return None
    fields = _TCP_INFO.unpack(raw)
    last_data_recv, last_ack_recv = fields[8 + 11], fields[8 + 12]
    return float(min(last_data_recv, last_ack_recv)) / 1000


class _Peer(asyncio.Protocol):
    """One accepted TCP connection: an :class:`asyncio.Protocol` (no streams, no task).

    Each batch of bytes read goes to the stack at once, the inline jobs it made are run,
    and every reply the batch produced leaves in one ``transport.write``. Back-pressure:
    when the transport's write buffer passes :data:`WRITE_HIGH` (a peer that does not
    read), reading from that peer pauses until the buffer drains below
    :data:`WRITE_LOW`, so what the server holds for it stays bounded; TCP flow control
    then holds the peer back.
    """

    def __init__(self, server: UsbipServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.name = "?"
        self.host = ""
        self.sock: socket.socket | None = None
        self.conn: ExportConnection | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.done: asyncio.Future[None] = self.loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (a cast, not an isinstance check: uvloop's transports do not derive from asyncio's)
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        server = self.server
        peername = transport.get_extra_info("peername")
        host = self.host = str(peername[0]) if peername else ""
        self.name = f"{peername[0]}:{peername[1]}" if peername else "?"
        if server.allow is not None and not server.allow(host):
            server.refused += 1
            log.warning("refused USB/IP connection from %s (not in the allow-list)", host)
            self.closed = True
            transport.close()
            return
        server.accepted += 1
        server.peers.add(self)
        self.sock = transport.get_extra_info("socket")
        if self.sock is not None:
            configure_socket(self.sock, server.keepalive)
        transport.set_write_buffer_limits(high=WRITE_HIGH, low=WRITE_LOW)
        self.conn = server.exporter.connect(self.name)
        log.info("%s: connected", self.name)

    def data_received(self, data: bytes) -> None:
        self.guard(self._receive, data)

    def eof_received(self) -> bool:
        self.guard(self._receive, b"")
        self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.conn is not None:
            log.info("%s: %s", self.name, exc)
        self.close()
        if self.conn is not None:
            log.info("%s: closed", self.name)
        if not self.done.done():
            self.done.set_result(None)

    def pause_writing(self) -> None:
        # The peer does not read what we write: stop reading what it sends.
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- the stack ---------------------------------------------------------------------

    def _receive(self, data: bytes) -> None:
        assert self.conn is not None
        self.conn.receive_data(data)

    def guard(self, call: Callable[..., None], *args: object) -> None:
        """Call into the stack, then flush; any exception closes this connection only."""
        if self.closed:
            return
        try:
            call(*args)
            self.flush()
        except UsbipRemoteError as e:
            log.warning("%s: protocol error, closing: %s", self.name, e)
            self.flush_quietly()
            self.close()
        except Exception:
            log.exception("%s: internal error, closing", self.name)
            self.close()

    def flush(self) -> None:
        """Run due inline jobs, write the pending output at once, re-arm the timer, maybe
        close."""
        conn = self.conn
        assert conn is not None
        assert self.transport is not None
        self.start_jobs()
        data = conn.data_to_send()
        if data:
            self.transport.write(data)
        self.arm_timer()
        if conn.should_close:
            self.close()

    def flush_quietly(self) -> None:
        assert self.conn is not None
        assert self.transport is not None
        data = self.conn.data_to_send()
        if data and not self.transport.is_closing():
            self.transport.write(data)

    def start_jobs(self) -> None:
        conn = self.conn
        assert conn is not None
        while not self.closed and (job := conn.next_job(self.loop.time())) is not None:
            if job.blocking:
                task = self.loop.create_task(self.run_blocking(job))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            else:
                job.run()
                job.finish()
                conn.poll()

    async def run_blocking(self, job: Job) -> None:
        try:
            await asyncio.to_thread(job.run)
        except Exception:
            log.exception("%s: job failed, closing", self.name)
            self.close()
            return
        # A job whose connection is gone is dropped: the device was reset (and may be
        # imported by someone else by now), so its result must not reach the function.
        if not self.closed:
            self.guard(self.finish_job, job)

    def finish_job(self, job: Job) -> None:
        assert self.conn is not None
        job.finish()
        self.conn.poll()

    def arm_timer(self) -> None:
        assert self.conn is not None
        when = self.conn.get_timer()
        if self.timer is not None:
            if when is not None and self.timer.when() == when:
                return
            self.timer.cancel()
            self.timer = None
        if when is not None and not self.closed:
            self.timer = self.loop.call_at(when, self.on_timer)

    def on_timer(self) -> None:
        self.timer = None
        assert self.conn is not None
        self.guard(self.conn.handle_timer, self.loop.time())

    def poke(self) -> None:
        """Re-poll parked URBs after a change made outside the URB stream."""
        if self.conn is not None:
            self.guard(self.conn.poll)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.conn is not None:
            self.conn.connection_lost()
        if self.transport is not None:
            self.transport.close()
        self.server.peers.discard(self)


class UsbipServer:
    """A USB/IP TCP server for ``exporter`` on one event loop."""

    def __init__(
        self,
        exporter: Exporter,
        *,
        allow: Callable[[str], bool] | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        """``allow(host)`` decides whether a client address may connect at all (USB/IP has
        no authentication: an allow-list is the only gate); None allows everyone."""
        self.exporter = exporter
        self.allow = allow
        self.keepalive = keepalive or Keepalive()
        exporter.takeover = self._may_take_over
        self.accepted = 0  # connections taken
        self.refused = 0  # connections closed at once by ``allow``
        self.peers: set[_Peer] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> tuple[str, int]:
        """Listen; returns the bound (host, port), useful with port 0."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Peer(self), host, port)
        address = self._server.sockets[0].getsockname()
        log.info("USB/IP server listening on %s:%s", address[0], address[1])
        return address[0], address[1]

    def _may_take_over(self, holder: ExportConnection, claimant: ExportConnection) -> bool:
        """A busy device goes to a new import from the same host when the old connection
        has missed a keepalive probe (silent for idle + interval): a live importer, idle or
        not, answers every probe, and a host that rebooted or lost its vhci port comes back
        from the same address while its old connection cannot answer any more. Anyone else
        gets ST_DEV_BUSY until keepalive closes the old connection (``window``)."""
        peers = {peer.conn: peer for peer in self.peers}
        old, new = peers.get(holder), peers.get(claimant)
        if old is None or new is None or old.host != new.host or old.sock is None:
            return False
        silence = silent_for(old.sock)
        limit = self.keepalive.idle + self.keepalive.interval
        if silence is None or silence < limit:
            return False
        log.warning(
            "%s: silent for %.0f s; %s (same host) takes its device over",
            old.name,
            silence,
            new.name,
        )
        return True

    def poke(self) -> None:
        """Re-poll every connection's parked URBs (after a card insertion, say)."""
        for peer in list(self.peers):
            peer.poke()

    async def serve_forever(self) -> None:
        assert self._server is not None, "call start() first"
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        peers = list(self.peers)
        for peer in peers:
            peer.close()
        pending = {p.done for p in peers if not p.done.done()}
        pending |= {t for p in peers for t in p.tasks}
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self._server is not None:
            await self._server.wait_closed()


async def serve(exporter: Exporter, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
    """Serve ``exporter`` until cancelled."""
    server = UsbipServer(exporter)
    await server.start(host, port)
    try:
        await server.serve_forever()
    finally:
        await server.close()


class ServerThread(LoopThread[UsbipServer]):
    """A :class:`UsbipServer` on its own event loop in a background thread.

    ``with ServerThread(exporter) as (host, port): ...`` listens on a free port of
    127.0.0.1 and stops (closing all connections) on exit. The stack is single-threaded:
    change devices or functions only through :meth:`call`, which runs on the loop thread
    and then re-polls the parked URBs of every connection.
    """

    def __init__(self, exporter: Exporter, host: str = DEFAULT_HOST, port: int = 0) -> None:
        super().__init__("usbip-server", "USB/IP server")
        self.exporter = exporter
        self.host = host
        self.port = port
        self.address: tuple[str, int] | None = None
        self._server = UsbipServer(exporter)

    async def open(self) -> UsbipServer:
        self.address = await self._server.start(self.host, self.port)
        return self._server

    async def shut(self, server: UsbipServer) -> None:
        await server.close()

    def start(self) -> tuple[str, int]:
        """Listen; the bound (host, port)."""
        self.start_thread()
        assert self.address is not None
        return self.address

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the server's loop, re-poll every connection, return the result."""

        async def in_loop(server: UsbipServer) -> T:
            result = fn()
            server.poke()
            return result

        return self.on_loop(in_loop)

    def __enter__(self) -> tuple[str, int]:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
