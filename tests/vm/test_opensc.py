"""OpenSC and coolkey use the emulated CAC end to end (real clients in the VM test bed).

The host runs the real CLI: ``usbccid card new`` makes four cards in a temporary state
directory and ``usbccid serve --port 0 --config FILE`` exports one reader per card:

======  ======================================================  ==========================
bus id  card                                                    used for
======  ======================================================  ==========================
1-1     ``default``: 3 x RSA-2048, realistic key usages (ID     listing, SHA256-RSA-PKCS and
        and email signature keys sign only, the encryption      PSS signatures, PKCS#1 v1.5
        key decrypts only), like a real CAC                     and OAEP decryption; coolkey
1-2     ``allp``: 3 x RSA-2048, ``--all-purpose`` (every key    ``pkcs11-tool --test`` (it
        signs and decrypts, like OpenSC CI's virt_cacard)       signs and decrypts with every
                                                                key); PIN lock and unblock
1-3     ``big``: RSA-4096, RSA-3072, RSA-2048,                  answers > 256 bytes: RSA-4096
        ``--all-purpose``                                       with pyscard (extended and
                                                                chained APDUs), RSA-3072
                                                                with OpenSC
1-4     ``one``: 1 x RSA-2048                                   coolkey with fewer than three
                                                                containers
======  ======================================================  ==========================

Every test runs twice: on these cards as plain CACs (``cac``), and as ``cac+piv`` cards
(``usbccid card new --edges cac+piv``: the same CAC applets beside a PIV application,
one PIN) with OpenSC told to use its ``cac`` driver (``OPENSC_DRIVER=cac``; left alone it
picks ``PIV-II``, which tests/vm/test_piv.py exercises). coolkey knows no PIV and needs
no telling.

The guest attaches one reader per test (``vm_guest`` detaches it afterwards). Signatures
and decrypted data come back as hex on stdout and are checked on the host with
``cryptography`` against the certificates ``usbccid card new`` wrote, which must equal the
ones the clients read from the card.

Client limits found on the way (Debian 12: OpenSC 0.23.0, coolkey 1.1.0):

* OpenSC's ``cac`` driver registers RSA 1024/2048/3072 only (card-cac.c ``cac_init``), so
  it lists a 4096-bit key but refuses to use it (CKR_FUNCTION_NOT_SUPPORTED).
* coolkey fetches a ``61 xx`` answer with exactly one GET RESPONSE into a buffer of one
  short APDU (cky_card.c ``CKYCardConnection_ExchangeAPDU``), so it cannot receive the
  512-byte result of an RSA-4096 operation (CKR_DEVICE_ERROR) either: real CACs stop at
  RSA-2048. RSA-4096 is therefore exercised with pyscard (one extended APDU, and OpenSC's
  chained short APDUs with ``61 00`` GET RESPONSE twice), RSA-3072 with OpenSC.
* coolkey offers CKM_RSA_PKCS only (no hashing mechanisms, no PSS/OAEP): we hand it the
  DER DigestInfo of SHA-256, which makes the same signature as SHA256-RSA-PKCS.
* OpenSC's PKCS#11 module unblocks a PIN only when ``user_pin_unblock_style`` is set in
  opensc.conf (Debian leaves it unset); the test uses its own ``OPENSC_CONF`` with
  ``set_pin_in_unlogged_session``, so ``pkcs11-tool --unlock-pin --puk P --new-pin N``
  sends RESET RETRY COUNTER.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.vm.guest import HOST, Guest, Result

pytestmark = [pytest.mark.vm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
PIN = "12345678"
PUK = "87654321"
TRIES = 3
COOLKEY = "/usr/lib/pkcs11/libcoolkeypk11.so"
#: The labels OpenSC's CAC driver gives the first three PKI applets.
LABELS = (
    "CAC ID Certificate",
    "CAC Email Signature Certificate",
    "CAC Email Encryption Certificate",
)
IDS = ("0001", "0002", "0003")
#: DER prefix of a DigestInfo for SHA-256 (RFC 8017 §9.2 note 1).
SHA256_DIGEST_INFO = bytes.fromhex("3031300d060960864801650304020105000420")

#: (card name, bus id, extra ``usbccid card new`` arguments)
CARDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("default", "1-1", ()),
    ("allp", "1-2", ("--all-purpose", "--tries", str(TRIES))),
    ("big", "1-3", ("--all-purpose", "--key-size", "4096,3072,2048")),
    ("one", "1-4", ("--containers", "1")),
)

#: Shell helpers every scenario starts with.
PRELUDE = r"""
set -u
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
emit() { printf '@@%s=%s\n' "$1" "$2"; }
"""

#: Tells OpenSC's PKCS#11 module that C_SetPIN in a session that is not logged in means
#: "unblock with the PUK given as the old PIN" (misc.c load_pkcs11_parameters).
UNBLOCK_CONF = """app default {
  pkcs11 {
    user_pin_unblock_style = set_pin_in_unlogged_session;
  }
}
"""


def _usbccid() -> list[str]:
    exe = Path(sys.executable).with_name("usbccid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "usbccid"]


@dataclass
class CacServer:
    """``usbccid serve`` running on the host with the cards of :data:`CARDS`."""

    port: int
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    edges: str = "cac"

    def certificate(self, card: str, index: int) -> x509.Certificate:
        pem = (self.state_dir / "cards" / card / f"container-{index:02d}.cert.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem)

    def public_key(self, card: str, index: int) -> rsa.RSAPublicKey:
        key = self.certificate(card, index).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def der(self, card: str, index: int) -> bytes:
        return self.certificate(card, index).public_bytes(serialization.Encoding.DER)

    def pin_state(self, card: str) -> dict[str, object]:
        data = json.loads((self.state_dir / "cards" / card / "pin-state.json").read_text())
        assert isinstance(data, dict)
        return data

    def attach(self, card: str) -> str:
        """Shell lines that attach ``card``'s reader and wait until pcscd sees the card."""
        busid = next(b for name, b, _ in CARDS if name == card)
        # A cac+piv card: OpenSC's cac driver, not PIV-II (which comes first in its list).
        driver = "export OPENSC_DRIVER=cac\n" if self.edges == "cac+piv" else ""
        return driver + (
            f"usbip --tcp-port {self.port} attach -r {HOST} -b {busid} >/dev/null || exit 90\n"
            f"wait-for 60 sh -c 'opensc-tool -l 2>/dev/null | grep -q \"Yes .*usbccid {card}]\"'"
            " || exit 91\n"
        )


