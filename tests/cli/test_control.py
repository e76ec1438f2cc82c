"""The control protocol (sans-IO) and the control socket, against a fake server state."""

from __future__ import annotations

import asyncio
import json
import stat
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from usbccid.tool.control import (
    ControlError,
    ReaderStatus,
    ServerStatus,
    SlotStatus,
    decode_reply,
    encode_request,
    find_reader,
    format_status,
    handle_request,
    parse_target,
    status_from_json,
    status_to_json,
)
from usbccid.tool.control_server import ControlServer, ControlSocketError, probe, request


class FakeState:
    def __init__(self) -> None:
        self.slots = {("desk", 0): "present", ("desk", 1): "empty"}
        self.calls: list[tuple[str, str, int]] = []
        self.typed: list[tuple[list[str], bool]] = []
        self.cards: list[str | None] = []
        self.added: list[tuple[str, list[str | None], str | None, str | None]] = []

    def status(self) -> ServerStatus:
        return ServerStatus(
            version="0.1.0",
            listen="127.0.0.1:3240",
            pid=42,
            uptime=75.0,
            readers=(
                ReaderStatus(
                    name="desk",
                    bus_id="1-1",
                    vendor_id=0x0E0F,
                    product_id=0x0004,
                    product="usbccid virtual CCID reader",
                    client="127.0.0.1:50000",
                    slots=tuple(
                        SlotStatus(i, self.slots[("desk", i)], "stored card" if i == 0 else None)
                        for i in range(2)
                    ),
                    counters={"apdus": 7},
                ),
            ),
            counters={"connections": 1},
        )

    def _slot(self, reader: str, slot: int) -> tuple[str, int]:
        find_reader([("desk", "1-1")], reader)
        if (reader if reader == "desk" else "desk", slot) not in self.slots:
            raise ControlError(f"no slot {slot}")
        return ("desk", slot)

    def insert(self, reader: str, slot: int, card: str | None = None) -> None:
        self.slots[self._slot(reader, slot)] = "present"
        self.calls.append(("insert", reader, slot))
        self.cards.append(card)

    def add_reader(
        self,
        name: str,
        cards: Sequence[str | None] = ("default",),
        identity: str | None = None,
        bus_id: str | None = None,
    ) -> Mapping[str, Any]:
        self.added.append((name, list(cards), identity, bus_id))
        return {"reader": name, "bus_id": bus_id or "1-2"}

    def remove_reader(self, reader: str) -> Mapping[str, Any]:
        find_reader([("desk", "1-1")], reader)
        self.calls.append(("remove-reader", reader, 0))
        return {"reader": "desk", "bus_id": "1-1"}

    def remove(self, reader: str, slot: int) -> None:
        self.slots[self._slot(reader, slot)] = "empty"
        self.calls.append(("remove", reader, slot))

    def reload(self) -> Mapping[str, Any]:
        return {"changed": [], "restart_needed": [], "message": "reloaded: 0 card(s) changed"}

    def pinpad(
        self, reader: str, slot: int, entries: Sequence[str], cancel: bool
    ) -> Mapping[str, Any]:
        self._slot(reader, slot)
        self.calls.append(("pinpad", reader, slot))
        self.typed.append((list(entries), cancel))
        return {"waiting": True, "accepted": sum(map(len, entries)), "ignored": 0}


def ask(state: FakeState, payload: bytes) -> Any:
    return decode_reply(handle_request(payload, state))


def test_status_round_trip() -> None:
    state = FakeState()
    result = ask(state, encode_request("status"))
    status = status_from_json(result)
    assert status == state.status()
    text = format_status(status)
    assert "reader desk  bus id 1-1  0e0f:0004" in text
    assert "imported by 127.0.0.1:50000" in text
    assert "slot 0: present  stored card" in text
    assert "slot 1: empty" in text
    assert "up 1m15s" in text


def test_insert_and_remove() -> None:
    state = FakeState()
    assert ask(state, encode_request("remove", "desk", 0)) == {"reader": "desk", "slot": 0}
    assert ask(state, encode_request("insert", "1-1", 1)) == {"reader": "1-1", "slot": 1}
    assert ask(state, b'{"command": "insert", "reader": "desk"}') == {"reader": "desk", "slot": 0}
    assert state.calls == [("remove", "desk", 0), ("insert", "1-1", 1), ("insert", "desk", 0)]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\xff", "not a JSON object"),
        (b"[1]", "not a JSON object"),
        (b'{"command": "explode"}', "unknown command 'explode'"),
        (b"{}", "unknown command None"),
        (b'{"command": "status", "reader": "x"}', "unexpected field 'reader'"),
        (b'{"command": "insert"}', "insert needs a reader"),
        (b'{"command": "insert", "reader": "desk", "slot": -1}', "slot must be a non-negative"),
        (b'{"command": "insert", "reader": "desk", "slot": true}', "slot must be a non-negative"),
        (b'{"command": "remove", "reader": "nope"}', "no reader 'nope' (readers: desk (1-1))"),
        (b'{"command": "remove", "reader": "desk", "slot": 5}', "no slot 5"),
    ],
)
def test_errors_are_replies(payload: bytes, message: str) -> None:
    reply = json.loads(handle_request(payload, FakeState()))
    assert reply["ok"] is False
    assert message in reply["error"]
    with pytest.raises(ControlError, match=r"."):
        decode_reply(json.dumps(reply).encode())


