"""``usbccid serve`` with VSCard readers, through the installed console script: the
``--vscard`` shortcut and a configuration file (TCP and UNIX listening, connecting to a
QEMU that listens), ``ctl status/remove/insert`` on them, ``--trace``, and leaving
cleanly on SIGTERM. QEMU is played by :class:`QemuPeer`; tests/vm/test_vscard.py has the
real one."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.helpers import BIN, assert_one_line_error, run, usbccid_env
from tests.frontends.vscard.helpers import OK, QemuPeer
from usbccid.cac.card import ATR_VCARD_NSS
from usbccid.frontends.vscard import wire

SELECT_CCC = bytes.fromhex("00a4040007a000000116db00")


@pytest.fixture
def state(tmp_path: Path, usbccid_state_template: Path) -> Path:
    directory = tmp_path / "state"
    shutil.copytree(usbccid_state_template, directory)
    # more stored cards (a card is in one slot at a time): a copy has its own PIN state
    for name in ("q1", "q2"):
        shutil.copytree(directory / "cards" / "default", directory / "cards" / name)
    return directory


@dataclass
class Serve:
    proc: subprocess.Popen[str]
    banner: list[str]

    def endpoint(self, reader: str = "reader0") -> str:
        for line in self.banner:
            m = re.match(rf"reader {reader}: vscard (\S+)$", line)
            if m:
                return m.group(1)
        raise AssertionError(self.banner)

    def tcp(self, reader: str = "reader0") -> tuple[str, int]:
        host, _, port = self.endpoint(reader).rpartition(":")
        return host, int(port)

    def stop(self) -> str:
        """SIGTERM; everything it wrote to stderr."""
        self.proc.send_signal(signal.SIGTERM)
        _, err = self.proc.communicate(timeout=30)
        return err


@contextmanager
def serving(args: Sequence[str | Path], state: Path) -> Iterator[Serve]:
    proc = subprocess.Popen(
        [str(BIN), "serve", "--state-dir", str(state), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=usbccid_env(),
    )
    banner: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                raise AssertionError(f"serve exited ({proc.wait()}): {proc.communicate()}")
            banner.append(line.rstrip("\n"))
            if line.startswith("control socket:"):
                break
        yield Serve(proc, banner)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def ctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run("ctl", "--state-dir", state, *args)
    assert result.returncode == 0, result
    return result


def _handshake(peer: QemuPeer) -> None:
    assert peer.handshake() == ATR_VCARD_NSS


def test_serve_vscard_ctl_trace_and_leave(state: Path) -> None:
    with serving(["--vscard", "127.0.0.1:0", "--trace"], state) as serve:
        text = "\n".join(serve.banner)
        assert "no USB/IP server" in text
        assert "PIN 12345678" in text
        host, port = serve.tcp()
        qemu_opts = (
            f"-usb -device usb-ccid -chardev socket,id=usbccid-reader0,host={host},port={port},"
            "reconnect=1,nodelay=on -device ccid-card-passthru,chardev=usbccid-reader0"
        )
        assert qemu_opts in text
        status = json.loads(ctl(state, "--json", "status").stdout)
        (reader,) = status["readers"]
        assert reader["frontend"] == "vscard"
        assert reader["client"] is None
        assert reader["slots"][0]["state"] == "present"
        assert "waiting for QEMU" in reader["slots"][0]["detail"]

        peer = QemuPeer.connect((host, port))
        _handshake(peer)
        assert peer.apdu(SELECT_CCC)[-2:] == b"\x61\x0d"  # T=0: GET RESPONSE follows
        text = ctl(state, "status").stdout
        assert f"reader reader0  vscard {host}:{port}" in text
        assert "(QEMU 127.0.0.1:" in text  # the slot detail: who holds the card
        assert "slot 0: active" in text
        assert "vscard_connections: 1" in text

        assert ctl(state, "remove", "reader0").stdout.strip() == "card removed from reader0 slot 0"
        peer.expect(wire.CardRemove)
        peer.send(wire.Error(OK, 0))
        assert "slot 0: empty" in ctl(state, "status").stdout
        ctl(state, "insert", f"{host}:{port}:0")  # the endpoint names the reader too
        (atr,) = peer.expect(wire.Atr)
        assert atr == wire.Atr(ATR_VCARD_NSS, 0)
        peer.send(wire.Error(OK, 0))
        assert peer.apdu(SELECT_CCC)[-2:] == b"\x61\x0d"

        err = serve.stop()
        assert [type(peer.recv()), type(peer.recv())] == [wire.CardRemove, wire.ReaderRemove]
        assert peer.at_eof()
        # --trace: the APDUs, the power cycle of the removal and re-insertion
        assert "reader0/0 > 00 a4 04 00 07 a0 00 00 01 16 db 00" in err
        assert err.count("reader0/0 ATR 3b 89 00 56 43 41 52 44 5f 4e 53 53") == 2
        assert "reader0/0 power off" in err


def test_config_unix_and_connect_readers_beside_usbip(state: Path, tmp_path: Path) -> None:
    qemu = socket.create_server(("127.0.0.1", 0))  # a QEMU with server=on
    qemu.settimeout(30)
    qport = qemu.getsockname()[1]
    sock_path = tmp_path / "q.sock"
    config = tmp_path / "usbccid.toml"
    config.write_text(
        f"""
