"""Chaos over real loopback TCP: one well-behaved client keeps working while a storm of
misbehaving clients hits the same server.

The server exports two CCID readers, each with an EchoCard (1-2's card is ``blocking``,
so its work runs on threads, where a connection may vanish while the card works). A good
client (:class:`usbccid.host.Session`) imports 1-1 and does CCID round trips (IccPowerOn,
XfrBlock echo and long answers) the whole time. Meanwhile a bounded number of abusive
connections (``STORM_CONNECTIONS`` over at most ``STORM_SECONDS``, only 127.0.0.1) send
garbage, cut messages off, import 1-2 and vanish with URBs parked, declare huge lengths,
half-close, never read, flood, unlink at random, or sit on a half-sent header.

Checked: every exchange of the good client succeeds with the right data; no internal
error is logged; the state the server holds (unparsed input, unsent output, transport
write buffers, parked URBs, queued CCID replies) stays under a fixed bound, sampled on
the server's own loop throughout; afterwards only the good client's connection is
left, 1-2 is free and importable and works, and nothing is parked or queued for it.
"""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from tests.usbip.helpers import UsbipClient
from usbccid.ccid import CcidReader
from usbccid.ccid.identity import make_identity
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import (
    Command,
    DataBlock,
    GetSlotStatus,
    IccPowerOn,
    XfrBlock,
    build_command,
    parse_reply,
)
from usbccid.frontends.usbip.server import ServerThread
from usbccid.host.session import Session
from usbccid.usbip import wire
from usbccid.usbip.device import MAX_PARKED_URBS, VirtualDevice
from usbccid.usbip.exporter import Exporter

HOST = "127.0.0.1"
BULK_OUT, BULK_IN, INTERRUPT_IN = 0x01, 0x82, 0x83
LIBCCID_READ = 10 + 65546
DEVID_1_2 = 0x0001_0002
IN, OUT = wire.Direction.IN, wire.Direction.OUT

STORM_CONNECTIONS = 200
STORM_SECONDS = 10.0
STORM_WORKERS = 12
SOCKET_TIMEOUT = 5.0  # a bound on how long a close may take, generous for a loaded machine
IMPORT_PATIENCE = 1.0  # seconds an abuser retries a busy import of 1-2
# The server-side state may hold at most this much at any sampled moment. A stalled
# reader's RET_SUBMITs are the bulk: MAX_PARKED_URBS completions of up to ~4 KiB here.
STATE_BOUND = 16 << 20


def echo_apdu(data: bytes) -> bytes:
    return bytes.fromhex("80100000") + bytes([len(data)]) + data


def length_apdu(n: int) -> bytes:
    return bytes([0x80, 0x12, n >> 8, n & 0xFF])


def expected_length_answer(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n)) + b"\x90\x00"


# -- the server and its state ------------------------------------------------------------


@dataclass
class Rig:
    st: ServerThread
    address: tuple[str, int]
    readers: list[CcidReader]
    exporter: Exporter
    samples: list[int] = field(default_factory=list)

    def server_state_bytes(self) -> int:
        """What the server holds for its peers right now; call on the server loop."""
        total = 0
        for peer in list(self.st._server.peers):
            conn = peer.conn
            assert conn is not None
            total += len(conn.protocol._buffer) + len(conn._out)
            transport = peer.transport
            if transport is not None and not transport.is_closing():
                total += transport.get_write_buffer_size()
        for device in self.exporter.devices.values():
            total += device.parked_count * 64  # a parked URB record, generously
        for reader in self.readers:
            total += len(reader._rx) + sum(len(o.data) for o in reader._out)
        return total

    def sample(self) -> int:
        value = self.st.call(self.server_state_bytes)
        self.samples.append(value)
        return value

    def peer_count(self) -> int:
        """Connections the server still holds: peers, and their card jobs' tasks."""
        server = self.st._server
        return self.st.call(lambda: max(len(server.peers), sum(len(p.tasks) for p in server.peers)))


