"""The control plane's protocol, sans-IO: one JSON request in, one JSON reply out.

Each datagram on the control socket (``usbccid.tool.control_server``) holds one UTF-8 JSON
object, a request::

    {"command": "status"}
    {"command": "insert", "reader": "desk", "slot": 0}
    {"command": "remove", "reader": "1-1"}              # slot defaults to 0
    {"command": "reload"}
    {"command": "pinpad", "reader": "desk", "slot": 0, "entries": ["12345678"]}
    {"command": "pinpad", "reader": "desk", "entries": [], "cancel": true}
    {"command": "insert", "reader": "desk", "slot": 1, "card": "alice"}   # a stored card
    {"command": "add-reader", "name": "lab", "cards": ["bob", null], "identity": "qemu"}
    {"command": "remove-reader", "reader": "lab"}

and the server answers each with one reply datagram::

    {"ok": true, "result": {...}}
    {"ok": false, "error": "no reader 'desk2' (readers: desk)"}

The server's side is :func:`handle_request`, which calls a :class:`ServerState` (the
composition root, ``usbccid.tool.app``, implements it); the client's side is
:func:`encode_request` and :func:`decode_reply`. Nothing here does I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Final, Protocol

from usbccid.errors import UsbccidError

MAX_DATAGRAM: Final = 65536
SOCKET_NAME: Final = "control.sock"
COMMANDS: Final = (
    "status",
    "insert",
    "remove",
    "reload",
    "pinpad",
    "add-reader",
    "remove-reader",
)
#: Fields of each command besides "command".
_FIELDS: Final = {
    "status": frozenset(),
    "reload": frozenset(),
    "insert": frozenset({"reader", "slot", "card"}),
    "remove": frozenset({"reader", "slot"}),
    "pinpad": frozenset({"reader", "slot", "entries", "cancel"}),
    "add-reader": frozenset({"name", "cards", "identity", "bus_id"}),
    "remove-reader": frozenset({"reader"}),
}
MAX_ENTRIES: Final = 3  # a PIN change: current PIN, new PIN, new PIN again


class ControlError(UsbccidError):
    """A request failed; the message is the reply's ``error`` (one line, for a human)."""


@dataclass(frozen=True)
class PinPrompt:
    """A PIN pad waiting for the keypad (never any digit)."""

    operation: str  # "verify" or "modify"
    stage: str  # "current PIN", "new PIN", "new PIN again"
    entry: int  # 1-based
    entries: int
    typed: int  # digits typed so far
    min_digits: int
    max_digits: int
    seconds_left: float | None
    display: tuple[str, str] | None = None  # the LCD's lines


@dataclass(frozen=True)
class SlotStatus:
    index: int
    state: str  # "empty", "present" (card inserted, not powered) or "active" (powered)
    card: str | None = None  # what card is (or would be) in it, for a human
    detail: str | None = None  # the front end's word on it (vpcd: connected, or why not)
    pinpad: PinPrompt | None = None  # the reader's PIN pad waits for this slot's PIN


@dataclass(frozen=True)
class ReaderStatus:
    name: str
    bus_id: str  # USB/IP: the bus id; vpcd: "HOST:PORT" of its slot 0; vscard: its endpoint
    vendor_id: int | None  # None: no USB device of ours (vpcd, vscard)
    product_id: int | None
    product: str | None
    client: str | None  # "HOST:PORT" of the client that imported it, or None
    slots: tuple[SlotStatus, ...]
    counters: Mapping[str, int] = field(default_factory=dict)
    frontend: str = "usbip"
    pinpad: bool = False  # the reader has a PIN pad


@dataclass(frozen=True)
class ServerStatus:
    version: str
    listen: str  # "HOST:PORT"
    pid: int
    uptime: float
    readers: tuple[ReaderStatus, ...]
    counters: Mapping[str, int] = field(default_factory=dict)


class ServerState(Protocol):
    """What the control plane may ask of the running server."""

    def status(self) -> ServerStatus: ...

    def insert(self, reader: str, slot: int, card: str | None = None) -> None:
        """Insert the slot's card (or the stored card ``card`` into the empty slot); the
        host sees NotifySlotChange.

        Raises:
            ControlError: no such reader, slot or card, the slot holds no card, or the
                card is in another slot.
        """
        ...

    def add_reader(
        self,
        name: str,
        cards: Sequence[str | None] = ("default",),
        identity: str | None = None,
        bus_id: str | None = None,
    ) -> Mapping[str, Any]:
        """Export a new reader now; returns {"reader", "bus_id"}.

        Raises:
            ControlError: the name or bus id is taken, a card cannot be had.
        """
        ...

    def remove_reader(self, reader: str) -> Mapping[str, Any]:
        """Unplug a reader; its importer sees a disconnect.

        Raises:
            ControlError: no such reader.
        """
        ...

    def remove(self, reader: str, slot: int) -> None:
        """Remove the slot's card (it stays configured, and can be inserted again).

        Raises:
            ControlError: no such reader or slot.
        """
        ...

    def reload(self) -> Mapping[str, Any]:
        """Re-read the configuration's cards; return a JSON-able summary of what changed.

        Raises:
            ControlError: the configuration is invalid (the running cards stay).
        """
        ...

    def pinpad(
        self, reader: str, slot: int, entries: Sequence[str], cancel: bool
    ) -> Mapping[str, Any]:
        """Type ``entries`` on the reader's PIN pad, each followed by OK (with ``cancel``,
        Cancel instead of the last OK); a JSON-able report, ``{"waiting": false}`` when no
        PIN entry waits for that slot.

        Raises:
            ControlError: no such reader or slot, or the reader has no PIN pad.
        """
        ...


