"""A Debian 12 QEMU guest that runs shell scenarios with the real Linux USB/smart-card stack.

The guest (built and cached by ``scripts/vm/build-guest``) boots once under TCG and then
runs any number of scenarios, one at a time, each a bash script, exchanged through a 9p
share. Inside the guest the host's loopback is ``10.0.2.2`` (:data:`HOST`), so a server
that a test starts on ``127.0.0.1:PORT`` is reached there as ``10.0.2.2:PORT``::

    with Guest() as guest:                       # builds (cached) and boots; ~15-25 s
        r = guest.run("usbip --tcp-port 3240 list -r 10.0.2.2", timeout=60)
        assert r.rc == 0, r
        r.check()                                # or: raise GuestCommandError unless rc == 0
        guest.put_file("probe.py", b"...")        # then /share/files/probe.py in the guest

In the guest, scenarios run as root with cwd /root, PATH including the helpers of
scripts/vm/in-guest/bin (pcscd-start, pcscd-stop, pcscd-restart, usbip-detach-all,
wait-for), and $USBCCID_HOST=10.0.2.2. State (attached ports, pcscd) persists between
scenarios of one boot: clean up after yourself (``usbip-detach-all``).

By hand (stdlib only, root, from anywhere)::

    scripts/vm/guest run 'lsusb; usbip port'          # boot, run, power off
    scripts/vm/guest run -t 300 "$(cat my-scenario.sh)"
    scripts/vm/guest shell                             # boot; read scenarios from stdin
    scripts/vm/guest build                             # build/refresh the cached image
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

REPO = Path(__file__).resolve().parents[2]
VM_SCRIPTS = REPO / "scripts" / "vm"
BUILD_GUEST = VM_SCRIPTS / "build-guest"
IN_GUEST = VM_SCRIPTS / "in-guest"

#: The host's 127.0.0.1 as the guest sees it (QEMU user networking).
HOST = "10.0.2.2"
#: Where the host's share folder is mounted in the guest; put_file() writes to SHARE/files.
SHARE = "/share"
#: Seconds added to a scenario's own timeout before the host gives up on the guest.
HOST_MARGIN = 60.0


class GuestError(RuntimeError):
    """The guest could not be built, booted, or did not answer."""


class GuestTimeoutError(GuestError):
    """The guest did not answer in time (it is then considered dead)."""


class GuestCommandError(GuestError):
    """A scenario exited non-zero (raised by :meth:`Result.check`)."""

    def __init__(self, result: Result) -> None:
        super().__init__(f"guest scenario failed: {result}")
        self.result = result


@dataclass(frozen=True)
class Result:
    """What a scenario did: exit status (-SIGNAL if killed), output, and wall time."""

    rc: int
    stdout: str
    stderr: str
    elapsed: float
    timed_out: bool = False
    script: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def check(self) -> Result:
        """Return self, or raise :class:`GuestCommandError` if the scenario failed."""
        if not self.ok:
            raise GuestCommandError(self)
        return self

    def __str__(self) -> str:
        def tail(s: str, n: int = 3000) -> str:
            return s if len(s) <= n else "[...]" + s[-n:]

        state = "TIMED OUT" if self.timed_out else f"rc={self.rc}"
        return (
            f"{state} after {self.elapsed:.1f}s\n--- script ---\n{tail(self.script)}\n"
            f"--- stdout ---\n{tail(self.stdout)}\n--- stderr ---\n{tail(self.stderr)}"
        )


def _qemu() -> str:
    path = shutil.which("qemu-system-x86_64")
    if path is None:
        raise GuestError("qemu-system-x86_64 is not installed (apt-get install qemu-system-x86)")
    return path


def cached_image() -> Path | None:
    """The cached image folder for the current build inputs, or None if not built yet."""
    proc = subprocess.run(
        [str(BUILD_GUEST), "--cached"], capture_output=True, text=True, check=False
    )
    return Path(proc.stdout.strip()) if proc.returncode == 0 else None


def build_image(force: bool = False) -> Path:
    """Build the guest image unless cached (needs root; ~40 s cold); return its folder."""
    cmd = [str(BUILD_GUEST)] + (["--force"] if force else [])
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
    if proc.returncode != 0:
        raise GuestError(f"{BUILD_GUEST} failed with exit status {proc.returncode}")
    image = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("rootfs.ext4", "vmlinuz", "initrd.img"):
        if not (image / name).is_file():
            raise GuestError(f"{image / name} is missing")
    return image


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.chmod(mode)
    tmp.rename(path)


class Guest:
    """One booted QEMU guest; a context manager that powers it off and kills QEMU.

    ``image``: the image folder (default: build or reuse the cached one).
    ``workdir``: where the share folder, console.log and qemu.log go (default: a temporary
    folder, removed on close unless ``keep_workdir``).
    ``extra_qemu_args``: e.g. ``["-usb", "-device", "usb-ccid", ...]`` for a reference run.
    """

    def __init__(
        self,
        image: Path | None = None,
        *,
        workdir: Path | None = None,
        keep_workdir: bool = False,
        memory: str = "1G",
        smp: int = 1,
        boot_timeout: float = 300.0,
        idle_timeout: float = 3600.0,
        start_pcscd: bool = True,
        extra_qemu_args: Sequence[str] = (),
    ) -> None:
        self._image = image
        self._own_workdir = workdir is None
        self.workdir = (
            Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="usbccid-vm-"))
        )
        self.keep_workdir = keep_workdir
        self.memory = memory
        self.smp = smp
        self.boot_timeout = boot_timeout
        self.idle_timeout = idle_timeout
        self.start_pcscd = start_pcscd
        self.extra_qemu_args = list(extra_qemu_args)
        self.share = self.workdir / "share"
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        self.boot_seconds: float | None = None
        self.kernel_release: str | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._dead: str | None = None

    # -- life cycle -------------------------------------------------------------------

    def __enter__(self) -> Guest:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def qemu_command(self, image: Path) -> list[str]:
        append = " ".join(
            [
                "root=/dev/vda rw rootfstype=ext4 console=ttyS0",
                "init=/sbin/usbccid-init panic=-1 loglevel=4",
                "net.ifnames=0 biosdevname=0 mitigations=off",
            ]
        )
        return [
            _qemu(),
            "-name", "usbccid-guest",
            "-accel", "tcg,thread=multi" if self.smp > 1 else "tcg",
            "-m", self.memory,
            "-smp", str(self.smp),
            "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-monitor", "none",
            "-serial", f"file:{self.console_log}",
            "-kernel", str(image / "vmlinuz"),
            "-initrd", str(image / "initrd.img"),
            "-append", append,
            "-drive", f"file={image / 'rootfs.ext4'},if=virtio,format=raw,snapshot=on",
            "-netdev", "user,id=n0",
            "-device", "virtio-net-pci,netdev=n0",
            "-device", "virtio-rng-pci",
            "-virtfs", f"local,path={self.share},mount_tag=share,security_model=none,id=share",
            *self.extra_qemu_args,
        ]  # fmt: skip

    def start(self) -> Guest:
        """Boot the guest and wait until its scenario loop is ready."""
        if self._proc is not None:
            raise GuestError("guest already started")
        image = self._image if self._image is not None else build_image()
        for sub in ("in", "out", "files"):
            (self.share / sub).mkdir(parents=True, exist_ok=True)
        boot = self.share / "boot"
        if boot.exists():
            shutil.rmtree(boot)
        shutil.copytree(IN_GUEST, boot, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (boot / "config").write_text(
            f"IDLE_TIMEOUT={int(self.idle_timeout)}\nSTART_PCSCD={int(self.start_pcscd)}\n"
        )
        env = dict(os.environ, TMPDIR=str(self.workdir))  # -snapshot's overlay goes there
        t0 = time.monotonic()
        with open(self.qemu_log, "wb") as log:
            self._proc = subprocess.Popen(
                self.qemu_command(image),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        ready = self.share / "out" / "ready"
        while not ready.exists():
            self._check_alive("while booting")
            if time.monotonic() - t0 > self.boot_timeout:
                self._kill()
                raise GuestTimeoutError(
                    f"guest not ready after {self.boot_timeout:.0f} s\n{self.console_tail()}"
                )
            time.sleep(0.1)
        self.boot_seconds = time.monotonic() - t0
        self.kernel_release = ready.read_text().split("\n", 1)[0].strip()
        return self

    def close(self, timeout: float = 30.0) -> None:
        """Ask the guest to power off; kill QEMU if it has not exited within ``timeout``."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                _write_atomic(self.share / "in" / "poweroff", b"")
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self._kill()
        self._dead = self._dead or "guest closed"
        if self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill(self) -> None:
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)

    def _check_alive(self, doing: str) -> None:
        proc = self._proc
        if proc is None:
            raise GuestError("guest not started")
        if proc.poll() is not None:
            self._dead = f"QEMU exited with status {proc.returncode} {doing}"
            qemu = self.qemu_log.read_text(errors="replace")[-2000:]
            raise GuestError(f"{self._dead}\n--- qemu ---\n{qemu}\n{self.console_tail()}")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and self._dead is None

    def console_tail(self, lines: int = 40) -> str:
        try:
            text = self.console_log.read_text(errors="replace")
        except OSError:
            return "--- console: none ---"
        return "--- console (tail) ---\n" + "\n".join(text.splitlines()[-lines:])

    # -- scenarios ----------------------------------------------------------------------

    def put_file(self, name: str, data: bytes | str, mode: int = 0o644) -> str:
        """Place a file in the share; return its path in the guest (/share/files/NAME)."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"plain file name expected, not {name!r}")
        raw = data.encode() if isinstance(data, str) else data
        _write_atomic(self.share / "files" / name, raw, mode)
        return f"{SHARE}/files/{name}"

    def run(self, script: str, timeout: float = 120.0) -> Result:
        """Run ``script`` with bash in the guest; kill it after ``timeout`` seconds.

        Returns the result whatever the exit status (see :meth:`Result.check`). Raises
        :class:`GuestTimeoutError` if the guest itself does not answer within ``timeout`` plus
        :data:`HOST_MARGIN` (the guest is then dead), :class:`GuestError` if QEMU is gone.
        """
        with self._lock:
            if self._dead is not None:
                raise GuestError(f"guest unusable: {self._dead}")
            self._check_alive("before the scenario")
            n = next(self._ids)
            body = f"# usbccid-timeout: {timeout}\n{script}\n"
            out = self.share / "out" / f"{n:04d}.json"
            _write_atomic(self.share / "in" / f"{n:04d}.sh", body.encode())
            deadline = time.monotonic() + timeout + HOST_MARGIN
            while not out.exists():
                self._check_alive(f"during scenario {n}")
                if time.monotonic() > deadline:
                    self._dead = f"no answer to scenario {n} within {timeout + HOST_MARGIN:.0f} s"
                    self._kill()
                    raise GuestTimeoutError(f"{self._dead}\n{self.console_tail()}")
                time.sleep(0.02)
            data = json.loads(out.read_text())
            return Result(
                rc=int(data["rc"]),
                stdout=str(data["stdout"]),
                stderr=str(data["stderr"]),
                elapsed=float(data["elapsed"]),
                timed_out=bool(data["timed_out"]),
                script=script,
            )


# -- command line -------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="scripts/vm/guest", description=__doc__.split("\n")[0])
    ap.add_argument("--keep", action="store_true", help="keep the work folder (console.log)")
    ap.add_argument("--smp", type=int, default=1)
    ap.add_argument("--no-pcscd", action="store_true", help="do not start pcscd at boot")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("build", help="build or refresh the cached image; print its folder")
    r = sub.add_parser("run", help="boot, run each SCRIPT as a scenario, power off")
    r.add_argument("script", nargs="+")
    r.add_argument("-t", "--timeout", type=float, default=120.0)
    sub.add_parser("shell", help="boot; run each line of stdin as a scenario")
    args = ap.parse_args(argv)

    if args.cmd == "build":
        print(build_image())
        return 0
    t0 = time.monotonic()
    rc = 0
    with Guest(keep_workdir=args.keep, smp=args.smp, start_pcscd=not args.no_pcscd) as g:
        print(
            f"# booted {g.kernel_release} in {g.boot_seconds:.1f} s (work folder {g.workdir})",
            file=sys.stderr,
        )
        scripts: Sequence[str] = args.script if args.cmd == "run" else []
        lines = iter(scripts) if args.cmd == "run" else (ln.rstrip("\n") for ln in sys.stdin)
        for script in lines:
            t1 = time.monotonic()
            res = g.run(script, timeout=getattr(args, "timeout", 120.0))
            sys.stdout.write(res.stdout)
            sys.stdout.flush()
            sys.stderr.write(res.stderr)
            print(
                f"# rc={res.rc}{' TIMED OUT' if res.timed_out else ''} in guest "
                f"{res.elapsed:.2f} s, round trip {time.monotonic() - t1:.2f} s",
                file=sys.stderr,
            )
            rc = rc or res.rc or (124 if res.timed_out else 0)
    print(f"# total {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
