"""``usbccid serve --vpcd`` as a user runs it, with a real pcscd + vpcd: the card in pcscd,
``usbccid ctl`` status / remove / insert reaching pcscd, ``--trace`` with the PIN redacted."""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.helpers import BIN, run, usbccid_env
from tests.conftest import require_tool
from tests.frontends.vpcd.realstack import (
    OPENSC_PKCS11,
    Monitor,
    PrivatePcscd,
    free_port_pair,
)

pytestmark = pytest.mark.slow

READER0 = "Virtual PCD 00 00"


@pytest.fixture
def pcscd(tmp_path: Path) -> Iterator[PrivatePcscd]:
    PrivatePcscd.check_requirements()
    require_tool("opensc-tool")
    require_tool("pkcs11-tool")
    daemon = PrivatePcscd(tmp_path / "pcscd", free_port_pair())
    daemon.start()
    try:
        yield daemon
    finally:
        daemon.stop()


def wait_for_line(path: Path, prefix: str, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if any(line.startswith(prefix) for line in text.splitlines()):
            return text
        if proc.poll() is not None:
            raise AssertionError(f"usbccid serve exited {proc.returncode}: {text}")
        time.sleep(0.05)
    raise AssertionError(f"no {prefix!r} line in time")


def test_serve_vpcd_end_to_end(
    pcscd: PrivatePcscd, tmp_path: Path, usbccid_state_template: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    address = f"127.0.0.1:{pcscd.port}"
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            [BIN, "serve", "--vpcd", address, "--trace", "--state-dir", state],
            stdout=stdout,
            stderr=stderr,
            env=usbccid_env(),
        )
    monitor = Monitor(pcscd)
    try:
        banner = wait_for_line(out, "control socket:", proc, 60)
        assert "no USB/IP server" in banner
        assert f"reader reader0: vpcd {address}" in banner
        assert "PIN 12345678" in banner
        monitor.wait_for(READER0, True, timeout=15)

        assert "Common Access Card" in pcscd.run("opensc-tool", "--reader", "0", "--name").stdout
        listed = pcscd.run(
            "pkcs11-tool",
            *("--module", str(OPENSC_PKCS11), "--login", "--pin", "12345678", "-O"),
        ).stdout
        assert listed.count("Private Key Object; RSA") == 3, listed

        status = run("ctl", "--state-dir", state, "status").stdout
        assert f"reader reader0  vpcd {address}" in status, status
        assert f"(vpcd {address}, connected;" in status, status
        assert "vpcd_connections: 1" in status

        removed_at = time.monotonic()
        result = run("ctl", "--state-dir", state, "remove", "reader0")
        assert result.returncode == 0, result.stderr
        monitor.wait_for(READER0, False, after=removed_at)
        assert "slot 0: empty" in run("ctl", "--state-dir", state, "status").stdout

        inserted_at = time.monotonic()
        result = run("ctl", "--state-dir", state, "insert", "reader0:0")
        assert result.returncode == 0, result.stderr
        monitor.wait_for(READER0, True, after=inserted_at)
        assert "Common Access Card" in pcscd.run("opensc-tool", "--reader", "0", "--name").stdout
    finally:
        monitor.close()
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err.read_text()
    trace = err.read_text()
    assert "reader0/0 ATR 3b 89 00 56 43 41 52 44 5f 4e 53 53" in trace
    assert "reader0/0 > 00 20 00 00 08 [8 bytes redacted]" in trace  # OpenSC's VERIFY
    assert "31 32 33 34 35 36 37 38" not in trace  # the PIN, in hex, never


def test_serve_vpcd_starts_a_socket_activated_pcscd_and_keeps_it(
    tmp_path: Path, usbccid_state_template: Path
) -> None:
    """Debian's pcscd is socket-activated and exits 60 s after its last PC/SC client
    (pcscd.service: --auto-exit). usbccid holds a PC/SC context while its card is in a
    local vpcd slot (frontends/vpcd/keepalive.py): that starts pcscd, and pcscd's exit
    alarm stays off after the other clients leave."""
    PrivatePcscd.check_requirements()
    require_tool("systemd-socket-activate")
    require_tool("opensc-tool")
    pcscd = PrivatePcscd(tmp_path / "pcscd", free_port_pair())
    pcscd.start(socket_activated=True, debug=True)
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    out, err = tmp_path / "serve.out", tmp_path / "serve.err"
    try:
        time.sleep(0.5)
        assert not pcscd.running  # only its socket: nobody has connected
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(
                [BIN, "serve", "--vpcd", f"127.0.0.1:{pcscd.port}", "--state-dir", state],
                stdout=stdout,
                stderr=stderr,
                env=usbccid_env({"PCSCLITE_CSOCK_NAME": pcscd.env["PCSCLITE_CSOCK_NAME"]}),
            )
        try:
            wait_for_line(out, "control socket:", proc, 60)
            deadline = time.monotonic() + 15
            while not pcscd.running:
                assert time.monotonic() < deadline, "usbccid did not start pcscd"
                time.sleep(0.05)
            deadline = time.monotonic() + 15
            while "Starting suicide alarm" not in pcscd.log.read_text(errors="replace"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            monitor = Monitor(pcscd)
            try:
                monitor.wait_for(READER0, True, timeout=15)
            finally:
                monitor.close()
            result = pcscd.run("opensc-tool", "--reader", "0", "--name")
            assert "Common Access Card" in result.stdout
            time.sleep(1.0)  # the clients have gone; only usbccid's context is left
            log = pcscd.log.read_text(errors="replace")
            # armed once at start (no client yet), never again: a context is still open
            assert log.count("Starting suicide alarm") == 1, log[-3000:]
        finally:
            proc.terminate()
            proc.wait(timeout=15)
    finally:
        pcscd.stop()
