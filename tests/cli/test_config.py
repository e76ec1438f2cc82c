"""Configuration files: valid ones parse, each kind of invalid one names its line and why."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from tests.cli.helpers import assert_one_line_error, make_cert_and_key, run
from usbccid.cards.cac import CardConfig, CertKeyFiles, Pkcs12File
from usbccid.tool.config import (
    LOOPBACK_NETWORKS,
    Config,
    address_allowed,
    load_config,
    parse_config,
)
from usbccid.tool.schema import ConfigError, KeyLocator

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    make_cert_and_key(d, "id")
    (d / "sig.p12").write_bytes(b"not checked by the parser")
    return d


def parse(text: str, base: Path | None = None) -> Config:
    return parse_config(
        text, "test.toml", base or Path("/nonexistent"), preset_names=lambda: ["vmware", "qemu"]
    )


def error(text: str, base: Path | None = None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text, base)
    return info.value


FULL = """
state_dir = "state"
trace = true

[server]
host = "0.0.0.0"
port = 3241
allow = ["10.0.0.0/8", "192.0.2.7", "::1/128"]

[[reader]]
name = "desk"
identity = "qemu"

  [[reader.slot]]
  card = "default"

  [[reader.slot]]
  containers = [
    { cert = "id.pem", key = "id.key" },
    { pkcs12 = "sig.p12", passphrase = "secret", label = "Signing" },
  ]
  pin = "0123"
  unblock_code = "87654321"
  tries = 5
  inserted = false

[[reader]]
name = "other"
bus_id = "1-2"
identity = { vendor_id = "0e0f", product_id = 4, serial_number = "X1" }

  [[reader.slot]]
  card = "none"
