"""Token-backed cards with the real Linux stack in the guest (usbip attach, pcscd, OpenSC).

The host runs the server (the App of ``usbccid serve``, from a configuration file with
``type = "pkcs11"`` and ``type = "nss"`` slots) in this test process, which QEMU's user
network reaches as 10.0.2.2: three readers, each holding a card whose keys never leave
their store:

======  =====================================================  ============================
bus id  card                                                   used for
======  =====================================================  ============================
1-1     ``pkcs11`` source, SoftHSM2 token: key 01 (RSA-2048,   list, sign (PKCS#1 v1.5, PSS),
        generated on the token) and key 02 (RSA-2048, the      decrypt; key 02 through
        token refuses CKM_RSA_X_509 for it:                    libcacard's CKM_RSA_PKCS
        CKA_ALLOWED_MECHANISMS)                                emulation; wrong token PIN
1-2     ``nss`` source: an NSS database with a password,       QEMU's ccid-card-emulated
        certificates cert1, cert2, cert3                       inputs; the database password
                                                               is the PIN; wrong password
1-3     ``pkcs11`` source on NSS's softokn: a database opened  token removal and return as
        as a slot, closed (CKO_NSS_DELSLOT) and reopened       card removal and insertion
======  =====================================================  ============================

Signatures and decrypted data are checked on the host against the certificates on the
token (never against anything the guest says about them).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.cards.conftest import (
    SOFTHSM_MODULE,
    NssDb,
    SoftHsm,
    finalize_module,
    make_nss_db,
    make_softhsm,
    new_ca,
)
from tests.vm.guest import HOST, Guest, Result
from usbccid.cac.profile import TokenCardProfile
from usbccid.cards.nss import LIBRARY_PARAMETERS, DbLocation, NssConfig, NssSource, Softokn
from usbccid.cards.pkcs11 import TokenCard
from usbccid.testing import UsbccidServer, usbccid_server
from usbccid.tool.config import load_config

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PRELUDE = r"""
set -u
hex() { od -An -v -tx1 "$1" | tr -d ' \n'; }
emit() { printf '@@%s=%s\n' "$1" "$2"; }
"""


@dataclass
class TokenServer:
    server: UsbccidServer
    cards: dict[str, TokenCardProfile]  # as first inserted (the certificates stay the same)
    hsm: SoftHsm
    db: NssDb
    location: DbLocation  # the database behind reader 1-3's token

    @property
    def port(self) -> int:
        return self.server.port

    def certificate(self, reader: str, index: int) -> x509.Certificate:
        return self.cards[reader].containers[index].certificate

    def public_key(self, reader: str, index: int) -> rsa.RSAPublicKey:
        key = self.certificate(reader, index).public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        return key

    def attach(self, name: str, busid: str) -> str:
        return (
            f"usbip --tcp-port {self.port} attach -r {HOST} -b {busid} >/dev/null || exit 90\n"
            f"wait-for 60 sh -c 'opensc-tool -l 2>/dev/null | grep -q \"Yes .*usbccid {name}]\"'"
            " || exit 91\n"
        )


@pytest.fixture(scope="module")
def token_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TokenServer]:
    base = tmp_path_factory.mktemp("tokens")
    ca = new_ca()
    hsm = make_softhsm(base / "softhsm", ca)
    hsm.add_key("01", 2048, "id")
    # Key 02: the token lists CKM_RSA_X_509 but refuses it for this key.
    hsm.tool(
        "--login", "--pin", hsm.pin, "--keypairgen", "--key-type", "rsa:2048", "--id", "02",
        "--label", "sign", "--allowed-mechanisms", "RSA-PKCS,SHA256-RSA-PKCS",
        "--usage-sign", "--usage-decrypt",
    )  # fmt: skip
    der = hsm.directory / "pub02.der"
    hsm.tool("--read-object", "--type", "pubkey", "--id", "02", "-o", str(der))
    pub = serialization.load_der_public_key(der.read_bytes())
    assert isinstance(pub, rsa.RSAPublicKey)
    hsm.add_certificate("02", "sign", ca.issue(pub, "TOKEN.sign"))
    old_conf = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(hsm.conf)
    db = make_nss_db(base / "nssdb", ca)
    second = make_nss_db(base / "removable", ca, password="remove1")
    softokn = Softokn()
    location = DbLocation.parse(second.db)
    token = softokn.open_database(location)
    ids = NssSource(NssConfig(second.db, ("cert1",))).check().containers[0].key_id.hex()
    # What `usbccid serve --config` would read; the App runs in this process, so that the
    # test can close and reopen reader 1-3's database (its token) in the server's softokn.
    (base / "usbccid.toml").write_text(
        f"""