# --------------------------------------------------------------------------- server side


def handle_request(data: bytes, state: ServerState) -> bytes:
    """Answer one request datagram; never raises for anything the client sent."""
    try:
        request = _parse_request(data)
        result = _dispatch(request, state)
    except ControlError as exc:
        return _reply({"ok": False, "error": str(exc)})
    return _reply({"ok": True, "result": result})


def _reply(obj: Mapping[str, Any]) -> bytes:
    out = json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()
    if len(out) > MAX_DATAGRAM:
        out = json.dumps({"ok": False, "error": "reply too large for one datagram"}).encode()
    return out


def _parse_request(data: bytes) -> Mapping[str, Any]:
    try:
        request = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("request is not a JSON object") from None
    if not isinstance(request, dict):
        raise ControlError("request is not a JSON object")
    command = request.get("command")
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r} (commands: {', '.join(COMMANDS)})")
    allowed = {"command"} | _FIELDS[command]
    unknown = sorted(set(request) - allowed)
    if unknown:
        raise ControlError(f"unexpected field {unknown[0]!r} in {command} request")
    return request


def _dispatch(request: Mapping[str, Any], state: ServerState) -> Any:
    command = request["command"]
    if command == "status":
        return status_to_json(state.status())
    if command == "reload":
        return dict(state.reload())
    if command == "add-reader":
        return dict(_add_reader(request, state))
    reader = request.get("reader")
    if not isinstance(reader, str) or not reader:
        raise ControlError(f"{command} needs a reader (its name or bus id)")
    if command == "remove-reader":
        return dict(state.remove_reader(reader))
    slot = request.get("slot", 0)
    if not isinstance(slot, int) or isinstance(slot, bool) or slot < 0:
        raise ControlError(f"slot must be a non-negative integer, got {slot!r}")
    if command == "pinpad":
        entries = request.get("entries", [])
        if (
            not isinstance(entries, list)
            or len(entries) > MAX_ENTRIES
            or not all(isinstance(e, str) and _digits_only(e) for e in entries)
        ):
            raise ControlError(
                f"entries must be a list of at most {MAX_ENTRIES} strings of digits 0-9"
            )
        cancel = request.get("cancel", False)
        if not isinstance(cancel, bool):
            raise ControlError("cancel must be true or false")
        if not entries and not cancel:
            raise ControlError("pinpad needs entries to type, or cancel")
        return {"reader": reader, "slot": slot, **state.pinpad(reader, slot, entries, cancel)}
    if command == "insert":
        card = request.get("card")
        if card is not None and (not isinstance(card, str) or not card):
            raise ControlError(f"card must be a stored card's name, got {card!r}")
        state.insert(reader, slot, card)
        return {"reader": reader, "slot": slot, **({"card": card} if card else {})}
    state.remove(reader, slot)
    return {"reader": reader, "slot": slot}


def _digits_only(text: str) -> bool:
    return len(text) <= 255 and all("0" <= c <= "9" for c in text)


def _add_reader(request: Mapping[str, Any], state: ServerState) -> Mapping[str, Any]:
    name = request.get("name")
    if not isinstance(name, str) or not name:
        raise ControlError("add-reader needs a name")
    cards = request.get("cards", ["default"])
    if not isinstance(cards, list) or not all(c is None or isinstance(c, str) for c in cards):
        raise ControlError("cards must be a list of stored card names (or null: empty slot)")
    identity = request.get("identity")
    bus_id = request.get("bus_id")
    for key, value in (("identity", identity), ("bus_id", bus_id)):
        if value is not None and not isinstance(value, str):
            raise ControlError(f"{key} must be a string")
    return state.add_reader(name, cards, identity, bus_id)


def status_to_json(status: ServerStatus) -> dict[str, Any]:
    out = asdict(status)
    return out


def status_from_json(obj: Mapping[str, Any]) -> ServerStatus:
    """The inverse of :func:`status_to_json` (the client's view).

    Raises:
        ControlError: the reply does not have the expected shape.
    """
    try:
        readers = tuple(
            ReaderStatus(
                name=r["name"],
                bus_id=r["bus_id"],
                vendor_id=r["vendor_id"],
                product_id=r["product_id"],
                product=r["product"],
                client=r["client"],
                slots=tuple(_slot_from_json(s) for s in r["slots"]),
                counters=dict(r.get("counters", {})),
                frontend=r.get("frontend", "usbip"),
                pinpad=bool(r.get("pinpad", False)),
            )
            for r in obj["readers"]
        )
        return ServerStatus(
            version=obj["version"],
            listen=obj["listen"],
            pid=obj["pid"],
            uptime=obj["uptime"],
            readers=readers,
            counters=dict(obj.get("counters", {})),
        )
    except (KeyError, TypeError) as exc:
        raise ControlError(f"malformed status reply ({exc})") from None


