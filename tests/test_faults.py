"""The fault battery (issue 11): bounded in time, loopback only.

* ``RST_CASES`` importer connections killed with a RST (SO_LINGER 0) at random points of
  a bulk OUT, a bulk IN, a time-extended command and a chained (extended) APDU. Each case
  starts by importing the same reader the previous case killed, which must succeed within
  1 s, and by a verified exchange with its card (nothing lost); at the end the server
  holds no connection, no parked URB, no queued reply.
* ``usbccid serve`` killed with SIGKILL during PIN verification and PIN change: the retry
  counter never rises back, and the PIN is the old or the new one, never lost.
* ``USBCCID_FAULT_READERS`` readers x ``USBCCID_FAULT_APDUS`` APDUs through one
  ``usbccid serve`` (256 x 20 in CI; 256 x 10,000 by hand, with ``-s --timeout 2700``:
  its blocking client makes some 3,000 APDUs/s, so about 15 minutes): no error, flat RSS.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.cli.helpers import BIN, make_pkcs12, running_server, usbccid_env
from tests.usbip.helpers import UsbipClient
from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.errors import CommandStatus
from usbccid.ccid.identity import make_identity
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import DataBlock, IccPowerOn, XfrBlock, build_command, parse_reply
from usbccid.frontends.usbip.server import ServerThread
from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import SetupPacket

IN, OUT = wire.Direction.IN, wire.Direction.OUT
BULK_OUT, BULK_IN = 1, 2  # USB/IP endpoint numbers (0x01 OUT, 0x82 IN)
READ = 10 + 65546
RST_CASES = int(os.environ.get("USBCCID_FAULT_RST_CASES", "1000"))
RST_READERS = 4
#: small CCID messages, so that a 1000-byte APDU goes in four chained blocks
MESSAGE_LENGTH = 271
BLOCK = MESSAGE_LENGTH - 10
SLOW_SECONDS = 0.2
REIMPORT_WITHIN = 1.0


def echo_apdu(data: bytes) -> bytes:
    if len(data) <= 255:
        return bytes.fromhex("80100000") + bytes([len(data)]) + data + b"\x00"
    return bytes.fromhex("8010000000") + len(data).to_bytes(2, "big") + data + b"\x00\x00"


# -- a raw importer -------------------------------------------------------------------------


class Importer:
    """One TCP connection that imported a reader; blocking URBs, like vhci."""

    def __init__(self, address: tuple[str, int], busid: str) -> None:
        self.sock = socket.create_connection(address, timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.urbs = UsbipClient(devid=0x0001_0000 | int(busid.split("-")[1]))
        self.sock.sendall(wire.encode(wire.OpReqImport(busid)))
        head = self._recv(8)
        self.status = int.from_bytes(head[4:8], "big")
        if self.status == 0:
            self._recv(312)
        self.seq = 0
        self.replies: dict[int, wire.RetSubmit | wire.RetUnlink] = {}

    def _recv(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise EOFError(f"closed after {len(data)} of {n} bytes")
            data += chunk
        return bytes(data)

    def wait(self, seqnum: int) -> wire.RetSubmit:
        while seqnum not in self.replies:
            chunk = self.sock.recv(1 << 17)
            if not chunk:
                raise EOFError("closed")
            for reply in self.urbs.feed(chunk):
                self.replies[reply.seqnum] = reply
        reply = self.replies.pop(seqnum)
        assert isinstance(reply, wire.RetSubmit)
        return reply

    def submit_raw(
        self, ep: int, direction: wire.Direction, length: int, data: bytes = b""
    ) -> tuple[int, bytes]:
        return self.urbs.submit(ep, direction, length, data=data)

    def urb(
        self, ep: int, direction: wire.Direction, length: int, data: bytes = b""
    ) -> wire.RetSubmit:
        seqnum, raw = self.submit_raw(ep, direction, length, data)
        self.sock.sendall(raw)
        reply = self.wait(seqnum)
        assert reply.status == 0, reply
        return reply

    def configure(self) -> None:
        seqnum, raw = self.urbs.control(SetupPacket(0x00, 9, 1, 0, 0))
        self.sock.sendall(raw)
        assert self.wait(seqnum).status == 0

    def command(self, level: int, payload: bytes, *, power_on: bool = False) -> DataBlock:
        """One CCID command and its reply, time extensions skipped."""
        self.seq = (self.seq + 1) & 0xFF
        cmd = (
            IccPowerOn(0, self.seq)
            if power_on
            else XfrBlock(0, self.seq, payload, level_parameter=level)
        )
        self.urb(BULK_OUT, OUT, len(build_command(cmd)), build_command(cmd))
        while True:
            reply = parse_reply(self.urb(BULK_IN, IN, READ).data)
            assert isinstance(reply, DataBlock), reply
            assert reply.seq == self.seq, reply
            if reply.command_status is not CommandStatus.TIME_EXTENSION:
                return reply

    def transmit(self, apdu: bytes) -> bytes:
        """An APDU the way libccid sends extended ones (CmdXfrBlockAPDU_extended)."""
        if len(apdu) <= BLOCK:
            reply = self.command(0x00, apdu)
        else:
            level, rest = 0x01, apdu
            while True:
                block, rest = rest[:BLOCK], rest[BLOCK:]
                reply = self.command(level, block)
                if not rest:
                    break
                assert reply.chain_parameter == 0x10, reply
                level = 0x03 if len(rest) > BLOCK else 0x02
        data = reply.data
        while reply.chain_parameter in (0x01, 0x03):
            reply = self.command(0x10, b"")
            data += reply.data
        assert reply.error == 0, reply
        return data

    def abort(self) -> None:
        """A RST: SO_LINGER with a zero timeout, then close."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
            )
        self.sock.close()

    def close(self) -> None:
        self.sock.close()


