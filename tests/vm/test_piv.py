"""OpenSC's PIV driver uses the emulated PIV card end to end (real clients in the VM test bed).

The host runs the real CLI: ``usbccid card new --piv`` (and ``--edges cac+piv``) makes the
cards in a temporary state directory and ``usbccid serve --port 0 --config FILE`` exports
one reader per card:

======  ===========================================  =====================================
bus id  card                                         used for
======  ===========================================  =====================================
1-1     ``rsa``: PIV, 9A 9C 9D 9E RSA-2048           the PIV tests with RSA: listing,
1-2     ``dual``: CAC (3 x RSA-2048) + PIV (4 x      signatures (9C: PIN Always), 9E without
        RSA-2048), one PIN                           a PIN, decryption, ``pkcs11-tool --test``
1-3     ``p256``: PIV, all keys ECC P-256            ECDSA (DER checked on the host), ECDH
1-4     ``p384``: PIV, all keys ECC P-384, and       key agreement, ``pkcs11-tool --test``;
        a retired key management key (82)            the retired key through Key History
1-5     ``lock``: PIV, P-256                         wrong PINs, lock, PUK unblock
1-6     ``sizes``: 9A RSA-4096, 9C RSA-1024,         RSA-4096 through pyscard (chained
        9D RSA-3072, 9E RSA-2048                     command, answer in 61xx pieces), the
                                                     others through OpenSC
======  ===========================================  =====================================

Results come back as hex on stdout and are checked on the host with ``cryptography``
against the certificates ``usbccid card new`` wrote, which must equal the ones OpenSC reads
from the card. OpenSC 0.23.0 (Debian 12) registers RSA 1024-3072 and ECC P-256/P-384 for
PIV (card-piv.c ``piv_init``); RSA-4096 (algorithm 16) is covered by the host tests only.

Findings on the way:

* ``pkcs11-tool --sign`` logs in even for the Card Authentication key (9E, no PIN on the
  card, no auth ID in OpenSC's emulation), so 9E without a PIN is shown with
  ``pkcs15-crypt``, which asks for no PIN for a key without an auth ID.
* ``pkcs11-tool --test`` tests RSA keys only ("non-RSA, skipping"): the EC keys are
  exercised by explicit ECDSA and ECDH operations.
"""

from __future__ import annotations

import hashlib
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
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tests.vm.guest import HOST, Guest, Result

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PIN = "12345678"
PUK = "87654321"
#: (card name, bus id, ``usbccid card new`` arguments)
CARDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("rsa", "1-1", ("--piv",)),
    ("dual", "1-2", ("--edges", "cac+piv")),
    ("p256", "1-3", ("--piv", "--key-type", "p256")),
    ("p384", "1-4", ("--piv", "--key-type", "p384", "--retired", "1")),
    ("lock", "1-5", ("--piv", "--key-type", "p256", "--tries", "3")),
    ("sizes", "1-6", ("--piv", "--key-type", "rsa4096,rsa1024,rsa3072,rsa2048")),
)
#: OpenSC's PKCS#11 IDs of the PIV keys (pkcs15-piv.c), and the key references they are in.
IDS = {"01": "9a", "02": "9c", "03": "9d", "04": "9e"}
LABELS = (
    "Certificate for PIV Authentication",
    "Certificate for Digital Signature",
    "Certificate for Key Management",
    "Certificate for Card Authentication",
)

PRELUDE = r"""
set -u
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
emit() { printf '@@%s=%s\n' "$1" "$2"; }
"""


