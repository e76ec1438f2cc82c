"""The PIN-pad reader with the real stack: usbip attach, pcscd + libccid, OpenSC, pyscard.

The host runs ``usbccid serve --pinpad --config FILE`` with two readers:

=====  ========  ==========================================================  ============
bus    reader    PIN pad                                                     typed by
=====  ========  ==========================================================  ============
1-1    ``pad``   from ``--pinpad``: bPINSupport 03h, a 2x16 display          ``usbccid ctl
                                                                             pinpad``
1-2    ``auto``  ``pinpad = { display = "none" }``,                          itself
                 ``keypad = { enter = "card-pin" }``
=====  ========  ==========================================================  ============

What Debian 12's clients do with it (libccid 1.5.2, OpenSC 0.23.0, pyscard 2.0.5):

* libccid offers FEATURE_VERIFY_PIN_DIRECT, FEATURE_MODIFY_PIN_DIRECT,
  FEATURE_IFD_PIN_PROPERTIES (wLcdLayout; bEntryValidationCondition 07h, bTimeOut2 0,
  both hard-coded in ifdhandler.c) and the part 10 TLV properties; it reports bMinPINSize
  / bMaxPINSize only for a few readers it knows by VID:PID, so OpenSC keeps the card's own
  4..8 (pkcs15-cac.c).
* OpenSC marks the reader "PIN pad" (``enable_pinpad`` defaults to true: reader-pcsc.c;
  Debian's /etc/opensc/opensc.conf does not set it) and the token CKF_PROTECTED_AUTHENTICATION_PATH
  ("PIN pad present"); ``pkcs11-tool --login`` without ``--pin`` verifies through the pad.
* OpenSC's CAC driver cannot change a PIN through the pad: card-cac.c cac_pin_cmd refuses
  a new PIN shorter than 6 characters before anything reaches the reader, and a PIN typed
  on a pad has length 0 there, so ``pkcs11-tool --change-pin`` ends in CKR_PIN_LEN_RANGE
  without a PC_to_RDR_Secure. The change is shown with FEATURE_MODIFY_PIN_DIRECT from
  pyscard instead, with the structure OpenSC's part10_build_modify_pin_block would build.
* ``pcsc_scan`` shows readers and ATRs only (pcsc-tools has no SCardControl), so the
  features are listed with pyscard's PCSCPart10 helpers.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.vm.guest import HOST, SHARE, Guest, Result

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PIN = "12345678"
TRIES = 3
READERS = (("pad", "1-1"), ("auto", "1-2"))

PRELUDE = r"""
set -u
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
emit() { printf '@@%s=%s\n' "$1" "$2"; }
ckr() { grep -o 'CKR_[A-Z_]*' | head -1; }
sw() { grep -o 'SW1=0x[0-9a-fA-F]*, SW2=0x[0-9a-fA-F]*'; }
"""

#: pyscard in the guest: the PC/SC part 10 features, and the PIN-pad ioctls themselves.
PART10 = r"""
import struct
import sys

from smartcard.scard import SCARD_CTL_CODE
from smartcard.System import readers

# PC/SC v2 part 10: the feature TLVs (tag, 4, big-endian ioctl), parsed here rather than
# with pyscard's PCSCPart10 helpers, whose result keys differ between pyscard versions.
CM_IOCTL_GET_FEATURE_REQUEST = SCARD_CTL_CODE(3400)
VERIFY_PIN_DIRECT, MODIFY_PIN_DIRECT, IFD_PIN_PROPERTIES, GET_TLV_PROPERTIES = 6, 7, 0x0A, 0x12

name = sys.argv[1]
reader = next(r for r in readers() if f"usbccid {name}]" in str(r))
conn = reader.createConnection()
conn.connect()
raw = bytes(conn.control(CM_IOCTL_GET_FEATURE_REQUEST, []))
features = {raw[i]: int.from_bytes(raw[i + 2 : i + 6], "big") for i in range(0, len(raw), 6)}
FF = b"\xff"


