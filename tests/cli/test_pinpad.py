"""The PIN-pad reader through the pytest fixture: pyusb over USB/IP, no VM.

A CCID host (pyusb on :mod:`usbccid.host`, our independent USB/IP client) sends the
PC_to_RDR_Secure messages libccid would send for OpenSC's CAC (see tests/ccid/test_pinpad.py
for where they come from) while the test types on the reader's keypad through
``server.reader().pinpad`` or ``usbccid ctl pinpad``, or a keypad policy types by itself.
The card is the real emulated CAC, so PIN counters, locking and PIN changes are real.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.cli.helpers import assert_one_line_error, run
from usbccid.ccid.errors import CommandStatus
from usbccid.ccid.pinpad import Stage
from usbccid.ccid.wire import (
    DataBlock,
    IccPowerOn,
    PinFormat,
    PinModify,
    PinType,
    PinVerify,
    Secure,
    XfrBlock,
    build_command,
    build_secure_data,
    parse_reply,
)
from usbccid.testing import UsbccidServer, usbccid_server
from usbccid.tool import config as cfg

PIN = "12345678"  # the default test card's
FF8 = b"\xff" * 8
CAC_VERIFY = bytes.fromhex("0020000008") + FF8
CAC_CHANGE = bytes.fromhex("0024000010") + FF8 + FF8

# What libccid sends for OpenSC's CAC verification / change (bTimeOut 30, keypress only).
VERIFY = PinVerify(
    format=PinFormat(units_bytes=True, pin_type=PinType.ASCII, block_size=8),
    apdu=CAC_VERIFY,
    timeout=30,
    lang_id=0,
)
CHANGE = PinModify(
    format=PinFormat(units_bytes=False, pin_type=PinType.ASCII, block_size=8),
    apdu=CAC_CHANGE,
    timeout=30,
    insertion_offset_new=8,
    lang_id=0,
)


@dataclass
class Host:
    """A CCID host on a pyusb device: bulk OUT commands, bulk IN replies."""

    dev: Any
    seq: int = 0
    extensions: int = 0

    def send(self, command_type: type, slot: int = 0, **kw: Any) -> int:
        self.seq = (self.seq + 1) & 0xFF
        self.dev.write(0x01, build_command(command_type(slot, self.seq, **kw)), timeout=5000)
        return self.seq

    def reply(self, timeout: float = 20.0) -> DataBlock:
        """The next reply that is not a time extension (those are counted)."""
        deadline = time.monotonic() + timeout
        while True:
            data = bytes(self.dev.read(0x82, 65554, timeout=int(timeout * 1000)))
            reply = parse_reply(data)
            assert isinstance(reply, DataBlock), reply
            assert reply.seq == self.seq, (reply, self.seq)
            if reply.command_status != CommandStatus.TIME_EXTENSION:
                return reply
            self.extensions += 1
            assert time.monotonic() < deadline

    def apdu(self, apdu: bytes) -> bytes:
        self.send(XfrBlock, data=apdu)
        return self.reply().data

    def secure(self, structure: PinVerify | PinModify) -> int:
        return self.send(Secure, data=build_secure_data(structure))


def open_host(server: UsbccidServer) -> Host:
    dev = server.device()
    dev.set_configuration()
    host = Host(dev)
    host.send(IccPowerOn)
    atr = host.reply()
    assert atr.command_status == CommandStatus.OK
    return host


@pytest.fixture
def pinpad_server(tmp_path: Path, usbccid_state_template: Path) -> Iterator[UsbccidServer]:
    with usbccid_server(
        state_dir=tmp_path / "state", template=usbccid_state_template, pinpad=True
    ) as server:
        yield server


def typing_later(action: Any) -> threading.Thread:
    """Run ``action`` (which waits for the prompt itself) while the test reads replies."""
    thread = threading.Thread(target=action)
    thread.start()
    return thread


def tries_left(host: Host) -> int:
    sw = host.apdu(bytes.fromhex("00200000"))
    return 3 if sw == b"\x90\x00" else sw[1] & 0x0F  # status query: 63 Cx


# --------------------------------------------------------------------------------------


def test_descriptor_has_the_pin_pad(pinpad_server: UsbccidServer) -> None:
    dev = pinpad_server.device()
    dev.set_configuration()
    extra = bytes(dev.get_active_configuration()[(0, 0)].extra_descriptors)
    assert len(extra) == 54
    assert extra[50:53] == bytes([0x10, 0x02, 0x03])  # wLcdLayout 0210h, bPINSupport 03h
    status = pinpad_server.call(pinpad_server.app.status)
    assert status.readers[0].pinpad is True


def test_verify_on_the_pad_then_wrong_pins_count_and_lock(pinpad_server: UsbccidServer) -> None:
    host = open_host(pinpad_server)
    pad = pinpad_server.reader().pinpad
    seq = host.secure(VERIFY)
    prompt = pad.wait_for_prompt()
    assert (prompt.operation, prompt.stage, prompt.entry, prompt.entries) == (
        "verify",
        Stage.CURRENT.value,
        1,
        1,
    )
    assert (prompt.min_digits, prompt.max_digits, prompt.typed) == (4, 8, 0)
    reports: list[dict[str, Any]] = []

    def type_later() -> None:
        time.sleep(1.5)  # the host, reading, hears time extensions meanwhile
        reports.append(pad.type(PIN))

    thread = typing_later(type_later)
    reply = host.reply()
    thread.join(10)
    assert (reports[0]["accepted"], reports[0]["ignored"], reports[0]["state"]) == (
        8,
        0,
        "entered",
    )
    assert (reply.seq, reply.command_status, reply.data) == (seq, CommandStatus.OK, b"\x90\x00")
    assert host.extensions >= 1
    assert pad.prompt() is None
    for expected in (b"\x63\xc2", b"\x63\xc1", b"\x63\xc0", b"\x69\x83"):
        host.secure(VERIFY)
        pad.type("87654321")
        assert host.reply().data == expected
    host.secure(VERIFY)
    pad.type(PIN)
    assert host.reply().data == b"\x69\x83"  # locked: the right PIN no longer works
    state = json.loads(
        (pinpad_server.state_dir / "cards" / "default" / "pin-state.json").read_text()
    )
    assert state["tries_left"] == 0


def test_cancel_timeout_too_short(pinpad_server: UsbccidServer) -> None:
    host = open_host(pinpad_server)
    pad = pinpad_server.reader().pinpad
    host.secure(VERIFY)
    pad.cancel("12")
    reply = host.reply()
    assert (reply.command_status, reply.error) == (CommandStatus.FAILED, 0xEF)
    # bTimeOut 2 s: PIN_TIMEOUT in time, with time extensions until then
    started = time.monotonic()
    host.secure(PinVerify(format=VERIFY.format, apdu=CAC_VERIFY, timeout=2))
    reply = host.reply(timeout=10)
    assert (reply.command_status, reply.error) == (CommandStatus.FAILED, 0xF0)
    assert 1.9 <= time.monotonic() - started < 6
    host.secure(VERIFY)
    pad.type("123")  # below the minimum: the reader answers 64 03, the card is not asked
    assert host.reply().data == b"\x64\x03"
    assert tries_left(host) == 3  # nothing counted


def test_change_pin_on_the_pad(pinpad_server: UsbccidServer) -> None:
    host = open_host(pinpad_server)
    pad = pinpad_server.reader().pinpad
    host.secure(CHANGE)
    first = pad.type(PIN)
    assert first["next"]["stage"] == Stage.NEW.value
    second = pad.type("24681357")
    assert second["next"]["stage"] == Stage.CONFIRM.value
    pad.type("24681357")
    assert host.reply().data == b"\x90\x00"
    host.secure(VERIFY)
    pad.type("24681357")
    assert host.reply().data == b"\x90\x00"
    assert pinpad_server.pin == "24681357"
    host.secure(CHANGE)
    pad.type("24681357", "11112222", "11112223")  # the confirmation differs: 64 02
    assert host.reply().data == b"\x64\x02"


def test_keypad_policy_types_the_card_pin(tmp_path: Path, usbccid_state_template: Path) -> None:
    with usbccid_server(
        state_dir=tmp_path / "s", template=usbccid_state_template, keypad=cfg.CARD_PIN
    ) as server:
        host = open_host(server)
        host.secure(VERIFY)
        assert host.reply().data == b"\x90\x00"  # nobody typed
        host.secure(CHANGE)
        assert host.reply().data == b"\x90\x00"  # current = new = the card's PIN
    with usbccid_server(
        state_dir=tmp_path / "t", template=usbccid_state_template, keypad="00000000"
    ) as server:
        host = open_host(server)
        host.secure(VERIFY)
        assert host.reply().data == b"\x63\xc2"  # the policy's digits are wrong: counted


def test_ctl_pinpad_and_status(pinpad_server: UsbccidServer) -> None:
    host = open_host(pinpad_server)
    sock = str(pinpad_server.control_socket)
    # nothing waiting: ctl waits --wait seconds, then says so
    assert_one_line_error(
        run("ctl", "--socket", sock, "pinpad", "reader0", "--digits", PIN, "--wait", "0.3"),
        "no PIN entry waiting",
    )
    host.secure(VERIFY)
    deadline = time.monotonic() + 10
    while "PIN pad waiting" not in (status := run("ctl", "--socket", sock, "status").stdout):
        assert time.monotonic() < deadline, status
        time.sleep(0.1)
    assert "PIN pad waiting for the current PIN (verify, entry 1 of 1): 0 digits typed, 4-8" in (
        status
    )
    assert "  PIN pad\n" in status
    raw = json.loads(run("ctl", "--socket", sock, "--json", "status").stdout)
    assert raw["readers"][0]["slots"][0]["pinpad"]["stage"] == "current PIN"
    result = run("ctl", "--socket", sock, "pinpad", "reader0:0", "--digits", PIN)
    assert result.returncode == 0, result.stderr
    assert "8 digits typed: entered" in result.stdout
    assert host.reply().data == b"\x90\x00"
    host.secure(VERIFY)
    result = run("ctl", "--socket", sock, "pinpad", "1-1", "--cancel")
    assert result.returncode == 0, result.stderr
    assert host.reply().error == 0xEF
    # ctl started before the host asks: it waits for the prompt
    thread = typing_later(
        lambda: run("ctl", "--socket", sock, "pinpad", "reader0", "--digits", PIN, "--wait", "10")
    )
    time.sleep(0.5)
    host.secure(VERIFY)
    assert host.reply().data == b"\x90\x00"
    thread.join(30)
    assert_one_line_error(
        run("ctl", "--socket", sock, "pinpad", "reader0", "--digits", "12a4"), "digits 0-9"
    )


def test_ctl_pinpad_on_a_reader_without_one(usbccid_server: UsbccidServer) -> None:
    sock = str(usbccid_server.control_socket)
    assert_one_line_error(
        run("ctl", "--socket", sock, "pinpad", "reader0", "--digits", PIN), "has no PIN pad"
    )


def test_digits_never_reach_logs_traces_or_the_pcap(
    tmp_path: Path, usbccid_state_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """--trace and --pcap with the PIN pad: the keyed APDUs are redacted in the trace, and
    the capture holds only the host's template (FF padding) and the card's status words."""
    new_pin = "97531864"
    pcap = tmp_path / "capture.pcap"
    config = cfg.Config(
        server=cfg.ServerConfig(port=0),
        readers=(cfg.ReaderConfig(name="pad", pinpad=cfg.PinpadConfig()),),
        trace=True,
        pcap=pcap,
    )
    caplog.set_level(logging.DEBUG)
    with usbccid_server(
        config, state_dir=tmp_path / "s", template=usbccid_state_template
    ) as server:
        host = open_host(server)
        pad = server.reader().pinpad
        host.secure(CHANGE)
        pad.type(PIN, new_pin, new_pin)
        assert host.reply().data == b"\x90\x00"
        host.secure(VERIFY)
        pad.type(new_pin)
        assert host.reply().data == b"\x90\x00"
    text = "\n".join(record.getMessage() for record in caplog.records)
    assert "pad/0 > 00 24 00 00 10 [16 bytes keyed on the PIN pad, redacted]" in text
    assert "pad/0 > 00 20 00 00 08 [8 bytes keyed on the PIN pad, redacted]" in text
    for secret in (new_pin, PIN):
        assert secret not in text
        assert secret.encode().hex(" ") not in text
    captured = pcap.read_bytes()
    assert len(captured) > 0
    assert new_pin.encode() not in captured
    assert PIN.encode() not in captured
    assert CAC_VERIFY in captured  # the template the host sent is there, FF padding only


def test_serve_pinpad_options(tmp_path: Path, usbccid_state_template: Path) -> None:
    import shutil

    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    ok = run("serve", "--pinpad", "--keypad", "card-pin", "--check", "--state-dir", state)
    assert ok.returncode == 0, ok.stderr
    bad = run("serve", "--keypad", "12a4", "--check", "--state-dir", state)
    assert bad.returncode == 2, bad
    assert '"card-pin" or 1 to 32 digits' in bad.stderr
    assert_one_line_error(
        run("serve", "--vpcd", "--pinpad", "--check", "--state-dir", state),
        "--pinpad is for the USB/IP server",
    )
    config = tmp_path / "c.toml"
    config.write_text("[[reader]]\nname = 'x'\nkeypad = { enter = '1234' }\n")
    assert_one_line_error(
        run("serve", "--config", config, "--check", "--state-dir", state),
        "c.toml:3:",
        "needs a PIN pad",
    )