def _slot_from_json(s: Mapping[str, Any]) -> SlotStatus:
    prompt = s.get("pinpad")
    if prompt is not None:
        display = prompt.get("display")
        prompt = PinPrompt(**{**prompt, "display": tuple(display) if display else None})
    return SlotStatus(
        index=s["index"],
        state=s["state"],
        card=s.get("card"),
        detail=s.get("detail"),
        pinpad=prompt,
    )


# --------------------------------------------------------------------------- client side


def encode_request(
    command: str,
    reader: str | None = None,
    slot: int | None = None,
    *,
    entries: Sequence[str] | None = None,
    cancel: bool = False,
    **fields: Any,
) -> bytes:
    """A request datagram; ``fields`` are the command's other fields (None: left out)."""
    if command not in COMMANDS:
        raise ControlError(f"unknown command {command!r}")
    request: dict[str, Any] = {"command": command}
    if reader is not None:
        request["reader"] = reader
    if slot is not None:
        request["slot"] = slot
    if entries is not None:
        request["entries"] = list(entries)
    if cancel:
        request["cancel"] = True
    request.update({k: v for k, v in fields.items() if v is not None})
    return json.dumps(request).encode()


def decode_reply(data: bytes) -> Any:
    """The ``result`` of a reply datagram.

    Raises:
        ControlError: the server reported an error, or the reply is malformed.
    """
    try:
        reply = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ControlError("the server's reply is not JSON") from None
    if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
        raise ControlError("the server's reply is malformed")
    if not reply["ok"]:
        raise ControlError(str(reply.get("error", "unknown error")))
    return reply.get("result")


def parse_target(text: str) -> tuple[str, int]:
    """``READER[:SLOT]`` → (reader, slot). READER is a reader's name or its bus id.

    Raises:
        ControlError: malformed.
    """
    reader, sep, slot_text = text.rpartition(":")
    if not sep:
        reader, slot_text = text, "0"
    if not reader:
        raise ControlError(f"{text!r}: expected READER[:SLOT]")
    if not slot_text.isdigit():
        raise ControlError(f"{text!r}: the slot must be a number (READER[:SLOT])")
    return reader, int(slot_text)


def format_status(status: ServerStatus) -> str:
    """The status as text for a human (``usbccid ctl status``)."""
    listening = f"listening on {status.listen}" if status.listen else "no USB/IP server"
    lines = [
        f"usbccid {status.version}, pid {status.pid}, {listening}, up {_duration(status.uptime)}"
    ]
    lines += [f"  {k}: {v}" for k, v in sorted(status.counters.items())]
    for r in status.readers:
        if r.vendor_id is None or r.product_id is None:
            lines.append(f"reader {r.name}  {r.frontend} {r.bus_id}")
        else:
            client = f"imported by {r.client}" if r.client else "not imported"
            lines.append(
                f"reader {r.name}  bus id {r.bus_id}  {r.vendor_id:04x}:{r.product_id:04x} "
                f"{r.product}  ({client})"
            )
        if r.pinpad:
            lines.append("  PIN pad")
        for s in r.slots:
            card = f"  {s.card}" if s.card else ""
            detail = f"  ({s.detail})" if s.detail else ""
            lines.append(f"  slot {s.index}: {s.state}{card}{detail}")
            if s.pinpad is not None:
                lines.append(f"    {format_prompt(s.pinpad)}")
        if r.counters:
            counters = ", ".join(f"{k} {v}" for k, v in sorted(r.counters.items()))
            lines.append(f"  counters: {counters}")
    return "\n".join(lines)


def format_prompt(p: PinPrompt) -> str:
    """``waiting for the current PIN (verify, entry 1 of 1): 0 digits typed, 4-8, 28 s left``"""
    left = f", {p.seconds_left:.0f} s left" if p.seconds_left is not None else ""
    text = (
        f"PIN pad waiting for the {p.stage} ({p.operation}, entry {p.entry} of {p.entries}): "
        f"{p.typed} digit{'s' * (p.typed != 1)} typed, {p.min_digits}-{p.max_digits}{left}"
    )
    if p.display is not None and any(p.display):
        text += f"; display {p.display[0]!r} {p.display[1]!r}"
    return text


def _duration(seconds: float) -> str:
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def find_reader(names: Sequence[tuple[str, str]], wanted: str) -> int:
    """The index of the reader whose name or bus id is ``wanted``.

    ``names`` is the readers' (name, bus id) pairs, in order.

    Raises:
        ControlError: no such reader.
    """
    for i, (name, bus_id) in enumerate(names):
        if wanted in (name, bus_id):
            return i
    known = ", ".join(f"{n} ({b})" for n, b in names) or "none"
    raise ControlError(f"no reader {wanted!r} (readers: {known})")