[server]
port = 0

[[reader]]
name = "desk"

[[reader]]
name = "q1"
frontend = "vscard"
vscard = {{ listen = "{sock_path}" }}
  [[reader.slot]]
  card = "q1"

[[reader]]
name = "q2"
frontend = "vscard"
vscard = {{ connect = "127.0.0.1:{qport}" }}
  [[reader.slot]]
  card = "q2"
  inserted = false
"""
    )
    with serving(["--config", config], state) as serve:
        text = "\n".join(serve.banner)
        assert "USB/IP server listening on 127.0.0.1:" in text
        assert f"reader q1: vscard {sock_path}" in text
        assert f"chardev socket,id=usbccid-q1,path={sock_path},reconnect=1 " in text
        assert f"host=127.0.0.1,port={qport},server=on,wait=off,nodelay=on" in text
        one = QemuPeer.connect(str(sock_path))
        _handshake(one)
        sock, _ = qemu.accept()  # we connect to the listening QEMU
        two = QemuPeer(sock)
        assert two.handshake(card=False) is None  # configured removed
        ctl(state, "insert", "q2")
        assert two.expect(wire.Atr) == [wire.Atr(ATR_VCARD_NSS, 0)]
        two.send(wire.Error(OK, 0))
        assert two.apdu(SELECT_CCC)[-2:] == b"\x61\x0d"
        assert one.apdu(SELECT_CCC)[-2:] == b"\x61\x0d"
        status = json.loads(ctl(state, "--json", "status").stdout)
        assert [r["frontend"] for r in status["readers"]] == ["usbip", "vscard", "vscard"]
        assert [r["slots"][0]["state"] for r in status["readers"]] == [
            "present",
            "active",
            "active",
        ]
        serve.stop()
        assert not sock_path.exists()
    qemu.close()


def test_usage_errors(state: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    assert_one_line_error(
        run("serve", "--state-dir", state, "--vscard", "1", "--config", config),
        "--vscard is for the default card",
    )
    assert_one_line_error(
        run("serve", "--state-dir", state, "--vscard", "no-port"),
        "--vscard: 'no-port' is not HOST:PORT",
    )
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    assert_one_line_error(
        run("serve", "--state-dir", state, "--vscard", str(port)),
        f"reader reader0: cannot listen on 127.0.0.1:{port}: the address is in use",
    )
    busy.close()
    result = run("serve", "--state-dir", state, "--vscard", "2001", "--check")
    assert result.returncode == 0, result
    assert "OK (1 reader, 1 slot)" in result.stdout