def import_again(address: tuple[str, int], busid: str) -> tuple[Importer, float]:
    """Import ``busid``, retrying while it is busy; (importer, seconds it took)."""
    t0 = time.monotonic()
    while True:
        imp = Importer(address, busid)
        if imp.status == 0:
            return imp, time.monotonic() - t0
        imp.close()
        assert time.monotonic() - t0 < REIMPORT_WITHIN, f"{busid} still busy"
        time.sleep(0.002)


# -- the kill points ------------------------------------------------------------------------


def kill_in_bulk_out(imp: Importer, rng: random.Random) -> None:
    payload = echo_apdu(rng.randbytes(rng.randrange(1, 250)))
    cmd = build_command(XfrBlock(0, (imp.seq + 1) & 0xFF, payload))
    _, raw = imp.submit_raw(BULK_OUT, OUT, len(cmd), cmd)
    imp.sock.sendall(raw[: rng.randrange(1, len(raw))])


def kill_in_bulk_in(imp: Importer, rng: random.Random) -> None:
    imp.seq = (imp.seq + 1) & 0xFF
    cmd = build_command(XfrBlock(0, imp.seq, echo_apdu(rng.randbytes(rng.randrange(1, 250)))))
    imp.urb(BULK_OUT, OUT, len(cmd), cmd)
    _, raw = imp.submit_raw(BULK_IN, IN, READ)
    imp.sock.sendall(raw)
    with contextlib.suppress(TimeoutError):
        imp.sock.settimeout(0.05)
        imp.sock.recv(rng.randrange(0, 300))  # part of the reply read, or none


def kill_in_time_extension(imp: Importer, rng: random.Random) -> None:
    imp.seq = (imp.seq + 1) & 0xFF
    cmd = build_command(XfrBlock(0, imp.seq, bytes.fromhex("80140000")))
    imp.urb(BULK_OUT, OUT, len(cmd), cmd)
    for _ in range(rng.randrange(0, 3)):  # the card still works: time extensions come
        reply = parse_reply(imp.urb(BULK_IN, IN, READ).data)
        assert isinstance(reply, DataBlock)
        assert reply.seq == imp.seq
        if reply.command_status is not CommandStatus.TIME_EXTENSION:
            return  # the card was quicker than this loaded machine: killed after the end
    imp.sock.sendall(imp.submit_raw(BULK_IN, IN, READ)[1])
    time.sleep(rng.uniform(0, SLOW_SECONDS / 4))


