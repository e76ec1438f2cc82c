"""Our CAC card inside QEMU's own usb-ccid reader, through ccid-card-passthru (VSCard).

No USB/IP here. The host runs the product, ``usbccid serve --vscard 127.0.0.1:0`` (the
default generated CAC card of a temporary state directory), and the guest's QEMU gets
exactly the options its banner prints (``-usb -device usb-ccid -chardev
socket,...,reconnect=1,nodelay=on -device ccid-card-passthru,...``). One guest boot
serves every scenario of this module (its QEMU command line differs from the shared
guest's):

* pcscd + libccid list QEMU's reader with our card in it and our ATR; ``ctl status``
  shows QEMU holding the card;
* OpenSC (``opensc-tool -n``, ``pkcs15-tool -D``, ``pkcs11-tool -O``, SHA256-RSA-PKCS
  signature verified here against the card's certificate, RSA-PKCS decryption, a wrong
  PIN -> CKR_PIN_INCORRECT) and coolkey (certificates, signature), the CAC checks of
  tests/vm/test_opensc.py;
* ``usbccid ctl remove`` / ``ctl insert`` reach pcscd's clients (SCardGetStatusChange),
  timed in the guest;
* stopping the server (CardRemove + ReaderRemove) empties the reader; a new server on the
  same port gets QEMU's chardev back (it reconnects) and the card works again.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.cli.helpers import BIN, usbccid_env
from tests.conftest import in_ci, require_tool
from tests.vm.guest import Guest, build_image, cached_image
from tests.vm.test_opensc import COOLKEY, IDS, LABELS, PIN, _run, _sha256_digest_info
from tests.vm.test_pcscd import MAX_EVENT_LATENCY, Trigger, _report, _run_events
from usbccid.cac.card import ATR_VCARD_NSS

pytestmark = [pytest.mark.vm, pytest.mark.slow]

#: pcscd's name for QEMU's reader: "Gemalto Gemplus USB SmartCard Reader 433-Swap (libccid's
#: Info.plist name for 08e6:4433) [CCID Interface] (<iSerialNumber>) 00 00".
READER_PART = "[CCID Interface]"


@dataclass
class Passthru:
    """``usbccid serve --vscard`` (restartable on the same port) and its card's files."""

    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    port: int = 0
    qemu_options: str = ""
    reader: str = ""  # pcscd's full reader name, once seen
    restarts: int = 0

    def start(self, port: int = 0) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [
                    *(str(BIN), "serve", "--state-dir", str(self.state_dir), "--trace"),
                    *("--vscard", f"127.0.0.1:{port}"),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=usbccid_env(),
            )
        deadline = time.monotonic() + 120
        while True:
            text = self.log.read_text(errors="replace")
            banners = text.split("no USB/IP server")
            if len(banners) > self.restarts + 1 and "control socket:" in banners[-1]:
                break
            assert self.proc.poll() is None, f"usbccid serve exited:\n{text}"
            assert time.monotonic() < deadline, f"usbccid serve not ready:\n{text}"
            time.sleep(0.1)
        banner = banners[-1]
        m = re.search(r"^reader reader0: vscard 127\.0\.0\.1:(\d+)$", banner, re.MULTILINE)
        assert m, banner
        self.port = int(m.group(1))
        self.qemu_options = banner.split("(ccid-card-passthru):\n", 1)[1].splitlines()[0].strip()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def ctl(self, *args: str) -> str:
        result = subprocess.run(
            [str(BIN), "ctl", "--state-dir", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=usbccid_env(),
            check=False,
        )
        assert result.returncode == 0, result
        return result.stdout

    def certificate(self, index: int) -> x509.Certificate:
        path = self.state_dir / "cards" / "default" / f"container-{index:02d}.cert.pem"
        return x509.load_pem_x509_certificate(path.read_bytes())

    def public_key(self, index: int) -> rsa.RSAPublicKey:
        key = self.certificate(index).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def der(self, index: int) -> bytes:
        return self.certificate(index).public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="module")
def passthru(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Passthru]:
    base = tmp_path_factory.mktemp("vscard")
    p = Passthru(base / "state", base / "serve.log")
    p.start()
    try:
        yield p
    finally:
        p.stop()


