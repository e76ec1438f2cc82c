"""The vpcd front end in the program: configuration, ``serve --vpcd``, the composition root
(insert/remove/status through the control plane, ``--trace``), against a stand-in vpcd."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.cli.helpers import assert_one_line_error, run
from tests.frontends.vpcd.fakevpcd import FakeVpcd, Peer
from tests.frontends.vpcd.realstack import free_port_pair
from usbccid.cac.card import ATR_VCARD_NSS
from usbccid.frontends import registry
from usbccid.frontends.vpcd.wire import Apdu, GetAtr, PowerOn
from usbccid.tool import config as cfg
from usbccid.tool.app import App, AppError
from usbccid.tool.control import format_status, status_from_json, status_to_json
from usbccid.tool.schema import ConfigError


def parse(text: str) -> cfg.Config:
    return cfg.parse_config(text, "test.toml", Path("/nonexistent"))


def error(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return str(info.value)


# ---------------------------------------------------------------- configuration


def test_a_vpcd_reader_in_the_configuration() -> None:
    config = parse(
        """
[[reader]]
name = "pcsc"
frontend = "vpcd"
vpcd = { host = "192.0.2.1", port = 40000 }
  [[reader.slot]]
  card = "default"
  [[reader.slot]]
  card = "none"

[[reader]]
name = "plain"
frontend = "vpcd"

[[reader]]
name = "usb"
"""
    )
    pcsc, plain, usb = config.readers
    assert pcsc.frontend == "vpcd"
    assert pcsc.vpcd == cfg.VpcdConfig("192.0.2.1", 40000)
    assert len(pcsc.slots) == 2
    assert plain.vpcd == cfg.VpcdConfig("127.0.0.1", 35963)  # Debian's /etc/reader.conf.d/vpcd
    assert (usb.frontend, usb.vpcd) == ("usbip", None)


def test_the_configuration_knows_every_front_end() -> None:
    assert tuple(registry.FRONTENDS) == cfg.FRONTENDS


@pytest.mark.parametrize(
    ("text", "needles"),
    [
        ('[[reader]]\nfrontend = "vcard"\n', ["test.toml:2", "unknown front end 'vcard'", "vpcd"]),
        ("[[reader]]\nvpcd = { port = 1 }\n", ["test.toml:2", "only for a reader with frontend"]),
        (
            '[[reader]]\nfrontend = "vpcd"\nbus_id = "1-1"\n',
            ["test.toml:3", "a vpcd reader has no bus id"],
        ),
        (
            '[[reader]]\nfrontend = "vpcd"\nidentity = "vmware"\n',
            ["test.toml:3", "a vpcd reader has no identity"],
        ),
        (
            '[[reader]]\nfrontend = "vpcd"\nvpcd = { port = 65535 }\n'
            '  [[reader.slot]]\n  card = "default"\n  [[reader.slot]]\n  card = "none"\n',
            ["test.toml:3", "port 65535 is out of range 1-65534", "port + N"],
        ),
        (
            '[[reader]]\nfrontend = "vpcd"\n[reader.vpcd]\nhost = "h"\nslots = 2\n',
            ["test.toml:5", "slots"],
        ),
        ('[[reader]]\nfrontend = "vpcd"\nvpcd = { host = "" }\n', ["must not be empty"]),
    ],
)
def test_configuration_errors(text: str, needles: list[str]) -> None:
    message = error(text)
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", ("127.0.0.1", 35963)),
        ("192.0.2.1", ("192.0.2.1", 35963)),
        ("192.0.2.1:40000", ("192.0.2.1", 40000)),
        (":40000", ("127.0.0.1", 40000)),
        ("vpcd.example:1", ("vpcd.example", 1)),
        ("[::1]:40000", ("::1", 40000)),
        ("[::1]", ("::1", 35963)),
    ],
)
def test_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert cfg.parse_hostport(text, 35963) == expected


@pytest.mark.parametrize("text", ["h:0", "h:65536", "h:x", "[::1", "[::1]x"])
def test_bad_host_and_port(text: str) -> None:
    with pytest.raises(ValueError, match=r"(?i)port"):
        cfg.parse_hostport(text, 35963)


def test_serve_vpcd_usage_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("")
    assert_one_line_error(run("serve", "--vpcd", "--config", config), 'frontend = "vpcd"')
    assert_one_line_error(
        run("serve", "--vpcd", "--port", "3240"), "--port is for the USB/IP server"
    )
    assert_one_line_error(
        run("serve", "--vpcd", "--pcap", tmp_path / "x.pcap"), "--pcap is for the USB/IP server"
    )
    assert_one_line_error(run("serve", "--vpcd=h:99999"), "--vpcd:", "1-65535")


def test_serve_vpcd_check(tmp_path: Path, usbccid_state_template: Path) -> None:
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    result = run("serve", "--vpcd", "--check", "--state-dir", state)
    assert result.returncode == 0, result.stderr
    assert "default configuration: OK (1 reader, 1 slot)" in result.stdout


# ---------------------------------------------------------------- the composition root


def _vpcd_config(state: Path, port: int, *, trace: bool = False) -> cfg.Config:
    config = cfg.parse_config(
        f"""