[server]
host = "127.0.0.1"
port = 0

[[reader]]
name = "softhsm"
identity = "vmware"
  [[reader.slot]]
  type = "pkcs11"
  module = "{SOFTHSM_MODULE}"
  token_label = "{hsm.label}"

[[reader]]
name = "nss"
identity = "vmware"
  [[reader.slot]]
  type = "nss"
  db = "{db.db}"
  certs = ["cert1", "cert2", "cert3"]

[[reader]]
name = "softokn"
identity = "vmware"
  [[reader.slot]]
  type = "pkcs11"
  module = "{softokn.path}"
  token_label = "{token.label.strip()}"
  library_parameters = "{LIBRARY_PARAMETERS}"
  ids = ["{ids}"]
  poll_interval = 0.5
"""
    )
    try:
        with usbccid_server(load_config(base / "usbccid.toml"), state_dir=base / "state") as srv:
            cards = {}
            for r in srv.app.readers:
                loaded = r.slots[0].card
                assert isinstance(loaded, TokenCard)
                assert loaded.source.profile is not None
                cards[r.config.name] = loaded.source.profile
            yield TokenServer(srv, cards, hsm, db, location)
    finally:
        finalize_module(SOFTHSM_MODULE)
        if old_conf is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old_conf


def _values(r: Result) -> dict[str, str]:
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


def _run(guest: Guest, script: str, timeout: float = 240) -> tuple[Result, dict[str, str]]:
    r = guest.run(PRELUDE + script, timeout=timeout)
    assert not r.timed_out, r
    assert r.rc not in (90, 91), f"attaching the reader failed: {r}"
    return r, _values(r)


def test_softhsm_token_card_with_opensc(vm_guest: Guest, token_server: TokenServer) -> None:
    """OpenSC lists, signs and decrypts with keys that stay on a SoftHSM token."""
    s = token_server
    message = b"usbccid: signed in the guest on a SoftHSM token, verified on the host\n"
    secret = b"for the token's eyes only"
    msg = vm_guest.put_file("tok-msg.bin", message)
    enc1 = vm_guest.put_file(
        "tok-enc1.bin", s.public_key("softhsm", 0).encrypt(secret, padding.PKCS1v15())
    )
    enc2 = vm_guest.put_file(
        "tok-enc2.bin", s.public_key("softhsm", 1).encrypt(secret, padding.PKCS1v15())
    )
    login = f"--login --pin {s.hsm.pin}"
    r, v = _run(
        vm_guest,
        s.attach("softhsm", "1-1")
        + f"""
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- objects'; pkcs11-tool {login} -O; emit list_rc $?
for id in 0001 0002; do
    pkcs11-tool -r --type cert --id $id -o /tmp/c.der && emit cert$id "$(hex /tmp/c.der)"
done
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 0001 -i {msg} -o /tmp/s1 \
    && emit sig1 "$(hex /tmp/s1)"
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS-PSS --id 0001 -i {msg} -o /tmp/s2 \
    && emit pss1 "$(hex /tmp/s2)"
pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id 0002 -i {msg} -o /tmp/s3 \
    && emit sig2 "$(hex /tmp/s3)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0001 -i {enc1} -o /tmp/d1 \
    && emit dec1 "$(hex /tmp/d1)"
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0002 -i {enc2} -o /tmp/d2 \
    && emit dec2 "$(hex /tmp/d2)"
