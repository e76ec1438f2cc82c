"""The token sources as configured slots: their TOML tables, ``usbccid serve --check``,
``usbccid card show``, and a served token card whose slot follows the token.

The command-line tests run the installed ``usbccid`` script; the served one runs the
real App (``usbccid.testing``) and talks CCID over USB/IP with pyusb.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.cac.test_tlv_and_rsa import emsa_pkcs1_v15
from tests.cards.conftest import SOFTHSM_MODULE, NssDb, SoftHsm
from tests.cli.helpers import assert_one_line_error, run, usbccid_env
from usbccid.cards.nss import LIBRARY_PARAMETERS, DbLocation, NssSlotConfig, Softokn
from usbccid.cards.pkcs11 import Pkcs11SlotConfig, TokenCard, TokenSelector
from usbccid.testing import usbccid_server
from usbccid.tool.config import load_config, parse_config
from usbccid.tool.schema import ConfigError

INTR_IN = 0x83


def slot(text: str, tmp_path: Path) -> object:
    config = parse_config(f"[[reader]]\nname = 'r'\n[[reader.slot]]\n{text}", "c.toml", tmp_path)
    return config.readers[0].slots[0].card


def test_pkcs11_table(tmp_path: Path) -> None:
    (tmp_path / "pin").write_text("1234\n")
    card = slot(
        'type = "pkcs11"\nmodule = "libsofthsm2.so"\ntoken_label = "CAC test"\n'
        'ids = ["01", "0A0b"]\ncheck_pin_file = "pin"\npoll_interval = 0.5\n',
        tmp_path,
    )
    assert isinstance(card, Pkcs11SlotConfig)
    assert card.source.module == "libsofthsm2.so"  # a library name: dlopen's search path
    assert card.source.token == TokenSelector(label="CAC test")
    assert card.source.ids == (b"\x01", b"\x0a\x0b")
    assert card.check_pin_file == tmp_path / "pin"
    assert card.poll_interval == 0.5
    assert card.origin == "c.toml:3"


def test_nss_table(tmp_path: Path) -> None:
    card = slot('type = "nss"\ndb = "sql:db"\ncerts = ["cert1", "cert2"]\n', tmp_path)
    assert isinstance(card, NssSlotConfig)
    assert DbLocation.parse(card.source.db) == DbLocation("sql", tmp_path / "db")
    assert card.source.certs == ("cert1", "cert2")
    bare = slot('type = "nss"\ndb = "/x/y"\ncerts = ["a"]\n', tmp_path)
    assert isinstance(bare, NssSlotConfig)
    assert bare.source.db == "sql:/x/y"


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ('type = "pkcs11"\n', 3, "reader[0].slot[0]: missing key 'module'"),
        ('type = "pkcs11"\nmodule = "m.so"\nids = ["zz"]\n', 6, "ids[0]: not hexadecimal: 'zz'"),
        ('type = "pkcs11"\nmodule = "m.so"\nids = [1]\n', 6, "ids[0]: expected a CKA_ID"),
        ('type = "pkcs11"\nmodule = "m.so"\nids = []\n', 6, "ids: 1 to 16 ids"),
        ('type = "pkcs11"\nmodule = "m.so"\nids = ["01", "1"]\n', 6, "ids[1]: not hexadecimal"),
        ('type = "pkcs11"\nmodule = "m.so"\nids = ["01", "01"]\n', 6, "an id is listed twice"),
        ('type = "pkcs11"\nmodule = "./nope.so"\n', 5, "module: no such file"),
        ('type = "pkcs11"\nmodule = "m.so"\npoll_interval = -1\n', 6, "0 (never) to 3600"),
        ('type = "pkcs11"\nmodule = "m.so"\npin = "1234"\n', 6, "pin: unknown key"),
        (
            'type = "pkcs11"\nmodule = "m.so"\ncheck_pin_env = "A"\ncheck_pin_file = "f"\n',
            6,
            "give only one of check_pin_file, check_pin_env",
        ),
        ('type = "nss"\ncerts = ["a"]\n', 3, "missing key 'db'"),
        ('type = "nss"\ndb = "sql:x"\n', 3, "missing key 'certs'"),
        ('type = "nss"\ndb = "sql:x"\ncerts = []\n', 6, "certs: 1 to 16 nicknames"),
        ('type = "nss"\ndb = "sql:x"\ncerts = ["a", 2]\n', 6, "certs[1]: expected a certificate"),
        ('type = "nss"\ndb = "sql:x"\ncerts = ["a"]\ncard = "x"\n', 7, "card: unknown key"),
        ('type = "hsm"\n', 4, "unknown card type 'hsm' (supported: cac, pkcs11, nss, pcsc)"),
    ],
)
def test_table_errors(tmp_path: Path, text: str, line: int, reason: str) -> None:
    with pytest.raises(ConfigError) as exc:
        slot(text, tmp_path)
    message = str(exc.value)
    assert message.startswith(f"c.toml:{line}: "), message
    assert reason in message, message


def write_config(tmp_path: Path, *slot_tables: str) -> Path:
    lines = ["[server]", 'host = "127.0.0.1"', "port = 0", ""]
    for i, table in enumerate(slot_tables):
        lines += ["[[reader]]", f'name = "r{i}"', "[[reader.slot]]", table, ""]
    path = tmp_path / "usbccid.toml"
    path.write_text("\n".join(lines))
    return path


def hsm_table(hsm: SoftHsm, extra: str = "") -> str:
    return f'type = "pkcs11"\nmodule = "{hsm.module}"\ntoken_label = "{hsm.label}"\n{extra}'


def nss_table(db: NssDb, certs: str = '"cert1", "cert2", "cert3"', extra: str = "") -> str:
    return f'type = "nss"\ndb = "{db.db}"\ncerts = [{certs}]\n{extra}'


def test_serve_check(hsm: SoftHsm, nss_db: NssDb, tmp_path: Path) -> None:
    env = usbccid_env({"SOFTHSM2_CONF": str(hsm.conf)})
    state = tmp_path / "state"
    good = write_config(tmp_path, hsm_table(hsm), nss_table(nss_db))
    result = run("serve", "--config", good, "--state-dir", state, "--check", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{good}: OK (2 readers, 2 slots)"
    # The PIN/password checks at start-up, right and wrong.
    (tmp_path / "pin").write_text(hsm.pin + "\n")
    (tmp_path / "bad").write_text("0000\n")
    (tmp_path / "pw").write_text(nss_db.password + "\n")
    ok = write_config(
        tmp_path,
        hsm_table(hsm, 'check_pin_file = "pin"\n'),
        nss_table(nss_db, extra='check_password_file = "pw"\n'),
    )
    result = run("serve", "--config", ok, "--state-dir", state, "--check", env=env)
    assert result.returncode == 0, result.stderr
    bad = write_config(tmp_path, hsm_table(hsm, 'check_pin_file = "bad"\n'))
    result = run("serve", "--config", bad, "--state-dir", state, "--check", env=env)
    assert_one_line_error(result, f"{bad}:7: PKCS#11 module {SOFTHSM_MODULE}:", "wrong PIN")
    bad = write_config(tmp_path, nss_table(nss_db, extra='check_password_file = "bad"\n'))
    result = run("serve", "--config", bad, "--state-dir", state, "--check", env=env)
    assert_one_line_error(result, f"{bad}:7: NSS database sql:{nss_db.directory}: wrong password")


def test_a_token_or_database_in_two_slots_is_refused(
    hsm: SoftHsm, nss_db: NssDb, tmp_path: Path
) -> None:
    # One token login (one PIN retry counter on the token), one card: as for stored cards.
    env = usbccid_env({"SOFTHSM2_CONF": str(hsm.conf)})
    state = tmp_path / "state"
    twice = write_config(tmp_path, hsm_table(hsm), hsm_table(hsm))
    result = run("serve", "--config", twice, "--state-dir", state, "--check", env=env)
    assert_one_line_error(result, "is in two slots", "reader r0 slot 0", "reader r1 slot 0")
    twice = write_config(tmp_path, nss_table(nss_db), nss_table(nss_db, certs='"cert1"'))
    result = run("serve", "--config", twice, "--state-dir", state, "--check", env=env)
    assert_one_line_error(result, "NSS database", "is in two slots", "one slot only")
    # a token and a database side by side: fine (test_serve_check)


@pytest.mark.parametrize(
    ("table", "needles"),
    [
        (
            'type = "pkcs11"\nmodule = "/usr/lib/x86_64-linux-gnu/libz.so.1"\n',
            ["not a PKCS#11 module"],
        ),
        ('type = "pkcs11"\nmodule = "libnope-pkcs11.so"\n', ["libnope-pkcs11.so: cannot load:"]),
        (
            f'type = "pkcs11"\nmodule = "{SOFTHSM_MODULE}"\ntoken_label = "gone"\n',
            ["token label 'gone': token not present (present: 'CAC test'"],
        ),
    ],
)
def test_serve_check_token_errors(
    hsm: SoftHsm, tmp_path: Path, table: str, needles: list[str]
) -> None:
    env = usbccid_env({"SOFTHSM2_CONF": str(hsm.conf)})
    config = write_config(tmp_path, table)
    result = run("serve", "--config", config, "--state-dir", tmp_path / "s", "--check", env=env)
    assert_one_line_error(result, f"{config}:7: ", *needles)


def test_serve_check_nss_errors(nss_db: NssDb, tmp_path: Path) -> None:
    state = tmp_path / "s"
    config = write_config(tmp_path, nss_table(nss_db, '"cert1", "cert9"'))
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, "no certificate with nickname 'cert9'", "(the database has: ca,")
    config = write_config(tmp_path, 'type = "nss"\ndb = "sql:missing"\ncerts = ["a"]\n')
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, f"NSS database sql:{tmp_path}/missing: no such directory")


def test_card_show(hsm: SoftHsm, nss_db: NssDb, tmp_path: Path) -> None:
    env = usbccid_env({"SOFTHSM2_CONF": str(hsm.conf)})
    config = write_config(tmp_path, hsm_table(hsm), nss_table(nss_db, '"cert2"'))
    result = run("card", "show", "--config", config, "--slot", "r0", env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"PKCS#11 module {SOFTHSM_MODULE}, token label 'CAC test'" in out
    assert f"token: 'CAC test', serial {hsm.serial()}" in out
    assert "raw RSA: CKM_RSA_X_509" in out
    assert "container 0: id, RSA 2048, CKA_ID 01" in out
    assert "container 1: sign, RSA 1024, CKA_ID 02" in out
    assert "subject: CN=TOKEN.id" in out
    result = run("card", "show", "--config", config, "--slot", "r1:0", "--json", env=env)
    assert result.returncode == 0, result.stderr
    assert '"label": "cert2"' in result.stdout
    assert '"login_required": true' in result.stdout
    result = run(
        "card", "show", "--pkcs11-module", SOFTHSM_MODULE, "--token-serial", hsm.serial(), env=env
    )
    assert result.returncode == 0, result.stderr
    assert "container 1: sign" in result.stdout
    result = run("card", "show", "--nss-db", nss_db.db, "--cert", "cert3", "--cert", "cert1")
    assert result.returncode == 0, result.stderr
    assert "container 0: cert3, RSA 1024" in result.stdout
    assert "container 1: cert1, RSA 2048" in result.stdout
    result = run("card", "show", "--nss-db", nss_db.db)
    assert_one_line_error(result, "--nss-db needs at least one --cert NICKNAME")


# --------------------------------------------------------------------------- served


def ccid(dev: Any, seq: int, msg_type: int, payload: bytes = b"", p: bytes = b"\0\0\0") -> bytes:
    dev.write(0x01, struct.pack("<BIBB", msg_type, len(payload), 0, seq) + p + payload)
    reply = bytes(dev.read(0x82, 65554, timeout=10000))
    assert reply[7] & 0xC0 == 0, reply[:10].hex()
    return reply[10:]


def apdu(dev: Any, seq: int, command: bytes) -> tuple[bytes, int]:
    out = ccid(dev, seq, 0x6F, command)
    data, sw = out[:-2], int.from_bytes(out[-2:], "big")
    while sw >> 8 == 0x61:
        seq += 1
        out = ccid(dev, seq & 0xFF, 0x6F, bytes((0, 0xC0, 0, 0, sw & 0xFF)))
        data, sw = data + out[:-2], int.from_bytes(out[-2:], "big")
    return data, sw


def interrupt(dev: Any, timeout: float = 10.0) -> bytes:
    return bytes(dev.read(INTR_IN, 8, timeout=int(timeout * 1000)))


def test_served_nss_card_and_token_that_comes_and_goes(nss_db: NssDb, tmp_path: Path) -> None:
    """The real App: an nss slot signs; a pkcs11 slot on softokn follows its token."""
    softokn = Softokn()
    location = DbLocation.parse(nss_db.db)
    token = softokn.open_database(location)
    config_path = write_config(
        tmp_path,
        nss_table(nss_db),
        f'type = "pkcs11"\nmodule = "{softokn.path}"\ntoken_label = "{token.label.strip()}"\n'
        f'library_parameters = "{LIBRARY_PARAMETERS}"\npoll_interval = 0.2\n',
    )
    config = load_config(config_path)
    with usbccid_server(config, state_dir=tmp_path / "state") as server:
        banner = "\n".join(server.call(server.app.banner))
        assert f"NSS database sql:{nss_db.directory} (cert1, cert2, cert3), inserted" in banner
        assert "PIN: the card's own" in banner
        dev = server.device("1-1")
        dev.set_configuration()
        assert interrupt(dev) == bytes([0x50, 0x03])
        assert ccid(dev, 0, 0x62, p=b"\x01\0\0")[:1] == b"\x3b"
        aid = bytes.fromhex("A0 00 00 00 79 01 01")
        assert apdu(dev, 1, bytes((0, 0xA4, 4, 0x0C, len(aid))) + aid)[1] == 0x9000
        pin = nss_db.password.encode().ljust(8, b"\xff")
        assert apdu(dev, 2, bytes((0, 0x20, 0, 0, 8)) + pin)[1] == 0x9000
        block = emsa_pkcs1_v15(b"served by the app", 256)
        assert apdu(dev, 3, bytes((0, 0x42, 0x80, 0, 240)) + block[:240])[1] == 0x9000
        signature, sw = apdu(dev, 4, bytes((0, 0x42, 0, 0, 16)) + block[240:])
        assert sw == 0x9000
        card = server.app.readers[0].slots[0].card
        assert isinstance(card, TokenCard)
        profile = card.source.profile
        assert profile is not None
        key = profile.containers[1].certificate.public_key()
        assert isinstance(key, rsa.RSAPublicKey)
        key.verify(signature, b"served by the app", padding.PKCS1v15(), hashes.SHA256())
        # The pkcs11 slot: its token (a database slot of softokn) leaves and returns.
        other = server.device("1-2")
        other.set_configuration()
        assert interrupt(other) == bytes([0x50, 0x03])
        softokn.close_database(location)
        assert interrupt(other) == bytes([0x50, 0x02])  # the App's watcher removed it
        status = server.call(server.app.status)
        assert status.readers[1].slots[0].state == "empty"
        softokn.open_database(location)
        assert interrupt(other) == bytes([0x50, 0x03])  # and inserted it again
        deadline = time.monotonic() + 10
        while server.call(server.app.status).readers[1].slots[0].state == "empty":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        counters = server.call(server.app.status).readers[1].counters
        assert counters.get("removals") == 1
        assert counters.get("insertions") == 2
