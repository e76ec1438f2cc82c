"""A card passed through from the host's PC/SC into the guest (``type = "pcsc"``).

The "real" card is itself a usbccid CAC, on vsmartcard's vpcd in a private pcscd of the
host (no hardware here). One ``usbccid serve`` on the host holds both ends:

=========  ==============================================  ===============================
reader     what                                            how the host reaches it
=========  ==============================================  ===============================
``real``   the stored card "real" (3 x RSA-2048)           ``frontend = "vpcd"``: the
                                                           host's pcscd names it "Virtual
                                                           PCD 00 00"
``pass``   ``type = "pcsc"``, ``reader = "Virtual PCD``    USB/IP, bus id 1-1: the guest
           ``00 00"``: every APDU relayed to that card     attaches it
=========  ==============================================  ===============================

So the guest's OpenSC talks, through vhci-hcd, our CCID reader, the passthrough source,
the host's pcscd and vpcd, to the card: it must see the card's own ATR, list, sign
(verified here against the card's certificate), decrypt, and get CKR_PIN_INCORRECT for a
wrong PIN; pulling the "real" card (``usbccid ctl remove real``) must reach the guest's
pcscd, and so must putting it back; a restart of the host's pcscd must empty the slot and
then fill it again.
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
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.frontends.vpcd.realstack import PrivatePcscd, free_port_pair
from tests.vm.guest import HOST, Guest, Result

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PIN = "12345678"
#: The ATR of a usbccid CAC (virt_cacard's): what the guest must see through the relay.
CAC_ATR = "3B 89 00 56 43 41 52 44 5F 4E 53 53"
PRELUDE = r"""
set -u
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
emit() { printf '@@%s=%s\n' "$1" "$2"; }
"""
CARD_IN = "opensc-tool -l 2>/dev/null | grep -q 'Yes .*usbccid pass]'"


def _usbccid() -> list[str]:
    exe = Path(sys.executable).with_name("usbccid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "usbccid"]


@dataclass
class Passthrough:
    pcscd: PrivatePcscd
    state: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    def certificate(self, index: int) -> x509.Certificate:
        pem = (self.state / "cards" / "real" / f"container-{index:02d}.cert.pem").read_bytes()
        return x509.load_pem_x509_certificate(pem)

    def public_key(self, index: int) -> rsa.RSAPublicKey:
        key = self.certificate(index).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def ctl(self, *args: str) -> dict[str, object]:
        result = subprocess.run(
            [*_usbccid(), "ctl", "--state-dir", str(self.state), "--json", *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        reply = json.loads(result.stdout)
        assert isinstance(reply, dict)
        return reply

    def pass_slot_state(self) -> str:
        status = self.ctl("status")
        readers = status.get("result", status)
        assert isinstance(readers, dict)
        for reader in readers["readers"]:
            if reader["name"] == "pass":
                return str(reader["slots"][0]["state"])
        raise AssertionError(status)

    def wait_pass_slot(self, present: bool, timeout: float = 15) -> float:
        """Seconds until the passthrough slot is (not) empty."""
        started = time.monotonic()
        while (self.pass_slot_state() != "empty") != present:
            assert time.monotonic() - started < timeout, self.log.read_text()[-3000:]
            time.sleep(0.05)
        return time.monotonic() - started


@pytest.fixture(scope="module")
def passthrough(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Passthrough]:
    PrivatePcscd.check_requirements()
    base = tmp_path_factory.mktemp("pcsc")
    state = base / "state"
    cli = _usbccid()
    subprocess.run(
        [*cli, "card", "new", "--state-dir", str(state), "--name", "real", "-q"],
        check=True,
        capture_output=True,
        timeout=300,
    )
    pcscd = PrivatePcscd(base / "pcscd", free_port_pair())
    pcscd.start()
    config = base / "usbccid.toml"
    config.write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[[reader]]
name = "real"
frontend = "vpcd"
vpcd = {{ host = "127.0.0.1", port = {pcscd.port} }}
  [[reader.slot]]
  card = "real"

[[reader]]
name = "pass"
identity = "vmware"
  [[reader.slot]]
  type = "pcsc"
  reader = "Virtual PCD 00 00"
"""
    )
    log = base / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                *cli,
                "serve",
                "-v",
                "--state-dir",
                str(state),
                "--config",
                str(base / "usbccid.toml"),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=pcscd.env,  # PCSCLITE_CSOCK_NAME: the private pcscd
        )
    try:
        deadline = time.monotonic() + 60
        while "control socket:" not in log.read_text():
            assert proc.poll() is None, f"usbccid serve exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"usbccid serve not ready:\n{log.read_text()}"
            time.sleep(0.1)
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", log.read_text())
        assert m, log.read_text()
        p = Passthrough(pcscd, state, int(m.group(1)), proc, log)
        p.wait_pass_slot(present=True, timeout=30)  # vpcd connected, pcscd saw it, we relay
        yield p
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        pcscd.stop()