@pytest.fixture
def rig() -> Iterator[Rig]:
    readers = [
        CcidReader([EchoCard()], identity=make_identity(serial_number="CHAOS001")),
        CcidReader([EchoCard(blocking=True)], identity=make_identity(serial_number="CHAOS002")),
    ]
    exporter = Exporter([VirtualDevice(r.identity, r) for r in readers])
    st = ServerThread(exporter)
    address = st.start()
    try:
        yield Rig(st, address, readers, exporter)
    finally:
        st.stop()


# -- the good client ---------------------------------------------------------------------


class GoodClient:
    """libccid-style traffic on one imported reader: one command, then its reply."""

    def __init__(self, address: tuple[str, int], busid: str) -> None:
        self.session = Session(address[0], address[1], busid=busid, timeout=10.0)
        self.seq = 0
        self.exchanges = 0

    def close(self) -> None:
        self.session.close()

    def exchange(self, make: Callable[[int], Command]) -> DataBlock:
        self.seq = (self.seq + 1) & 0xFF
        command = make(self.seq)
        out = self.session.submit(BULK_OUT, data=build_command(command), timeout=10.0)
        assert out.status == 0
        assert out.actual_length == len(build_command(command))
        reply_urb = self.session.submit(BULK_IN, length=LIBCCID_READ, timeout=10.0)
        assert reply_urb.status == 0
        reply = parse_reply(reply_urb.data)
        assert isinstance(reply, DataBlock), reply
        assert (reply.slot, reply.seq) == (0, self.seq)
        assert reply.error == 0, reply
        self.exchanges += 1
        return reply

    def power_on(self) -> None:
        reply = self.exchange(lambda seq: IccPowerOn(0, seq))
        assert reply.data == EchoCard().atr

    def round_trips(self, rng: random.Random) -> None:
        payload = rng.randbytes(rng.randrange(0, 250))
        reply = self.exchange(lambda seq: XfrBlock(0, seq, echo_apdu(payload)))
        assert reply.data == payload + b"\x90\x00"
        n = rng.choice([0, 1, 255, 256, 4096, 65535])
        reply = self.exchange(lambda seq: XfrBlock(0, seq, length_apdu(n)))
        assert reply.data == expected_length_answer(n)


# -- the misbehaving clients -------------------------------------------------------------


