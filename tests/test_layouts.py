"""The hot path's struct layouts agree with the construct declarations they come from.

usbccid.compiled.StructLayout computes a ``struct.Struct`` format from a declaration's
fields; the USB/IP and CCID hot paths parse and build with it. Here, for every declaration
of the two wire modules that a layout can express: both read the same values from the same
bytes, both build the same bytes from the same values, and every input of the wrong size
that the declaration refuses, the layout refuses too. Then the hot paths themselves
(CMD_SUBMIT framing, RET_SUBMIT, PC_to_RDR_XfrBlock framing, RDR_to_PC_DataBlock) against
the declaration-based paths they replace.
"""

from __future__ import annotations

import struct
from typing import Any

import pytest
from construct import Construct, ConstructError, Container, Struct
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.ccid import wire as ccid_wire
from usbccid.ccid.errors import CommandStatus, IccStatus, SlotError
from usbccid.ccid.reader import CcidReader
from usbccid.ccid.testcard import EchoCard, run_jobs_inline
from usbccid.compiled import StructLayout
from usbccid.usbip import wire
from usbccid.usbip.connection import UsbipServerConnection
from usbccid.usbip.errors import UsbipLocalError, UsbipRemoteError

# The layouts the hot paths use, with the declaration and options each is derived from.
HOT: list[tuple[str, StructLayout, Construct[Any, Any], dict[str, Any]]] = [
    ("CMD_SUBMIT", wire.CMD_SUBMIT_LAYOUT, wire._CMD_SUBMIT_HEADER, {"raw": ("setup",)}),
    ("RET_SUBMIT", wire.RET_SUBMIT_LAYOUT, wire._RET_SUBMIT_HEADER, {}),
    ("PC_TO_RDR_HEADER", ccid_wire.HEADER_LAYOUT, ccid_wire.PC_TO_RDR_HEADER, {}),
    (
        "RDR_TO_PC",
        ccid_wire.REPLY_LAYOUT,
        ccid_wire.RDR_TO_PC,
        {"raw": ("bStatus",), "stop": "abData"},
    ),
    (
        "XFR_BLOCK",
        ccid_wire.XFR_BLOCK_LAYOUT,
        ccid_wire._PC_TO_RDR_SPECIFIC[ccid_wire.PcToRdr.XFR_BLOCK],
        {},
    ),
]


def expressible() -> list[tuple[str, Construct[Any, Any], StructLayout]]:
    """Every declaration of the two wire modules that a layout can express whole."""
    found: list[tuple[str, Construct[Any, Any], StructLayout]] = []
    for module in (wire, ccid_wire):
        for name, value in sorted(vars(module).items()):
            if not isinstance(value, Struct):
                continue
            try:
                layout = StructLayout(value)
                size = int(value.sizeof()) if not _terminated(value) else None
            except (TypeError, ConstructError):
                continue
            if size is None or size == layout.size:  # no variable part left out
                found.append((f"{module.__name__}.{name}", value, layout))
    return found


def _terminated(declaration: Construct[Any, Any]) -> bool:
    return any(type(sub).__name__ == "Terminated" for sub in getattr(declaration, "subcons", ()))


EXPRESSIBLE = expressible()


def _value(container: Container[Any], name: str) -> Any:
    for part in name.split("."):
        container = container[part]
    return container


def _subcon(declaration: Construct[Any, Any], name: str) -> Construct[Any, Any]:
    sub: Construct[Any, Any] = next(
        s for s in getattr(declaration, "subcons", ()) if getattr(s, "name", None) == name
    )
    return sub


def _raw(declaration: Construct[Any, Any], name: str, parsed: Container[Any]) -> Any:
    """What the layout carries for a ``raw`` field: its bytes (or its one byte's value)."""
    data = bytes(_subcon(declaration, name).build(parsed[name]))
    return data[0] if len(data) == 1 else data


