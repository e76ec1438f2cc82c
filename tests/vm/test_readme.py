"""The README, followed as written by a new user: install, serve, attach from a guest, sign.

The commands are read from README.md itself, so the README cannot drift from what works:

* the Quick start's first command (apt-get, venv, ``pip install .``, ``usbccid serve``)
  runs on the host in a fresh clone of this repository, as root (so ``sudo`` is left out,
  as the README says), with ``$STATE_DIRECTORY`` pointing at a temporary folder instead
  of /var/lib/usbccid;
* the "Then on the Linux host" block runs in the test guest, where the host's 127.0.0.1
  is 10.0.2.2 (the README's QEMU section says so) and the interactive ``pcsc_scan`` is
  left out;
* the signature it writes is verified on the host against the default card's ID
  certificate, and the Quick start's second command must be what ``.ci/run`` runs.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.conftest import require
from tests.vm.guest import HOST, Guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
USBIP_PORT = 3240  # the README's commands use the default port


def sh_blocks(text: str) -> list[str]:
    """The ```sh code blocks of a Markdown text, in order."""
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def section(text: str, start: str) -> str:
    index = text.index(start)
    return text[index:]


def as_root(command: str) -> str:
    """A command as root types it: the README's ``sudo`` left out."""
    return re.sub(r"\bsudo ", "", command)


def test_quick_start_test_command_is_what_ci_runs() -> None:
    text = README.read_text()
    quick_start = sh_blocks(section(text, "## Quick start"))
    assert quick_start[1].strip() == "sudo scripts/test"
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^exec scripts/test$", ci, flags=re.MULTILINE), ci


@pytest.fixture
def readme_server(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The Quick start's serve command, run in a fresh clone; yields (state dir, output)."""
    require(os.geteuid() == 0, "the README's install command needs root (apt-get)")
    serve = sh_blocks(section(README.read_text(), "## Quick start"))[0].strip()
    checkout = tmp_path / "checkout"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    state = tmp_path / "state"
    log = tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    env["STATE_DIRECTORY"] = str(state)
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
        while "control socket:" not in log.read_text(errors="replace"):
            assert proc.poll() is None, f"the README's serve command ended:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"no server after 600 s:\n{log.read_text()}"
            time.sleep(0.5)
        yield state, log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        shutil.rmtree(checkout / ".venv", ignore_errors=True)


def test_readme_walkthrough(readme_server: tuple[Path, str], vm_guest: Guest) -> None:
    state, output = readme_server
    # What `usbccid serve` promises on its first lines.
    assert f"listening on 127.0.0.1:{USBIP_PORT}" in output, output
    assert "usbip attach -r 127.0.0.1 -b 1-1" in output, output
    assert "PIN 12345678" in output, output

    text = README.read_text()
    host_block = sh_blocks(section(text, "Then on the Linux host"))[0]
    assert "--sign" in host_block, host_block
    lines = [
        as_root(line).replace("127.0.0.1", HOST)
        for line in host_block.replace("\\\n", " ").splitlines()
        if line.strip() and not line.startswith("pcsc_scan")
    ]
    script = "set -ex\ncd /tmp\n"
    for line in lines:
        script += line + "\n"
        if line.startswith("usbip attach"):
            # usbip attach returns before the kernel has enumerated the device, and pcscd
            # needs a moment to take the new reader.
            script += "wait-for 60 sh -c 'opensc-tool -l | grep -q Yes'\n"
    script += "echo SIG=$(od -An -v -tx1 data.sig | tr -d ' \\n')\n"
    result = vm_guest.run(script, timeout=300)
    assert result.ok, result
    assert "CAC ID Certificate" in result.stdout, result

    signature = bytes.fromhex(result.stdout.split("SIG=")[1].split()[0])
    cert_file = state / "cards" / "default" / "container-00.cert.pem"
    certificate = x509.load_pem_x509_certificate(cert_file.read_bytes())
    key = certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(signature, b"hello\n", padding.PKCS1v15(), hashes.SHA256())
