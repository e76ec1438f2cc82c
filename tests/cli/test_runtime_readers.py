"""Readers and cards changed while the server runs (issue 11): ``ctl add-reader``,
``ctl remove-reader``, ``ctl insert --card``, and ``ctl reload`` adding and removing
readers. Judged by Debian's ``usbip list`` and our own USB/IP client."""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import usb.core

from tests.cli.helpers import assert_one_line_error, run, running_server
from tests.conftest import require_tool

SELECT_PKI = bytes.fromhex("00a4040007a000000079010000")


@pytest.fixture
def state(tmp_path: Path, usbccid_state_template: Path) -> Path:
    directory = tmp_path / "state"
    shutil.copytree(usbccid_state_template, directory)
    # a second stored card: a copy is another card as far as its PIN state goes
    shutil.copytree(directory / "cards" / "default", directory / "cards" / "bob")
    return directory


class CardSession:
    """A powered card behind an imported reader, over our USB/IP client (pyusb backend)."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.seq = 0

    def _send(self, msg_type: int, payload: bytes = b"") -> bytes:
        self.seq = (self.seq + 1) & 0xFF
        header = bytes([msg_type]) + len(payload).to_bytes(4, "little") + bytes([0, self.seq])
        self.dev.write(0x01, header + b"\0\0\0" + payload, timeout=5000)
        return bytes(self.dev.read(0x82, 65554, timeout=10000))

    def power_on(self) -> bytes:
        return self._send(0x62)[10:]

    def apdu(self, apdu: bytes) -> bytes:
        return self._send(0x6F, apdu)[10:]


@contextmanager
def card_session(host: str, port: int, busid: str) -> Iterator[CardSession]:
    from usbccid.host.pyusb_backend import attach

    with attach(host, port, busid) as dev:
        dev.set_configuration()
        session = CardSession(dev)
        assert session.power_on()  # the ATR
        yield session


def ctl(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run("ctl", "--state-dir", state, "--timeout", "30", *args)


def status(state: Path) -> dict[str, object]:
    result = ctl(state, "--json", "status")
    assert result.returncode == 0, result.stderr
    out: dict[str, object] = json.loads(result.stdout)
    return out


def usbip_list(port: int) -> list[str]:
    tool = require_tool("usbip")
    result = subprocess.run(
        [tool, "--tcp-port", str(port), "list", "-r", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [line.split(":")[0].strip() for line in result.stdout.splitlines() if ": " in line]


def bus_ids(port: int) -> list[str]:
    return [b for b in usbip_list(port) if b.startswith("1-")]


def test_add_and_remove_readers_at_run_time(state: Path) -> None:
    with running_server([], state) as server:
        assert bus_ids(server.port) == ["1-1"]
        result = ctl(state, "add-reader", "lab", "--card", "bob", "--card", "none")
        assert result.returncode == 0, result.stderr
        assert "reader lab added: bus id 1-2" in result.stdout
        assert bus_ids(server.port) == ["1-1", "1-2"]  # at once, for a real usbip client
        s = status(state)
        readers = {r["name"]: r for r in s["readers"]}  # type: ignore[attr-defined]
        assert readers["lab"]["bus_id"] == "1-2"
        assert [x["state"] for x in readers["lab"]["slots"]] == ["present", "empty"]
        assert 'stored card "bob"' in readers["lab"]["slots"][0]["card"]
        assert s["counters"]["readers_added"] == 1  # type: ignore[index]

        # the new reader works: import it, talk CCID to its card
        with card_session(server.host, server.port, "1-2") as session:
            assert session.apdu(SELECT_PKI)[-2:] == b"\x90\x00"
            # a card in one slot only: bob is in lab:0
            assert_one_line_error(
                ctl(state, "add-reader", "lab2", "--card", "bob"), "in two slots", "lab slot 0"
            )
            assert_one_line_error(ctl(state, "add-reader", "lab", "--card", "none"), "exists")
            assert_one_line_error(ctl(state, "add-reader", "x", "--card", "nobody"), "no card")
            # an empty slot takes another stored card; the default card is in reader0
            assert_one_line_error(ctl(state, "insert", "lab:1", "--card", "default"), "two slots")
            assert_one_line_error(ctl(state, "insert", "lab:0", "--card", "bob"), "remove it first")
            # removing the reader unplugs its importer, as a server stop would
            result = ctl(state, "remove-reader", "lab")
            assert result.returncode == 0, result.stderr
            assert "reader lab removed (was bus id 1-2)" in result.stdout
            with pytest.raises(usb.core.USBError):
                session.apdu(SELECT_PKI)
        assert bus_ids(server.port) == ["1-1"]
        assert [r["name"] for r in status(state)["readers"]] == ["reader0"]  # type: ignore[attr-defined]

        # the same name again gets its bus id back; a new name never takes a used one
        assert "bus id 1-2" in ctl(state, "add-reader", "lab", "--card", "bob").stdout
        assert "bus id 1-3" in ctl(state, "add-reader", "other", "--card", "none").stdout
        assert ctl(state, "remove-reader", "1-3").returncode == 0  # by bus id
        assert "bus id 1-4" in ctl(state, "add-reader", "third", "--card", "none").stdout
        assert_one_line_error(ctl(state, "remove-reader", "nope"), "no reader 'nope'")


def test_insert_another_stored_card_into_an_empty_slot(state: Path) -> None:
    config = state.parent / "c.toml"
    config.write_text("[[reader]]\nname = 'desk'\n[[reader.slot]]\ncard = 'none'\n")
    with running_server(["--config", config], state) as server:
        assert status(state)["readers"][0]["slots"][0]["state"] == "empty"  # type: ignore[index]
        result = ctl(state, "insert", "desk", "--card", "bob")
        assert result.returncode == 0, result.stderr
        assert "card 'bob' inserted into desk slot 0" in result.stdout
        slot = status(state)["readers"][0]["slots"][0]  # type: ignore[index]
        assert slot["state"] == "present"
        assert 'stored card "bob"' in slot["card"]
        with card_session(server.host, server.port, "1-1") as session:
            assert session.apdu(SELECT_PKI)[-2:] == b"\x90\x00"
        # a reload makes the server match the file again: the slot is empty there
        assert "1 card(s) changed (desk:0)" in ctl(state, "reload").stdout
        assert status(state)["readers"][0]["slots"][0]["state"] == "empty"  # type: ignore[index]


def test_reload_adds_removes_and_replaces_readers(state: Path) -> None:
    config = state.parent / "c.toml"
    one = "[[reader]]\nname = 'a'\n[[reader.slot]]\ncard = 'default'\n"
    two = "[[reader]]\nname = 'b'\n[[reader.slot]]\ncard = 'bob'\n"
    config.write_text(one)
    with running_server(["--config", config], state) as server:
        with card_session(server.host, server.port, "1-1") as session_a:
            config.write_text(one + two)
            result = ctl(state, "reload")
            assert "reader(s) added: b" in result.stdout, result
            assert bus_ids(server.port) == ["1-2"]  # 1-1 is imported, so not listed
            # reader a's session goes on undisturbed
            assert session_a.apdu(SELECT_PKI)[-2:] == b"\x90\x00"

            # the same card in two readers: refused as a whole, nothing changes
            config.write_text(one + two.replace("'bob'", "'default'"))
            assert_one_line_error(ctl(state, "reload"), "not reloaded", "in two slots")
            assert [r["name"] for r in status(state)["readers"]] == ["a", "b"]  # type: ignore[attr-defined]

            # b gets a second slot: replaced (unplugged and back under the same bus id)
            config.write_text(one + two + "[[reader.slot]]\ncard = 'none'\n")
            assert "reader(s) replaced: b" in ctl(state, "reload").stdout
            b = status(state)["readers"][1]  # type: ignore[index]
            assert (b["bus_id"], len(b["slots"])) == ("1-2", 2)

            config.write_text(one)
            assert "reader(s) removed: b" in ctl(state, "reload").stdout
            assert bus_ids(server.port) == []
            assert session_a.apdu(SELECT_PKI)[-2:] == b"\x90\x00"
        s = status(state)
        assert s["counters"]["readers_added"] == 1  # type: ignore[index]
        assert s["counters"]["readers_removed"] == 1  # type: ignore[index]
