"""USB/IP URB round trips per second over loopback TCP, against the in-process server.

    .venv/bin/python scripts/bench_urb.py [--seconds 2]

The server (usbccid.frontends.usbip.server.ServerThread, exporting the loopback device:
bulk OUT 0x01
echoes to bulk IN 0x82) runs on a thread of this process. Each operation is timed through
several clients, one at a time, each with its own import:

* ``pyusb``: pyusb's ordinary API over usbccid.host.pyusb_backend;
* ``host``: usbccid.host.session.Session, the same client without pyusb on top;
* ``bare``: a bare blocking socket loop written below with struct (no threads, no
  parsing beyond the 48-byte header): the floor a Python client can reach here;
* ``usbip``: PyPI usbip 0.7.0's synchronous host client (if installed), with TCP_NODELAY
  set on its socket (it does not set it, and Nagle then costs ~40 ms per bulk OUT).

Ratios are against ``bare``. Server and clients share one interpreter (and its GIL), so the
figures are for comparing clients with each other, not absolute server capacity. One bulk
echo round trip is two URBs (OUT, then IN).
"""

from __future__ import annotations

import argparse
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

import usb.core
import usb.util

from usbccid.frontends.usbip.server import ServerThread
from usbccid.host.pyusb_backend import UsbipBackend
from usbccid.host.session import Session
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, LoopbackFunction

BULK_OUT, BULK_IN = 0x01, 0x82
GET_DEVICE_DESCRIPTOR = struct.pack("<BBHHH", 0x80, 6, 0x0100, 0, 18)  # USB 2.0 §9.4.3

Op = Callable[[], None]