def emit(key, value):
    print(f"@@{key}={value}", flush=True)


def control(feature, data=b""):
    return bytes(conn.control(features[feature], list(data)))


if sys.argv[2] == "features":
    emit("features", ",".join(f"{tag:02x}" for tag in sorted(features)))
    # PIN_PROPERTIES_STRUCTURE: wLcdLayout, bEntryValidationCondition, bTimeOut2
    layout, validation, timeout2 = struct.unpack("<HBB", control(IFD_PIN_PROPERTIES))
    emit("wLcdLayout", "%04x" % layout)
    emit("bEntryValidationCondition", "%02x" % validation)
    emit("bTimeOut2", timeout2)
    tlv, data = {}, control(GET_TLV_PROPERTIES)
    while data:
        tag, length = data[0], data[1]
        tlv[tag] = int.from_bytes(data[2 : 2 + length], "little")
        data = data[2 + length :]
    emit("tlv", ",".join(f"{tag:02x}" for tag in sorted(tlv)))
    emit("tlv_lcd", "%dx%d" % (tlv.get(5, 0), tlv.get(4, 0)))  # wLcdMaxLines, ...Characters
elif sys.argv[2] == "verify":
    # PC/SC v2 part 10 PIN_VERIFY_STRUCTURE as OpenSC builds it for the CAC
    apdu = bytes.fromhex("0020000008") + FF * 8
    block = struct.pack("<BBBBBHBBHB3sI", 30, 30, 0x82, 0x08, 0x00, 0x0408, 0x02, 0xFF, 0,
                        0, bytes(3), len(apdu)) + apdu
    emit("verify_sw", control(VERIFY_PIN_DIRECT, block).hex())
elif sys.argv[2] == "modify":
    # PIN_MODIFY_STRUCTURE as part10_build_modify_pin_block builds it (with a display)
    apdu = bytes.fromhex("0024000010") + FF * 16
    block = struct.pack("<BBBBBBBHBBBHBBB3sI", 30, 30, 0x02, 0x08, 0x00, 0, 8, 0x0408, 0x03,
                        0x02, 0x03, 0, 0, 1, 2, bytes(3), len(apdu)) + apdu
    emit("modify_sw", control(MODIFY_PIN_DIRECT, block).hex())