def test_the_hot_layouts_are_derived_from_their_declarations() -> None:
    for name, layout, declaration, options in HOT:
        again = StructLayout(declaration, **options)
        assert (layout.format, layout.names) == (again.format, again.names), name
    assert wire.CMD_SUBMIT_LAYOUT.format == ">LLLLLLLlll8s"
    assert ccid_wire.REPLY_LAYOUT.format == "<BLBBBBB"


def test_every_fixed_declaration_a_layout_can_express_is_covered() -> None:
    names = {name for name, _, _ in EXPRESSIBLE}
    # the headers of the hot path are among them, and some are not expressible (Const)
    assert "usbccid.usbip.wire._RET_SUBMIT_HEADER" in names
    assert "usbccid.ccid.wire.PC_TO_RDR_HEADER" in names
    assert "usbccid.usbip.wire._OP_COMMON" not in names
    with pytest.raises(TypeError):
        StructLayout(wire._OP_COMMON)


@pytest.mark.parametrize(("name", "layout", "declaration", "options"), HOT, ids=[h[0] for h in HOT])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_hot_layout_reads_and_builds_what_the_declaration_does(
    name: str,
    layout: StructLayout,
    declaration: Construct[Any, Any],
    options: dict[str, Any],
    data: st.DataObject,
) -> None:
    raw = data.draw(st.binary(min_size=layout.size, max_size=layout.size))
    values = layout.unpack(raw)
    if options.get("stop") == "abData":  # the declaration needs its abData too
        raw_whole = raw[:1] + bytes(4) + raw[5:]  # dwLength 0: no abData
        values = layout.unpack(raw_whole)
        parsed = declaration.parse(raw_whole)
        raw = raw_whole
    else:
        parsed = declaration.parse(raw)
    raw_fields = options.get("raw", ())
    for field_name, value in zip(layout.names, values, strict=True):
        if field_name in raw_fields:  # carried as bytes: they parse to the same field
            sub = _subcon(declaration, field_name)
            as_bytes = bytes([value]) if isinstance(value, int) else value
            assert sub.parse(as_bytes) == _value(parsed, field_name)
        else:
            assert value == _value(parsed, field_name)
    # built from the parsed values (RFU bits zero, as the declaration builds them)
    normalized = tuple(
        _raw(declaration, n, parsed) if n in raw_fields else _value(parsed, n) for n in layout.names
    )
    assert layout.pack(*normalized) == declaration.build(parsed)[: layout.size]


@pytest.mark.parametrize(
    ("name", "declaration", "layout"), EXPRESSIBLE, ids=[n for n, _, _ in EXPRESSIBLE]
)
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_layout_agrees_with_its_declaration(
    name: str, declaration: Construct[Any, Any], layout: StructLayout, data: st.DataObject
) -> None:
    raw = data.draw(st.binary(min_size=layout.size, max_size=layout.size))
    parsed = declaration.parse(raw)
    assert layout.unpack(raw) == tuple(_value(parsed, n) for n in layout.names)
    assert layout.pack(*layout.unpack(raw)) == declaration.build(parsed)


@pytest.mark.parametrize(
    ("name", "declaration", "layout"), EXPRESSIBLE, ids=[n for n, _, _ in EXPRESSIBLE]
)
def test_layout_refuses_what_its_declaration_refuses(
    name: str, declaration: Construct[Any, Any], layout: StructLayout
) -> None:
    for size in (0, 1, layout.size - 1, layout.size + 1, layout.size + 7):
        raw = bytes(range(256))[: max(size, 0)] if size <= 256 else bytes(size)
        try:
            declaration.parse(raw)
        except ConstructError:
            with pytest.raises(struct.error):
                layout.unpack(raw)


# -- the hot paths against the paths they replace -------------------------------------

_u32 = st.integers(0, 2**32 - 1)