@pytest.fixture(scope="module", params=["cac", "cac+piv"])
def cac_server(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[CacServer]:
    edges: str = request.param
    base = tmp_path_factory.mktemp("cac")
    state = base / "state"
    cli = _usbccid()
    config = ["[server]", 'host = "127.0.0.1"', "port = 0", ""]
    for name, _busid, extra in CARDS:
        subprocess.run(
            [*cli, "card", "new", "--state-dir", str(state), "--name", name, "-q", *extra]
            + (["--edges", edges] if edges != "cac" else []),
            check=True,
            capture_output=True,
            timeout=300,
        )
        config += [
            "[[reader]]",
            f'name = "{name}"',
            'identity = "vmware"',
            "  [[reader.slot]]",
            f'  card = "{name}"',
            "",
        ]
    (base / "usbccid.toml").write_text("\n".join(config))
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *cli,
                "serve",
                "--port",
                "0",
                "--state-dir",
                str(state),
                "--trace",
                "--config",
                str(base / "usbccid.toml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "control socket:" not in log.read_text():
            assert proc.poll() is None, f"usbccid serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"usbccid serve not ready:\n{log.read_text()}"
            time.sleep(0.1)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        assert m, log.read_text()
        yield CacServer(int(m.group(1)), state, proc, log, edges)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _values(r: Result) -> dict[str, str]:
    """The ``@@name=value`` lines a scenario printed."""
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


def _run(guest: Guest, script: str, timeout: float) -> tuple[Result, dict[str, str]]:
    r = guest.run(PRELUDE + script, timeout=timeout)
    assert not r.timed_out, r
    assert r.rc not in (90, 91), f"attaching the reader failed: {r}"
    return r, _values(r)


def _sha256_digest_info(message: bytes) -> bytes:
    digest = hashes.Hash(hashes.SHA256())
    digest.update(message)
    return SHA256_DIGEST_INFO + digest.finalize()


def _emsa_pkcs1_v15(message: bytes, k: int) -> bytes:
    """The PKCS#1 v1.5 signature block (RFC 8017 §9.2) for a raw private-key operation."""
    t = _sha256_digest_info(message)
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


# -----------------------------------------------------------------------------------------


def test_opensc_lists_signs_and_decrypts(vm_guest: Guest, cac_server: CacServer) -> None:
    """OpenSC (opensc-tool, pkcs15-tool, pkcs11-tool) on the default, realistic card."""
    message = b"usbccid: signed in the guest by OpenSC, verified on the host\n"
    secret = b"the host encrypted this for the card"
    enc_key = cac_server.public_key("default", 2)
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    msg = vm_guest.put_file("opensc-msg.bin", message)
    sha256 = hashes.Hash(hashes.SHA256())
    sha256.update(message)
    digest = vm_guest.put_file("opensc-digest.bin", sha256.finalize())
    enc_pkcs = vm_guest.put_file("opensc-enc-pkcs.bin", enc_key.encrypt(secret, padding.PKCS1v15()))
    enc_oaep = vm_guest.put_file("opensc-enc-oaep.bin", enc_key.encrypt(secret, oaep))
    login = f"--login --pin {PIN}"
    r, v = _run(
        vm_guest,
        cac_server.attach("default")
        + f"""
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- pkcs15-tool -D'; pkcs15-tool -D; emit p15_rc $?
echo '--- pkcs11-tool -O'; pkcs11-tool {login} -O; emit p11_rc $?
for id in {" ".join(IDS)}; do
    pkcs11-tool -r --type cert --id $id -o /tmp/cert.der && emit cert$id "$(hex /tmp/cert.der)"
done
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 0001 -i {msg} -o /tmp/s1 \
    && emit sig_pkcs "$(hex /tmp/s1)"
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS-PSS --id 0002 -i {msg} -o /tmp/s2 \
    && emit sig_pss "$(hex /tmp/s2)"
pkcs11-tool {login} --sign --mechanism RSA-PKCS-PSS --hash-algorithm SHA256 --mgf MGF1-SHA256 \
    --id 0001 -i {digest} -o /tmp/s3 && emit sig_raw_pss "$(hex /tmp/s3)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0003 -i {enc_pkcs} -o /tmp/d1 \
    && emit dec_pkcs "$(hex /tmp/d1)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS-OAEP --hash-algorithm SHA256 \
    --mgf MGF1-SHA256 --id 0003 -i {enc_oaep} -o /tmp/d2 && emit dec_oaep "$(hex /tmp/d2)"
# Realistic usages: the ID key (digitalSignature only) is not offered for decryption.
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0001 -i {enc_pkcs} -o /tmp/d3
emit id_decrypt_rc $?
""",
        timeout=240,
    )
    assert v.get("name") == "Common Access Card (CAC)", r
    assert v.get("p15_rc") == "0", r
    assert v.get("p11_rc") == "0", r
    p15 = r.stdout.split("--- pkcs15-tool -D", 1)[1].split("--- pkcs11-tool -O", 1)[0]
    p11 = r.stdout.split("--- pkcs11-tool -O", 1)[1]
    for label in LABELS:
        assert f"Private RSA Key [{label}]" in p15, r
        assert f"X.509 Certificate [{label}]" in p15, r
    assert p15.count("Private RSA Key [") == 3, r
    assert p15.count("X.509 Certificate [") == 3, r
    for kind in ("Private Key Object", "Public Key Object", "Certificate Object"):
        assert p11.count(kind) == 3, (kind, r)
    for ident in IDS:
        assert f"ID:         {ident}" in p11, r
    for i, ident in enumerate(IDS):
        assert v.get(f"cert{ident}") == cac_server.der("default", i).hex(), (ident, r)

    assert "sig_pkcs" in v, r
    assert "sig_pss" in v, r
    cac_server.public_key("default", 0).verify(
        bytes.fromhex(v["sig_pkcs"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    cac_server.public_key("default", 1).verify(
        bytes.fromhex(v["sig_pss"]), message, pss, hashes.SHA256()
    )
    assert "sig_raw_pss" in v, r
    cac_server.public_key("default", 0).verify(
        bytes.fromhex(v["sig_raw_pss"]), message, pss, hashes.SHA256()
    )
    assert v.get("dec_pkcs") == secret.hex(), r
    assert v.get("dec_oaep") == secret.hex(), r
    assert v.get("id_decrypt_rc") not in (None, "0"), r


def test_pkcs11_tool_test_and_pin_lock_unblock(vm_guest: Guest, cac_server: CacServer) -> None:
    """``pkcs11-tool --test`` passes; wrong PINs count down, lock, and the PUK unblocks."""
    conf = vm_guest.put_file("opensc-unblock.conf", UNBLOCK_CONF)
    wrong = ("11111111", "22222222", "33333333")[:TRIES]
    r, v = _run(
        vm_guest,
        cac_server.attach("allp")
        + f"""
echo '--- test'; pkcs11-tool --test --login --pin {PIN} 2>/tmp/test.err; emit test_rc $?
cat /tmp/test.err >&2
echo '--- pin'
n=0
for pin in {" ".join(wrong)}; do
    n=$((n + 1))
    emit wrong$n "$(pkcs11-tool --login --pin $pin -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
    emit flags$n "$(pkcs11-tool -L | grep 'token flags')"
done
emit right_when_locked "$(pkcs11-tool --login --pin {PIN} -O 2>&1 >/dev/null \
    | grep -o 'CKR_[A-Z_]*')"
pkcs11-tool -L | grep -q 'user PIN locked'; emit flag_locked $?
OPENSC_CONF={conf} pkcs11-tool --unlock-pin --puk {PUK} --new-pin {PIN}; emit unlock_rc $?
pkcs11-tool --login --pin {PIN} -O >/dev/null; emit relogin_rc $?
pkcs11-tool -L | grep -q 'user PIN locked'; emit flag_locked_after $?
""",
        timeout=300,
    )
    test_out = r.stdout.split("--- test", 1)[1].split("--- pin", 1)[0]
    assert v.get("test_rc") == "0", r
    assert "No errors" in test_out, r
    # GET CHALLENGE feeds C_GenerateRandom (libcacard has none: the reference card fails).
    assert "C_GenerateRandom():\n  seeding (C_SeedRandom) not supported\n  seems to be OK" in (
        test_out
    ), r
    # Every key signs and decrypts (all-purpose card), as in OpenSC CI's virt_cacard.
    for n, label in enumerate(LABELS):
        assert test_out.count(f"testing key {n} ({label})") == 3, r
    assert "RSA-PKCS-OAEP" in test_out, r
    # Each wrong PIN but the last leaves tries; the last one answers 63 C0 (incorrect),
    # after which even the right PIN meets 69 83 (locked).
    for n in range(1, TRIES + 1):
        assert v.get(f"wrong{n}") == "CKR_PIN_INCORRECT", (n, r)
    # The tries left reach the token flags through the VERIFY status query (63 Cx).
    assert "final user PIN try" in v.get(f"flags{TRIES - 1}", ""), r
    assert "user PIN locked" in v.get(f"flags{TRIES}", ""), r
    assert v.get("right_when_locked") == "CKR_PIN_LOCKED", r
    assert v.get("flag_locked") == "0", r
    assert v.get("unlock_rc") == "0", r
    assert v.get("relogin_rc") == "0", r
    assert v.get("flag_locked_after") == "1", r
    # The server persisted the counter: full tries again, one PUK try was not used up.
    state = cac_server.pin_state("allp")
    assert state["tries_left"] == TRIES, state
    assert state["unblock_tries_left"] == 10, state


# A pyscard client signing with the RSA-4096 key twice: as one extended APDU (Lc = 512,
# Le = 65536), and the way OpenSC's cac driver sends it (240-byte 42 80 steps, a final
# short step, then GET RESPONSE while the card answers 61 xx). Path: PC/SC -> libccid ->
# usbip/vhci-hcd -> USB/IP -> CCID (extended APDU level) -> card, and back.
EXTENDED_SIGN = r"""
import sys
from smartcard.System import readers

reader = next(r for r in readers() if "usbccid big]" in str(r))
conn = reader.createConnection()
conn.connect()


def send(apdu):
    data, sw1, sw2 = conn.transmit(list(apdu))
    return bytes(data), sw1 << 8 | sw2


block = bytes.fromhex(sys.argv[1])
print("@@verify=%04x" % send(bytes.fromhex("0020000008") + sys.argv[2].encode())[1])
print("@@select=%04x" % send(bytes.fromhex("00a4040007a000000079010000"))[1])
cmd = bytes.fromhex("0042000000") + len(block).to_bytes(2, "big") + block + b"\0\0"
data, sw = send(cmd)
print("@@ext_sw=%04x" % sw)
print("@@ext_sig=" + data.hex())
steps = []
rest = block
while len(rest) > 240:
    steps.append(send(bytes.fromhex("00428000f0") + rest[:240])[1])
    rest = rest[240:]
data, sw = send(bytes.fromhex("00420000") + bytes([len(rest)]) + rest + b"\xff")
steps.append(sw)
while sw >> 8 == 0x61:
    more, sw = send(bytes.fromhex("00c00000") + bytes([sw & 0xFF]))
    data += more
    steps.append(sw)
print("@@short_steps=" + ",".join("%04x" % s for s in steps))
print("@@short_sig=" + data.hex())
"""


def test_rsa_3072_and_4096(vm_guest: Guest, cac_server: CacServer) -> None:
    """Answers longer than 256 bytes: RSA-4096 through pyscard (extended and chained
    short APDUs), RSA-3072 through OpenSC (its CAC driver stops at 3072 bits)."""
    message = b"usbccid: RSA-4096 over extended APDUs"
    key = cac_server.public_key("big", 0)
    assert key.key_size == 4096
    assert cac_server.public_key("big", 1).key_size == 3072
    script = vm_guest.put_file("extended_sign.py", EXTENDED_SIGN)
    msg = vm_guest.put_file("big-msg.bin", message)
    block = _emsa_pkcs1_v15(message, 512)
    r, v = _run(
        vm_guest,
        cac_server.attach("big")
        + f"""
echo '--- objects'; pkcs11-tool -O; emit list_rc $?
python3 {script} {block.hex()} {PIN}
pkcs11-tool --login --pin {PIN} --sign --mechanism SHA256-RSA-PKCS-PSS --id 0002 -i {msg} \
    -o /tmp/s3072 && emit sig3072 "$(hex /tmp/s3072)"
""",
        timeout=240,
    )
    assert v.get("list_rc") == "0", r
    objects = r.stdout.split("--- objects", 1)[1]
    assert "RSA 4096 bits" in objects, r
    assert "RSA 3072 bits" in objects, r
    assert (v.get("verify"), v.get("select"), v.get("ext_sw")) == ("9000", "9000", "9000"), r
    assert len(v["ext_sig"]) == 2 * 512, r
    key.verify(bytes.fromhex(v["ext_sig"]), message, padding.PKCS1v15(), hashes.SHA256())
    # Two 240-byte steps, the last step answers 61 00, and the 512 bytes come back in two
    # 256-byte GET RESPONSE pieces.
    assert v.get("short_steps") == "9000,9000,6100,6100,9000", r
    assert v.get("short_sig") == v["ext_sig"], r
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    assert "sig3072" in v, r
    cac_server.public_key("big", 1).verify(
        bytes.fromhex(v["sig3072"]), message, pss, hashes.SHA256()
    )


def test_coolkey_lists_signs_and_decrypts(vm_guest: Guest, cac_server: CacServer) -> None:
    """Debian's coolkey PKCS#11 module reads the three certificates, signs and decrypts."""
    message = b"usbccid: signed in the guest by coolkey"
    secret = b"coolkey decrypts this"
    info = vm_guest.put_file("coolkey-digest-info.bin", _sha256_digest_info(message))
    enc = vm_guest.put_file(
        "coolkey-enc.bin", cac_server.public_key("default", 2).encrypt(secret, padding.PKCS1v15())
    )
    ck = f"pkcs11-tool --module {COOLKEY}"
    r, v = _run(
        vm_guest,
        cac_server.attach("default")
        + f"""
test -e {COOLKEY} || {{ echo "no {COOLKEY}: $(ls /usr/lib/*/pkcs11 /usr/lib/pkcs11)"; exit 92; }}
echo '--- objects'; {ck} --login --pin {PIN} -O 2>/dev/null; emit list_rc $?
for id in {" ".join(IDS)}; do
    {ck} -r --type cert --id $id -o /tmp/cert.der 2>/dev/null && emit cert$id "$(hex /tmp/cert.der)"
done
{ck} --login --pin {PIN} --sign --mechanism RSA-PKCS --id 0001 -i {info} -o /tmp/s \
    2>/dev/null && emit sig "$(hex /tmp/s)"
{ck} --login --pin {PIN} --decrypt --mechanism RSA-PKCS --id 0003 -i {enc} -o /tmp/d \
    2>/dev/null && emit dec "$(hex /tmp/d)"
# A card with one container (coolkey used to see an empty slot: EmptyPkiApplet).
usbip-detach-all >/dev/null
{cac_server.attach("one").strip()}
echo '--- one'; {ck} --login --pin {PIN} -O 2>/dev/null
{ck} --login --pin {PIN} --sign --mechanism RSA-PKCS --id 0001 -i {info} -o /tmp/s1 \
    2>/dev/null && emit one_sig "$(hex /tmp/s1)"
echo '--- one with OpenSC'; pkcs11-tool --login --pin {PIN} -O
""",
        timeout=240,
    )
    assert r.rc != 92, r
    assert v.get("list_rc") == "0", r
    objects, one = r.stdout.split("--- objects", 1)[1].split("--- one", 1)
    one, one_opensc = one.split("--- one with OpenSC", 1)
    assert objects.count("Certificate Object") == 3, r
    assert objects.count("Private Key Object") == 3, r
    for i, ident in enumerate(IDS):
        assert v.get(f"cert{ident}") == cac_server.der("default", i).hex(), (ident, r)
    assert "sig" in v, r
    cac_server.public_key("default", 0).verify(
        bytes.fromhex(v["sig"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("dec") == secret.hex(), r
    assert one.count("Certificate Object") == 1, r
    assert one.count("Private Key Object") == 1, r
    # The empty PKI applets 1 and 2 add nothing to OpenSC's view either.
    assert one_opensc.count("Certificate Object") == 1, r
    assert one_opensc.count("Private Key Object") == 1, r
    assert "one_sig" in v, r
    cac_server.public_key("one", 0).verify(
        bytes.fromhex(v["one_sig"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
