"""The TCP transport of the USB/IP client: a device list, and imported-device sessions.

A :class:`Session` is one OP_REQ_IMPORT connection. Any number of threads may have URBs
outstanding on it at once (a parked interrupt-IN while bulk traffic flows, as vhci does,
usbip_protocol.rst "USBIP_CMD_SUBMIT(seqnum = m+1) ... RET_SUBMIT(seqnum = m)"): the
calling thread sends its CMD_SUBMIT and blocks on a future; one reader thread feeds the
sans-IO :class:`~usbccid.host.pdu.ClientConnection` and completes futures by seqnum.

A URB that outlives its timeout is unlinked the way vhci does it: CMD_UNLINK, then wait for
RET_UNLINK. If the RET_SUBMIT wins the race (the server completed it first, TCP keeps the
order), the URB's result is returned as if in time.
"""

from __future__ import annotations

import errno
import socket
import threading
from concurrent.futures import Future
from types import TracebackType

from usbccid.host.pdu import (
    ClientConnection,
    ConnectionClosedError,
    DeviceList,
    Event,
    ExportedDevice,
    HostError,
    ImportRefusedError,
    ImportReply,
    SubmitDone,
    UnlinkDone,
    UrbTimeoutError,
)

USBIP_PORT = 3240
UNLINK_REPLY_TIMEOUT = 5.0  # seconds to wait for RET_UNLINK before giving the link up
_RECV_SIZE = 1 << 16


def _connect(host: str, port: int, timeout: float) -> socket.socket:
    sock = socket.create_connection((host, port), timeout=timeout)
    # usbip_network.c sets both on the client side: small PDUs must not wait for Nagle.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return sock


def _await_op_reply(sock: socket.socket, conn: ClientConnection) -> Event:
    while True:
        data = sock.recv(_RECV_SIZE)
        if not data:
            raise ConnectionClosedError("server closed the connection during the op phase")
        events = conn.receive_data(data)
        if events:
            return events[0]


def list_devices(
    host: str, port: int = USBIP_PORT, *, timeout: float = 5.0
) -> tuple[ExportedDevice, ...]:
    """OP_REQ_DEVLIST on a fresh connection (usbip_protocol.rst; ``usbip list -r``)."""
    conn = ClientConnection()
    with _connect(host, port, timeout) as sock:
        sock.sendall(conn.request_devlist())
        event = _await_op_reply(sock, conn)
    assert isinstance(event, DeviceList)
    return event.devices


class Session:
    """One imported device: OP_REQ_IMPORT, then URBs on the same TCP connection."""

    def __init__(
        self, host: str, port: int = USBIP_PORT, *, busid: str, timeout: float = 5.0
    ) -> None:
        self.busid = busid
        self._conn = ClientConnection()
        self._sock = _connect(host, port, timeout)
        try:
            self._sock.sendall(self._conn.request_import(busid))
            reply = _await_op_reply(self._sock, self._conn)
        except BaseException:
            self._sock.close()
            raise
        assert isinstance(reply, ImportReply)
        if reply.device is None:
            self._sock.close()
            raise ImportRefusedError(busid, reply.status)
        self.device: ExportedDevice = reply.device
        self._sock.settimeout(None)
        self._lock = threading.Lock()
        self._futures: dict[int, Future[Event]] = {}
        self._failure: HostError | None = None
        self._reader = threading.Thread(
            target=self._read_loop, name=f"usbip-client-{busid}", daemon=True
        )
        self._reader.start()

    # -- URBs ---------------------------------------------------------------------------

    def submit(
        self,
        endpoint: int,
        *,
        length: int = 0,
        data: bytes = b"",
        setup: bytes = bytes(8),
        interval: int = 0,
        timeout: float | None = None,
    ) -> SubmitDone:
        """Submit one URB and wait for it; ``timeout`` in seconds, None waits forever.

        The result may carry a non-zero ``status`` (e.g. -32, a stall): that is the
        caller's to judge. Raises :class:`UrbTimeoutError` after a successful unlink, and
        :class:`ConnectionClosedError` / :class:`ProtocolError` when the link is gone.
        """
        future: Future[Event] = Future()
        with self._lock:
            self._check_alive()
            seqnum, pdu = self._conn.submit(
                endpoint=endpoint, length=length, data=data, setup=setup, interval=interval
            )
            self._futures[seqnum] = future
            self._send(pdu)
        try:
            event = future.result(timeout)
        except TimeoutError:
            event = self._unlink(seqnum, future)
        assert isinstance(event, SubmitDone)
        return event

    def _unlink(self, seqnum: int, future: Future[Event]) -> Event:
        reply: Future[Event] = Future()
        with self._lock:
            if future.done():  # completed between the timeout and taking the lock
                return future.result()
            self._check_alive()
            own, pdu = self._conn.unlink(seqnum)
            self._futures[own] = reply
            self._send(pdu)
        try:
            unlinked = reply.result(UNLINK_REPLY_TIMEOUT)
        except TimeoutError:
            self._fail(ConnectionClosedError(f"no RET_UNLINK for URB {seqnum}"))
            raise self._failure or ConnectionClosedError("closed") from None
        assert isinstance(unlinked, UnlinkDone)
        if not unlinked.cancelled:
            # RET_SUBMIT came first (TCP keeps the order), so the future is complete.
            return future.result(0)
        raise UrbTimeoutError(seqnum, unlinked.status)

    # -- lifetime -------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._failure is not None

    @property
    def failure(self) -> HostError | None:
        """Why the session ended (None while it is alive)."""
        return self._failure

    def close(self) -> None:
        """Close the TCP connection; the server then makes the device available again."""
        self._fail(ConnectionClosedError("session closed"))
        if self._reader is not threading.current_thread():
            self._reader.join(timeout=5.0)

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if self._failure is not None:
            raise self._failure

    def _send(self, pdu: bytes) -> None:
        try:
            self._sock.sendall(pdu)
        except OSError as exc:
            failure = ConnectionClosedError(f"send failed: {exc}")
            self._failure = self._failure or failure
            raise failure from exc

    def _read_loop(self) -> None:
        try:
            while True:
                data = self._sock.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionClosedError("server closed the connection")
                with self._lock:
                    events = self._conn.receive_data(data)
                    done = [(self._futures.pop(_seqnum(e), None), e) for e in events]
                    for event in events:
                        if isinstance(event, UnlinkDone) and event.cancelled:
                            # No RET_SUBMIT will come for it (usbip_protocol.rst, UNLINK).
                            self._futures.pop(event.unlink_seqnum, None)
                for future, event in done:
                    if future is None:
                        raise ConnectionClosedError(f"no waiter for {event}")
                    future.set_result(event)
        except HostError as exc:
            self._fail(exc)
        except OSError as exc:
            self._fail(ConnectionClosedError(f"receive failed: {exc}"))

    def _fail(self, failure: HostError) -> None:
        with self._lock:
            if self._failure is None:
                self._failure = failure
            futures = list(self._futures.values())
            self._futures.clear()
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EBADF):
                raise
        self._sock.close()
        for future in futures:
            if not future.done():
                future.set_exception(self._failure or failure)


def _seqnum(event: Event) -> int:
    assert isinstance(event, SubmitDone | UnlinkDone)
    return event.seqnum
