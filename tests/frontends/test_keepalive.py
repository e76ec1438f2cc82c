"""Dead importers are noticed (issue 11): TCP keepalive frees the device of a peer that
vanished without a FIN or RST, and a new import from the same host takes over a connection
that has missed a keepalive probe.

A peer is made to vanish for real: it runs in a network namespace behind a veth pair, and
a policy-routing rule in the namespace drops everything its connection sends (its ACKs to
our keepalive probes included), while the rest of that host keeps working.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.helpers import run, running_server
from tests.conftest import require, require_tool
from usbccid.frontends.usbip.server import Keepalive, configure_socket

NS = f"usbccid-ka-{os.getpid()}"
HOST_IP, PEER_IP = "10.199.7.1", "10.199.7.2"

#: An importer: OP_REQ_IMPORT for argv[3], prints "<status> <local port>", then holds the
#: connection until killed.
CLIENT = r"""
import socket, struct, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(struct.pack(">HHI32s", 0x0111, 0x8003, 0, sys.argv[3].encode()))
head = b""
while len(head) < 8:
    chunk = s.recv(8 - len(head))
    if not chunk:
        break
    head += chunk
status = struct.unpack(">HHI", head)[2] if len(head) == 8 else -1
print(status, s.getsockname()[1], flush=True)
time.sleep(600)
"""


def ip(*args: str) -> None:
    subprocess.run([require_tool("ip"), *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def namespace() -> Iterator[str]:
    require(os.geteuid() == 0, "network namespaces need root")
    require_tool("ip")
    try:
        ip("netns", "add", NS)
    except subprocess.CalledProcessError as exc:
        require(False, f"cannot make a network namespace: {exc.stderr!r}")
    try:
        ip("link", "add", f"{NS[:10]}h", "type", "veth", "peer", "name", "vpeer", "netns", NS)
        ip("addr", "add", f"{HOST_IP}/30", "dev", f"{NS[:10]}h")
        ip("link", "set", f"{NS[:10]}h", "up")
        ip("-n", NS, "addr", "add", f"{PEER_IP}/30", "dev", "vpeer")
        ip("-n", NS, "link", "set", "vpeer", "up")
        ip("-n", NS, "link", "set", "lo", "up")
        ip("-n", NS, "route", "add", "blackhole", "default", "table", "100")
        yield NS
    finally:
        subprocess.run(["ip", "link", "del", f"{NS[:10]}h"], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", NS], capture_output=True, check=False)


class Importer:
    """A CLIENT process in the namespace."""

    def __init__(self, port: int, busid: str = "1-1") -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", NS, sys.executable, "-c", CLIENT, HOST_IP, str(port), busid],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        status, local_port = self.proc.stdout.readline().split()
        self.status, self.port = int(status), int(local_port)

    def silence(self) -> None:
        """Drop everything this connection sends from now on (not even a FIN or RST)."""
        ip("-n", NS, "rule", "add", "sport", str(self.port), "lookup", "100")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def importer_of(state: Path) -> str | None:
    import json

    result = run("ctl", "--state-dir", state, "--json", "status")
    assert result.returncode == 0, result.stderr
    client: str | None = json.loads(result.stdout)["readers"][0]["client"]
    return client


def test_configure_socket_sets_the_keepalive_options() -> None:
    with socket.socket() as sock:
        configure_socket(sock, Keepalive(idle=7, interval=3, count=4))
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 19_000
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    # the defaults free a vanished importer's device within 60 s
    assert Keepalive().window <= 60


def test_a_vanished_importer_frees_its_device(
    namespace: str, tmp_path: Path, usbccid_state_template: Path
) -> None:
    import shutil

    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    config = tmp_path / "c.toml"
    config.write_text(
        f"[server]\nhost = '{HOST_IP}'\nallow = ['10.199.7.0/30']\n"
        "keepalive_idle = 1\nkeepalive_interval = 1\nkeepalive_count = 3\n"
    )
    # window: 1 + 1 * 3 = 4 s; a takeover needs 1 + 1 = 2 s of silence
    importers: list[Importer] = []
    try:
        with running_server(["--config", config], state) as server:
            first = Importer(server.port)
            importers.append(first)
            assert first.status == 0
            assert importer_of(state) == f"{PEER_IP}:{first.port}"

            # A live importer keeps its device against everyone, the same host included.
            second = Importer(server.port)
            importers.append(second)
            assert second.status == 2  # ST_DEV_BUSY

            first.silence()
            time.sleep(0.5)
            third = Importer(server.port)
            importers.append(third)
            assert third.status == 2, "silent for 0.5 s only: not taken over yet"

            time.sleep(2.5)  # silent for 3 s > idle + interval
            fourth = Importer(server.port)
            importers.append(fourth)
            assert fourth.status == 0, "the same host takes over a silent connection"
            assert importer_of(state) == f"{PEER_IP}:{fourth.port}"

            # Nobody takes it from a silent importer of another host: keepalive frees it.
            fourth.silence()
            t0 = time.monotonic()
            while importer_of(state) is not None:
                assert time.monotonic() - t0 < 4 + 3, "keepalive did not free the device"
                time.sleep(0.2)
            freed = time.monotonic() - t0
            assert freed > 1, freed  # not before the first probe could go unanswered
            again = Importer(server.port)
            importers.append(again)
            assert again.status == 0
            print(f"device freed {freed:.1f} s after its importer went silent (window 4 s)")
    finally:
        for imp in importers:
            imp.close()