class BareClient:
    """A minimal blocking USB/IP client: one URB in flight, no threads."""

    def __init__(self, host: str, port: int, busid: str) -> None:
        self.sock = socket.create_connection((host, port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # OP_REQ_IMPORT: version 0x0111, code 0x8003, status 0, busid[32].
        self.sock.sendall(struct.pack(">HHI32s", 0x0111, 0x8003, 0, busid.encode()))
        reply = self._recv(8 + 312)
        if struct.unpack_from(">I", reply, 4)[0] != 0:
            raise RuntimeError("import refused")
        busnum, devnum = struct.unpack_from(">II", reply, 8 + 0x120)
        self.devid = (busnum << 16) | devnum
        self.seqnum = 0

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("closed")
            buf += chunk
        return bytes(buf)

    def urb(
        self, ep: int, direction: int, length: int, setup: bytes = bytes(8), data: bytes = b""
    ) -> bytes:
        self.seqnum += 1
        flags = 0x200 if direction else 0
        self.sock.sendall(
            struct.pack(
                ">IIIIIIIIII8s",
                1,
                self.seqnum,
                self.devid,
                direction,
                ep,
                flags,
                length,
                0,
                0,
                0,
                setup,
            )
            + data
        )
        header = self._recv(48)
        status, actual = struct.unpack_from(">iI", header, 20)
        if status != 0:
            raise RuntimeError(f"URB status {status}")
        return self._recv(actual) if direction else b""

    def close(self) -> None:
        self.sock.close()


def pyusb_ops(host: str, port: int, busid: str) -> tuple[dict[str, Op], Callable[[], None]]:
    backend = UsbipBackend(host, port, busids=[busid])
    dev: Any = usb.core.find(backend=backend)
    dev.set_configuration()
    small, large = b"p" * 64, b"P" * 4096

    def echo(payload: bytes) -> Op:
        def op() -> None:
            dev.write(BULK_OUT, payload)
            dev.read(BULK_IN, len(payload))

        return op

    ops = {
        "control": lambda: dev.ctrl_transfer(0x80, 6, 0x0100, 0, 18) and None,
        "echo64": echo(small),
        "echo4096": echo(large),
    }

    def close() -> None:
        usb.util.dispose_resources(dev)
        backend.close()

    return ops, close


def host_ops(host: str, port: int, busid: str) -> tuple[dict[str, Op], Callable[[], None]]:
    session = Session(host, port, busid=busid)

    def echo(payload: bytes) -> Op:
        def op() -> None:
            session.submit(BULK_OUT, data=payload, timeout=5)
            session.submit(BULK_IN, length=len(payload), timeout=5)

        return op

    def control() -> None:
        session.submit(0x80, setup=GET_DEVICE_DESCRIPTOR, length=18, timeout=5)

    ops = {"control": control, "echo64": echo(b"h" * 64), "echo4096": echo(b"H" * 4096)}
    return ops, session.close


def bare_ops(host: str, port: int, busid: str) -> tuple[dict[str, Op], Callable[[], None]]:
    client = BareClient(host, port, busid)

    def echo(payload: bytes) -> Op:
        def op() -> None:
            client.urb(BULK_OUT & 0x0F, 0, len(payload), data=payload)
            client.urb(BULK_IN & 0x0F, 1, len(payload))

        return op

    def control() -> None:
        client.urb(0, 1, 18, setup=GET_DEVICE_DESCRIPTOR)

    ops = {"control": control, "echo64": echo(b"b" * 64), "echo4096": echo(b"B" * 4096)}
    return ops, client.close


def pypi_usbip_ops(host: str, port: int, busid: str) -> tuple[dict[str, Op], Callable[[], None]]:
    import usbip  # a test dependency; absent in a runtime-only install

    handle = usbip.attach(host, busid, port=port)
    # Its client sends header and OUT data in two send()s without TCP_NODELAY, so Nagle
    # and delayed ACKs cost ~40 ms per bulk OUT; switch Nagle off to compare protocols.
    handle.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def echo(payload: bytes) -> Op:
        def op() -> None:
            handle.bulk_out(BULK_OUT, payload)
            handle.bulk_in(BULK_IN, len(payload))

        return op

    ops = {
        "control": lambda: handle.control(0x80, 6, 0x0100, 0, 18) and None,
        "echo64": echo(b"u" * 64),
        "echo4096": echo(b"U" * 4096),
    }
    return ops, handle.close


CLIENTS: dict[str, Callable[[str, int, str], tuple[dict[str, Op], Callable[[], None]]]] = {
    "pyusb": pyusb_ops,
    "host": host_ops,
    "bare": bare_ops,
    "usbip": pypi_usbip_ops,
}
OPERATIONS = {
    "control": "control GET_DESCRIPTOR(DEVICE, 18)",
    "echo64": "bulk OUT+IN echo, 64 B",
    "echo4096": "bulk OUT+IN echo, 4096 B",
}


def rate(op: Op, seconds: float) -> float:
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(16):
            op()
        count += 16
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    parser.add_argument("--repeat", type=int, default=5, help="measurements, best one kept")
    args = parser.parse_args()

    # One loopback device per client ("1-1", "1-2", ...), so all stay imported and the
    # measurements can be interleaved (fairer on a busy machine than one client at a time).
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()) for _ in CLIENTS])
    best: dict[str, dict[str, float]] = {}
    with ServerThread(exporter) as (host, port):
        clients: dict[str, dict[str, Op]] = {}
        closers: list[Callable[[], None]] = []
        try:
            for number, (name, make) in enumerate(CLIENTS.items(), start=1):
                try:
                    ops, close = make(host, port, f"1-{number}")
                except ImportError as exc:
                    print(f"({name}: skipped, {exc})")
                    continue
                clients[name] = ops
                closers.append(close)
                for op in ops.values():  # warm up
                    for _ in range(20):
                        op()
            for _ in range(args.repeat):
                for key in OPERATIONS:
                    for name, ops in clients.items():
                        measured = rate(ops[key], args.seconds)
                        rates = best.setdefault(name, {})
                        rates[key] = max(rates.get(key, 0.0), measured)
        finally:
            for close in closers:
                close()

    names = list(best)
    print(
        f"USB/IP round trips per second over loopback TCP: best of {args.repeat} x "
        f"{args.seconds:g} s (server: usbccid.frontends.usbip.server.ServerThread in this process)"
    )
    header = f"{'operation':36}" + "".join(f"{n:>10}" for n in names)
    header += "".join(f"{n + '/bare':>12}" for n in names if n != "bare")
    print(header)
    for key, label in OPERATIONS.items():
        row = f"{label:36}" + "".join(f"{best[n][key]:>10,.0f}" for n in names)
        if "bare" in best:
            row += "".join(
                f"{best[n][key] / best['bare'][key]:>12.2f}" for n in names if n != "bare"
            )
        print(row)


if __name__ == "__main__":
    main()