def test_parse_target() -> None:
    assert parse_target("desk") == ("desk", 0)
    assert parse_target("desk:2") == ("desk", 2)
    assert parse_target("1-1:1") == ("1-1", 1)
    for bad in ("", ":1", "desk:x"):
        with pytest.raises(ControlError):
            parse_target(bad)


def test_decode_reply_rejects_garbage() -> None:
    for data in (b"nope", b"[]", b'{"ok": 1}'):
        with pytest.raises(ControlError):
            decode_reply(data)


def test_control_socket(tmp_path: Path) -> None:
    path = tmp_path / "control.sock"
    state = FakeState()

    async def main() -> None:
        server = ControlServer(path, state)
        await server.start()
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        # a second server on the same socket refuses to start
        with pytest.raises(ControlSocketError, match="another usbccid server is running"):
            await ControlServer(path, state).start()
        reply = await asyncio.to_thread(request, path, encode_request("remove", "desk", 0))
        assert decode_reply(reply) == {"reader": "desk", "slot": 0}
        assert await asyncio.to_thread(probe, path)
        await server.close()
        assert not path.exists()

    asyncio.run(main())
    assert state.calls == [("remove", "desk", 0)]
    with pytest.raises(ControlSocketError, match="no usbccid server running"):
        request(path, encode_request("status"), timeout=1)


def test_stale_socket_is_replaced(tmp_path: Path) -> None:
    import socket

    path = tmp_path / "control.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(path))
    s.close()  # the file stays, nobody listens: a server that died
    with pytest.raises(ControlSocketError, match="stale control socket"):
        request(path, encode_request("status"), timeout=1)

    async def main() -> None:
        server = ControlServer(path, FakeState())
        await server.start()
        reply = await asyncio.to_thread(request, path, encode_request("status"))
        assert decode_reply(reply)["pid"] == 42
        await server.close()

    asyncio.run(main())


def test_socket_path_too_long(tmp_path: Path) -> None:
    with pytest.raises(ControlSocketError, match="too long"):
        request(tmp_path / ("x" * 120) / "control.sock", b"{}")


def test_pinpad_requests() -> None:
    state = FakeState()
    reply = ask(state, encode_request("pinpad", "desk", 0, entries=["1234", "5678"]))
    assert reply == {"reader": "desk", "slot": 0, "waiting": True, "accepted": 8, "ignored": 0}
    ask(state, encode_request("pinpad", "1-1", 0, entries=[], cancel=True))
    assert state.typed == [(["1234", "5678"], False), ([], True)]


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b'{"command": "pinpad", "reader": "desk"}', "needs entries to type, or cancel"),
        (b'{"command": "pinpad", "reader": "desk", "entries": "1234"}', "a list of at most 3"),
        (b'{"command": "pinpad", "reader": "desk", "entries": ["12a4"]}', "digits 0-9"),
        (b'{"command": "pinpad", "reader": "desk", "entries": ["1","2","3","4"]}', "at most 3"),
        (b'{"command": "pinpad", "reader": "desk", "entries": [1234]}', "strings of digits"),
        (b'{"command": "pinpad", "reader": "desk", "cancel": 1}', "cancel must be true or"),
        (b'{"command": "pinpad", "reader": "desk", "pin": "1"}', "unexpected field 'pin'"),
        (b'{"command": "pinpad", "entries": ["1"]}', "pinpad needs a reader"),
    ],
)
def test_pinpad_errors(payload: bytes, message: str) -> None:
    reply = json.loads(handle_request(payload, FakeState()))
    assert reply["ok"] is False
    assert message in reply["error"]


def test_status_with_a_waiting_pin_pad() -> None:
    from usbccid.tool.control import PinPrompt

    prompt = PinPrompt("modify", "new PIN", 2, 3, 3, 4, 8, 27.4, ("Enter new PIN", "***"))
    base = FakeState().status()
    reader = base.readers[0]
    status = ServerStatus(
        base.version,
        base.listen,
        base.pid,
        base.uptime,
        (
            ReaderStatus(
                **{
                    **{f: getattr(reader, f) for f in reader.__dataclass_fields__},
                    "slots": (SlotStatus(0, "active", "stored card", pinpad=prompt),),
                    "pinpad": True,
                }
            ),
        ),
    )
    back = status_from_json(json.loads(json.dumps(status_to_json(status))))
    assert back == status
    text = format_status(back)
    assert "  PIN pad\n" in text
    assert (
        "    PIN pad waiting for the new PIN (modify, entry 2 of 3): 3 digits typed, 4-8, "
        "27 s left; display 'Enter new PIN' '***'"
    ) in text