def kill_in_chain(imp: Importer, rng: random.Random) -> None:
    apdu = echo_apdu(rng.randbytes(rng.randrange(BLOCK * 2, BLOCK * 3)))  # four blocks
    blocks = [apdu[i : i + BLOCK] for i in range(0, len(apdu), BLOCK)]
    sent = rng.randrange(1, len(blocks))
    for i, block in enumerate(blocks[:sent]):
        level = 0x01 if i == 0 else 0x03
        if i == sent - 1 and rng.random() < 0.5:
            imp.seq = (imp.seq + 1) & 0xFF
            cmd = build_command(XfrBlock(0, imp.seq, block, level_parameter=level))
            imp.sock.sendall(imp.submit_raw(BULK_OUT, OUT, len(cmd), cmd)[1])  # no reply read
            return
        assert imp.command(level, block).chain_parameter == 0x10


KILLS = {
    "bulk OUT": kill_in_bulk_out,
    "bulk IN": kill_in_bulk_in,
    "time extension": kill_in_time_extension,
    "chained APDU": kill_in_chain,
}


@pytest.fixture
def rst_rig() -> Iterator[tuple[ServerThread, tuple[str, int], list[CcidReader], Exporter]]:
    config = ReaderConfig(max_message_length=MESSAGE_LENGTH, time_extension_interval=0.01)
    readers = [
        CcidReader(
            [EchoCard(blocking=True, sleep=time.sleep, slow_seconds=SLOW_SECONDS)],
            identity=make_identity(serial_number=f"FAULT{i:03d}"),
            config=config,
        )
        for i in range(RST_READERS)
    ]
    exporter = Exporter([VirtualDevice(r.identity, r) for r in readers])
    st = ServerThread(exporter)
    address = st.start()
    try:
        yield st, address, readers, exporter
    finally:
        st.stop()


