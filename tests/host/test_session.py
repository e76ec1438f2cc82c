"""The TCP session's concurrency and unlink handling, against a scripted fake server.

The fake server speaks raw bytes written here by hand, so the races the real server
would only hit by chance (a completion overtaking an unlink, a late RET_SUBMIT, a
missing RET_UNLINK, a dropped link) happen on cue.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import struct
import threading
from collections.abc import Callable, Iterator

import pytest

from usbccid.host import session as session_module
from usbccid.host.pdu import ConnectionClosedError, ProtocolError, UrbTimeoutError
from usbccid.host.session import Session

Script = Callable[[socket.socket], None]


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def op_rep_import(busid: str) -> bytes:
    device = bytearray(312)
    device[0x100 : 0x100 + len(busid)] = busid.encode()
    device[0x120:0x128] = struct.pack(">II", 1, 2)
    device[0x128:0x12C] = struct.pack(">I", 2)
    return struct.pack(">HHI", 0x0111, 0x0003, 0) + bytes(device)


def read_cmd(sock: socket.socket) -> tuple[int, int, int, int, int]:
    """(command, seqnum, direction, length or unlink_seqnum, ep); OUT data consumed."""
    header = recv_exact(sock, 48)
    command, seqnum, _devid, direction, ep, field = struct.unpack_from(">IIIIII", header)
    length = struct.unpack_from(">I", header, 24)[0]
    if command == 1 and direction == 0 and length:
        recv_exact(sock, length)
    return command, seqnum, direction, field if command == 2 else length, ep


def ret_submit(seqnum: int, status: int = 0, data: bytes = b"", actual: int | None = None) -> bytes:
    n = len(data) if actual is None else actual
    return struct.pack(">IIIIIiiiii8x", 3, seqnum, 0, 0, 0, status, n, 0, 0, 0) + data


def ret_unlink(seqnum: int, status: int) -> bytes:
    return struct.pack(">IIIIIi24x", 4, seqnum, 0, 0, 0, status)


@pytest.fixture
def serve() -> Iterator[Callable[[Script], Session]]:
    threads: list[threading.Thread] = []
    sessions: list[Session] = []
    listeners: list[socket.socket] = []

    def start(script: Script) -> Session:
        listener = socket.create_server(("127.0.0.1", 0))
        listeners.append(listener)

        def run() -> None:
            conn, _ = listener.accept()
            with conn:
                request = recv_exact(conn, 40)
                assert request[:8] == bytes.fromhex("0111 8003 00000000")
                conn.sendall(op_rep_import(request[8:].rstrip(b"\0").decode()))
                with contextlib.suppress(EOFError, OSError):
                    script(conn)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        threads.append(thread)
        session = Session("127.0.0.1", listener.getsockname()[1], busid="1-1")
        sessions.append(session)
        return session

    yield start
    for session in sessions:
        session.close()
    for thread in threads:
        thread.join(5)
    for listener in listeners:
        listener.close()


def test_completions_out_of_order_reach_their_callers(serve: Callable[[Script], Session]) -> None:
    def script(conn: socket.socket) -> None:
        first = read_cmd(conn)
        second = read_cmd(conn)
        conn.sendall(ret_submit(second[1], data=b"second"))
        conn.sendall(ret_submit(first[1], data=b"first"))
        recv_exact(conn, 1)

    session = serve(script)
    results: dict[str, bytes] = {}

    def read(name: str, endpoint: int) -> None:
        results[name] = session.submit(endpoint, length=16, timeout=5).data

    a = threading.Thread(target=read, args=("a", 0x81))
    a.start()
    while not session._conn.outstanding:  # a's CMD_SUBMIT goes first
        pass
    b = threading.Thread(target=read, args=("b", 0x82))
    b.start()
    a.join(5)
    b.join(5)
    assert results == {"a": b"first", "b": b"second"}


def test_timeout_unlinks_and_a_late_ret_submit_kills_the_link(
    serve: Callable[[Script], Session],
) -> None:
    def script(conn: socket.socket) -> None:
        submit = read_cmd(conn)
        unlink = read_cmd(conn)
        assert unlink[0] == 2
        assert unlink[3] == submit[1]  # unlink_seqnum
        conn.sendall(ret_unlink(unlink[1], -errno.ECONNRESET))
        conn.sendall(ret_submit(submit[1], data=b"late"))  # the fatal ordering
        recv_exact(conn, 1)

    session = serve(script)
    with pytest.raises(UrbTimeoutError) as caught:
        session.submit(0x81, length=8, timeout=0.05)
    assert caught.value.unlink_status == -errno.ECONNRESET
    session._reader.join(5)
    assert isinstance(session.failure, ProtocolError)
    with pytest.raises(ProtocolError):
        session.submit(0x82, length=8, timeout=1)


def test_completion_that_overtakes_the_unlink_is_returned(
    serve: Callable[[Script], Session],
) -> None:
    def script(conn: socket.socket) -> None:
        submit = read_cmd(conn)
        unlink = read_cmd(conn)
        # usbip_protocol.rst: CMD_UNLINK after RET_SUBMIT -> RET_UNLINK status 0.
        conn.sendall(ret_submit(submit[1], data=b"just in time") + ret_unlink(unlink[1], 0))
        submit = read_cmd(conn)
        conn.sendall(ret_submit(submit[1], data=b"next"))
        recv_exact(conn, 1)

    session = serve(script)
    assert session.submit(0x82, length=64, timeout=0.05).data == b"just in time"
    assert session.submit(0x82, length=64, timeout=5).data == b"next"
    assert session.failure is None


def test_missing_ret_unlink_gives_the_link_up(
    serve: Callable[[Script], Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(session_module, "UNLINK_REPLY_TIMEOUT", 0.1)

    def script(conn: socket.socket) -> None:
        read_cmd(conn)
        read_cmd(conn)
        recv_exact(conn, 1)

    session = serve(script)
    with pytest.raises(ConnectionClosedError, match="no RET_UNLINK"):
        session.submit(0x81, length=8, timeout=0.05)
    assert session.closed


def test_server_closing_fails_every_waiter(serve: Callable[[Script], Session]) -> None:
    def script(conn: socket.socket) -> None:
        read_cmd(conn)
        read_cmd(conn)

    session = serve(script)
    errors: list[BaseException] = []

    def wait() -> None:
        try:
            session.submit(0x81, length=8, timeout=None)
        except ConnectionClosedError as exc:
            errors.append(exc)

    waiters = [threading.Thread(target=wait) for _ in range(2)]
    for waiter in waiters:
        waiter.start()
    for waiter in waiters:
        waiter.join(5)
    assert len(errors) == 2
    with pytest.raises(ConnectionClosedError):
        session.submit(0x82, length=8, timeout=1)


def test_oversized_in_reply_is_a_protocol_error(serve: Callable[[Script], Session]) -> None:
    def script(conn: socket.socket) -> None:
        submit = read_cmd(conn)
        conn.sendall(ret_submit(submit[1], data=b"0123456789"))  # asked for 8
        recv_exact(conn, 1)

    session = serve(script)
    with pytest.raises(ProtocolError, match="actual_length 10 > 8"):
        session.submit(0x82, length=8, timeout=5)
