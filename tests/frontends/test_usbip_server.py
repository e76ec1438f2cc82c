"""The asyncio shell over real loopback TCP, and the real `usbip` tool as a client."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import require_tool
from tests.usbip.helpers import UsbipClient, setup
from usbccid.frontends.usbip.server import ServerThread, serve
from usbccid.jobs import Job
from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import DeviceIdentity, SetupPacket
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, REQ_JOB, LoopbackFunction

IN, OUT = wire.Direction.IN, wire.Direction.OUT
TIMEOUT = 5.0


class TcpClient:
    """A blocking USB/IP client over TCP, for tests."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.sock = socket.create_connection(address, timeout=TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.urb = UsbipClient()

    def close(self) -> None:
        self.sock.close()

    def recv_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def closed_by_server(self) -> bool:
        """True if the server closes the connection (EOF or reset) within the timeout."""
        try:
            while self.sock.recv(65536):
                pass
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return True

    def devlist(self) -> wire.OpRepDevlist:
        self.sock.sendall(wire.encode(wire.OpReqDevlist()))
        data = self.recv_exact(12)
        ndev = int.from_bytes(data[8:12], "big")
        for _ in range(ndev):
            device = self.recv_exact(312)
            data += device + self.recv_exact(4 * device[311])
        return wire.parse_op_rep_devlist(data)

    def import_(self, busid: str = "1-1") -> wire.OpRepImport:
        self.sock.sendall(wire.encode(wire.OpReqImport(busid)))
        head = self.recv_exact(8)
        if head[4:8] != bytes(4):
            return wire.parse_op_rep_import(head)
        reply = wire.parse_op_rep_import(head + self.recv_exact(312))
        assert reply.device is not None
        self.urb.devid = reply.device.devid
        return reply

    def reply(self) -> wire.RetSubmit | wire.RetUnlink:
        data = self.recv_exact(48)
        header = wire.parse_urb_header(data)
        size = 0
        if (
            isinstance(header.message, wire.RetSubmit)
            and header.message.seqnum in self.urb.in_seqnums
        ):
            size = header.message.actual_length
        (reply,) = self.urb.feed(data + self.recv_exact(size))
        return reply

    def submit(self, ep: int, direction: wire.Direction, length: int, data: bytes = b"") -> int:
        seq, raw = self.urb.submit(ep, direction, length, data=data)
        self.sock.sendall(raw)
        return seq

    def control(self, s: SetupPacket, data: bytes = b"") -> wire.RetSubmit:
        seq, raw = self.urb.control(s, data)
        self.sock.sendall(raw)
        reply = self.reply()
        assert isinstance(reply, wire.RetSubmit)
        assert reply.seqnum == seq
        return reply

    def echo(self, payload: bytes) -> bytes:
        out = self.submit(1, OUT, len(payload), payload)
        assert self.reply() == wire.RetSubmit(out, 0, len(payload))
        seq = self.submit(2, IN, len(payload) + 16)
        reply = self.reply()
        assert isinstance(reply, wire.RetSubmit)
        assert reply.seqnum == seq
        return reply.data


def identity(n: int) -> DeviceIdentity:
    return DeviceIdentity(0x1209, 0x0001, 0x0100, "usbccid", f"loopback {n}", f"{n:04d}")


@pytest.fixture
def functions() -> list[LoopbackFunction]:
    return [LoopbackFunction(), LoopbackFunction(blocking_jobs=True)]


@pytest.fixture
def server(functions: list[LoopbackFunction]) -> Iterator[tuple[ServerThread, tuple[str, int]]]:
    exporter = Exporter([VirtualDevice(identity(i), f) for i, f in enumerate(functions)])
    st = ServerThread(exporter)
    address = st.start()
    try:
        yield st, address
    finally:
        st.stop()


@pytest.fixture
def connect(
    server: tuple[ServerThread, tuple[str, int]],
) -> Iterator[Callable[[], TcpClient]]:
    clients: list[TcpClient] = []

    def make() -> TcpClient:
        client = TcpClient(server[1])
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_devlist_then_close(connect: Callable[[], TcpClient]) -> None:
    client = connect()
    reply = client.devlist()
    assert [e.device.busid for e in reply.devices] == ["1-1", "1-2"]
    assert client.closed_by_server()


def test_import_enumerate_echo(connect: Callable[[], TcpClient]) -> None:
    client = connect()
    assert client.import_("1-1").status == wire.OpStatus.OK
    desc = client.control(setup(0x80, 6, 0x0100, 0, 64))
    assert desc.data[:2] == b"\x12\x01"
    assert client.control(setup(0x00, 9, 1)).status == 0
    assert client.echo(b"hello") == b"hello"
    big = bytes(range(256)) * 200  # 51 200 bytes, split by TCP
    assert client.echo(big) == big