@settings(max_examples=300, deadline=None)
@given(
    seqnum=_u32,
    direction=st.sampled_from([0, 1, 2, 2**32 - 1]),
    ep=st.sampled_from([0, 1, 2, 15, 16]),
    length=st.sampled_from([0, 1, 5, 64, 2**20, 2**20 + 1, 2**32 - 1]),
    rest=st.binary(min_size=20, max_size=20),
    devid_ok=st.booleans(),
    payload=st.binary(max_size=70),
)
def test_cmd_submit_fast_path_agrees_with_the_declaration(
    seqnum: int,
    direction: int,
    ep: int,
    length: int,
    rest: bytes,
    devid_ok: bool,
    payload: bytes,
) -> None:
    devid = 0x10001 if devid_ok else 0x10002
    head = struct.pack(">LLLLLLL", 1, seqnum, devid, direction, ep, 0, length)
    stream = head + rest + payload

    def run(fast: bool) -> object:
        conn = UsbipServerConnection()
        conn._machine.phase = conn._machine.phase.URB
        conn._devid = 0x10001
        conn.receive_data(stream)
        try:
            event = conn.next_fast_event() if fast else conn.next_event()
        except UsbipRemoteError as e:
            return ("error", str(e))
        if isinstance(event, wire.Submit):
            return event.to_cmd()
        return event

    got = run(True)
    assert got == run(False)
    # and the declaration: the dataclass the reference parse gives for these bytes
    if isinstance(got, wire.CmdSubmit):
        reference = wire.parse_urb_header(stream[:48]).message
        assert got == wire.with_payload(reference, got.data)
        assert got.data == (payload[:length] if direction == 0 else b"")


@settings(max_examples=300, deadline=None)
@given(
    seqnum=st.integers(-1, 2**32),
    status=st.integers(-(2**31) - 1, 2**31),
    data=st.binary(max_size=20),
    length_delta=st.sampled_from([0, 0, 0, 1, -1]),
)
def test_encode_ret_agrees_with_encode(
    seqnum: int, status: int, data: bytes, length_delta: int
) -> None:
    actual_length = max(0, len(data) + length_delta)
    ret = wire.Ret(seqnum, status, actual_length, data)
    try:
        expected: bytes | str = wire.encode(ret.to_ret_submit())
    except UsbipLocalError:
        expected = "error"
    try:
        got: bytes | str = wire.encode_ret(ret)
    except UsbipLocalError:
        got = "error"
    assert got == expected


@settings(max_examples=300, deadline=None)
@given(
    slot=st.integers(0, 255),
    seq=st.integers(0, 255),
    icc=st.sampled_from(list(IccStatus)),
    command=st.sampled_from(list(CommandStatus)),
    error=st.integers(0, 255),
    chain=st.integers(0, 255),
    data=st.binary(max_size=40),
)
def test_data_block_fast_build_agrees_with_the_declaration(
    slot: int,
    seq: int,
    icc: IccStatus,
    command: CommandStatus,
    error: int,
    chain: int,
    data: bytes,
) -> None:
    fast = ccid_wire.build_data_block(slot, seq, icc, data, chain, command, error)
    reply = ccid_wire.DataBlock(slot, seq, icc, command, error, data=data, chain_parameter=chain)
    assert fast == ccid_wire.build_reply(reply)
    declared = ccid_wire.RDR_TO_PC.build(
        {
            "bMessageType": ccid_wire.RdrToPc.DATA_BLOCK,
            "bSlot": slot,
            "bSeq": seq,
            "bStatus": {"bmCommandStatus": command, "bmICCStatus": icc},
            "bError": error,
            "bSpecific": chain,
            "abData": data,
        }
    )
    assert fast == declared
    assert ccid_wire.parse_reply(fast) == reply


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(0, 255),
    bwi=st.integers(0, 255),
    body=st.binary(max_size=130),
    claimed_delta=st.sampled_from([0, 0, 0, -1, 1, -5, 40]),
)
def test_xfr_block_framing_refuses_what_the_declaration_refuses(
    seq: int, bwi: int, body: bytes, claimed_delta: int
) -> None:
    """The reader frames an XfrBlock by its header alone (no parse_command on the hot
    path): it hands the APDU to the card exactly when PC_TO_RDR parses the message, and
    answers BAD_LENGTH otherwise."""
    claimed = max(0, len(body) + claimed_delta)
    message = bytes([ccid_wire.PcToRdr.XFR_BLOCK]) + claimed.to_bytes(4, "little")
    message += bytes([0, seq, bwi, 0, 0]) + body  # slot 0, wLevelParameter 0: a whole APDU
    card = EchoCard()
    reader = CcidReader([card])
    reader.bulk_out(0x01, ccid_wire.build_command(ccid_wire.IccPowerOn(0, 0)))
    run_jobs_inline(reader)
    assert reader.poll_in(0x82, 65546) is not None
    reader.bulk_out(0x01, message)
    if len(message) % 64 == 0:
        reader.bulk_out(0x01, b"")  # a zero-length packet ends the transfer
    run_jobs_inline(reader)
    reply = reader.poll_in(0x82, 65546)
    assert reply is not None
    answer = ccid_wire.parse_reply(reply)
    assert isinstance(answer, ccid_wire.DataBlock)
    try:
        parsed = ccid_wire.PC_TO_RDR.parse(message)
    except ConstructError:
        assert answer.command_status == CommandStatus.FAILED
        assert answer.error == SlotError.BAD_LENGTH
        assert card.commands == []
        return
    assert answer.command_status == CommandStatus.OK
    assert answer.seq == seq
    assert card.commands == [bytes(parsed.abData)]