emit wrong "$(pkcs11-tool --login --pin 99999999 -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
pkcs11-tool {login} -O >/dev/null; emit right_rc $?
""",
    )
    assert v.get("name") == "Common Access Card (CAC)", r
    assert v.get("list_rc") == "0", r
    objects = r.stdout.split("--- objects", 1)[1]
    assert objects.count("Private Key Object") == 2, r
    assert objects.count("Certificate Object") == 2, r
    for i, ident in enumerate(("0001", "0002")):
        der = s.certificate("softhsm", i).public_bytes(serialization.Encoding.DER)
        assert v.get(f"cert{ident}") == der.hex(), r
        assert s.certificate("softhsm", i) == s.hsm.certificates[f"0{i + 1}"]
    s.public_key("softhsm", 0).verify(
        bytes.fromhex(v["sig1"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    pss = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32)
    s.public_key("softhsm", 0).verify(bytes.fromhex(v["pss1"]), message, pss, hashes.SHA256())
    # Key 02 signs and decrypts through CKM_RSA_PKCS (the token refuses raw RSA for it).
    s.public_key("softhsm", 1).verify(
        bytes.fromhex(v["sig2"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    assert v.get("dec1") == secret.hex(), r
    assert v.get("dec2") == secret.hex(), r
    assert v.get("wrong") == "CKR_PIN_INCORRECT", r  # 63 C2 from CKF_USER_PIN_COUNT_LOW
    assert v.get("right_rc") == "0", r


def test_nss_database_card_with_opensc(vm_guest: Guest, token_server: TokenServer) -> None:
    """QEMU's ccid-card-emulated inputs (db + 3 nicknames); the password is the PIN."""
    s = token_server
    message = b"usbccid: signed in the guest by an NSS database\n"
    secret = b"decrypted by NSS softokn"
    msg = vm_guest.put_file("nss-msg.bin", message)
    enc = vm_guest.put_file(
        "nss-enc.bin", s.public_key("nss", 2).encrypt(secret, padding.PKCS1v15())
    )
    login = f"--login --pin {s.db.password}"
    r, v = _run(
        vm_guest,
        s.attach("nss", "1-2")
        + f"""
emit name "$(opensc-tool -n 2>/dev/null)"
echo '--- objects'; pkcs11-tool -O; emit list_rc $?
for id in 0001 0002 0003; do
    pkcs11-tool {login} --sign --mechanism SHA256-RSA-PKCS --id $id -i {msg} -o /tmp/s$id \
        && emit sig$id "$(hex /tmp/s$id)"
done
pkcs11-tool {login} --decrypt --mechanism RSA-PKCS --id 0003 -i {enc} -o /tmp/d \
    && emit dec "$(hex /tmp/d)"
emit wrong "$(pkcs11-tool --login --pin 99999999 -O 2>&1 >/dev/null | grep -o 'CKR_[A-Z_]*')"
""",
    )
    assert v.get("name") == "Common Access Card (CAC)", r
    assert v.get("list_rc") == "0", r
    assert r.stdout.split("--- objects", 1)[1].count("Certificate Object") == 3, r
    for i, ident in enumerate(("0001", "0002", "0003")):
        s.public_key("nss", i).verify(
            bytes.fromhex(v[f"sig{ident}"]), message, padding.PKCS1v15(), hashes.SHA256()
        )
    assert v.get("dec") == secret.hex(), r
    assert v.get("wrong") == "CKR_PIN_INCORRECT", r


def test_token_removal_and_return(vm_guest: Guest, token_server: TokenServer) -> None:
    """The token leaves its slot: the server's watcher removes the card, pcscd sees it go;
    the token comes back: a new card, and OpenSC signs with it."""
    s = token_server
    card_in = 'opensc-tool -l 2>/dev/null | grep -q "Yes .*usbccid softokn]"'
    r, v = _run(
        vm_guest,
        s.attach("softokn", "1-3")
        + "pkcs11-tool --login --pin remove1 -O >/dev/null; emit before $?\n",
    )
    assert v.get("before") == "0", r
    softokn = Softokn()
    softokn.close_database(s.location)
    r, v = _run(vm_guest, f"wait-for 60 sh -c '! {card_in}'; emit gone $?\n")
    assert v.get("gone") == "0", r
    softokn.open_database(s.location)
    message = b"signed after the token came back"
    msg = vm_guest.put_file("back-msg.bin", message)
    r, v = _run(
        vm_guest,
        f"wait-for 60 sh -c '{card_in}'; emit back $?\n"
        f"pkcs11-tool --login --pin remove1 --sign --mechanism SHA256-RSA-PKCS --id 0001 "
        f'-i {msg} -o /tmp/s && emit sig "$(hex /tmp/s)"\n',
    )
    assert v.get("back") == "0", r
    s.public_key("softokn", 0).verify(
        bytes.fromhex(v["sig"]), message, padding.PKCS1v15(), hashes.SHA256()
    )
    counters = s.server.call(s.server.app.status).readers[2].counters
    assert (counters.get("removals"), counters.get("insertions")) == (1, 2), counters