"""


def _usbccid() -> list[str]:
    exe = Path(sys.executable).with_name("usbccid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "usbccid"]


@dataclass
class PadServer:
    """``usbccid serve --pinpad`` on the host, with the readers of :data:`READERS`."""

    port: int
    state_dir: Path
    proc: subprocess.Popen[bytes]
    log: Path
    typed: list[subprocess.CompletedProcess[str]] = field(default_factory=list)

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*_usbccid(), "ctl", "--state-dir", str(self.state_dir), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def pin_state(self, card: str) -> dict[str, object]:
        data = json.loads((self.state_dir / "cards" / card / "pin-state.json").read_text())
        assert isinstance(data, dict)
        return data

    def public_key(self, card: str, index: int) -> rsa.RSAPublicKey:
        pem = (self.state_dir / "cards" / card / f"container-{index:02d}.cert.pem").read_bytes()
        key = x509.load_pem_x509_certificate(pem).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def attach(self, reader: str) -> str:
        busid = dict(READERS)[reader]
        return (
            f"usbip --tcp-port {self.port} attach -r {HOST} -b {busid} >/dev/null || exit 90\n"
            f"wait-for 60 sh -c 'opensc-tool -l 2>/dev/null | grep -q \"Yes .*usbccid {reader}]\"'"
            " || exit 91\n"
        )


@pytest.fixture(scope="module")
def pad_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PadServer]:
    base = tmp_path_factory.mktemp("pinpad")
    state = base / "state"
    cli = _usbccid()
    for name, _ in READERS:
        subprocess.run(
            [*cli, "card", "new", "--state-dir", str(state), "--name", name, "-q",
             "--tries", str(TRIES)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    (base / "usbccid.toml").write_text(
        "[server]\nhost = '127.0.0.1'\nport = 0\n\n"
        "[[reader]]\nname = 'pad'\n  [[reader.slot]]\n  card = 'pad'\n\n"
        "[[reader]]\nname = 'auto'\npinpad = { display = 'none' }\n"
        "keypad = { enter = 'card-pin' }\n  [[reader.slot]]\n  card = 'auto'\n"
    )
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [*cli, "serve", "--pinpad", "--trace", "--state-dir", str(state),
             "--config", str(base / "usbccid.toml")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while "control socket:" not in log.read_text():
            assert proc.poll() is None, f"usbccid serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"usbccid serve not ready:\n{log.read_text()}"
            time.sleep(0.1)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        assert m, log.read_text()
        yield PadServer(int(m.group(1)), state, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        # The digits never reach the server's log (trace included).
        text = log.read_text()
        assert "keyed on the PIN pad, redacted" in text, text[-3000:]
        for secret in (PIN, "24681357", "11112222"):
            assert secret not in text.replace(f"PIN {PIN}", ""), secret


def _values(r: Result) -> dict[str, str]:
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


class Scenario:
    """A guest scenario run on a thread while the host types on the PIN pad."""

    def __init__(self, guest: Guest, script: str, timeout: float) -> None:
        self.result: Result | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = guest.run(PRELUDE + script, timeout=timeout)
            except BaseException as exc:  # reported by finish()
                self.error = exc

        self.thread = threading.Thread(target=run, name="guest-scenario")
        self.thread.start()

    def finish(self, timeout: float) -> tuple[Result, dict[str, str]]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the guest scenario did not finish"
        if self.error is not None:
            raise self.error
        r = self.result
        assert r is not None
        print(r)  # shown with a failure
        assert not r.timed_out, r
        assert r.rc not in (90, 91), f"attaching the reader failed: {r}"
        return r, _values(r)


def _type(server: PadServer, *args: str) -> subprocess.CompletedProcess[str]:
    """``usbccid ctl pinpad pad ...``, waiting up to 240 s for the guest to ask."""
    result = server.ctl("pinpad", "pad", *args, "--wait", "240", timeout=300)
    server.typed.append(result)
    return result


def _wait_for_prompt(server: PadServer, timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while True:
        status = server.ctl("status").stdout
        if "PIN pad waiting" in status:
            return status
        assert time.monotonic() < deadline, status
        time.sleep(0.5)


def _sha256_verify(key: rsa.RSAPublicKey, signature_hex: str, message: bytes) -> None:
    key.verify(bytes.fromhex(signature_hex), message, padding.PKCS1v15(), hashes.SHA256())


# -----------------------------------------------------------------------------------------


def test_pinpad_seen_by_opensc_and_login_through_ctl(
    vm_guest: Guest, pad_server: PadServer
) -> None:
    """opensc-tool/pkcs11-tool see the PIN pad; pkcs11-tool --login without --pin signs
    after ``usbccid ctl pinpad`` typed the PIN, and the signature verifies."""
    message = b"usbccid: signed in the guest after a PIN typed on the virtual PIN pad\n"
    msg = vm_guest.put_file("pinpad-msg.bin", message)
    part10 = vm_guest.put_file("part10.py", PART10)
    scenario = Scenario(
        vm_guest,
        pad_server.attach("pad")
        + f"""
