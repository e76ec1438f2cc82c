"""usbccid.testing: the pytest fixture and the context manager."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from usbccid.testing import UsbccidServer, usbccid_server


def ccid(msg_type: int, seq: int, payload: bytes = b"") -> bytes:
    return bytes([msg_type]) + struct.pack("<I", len(payload)) + bytes([0, seq, 0, 0, 0]) + payload


def test_fixture_gives_a_working_reader(usbccid_server: UsbccidServer) -> None:
    assert usbccid_server.host == "127.0.0.1"
    assert usbccid_server.port > 0
    assert usbccid_server.bus_id == "1-1"
    assert usbccid_server.pin == "12345678"
    dev = usbccid_server.device()
    dev.set_configuration()
    # the interrupt endpoint reports the card present (NotifySlotChange: 50, slot 0 present+changed)
    assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x03])
    dev.write(0x01, ccid(0x62, 0))
    reply = bytes(dev.read(0x82, 65554, timeout=5000))
    assert reply[0] == 0x80
    assert reply[7] == 0
    atr = reply[10:]
    assert atr[0] == 0x3B
    usbccid_server.remove()
    assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x02])  # absent, changed
    usbccid_server.insert()
    assert bytes(dev.read(0x83, 8, timeout=2000)) == bytes([0x50, 0x03])


def test_context_manager_without_pytest_fixtures(
    tmp_path: Path, usbccid_state_template: Path
) -> None:
    with usbccid_server(state_dir=tmp_path / "s", template=usbccid_state_template) as server:
        status = server.call(server.app.status)
        assert status.readers[0].bus_id == server.bus_id
        assert server.control_socket.exists()
    assert not (tmp_path / "s" / "control.sock").exists()


def test_context_manager_reports_startup_errors(
    tmp_path: Path, usbccid_state_template: Path
) -> None:
    from usbccid.tool import config as cfg
    from usbccid.tool.app import AppError

    bad = cfg.Config(
        readers=(cfg.ReaderConfig(name="r", bus_id="1-7"),), server=cfg.ServerConfig(port=0)
    )
    with (
        pytest.raises(AppError, match="asks for bus id 1-7"),
        usbccid_server(bad, state_dir=tmp_path / "s", template=usbccid_state_template),
    ):
        pass
