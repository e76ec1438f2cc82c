"""The asyncio shell (server.py) over real sockets: TCP and UNIX listening, connecting to a
QEMU that listens (and reconnecting), the card passing between connections,
insert/remove/status, clean leaving, and cards that block."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.frontends.vscard.helpers import OK, QemuPeer
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.server import VscardServer, VscardServerThread

ECHO = bytes.fromhex("8010000003010203")
SLOW = bytes.fromhex("80140000")


@pytest.fixture
def card() -> EchoCard:
    return EchoCard()


@pytest.fixture
def front(card: EchoCard) -> Iterator[VscardServerThread]:
    with VscardServerThread(card, name="t") as t:
        yield t


def _wait(cond: object, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while not callable(cond) or not cond():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


def test_tcp_conversation_status_and_leave(front: VscardServerThread, card: EchoCard) -> None:
    address = front.listen_tcp()
    peer = QemuPeer.connect(address)
    assert peer.handshake() == DEFAULT_ATR
    assert peer.apdu(ECHO) == b"\x01\x02\x03\x90\x00"
    status = front.call(VscardServer.status)
    assert status.listening == (f"127.0.0.1:{address[1]}",)
    assert status.card
    (conn,) = status.connections
    assert conn.holds_card
    assert conn.client.state in ("inserting", "inserted")
    assert conn.client.apdus == 1
    front.stop()  # leaving: the reader must not linger in QEMU
    assert [type(m) for m in (peer.recv(), peer.recv())] == [wire.CardRemove, wire.ReaderRemove]
    assert peer.at_eof()


def test_remove_and_insert(front: VscardServerThread) -> None:
    peer = QemuPeer.connect(front.listen_tcp())
    peer.handshake()
    front.call(VscardServer.remove)
    peer.expect(wire.CardRemove)
    peer.send(wire.Error(OK, 0))
    other = EchoCard(atr=bytes.fromhex("3B02") + b"ok")
    front.call(lambda f: f.insert(other))
    (atr,) = peer.expect(wire.Atr)
    assert isinstance(atr, wire.Atr)
    assert atr.atr == other.atr
    peer.send(wire.Error(OK, 0))
    assert peer.apdu(ECHO) == b"\x01\x02\x03\x90\x00"
    assert other.commands == [ECHO]


def test_the_card_goes_to_one_connection_at_a_time(front: VscardServerThread) -> None:
    address = front.listen_tcp()
    first = QemuPeer.connect(address)
    first.handshake()
    second = QemuPeer.connect(address)
    second.handshake(card=False)  # a reader, but the card is in use
    status = front.call(VscardServer.status)
    assert [c.holds_card for c in status.connections] == [True, False]
    first.close()
    second.expect(wire.Atr)  # the card moves on
    second.send(wire.Error(OK, 0))
    assert second.apdu(ECHO) == b"\x01\x02\x03\x90\x00"


def test_unix_socket(front: VscardServerThread, tmp_path: Path) -> None:
    path = tmp_path / "vscard.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # a socket file nobody listens on: replaced
    front.run(lambda f: f.listen_unix(path))
    peer = QemuPeer.connect(str(path))
    assert peer.handshake() == DEFAULT_ATR
    with pytest.raises(OSError, match="another server is listening"):
        front.run(lambda f: f.listen_unix(path))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="not a socket"):
        front.run(lambda f: f.listen_unix(tmp_path / "file"))
    front.stop()
    assert not path.exists()


def test_connect_to_a_listening_qemu_and_reconnect(front: VscardServerThread) -> None:
    qemu = socket.create_server(("127.0.0.1", 0))
    qemu.settimeout(20)
    port = qemu.getsockname()[1]
    front.call(lambda f: f.connect_tcp("127.0.0.1", port))
    sock, _ = qemu.accept()
    peer = QemuPeer(sock)
    assert peer.handshake() == DEFAULT_ATR
    assert front.call(VscardServer.status).connecting == f"127.0.0.1:{port}"
    peer.close()  # QEMU's side goes away: we come back
    sock, _ = qemu.accept()
    peer = QemuPeer(sock)
    assert peer.handshake() == DEFAULT_ATR
    assert peer.apdu(ECHO) == b"\x01\x02\x03\x90\x00"
    qemu.close()


def test_connect_retries_until_qemu_listens() -> None:
    probe = socket.create_server(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()  # nothing listens there now
    with VscardServerThread(EchoCard()) as front:
        front.call(lambda f: f.connect_tcp("127.0.0.1", port))
        time.sleep(0.7)  # a failed attempt or two
        qemu = socket.create_server(("127.0.0.1", port))
        qemu.settimeout(20)
        sock, _ = qemu.accept()
        assert QemuPeer(sock).handshake() == DEFAULT_ATR
        qemu.close()


def test_a_blocking_card_runs_off_the_loop() -> None:
    card = EchoCard(blocking=True, sleep=time.sleep, slow_seconds=1.0)
    with VscardServerThread(card) as front:
        address = front.listen_tcp()
        peer = QemuPeer.connect(address)
        peer.handshake()
        peer.send(wire.Apdu(SLOW, 0))
        time.sleep(0.2)
        t0 = time.monotonic()
        # The loop still answers while the card sleeps on its thread: status, and a
        # second connection's whole handshake.
        front.call(VscardServer.status)
        QemuPeer.connect(address).handshake(card=False)
        assert time.monotonic() - t0 < 0.5
        answer = peer.recv()
        assert answer == wire.Apdu(b"\x90\x00", 0)


def test_allow_list() -> None:
    with VscardServerThread(EchoCard(), allow=lambda host: False) as front:
        peer = QemuPeer.connect(front.listen_tcp())
        assert peer.at_eof()
        assert front.call(lambda f: f.refused) == 1


def test_protocol_error_closes_that_connection_only(front: VscardServerThread) -> None:
    address = front.listen_tcp()
    good = QemuPeer.connect(address)
    good.handshake()
    bad = QemuPeer.connect(address)
    bad.expect(wire.Init)
    bad.sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    # "GET " is the type, "/ HT" the reader id, "TP/1" an absurd length: answered, closed.
    assert bad.recv() == wire.Error(wire.ErrorCode.GENERAL_ERROR, int.from_bytes(b"/ HT", "big"))
    assert bad.at_eof()
    assert good.apdu(ECHO) == b"\x01\x02\x03\x90\x00"


def _flood(peer: QemuPeer, stop: threading.Event) -> threading.Thread:
    """Send APDUs with long answers, 4 at a time, and never read."""
    big = wire.encode(wire.Apdu(bytes.fromhex("80120174"), 0))  # 372 + 2 bytes back

    def flood() -> None:
        try:
            while not stop.is_set():
                peer.sock.sendall(big * 4)
                time.sleep(0.005)
        except OSError:
            pass

    t = threading.Thread(target=flood, daemon=True)
    t.start()
    return t


def test_a_peer_that_does_not_read_over_unix_is_cut_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Over a UNIX socket its unread replies fill its receive queue, then our transport,
    until ``max_write_buffer``: then it is cut off (max_pending lifted, so that only the
    write bound can act). Sampled meanwhile, what we hold stays under the bound."""
    bound = 16 * 1024
    path = tmp_path / "v.sock"
    with VscardServerThread(EchoCard(), max_write_buffer=bound, max_pending=10**6) as front:
        front.run(lambda f: f.listen_unix(path))
        hog = QemuPeer.connect(str(path))
        hog.handshake()
        stop = threading.Event()
        t = _flood(hog, stop)
        peak = 0
        end = time.monotonic() + 60
        while conns := front.call(lambda f: f.status().connections):
            assert time.monotonic() < end, "the peer that does not read is still connected"
            peak = max(peak, *(c.unsent + c.buffered for c in conns))
            time.sleep(0.005)
        stop.set()
        t.join(10)
        # Past the bound by at most what one read (64 KiB of APDUs) brings back.
        assert peak <= bound + 65536 // 16 * 400, peak
        assert "does not read its replies" in caplog.text
        assert QemuPeer.connect(str(path)).handshake() == DEFAULT_ATR


def test_a_peer_that_does_not_read_over_tcp_stays_bounded() -> None:
    """Over TCP the kernel holds it back (its zero window stalls its own sends, or its
    bursts hit the pending bound): either way what we hold for it stays bounded, and
    another QEMU is served meanwhile."""
    with VscardServerThread(EchoCard(), max_write_buffer=16 * 1024) as front:
        address = front.listen_tcp()
        hog = QemuPeer.connect(address)
        hog.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        hog.handshake()
        stop = threading.Event()
        t = _flood(hog, stop)
        good = QemuPeer.connect(address)
        good.handshake(card=False)
        peak = 0
        end = time.monotonic() + 3
        while time.monotonic() < end:
            for c in front.call(lambda f: f.status().connections):
                peak = max(peak, c.unsent + c.buffered)
            time.sleep(0.01)
        assert peak <= 16 * 1024 + 65536 // 16 * 400, peak
        stop.set()
        t.join(10)
        hog.close()
        good.expect(wire.Atr)  # the card moves on once the hog is gone
        good.send(wire.Error(OK, 0))
        assert good.apdu(ECHO) == b"\x01\x02\x03\x90\x00"
