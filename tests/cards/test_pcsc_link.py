"""The PC/SC passthrough link against a scripted stand-in for pyscard's ``smartcard.scard``.

The real-client proof (pcscd + vpcd + a virtual card, and a usbccid CAC passed through to
the guest's OpenSC) is in tests/frontends/vpcd/ and tests/vm/; this checks the link's own
rules: which reader it picks, the share mode, power off/on as a reset, presence from
SCardGetStatusChange, and starting over when pcscd goes away.
"""

from __future__ import annotations

import types
from typing import Any

import pytest

from usbccid.cards.pcsc import PcscError, PcscLink

S_OK = 0
E_TIMEOUT = 0x8010000A
E_NO_SERVICE = 0x8010001D
E_NO_READERS = 0x8010002E
W_REMOVED = 0x80100069
PRESENT, EMPTY, CHANGED, MUTE, UNAVAILABLE = 0x20, 0x10, 0x2, 0x200, 0x8


class FakePcsc:
    """Just enough of pcsc-lite: readers with or without a card; calls are recorded."""

    def __init__(self) -> None:
        self.running = True
        self.readers: dict[str, bytes | None] = {}  # name -> ATR of the card in it, or None
        self.calls: list[tuple[Any, ...]] = []
        self.handles: dict[int, str] = {}
        self.transmit_result: tuple[int, list[int]] = (S_OK, [0x90, 0x00])
        self.module = types.SimpleNamespace(
            SCARD_S_SUCCESS=S_OK,
            SCARD_E_TIMEOUT=E_TIMEOUT,
            SCARD_E_NO_SERVICE=E_NO_SERVICE,
            SCARD_E_NO_READERS_AVAILABLE=E_NO_READERS,
            SCARD_E_UNKNOWN_READER=0x80100009,
            SCARD_E_READER_UNAVAILABLE=0x80100017,
            SCARD_E_INVALID_HANDLE=0x80100003,
            SCARD_E_NO_SMARTCARD=0x8010000C,
            SCARD_W_REMOVED_CARD=W_REMOVED,
            SCARD_STATE_UNAWARE=0,
            SCARD_STATE_PRESENT=PRESENT,
            SCARD_STATE_EMPTY=EMPTY,
            SCARD_STATE_CHANGED=CHANGED,
            SCARD_STATE_MUTE=MUTE,
            SCARD_STATE_UNAVAILABLE=UNAVAILABLE,
            SCARD_SCOPE_USER=0,
            SCARD_SHARE_EXCLUSIVE=1,
            SCARD_SHARE_SHARED=2,
            SCARD_PROTOCOL_T0=1,
            SCARD_PROTOCOL_T1=2,
            SCARD_PCI_T0=1,
            SCARD_PCI_T1=2,
            SCARD_LEAVE_CARD=0,
            SCARD_RESET_CARD=1,
            SCARD_UNPOWER_CARD=2,
            SCardEstablishContext=self.establish,
            SCardReleaseContext=self.release,
            SCardListReaders=self.list_readers,
            SCardGetStatusChange=self.status_change,
            SCardConnect=self.connect,
            SCardReconnect=self.reconnect,
            SCardDisconnect=self.disconnect,
            SCardStatus=self.status,
            SCardTransmit=self.transmit,
            SCardGetErrorMessage=lambda hr: f"error {hr:#x}",
        )

    def establish(self, scope: int) -> tuple[int, int]:
        self.calls.append(("establish",))
        return (S_OK, 7) if self.running else (E_NO_SERVICE, 0)

    def release(self, ctx: int) -> int:
        self.calls.append(("release", ctx))
        return S_OK

    def list_readers(self, ctx: int, groups: list[str]) -> tuple[int, list[str]]:
        if not self.running:
            return E_NO_SERVICE, []
        return (S_OK, list(self.readers)) if self.readers else (E_NO_READERS, [])

    def state_of(self, reader: str) -> int:
        if reader not in self.readers:
            return UNAVAILABLE
        return PRESENT if self.readers[reader] is not None else EMPTY

    def status_change(
        self, ctx: int, timeout_ms: int, states: list[tuple[Any, ...]]
    ) -> tuple[int, list[tuple[str, int, list[int]]]]:
        self.calls.append(("wait", timeout_ms, states))
        if not self.running:
            return E_NO_SERVICE, []
        reader, current = states[0][0], states[0][1]
        if reader.startswith("\\\\?PnP?"):
            return E_TIMEOUT, []
        now = self.state_of(reader)
        if now == current:
            return E_TIMEOUT, [(reader, current, [])]
        atr = self.readers.get(reader) or b""
        return S_OK, [(reader, now | CHANGED, list(atr))]

    def connect(self, ctx: int, reader: str, share: int, protocols: int) -> tuple[int, int, int]:
        self.calls.append(("connect", reader, share))
        if self.readers.get(reader) is None:
            return 0x8010000C, 0, 0
        handle = 100 + len(self.handles)
        self.handles[handle] = reader
        return S_OK, handle, 2

    def reconnect(self, handle: int, share: int, protocols: int, how: int) -> tuple[int, int]:
        self.calls.append(("reconnect", how))
        return (S_OK, 2) if self.readers.get(self.handles[handle]) is not None else (W_REMOVED, 0)

    def disconnect(self, handle: int, how: int) -> int:
        self.calls.append(("disconnect", how))
        self.handles.pop(handle, None)
        return S_OK

    def status(self, handle: int) -> tuple[int, str, int, int, list[int]]:
        reader = self.handles[handle]
        return S_OK, reader, PRESENT, 2, list(self.readers[reader] or b"")

    def transmit(self, handle: int, pci: int, apdu: list[int]) -> tuple[int, list[int]]:
        self.calls.append(("transmit", pci, bytes(apdu)))
        return self.transmit_result


