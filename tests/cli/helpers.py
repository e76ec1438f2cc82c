"""Helpers for the command-line tests: run the installed ``usbccid`` console script."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

BIN = Path(sys.executable).parent / "usbccid"


def usbccid_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "STATE_DIRECTORY")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run(
    *args: str | Path, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``usbccid ARGS`` to completion."""
    return subprocess.run(
        [str(BIN), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or usbccid_env(),
        check=False,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The run failed with status 1 and one line on stderr (no traceback) containing needles."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    line = lines[0]
    assert line.startswith("usbccid: error: "), line
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@dataclass
class Server:
    process: subprocess.Popen[str]
    host: str
    port: int
    state_dir: Path
    banner: list[str]

    def stderr_text(self) -> str:
        return ""


@contextmanager
def running_server(
    args: Sequence[str | Path], state_dir: Path, timeout: float = 60
) -> Iterator[Server]:
    """``usbccid serve --port 0 --state-dir STATE ARGS`` until its banner, stopped after."""
    cmd = [str(BIN), "serve", "--port", "0", "--state-dir", str(state_dir), *map(str, args)]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=usbccid_env()
    )
    banner: list[str] = []
    deadline = time.monotonic() + timeout
    host = ""
    port = 0
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError(f"server exited ({proc.wait()}): {err}")
            banner.append(line.rstrip("\n"))
            m = re.search(r"listening on \[?([0-9a-f.:]+)\]?:(\d+)", line)
            if m:
                host, port = m.group(1), int(m.group(2))
            if line.startswith("control socket:"):
                break
        else:
            raise AssertionError(f"no banner in time: {banner}")
        yield Server(proc, host, port, state_dir, banner)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def make_cert_and_key(
    directory: Path, name: str = "id", bits: int = 1024, passphrase: bytes | None = None
) -> tuple[Path, Path]:
    """A self-signed RSA certificate and its key as PEM files in ``directory``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"usbccid test {name}")])
    import datetime as dt

    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.pem"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return cert_path, key_path


def make_pkcs12(directory: Path, name: str, passphrase: bytes, bits: int = 1024) -> Path:
    from cryptography.hazmat.primitives.serialization import pkcs12

    cert_path, key_path = make_cert_and_key(directory, name, bits)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    data = pkcs12.serialize_key_and_certificates(
        name.encode(), key, cert, None, serialization.BestAvailableEncryption(passphrase)
    )
    path = directory / f"{name}.p12"
    path.write_bytes(data)
    return path
