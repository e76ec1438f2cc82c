"""The README's "Without a kernel module: vpcd" section, followed as written, on the host.

The commands are read from README.md itself:

* the first block's install line runs as root (``sudo`` left out, as the README says for
  root), and so does its pcscd restart, with one substitution: this machine has no
  systemd, so "restart pcscd" starts a pcscd of the test's own (realstack.PrivatePcscd)
  with the system's ``/etc/reader.conf.d`` — the vsmartcard-vpcd configuration the
  install line put there, vpcd on its default ports 35963 and 35964;
* its serve line runs in a fresh clone of this repository, with ``$STATE_DIRECTORY``
  pointing at a temporary folder;
* the second block runs line by line as a client of that pcscd, once usbccid has logged
  ``connected, card inserted`` (as the README says) and pcscd shows the card (its next
  presence poll, within 0.4 s); the signature it writes is verified against the default
  card's ID certificate.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import require
from tests.frontends.vpcd.realstack import PrivatePcscd
from tests.vm.test_readme import as_root, section, sh_blocks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[3]
README = REPO / "README.md"
SECTION = "## Without a kernel module: vpcd"
VPCD_PORTS = (35963, 35964)  # Debian's /etc/reader.conf.d/vpcd: CHANNELID 0x8C7B, 2 slots


def _blocks() -> list[str]:
    text = section(README.read_text(), SECTION)
    end = text.find("\n## ", len(SECTION))
    return sh_blocks(text[: end if end > 0 else None])


def _lines(block: str) -> list[str]:
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))  # vpcd binds INADDR_ANY
        except OSError:
            return False
    return True


def test_the_section_has_what_this_test_expects() -> None:
    setup, client = _blocks()[:2]
    install, restart, serve = _lines(setup)
    assert install.startswith("sudo apt-get update && sudo apt-get install -y ")
    assert restart == "sudo systemctl restart pcscd"
    assert serve.endswith(".venv/bin/usbccid serve --vpcd")
    assert "--sign" in client
    assert "connected, card inserted" in section(README.read_text(), SECTION)


@pytest.fixture
def readme_setup(tmp_path: Path) -> Iterator[tuple[PrivatePcscd, Path]]:
    """The first block: install, (re)start pcscd, serve from a fresh clone."""
    require(os.geteuid() == 0, "the README's commands need root (apt-get)")
    require(all(_port_free(p) for p in VPCD_PORTS), "vpcd's default ports are in use")
    install, restart, serve = _lines(_blocks()[0])
    subprocess.run(["bash", "-c", as_root(install)], check=True, timeout=900)
    assert as_root(restart) == "systemctl restart pcscd"  # what we do instead:
    PrivatePcscd.check_requirements()
    pcscd = PrivatePcscd(tmp_path / "pcscd", VPCD_PORTS[0], conf_dir=Path("/etc/reader.conf.d"))
    assert "0x8C7B" in (pcscd.conf_dir / "vpcd").read_text()
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    state = tmp_path / "state"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env["STATE_DIRECTORY"] = str(state)
    env["PCSCLITE_CSOCK_NAME"] = pcscd.env["PCSCLITE_CSOCK_NAME"]  # our pcscd, not /run's
    pcscd.start()
    try:
        with log.open("wb") as out:
            proc = subprocess.Popen(
                ["bash", "-c", as_root(serve)],
                cwd=checkout,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            deadline = time.monotonic() + 600
            while "connected, card inserted" not in log.read_text(errors="replace"):
                assert proc.poll() is None, f"the README's serve line ended:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"no server after 600 s:\n{log.read_text()}"
                time.sleep(0.5)
            yield pcscd, state
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    finally:
        pcscd.stop()
        shutil.rmtree(checkout / ".venv", ignore_errors=True)


def test_readme_vpcd_walkthrough(readme_setup: tuple[PrivatePcscd, Path], tmp_path: Path) -> None:
    pcscd, state = readme_setup
    deadline = time.monotonic() + 10
    while "Yes" not in pcscd.run("opensc-tool", "--list-readers", check=False).stdout:
        assert time.monotonic() < deadline, "pcscd does not show the card"
        time.sleep(0.1)
    work = tmp_path / "work"
    work.mkdir()
    outputs = []
    for line in _lines(_blocks()[1]):
        result = subprocess.run(
            ["bash", "-c", as_root(line)],
            cwd=work,
            env=pcscd.env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert result.returncode == 0, (line, result.stdout, result.stderr)
        outputs.append(result.stdout + result.stderr)
    assert "Common Access Card" in outputs[0], outputs[0]
    assert re.search(r"Certificate Object.*\n\s+label:\s+CAC ID Certificate", outputs[1]), outputs

    signature = (work / "data.sig").read_bytes()
    cert_file = state / "cards" / "default" / "container-00.cert.pem"
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(signature, b"hello\n", padding.PKCS1v15(), hashes.SHA256())
