"""Real tokens for the card-source tests: SoftHSM2 tokens and NSS databases, made per test.

The tokens are built with the real tools (``softhsm2-util``, ``pkcs11-tool``,
``certutil``, ``pk12util``); keys are generated on the token (non-extractable) where the
tool allows it, and certified by a throwaway CA made here. SoftHSM reads its
configuration and scans its token directory in ``C_Initialize``, so each fixture
finalises the module, builds its tokens, then lets the source load it again.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from tests.conftest import require, require_tool
from usbccid.cards.pkcs11 import Module

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
SO_PIN = "77777777"
USER_PIN = "12345678"
LABEL = "CAC test"

_NOW = datetime.datetime.now(datetime.UTC)


@dataclass
class ThrowawayCa:
    key: rsa.RSAPrivateKey
    certificate: x509.Certificate

    def issue(self, public: rsa.RSAPublicKey, cn: str) -> x509.Certificate:
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(self.certificate.subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(_NOW - datetime.timedelta(days=1))
            .not_valid_after(_NOW + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )


def new_ca() -> ThrowawayCa:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "usbccid token test CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(_NOW - datetime.timedelta(days=1))
        .not_valid_after(_NOW + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    return ThrowawayCa(key, cert)


@pytest.fixture(scope="session")
def throwaway_ca() -> ThrowawayCa:
    return new_ca()


def run(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> str:
    done = subprocess.run(
        args, capture_output=True, text=True, env=env, input=stdin, timeout=120, check=False
    )
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: exit {done.returncode}: {done.stderr.strip()}")
    return done.stdout


def finalize_module(path: str) -> None:
    module = Module._loaded.get(path)
    if module is not None:
        module.finalize()


@dataclass
class SoftHsm:
    """A SoftHSM2 configuration with one token; keys and certificates added on demand."""

    directory: Path
    conf: Path
    ca: ThrowawayCa
    label: str = LABEL
    pin: str = USER_PIN
    module: str = SOFTHSM_MODULE
    certificates: dict[str, x509.Certificate] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf)}

    def tool(self, *args: str) -> str:
        return run(require_tool("pkcs11-tool"), "--module", self.module, *args, env=self.env)

    def add_key(self, key_id: str, bits: int, label: str, *, certificate: bool = True) -> None:
        """An RSA key pair generated on the token, and (by default) its certificate."""
        self.tool(
            "--login", "--pin", self.pin, "--keypairgen", "--key-type", f"rsa:{bits}",
            "--id", key_id, "--label", label,
        )  # fmt: skip
        if certificate:
            der = self.directory / f"pub{key_id}.der"
            self.tool("--read-object", "--type", "pubkey", "--id", key_id, "-o", str(der))
            public = serialization.load_der_public_key(der.read_bytes())
            assert isinstance(public, rsa.RSAPublicKey)
            self.add_certificate(key_id, label, self.ca.issue(public, f"TOKEN.{label}"))

    def add_certificate(self, key_id: str, label: str, cert: x509.Certificate) -> None:
        der = self.directory / f"cert{key_id}.der"
        der.write_bytes(cert.public_bytes(serialization.Encoding.DER))
        self.tool(
            "--login", "--pin", self.pin, "--write-object", str(der), "--type", "cert",
            "--id", key_id, "--label", label,
        )  # fmt: skip
        self.certificates[key_id] = cert

    def serial(self) -> str:
        out = self.tool("--list-token-slots")
        for line in out.splitlines():
            if "serial num" in line:
                return line.split(":", 1)[1].strip()
        raise AssertionError(out)


def make_softhsm(directory: Path, ca: ThrowawayCa, *, mechanisms: str | None = None) -> SoftHsm:
    require(Path(SOFTHSM_MODULE).exists(), "SoftHSM2 (Debian softhsm2) is not installed")
    util = require_tool("softhsm2-util")
    require_tool("pkcs11-tool")
    finalize_module(SOFTHSM_MODULE)
    tokens = directory / "tokens"
    tokens.mkdir(parents=True)
    conf = directory / "softhsm2.conf"
    lines = [
        f"directories.tokendir = {tokens}",
        "objectstore.backend = file",
        "slots.removable = true",
        "log.level = ERROR",
    ]
    if mechanisms is not None:
        lines.append(f"slots.mechanisms = {mechanisms}")
    conf.write_text("\n".join(lines) + "\n")
    hsm = SoftHsm(directory, conf, ca)
    run(
        util, "--init-token", "--free", "--label", LABEL, "--so-pin", SO_PIN, "--pin", USER_PIN,
        env=hsm.env,
    )  # fmt: skip
    return hsm


@pytest.fixture
def hsm(
    tmp_path: Path, throwaway_ca: ThrowawayCa, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SoftHsm]:
    """A token "CAC test" (PIN 12345678) with RSA-2048 key 01, RSA-1024 key 02, both
    certified, and a CA certificate (id 0a) without a key."""
    h = make_softhsm(tmp_path, throwaway_ca)
    h.add_key("01", 2048, "id")
    h.add_key("02", 1024, "sign")
    h.add_certificate("0a", "ca", throwaway_ca.certificate)
    monkeypatch.setenv("SOFTHSM2_CONF", str(h.conf))
    yield h
    finalize_module(SOFTHSM_MODULE)


@pytest.fixture
def hsm_no_raw(
    tmp_path: Path, throwaway_ca: ThrowawayCa, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SoftHsm]:
    """The same token on a SoftHSM without CKM_RSA_X_509 (libcacard's hwtests_no_raw).

    A positive list, as libcacard's test: SoftHSM 2.6.1 (Debian 12) ignores the first entry
    of a negative one ("-CKM_RSA_X_509" is looked up with its minus sign; fixed in 2.7.0,
    cfe1f7fd), so that form would leave CKM_RSA_X_509 enabled.
    """
    h = make_softhsm(tmp_path, throwaway_ca, mechanisms="CKM_RSA_PKCS_KEY_PAIR_GEN,CKM_RSA_PKCS")
    h.add_key("01", 2048, "id")
    h.add_key("02", 1024, "sign")
    monkeypatch.setenv("SOFTHSM2_CONF", str(h.conf))
    yield h
    finalize_module(SOFTHSM_MODULE)


# --------------------------------------------------------------------------- NSS databases

DB_PASSWORD = "db-pass1"


@dataclass
class NssDb:
    """An NSS sql: database made by certutil/pk12util; ``password`` "" means none."""

    directory: Path
    password: str
    nicknames: list[str]

    @property
    def db(self) -> str:
        return f"sql:{self.directory}"


def make_nss_db(directory: Path, ca: ThrowawayCa, password: str = DB_PASSWORD) -> NssDb:
    """cert1 and cert2 (RSA-2048, keys generated in the database by certutil, issued by
    the database's own CA "ca"), and cert3 (RSA-1024, imported from PKCS#12 by pk12util)."""
    certutil = require_tool("certutil")
    pk12util = require_tool("pk12util")
    directory.mkdir(parents=True)
    pwfile = directory.parent / f"{directory.name}.pw"
    pwfile.write_text(password + "\n")
    db = f"sql:{directory}"
    if password:
        run(certutil, "-N", "-d", db, "-f", str(pwfile))
    else:
        run(certutil, "-N", "-d", db, "--empty-password")
    noise = directory.parent / f"{directory.name}.noise"
    auth = ["-f", str(pwfile)] if password else []
    for serial, (nick, subject, extra) in enumerate(
        [
            ("ca", "CN=NSS test CA", ["-x", "-t", "CT,C,C", "-2"]),
            ("cert1", "CN=NSS.cert1", ["-c", "ca", "-t", ",,"]),
            ("cert2", "CN=NSS.cert2", ["-c", "ca", "-t", ",,"]),
        ],
        start=1,
    ):
        noise.write_bytes(os.urandom(64))
        run(
            certutil, "-S", "-d", db, "-n", nick, "-s", subject, "-k", "rsa", "-g", "2048",
            "-m", str(serial), "-z", str(noise), *auth, *extra,
            stdin="y\n0\ny\n" if nick == "ca" else None,
        )  # fmt: skip
    from cryptography.hazmat.primitives.serialization import pkcs12

    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    cert = ca.issue(key.public_key(), "NSS.cert3")
    p12 = directory.parent / f"{directory.name}.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"cert3", key, cert, None, serialization.BestAvailableEncryption(b"p12pass")
        )
    )
    p12pw = directory.parent / f"{directory.name}.p12pw"
    p12pw.write_text("p12pass\n")
    run(pk12util, "-i", str(p12), "-d", db, "-k", str(pwfile), "-w", str(p12pw))
    return NssDb(directory, password, ["cert1", "cert2", "cert3"])


@pytest.fixture
def nss_db(tmp_path: Path, throwaway_ca: ThrowawayCa) -> NssDb:
    return make_nss_db(tmp_path / "nssdb", throwaway_ca)


@pytest.fixture
def nss_db_no_password(tmp_path: Path, throwaway_ca: ThrowawayCa) -> NssDb:
    return make_nss_db(tmp_path / "nssdb-open", throwaway_ca, password="")