"""


def test_full_configuration(pki: Path) -> None:
    config = parse_config(FULL, "full.toml", pki)
    assert config.server.host == "0.0.0.0"
    assert config.server.port == 3241
    assert config.server.allow[1] == ipaddress.ip_network("192.0.2.7/32")
    assert config.state_dir == pki / "state"
    assert config.trace
    desk, other = config.readers
    assert desk.identity.preset == "qemu"
    assert isinstance(desk.slots[0].card, CardConfig)
    assert desk.slots[0].card.stored == "default"
    card = desk.slots[1].card
    assert isinstance(card, CardConfig)
    assert card.stored is None
    assert not desk.slots[1].inserted
    c0, c1 = card.containers
    assert isinstance(c0, CertKeyFiles)
    assert c0.cert == pki / "id.pem"
    assert isinstance(c1, Pkcs12File)
    assert c1.passphrase == "secret"
    assert c1.label == "Signing"
    assert c0.origin == "full.toml:19"
    assert card.pin.pin == "0123"
    assert card.pin.tries == 5
    assert card.pin.unblock_tries == 10
    assert other.bus_id == "1-2"
    assert other.identity.vendor_id == 0x0E0F
    assert other.identity.product_id == 4
    assert other.slots[0].card is None


def test_empty_file_is_the_default() -> None:
    config = parse("")
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 3240
    assert config.server.allow == LOOPBACK_NETWORKS
    assert [r.name for r in config.readers] == ["reader0"]
    assert isinstance(config.readers[0].slots[0].card, CardConfig)
    assert config.readers[0].slots[0].card.stored == "default"


def test_example_configuration_is_valid(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "usbccid.toml").read_text()
    config = parse_config(text, "usbccid.toml", tmp_path)
    assert config.readers


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[server]\nport = 3240\nport = 1\n", 3, "invalid TOML"),
        ("[server\n", 1, "invalid TOML"),
        ("[server]\nhost = 127.0.0.1\n", 2, "invalid TOML"),
        ("colour = 1\n", 1, "colour: unknown key"),
        ("\n[server]\nhots = 'x'\n", 3, "server.hots: unknown key"),
        ("[[reader]]\nname = 'a'\nslots = 2\n", 3, "reader[0].slots: unknown key"),
        (
            "[[reader]]\n[[reader.slot]]\npin_tries = 3\n",
            3,
            "reader[0].slot[0].pin_tries: unknown key",
        ),
        ("[server]\nport = '3240'\n", 2, "server.port: expected an integer, got a string"),
        ("[server]\nport = 70000\n", 2, "out of range"),
        ("[server]\nkeepalive_idle = 0\n", 2, "server.keepalive_idle: must be 1 to 3600, got 0"),
        ("[server]\nkeepalive_count = 'x'\n", 2, "keepalive_count: expected an integer"),
        ("[server]\nallow = '10.0.0.0/8'\n", 2, "server.allow: expected an array"),
        ("[server]\nallow = ['10.0.0.1/8']\n", 2, "host bits set (did you mean 10.0.0.0/8?)"),
        ("[server]\nallow = [\n  '10.0.0.0/8',\n  'example.com',\n]\n", 4, "not an IP network"),
        ("trace = 'yes'\n", 1, "trace: expected a boolean"),
        ("[[reader]]\nname = 'a b'\n", 2, "invalid reader name"),
        ("[[reader]]\nbus_id = 'usb1'\n", 2, "invalid bus id"),
        ("[[reader]]\nname = 'a'\n\n[[reader]]\nname = 'a'\n", 5, "duplicate reader name 'a'"),
        ("[[reader]]\nbus_id = '1-1'\n[[reader]]\nbus_id = '1-1'\n", 4, "duplicate bus id '1-1'"),
        ("[[reader]]\nidentity = 'omnikey'\n", 2, "unknown identity preset 'omnikey'"),
        ("[[reader]]\nidentity = { vendor_id = 1 }\n", 2, "give both vendor_id and product_id"),
        ("[[reader]]\nidentity = { vendor_id = 'zz', product_id = 1 }\n", 2, "not a hexadecimal"),
        ("[[reader]]\nslot = []\n", 2, "at least one slot"),
        ("[[reader]]\n[[reader.slot]]\ntype = 'piv'\n", 3, "unknown card type 'piv'"),
        ("[[reader]]\n[[reader.slot]]\ncard = 'default'\npin = '1234'\n", 4, "keeps its own PIN"),
        ("[[reader]]\n[[reader.slot]]\ncontainers = []\n", 3, "at least one container"),
        (
            "[[reader]]\n[[reader.slot]]\ncontainers = [{ cert = 'id.pem' }]\n",
            3,
            "needs cert and key",
        ),
        ("[[reader]]\n[[reader.slot]]\ninserted = 1\n", 3, "expected a boolean, got an integer"),
        (
            "[[reader]]\n[[reader.slot]]\n"
            "containers = [{ pkcs12 = 'x', passphrase = 'a', passphrase_env = 'B' }]\n",
            3,
            "give only one of passphrase, passphrase_env",
        ),
        (
            "[[reader]]\n[[reader.slot]]\ncard = 'none'\ninserted = true\npin = '1234'\n",
            3,
            "empty slot",
        ),
    ],
)
def test_invalid(text: str, line: int, reason: str) -> None:
    exc = error(text)
    assert exc.line == line, str(exc)
    assert reason in str(exc)
    assert str(exc).startswith(f"test.toml:{line}: ")
    assert "\n" not in str(exc)


SLOT = (
    "[[reader]]\n[[reader.slot]]\ncontainers = [{{ cert = 'id.pem', key = 'id.key' }}]\n{extra}\n"
)


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("pin = '123'", "the PIN must be 4 to 8 digits, got 3 characters"),
        ("pin = '123456789'", "the PIN must be 4 to 8 digits, got 9 characters"),
        ("pin = '12a4'", "(digits only)"),
        ("pin = 1234", "write it as a string"),
        ("unblock_code = '12'", "the unblock code must be 4 to 8 digits"),
        ("tries = 0", "must be 1 to 15"),
        ("tries = 16", "must be 1 to 15"),
        ("tries = true", "expected an integer, got a boolean"),
        ("card_id = 'xyz'", "hexadecimal"),
    ],
)
def test_invalid_pin_policy(pki: Path, extra: str, reason: str) -> None:
    exc = error(SLOT.format(extra=extra), pki)
    assert exc.line == 4, str(exc)
    assert reason in str(exc)


def test_missing_files(pki: Path) -> None:
    text = (
        "[[reader]]\n[[reader.slot]]\ncontainers = [\n"
        "  { cert = 'id.pem', key = 'id.key' },\n  { cert = 'id.pem', key = 'nope.key' },\n]\n"
    )
    exc = error(text, pki)
    assert exc.line == 5
    assert f"reader[0].slot[0].containers[1].key: no such file: {pki / 'nope.key'}" in str(exc)
    exc = error("[[reader]]\n[[reader.slot]]\ncontainers = [{ pkcs12 = 'x.p12' }]\n", pki)
    assert exc.line == 3
    assert "no such file" in str(exc)


def test_load_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(bad)


def test_key_locator_follows_toml_structure() -> None:
    text = (
        '[a]\nx = 1\n[[b]]\ny = "q\\"z"\n[[b]]\n"y" = 2\n[b.c]\n'
        "z = { k = [1, 2], \"m\" = '''\nx''' }\nw.v = 3\n"
    )
    loc = KeyLocator(text)
    assert loc.line_of(("a", "x")) == 2
    assert loc.line_of(("b", 0, "y")) == 4
    assert loc.line_of(("b", 1, "y")) == 6
    assert loc.line_of(("b", 1, "c", "z", "k", 1)) == 8
    assert loc.line_of(("b", 1, "c", "w", "v")) == 10
    assert loc.line_of(("b", 1, "c", "nothing")) == 7


def test_keepalive_settings() -> None:
    server = parse(
        "[server]\nkeepalive_idle = 5\nkeepalive_interval = 2\nkeepalive_count = 4\n"
    ).server
    assert (server.keepalive_idle, server.keepalive_interval, server.keepalive_count) == (5, 2, 4)
    default = parse("").server
    window = default.keepalive_idle + default.keepalive_interval * default.keepalive_count
    assert window <= 60  # a vanished importer frees its device within a minute


def test_allow_list() -> None:
    nets = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert address_allowed("10.1.2.3", nets)
    assert address_allowed("::ffff:10.1.2.3", nets)  # IPv4-mapped, from a dual-stack socket
    assert address_allowed("::1", nets)
    assert not address_allowed("192.0.2.1", nets)
    assert not address_allowed("127.0.0.1", nets)
    assert not address_allowed("garbage", nets)


def test_serve_rejects_invalid_config_with_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        "[server]\nport = 3240\n\n[[reader]]\nname = 'r'\n"
        "[[reader.slot]]\ncard = 'default'\npin = '12'\n"
    )
    result = run("serve", "--config", path, "--state-dir", tmp_path / "state")
    assert_one_line_error(result, f"{path}:8:", "reader[0].slot[0].pin")
    result = run("serve", "--config", tmp_path / "absent.toml")
    assert_one_line_error(result, "absent.toml", "no such file")
    path.write_text("[server\n")
    result = run("serve", "--config", path, "--check")
    assert_one_line_error(result, f"{path}:1:", "invalid TOML")


def test_pinpad_and_keypad() -> None:
    from usbccid.tool.config import CARD_PIN, KeypadConfig, PinpadConfig, with_overrides

    c = parse(
        "[[reader]]\nname = 'a'\npinpad = true\n\n"
        "[[reader]]\nname = 'b'\npinpad = { timeout = 5, display = 'none' }\n"
        "keypad = { enter = 'card-pin', new = '24681357' }\n\n"
        "[[reader]]\nname = 'c'\npinpad = { display = '4x20' }\nkeypad = { enter = '1234' }\n\n"
        "[[reader]]\nname = 'd'\npinpad = false\n"
    )
    a, b, c_, d = c.readers
    assert (a.pinpad, a.keypad) == (PinpadConfig(), None)
    assert b.pinpad == PinpadConfig(timeout=5.0, display=None)
    assert b.keypad == KeypadConfig(enter=CARD_PIN, new="24681357")
    assert c_.pinpad == PinpadConfig(display=(4, 20))
    assert c_.keypad == KeypadConfig(enter="1234")
    assert d.pinpad is None
    # --pinpad / --keypad on the command line
    plain = parse("[[reader]]\nname = 'x'\n")
    assert plain.readers[0].pinpad is None
    assert with_overrides(plain, pinpad=True).readers[0].pinpad == PinpadConfig()
    keyed = with_overrides(plain, keypad=CARD_PIN).readers[0]
    assert (keyed.pinpad, keyed.keypad) == (PinpadConfig(), KeypadConfig(enter=CARD_PIN))
    kept = with_overrides(c, pinpad=True)
    assert kept.readers[1].pinpad == b.pinpad  # a configured PIN pad stays as it is
    mixed = parse("[[reader]]\nname = 'u'\n\n[[reader]]\nname = 'v'\nfrontend = 'vpcd'\n")
    u, v = with_overrides(mixed, keypad="1234").readers
    assert (u.pinpad, u.keypad) == (PinpadConfig(), KeypadConfig(enter="1234"))
    assert (v.pinpad, v.keypad) == (None, None)  # vpcd carries APDUs, not PC_to_RDR_Secure


@pytest.mark.parametrize(
    ("text", "line", "reason"),
    [
        ("[[reader]]\npinpad = 'yes'\n", 2, "reader[0].pinpad: expected true, false or a table"),
        ("[[reader]]\npinpad = { timeout = 0 }\n", 2, "seconds, 1 to 3600"),
        ("[[reader]]\npinpad = { display = '16x' }\n", 2, '"LINESxCOLUMNS"'),
        ("[[reader]]\npinpad = { beep = true }\n", 2, "unknown key"),
        ("[[reader]]\nkeypad = { enter = '1234' }\n", 2, "needs a PIN pad (pinpad = true)"),
        ("[[reader]]\npinpad = true\nkeypad = { enter = '12a4' }\n", 3, '"card-pin" or 1 to 32'),
        ("[[reader]]\npinpad = true\nkeypad = { new = '1234' }\n", 3, "missing key 'enter'"),
        ("[[reader]]\npinpad = true\nkeypad = { enter = 1234 }\n", 3, "expected a string"),
        ("[[reader]]\nfrontend = 'vpcd'\npinpad = true\n", 3, "a vpcd reader has no PIN pad"),
    ],
)
def test_invalid_pinpad(text: str, line: int, reason: str) -> None:
    exc = error(text)
    assert exc.line == line, str(exc)
    assert reason in str(exc), str(exc)