echo '--- opensc-tool -l'; opensc-tool -l
conf=$(ls /etc/opensc.conf /etc/opensc/opensc.conf 2>/dev/null | head -1)
emit conf "${{conf:-none}}"
n=$([ -n "$conf" ] && grep -c '^[^#]*enable_pinpad' "$conf")
emit conf_pinpad "${{n:-0}}"
python3 {part10} pad features
echo '--- pkcs11-tool -L'; pkcs11-tool -L
echo '--- sign'
start=$(date +%s)
pkcs11-tool --login --sign --mechanism SHA256-RSA-PKCS --id 0001 -i {msg} -o /tmp/sig
emit sign_rc $?
emit sign_seconds $(( $(date +%s) - start ))
[ -s /tmp/sig ] && emit sig "$(hex /tmp/sig)"
""",
        timeout=400,
    )
    status = _wait_for_prompt(pad_server)
    time.sleep(3)  # let libccid wait through a few time extensions
    typed = _type(pad_server, "--digits", PIN)
    r, v = scenario.finish(420)
    assert typed.returncode == 0, typed
    assert "8 digits typed: entered" in typed.stdout, typed.stdout
    assert "PIN pad waiting for the current PIN (verify, entry 1 of 1): 0 digits typed, 4-8" in (
        status
    ), status
    assert "display 'Enter PIN'" in status, status
    listing = r.stdout.split("--- opensc-tool -l", 1)[1].split("@@", 1)[0]
    assert re.search(r"Yes\s+PIN pad\s+.*usbccid pad\]", listing), r
    # Debian's opensc.conf leaves enable_pinpad at its default (true)
    assert (v.get("conf"), v.get("conf_pinpad")) == ("/etc/opensc/opensc.conf", "0"), r
    # libccid's feature list: 06 verify, 07 modify, 0a PIN properties, 12 TLV properties
    assert v.get("features") == "06,07,0a,12", r
    assert v.get("wLcdLayout") == "0210", r
    assert (v.get("bEntryValidationCondition"), v.get("bTimeOut2")) == ("07", "0"), r
    assert v.get("tlv_lcd") == "2x16", r
    # wLcdLayout, bTimeOut2, wLcdMaxCharacters, wLcdMaxLines, bPPDUSupport, wIdVendor,
    # wIdProduct, dwMaxAPDUDataSize: no bMinPINSize (06) / bMaxPINSize (07) for this VID:PID
    assert v.get("tlv") == "01,03,04,05,09,0a,0b,0c", r
    tokens = r.stdout.split("--- pkcs11-tool -L", 1)[1].split("--- sign", 1)[0]
    assert "PIN pad present" in tokens, r
    assert v.get("sign_rc") == "0", r
    assert "sig" in v, r
    _sha256_verify(pad_server.public_key("pad", 0), v["sig"], message)
    assert pad_server.pin_state("pad")["tries_left"] == TRIES


def test_wrong_entry_cancel_and_timeout(vm_guest: Guest, pad_server: PadServer) -> None:
    """A wrong PIN on the pad is CKR_PIN_INCORRECT with one try less; Cancel and the
    timeout (OpenSC's bTimeOut: 30 s) are CKR_FUNCTION_CANCELED, and none of them hangs."""
    marker = vm_guest.share / "files" / "pinpad-timed-out"
    marker.unlink(missing_ok=True)
    scenario = Scenario(
        vm_guest,
        pad_server.attach("pad")
        + f"""
p11() {{ pkcs11-tool --login -O 2>&1 >/dev/null | ckr; }}
emit wrong "$(p11)"
emit status_wrong "$(opensc-tool -r 0 -s '00 20 00 00' 2>&1 | sw)"
emit cancelled "$(p11)"
start=$(date +%s)
emit timed_out "$(p11)"
emit timeout_seconds $(( $(date +%s) - start ))
touch {SHARE}/files/{marker.name}
emit right "$(p11)"
""",
        timeout=500,
    )
    wrong = _type(pad_server, "--digits", "11112222")
    assert wrong.returncode == 0, wrong
    deadline = time.monotonic() + 240
    while pad_server.pin_state("pad")["tries_left"] != TRIES - 1:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    cancel = _type(pad_server, "--cancel")
    assert cancel.returncode == 0, cancel
    assert "cancelled" in cancel.stdout, cancel.stdout
    # nobody types for the third prompt: the guest says when it has timed out
    deadline = time.monotonic() + 300
    while not marker.exists():
        assert time.monotonic() < deadline, "the timeout step did not end"
        assert scenario.thread.is_alive() or marker.exists(), scenario.finish(1)
        time.sleep(0.5)
    right = _type(pad_server, "--digits", PIN)
    assert right.returncode == 0, right
    r, v = scenario.finish(520)
    assert v.get("wrong") == "CKR_PIN_INCORRECT", r
    assert v.get("status_wrong") == "SW1=0x63, SW2=0xC2", r  # VERIFY status: 2 tries left
    assert v.get("cancelled") == "CKR_FUNCTION_CANCELED", r
    assert v.get("timed_out") == "CKR_FUNCTION_CANCELED", r
    assert 28 <= int(v.get("timeout_seconds", "0")) <= 90, r
    assert v.get("right") in ("", None), r  # logged in: no CKR_ error printed
    assert pad_server.pin_state("pad")["tries_left"] == TRIES


def test_unattended_keypad_policy_and_pin_change(vm_guest: Guest, pad_server: PadServer) -> None:
    """The ``auto`` reader's keypad types the card's PIN by itself: pkcs11-tool --login
    signs with nobody at the keyboard. OpenSC's CAC driver refuses --change-pin through a
    pad before the reader is asked; the change works with FEATURE_MODIFY_PIN_DIRECT."""
    message = b"usbccid: signed in the guest, the PIN typed by the keypad policy\n"
    msg = vm_guest.put_file("pinpad-auto-msg.bin", message)
    part10 = vm_guest.put_file("part10.py", PART10)
    new_pin = "24681357"
    scenario = Scenario(
        vm_guest,
        pad_server.attach("auto")
        + pad_server.attach("pad")
        + f"""
index() {{ pkcs11-tool -L | grep "usbccid $1]" | sed -n 's/^Slot \\([0-9]*\\).*/\\1/p' | head -1; }}
auto_slot=$(index auto)
pad_slot=$(index pad)
emit slots "$auto_slot,$pad_slot"
echo '--- auto'
pkcs11-tool --slot-index "$auto_slot" --login --sign --mechanism SHA256-RSA-PKCS --id 0001 \
    -i {msg} -o /tmp/asig
emit auto_rc $?
[ -s /tmp/asig ] && emit auto_sig "$(hex /tmp/asig)"
echo '--- change-pin'
emit change_pin "$(pkcs11-tool --slot-index "$pad_slot" --change-pin 2>&1 | ckr)"
echo '--- modify'
python3 {part10} pad modify
python3 {part10} pad verify
python3 {part10} pad modify
""",
        timeout=500,
    )
    # pyscard's MODIFY_PIN_DIRECT: current, new, new again; then VERIFY with the new PIN;
    # then change it back (the other tests use PIN).
    first = _type(pad_server, "--digits", PIN, "--digits", new_pin, "--digits", new_pin)
    verify = _type(pad_server, "--digits", new_pin)
    back = _type(pad_server, "--digits", new_pin, "--digits", PIN, "--digits", PIN)
    r, v = scenario.finish(520)
    for typed in (first, verify, back):
        assert typed.returncode == 0, (typed, r)
    assert "24 digits typed: entered" in first.stdout, first.stdout
    assert v.get("auto_rc") == "0", r
    assert "auto_sig" in v, r
    _sha256_verify(pad_server.public_key("auto", 0), v["auto_sig"], message)
    assert v.get("change_pin") == "CKR_PIN_LEN_RANGE", r
    assert re.findall(r"^@@modify_sw=(.*)$", r.stdout, re.MULTILINE) == ["9000", "9000"], r
    assert v.get("verify_sw") == "9000", r
    assert pad_server.pin_state("pad")["pin_hex"] == PIN.encode().hex()
    serve_log = pad_server.log.read_text()
    assert "reader auto slot 0: PIN pad asks for the current PIN" in serve_log, serve_log[-2000:]
    assert "the keypad policy types the card's PIN" in serve_log