def _usbccid() -> list[str]:
    exe = Path(sys.executable).with_name("usbccid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "usbccid"]


@dataclass
class PivServer:
    port: int
    state_dir: Path
    proc: subprocess.Popen[bytes]

    def certificate(self, card: str, slot: str) -> x509.Certificate:
        path = self.state_dir / "cards" / card / f"piv-{slot}.cert.pem"
        return x509.load_pem_x509_certificate(path.read_bytes())

    def der(self, card: str, slot: str) -> bytes:
        return self.certificate(card, slot).public_bytes(serialization.Encoding.DER)

    def rsa_key(self, card: str, slot: str) -> rsa.RSAPublicKey:
        key = self.certificate(card, slot).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def ec_key(self, card: str, slot: str) -> ec.EllipticCurvePublicKey:
        key = self.certificate(card, slot).public_key()
        assert isinstance(key, ec.EllipticCurvePublicKey)
        return key

    def pin_state(self, card: str) -> dict[str, object]:
        data = json.loads((self.state_dir / "cards" / card / "pin-state.json").read_text())
        assert isinstance(data, dict)
        return data

    def attach(self, card: str) -> str:
        """Shell lines that attach ``card``'s reader and wait until pcscd sees the card."""
        busid = next(b for name, b, _ in CARDS if name == card)
        return (
            f"usbip --tcp-port {self.port} attach -r {HOST} -b {busid} >/dev/null || exit 90\n"
            f"wait-for 60 sh -c 'opensc-tool -l 2>/dev/null | grep -q \"Yes .*usbccid {card}]\"'"
            " || exit 91\n"
        )


@pytest.fixture(scope="module")
def piv_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PivServer]:
    base = tmp_path_factory.mktemp("piv")
    state = base / "state"
    cli = _usbccid()
    config = ["[server]", 'host = "127.0.0.1"', "port = 0", ""]
    for name, _busid, extra in CARDS:
        subprocess.run(
            [*cli, "card", "new", "--state-dir", str(state), "--name", name, "-q", *extra],
            check=True,
            capture_output=True,
            timeout=300,
        )
        config += ["[[reader]]", f'name = "{name}"', 'identity = "vmware"']
        config += ["  [[reader.slot]]", f'  card = "{name}"', ""]
    toml = base / "usbccid.toml"
    toml.write_text("\n".join(config))
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cli, "serve", "--port", "0", "--state-dir", str(state), "--trace", "-c", str(toml)],
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
        yield PivServer(int(m.group(1)), state, proc)
        # --trace: the PIN and the key operations never reach the log
        text = log.read_text()
        assert PIN.encode().hex(" ") not in text
        assert "00 20 00 80 08 [8 bytes redacted]" in text
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _values(r: Result) -> dict[str, str]:
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


def _run(guest: Guest, script: str, timeout: float) -> tuple[Result, dict[str, str]]:
    r = guest.run(PRELUDE + script, timeout=timeout)
    assert not r.timed_out, r
    assert r.rc not in (90, 91), f"attaching the reader failed: {r}"
    return r, _values(r)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


