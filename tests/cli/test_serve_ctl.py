"""``usbccid serve`` and ``usbccid ctl`` through the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.cli.helpers import (
    BIN,
    assert_one_line_error,
    make_pkcs12,
    run,
    running_server,
    usbccid_env,
)
from tests.conftest import require_tool


@pytest.fixture
def state(tmp_path: Path, usbccid_state_template: Path) -> Path:
    """A state directory that already holds the default card (generating it takes time)."""
    directory = tmp_path / "state"
    shutil.copytree(usbccid_state_template, directory)
    return directory


def ccid(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    return bytes([msg_type]) + struct.pack("<I", len(payload)) + bytes([0, seq, 0, 0, 0]) + payload


def exchange(host: str, port: int, apdus: list[bytes], busid: str = "1-1") -> list[bytes]:
    """Power the card on and send ``apdus`` over USB/IP (pyusb backend); the responses."""
    from usbccid.host.pyusb_backend import attach

    out = []
    with attach(host, port, busid) as dev:
        dev.set_configuration()
        dev.write(0x01, ccid(0x62, 0))
        dev.read(0x82, 65554, timeout=5000)
        for seq, apdu in enumerate(apdus, 1):
            dev.write(0x01, ccid(0x6F, seq, apdu))
            out.append(bytes(dev.read(0x82, 65554, timeout=10000))[10:])
    return out


def ctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("ctl", "--state-dir", state, *args)


def test_version_and_help() -> None:
    from usbccid import __version__

    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"usbccid {__version__}"
    result = subprocess.run(
        [sys.executable, "-m", "usbccid", "--version"], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == f"usbccid {__version__}"
    for args in ([], ["serve"], ["card"], ["card", "new"], ["card", "show"], ["ctl"]):
        result = run(*args, "--help")
        assert result.returncode == 0, result.stderr
        assert "usage: usbccid" in result.stdout
    assert "usbip attach" in run("--help").stdout
    assert "--allow CIDR" in run("serve", "--help").stdout


def test_usage_errors_are_one_line() -> None:
    for args in (
        ["frobnicate"],
        ["serve", "--port", "99999"],
        ["ctl"],
        ["serve", "--allow", "10.0.0.1/8"],
    ):
        result = run(*args)
        assert result.returncode == 2, result
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert "error:" in lines[0]
        assert "--help" in lines[0]


def test_serve_default_prints_attach_command_and_pin(state: Path) -> None:
    with running_server([], state) as server:
        text = "\n".join(server.banner)
        assert f"usbip --tcp-port {server.port} attach -r 127.0.0.1 -b 1-1" in text
        assert "PIN 12345678" in text
        assert f"control socket: {state / 'control.sock'}" in text
        assert (state / "control.sock").stat().st_mode & 0o777 == 0o600


def test_ctl_status_insert_remove(state: Path) -> None:
    with running_server([], state) as server:
        result = ctl(state, "status")
        assert result.returncode == 0, result.stderr
        assert "reader reader0  bus id 1-1  0e0f:0004" in result.stdout
        assert "slot 0: present" in result.stdout
        assert "not imported" in result.stdout

        from usbccid.host.pyusb_backend import attach

        with attach(server.host, server.port, "1-1") as dev:
            dev.set_configuration()
            assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x03])
            status = json.loads(ctl(state, "--json", "status").stdout)
            reader = status["readers"][0]
            assert reader["client"]
            assert reader["client"].startswith("127.0.0.1:")

            result = ctl(state, "remove", "reader0:0")
            assert result.returncode == 0
            assert "removed from reader0 slot 0" in result.stdout
            assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x02])  # NotifySlotChange
            assert "slot 0: empty" in ctl(state, "status").stdout

            result = ctl(state, "insert", "1-1")  # by bus id; slot defaults to 0
            assert result.returncode == 0, result.stderr
            assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x03])

            dev.write(0x01, ccid(0x62, 0))
            dev.read(0x82, 65554, timeout=5000)
            status = json.loads(ctl(state, "--json", "status").stdout)
            assert status["readers"][0]["slots"][0]["state"] == "active"
            assert status["readers"][0]["counters"]["power_ons"] == 1

        result = ctl(state, "reload")
        assert result.returncode == 0
        assert "reloaded: 0 card(s) changed" in result.stdout

        assert_one_line_error(ctl(state, "insert", "nope:0"), "no reader 'nope'", "reader0 (1-1)")
        assert_one_line_error(ctl(state, "remove", "reader0:3"), "no slot 3")
        assert_one_line_error(ctl(state, "insert", "reader0:x"), "the slot must be a number")


def test_ctl_without_server(tmp_path: Path) -> None:
    assert_one_line_error(
        ctl(tmp_path, "status"), "no usbccid server running", str(tmp_path / "control.sock")
    )
    assert_one_line_error(
        run("ctl", "--socket", tmp_path / "x.sock", "status"), "no usbccid server running"
    )


def test_port_in_use(state: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        result = run("serve", "--state-dir", state, "--port", str(port))
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}", "in use")
    assert not (state / "control.sock").exists()


def test_second_server_on_same_state_dir_is_refused(state: Path) -> None:
    with running_server([], state):
        result = run("serve", "--state-dir", state, "--port", "0")
        assert_one_line_error(result, "another usbccid server is running")
        assert ctl(state, "status").returncode == 0  # the first one is untouched


def test_two_servers_side_by_side(tmp_path: Path, usbccid_state_template: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(usbccid_state_template, a)
    with running_server([], a) as one, running_server([], b) as two:
        assert one.port != two.port
        for server, directory in ((one, a), (two, b)):
            status = json.loads(ctl(directory, "--json", "status").stdout)
            assert status["listen"] == f"127.0.0.1:{server.port}"
            assert status["pid"] == server.process.pid
        # each serves its own card
        pins = [
            json.loads(run("card", "show", "--state-dir", d, "--json").stdout)["card_id"]
            for d in (a, b)
        ]
        assert pins[0] != pins[1]
        select = bytes.fromhex("00a4040007a000000079010000")
        assert exchange(one.host, one.port, [select])[0][-2:] == b"\x90\x00"
        assert exchange(two.host, two.port, [select])[0][-2:] == b"\x90\x00"


def test_allow_list_closes_other_clients(state: Path) -> None:
    with running_server(["--allow", "192.0.2.0/24"], state) as server:
        with socket.create_connection((server.host, server.port), timeout=5) as s:
            try:
                s.sendall(struct.pack(">HHI", 0x0111, 0x8005, 0))  # OP_REQ_DEVLIST
                assert s.recv(100) == b""  # closed without an answer
            except ConnectionResetError:
                pass  # or reset, since we had sent data it never read
        status = json.loads(ctl(state, "--json", "status").stdout)
        assert status["counters"]["refused"] == 1
    with (
        running_server([], state) as server,
        socket.create_connection((server.host, server.port), timeout=5) as s,
    ):
        s.sendall(struct.pack(">HHI", 0x0111, 0x8005, 0))
        assert len(s.recv(100)) > 8  # loopback is allowed by default


def test_trace_redacts_pins(state: Path) -> None:
    with running_server(["--trace"], state) as server:
        verify = bytes.fromhex("0020000008") + b"12345678"
        exchange(server.host, server.port, [bytes.fromhex("00a4040007a000000079010000"), verify])
        server.process.terminate()
        assert server.process.stderr is not None
        err = server.process.stderr.read()
    assert "usbccid.tool.trace: reader0/0 > 00 a4 04 00 07 a0 00 00 00 79 01 00 00" in err
    assert "usbccid.tool.trace: reader0/0 > 00 20 00 00 08 [8 bytes redacted]" in err
    assert "31 32 33 34" not in err


def test_pcap_is_decoded_by_tshark(state: Path, tmp_path: Path) -> None:
    tshark = require_tool("tshark")
    pcap = tmp_path / "usb.pcap"
    with running_server(["--pcap", pcap], state) as server:
        exchange(server.host, server.port, [bytes.fromhex("00a4040007a000000079010000")])
    assert pcap.stat().st_mode & 0o777 == 0o600
    result = subprocess.run(
        [tshark, "-r", str(pcap), "-V"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for name in (
        "PC_to_RDR_IccPowerOn",
        "RDR_to_PC_DataBlock",
        "PC_to_RDR_XfrBlock",
        "bInterfaceClass: Smart Card",
    ):
        assert name in out, name


def test_config_card_from_files_errors(tmp_path: Path, state: Path) -> None:
    p12 = make_pkcs12(tmp_path, "sig", b"right")
    config = tmp_path / "c.toml"
    config.write_text(
        "[[reader]]\n[[reader.slot]]\n"
        f"containers = [{{ pkcs12 = '{p12.name}', passphrase = 'wrong' }}]\n"
    )
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, f"{config}:3:", "wrong passphrase")
    (tmp_path / "bad.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    (tmp_path / "bad.pem").write_text("nope")
    config.write_text(
        "[[reader]]\n[[reader.slot]]\ncontainers = [{ cert = 'bad.pem', key = 'bad.key' }]\n"
    )
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, f"{config}:3:")
    config.write_text(
        "[[reader]]\n[[reader.slot]]\n"
        f"containers = [{{ pkcs12 = '{p12.name}', passphrase = 'right' }}]\npin = '2468'\n"
    )
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert result.returncode == 0, result.stderr
    assert "OK (1 reader, 1 slot)" in result.stdout
    config.write_text(
        "[[reader]]\n[[reader.slot]]\n"
        f"containers = [{{ pkcs12 = '{p12.name}', passphrase_env = 'P12_PASS' }}]\n"
    )
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, f"{config}:3:", "environment variable P12_PASS is not set")
    env = usbccid_env({"P12_PASS": "right"})
    result = run("serve", "--config", config, "--state-dir", state, "--check", env=env)
    assert result.returncode == 0, result.stderr


def test_serve_with_config_file(tmp_path: Path, state: Path) -> None:
    p12 = make_pkcs12(tmp_path, "sig", b"pw")
    config = tmp_path / "c.toml"
    config.write_text(
        "[server]\nhost = '127.0.0.1'\n\n"
        "[[reader]]\nname = 'desk'\nidentity = 'qemu'\n[[reader.slot]]\ncard = 'default'\n"
        "[[reader.slot]]\ncard = 'none'\n\n"
        "[[reader]]\nname = 'lab'\n[[reader.slot]]\n"
        f"containers = [{{ pkcs12 = '{p12.name}', passphrase = 'pw' }}]\n"
        "pin = '2468'\ninserted = false\n"
    )
    with running_server(["--config", config], state) as server:
        text = "\n".join(server.banner)
        assert "reader desk: bus id 1-1, 08e6:4433" in text
        assert "reader lab: bus id 1-2" in text
        assert "card from files (1 container), removed, PIN 2468" in text
        assert f"usbip --tcp-port {server.port} attach -r 127.0.0.1 -b 1-2" in text
        status = json.loads(ctl(state, "--json", "status").stdout)
        assert [s["state"] for s in status["readers"][0]["slots"]] == ["present", "empty"]
        assert status["readers"][1]["slots"][0]["state"] == "empty"
        assert_one_line_error(ctl(state, "insert", "desk:1"), "configured empty")
        assert ctl(state, "insert", "lab").returncode == 0
        select = bytes.fromhex("00a4040007a000000079010000")
        assert exchange(server.host, server.port, [select], busid="1-2")[0][-2:] == b"\x90\x00"
        # reload picks up a changed PIN policy for the file-based card
        config.write_text(config.read_text().replace("pin = '2468'", "pin = '1357'"))
        result = ctl(state, "reload")
        assert "1 card(s) changed (lab:0)" in result.stdout, result


def test_sigterm_stops_cleanly(state: Path) -> None:
    with running_server([], state) as server:
        server.process.terminate()
        assert server.process.wait(timeout=15) == 0
    assert not (state / "control.sock").exists()


def test_runtime_directory_holds_the_socket(tmp_path: Path, state: Path) -> None:
    runtime = tmp_path / "run"
    runtime.mkdir()
    env = usbccid_env({"RUNTIME_DIRECTORY": str(runtime)})
    proc = subprocess.Popen(
        [str(BIN), "serve", "--port", "0", "--state-dir", str(state)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        deadline = time.monotonic() + 30
        while not (runtime / "control.sock").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        result = run("ctl", "status", env={**env, "HOME": str(tmp_path)})
        assert result.returncode == 0, result.stderr
    finally:
        proc.terminate()
        proc.communicate(timeout=15)
    assert os.path.exists(state)


def test_example_systemd_unit_verifies(tmp_path: Path) -> None:
    analyze = require_tool("systemd-analyze")
    root = Path(__file__).resolve().parents[2]
    text = (
        (root / "examples" / "usbccid.service")
        .read_text()
        .replace("/usr/local/bin/usbccid", str(BIN))
    )
    unit = tmp_path / "usbccid.service"
    unit.write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    # the configuration its ExecStart names is the example's shape, and --check accepts it
    result = run(
        "serve",
        "--config",
        root / "examples" / "usbccid.toml",
        "--check",
        "--state-dir",
        tmp_path / "s",
    )
    assert result.returncode == 0, result.stderr