def test_parked_interrupt_completed_from_outside(
    server: tuple[ServerThread, tuple[str, int]],
    connect: Callable[[], TcpClient],
    functions: list[LoopbackFunction],
) -> None:
    st, _ = server
    client = connect()
    client.import_("1-1")
    seq = client.submit(3, IN, 8)
    client.sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        client.sock.recv(1)  # parked: nothing comes back
    client.sock.settimeout(TIMEOUT)
    st.call(lambda: functions[0].notify(b"\x50\x03"))
    assert client.reply() == wire.RetSubmit(seq, 0, 2, b"\x50\x03")


def test_unlink_over_tcp(connect: Callable[[], TcpClient]) -> None:
    client = connect()
    client.import_("1-1")
    victim = client.submit(3, IN, 8)
    seq, raw = client.urb.unlink(victim)
    client.sock.sendall(raw)
    assert client.reply() == wire.RetUnlink(seq, -104)


@pytest.mark.parametrize("busid", ["1-1", "1-2"])  # 1-2 runs its jobs on a thread
def test_jobs(connect: Callable[[], TcpClient], busid: str) -> None:
    client = connect()
    client.import_(busid)
    seq = client.submit(3, IN, 8)
    reply = client.control(setup(0x41, REQ_JOB, 0, 0, 3), b"abc")
    assert reply.status == 0
    assert client.reply() == wire.RetSubmit(seq, 0, 3, b"cba")


def test_busy_import_and_reimport_after_disconnect(
    server: tuple[ServerThread, tuple[str, int]], connect: Callable[[], TcpClient]
) -> None:
    st, _ = server
    first = connect()
    assert first.import_("1-1").status == wire.OpStatus.OK
    first.submit(1, OUT, 5, b"stale")
    second = connect()
    assert second.import_("1-1").status == wire.OpStatus.DEV_BUSY
    assert second.closed_by_server()
    status = st.call(lambda: st.exporter.status())
    assert status[0].imported_by is not None
    first.close()
    wait_until(lambda: st.call(lambda: st.exporter.status())[0].imported_by is None)
    third = connect()
    assert third.import_("1-1").status == wire.OpStatus.OK
    assert third.echo(b"fresh") == b"fresh"  # "stale" was dropped by the reset


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xde\xad\xbe\xef" * 12,  # unknown command
        wire.encode(wire.RetUnlink(1, 0)),  # a reply sent by the client
        wire.encode(wire.CmdSubmit(1, 0x0009_0009, IN, 2, 8)),  # not the imported devid
    ],
)
def test_misbehaving_client_does_not_disturb_another(
    connect: Callable[[], TcpClient], garbage: bytes
) -> None:
    good = connect()
    good.import_("1-1")
    parked = good.submit(3, IN, 8)
    bad = connect()
    bad.import_("1-2")
    bad.sock.sendall(garbage)
    assert bad.closed_by_server()
    assert good.echo(b"still here") == b"still here"
    seq, raw = good.urb.unlink(parked)
    good.sock.sendall(raw)
    assert good.reply() == wire.RetUnlink(seq, -104)


def test_bad_version_before_import(connect: Callable[[], TcpClient]) -> None:
    bad = connect()
    bad.sock.sendall(bytes.fromhex("0106 8005 00000000"))
    assert bad.closed_by_server()


def test_huge_declared_length_is_closed_without_buffering(
    connect: Callable[[], TcpClient],
) -> None:
    good = connect()
    good.import_("1-1")
    bad = connect()
    bad.import_("1-2")
    header = wire.encode(wire.CmdSubmit(1, bad.urb.devid, OUT, 1, 0))[:48]
    header = header[:24] + (2**31 - 1).to_bytes(4, "big") + header[28:]
    bad.sock.sendall(header + bytes(1000))  # the 2 GiB payload never comes
    assert bad.closed_by_server()
    assert good.echo(b"ok") == b"ok"


def test_flood_beyond_cap_is_closed(connect: Callable[[], TcpClient]) -> None:
    # A peer streaming junk in the op phase is closed at once; nothing is buffered.
    bad = connect()
    junk = b"\x01\x11\x99\x99" + bytes(65532)
    sent = 0
    with contextlib.suppress(OSError):  # EPIPE or ECONNRESET once the server has closed
        for _ in range(64):
            bad.sock.sendall(junk)
            sent += len(junk)
    assert sent < 64 * len(junk) or bad.closed_by_server()


@dataclass
class Buggy(LoopbackFunction):
    def bulk_out(self, endpoint: int, data: bytes) -> None:
        raise RuntimeError("a bug in the function")


def test_internal_error_closes_only_that_connection(caplog: pytest.LogCaptureFixture) -> None:
    exporter = Exporter(
        [VirtualDevice(identity(0), Buggy()), VirtualDevice(identity(1), LoopbackFunction())]
    )
    with ServerThread(exporter) as address:
        good, bad = TcpClient(address), TcpClient(address)
        try:
            good.import_("1-2")
            bad.import_("1-1")
            bad.submit(1, OUT, 1, b"x")
            assert bad.closed_by_server()
            assert good.echo(b"fine") == b"fine"
        finally:
            good.close()
            bad.close()
    assert any("internal error" in r.message and r.exc_info for r in caplog.records)