def test_importers_killed_with_rst_at_random_points(
    rst_rig: tuple[ServerThread, tuple[str, int], list[CcidReader], Exporter],
) -> None:
    st, address, readers, exporter = rst_rig
    seen: dict[str, int] = dict.fromkeys(KILLS, 0)
    worst_reimport = 0.0
    lock = threading.Lock()

    def worker(index: int) -> None:
        nonlocal worst_reimport
        rng = random.Random(1100 + index)
        busid = f"1-{index + 1}"
        for _ in range(RST_CASES // RST_READERS):
            imp, took = import_again(address, busid)
            try:
                imp.configure()
                assert imp.command(0, b"", power_on=True).data == EchoCard().atr
                # nothing lost: the card answers right, short and chained
                data = rng.randbytes(rng.choice([5, 200, 900]))
                assert imp.transmit(echo_apdu(data)) == data + b"\x90\x00"
                name = rng.choice(list(KILLS))
                KILLS[name](imp, rng)
            finally:
                imp.abort()
            with lock:
                seen[name] += 1
                worst_reimport = max(worst_reimport, took)

    t0 = time.monotonic()
    with ThreadPoolExecutor(RST_READERS) as pool:
        for future in [pool.submit(worker, i) for i in range(RST_READERS)]:
            future.result(timeout=300)
    elapsed = time.monotonic() - t0
    # afterwards: every reader importable and working, nothing held for the dead peers
    for index in range(RST_READERS):
        imp, took = import_again(address, f"1-{index + 1}")
        worst_reimport = max(worst_reimport, took)
        imp.configure()
        imp.command(0, b"", power_on=True)
        assert imp.transmit(echo_apdu(b"last")) == b"last\x90\x00"
        imp.close()
    deadline = time.monotonic() + 5
    while st.call(lambda: len(st._server.peers)) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert st.call(lambda: len(st._server.peers)) == 0
    assert st.call(lambda: sum(d.parked_count for d in exporter.devices.values())) == 0
    assert st.call(lambda: sum(len(r._out) for r in readers)) == 0
    assert all(s.imported_by is None for s in st.call(exporter.status))
    assert sum(seen.values()) == RST_CASES // RST_READERS * RST_READERS
    assert all(n > 0 for n in seen.values()), seen
    assert worst_reimport < REIMPORT_WITHIN
    print(
        f"{sum(seen.values())} RST kills {seen} in {elapsed:.1f} s; "
        f"re-import <= {worst_reimport * 1000:.1f} ms"
    )


# -- SIGKILL during PIN commands ---------------------------------------------------------------

SIGKILL_ROUNDS = int(os.environ.get("USBCCID_FAULT_SIGKILL_ROUNDS", "5"))
OLD_PIN, NEW_PIN = b"13572468", b"24681357"


def pin_block(pin: bytes) -> bytes:
    return pin + b"\xff" * (8 - len(pin))


def read_state(path: Path) -> dict[str, object]:
    document: dict[str, object] = json.loads(path.read_text())  # never corrupt, never partial
    return document


def test_sigkill_during_pin_verify_and_change(tmp_path: Path) -> None:
    state = tmp_path / "state"
    made = subprocess.run(
        [str(BIN), "card", "new", "--state-dir", str(state), "--name", "kill", "--containers", "1",
         "--key-size", "1024", "--pin", OLD_PIN.decode(), "--tries", "15"],
        capture_output=True, text=True, env=usbccid_env(), timeout=120, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    config = tmp_path / "c.toml"
    config.write_text("[[reader]]\n[[reader.slot]]\ncard = 'kill'\n")
    pin_file = state / "cards" / "kill" / "pin-state.json"
    rng = random.Random(11)
    outcomes: list[str] = []
    tries = 15
    pins = {OLD_PIN.hex()}
    for round_ in range(SIGKILL_ROUNDS * 2):
        change = round_ % 2 == 1
        with running_server(["--config", config], state) as server:
            imp = Importer((server.host, server.port), "1-1")
            assert imp.status == 0
            imp.configure()
            imp.command(0, b"", power_on=True)
            current = (
                bytes.fromhex(str(read_state(pin_file)["pin_hex"]))
                if pin_file.exists()
                else OLD_PIN
            )
            if change:
                other = NEW_PIN if current == OLD_PIN else OLD_PIN
                apdu = bytes.fromhex("0024000010") + pin_block(current) + pin_block(other)
            else:
                apdu = bytes.fromhex("0020000008") + pin_block(b"00000000")
            imp.seq += 1
            cmd = build_command(XfrBlock(0, imp.seq, apdu))
            seqnum, raw = imp.submit_raw(BULK_OUT, OUT, len(cmd), cmd)
            in_seq, in_raw = imp.submit_raw(BULK_IN, IN, READ)
            killer = threading.Timer(
                rng.uniform(0, 0.03), os.kill, (server.process.pid, signal.SIGKILL)
            )
            imp.sock.sendall(raw + in_raw)
            killer.start()
            answer: object = None
            with contextlib.suppress(EOFError, OSError):
                imp.wait(seqnum)
                answer = parse_reply(imp.wait(in_seq).data)
            killer.join()
            server.process.wait(10)
            imp.close()
        after = read_state(pin_file) if pin_file.exists() else None
        left = int(after["tries_left"]) if after else 15  # type: ignore[call-overload]
        pin_now = str(after["pin_hex"]) if after else OLD_PIN.hex()
        assert left <= tries or (left == 15 and change), (round_, left, tries)
        assert left >= tries - 1, "one command costs one try at most"
        data = answer.data if isinstance(answer, DataBlock) else b""
        answered = len(data) == 2
        if answered and not change:
            assert data[0] == 0x63, answer  # 63 Cx
            assert left == tries - 1, "answered, so the decrement was on disk first"
        if change:
            assert pin_now in (current.hex(), (NEW_PIN if current == OLD_PIN else OLD_PIN).hex())
            if answered:
                assert data == b"\x90\x00"
                assert pin_now != current.hex(), "answered 9000, so the new PIN was on disk"
        else:
            assert pin_now == current.hex()  # a wrong PIN changes no PIN
        outcomes.append(
            f"{'change' if change else 'verify'}:{'answered' if answered else 'killed'}"
        )
        tries = left
        pins.add(pin_now)
        assert tries > 0
    # the PIN on disk still verifies: nothing was lost
    with running_server(["--config", config], state) as server:
        imp = Importer((server.host, server.port), "1-1")
        imp.configure()
        imp.command(0, b"", power_on=True)
        pin = bytes.fromhex(str(read_state(pin_file)["pin_hex"]))
        assert imp.transmit(bytes.fromhex("0020000008") + pin_block(pin)) == b"\x90\x00"
        imp.close()
    print("SIGKILL rounds:", {o: outcomes.count(o) for o in sorted(set(outcomes))})


# -- many readers, many APDUs ----------------------------------------------------------------

MANY_READERS = int(os.environ.get("USBCCID_FAULT_READERS", "256"))
MANY_APDUS = int(os.environ.get("USBCCID_FAULT_APDUS", "20"))
SELECT_PKI = bytes.fromhex("00a4040007a000000079010000")
PIN_STATUS = bytes.fromhex("00200000")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_many_readers_many_apdus_flat_rss(tmp_path: Path) -> None:
    p12 = make_pkcs12(tmp_path, "many", b"pw")
    config = tmp_path / "many.toml"
    config.write_text(
        "".join(
            f"[[reader]]\nname = 'r{i}'\n[[reader.slot]]\n"
            f"containers = [{{ pkcs12 = '{p12.name}', passphrase = 'pw' }}]\n"
            f"card_id = '{i:08x}'\n"
            for i in range(MANY_READERS)
        )
    )
    state = tmp_path / "state"
    with running_server(["--config", config], state, timeout=300) as server:
        pid = server.process.pid
        address = (server.host, server.port)
        importers = []
        for i in range(MANY_READERS):
            imp = Importer(address, f"1-{i + 1}")
            assert imp.status == 0, i
            imp.configure()
            imp.command(0, b"", power_on=True)
            importers.append(imp)
        errors: list[str] = []
        done = [0]
        lock = threading.Lock()
        rss = [rss_kib(pid)]

        def drive(mine: list[Importer]) -> None:
            for n in range(MANY_APDUS):
                for imp in mine:
                    apdu = SELECT_PKI if n % 2 == 0 else PIN_STATUS
                    want = b"\x90\x00" if n % 2 == 0 else b"\x63\xc3"
                    try:
                        got = imp.transmit(apdu)
                    except Exception as exc:  # counted, reported
                        got = repr(exc).encode()
                    if got[-2:] != want:
                        with lock:
                            errors.append(f"{apdu.hex()} -> {got[-40:]!r}")
                with lock:
                    done[0] += len(mine)

        workers = 8
        t0 = time.monotonic()
        with ThreadPoolExecutor(workers) as pool:
            futures = [pool.submit(drive, importers[w::workers]) for w in range(workers)]
            while not all(f.done() for f in futures):
                time.sleep(1)
                rss.append(rss_kib(pid))
                if len(rss) % 300 == 0:  # a long run (by hand) says how it goes
                    print(f"  {done[0]} APDUs, {len(errors)} errors, RSS {rss[-1]} KiB", flush=True)
            for f in futures:
                f.result()
        elapsed = time.monotonic() - t0
        rss.append(rss_kib(pid))
        for imp in importers:
            imp.close()
    total = MANY_READERS * MANY_APDUS
    assert done[0] == total
    assert errors == [], errors[:5]
    warm = rss[min(2, len(rss) - 1)]
    growth = rss[-1] - warm
    print(
        f"{MANY_READERS} readers x {MANY_APDUS} APDUs = {total} in {elapsed:.1f} s "
        f"({total / elapsed:.0f}/s), 0 errors; server RSS {rss[0]} -> {warm} -> {rss[-1]} KiB"
    )
    assert growth < 16 * 1024, f"server RSS grew by {growth} KiB: {rss}"