# -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("card", ["rsa", "dual"])
def test_piv_driver_lists_signs_decrypts_and_tests(
    vm_guest: Guest, piv_server: PivServer, card: str
) -> None:
    """OpenSC's PIV-II driver on an RSA PIV card, and on a cac+piv card (which OpenSC,
    left to choose, gives to PIV-II)."""
    message = b"usbccid: signed in the guest by OpenSC's PIV driver, verified on the host\n"
    secret = b"the host encrypted this for the key management key"
    km = piv_server.rsa_key(card, "9d")
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA256()), algorithm=hashes.SHA256(), label=None)
    msg = vm_guest.put_file(f"piv-{card}-msg.bin", message)
    digest = vm_guest.put_file(f"piv-{card}-digest.bin", _sha256(message))
    enc = vm_guest.put_file(f"piv-{card}-enc.bin", km.encrypt(secret, padding.PKCS1v15()))
    enc_oaep = vm_guest.put_file(f"piv-{card}-oaep.bin", km.encrypt(secret, oaep))
    login = f"--login --pin {PIN}"
    r, v = _run(
        vm_guest,
        piv_server.attach(card)
        + f"""
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- pkcs15-tool -D'; pkcs15-tool -D; emit p15_rc $?
echo '--- pkcs11-tool -O'; pkcs11-tool {login} -O; emit p11_rc $?
for id in {" ".join(IDS)}; do
    pkcs11-tool -r --type cert --id $id -o /tmp/cert.der && emit cert$id "$(hex /tmp/cert.der)"
done
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 01 -i {msg} -o /tmp/s1 \\
    && emit sig_9a "$(hex /tmp/s1)"
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS-PSS --id 02 -i {msg} -o /tmp/s2 \\
    && emit sig_9c "$(hex /tmp/s2)"
pkcs15-crypt --sign --key 04 --sha-256 --pkcs1 -i {digest} -o /tmp/s4 </dev/null \\
    && emit sig_9e "$(hex /tmp/s4)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 03 -i {enc} -o /tmp/d1 \\
    && emit dec "$(hex /tmp/d1)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS-OAEP --hash-algorithm SHA256 \\
    --mgf MGF1-SHA256 --id 03 -i {enc_oaep} -o /tmp/d2 && emit dec_oaep "$(hex /tmp/d2)"
echo '--- test'; pkcs11-tool --test --login --pin {PIN}; emit test_rc $?
""",
        timeout=420,
    )
    assert v.get("name") == "Personal Identity Verification Card", r
    assert v.get("p15_rc") == "0", r
    assert v.get("p11_rc") == "0", r
    p15 = r.stdout.split("--- pkcs15-tool -D", 1)[1].split("--- pkcs11-tool -O", 1)[0]
    for label in LABELS:
        assert f"X.509 Certificate [{label}]" in p15, r
    assert p15.count("X.509 Certificate [") == 4, r
    assert p15.count("Private RSA Key [") == 4, r
    for ident, slot in IDS.items():
        assert v.get(f"cert{ident}") == piv_server.der(card, slot).hex(), (ident, r)
    piv_server.rsa_key(card, "9a").verify(
        bytes.fromhex(v["sig_9a"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    # 9C: PIN Always; pkcs11-tool logs in again (CKA_ALWAYS_AUTHENTICATE) before it signs
    piv_server.rsa_key(card, "9c").verify(bytes.fromhex(v["sig_9c"]), message, pss, hashes.SHA256())
    # 9E: no PIN at all
    piv_server.rsa_key(card, "9e").verify(
        bytes.fromhex(v["sig_9e"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("dec") == secret.hex(), r
    assert v.get("dec_oaep") == secret.hex(), r
    test_out = r.stdout.split("--- test", 1)[1]
    assert v.get("test_rc") == "0", r
    assert "No errors" in test_out, r
    # C_GenerateRandom: the card management key's challenge (GENERAL AUTHENTICATE 9B)
    assert "C_GenerateRandom():\n  seeding (C_SeedRandom) not supported\n  seems to be OK" in (
        test_out
    ), r
    assert "testing key 3 (CARD AUTH key)" in test_out, r


def test_ecdsa_and_ecdh_on_p256_and_p384(vm_guest: Guest, piv_server: PivServer) -> None:
    """ECDSA (P-256 with SHA-256, P-384 with SHA-384, and SHA-256 on P-384) and ECDH with
    the key management key, on both curves; results checked on the host."""
    message = b"usbccid: ECDSA in the guest"
    peers: dict[str, ec.EllipticCurvePrivateKey] = {}
    script = ""
    for card, curve in (("p256", ec.SECP256R1()), ("p384", ec.SECP384R1())):
        peers[card] = ec.generate_private_key(curve)
        spki = (
            peers[card]
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        peer = vm_guest.put_file(f"ecdh-peer-{card}.der", spki)
        msg = vm_guest.put_file(f"ecdsa-{card}.bin", message)
        login = f"--login --pin {PIN}"
        script += (
            "usbip-detach-all >/dev/null\n"
            + piv_server.attach(card)
            + f"""
emit {card}_name "$(opensc-tool -n 2>/dev/null)"
pkcs11-tool {login} --sign --mechanism ECDSA-SHA256 --signature-format openssl --id 01 \\
    -i {msg} -o /tmp/e1 && emit {card}_9a_sha256 "$(hex /tmp/e1)"
pkcs11-tool {login} --sign --mechanism ECDSA-SHA384 --signature-format openssl --id 02 \\
    -i {msg} -o /tmp/e2 && emit {card}_9c_sha384 "$(hex /tmp/e2)"
pkcs11-tool {login} --sign --mechanism ECDSA-SHA256 --signature-format openssl --id 02 \\
    -i {msg} -o /tmp/e3 && emit {card}_9c_sha256 "$(hex /tmp/e3)"
pkcs11-tool {login} --derive -m ECDH1-DERIVE --id 03 -i {peer} -o /tmp/z \\
    && emit {card}_ecdh "$(hex /tmp/z)"
echo '--- {card} test'; pkcs11-tool --test --login --pin {PIN}; emit {card}_test_rc $?
emit {card}_certs "$(pkcs15-tool -D 2>/dev/null | grep -c 'X.509 Certificate \\[')"
"""
        )
    retired = piv_server.certificate("p384", "82").public_key()
    assert isinstance(retired, ec.EllipticCurvePublicKey)
    script += f"""
pkcs15-tool -D | grep -q 'X.509 Certificate \\[Retired Certificate for Key Management 1\\]'
emit retired_listed $?
pkcs11-tool -r --type cert --id 05 -o /tmp/r.der && emit retired_cert "$(hex /tmp/r.der)"
pkcs11-tool --login --pin {PIN} --derive -m ECDH1-DERIVE --id 05 \
    -i /share/files/ecdh-peer-p384.der -o /tmp/z5 && emit retired_ecdh "$(hex /tmp/z5)"
"""
    r, v = _run(vm_guest, script, timeout=480)
    for card in ("p256", "p384"):
        assert v.get(f"{card}_name") == "Personal Identity Verification Card", r
        for name, slot, algorithm in (
            ("9a_sha256", "9a", hashes.SHA256()),
            ("9c_sha384", "9c", hashes.SHA384()),
            ("9c_sha256", "9c", hashes.SHA256()),
        ):
            key = f"{card}_{name}"
            assert key in v, (key, r)
            piv_server.ec_key(card, slot).verify(
                bytes.fromhex(v[key]), message, ec.ECDSA(algorithm)
            )
        expected = peers[card].exchange(ec.ECDH(), piv_server.ec_key(card, "9d"))
        assert v.get(f"{card}_ecdh") == expected.hex(), r
        assert v.get(f"{card}_test_rc") == "0", r
        assert "No errors" in r.stdout.split(f"--- {card} test", 1)[1], r
    assert v.get("p256_certs") == "4", r
    assert v.get("p384_certs") == "5", r  # the Key History object says: one retired key
    assert v.get("retired_listed") == "0", r
    assert v.get("retired_cert") == piv_server.der("p384", "82").hex(), r
    assert v.get("retired_ecdh") == peers["p384"].exchange(ec.ECDH(), retired).hex(), r


def test_wrong_pin_locks_and_the_puk_unblocks(vm_guest: Guest, piv_server: PivServer) -> None:
    """Three wrong PINs: CKR_PIN_INCORRECT each time, then CKR_PIN_LOCKED even for the right
    one; ``pkcs15-tool --unblock-pin`` sends RESET RETRY COUNTER with the PUK."""
    new_pin = "24681357"
    r, v = _run(
        vm_guest,
        piv_server.attach("lock")
        + f"""
n=0
for pin in 11111111 22222222 33333333; do
    n=$((n + 1))
    emit wrong$n "$(pkcs11-tool --login --pin $pin -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
    emit flags$n "$(pkcs11-tool -L | grep 'token flags')"
done
emit right_when_locked "$(pkcs11-tool --login --pin {PIN} -O 2>&1 >/dev/null \\
    | grep -o 'CKR_[A-Z_]*')"
pkcs15-tool --unblock-pin --puk 00000000 --new-pin {new_pin} </dev/null; emit bad_puk_rc $?
pkcs15-tool --unblock-pin --puk {PUK} --new-pin {new_pin} </dev/null; emit unblock_rc $?
pkcs11-tool --login --pin {new_pin} -O >/dev/null; emit relogin_rc $?
pkcs11-tool -L | grep -q 'user PIN locked'; emit flag_locked_after $?
""",
        timeout=300,
    )
    for n in (1, 2, 3):
        assert v.get(f"wrong{n}") == "CKR_PIN_INCORRECT", (n, r)
    assert "final user PIN try" in v.get("flags2", ""), r
    assert "user PIN locked" in v.get("flags3", ""), r
    assert v.get("right_when_locked") == "CKR_PIN_LOCKED", r
    assert v.get("bad_puk_rc") not in (None, "0"), r
    assert v.get("unblock_rc") == "0", r
    assert v.get("relogin_rc") == "0", r
    assert v.get("flag_locked_after") == "1", r
    state = piv_server.pin_state("lock")
    assert state["tries_left"] == 3, state
    assert state["unblock_tries_left"] == 10, state  # the right PUK restored its counter
    assert bytes.fromhex(str(state["pin_hex"])) == new_pin.encode()


def test_dual_card_drivers(vm_guest: Guest, piv_server: PivServer) -> None:
    """A cac+piv card: OpenSC picks PIV-II by itself, its cac driver when told to; both see
    the same PIN (changed through PIV, used through CAC)."""
    r, v = _run(
        vm_guest,
        piv_server.attach("dual")
        + f"""
emit default "$(opensc-tool -n 2>/dev/null)"
emit forced "$(OPENSC_DRIVER=cac opensc-tool -n 2>/dev/null)"
certs() {{ pkcs15-tool -D 2>/dev/null | grep -c "X.509 Certificate \\[$1"; }}
emit cac_certs "$(OPENSC_DRIVER=cac certs CAC)"
emit piv_certs "$(certs 'Certificate for')"
pkcs15-tool --change-pin --pin {PIN} --new-pin 135792 </dev/null; emit change_rc $?
OPENSC_DRIVER=cac pkcs11-tool --login --pin 135792 -O >/dev/null; emit cac_login_rc $?
pkcs15-tool --change-pin --pin 135792 --new-pin {PIN} </dev/null; emit back_rc $?
""",
        timeout=300,
    )
    assert v.get("default") == "Personal Identity Verification Card", r
    assert v.get("forced") == "Common Access Card (CAC)", r
    assert v.get("cac_certs") == "3", r
    assert v.get("piv_certs") == "4", r
    assert v.get("change_rc") == "0", r
    assert v.get("cac_login_rc") == "0", r
    assert v.get("back_rc") == "0", r


# pyscard signing with the RSA-4096 key 9A (algorithm 16) as OpenSC's piv_general_io would
# send it: the 522-byte template in chained CLA 10 pieces, the 520-byte answer in 61xx
# pieces; and once as one extended APDU. PC/SC -> libccid -> usbip -> CCID -> card.
PYSCARD_4096 = r"""
import sys
from smartcard.System import readers

reader = next(r for r in readers() if "usbccid sizes]" in str(r))
conn = reader.createConnection()
conn.connect()


def send(apdu):
    data, sw1, sw2 = conn.transmit(list(apdu))
    return bytes(data), sw1 << 8 | sw2


block = bytes.fromhex(sys.argv[1])
template = bytes.fromhex("7c820206820081820200") + block
print("@@select=%04x" % send(bytes.fromhex("00a4040009a0000003080000100000"))[1])
print("@@verify=%04x" % send(bytes.fromhex("0020008008") + sys.argv[2].encode())[1])
steps = []
rest = template
while len(rest) > 255:
    steps.append(send(b"\x10\x87\x16\x9a\xff" + rest[:255])[1])
    rest = rest[255:]
data, sw = send(b"\x00\x87\x16\x9a" + bytes([len(rest)]) + rest + b"\x00")
steps.append(sw)
while sw >> 8 == 0x61:
    more, sw = send(bytes.fromhex("00c00000") + bytes([sw & 0xFF]))
    data += more
    steps.append(sw)
print("@@steps=" + ",".join("%04x" % s for s in steps))
print("@@chained=" + data.hex())
send(bytes.fromhex("0020008008") + sys.argv[2].encode())
ext = b"\x00\x87\x16\x9a\x00" + len(template).to_bytes(2, "big") + template + b"\x00\x00"
data, sw = send(ext)
print("@@ext_sw=%04x" % sw)
print("@@extended=" + data.hex())
"""


def test_rsa_1024_to_4096(vm_guest: Guest, piv_server: PivServer) -> None:
    """RSA-4096 (9A) through pyscard; RSA-1024 (9C) and RSA-3072 (9D) through OpenSC."""
    message = b"usbccid: PIV RSA of every size"
    digest = hashlib.sha256(message).digest()
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    block = b"\x00\x01" + b"\xff" * (512 - len(info) - 3) + b"\x00" + info
    script = vm_guest.put_file("piv_4096.py", PYSCARD_4096)
    msg = vm_guest.put_file("sizes-msg.bin", message)
    secret = b"for the RSA-3072 key management key"
    enc = vm_guest.put_file(
        "sizes-enc.bin", piv_server.rsa_key("sizes", "9d").encrypt(secret, padding.PKCS1v15())
    )
    r, v = _run(
        vm_guest,
        piv_server.attach("sizes")
        + f"""
python3 {script} {block.hex()} {PIN}
pkcs11-tool --login --pin {PIN} --sign --mechanism SHA256-RSA-PKCS --id 02 -i {msg} \
    -o /tmp/s1024 && emit sig1024 "$(hex /tmp/s1024)"
pkcs11-tool --login --pin {PIN} --decrypt --mechanism RSA-PKCS --id 03 -i {enc} \
    -o /tmp/d3072 && emit dec3072 "$(hex /tmp/d3072)"
""",
        timeout=300,
    )
    assert (v.get("select"), v.get("verify"), v.get("ext_sw")) == ("9000", "9000", "9000"), r
    # three chained pieces (255 + 255 + 12 bytes), then 256 + 256 + 8 answer bytes
    assert v.get("steps") == "9000,9000,6100,6108,9000", r
    answer = bytes.fromhex(v["chained"])
    assert answer[:8] == bytes.fromhex("7c82020482820200"), r
    piv_server.rsa_key("sizes", "9a").verify(
        answer[8:], message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("extended") == v["chained"], r
    assert piv_server.rsa_key("sizes", "9a").key_size == 4096
    piv_server.rsa_key("sizes", "9c").verify(
        bytes.fromhex(v["sig1024"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("dec3072") == secret.hex(), r
