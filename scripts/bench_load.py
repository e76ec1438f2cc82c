"""Load benchmark: ``usbccid serve`` with N readers, every one imported and busy at once.

Usage::

    .venv/bin/python scripts/bench_load.py [--readers 1,16,256] [--seconds 10]
        [--warmup 2] [--source DIR] [--json FILE]

For each N it writes a configuration of N readers (one slot each, reader N holding the
stored card "rN" of a fresh state directory: r0 generated once beforehand by ``usbccid
serve --check``, the others copies of it, since a card is in one slot at a time), starts
``usbccid serve --port 0`` as a subprocess, and times how long the process takes from
exec to its first banner line (printed once it listens). Then a lean client of its own
(asyncio protocols, plain USB/IP bytes, no pyusb, no kernel) imports every reader over
loopback, powers the card on, SELECTs the PKI applet and, from every importer at once,
repeats exchanges for ``--seconds``: alternately SELECT (P2=0C, 12 bytes in, 2 out) and
READ BUFFER (240 bytes out). One exchange is what libccid does for one APDU: a bulk-OUT
CMD_SUBMIT carrying PC_to_RDR_XfrBlock and a bulk-IN CMD_SUBMIT for the
RDR_to_PC_DataBlock (sent together in one write, as vhci sends URBs queued together).

Printed per N: aggregate exchanges/s, p50/p99 latency (write of the pair to the arrival
of the DataBlock), the server's CPU time per exchange (utime + stime of its
``/proc/PID/stat`` over the measured window, kernel TCP work included), the client's,
the server's RSS (after listening, under load, and per reader against the 1-reader run),
start time (wall, and the server's CPU time until then: on a busy machine the wall time
waits for other processes, the CPU time does not; the median of ``--starts`` starts),
errors (a wrong status, sequence, SW or a lost connection), and the slowest importer's
rate against the median importer's (1.00 = perfectly fair).

``--source DIR`` runs the server from another checkout (``PYTHONPATH=DIR``), e.g. a
worktree of main, to compare before and after with the same client. ``--floor`` runs, in
place of usbccid, a canned-reply server (an asyncio Protocol that answers each exchange
with fixed bytes, no stack at all): what asyncio and the kernel alone cost per exchange on
this machine, the floor under the server's figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# USB/IP (Linux Documentation/usb/usbip_protocol.rst), all big-endian.
USBIP_VERSION = 0x0111
OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT_SIZE = 8 + 312
CMD_SUBMIT, RET_SUBMIT = 1, 3
DIR_OUT, DIR_IN = 0, 1
URB_HEADER = struct.Struct(">IIIIIIIiii8s")  # basic (20) + CMD_SUBMIT fields (28)
URB_HEADER_SIZE = 48
# CCID Rev 1.1 §6.1: bMessageType, dwLength, bSlot, bSeq, 3 message-specific bytes.
CCID_HEADER = struct.Struct("<BIBBBH")
PC_TO_RDR_ICC_POWER_ON, PC_TO_RDR_XFR_BLOCK, RDR_TO_PC_DATA_BLOCK = 0x62, 0x6F, 0x80
BULK_OUT_EP, BULK_IN_EP = 1, 2  # endpoint numbers of 0x01 and 0x82
IN_LENGTH = 10 + 65546  # libccid's bulk-IN buffer

SELECT_PKI = bytes.fromhex("00 A4 04 0C 07 A0 00 00 00 79 01 00")
READ_BUFFER = bytes.fromhex("00 52 00 02 02 02 F0 F0")
CLK_TCK = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    pass


def cpu_times(pid: int) -> tuple[float, float]:
    """utime and stime of ``pid`` in seconds (proc(5): fields 14 and 15, in clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK


def cpu_seconds(pid: int) -> float:
    return sum(cpu_times(pid))


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise BenchError("no VmRSS")


def urb(seqnum: int, devid: int, direction: int, ep: int, length: int, data: bytes = b"") -> bytes:
    header = URB_HEADER.pack(CMD_SUBMIT, seqnum, devid, direction, ep, 0, length, 0, 0, 0, bytes(8))
    return header + data


@dataclass
class Importer:
    """One imported reader: its connection and its counters."""

    busid: str
    devid: int
    transport: asyncio.Transport | None = None
    seqnum: int = 0
    ccid_seq: int = 0
    exchanges: int = 0
    errors: int = 0
    latencies: list[float] = field(default_factory=list)
    measuring: bool = False
    running: bool = True


class ImporterProtocol(asyncio.Protocol):
    """The client side of one import: a state machine fed by data_received."""

    def __init__(self, importer: Importer, loop: asyncio.AbstractEventLoop) -> None:
        self.imp = importer
        self.loop = loop
        self.buffer = bytearray()
        self.imported: asyncio.Future[None] = loop.create_future()
        self.reply: asyncio.Future[bytes] | None = None  # during setup
        self.in_seqnum = 0
        self.out_seqnum = 0
        self.expect_ccid_seq = 0
        self.got_out = False
        self.sent_at = 0.0
        self.apdu_index = 0
        self.closed = loop.create_future()

    # -- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.imp.transport = transport
        busid = self.imp.busid.encode().ljust(32, b"\0")
        transport.write(struct.pack(">HHI", USBIP_VERSION, OP_REQ_IMPORT, 0) + busid)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.imp.running:
            self.imp.errors += 1
            self.imp.running = False
        if not self.closed.done():
            self.closed.set_result(None)
        for fut in (self.imported, self.reply):
            if fut is not None and not fut.done():
                fut.set_exception(BenchError(f"{self.imp.busid}: connection lost"))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        if not self.imported.done():
            if len(buf) < OP_REP_IMPORT_SIZE:
                return
            status = int.from_bytes(buf[4:8], "big")
            del buf[:OP_REP_IMPORT_SIZE]
            if status != 0:
                self.imported.set_exception(BenchError(f"{self.imp.busid}: import refused"))
                return
            self.imported.set_result(None)
        while len(buf) >= URB_HEADER_SIZE:
            seqnum = int.from_bytes(buf[4:8], "big")
            status = int.from_bytes(buf[20:24], "big")
            if seqnum == self.out_seqnum and not self.got_out:
                del buf[:URB_HEADER_SIZE]
                self.got_out = True
                if status != 0:
                    self.fail()
                continue
            length = int.from_bytes(buf[24:28], "big")
            if len(buf) < URB_HEADER_SIZE + length:
                return
            if seqnum != self.in_seqnum or not self.got_out:
                self.fail()
                return
            reply = bytes(buf[URB_HEADER_SIZE : URB_HEADER_SIZE + length])
            del buf[: URB_HEADER_SIZE + length]
            self.on_data_block(status, reply)

    # -- exchanges -------------------------------------------------------------------

    def fail(self) -> None:
        self.imp.errors += 1
        self.imp.running = False
        if self.reply is not None and not self.reply.done():
            self.reply.set_exception(BenchError(f"{self.imp.busid}: bad reply"))
        if self.imp.transport is not None:
            self.imp.transport.close()

    def send(self, message_type: int, data: bytes) -> None:
        imp = self.imp
        seq = imp.ccid_seq
        imp.ccid_seq = (seq + 1) & 0xFF
        self.expect_ccid_seq = seq
        self.out_seqnum = imp.seqnum + 1
        self.in_seqnum = imp.seqnum + 2
        imp.seqnum += 2
        self.got_out = False
        message = CCID_HEADER.pack(message_type, len(data), 0, seq, 0, 0) + data
        pair = urb(self.out_seqnum, imp.devid, DIR_OUT, BULK_OUT_EP, len(message), message)
        pair += urb(self.in_seqnum, imp.devid, DIR_IN, BULK_IN_EP, IN_LENGTH)
        self.sent_at = time.perf_counter()
        assert imp.transport is not None
        imp.transport.write(pair)

    def on_data_block(self, status: int, reply: bytes) -> None:
        ok = (
            status == 0
            and len(reply) >= 10
            and reply[0] == RDR_TO_PC_DATA_BLOCK
            and reply[6] == self.expect_ccid_seq
            and reply[7] & 0xC0 == 0
            and int.from_bytes(reply[1:5], "little") == len(reply) - 10
        )
        if not ok:
            self.fail()
            return
        if self.reply is not None:  # setup phase
            fut, self.reply = self.reply, None
            fut.set_result(reply[10:])
            return
        if reply[-2:] != b"\x90\x00":
            self.fail()
            return
        imp = self.imp
        if imp.measuring:
            imp.exchanges += 1
            imp.latencies.append(time.perf_counter() - self.sent_at)
        if imp.running:
            self.next_exchange()

    def next_exchange(self) -> None:
        self.apdu_index ^= 1
        self.send(PC_TO_RDR_XFR_BLOCK, READ_BUFFER if self.apdu_index else SELECT_PKI)

    async def exchange(self, message_type: int, data: bytes = b"") -> bytes:
        self.reply = self.loop.create_future()
        self.send(message_type, data)
        return await self.reply


async def run_clients(
    host: str, port: int, busids: list[str], warmup: float, seconds: float, server_pid: int
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    importers = [Importer(b, (1 << 16) | int(b.split("-")[1])) for b in busids]
    protocols: list[ImporterProtocol] = []
    for imp in importers:
        _, proto = await loop.create_connection(
            lambda imp=imp: ImporterProtocol(imp, loop),  # type: ignore[misc]
            host,
            port,
        )
        protocols.append(proto)
    await asyncio.gather(*(p.imported for p in protocols))
    for p in protocols:
        atr = await p.exchange(PC_TO_RDR_ICC_POWER_ON)
        if not atr:
            raise BenchError("empty ATR")
        if (await p.exchange(PC_TO_RDR_XFR_BLOCK, SELECT_PKI))[-2:] != b"\x90\x00":
            raise BenchError("SELECT of the PKI applet failed")
    for p in protocols:
        p.next_exchange()
    await asyncio.sleep(warmup)
    server_cpu0, client0, t0 = cpu_times(server_pid), os.times(), time.perf_counter()
    for imp in importers:
        imp.measuring = True
    await asyncio.sleep(seconds)
    for imp in importers:
        imp.measuring = False
    elapsed = time.perf_counter() - t0
    user1, sys1 = cpu_times(server_pid)
    server_user, server_sys = user1 - server_cpu0[0], sys1 - server_cpu0[1]
    server_cpu = server_user + server_sys
    client1 = os.times()
    client_cpu = (client1.user - client0.user) + (client1.system - client0.system)
    rss = rss_bytes(server_pid)
    for imp in importers:
        imp.running = False
    await asyncio.sleep(0.2)  # let the last exchanges finish
    for p in protocols:
        if p.imp.transport is not None:
            p.imp.transport.close()
    total = sum(i.exchanges for i in importers)
    latencies = sorted(x for i in importers for x in i.latencies)
    rates = sorted(i.exchanges / elapsed for i in importers)
    median = statistics.median(rates)

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else 0.0

    return {
        "exchanges_per_s": total / elapsed,
        "p50_ms": pct(0.50) * 1e3,
        "p99_ms": pct(0.99) * 1e3,
        "server_cpu_us": server_cpu / total * 1e6 if total else float("inf"),
        "server_user_us": server_user / total * 1e6 if total else float("inf"),
        "server_sys_us": server_sys / total * 1e6 if total else float("inf"),
        "client_cpu_us": client_cpu / total * 1e6 if total else float("inf"),
        "rss_load": rss,
        "errors": sum(i.errors for i in importers),
        "slowest_vs_median": rates[0] / median if median else 0.0,
        "exchanges": total,
        "seconds": elapsed,
    }


def write_config(path: Path, readers: int) -> None:
    """``readers`` readers, reader N holding the stored card "rN" (see :func:`copy_cards`)."""
    lines = ['[server]\nhost = "127.0.0.1"\n']
    for n in range(readers):
        lines.append(f'[[reader]]\nname = "r{n}"\n  [[reader.slot]]\n  card = "r{n}"\n')
    path.write_text("\n".join(lines))


def copy_cards(state: Path, readers: int) -> None:
    """Stored cards r0..rN-1 as copies of r0: a card is in one slot at a time, and a copy
    is a card of its own (its own PIN state) with the same, already generated, keys."""
    cards = state / "cards"
    for n in range(1, readers):
        if not (cards / f"r{n}").exists():
            shutil.copytree(cards / "r0", cards / f"r{n}")


def server_env(source: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    # As installed by pip, which compiles the bytecode: the untimed --check run writes it.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    if source is not None:
        env["PYTHONPATH"] = str(source)
    return env


def serve_floor() -> None:
    """The canned-reply server of ``--floor``: imports anything, answers every OUT + IN
    pair with RET_SUBMIT(OUT) and a RET_SUBMIT carrying DataBlock(bSeq, 90 00)."""
    ret = struct.Struct(">LLLLLlLlll8x")

    class Canned(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport
            self.buffer = bytearray()
            self.imported = False

        def data_received(self, data: bytes) -> None:
            buf = self.buffer
            buf += data
            if not self.imported:
                if len(buf) >= 40:
                    del buf[:40]
                    self.imported = True
                    self.transport.write(bytes(OP_REP_IMPORT_SIZE))
                return
            out = []
            while len(buf) >= 2 * URB_HEADER_SIZE:
                length = int.from_bytes(buf[24:28], "big")
                if len(buf) < 2 * URB_HEADER_SIZE + length:
                    break
                out_seqnum = int.from_bytes(buf[4:8], "big")
                ccid_seq = buf[URB_HEADER_SIZE + 6]
                at = URB_HEADER_SIZE + length
                in_seqnum = int.from_bytes(buf[at + 4 : at + 8], "big")
                del buf[: 2 * URB_HEADER_SIZE + length]
                block = CCID_HEADER.pack(RDR_TO_PC_DATA_BLOCK, 2, 0, ccid_seq, 0, 0) + b"\x90\x00"
                out.append(ret.pack(RET_SUBMIT, out_seqnum, 0, 0, 0, 0, length, 0, 0, 0))
                out.append(ret.pack(RET_SUBMIT, in_seqnum, 0, 0, 0, 0, len(block), 0, 0, 0))
                out.append(block)
            if out:
                self.transport.write(b"".join(out))

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(Canned, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        print(f"floor: USB/IP server listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


def start_server(
    config: Path, state: Path, source: Path | None, floor: bool = False
) -> tuple[subprocess.Popen[str], float, float, int]:
    """The running server, its start time (exec -> first banner line), the CPU time it
    took to get there (the same on a busy machine) and its port."""
    command = [sys.executable, "-m", "usbccid", "serve", "-q", "--port", "0"]
    command += ["--config", str(config), "--state-dir", str(state)]
    if floor:
        command = [sys.executable, str(Path(__file__).resolve()), "--serve-floor"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env=server_env(source), cwd=state
    )
    assert proc.stdout is not None
    first = proc.stdout.readline()
    started = time.perf_counter() - t0
    start_cpu = cpu_seconds(proc.pid)
    if "listening on" not in first:
        proc.kill()
        raise BenchError(f"the server did not start: {first!r}")
    port = int(first.rsplit(":", 1)[1])
    # Drain the rest of the banner in the background so the pipe never fills.
    import threading

    threading.Thread(target=proc.stdout.read, daemon=True).start()
    return proc, started, start_cpu, port


def stop_server(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def bench(readers: int, args: argparse.Namespace, state: Path) -> dict[str, Any]:
    config = state / f"readers-{readers}.toml"
    write_config(config, readers)
    # Start times: the median of --starts starts (one start is at the mercy of whatever
    # else the machine does in that half second); the last one is measured under load.
    starts: list[tuple[float, float]] = []
    for _ in range(args.starts - 1):
        proc, started, start_cpu, _ = start_server(config, state, args.source, args.floor)
        stop_server(proc)
        starts.append((started, start_cpu))
    proc, started, start_cpu, port = start_server(config, state, args.source, args.floor)
    starts.append((started, start_cpu))
    started = statistics.median(s[0] for s in starts)
    start_cpu = statistics.median(s[1] for s in starts)
    try:
        rss_listen = rss_bytes(proc.pid)
        busids = [f"1-{n + 1}" for n in range(readers)]
        result = asyncio.run(
            run_clients("127.0.0.1", port, busids, args.warmup, args.seconds, proc.pid)
        )
    finally:
        stop_server(proc)
    result.update(readers=readers, start_s=started, start_cpu_s=start_cpu, rss_listen=rss_listen)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--readers", default="1,16,256", help="comma-separated reader counts")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured time per run")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured time first")
    parser.add_argument("--source", type=Path, help="run the server from this checkout")
    parser.add_argument("--starts", type=int, default=5, help="starts timed per N (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--floor", action="store_true", help="a canned-reply server instead")
    parser.add_argument("--serve-floor", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_floor:
        serve_floor()
        return
    counts = [int(n) for n in args.readers.split(",")]

    with tempfile.TemporaryDirectory(prefix="usbccid-load-") as tmp:
        state = Path(tmp)
        config = state / "readers-1.toml"
        write_config(config, 1)
        state_arg = ("--state-dir", str(state))
        # Generate the stored card r0 once, untimed (RSA key generation).
        subprocess.run(
            [
                sys.executable,
                "-m",
                "usbccid",
                "serve",
                "--check",
                "--config",
                str(config),
                *state_arg,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
            env=server_env(args.source),
            cwd=state,
        )
        copy_cards(state, max(counts))
        results = [bench(n, args, state) for n in counts]

    base_rss = next((r["rss_load"] for r in results if r["readers"] == 1), None)
    head = (
        f"{'readers':>7} {'exch/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'srv us':>7} {'(sys)':>6} "
        f"{'cli us':>7} {'start s':>7} {'cpu s':>6} {'RSS MiB':>7} {'KiB/rdr':>7} {'errors':>6} "
        f"{'slow/med':>8}"
    )
    print(head)
    for r in results:
        per_reader = "-"
        if base_rss is not None and r["readers"] > 1:
            per_reader = f"{(r['rss_load'] - base_rss) / (r['readers'] - 1) / 1024:.0f}"
        print(
            f"{r['readers']:>7} {r['exchanges_per_s']:>8.0f} {r['p50_ms']:>7.2f} "
            f"{r['p99_ms']:>7.2f} {r['server_cpu_us']:>7.0f} {r['server_sys_us']:>6.0f} "
            f"{r['client_cpu_us']:>7.0f} "
            f"{r['start_s']:>7.2f} {r['start_cpu_s']:>6.2f} {r['rss_load'] / 2**20:>7.1f} "
            f"{per_reader:>7} "
            f"{r['errors']:>6} {r['slowest_vs_median']:>8.2f}"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