def test_the_hot_path_makes_no_container_or_message_dataclass(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An APDU exchange (bulk-OUT XfrBlock, bulk-IN DataBlock) through the exporter makes
    no construct Container and none of the per-message dataclasses of either wire module:
    the hot path carries tuples and bytes."""
    from usbccid.usbip.device import VirtualDevice
    from usbccid.usbip.exporter import Exporter

    reader = CcidReader([EchoCard()])
    conn = Exporter([VirtualDevice(reader.identity, reader)]).connect("test")
    conn.receive_data(wire.encode(wire.OpReqImport("1-1")))
    assert len(conn.data_to_send()) == 8 + 312
    seqnum = 0

    def exchange(message: bytes) -> bytes:
        nonlocal seqnum
        seqnum += 2
        head = struct.Struct(">LLLLLLLlll8s")
        out = head.pack(1, seqnum - 1, 0x10001, 0, 1, 0, len(message), 0, 0, 0, bytes(8))
        urb_in = head.pack(1, seqnum, 0x10001, 1, 2, 0, 65546, 0, 0, 0, bytes(8))
        conn.receive_data(out + message + urb_in)
        while (job := conn.next_job(0.0)) is not None:
            job.run()
            job.finish()
            conn.poll()
        data = conn.data_to_send()
        assert len(data) > 96
        return data[96:]

    exchange(ccid_wire.build_command(ccid_wire.IccPowerOn(0, 1)))
    made: list[str] = []
    for module in (wire, ccid_wire):
        for name, cls in vars(module).items():
            if isinstance(cls, type) and hasattr(cls, "__dataclass_fields__"):
                original = vars(cls)["__init__"]

                def spy(
                    self: object, *args: Any, _n: str = name, _o: Any = original, **kw: Any
                ) -> None:
                    made.append(_n)
                    _o(self, *args, **kw)

                monkeypatch.setattr(cls, "__init__", spy)
    container_init = Container.__init__

    def container_spy(self: Container[Any], *args: Any, **kw: Any) -> None:
        made.append("Container")
        container_init(self, *args, **kw)

    monkeypatch.setattr(Container, "__init__", container_spy)
    apdu = bytes.fromhex("80 10 00 00 03 01 02 03")  # EchoCard's ECHO
    for seq in range(2, 6):
        # built by hand: build_command goes through construct, and is not the server's path
        xfr_block = bytes([0x6F]) + len(apdu).to_bytes(4, "little") + bytes([0, seq, 0, 0, 0])
        reply = exchange(xfr_block + apdu)
        assert reply[0] == ccid_wire.RdrToPc.DATA_BLOCK
        assert reply[6] == seq
        assert reply[10:] == b"\x01\x02\x03\x90\x00"
    assert made == []