ATR = bytes.fromhex("3b8f8001804f0ca000000306030001000000006a")


@pytest.fixture
def pcsc() -> FakePcsc:
    fake = FakePcsc()
    fake.readers = {"usbccid virtual CCID [usbccid gemalto] 00 00": ATR, "Gemalto PC 00 00": ATR}
    return fake


def test_picks_the_matching_reader_that_is_not_our_own(pcsc: FakePcsc) -> None:
    link = PcscLink("gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.5)
    assert link.power_on() == ATR
    assert ("connect", "Gemalto PC 00 00", 1) in pcsc.calls  # exclusive by default


def test_shared_when_configured(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto PC", False, pcsc.module)
    link.power_on()
    assert ("connect", "Gemalto PC 00 00", 2) in pcsc.calls


def test_power_off_unpowers_and_power_on_resets_keeping_the_handle(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    link.power_on()
    link.power_off()
    assert link.power_on() == ATR
    connects = [c for c in pcsc.calls if c[0] == "connect"]
    reconnects = [c[1] for c in pcsc.calls if c[0] == "reconnect"]
    assert len(connects) == 1
    assert reconnects == [2, 1]  # SCARD_UNPOWER_CARD, then SCARD_RESET_CARD


def test_apdus_are_relayed_unchanged_with_the_protocol_s_pci(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    link.power_on()
    pcsc.transmit_result = (S_OK, [0x61, 0x10])
    assert link.transmit(bytes.fromhex("00a4040007a0000000790100")) == b"\x61\x10"
    assert ("transmit", 2, bytes.fromhex("00a4040007a0000000790100")) in pcsc.calls


def test_a_removed_card_fails_transmit_and_is_seen_absent(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.5)
    link.power_on()
    pcsc.readers["Gemalto PC 00 00"] = None
    pcsc.transmit_result = (W_REMOVED, [])
    with pytest.raises(PcscError, match="SCardTransmit"):
        link.transmit(b"\x00\xa4\x04\x00")
    assert link.wait_presence(True, 0.5) is False
    assert "no card" in link.reason
    pcsc.readers["Gemalto PC 00 00"] = ATR
    assert link.wait_presence(False, 0.5) is True
    assert link.power_on() == ATR  # a fresh connection


def test_no_change_waits_the_timeout_and_keeps_the_answer(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.5)
    assert link.wait_presence(True, 0.25)
    waits = [c for c in pcsc.calls if c[0] == "wait"]
    assert waits[0][1] == 0
    assert waits[-1][1] == 250


def test_reader_absent_then_plugged_in(pcsc: FakePcsc) -> None:
    pcsc.readers = {}
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.1) is False
    assert "no PC/SC reader matching 'Gemalto'" in link.reason
    pcsc.readers = {"Gemalto PC 00 00": ATR}
    assert link.wait_presence(False, 0.1) is True


def test_reader_unplugged_empties_the_slot(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.1)
    del pcsc.readers["Gemalto PC 00 00"]
    assert link.wait_presence(True, 0.1) is False
    assert "is gone" in link.reason


def test_pcscd_not_running_then_back(pcsc: FakePcsc) -> None:
    pcsc.running = False
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.01) is False
    assert "is pcscd running?" in link.reason
    pcsc.running = True
    assert link.wait_presence(False, 0.01) is True


def test_pcscd_restart_while_watching(pcsc: FakePcsc) -> None:
    link = PcscLink("Gemalto", True, pcsc.module)
    assert link.wait_presence(None, 0.01)
    link.power_on()
    pcsc.running = False
    assert link.wait_presence(True, 0.01) is False
    assert ("disconnect", 0) in pcsc.calls  # the old handle was let go
    pcsc.running = True
    assert link.wait_presence(False, 0.01) is True
    assert link.power_on() == ATR


# --------------------------------------------------------------------------- in the server


def _ccid(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    import struct

    return bytes([msg_type]) + struct.pack("<I", len(payload)) + bytes([0, seq, 0, 0, 0]) + payload


def test_the_server_follows_the_real_card(
    pcsc: FakePcsc, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    """The slot starts as the real card is, and the host sees its removal and return as
    NotifySlotChange; power on gives the real card's ATR."""
    import sys
    import time

    from usbccid.cards.pcsc import PcscConfig
    from usbccid.testing import usbccid_server
    from usbccid.tool import config as cfg

    smartcard = types.ModuleType("smartcard")
    monkeypatch.setitem(sys.modules, "smartcard", smartcard)
    monkeypatch.setitem(sys.modules, "smartcard.scard", pcsc.module)
    config = cfg.Config(
        server=cfg.ServerConfig(port=0),
        readers=(
            cfg.ReaderConfig(name="pass", slots=(cfg.SlotConfig(card=PcscConfig("Gemalto")),)),
        ),
    )
    with usbccid_server(config, state_dir=tmp_path / "s") as server:
        dev = server.device()
        dev.set_configuration()
        assert bytes(dev.read(0x83, 8, timeout=3000)) == bytes([0x50, 0x03])  # present
        dev.write(0x01, _ccid(0x62, 1))
        reply = bytes(dev.read(0x82, 65554, timeout=5000))
        assert reply[0] == 0x80
        assert reply[10:] == ATR
        gone = time.monotonic()
        pcsc.readers["Gemalto PC 00 00"] = None
        assert bytes(dev.read(0x83, 8, timeout=3000)) == bytes([0x50, 0x02])  # absent
        assert time.monotonic() - gone < 1.5
        status = server.call(server.app.status)
        assert status.readers[0].slots[0].state == "empty"
        pcsc.readers["Gemalto PC 00 00"] = ATR
        assert bytes(dev.read(0x83, 8, timeout=3000)) == bytes([0x50, 0x03])


def test_configuration() -> None:
    from usbccid.cards.pcsc import PcscConfig
    from usbccid.tool.config import parse_config
    from usbccid.tool.schema import ConfigError

    text = '[[reader]]\n[[reader.slot]]\ntype = "pcsc"\nreader = "Gemalto"\nexclusive = false\n'
    card = parse_config(text, "t.toml").readers[0].slots[0].card
    assert isinstance(card, PcscConfig)
    assert (card.reader, card.exclusive, card.origin) == ("Gemalto", False, "t.toml:2")
    for bad, line, reason in [
        ('type = "pcsc"\n', 2, "missing key 'reader'"),
        ('type = "pcsc"\nreader = ""\n', 4, "reader: must not be empty"),
        ('type = "pcsc"\nreader = "x"\npin = "1234"\n', 5, "pin: unknown key"),
        ('type = "pcsc"\nreader = "x"\nexclusive = 1\n', 5, "expected a boolean"),
    ]:
        with pytest.raises(ConfigError) as exc:
            parse_config("[[reader]]\n[[reader.slot]]\n" + bad, "t.toml")
        assert exc.value.line == line, str(exc.value)
        assert reason in str(exc.value)


def test_check_says_in_one_line_that_pcscd_is_not_there(tmp_path: Any) -> None:
    """The real pyscard and libpcsclite, no pcscd: the slot waits, and one line says why."""
    from tests.cli.helpers import run, usbccid_env

    config = tmp_path / "usbccid.toml"
    config.write_text('[[reader]]\n[[reader.slot]]\ntype = "pcsc"\nreader = "Gemalto"\n')
    env = usbccid_env({"PCSCLITE_CSOCK_NAME": str(tmp_path / "no-pcscd.comm")})
    result = run("serve", "--check", "--config", config, "--state-dir", tmp_path / "s", env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "reader0 slot 0: pcscd: SCardEstablishContext (is pcscd running?)" in lines[0]
    assert lines[0].endswith("; waiting")
    assert "1 reader, 1 slot" in result.stdout