def _connect(address: tuple[str, int], rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        # Before connect, so the window is small from the start: what the server sends
        # then piles up in the server's own buffers, where the sampler sees it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(SOCKET_TIMEOUT)
    try:
        sock.connect(address)
    except BaseException:
        sock.close()
        raise
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_until_closed(sock: socket.socket, limit: float = SOCKET_TIMEOUT) -> tuple[bytes, bool]:
    """(what arrived, whether the server closed within ``limit`` seconds)."""
    data = bytearray()
    deadline = time.monotonic() + limit
    try:
        while time.monotonic() < deadline:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = sock.recv(65536)
            if not chunk:
                return bytes(data), True
            data += chunk
    except (ConnectionResetError, BrokenPipeError):
        return bytes(data), True
    except TimeoutError:
        pass
    return bytes(data), False


def _import(sock: socket.socket, busid: str) -> int:
    """OP_REQ_IMPORT; the status (0 OK, 2 busy). The reply must be exactly right."""
    sock.settimeout(SOCKET_TIMEOUT)
    sock.sendall(wire.encode(wire.OpReqImport(busid)))
    head = _recv_exact(sock, 8)
    reply = wire.parse_op_rep_import(
        head if head[4:8] != bytes(4) else head + _recv_exact(sock, 312)
    )
    if reply.status == wire.OpStatus.OK:
        assert reply.device is not None
        assert reply.device.busid == busid
    else:
        assert reply.status == wire.OpStatus.DEV_BUSY, reply
    return reply.status


def _connect_import(
    address: tuple[str, int], busid: str, rcvbuf: int | None = None
) -> socket.socket | None:
    """A connection that imported ``busid``, retrying for a while when it is busy (the
    other abusers hold it); None if it stayed busy."""
    deadline = time.monotonic() + IMPORT_PATIENCE
    while True:
        sock = _connect(address, rcvbuf)
        try:
            if _import(sock, busid) == wire.OpStatus.OK:
                return sock
        except BaseException:
            sock.close()
            raise
        sock.close()
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return bytes(data)


def _abort(sock: socket.socket) -> None:
    """Close with a RST (SO_LINGER 0): the rudest disconnect there is."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def garbage(address: tuple[str, int], rng: random.Random) -> str:
    with _connect(address) as sock:
        # Not version 0x0111: the op header is refused at once and the connection closed.
        junk = bytes([0x42]) + rng.randbytes(rng.randrange(7, 4000))
        with contextlib.suppress(ConnectionError):
            sock.sendall(junk)
        _, closed = _read_until_closed(sock)
        assert closed, "the server kept a garbage connection open"
    return "garbage"


def cut_mid_payload(address: tuple[str, int], rng: random.Random) -> str:
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    with sock:
        urb = UsbipClient(devid=DEVID_1_2)
        data = build_command(XfrBlock(0, 1, echo_apdu(rng.randbytes(100))))
        _, raw = urb.submit(1, OUT, len(data), data=data)
        sock.sendall(raw[: rng.randrange(49, len(raw))])  # the header and part of the payload
    return "cut"


def park_and_vanish(address: tuple[str, int], rng: random.Random) -> str:
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    try:
        urb = UsbipClient(devid=DEVID_1_2)
        pdus = b""
        for _ in range(rng.randrange(1, 200)):
            _, raw = urb.submit(rng.choice([2, 3]), IN, rng.choice([8, 10, 64, LIBCCID_READ]))
            pdus += raw
        sock.sendall(pdus)
        if rng.random() < 0.5:  # and a command whose card work runs on a thread
            cmd = build_command(XfrBlock(0, 2, length_apdu(4096)))
            sock.sendall(urb.submit(1, OUT, len(cmd), data=cmd)[1])
    finally:
        _abort(sock)
    return "parked"


def huge_length(address: tuple[str, int], rng: random.Random) -> str:
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    with sock:
        length = rng.choice([(1 << 20) + 1, 0x7FFF_FFFF, 0xFFFF_FFFF])
        direction = rng.choice([IN, OUT])
        cmd = wire.CmdSubmit(1, DEVID_1_2, direction, rng.choice([1, 2]), length)
        # encode() would refuse an OUT whose data does not match: build the header by hand
        header = wire.encode(wire.CmdSubmit(1, DEVID_1_2, IN, cmd.ep, length))
        header = header[:12] + int(direction).to_bytes(4, "big") + header[16:]
        sock.sendall(header + rng.randbytes(rng.randrange(0, 2000)))
        _, closed = _read_until_closed(sock)
        assert closed, "a huge declared length did not close the connection"
    return "huge"


def half_close(address: tuple[str, int], rng: random.Random) -> str:
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    with sock:
        urb = UsbipClient(devid=DEVID_1_2)
        n = rng.randrange(1, 20)
        for _ in range(n):
            cmd = build_command(GetSlotStatus(0, 1))
            sock.sendall(urb.submit(1, OUT, len(cmd), data=cmd)[1])
        sock.sendall(urb.submit(2, IN, LIBCCID_READ)[1])  # parked or completed
        sock.shutdown(socket.SHUT_WR)
        data, closed = _read_until_closed(sock)
        assert closed, "EOF at a message boundary did not close the connection"
        # Every OUT command was answered before the close (the IN maybe too).
        replies = urb.feed(data)
        assert len(replies) in (n, n + 1), (n, replies)
        assert all(r.status == 0 for r in replies)
    return "half-close"


def stall_reading(address: tuple[str, int], rng: random.Random) -> str:
    """Never read a byte: many IN submits, commands that complete them, then vanish."""
    sock = _connect_import(address, "1-2", rcvbuf=4096)
    if sock is None:
        return "busy"
    try:
        urb = UsbipClient(devid=DEVID_1_2)
        overflow = rng.random() < 0.3
        count = MAX_PARKED_URBS + 50 if overflow else rng.randrange(100, 600)
        sock.settimeout(1.0)
        with contextlib.suppress(OSError):
            pdus = b"".join(urb.submit(2, IN, LIBCCID_READ)[1] for _ in range(count))
            sock.sendall(pdus)
            for seq in range(min(count, MAX_PARKED_URBS)):
                cmd = build_command(XfrBlock(0, seq & 0xFF, length_apdu(4096)))
                sock.sendall(urb.submit(1, OUT, len(cmd), data=cmd)[1])
        time.sleep(rng.random() * 0.5)
    finally:
        _abort(sock)
    return "stall"


def flood_without_reading(address: tuple[str, int], rng: random.Random) -> str:
    """OUT commands with small answers and no IN URB ever: the replies queue up."""
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    try:
        urb = UsbipClient(devid=DEVID_1_2)
        cmd = build_command(GetSlotStatus(0, 1))
        with contextlib.suppress(OSError):
            sock.sendall(b"".join(urb.submit(1, OUT, len(cmd), data=cmd)[1] for _ in range(2000)))
    finally:
        _abort(sock)
    return "flood"


def unlink_storm(address: tuple[str, int], rng: random.Random) -> str:
    sock = _connect_import(address, "1-2")
    if sock is None:
        return "busy"
    with sock:
        urb = UsbipClient(devid=DEVID_1_2)
        parked: list[int] = []  # maybe completed at once (a NotifySlotChange is due)
        pdus = b""
        for _ in range(rng.randrange(1, 50)):
            seq, raw = urb.submit(rng.choice([2, 3]), IN, 64)
            parked.append(seq)
            pdus += raw
        unlinks = []
        for _ in range(rng.randrange(1, 60)):
            victim = rng.choice([*parked, rng.randrange(1 << 32), urb.seqnum + 1])
            seq, raw = urb.unlink(victim)
            unlinks.append((seq, victim))
            pdus += raw
        sock.sendall(pdus)
        # Each unlink is answered; -ECONNRESET exactly once per parked URB.
        rets: list[wire.RetUnlink] = []
        while len(rets) < len(unlinks):
            data = sock.recv(65536)
            assert data, "closed before every CMD_UNLINK was answered"
            rets += [r for r in urb.feed(data) if isinstance(r, wire.RetUnlink)]
        assert len(rets) == len(unlinks)
        cancelled = [
            victim
            for seq, victim in unlinks
            if any(r.seqnum == seq and r.status == -104 for r in rets)
        ]
        assert sorted(cancelled) == sorted(set(cancelled))
        assert set(cancelled) <= set(parked)
    return "unlink"


def slow_header(address: tuple[str, int], rng: random.Random) -> str:
    with _connect(address) as sock:
        raw = wire.encode(wire.OpReqImport("1-2"))
        sock.sendall(raw[: rng.randrange(1, len(raw))])
        time.sleep(rng.random() * 0.3)
    return "slow"


def busy_or_devlist(address: tuple[str, int], rng: random.Random) -> str:
    with _connect(address) as sock:
        if rng.random() < 0.5:
            # 1-1 is the good client's: refused with ST_DEV_BUSY, and the rest ignored.
            assert _import(sock, "1-1") == wire.OpStatus.DEV_BUSY
            return "busy-1-1"
        sock.sendall(wire.encode(wire.OpReqDevlist()))
        data, closed = _read_until_closed(sock)
        assert closed
        reply = wire.parse_op_rep_devlist(data)
        assert "1-1" not in [entry.device.busid for entry in reply.devices]
    return "devlist"


ABUSERS: list[Callable[[tuple[str, int], random.Random], str]] = [
    garbage,
    cut_mid_payload,
    park_and_vanish,
    huge_length,
    half_close,
    stall_reading,
    flood_without_reading,
    unlink_storm,
    slow_header,
    busy_or_devlist,
]


# -- the test ----------------------------------------------------------------------------


@pytest.mark.slow
def test_good_client_survives_a_storm(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="usbccid")
    good = GoodClient(rig.address, "1-1")
    good.power_on()
    stop = threading.Event()
    good_error: list[BaseException] = []

    def good_loop() -> None:
        rng = random.Random(1)
        try:
            while not stop.is_set():
                good.round_trips(rng)
        except BaseException as e:  # reported by the main thread
            good_error.append(e)

    def sampler() -> None:
        while not stop.is_set():
            rig.sample()
            time.sleep(0.05)

    good_thread = threading.Thread(target=good_loop, name="good-client")
    sample_thread = threading.Thread(target=sampler, name="sampler")
    good_thread.start()
    sample_thread.start()

    outcomes: dict[str, int] = {}
    failures: list[str] = []
    deadline = time.monotonic() + STORM_SECONDS

    def one(index: int) -> None:
        if time.monotonic() > deadline:
            return
        abuser = ABUSERS[index % len(ABUSERS)]
        try:
            outcome = abuser(rig.address, random.Random(index))
        except AssertionError as e:
            failures.append(f"{abuser.__name__} #{index}: {e}")
            return
        except OSError as e:  # the server may close on us at any moment: fine
            outcome = f"{abuser.__name__}: {type(e).__name__}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1

    started = time.monotonic()
    try:
        with ThreadPoolExecutor(STORM_WORKERS) as pool:
            list(pool.map(one, range(STORM_CONNECTIONS)))
        storm_seconds = time.monotonic() - started
        # The storm is over; give the good client a little more time on its own.
        time.sleep(0.3)
    finally:
        stop.set()
        good_thread.join(timeout=30)
        sample_thread.join(timeout=30)
    try:
        assert not good_error, good_error
        assert not failures, failures
        assert good.exchanges > 10, good.exchanges
        ran = sum(outcomes.values())
        assert ran >= STORM_CONNECTIONS // 4, (ran, outcomes, storm_seconds)

        # Bounded: the sampled server-side state never went over the bound.
        assert rig.samples, "no samples"
        assert max(rig.samples) < STATE_BOUND, max(rig.samples)

        # Afterwards only the good client is connected; nothing left for the others.
        deadline = time.monotonic() + 10
        while rig.peer_count() > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert rig.peer_count() == 1
        status = {s.busid: s.imported_by for s in rig.exporter.status()}
        assert status["1-1"] is not None
        assert status["1-2"] is None
        device = rig.exporter.device("1-2")
        assert rig.st.call(lambda: device.parked_count) == 0
        assert rig.st.call(lambda: len(rig.readers[1]._out) + len(rig.readers[1]._rx)) == 0

        # 1-2 is importable again and works; the good client still works.
        second = GoodClient(rig.address, "1-2")
        try:
            second.power_on()
            second.round_trips(random.Random(2))
        finally:
            second.close()
        good.round_trips(random.Random(3))
    finally:
        good.close()

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, [r.getMessage() for r in errors]
    print(  # shown with -s: what the storm did
        f"storm: {ran} connections in {storm_seconds:.1f}s {sorted(outcomes.items())}; "
        f"good client: {good.exchanges} exchanges; "
        f"server state peak {max(rig.samples)} bytes over {len(rig.samples)} samples"
    )


def test_replies_nobody_reads_stay_bounded(rig: Rig) -> None:
    """A client that sends commands but never an IN URB must not make the server hold an
    ever-growing queue of replies: each ~62-byte XfrBlock below asks for a 64 KiB answer.

    The client reads its RET_SUBMITs, so TCP back-pressure never stops the server from
    reading more commands. A real reader NAKs bulk-OUT while its reply is unread; here the
    bound could be "at most N unread replies, then the command fails or the connection
    closes". Whatever the answer, the held state must stay bounded.
    """
    sock = _connect_import(rig.address, "1-2")
    assert sock is not None
    with sock:
        urb = UsbipClient(devid=DEVID_1_2)
        power_on = build_command(IccPowerOn(0, 0))
        sock.sendall(urb.submit(1, OUT, len(power_on), data=power_on)[1])
        sent = 0
        with contextlib.suppress(OSError):
            for seq in range(1, 200):
                cmd = build_command(XfrBlock(0, seq, length_apdu(65535)))
                sock.sendall(urb.submit(1, OUT, len(cmd), data=cmd)[1])
                urb.feed(_recv_exact(sock, 48))  # RET_SUBMIT of the OUT URB: read at once
                sent += 1
        held = rig.sample()
        # 200 commands of 62 bytes: a fair bound is a few replies, not all 200 of them.
        assert held < 4 * (10 + 65537), f"{held} bytes held after {sent} unread replies"
