"""A private pcscd with vpcd on the host, our front ends on a loop thread, and a pyscard
monitor: what the real-client tests in test_real_pcscd.py drive.

**The private pcscd.** pcsc-lite 1.9.9 (Debian 12) binds its socket at the compiled-in
``/run/pcscd/pcscd.comm`` and refuses to start while another pcscd's pid file names a live
process (pcscdaemon.c); only its *clients* honour ``PCSCLITE_CSOCK_NAME``
(winscard_msg.c ``getSocketName``). So the test's pcscd runs in a private mount namespace
(``unshare --mount``) with a temporary directory bind-mounted over ``/run/pcscd``: its
socket and pid file land in that directory, invisible to (and not clashing with) a
system or systemd-activated pcscd, and clients reach it through ``PCSCLITE_CSOCK_NAME``.
``-c DIR`` gives it a reader.conf.d of its own, with vpcd on free ports (vpcd listens on
the port and the next one, one per slot). ``-x`` (exit 60 s after the last client left)
is the safety net should the test process die without stopping it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar

from tests.conftest import require, require_tool
from usbccid.frontends.vpcd import VpcdFrontend

T = TypeVar("T")

VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
OPENSC_PKCS11 = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
SYSTEM_PYTHON = "/usr/bin/python3"  # python3-pyscard is packaged for Debian's own Python
MONITOR = Path(__file__).with_name("pcsc_monitor.py")


def free_port_pair() -> int:
    """A port P with P and P + 1 free on 0.0.0.0 (vpcd binds INADDR_ANY)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("0.0.0.0", 0))  # vpcd binds INADDR_ANY
            port = int(a.getsockname()[1])
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("0.0.0.0", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no two consecutive free ports")


class PrivatePcscd:
    """pcscd with only vpcd, on ports ``port`` and ``port + 1``, in ``directory``."""

    def __init__(self, directory: Path, port: int, *, conf_dir: Path | None = None) -> None:
        """``conf_dir``: a reader.conf.d to use as it is (the system's, say) instead of
        one of our own with vpcd on ``port``."""
        self.directory = directory
        self.port = port
        self.run_dir = directory / "run"
        self.conf_dir = conf_dir or directory / "reader.conf.d"
        self.log = directory / "pcscd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if conf_dir is None:
            self.conf_dir.mkdir(parents=True, exist_ok=True)
            # reader.conf(5); the vpcd driver takes the port after "/dev/null:" (ifd-vpcd.c)
            (self.conf_dir / "vpcd").write_text(
                'FRIENDLYNAME "Virtual PCD"\n'
                f"DEVICENAME   /dev/null:{port}\n"
                f"LIBPATH      {VPCD_DRIVER}\n"
                f"CHANNELID    {port}\n"
            )
        home = directory / "home"
        home.mkdir(exist_ok=True)
        # Clients: our socket; OpenSC's file cache (~/.cache/opensc) in a HOME of our own.
        self.env = {
            **os.environ,
            "PCSCLITE_CSOCK_NAME": str(self.run_dir / "pcscd.comm"),
            "HOME": str(home),
            "XDG_CACHE_HOME": str(home / ".cache"),
        }

    @staticmethod
    def check_requirements() -> None:
        require_tool("pcscd")
        require_tool("unshare")
        require(VPCD_DRIVER.exists(), f"{VPCD_DRIVER} is missing (vsmartcard-vpcd)")
        require(os.geteuid() == 0, "the private pcscd needs root (a mount namespace)")

    @property
    def socket_path(self) -> Path:
        return self.run_dir / "pcscd.comm"

    @property
    def running(self) -> bool:
        """pcscd itself runs (it writes its pid file when it starts)."""
        return (self.run_dir / "pcscd.pid").exists()

    def start(
        self, timeout: float = 10, *, socket_activated: bool = False, debug: bool = False
    ) -> None:
        """Start pcscd, or with ``socket_activated`` only its socket, as Debian's
        pcscd.socket does: ``systemd-socket-activate`` listens and starts pcscd (with
        ``--auto-exit``, as pcscd.service) when the first client connects."""
        assert self.proc is None
        Path("/run/pcscd").mkdir(parents=True, exist_ok=True)  # the bind mount's target
        pcscd = "pcscd --foreground --auto-exit" + (" --debug" if debug else "")
        if socket_activated:
            pcscd = f"systemd-socket-activate --listen=/run/pcscd/pcscd.comm {pcscd}"
        script = f'mount --bind "$1" /run/pcscd && exec {pcscd} -c "$2"'
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    *("unshare", "--mount", "--propagation", "private"),
                    *("sh", "-c", script, "sh", str(self.run_dir), str(self.conf_dir)),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.socket_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"pcscd did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def run(
        self, *args: str, timeout: float = 60, check: bool = True, stdin: bytes | None = None
    ) -> subprocess.CompletedProcess[str]:
        """A client command against this pcscd."""
        result = subprocess.run(
            list(args),
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=stdin.decode() if stdin is not None else None,
        )
        if check and result.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} exited {result.returncode}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
            )
        return result


class FrontendThread:
    """VpcdFrontend objects on an event loop in a background thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.frontends: list[VpcdFrontend] = []

    def __enter__(self) -> FrontendThread:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        async def close_all() -> None:
            for frontend in self.frontends:
                await frontend.close()

        self.run(close_all())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()

    def run(self, coroutine: Any, timeout: float = 30) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def call(self, fn: Callable[[], T]) -> T:
        async def in_loop() -> T:
            return fn()

        result: T = self.run(in_loop())
        return result

    def add(self, frontend: VpcdFrontend) -> VpcdFrontend:
        self.frontends.append(frontend)
        self.run(frontend.start())
        return frontend


@dataclass(frozen=True)
class ReaderEvent:
    t: float  # time.monotonic() in the monitor (CLOCK_MONOTONIC: comparable across processes)
    reader: str
    present: bool
    atr: bytes


class Monitor:
    """pcsc_monitor.py under Debian's Python (pyscard): card events of every reader."""

    def __init__(self, pcscd: PrivatePcscd) -> None:
        python = shutil.which(SYSTEM_PYTHON)
        require(python is not None, f"{SYSTEM_PYTHON} is missing")
        probe = subprocess.run(
            [SYSTEM_PYTHON, "-c", "import smartcard"], capture_output=True, check=False
        )
        require(probe.returncode == 0, "python3-pyscard is not installed")
        self.proc = subprocess.Popen(
            [SYSTEM_PYTHON, str(MONITOR)],
            env=pcscd.env,
            stdin=subprocess.PIPE,  # the monitor exits when this closes (our death too)
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        self.latest: dict[str, ReaderEvent] = {}  # the newest event of each reader
        self._changed = threading.Condition()
        assert self.proc.stdout is not None
        self._reader = threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True)
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            item = json.loads(line)
            event = ReaderEvent(
                item["t"], item["reader"], item["present"], bytes.fromhex(item["atr"])
            )
            with self._changed:
                self.latest[event.reader] = event
                self._changed.notify_all()

    def wait_for(
        self, reader: str, present: bool, *, after: float = 0.0, timeout: float = 10
    ) -> ReaderEvent:
        """The newest event of ``reader`` once it has that presence and happened at or
        after ``after`` (a time.monotonic() value)."""

        def seen() -> bool:
            event = self.latest.get(reader)
            return event is not None and event.present == present and event.t >= after

        with self._changed:
            if not self._changed.wait_for(seen, timeout):
                what = "insertion" if present else "removal"
                raise AssertionError(f"no {what} in {reader} within {timeout} s")
            return self.latest[reader]

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