def _values(r: Result) -> dict[str, str]:
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


def _run(guest: Guest, script: str, timeout: float = 300) -> tuple[Result, dict[str, str]]:
    r = guest.run(PRELUDE + script, timeout=timeout)
    assert not r.timed_out, r
    assert r.rc not in (90, 91), f"attaching the reader failed: {r}"
    return r, _values(r)


def _attach(p: Passthrough) -> str:
    return (
        f"usbip --tcp-port {p.port} attach -r {HOST} -b 1-1 >/dev/null || exit 90\n"
        f'wait-for 60 sh -c "{CARD_IN}" || exit 91\n'
    )


def test_passed_through_card_with_opensc(vm_guest: Guest, passthrough: Passthrough) -> None:
    p = passthrough
    message = b"usbccid: signed in the guest by a card passed through from PC/SC\n"
    secret = b"decrypted through two pcscds"
    msg = vm_guest.put_file("pcsc-msg.bin", message)
    enc = vm_guest.put_file("pcsc-enc.bin", p.public_key(2).encrypt(secret, padding.PKCS1v15()))
    login = f"--login --pin {PIN}"
    r, v = _run(
        vm_guest,
        _attach(p)
        + f"""
emit atr "$(opensc-tool -a 2>/dev/null | tail -n 1)"
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- objects'; pkcs11-tool -O; emit list_rc $?
pkcs11-tool -r --type cert --id 0001 -o /tmp/c.der && emit cert1 "$(hex /tmp/c.der)"
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 0001 -i {msg} -o /tmp/s \
    && emit sig "$(hex /tmp/s)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0003 -i {enc} -o /tmp/d \
    && emit dec "$(hex /tmp/d)"
emit wrong "$(pkcs11-tool --login --pin 99999999 -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
pkcs11-tool {login} -O >/dev/null; emit right_rc $?
""",
    )
    assert v.get("atr", "").upper().replace(":", " ") == CAC_ATR, r
    assert v.get("name") == "Common Access Card (CAC)", r
    assert v.get("list_rc") == "0", r
    assert r.stdout.split("--- objects", 1)[1].count("Certificate Object") == 3, r
    from cryptography.hazmat.primitives.serialization import Encoding

    assert v.get("cert1") == p.certificate(0).public_bytes(Encoding.DER).hex(), r
    p.public_key(0).verify(bytes.fromhex(v["sig"]), message, padding.PKCS1v15(), hashes.SHA256())
    assert v.get("dec") == secret.hex(), r
    assert v.get("wrong") == "CKR_PIN_INCORRECT", r
    assert v.get("right_rc") == "0", r  # and the right PIN resets the counter


def test_the_real_card_s_removal_and_return_reach_the_guest(
    vm_guest: Guest, passthrough: Passthrough
) -> None:
    p = passthrough
    r, _ = _run(vm_guest, _attach(p))
    assert r.ok, r
    p.ctl("remove", "real")  # the "real" card leaves its (vpcd) reader
    removal = p.wait_pass_slot(present=False)
    r, v = _run(vm_guest, f'wait-for 60 sh -c "! {CARD_IN}"; emit gone $?\n')
    assert v.get("gone") == "0", r
    p.ctl("insert", "real")
    insertion = p.wait_pass_slot(present=True)
    r, v = _run(
        vm_guest,
        f'wait-for 60 sh -c "{CARD_IN}"; emit back $?\nemit name "$(opensc-tool -n 2>/dev/null)"\n',
    )
    assert v.get("back") == "0", r
    assert v.get("name") == "Common Access Card (CAC)", r
    # From the ctl command to our slot's change: vpcd's removal reaches the host's pcscd
    # at its next 400 ms presence poll, and SCardGetStatusChange tells us at once.
    print(f"pcsc passthrough: slot emptied {removal:.3f} s, filled {insertion:.3f} s after ctl")
    assert removal < 3.0
    assert insertion < 3.0


def test_pcscd_restart_empties_the_slot_and_it_comes_back(passthrough: Passthrough) -> None:
    p = passthrough
    p.pcscd.stop()
    p.wait_pass_slot(present=False)
    assert "is pcscd running?" in p.log.read_text() or "pcscd:" in p.log.read_text()
    p.pcscd.start()
    back = p.wait_pass_slot(present=True, timeout=30)
    print(f"pcsc passthrough: card back {back:.3f} s after the host's pcscd started again")
