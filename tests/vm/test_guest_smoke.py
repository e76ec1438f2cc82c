"""The VM test bed itself works, without our server: kernel, tools, daemons, network path."""

from __future__ import annotations

import hashlib
import socketserver
import threading
from collections.abc import Iterator

import pytest

from tests.vm.guest import HOST, Guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]


def test_vhci_hcd_loaded(guest: Guest) -> None:
    r = guest.run(
        "lsmod | grep -w '^vhci_hcd' && test -d /sys/devices/platform/vhci_hcd.0"
        " && cat /sys/devices/platform/vhci_hcd.0/nports",
        timeout=30,
    ).check()
    assert int(r.stdout.split()[-1]) >= 8


def test_usbip_port_runs_and_has_tcp_port_option(guest: Guest) -> None:
    r = guest.run("usbip port", timeout=30).check()
    assert "Imported USB devices" in r.stdout
    r = guest.run("usbip --help 2>&1; true", timeout=30).check()
    assert "--tcp-port" in r.stdout


def test_pcscd_runs_and_answers(guest: Guest) -> None:
    r = guest.run(
        "pidof pcscd && test -S /run/pcscd/pcscd.comm"
        " && python3 -c 'from smartcard.System import readers; print(readers())'",
        timeout=60,
    ).check()
    assert r.stdout.strip().endswith("[]"), r


def test_pcscd_restartable(guest: Guest) -> None:
    r = guest.run(
        "old=$(pidof pcscd); pcscd-restart || exit 1; new=$(pidof pcscd);"
        ' echo "$old $new"; [ -n "$new" ] && [ "$old" != "$new" ]'
        " && python3 -c 'from smartcard.System import readers; print(readers())'",
        timeout=90,
    )
    assert r.ok, r


def test_opensc_libccid_and_coolkey_present(guest: Guest) -> None:
    # Debian's `opensc-tool --version` prints only "No Git revision info available".
    r = guest.run(
        "opensc-tool --version 2>&1 && opensc-tool --info && opensc-tool --list-readers 2>&1;"
        " ls /usr/lib/x86_64-linux-gnu/opensc-pkcs11.so /usr/lib/pkcs11/libcoolkeypk11.so"
        " /usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Linux/libccid.so",
        timeout=60,
    ).check()
    assert "OpenSC 0.23" in r.stdout
    assert "No smart card readers found" in r.stdout


def test_scenario_protocol(guest: Guest) -> None:
    r = guest.run("echo out; echo err >&2; exit 3", timeout=30)
    assert (r.rc, r.stdout, r.stderr, r.timed_out) == (3, "out\n", "err\n", False)
    blob = bytes(range(256)) * 4096
    path = guest.put_file("blob.bin", blob)
    r = guest.run(
        f"sha256sum {path} | cut -d' ' -f1; head -c 1000000 /dev/zero | tr '\\0' x",
        timeout=60,
    ).check()
    assert r.stdout.startswith(hashlib.sha256(blob).hexdigest() + "\n")
    assert r.stdout.endswith("x" * 1000000)


def test_timeout_kills_scenario_and_guest_goes_on(guest: Guest) -> None:
    r = guest.run("sleep 300 & echo started; sleep 300", timeout=3)
    assert r.timed_out
    assert r.stdout == "started\n"
    assert 3 <= r.elapsed < 20
    r = guest.run("pgrep -x sleep || echo none", timeout=30).check()
    assert r.stdout.strip() == "none"


class _Server(socketserver.ThreadingTCPServer):
    """A TCP server on 127.0.0.1 (an ephemeral port) that records what clients sent."""

    daemon_threads = True

    def __init__(self, handler: type[socketserver.BaseRequestHandler]) -> None:
        super().__init__(("127.0.0.1", 0), handler)
        self.received: list[bytes] = []

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Echo(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        data = self.request.recv(4096)
        self.server.received.append(data)
        self.request.sendall(b"echo:" + data)


class _DevList(socketserver.BaseRequestHandler):
    """A USB/IP server that exports nothing: OP_REP_DEVLIST with zero devices."""

    server: _Server

    def handle(self) -> None:
        data = self.request.recv(8)
        self.server.received.append(data)
        self.request.sendall(bytes.fromhex("0111 0005 00000000 00000000"))


def _serve(handler: type[socketserver.BaseRequestHandler]) -> Iterator[_Server]:
    server = _Server(handler)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        t.join(10)


@pytest.fixture
def echo_server() -> Iterator[_Server]:
    yield from _serve(_Echo)


@pytest.fixture
def devlist_server() -> Iterator[_Server]:
    yield from _serve(_DevList)


def test_guest_reaches_host_loopback_server(guest: Guest, echo_server: _Server) -> None:
    port = echo_server.port
    r = guest.run(
        "python3 - <<'EOF'\n"
        "import os, socket\n"
        f"s = socket.create_connection((os.environ['USBCCID_HOST'], {port}), timeout=20)\n"
        "s.sendall(b'hello from the guest')\n"
        "print(s.recv(100).decode())\n"
        "EOF",
        timeout=60,
    ).check()
    assert r.stdout.strip() == "echo:hello from the guest"
    assert echo_server.received == [b"hello from the guest"]


def test_usbip_tool_reaches_host_server_on_custom_port(
    guest: Guest, devlist_server: _Server
) -> None:
    port = devlist_server.port  # an ephemeral port, not 3240: proves --tcp-port is honoured
    r = guest.run(f"usbip --tcp-port {port} list -r {HOST}", timeout=60)
    assert r.rc == 0, r
    # OP_REQ_DEVLIST, exactly as the reference measured it.
    assert devlist_server.received == [bytes.fromhex("0111 8005 00000000")]