@dataclass
class TimerFunction(LoopbackFunction):
    armed: bool = False
    due: float | None = None

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        self.armed = True

    def next_job(self, now: float) -> Job | None:
        if self.armed:
            self.armed = False
            self.due = now + 0.05
        return None

    def get_timer(self) -> float | None:
        return self.due

    def handle_timer(self, now: float) -> None:
        assert self.due is not None
        assert now >= self.due
        self.due = None
        self.notify(b"tick")


def test_timer_drives_the_function() -> None:
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, TimerFunction())])
    with ServerThread(exporter) as address:
        client = TcpClient(address)
        try:
            client.import_()
            seq = client.submit(3, IN, 8)
            client.submit(1, OUT, 1, b"x")
            assert isinstance(client.reply(), wire.RetSubmit)  # the OUT
            assert client.reply() == wire.RetSubmit(seq, 0, 4, b"tick")
        finally:
            client.close()


def test_server_thread_stop_closes_clients() -> None:
    st = ServerThread(Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())]))
    with st as address:
        client = TcpClient(address)
        client.import_()
    try:
        assert client.closed_by_server()
    finally:
        client.close()


# --- the real usbip tool --------------------------------------------------------------------


def test_usbip_list_remote() -> None:
    usbip = require_tool("usbip")
    ccid_like = DeviceIdentity(0x08E6, 0x3437, 0x0200, "usbccid", "reader", "1")
    exporter = Exporter(
        [
            VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()),
            VirtualDevice(ccid_like, LoopbackFunction()),
        ]
    )
    with ServerThread(exporter) as (host, port):
        # --tcp-port is a global option: usbip [--tcp-port PORT] list -r HOST
        result = subprocess.run(
            [usbip, "--tcp-port", str(port), "list", "-r", host],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        parsable = subprocess.run(
            [usbip, "--tcp-port", str(port), "list", "-p", "-r", host],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "1-1:" in out
    assert "1-2:" in out
    assert "(1209:0001)" in out
    assert "(08e6:3437)" in out
    assert "/sys/devices/platform/usbccid/usb1/1-1" in out
    assert "(ff/00/00)" in out  # the interface class triple
    assert parsable.returncode == 0, parsable.stderr


def test_server_thread_reports_bind_failure() -> None:
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())])
    with ServerThread(exporter) as (host, port):
        second = ServerThread(exporter, host, port)
        with pytest.raises(RuntimeError, match="failed to start"):
            second.start()


def test_serve_until_cancelled() -> None:
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())])

    async def main() -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        task = asyncio.create_task(serve(exporter, "127.0.0.1", port))
        for _ in range(100):
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                break
            except OSError:
                await asyncio.sleep(0.01)
        else:
            pytest.fail("server did not come up")
        writer.write(wire.encode(wire.OpReqDevlist()))
        reply = await reader.read()  # the server closes after the reply
        assert len(wire.parse_op_rep_devlist(reply).devices) == 1
        writer.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())


def test_a_peer_that_never_reads_is_paused_and_stays_bounded(
    server: tuple[ServerThread, tuple[str, int]],
) -> None:
    """Replies pile up for a client that sends and never reads: the server stops reading
    it once its transport holds WRITE_HIGH unsent bytes (TCP then stops the client), keeps
    its state bounded, and serves it again in full once it reads."""
    from usbccid.frontends.usbip.server import WRITE_HIGH

    st, address = server
    client = TcpClient(address)
    try:
        client.import_("1-1")
        payload = bytes(range(256)) * 200  # 51 200 bytes out, the same back
        client.sock.settimeout(0.5)
        pairs = 0
        with contextlib.suppress(TimeoutError):
            while pairs < 2000:  # ~100 MB: far beyond any socket buffer
                _, out = client.urb.submit(1, OUT, len(payload), data=payload)
                _, raw_in = client.urb.submit(2, IN, len(payload))
                client.sock.sendall(out + raw_in)
                pairs += 1
        assert pairs < 2000, "the server kept reading a peer that never reads"

        def state() -> tuple[bool, int, int]:
            (peer,) = st._server.peers
            assert peer.transport is not None
            assert peer.conn is not None
            held = peer.transport.get_write_buffer_size() + len(peer.conn.protocol._buffer)
            return peer.transport.is_reading(), held, pairs

        reading, held, _ = st.call(state)
        assert not reading
        # one batch read past the mark at most: the replies to up to 256 KiB of requests
        assert held < WRITE_HIGH + 2 * 1024 * 1024, held
        # Now read everything: every pair is answered, in order, and reading resumes.
        client.sock.settimeout(TIMEOUT)
        for _ in range(pairs):
            first = client.reply()
            second = client.reply()
            assert isinstance(first, wire.RetSubmit)
            assert first.status == 0
            assert isinstance(second, wire.RetSubmit)
            assert second.data == payload
        assert client.echo(b"still there") == b"still there"
        assert st.call(state)[0]
    finally:
        client.close()
