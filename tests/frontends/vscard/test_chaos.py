"""Chaos over real loopback TCP: one well-behaved QEMU keeps working while a storm of
misbehaving peers hits the same VSCard reader.

The good peer connects first, so it holds the card, and does APDU round trips (echoes,
answers of every length up to QEMU's 374-byte bound) the whole time. Meanwhile a bounded
number of abusive connections (``STORM_CONNECTIONS`` over at most ``STORM_SECONDS``,
only 127.0.0.1) send garbage, cut a message off and vanish, declare absurd lengths, send
a wrong magic or a type no host sends, pipeline more APDUs than the bound, sit on half a
header, half-close, or take the handshake and then flood APDUs without reading a byte.

Checked: every exchange of the good peer succeeds with the right data; no internal error
is logged; what the server holds (unparsed input, unsent output, queued card work) stays
under a fixed bound, sampled on the server's loop throughout; afterwards only the good
peer's connection is left, and it still holds the card.
"""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.frontends.vscard.helpers import OK, QemuPeer
from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.client import MAX_RESPONSE
from usbccid.frontends.vscard.server import VscardServer, VscardServerThread

STORM_CONNECTIONS = 150
STORM_SECONDS = 8.0
STORM_WORKERS = 10
SOCKET_TIMEOUT = 2.0
#: What the server may hold for all its peers at a sampled moment: per peer one read
#: (64 KiB) of input and its answers, plus the bounded write buffer (1 MiB).
STATE_BOUND = 8 << 20


def _connect(address: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(SOCKET_TIMEOUT)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _drain(sock: socket.socket, limit: float = SOCKET_TIMEOUT) -> bool:
    """Read until the server closes (True) or ``limit`` passes (False)."""
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except ConnectionError:
        return True  # a reset is a close too (we closed with its bytes unread)
    except TimeoutError:
        return False
    return False


def _frame(kind: int, reader_id: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return kind.to_bytes(4, "big") + reader_id.to_bytes(4, "big") + n.to_bytes(4, "big") + payload


INIT = wire.encode(wire.Init())
OK_ANSWER = wire.encode(wire.Error(OK, 0))


def garbage(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(rng.randbytes(rng.randrange(1, 4000)))
        _drain(s, 0.5)


def cut_off(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        message = INIT + _frame(7, 0, rng.randbytes(300))
        s.sendall(message[: rng.randrange(1, len(message))])


def absurd_length(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(INIT + _frame(7, 0, b"", length=rng.choice([1 << 17, 0x7FFFFFFF, 0xFFFFFFFF])))
        assert _drain(s), "an absurd length must close the connection"


def wrong_magic(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(wire.encode(wire.Init(magic=b"DCSV")))
        assert _drain(s), "a wrong magic must close the connection"


def client_type(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(INIT + wire.encode(wire.Atr(b"\x3b\x00", 0)))
        assert _drain(s), "a type no host sends must close the connection"


def pipeline(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(INIT + OK_ANSWER * 2 + _frame(7, 0, b"\x80\x10\x00\x00\x01\x00") * 200)
        _drain(s, 1.0)


def half_header(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(INIT[:5])
        time.sleep(rng.uniform(0.1, 0.5))


def half_close(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address) as s:
        s.sendall(INIT + OK_ANSWER * 2)
        s.shutdown(socket.SHUT_WR)
        _drain(s, 1.0)


def never_reads(address: tuple[str, int], rng: random.Random) -> None:
    with _connect(address, rcvbuf=4096) as s:
        s.sendall(INIT + OK_ANSWER * 2)
        apdu = _frame(7, 0, bytes([0x80, 0x12, 0x01, MAX_RESPONSE - 2 - 256]))
        end = time.monotonic() + rng.uniform(0.3, 1.5)
        try:
            while time.monotonic() < end:
                s.sendall(apdu * 8)
        except OSError:
            pass  # cut off, or our own send buffer full (SOCKET_TIMEOUT)


def connect_close(address: tuple[str, int], rng: random.Random) -> None:
    _connect(address).close()


ABUSES: list[Callable[[tuple[str, int], random.Random], None]] = [
    garbage,
    cut_off,
    absurd_length,
    wrong_magic,
    client_type,
    pipeline,
    half_header,
    half_close,
    never_reads,
    connect_close,
]


def state_bytes(server: VscardServer) -> int:
    """What the server holds for its peers right now (on its loop): unparsed input, unsent
    output, and queued card work (an APDU and its answer: under 400 bytes each, bar the
    extended ones nobody sends here)."""
    held = sum(c.unsent + c.buffered for c in server.status().connections)
    return held + sum(c.client.pending * 400 for c in server._connections)


@pytest.fixture
def rig() -> Iterator[VscardServerThread]:
    with VscardServerThread(EchoCard(), name="chaos") as t:
        yield t


def test_storm_leaves_the_good_qemu_alone(
    rig: VscardServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "usbccid.frontends.vscard")
    address = rig.listen_tcp()
    good = QemuPeer.connect(address)
    assert good.handshake() is not None
    rng = random.Random(20261203)
    stop = threading.Event()
    exchanges = 0
    failures: list[str] = []

    def good_traffic() -> None:
        nonlocal exchanges
        local = random.Random(7)
        while not stop.is_set():
            data = local.randbytes(local.randrange(0, 200))
            try:
                answer = good.apdu(bytes([0x80, 0x10, 0, 0, len(data)]) + data)
                assert answer == data + b"\x90\x00", "echo"
                n = local.randrange(0, MAX_RESPONSE - 1)
                answer = good.apdu(bytes([0x80, 0x12, n >> 8, n & 0xFF]))
                assert answer == bytes(i & 0xFF for i in range(n)) + b"\x90\x00", n
            except Exception as e:  # reported below, the storm goes on
                failures.append(repr(e))
                return
            exchanges += 2

    samples: list[int] = []

    def sampler() -> None:
        while not stop.is_set():
            samples.append(rig.call(state_bytes))
            time.sleep(0.05)

    threads = [threading.Thread(target=good_traffic), threading.Thread(target=sampler)]
    for t in threads:
        t.start()
    t0 = time.monotonic()

    def one(i: int) -> None:
        if time.monotonic() - t0 > STORM_SECONDS:
            return
        abuse = ABUSES[i % len(ABUSES)]
        try:
            abuse(address, random.Random(rng.random()))
        except AssertionError as e:
            failures.append(f"{abuse.__name__}: {e}")
        except OSError:
            pass  # the server cut it off: what it deserved

    with ThreadPoolExecutor(STORM_WORKERS) as pool:
        list(pool.map(one, range(STORM_CONNECTIONS)))
    stop.set()
    for t in threads:
        t.join(30)

    assert not failures, failures
    assert exchanges > 20, exchanges
    print(f"good exchanges {exchanges}, peak state {max(samples)} bytes, {len(samples)} samples")
    assert max(samples) <= STATE_BOUND, max(samples)
    assert "internal error" not in caplog.text
    assert "Traceback" not in caplog.text
    # The storm is gone; only the good peer is left, with the card, and it still works.
    deadline = time.monotonic() + 15
    while len(conns := rig.call(lambda s: s.status().connections)) > 1:
        assert time.monotonic() < deadline, [c.peer for c in conns]
        time.sleep(0.1)
    (conn,) = conns
    assert conn.holds_card
    assert conn.client.state == "inserted"
    assert good.apdu(bytes.fromhex("8010000003010203")) == b"\x01\x02\x03\x90\x00"