[[reader]]
name = "pcsc"
frontend = "vpcd"
vpcd = {{ port = {port} }}
  [[reader.slot]]
  card = "default"
  [[reader.slot]]
  card = "second"
  inserted = false
""",
        "test.toml",
        state,
    )
    return replace(config, state_dir=state, trace=trace)


@pytest.fixture
def state(tmp_path: Path, usbccid_state_template: Path) -> Path:
    directory = tmp_path / "state"
    shutil.copytree(usbccid_state_template, directory)
    # a second stored card (a card is in one slot at a time): a copy has its own PIN state
    shutil.copytree(directory / "cards" / "default", directory / "cards" / "second")
    return directory


def test_the_app_drives_vpcd_readers(state: Path, caplog: pytest.LogCaptureFixture) -> None:
    """insert / remove / status as ``usbccid ctl`` sends them, --trace on the APDUs."""
    port = free_port_pair()

    async def test() -> None:
        slot0, slot1 = FakeVpcd(port), FakeVpcd(port + 1)
        await slot0.start()
        await slot1.start()
        app = App(_vpcd_config(state, port, trace=True))
        assert await app.start() is None  # no USB/IP server
        try:
            peer = await slot0.card()
            assert await peer.ask(GetAtr()) == ATR_VCARD_NSS
            await peer.send(PowerOn())
            assert await peer.ask(Apdu(bytes.fromhex("00A4040007A0000000790100"))) != b""
            assert await peer.ask(Apdu(bytes.fromhex("0020008008313233343536FFFF")))
            status = app.status()
            text = format_status(status_from_json(status_to_json(status)))
            assert "no USB/IP server" in text
            assert f"reader pcsc  vpcd 127.0.0.1:{port}" in text
            assert "slot 0: active" in text
            assert f"(vpcd 127.0.0.1:{port}, connected; 2 APDUs, 1 ATR requests)" in text
            assert "slot 1: empty" in text
            assert status.counters["vpcd_connections"] == 1

            # slot 1 starts removed: no connection until `ctl insert pcsc:1`
            with pytest.raises(TimeoutError):
                await slot1.card(timeout=0.3)
            app.insert("pcsc", 1)
            other: Peer = await slot1.card()
            assert await other.ask(GetAtr()) == ATR_VCARD_NSS

            app.remove("pcsc", 0)  # `ctl remove pcsc`: vpcd sees the connection close
            assert await peer.closed()
            assert "slot 0: empty" in format_status(app.status())
            app.insert("pcsc", 0)
            peer = await slot0.card()
            assert await peer.ask(GetAtr()) == ATR_VCARD_NSS
            assert app.status().counters["vpcd_connections"] == 3
        finally:
            await app.close()
            await slot0.stop()
            await slot1.stop()

    with caplog.at_level(logging.INFO, logger="usbccid.tool.trace"):
        asyncio.run(asyncio.wait_for(test(), 30))
    trace = caplog.text
    assert "pcsc/0 ATR 3b 89 00 56 43 41 52 44 5f 4e 53 53" in trace
    assert "pcsc/0 > 00 a4 04 00 07 a0 00 00 00 79 01 00" in trace
    assert "pcsc/0 > 00 20 00 80 08 [8 bytes redacted]" in trace  # the PIN never
    assert "31 32 33 34" not in trace


def test_two_vpcd_readers_on_the_same_ports_are_refused(state: Path) -> None:
    config = cfg.parse_config(
        '[[reader]]\nname = "a"\nfrontend = "vpcd"\n  [[reader.slot]]\n  card = "second"\n'
        '  [[reader.slot]]\n  card = "none"\n'
        '[[reader]]\nname = "b"\nfrontend = "vpcd"\nvpcd = { port = 35964 }\n',
        "test.toml",
        state,
    )
    with pytest.raises(AppError, match="reader 'b' uses the vpcd ports of reader 'a'"):
        App(replace(config, state_dir=state))


def test_the_examples_vpcd_reader_parses() -> None:
    text = (Path(__file__).resolve().parents[3] / "examples" / "usbccid.toml").read_text()
    block = text[text.index('# name = "pcsc"') - len("# [[reader]]\n") :]
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") else "" for line in block.splitlines()
    )
    (reader,) = parse(uncommented).readers
    assert (reader.frontend, reader.vpcd) == ("vpcd", cfg.VpcdConfig("127.0.0.1", 35963))


def test_local_vpcd_slots_keep_pcscd_up_remote_ones_do_not() -> None:
    from usbccid.frontends.vpcd.frontend import VpcdReader, is_loopback

    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("192.0.2.1")
    assert not is_loopback("vpcd.example")
    local = VpcdReader(cfg.ReaderConfig("a", frontend="vpcd", vpcd=cfg.VpcdConfig()))
    remote = VpcdReader(cfg.ReaderConfig("b", frontend="vpcd", vpcd=cfg.VpcdConfig("192.0.2.1")))
    assert local.slots[0].keepalive is not None
    assert remote.slots[0].keepalive is None


def test_keepalive_without_libpcsclite_holds_nothing() -> None:
    from usbccid.frontends.vpcd.keepalive import PcscdKeepAlive

    keepalive = PcscdKeepAlive("libno-such-pcsclite.so.1")
    assert not keepalive.ensure()
    assert keepalive.last_error is not None
    assert "cannot load libno-such-pcsclite.so.1" in keepalive.last_error
    assert not keepalive.held
    keepalive.release()


def test_vpcd_readers_are_fixed_while_running(state: Path, tmp_path: Path) -> None:
    """A reload may add or remove USB/IP readers; a vpcd reader it would add, remove or
    replace stays as it is and is reported as needing a restart."""
    from usbccid.tool.control import ControlError

    port = free_port_pair()
    path = tmp_path / "c.toml"
    vpcd = f'[[reader]]\nname = "pcsc"\nfrontend = "vpcd"\nvpcd = {{ port = {port} }}\n'
    usb = '[[reader]]\nname = "desk"\n  [[reader.slot]]\n  card = "second"\n'
    path.write_text("[server]\nport = 0\n" + vpcd)

    async def test() -> None:
        app = App(replace(cfg.load_config(path), state_dir=state))
        await app.start()
        try:
            with pytest.raises(ControlError, match="is on vpcd, whose readers are fixed"):
                app.remove_reader("pcsc")
            # the vpcd reader goes from the file, a USB/IP one comes
            path.write_text("[server]\nport = 0\n" + usb)
            result = app.reload()
            assert result["added"] == ["desk"]
            assert result["removed"] == []
            assert result["restart_needed"] == ["reader pcsc: on vpcd, fixed while running"]
            assert sorted(r.config.name for r in app.readers) == ["desk", "pcsc"]
            # a second vpcd reader is not plugged in either
            other = vpcd.replace('"pcsc"', '"pcsc2"').replace(str(port), str(port + 2))
            path.write_text("[server]\nport = 0\n" + vpcd + usb + other)
            result = app.reload()
            assert result["added"] == []
            assert result["restart_needed"] == ["reader pcsc2: on vpcd, fixed while running"]
            assert sorted(r.config.name for r in app.readers) == ["desk", "pcsc"]
            # the card the kept vpcd reader holds cannot go to another slot meanwhile
            path.write_text("[server]\nport = 0\n" + usb.replace('"second"', '"default"'))
            with pytest.raises(ControlError, match=r"\(reader desk slot 0\) and reader pcsc"):
                app.reload()
            assert app.status().readers[0].slots[0].state in ("empty", "present", "active")
        finally:
            await app.close()

    asyncio.run(test())