@pytest.fixture(scope="module")
def vsc_guest(passthru: Passthru, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if in_ci() and cached_image() is None:
        build_image()
    require_tool("qemu-system-x86_64")
    image = cached_image()
    if image is None:
        pytest.skip("no cached guest image (scripts/vm/build-guest, as root)")
    # What the banner says to give QEMU, as it says it.
    assert passthru.qemu_options.startswith("-usb -device usb-ccid -chardev socket,")
    args = shlex.split(passthru.qemu_options)
    g = Guest(image, workdir=tmp_path_factory.mktemp("vm-vscard"), extra_qemu_args=args)
    try:
        g.start()
        yield g
    finally:
        g.close()


#: Until pcscd lists QEMU's reader with a card: prints @@reader= and @@atr=.
WAIT_CARD = r"""
import sys, time
from smartcard.scard import *
part, limit = sys.argv[1], float(sys.argv[2])
end = time.time() + limit
while time.time() < end:
    rv, ctx = SCardEstablishContext(SCARD_SCOPE_USER)
    if rv == SCARD_S_SUCCESS:
        rv, names = SCardListReaders(ctx, [])
        for n in names if rv == SCARD_S_SUCCESS else []:
            if part in n:
                rv, st = SCardGetStatusChange(ctx, 0, [(n, SCARD_STATE_UNAWARE)])
                if rv == SCARD_S_SUCCESS and st[0][1] & SCARD_STATE_PRESENT:
                    print("@@reader=" + n)
                    print("@@atr=" + bytes(st[0][2]).hex())
                    sys.exit(0)
        SCardReleaseContext(ctx)
    time.sleep(0.2)
sys.exit("no card in a reader named *%s* within %s s" % (part, limit))
"""


def _wait_card(guest: Guest, timeout: float = 90) -> dict[str, str]:
    probe = guest.put_file("vsc_wait.py", WAIT_CARD)
    r, v = _run(guest, f"python3 {probe} '{READER_PART}' {timeout}", timeout=timeout + 30)
    assert r.ok, f"{r}\n{guest.qemu_log.read_text(errors='replace')[-2000:]}"
    return v


def test_pcscd_sees_qemus_reader_with_our_card(vsc_guest: Guest, passthru: Passthru) -> None:
    v = _wait_card(vsc_guest)
    passthru.reader = v["reader"]
    assert v["atr"] == ATR_VCARD_NSS.hex()  # ours, through the copy QEMU stored
    (reader,) = json.loads(passthru.ctl("--json", "status"))["readers"]
    assert reader["frontend"] == "vscard"
    assert reader["client"].startswith("127.0.0.1:")  # QEMU's chardev
    assert reader["slots"][0]["state"] == "active"
    assert reader["slots"][0]["detail"] == f"QEMU {reader['client']}: inserted"


def test_opensc_on_the_cac_card(vsc_guest: Guest, passthru: Passthru) -> None:
    """The CAC checks of test_opensc.py, over usb-ccid + ccid-card-passthru."""
    message = b"usbccid: signed in a guest through QEMU's ccid-card-passthru\n"
    secret = b"decrypted through VSCard"
    msg = vsc_guest.put_file("vsc-msg.bin", message)
    enc = vsc_guest.put_file(
        "vsc-enc.bin", passthru.public_key(2).encrypt(secret, padding.PKCS1v15())
    )
    login = f"--login --pin {PIN}"
    r, v = _run(
        vsc_guest,
        f"""
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- pkcs15-tool -D'; pkcs15-tool -D; emit p15_rc $?
echo '--- pkcs11-tool -O'; pkcs11-tool {login} -O; emit p11_rc $?
for id in {" ".join(IDS)}; do
    pkcs11-tool -r --type cert --id $id -o /tmp/cert.der && emit cert$id "$(hex /tmp/cert.der)"
done
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 0001 -i {msg} -o /tmp/s1 \
    && emit sig "$(hex /tmp/s1)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0003 -i {enc} -o /tmp/d1 \
    && emit dec "$(hex /tmp/d1)"
emit wrong "$(pkcs11-tool --login --pin 11223344 -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
pkcs11-tool {login} -O >/dev/null; emit relogin_rc $?
""",
        timeout=300,
    )
    assert v.get("name") == "Common Access Card (CAC)", r
    assert v.get("p15_rc") == "0", r
    assert v.get("p11_rc") == "0", r
    p15 = r.stdout.split("--- pkcs15-tool -D", 1)[1].split("--- pkcs11-tool -O", 1)[0]
    p11 = r.stdout.split("--- pkcs11-tool -O", 1)[1]
    for label in LABELS:
        assert f"Private RSA Key [{label}]" in p15, r
        assert f"X.509 Certificate [{label}]" in p15, r
    for kind in ("Private Key Object", "Public Key Object", "Certificate Object"):
        assert p11.count(kind) == 3, (kind, r)
    for i, ident in enumerate(IDS):
        assert v.get(f"cert{ident}") == passthru.der(i).hex(), (ident, r)
    assert "sig" in v, r
    passthru.public_key(0).verify(
        bytes.fromhex(v["sig"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("dec") == secret.hex(), r
    assert v.get("wrong") == "CKR_PIN_INCORRECT", r
    assert v.get("relogin_rc") == "0", r


def test_coolkey_on_the_cac_card(vsc_guest: Guest, passthru: Passthru) -> None:
    message = b"usbccid: signed by coolkey through ccid-card-passthru"
    info = vsc_guest.put_file("vsc-digest-info.bin", _sha256_digest_info(message))
    ck = f"pkcs11-tool --module {COOLKEY}"
    r, v = _run(
        vsc_guest,
        f"""
echo '--- objects'; {ck} --login --pin {PIN} -O 2>/dev/null; emit list_rc $?
for id in {" ".join(IDS)}; do
    {ck} -r --type cert --id $id -o /tmp/cert.der 2>/dev/null && emit cert$id "$(hex /tmp/cert.der)"
done
{ck} --login --pin {PIN} --sign --mechanism RSA-PKCS --id 0001 -i {info} -o /tmp/s \
    2>/dev/null && emit sig "$(hex /tmp/s)"
""",
        timeout=240,
    )
    assert v.get("list_rc") == "0", r
    objects = r.stdout.split("--- objects", 1)[1]
    assert objects.count("Certificate Object") == 3, r
    assert objects.count("Private Key Object") == 3, r
    for i, ident in enumerate(IDS):
        assert v.get(f"cert{ident}") == passthru.der(i).hex(), (ident, r)
    assert "sig" in v, r
    passthru.public_key(0).verify(
        bytes.fromhex(v["sig"]), message, padding.PKCS1v15(), hashes.SHA256()
    )


def test_card_removal_and_insertion_reach_pcscd(
    request: pytest.FixtureRequest, vsc_guest: Guest, passthru: Passthru
) -> None:
    if not passthru.reader:
        passthru.reader = _wait_card(vsc_guest)["reader"]
    actions: dict[str, Callable[[], object]] = {
        "remove": lambda: passthru.ctl("remove", "reader0"),
        "insert": lambda: passthru.ctl("insert", "reader0"),
    }
    steps = [(a, passthru.reader, w) for a, w in [("remove", "empty"), ("insert", "present")] * 2]
    with Trigger(actions) as trigger:
        events = _run_events(vsc_guest, trigger, steps)
    atr = ATR_VCARD_NSS.hex()
    for e in events:
        assert e["want"] != "present" or e["atr"] == atr, e
    latencies = [e["latency"] for e in events]
    _report(request, "vscard_event_latencies_s", latencies)
    assert max(latencies) < MAX_EVENT_LATENCY, events
    # ... and the card works after it came back.
    r, v = _run(vsc_guest, 'emit name "$(opensc-tool -n 2>/dev/null)"', timeout=120)
    assert v.get("name") == "Common Access Card (CAC)", r


#: ``python3 vsc_apdu.py READER HEX...``: each APDU in one connection, without retrying;
#: prints ``@@rN=SW`` (or ``error NAME``) for each.
APDU_PROBE = r"""
import sys
from smartcard.System import readers
reader = next(r for r in readers() if str(r) == sys.argv[1])
conn = reader.createConnection()
conn.connect()
for n, apdu in enumerate(sys.argv[2:]):
    try:
        data, sw1, sw2 = conn.transmit(list(bytes.fromhex(apdu)))
        print("@@r%d=%02x%02x" % (n, sw1, sw2))
    except Exception as e:
        print("@@r%d=error %s" % (n, type(e).__name__))
"""

SELECT_PKI0 = "00a4040007a0000000790100"
#: the first step of a chained private-key operation (GSC-IS 2.1 SIGN/DECRYPT, 42 80)
SIGN_STEP = "00428000f0" + "00" * 240


def test_extended_apdus_through_qemus_reader(vsc_guest: Guest, passthru: Passthru) -> None:
    """QEMU 7.2's usb-ccid is T=0 at TPDU level (dev-smartcard-reader.c: dwFeatures
    0x000104fe, dwProtocols T=0): libccid passes an extended-length APDU through as bytes,
    so one that fits a TPDU (here SELECT with a 3-byte Lc) reaches the card and gets its
    answer; the card goes on answering short ones afterwards."""
    if not passthru.reader:
        passthru.reader = _wait_card(vsc_guest)["reader"]
    probe = vsc_guest.put_file("vsc_apdu.py", APDU_PROBE)
    extended = "00a40400000007a0000000790100"
    long_extended = "00a4040000012c" + "a0" * 300  # Lc 300: no such applet
    r, v = _run(
        vsc_guest,
        f"python3 {probe} '{passthru.reader}' {extended} {long_extended} {SELECT_PKI0}",
        timeout=120,
    )
    print(f"extended APDUs: {v}")
    assert v.get("r0") == "610d", r  # SELECT PKI: 13 bytes of FCI for GET RESPONSE
    assert v.get("r2") == "610d", r
    assert "r1" in v, r


def test_security_state_between_guest_processes(
    request: pytest.FixtureRequest, vsc_guest: Guest, passthru: Passthru
) -> None:
    """A limit of QEMU's reader, pinned down: the PIN verified by one process still holds
    for the next one, right after (as with any reader: OpenSC left the card as it was)
    and also 15 s later. QEMU's usb-ccid answers the guest's power cycles itself and
    tells the card nothing (VSCard has no message for them), so pcscd's power-off of an
    idle card never reaches ours, which is reset only when it is inserted. (Over USB/IP,
    measured the same way, the second probe gets 69 82: the power-off reaches the card.)"""
    if not passthru.reader:
        passthru.reader = _wait_card(vsc_guest)["reader"]
    probe = vsc_guest.put_file("vsc_apdu.py", APDU_PROBE)
    sign = f"python3 {probe} '{passthru.reader}' {SELECT_PKI0} 00c000000d {SIGN_STEP}"
    r, v = _run(
        vsc_guest,
        f"pkcs11-tool --login --pin {PIN} -O >/dev/null; emit first $?\n"
        f"{sign} | sed 's/@@r/@@now/'\nsleep 15\n{sign} | sed 's/@@r/@@later/'",
        timeout=180,
    )
    print(f"security state: {v}")
    assert v.get("first") == "0", r
    _report(request, "sign_without_pin_after_login", [v.get("now2"), v.get("later2")])
    assert v.get("now2") == "9000", r  # a sign step accepted without VERIFY
    assert v.get("later2") == "9000", r  # ... and still, after pcscd's idle power-off


def test_leaving_empties_the_reader_and_qemu_comes_back(
    vsc_guest: Guest, passthru: Passthru
) -> None:
    """Stopping the server sends CardRemove + ReaderRemove (QEMU ignores the chardev
    closing, so without them the guest would keep a dead card); QEMU's chardev
    (reconnect=1) finds a new server on the same port, which adds the reader again."""
    if not passthru.reader:
        passthru.reader = _wait_card(vsc_guest)["reader"]
    probe = vsc_guest.put_file("vsc_state.py", STATE_PROBE)
    passthru.stop()
    r, v = _run(vsc_guest, f"python3 {probe} '{passthru.reader}' empty 30", timeout=90)
    assert v.get("state") == "empty", r
    port = passthru.port
    passthru.restarts += 1
    passthru.start(port)
    assert passthru.port == port
    r, v = _run(
        vsc_guest,
        f"python3 {probe} '{passthru.reader}' present 60\n"
        'emit name "$(opensc-tool -n 2>/dev/null)"',
        timeout=150,
    )
    assert v.get("state") == "present", r
    assert v.get("name") == "Common Access Card (CAC)", r
    status = passthru.ctl("status")
    assert "slot 0: active" in status, status


#: ``python3 vsc_state.py READER empty|present SECONDS``: waits until pcscd reports the
#: reader's slot so; prints @@state=.
STATE_PROBE = r"""
import sys, time
from smartcard.scard import *
name, want, limit = sys.argv[1], sys.argv[2], float(sys.argv[3])
bit = SCARD_STATE_PRESENT if want == "present" else SCARD_STATE_EMPTY
rv, ctx = SCardEstablishContext(SCARD_SCOPE_USER)
end = time.time() + limit
state = SCARD_STATE_UNAWARE
while time.time() < end:
    rv, st = SCardGetStatusChange(ctx, 1000, [(name, state)])
    if rv == SCARD_S_SUCCESS:
        state = st[0][1] & ~SCARD_STATE_CHANGED
        if state & bit:
            print("@@state=" + want)
            sys.exit(0)
print("@@state=timeout %#x" % state)
sys.exit(1)
"""
