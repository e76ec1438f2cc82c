"""UsbipServerConnection: the phase table, framing, bad input, chunking, garbage."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.usbip import wire
from usbccid.usbip.connection import (
    MAX_TRANSFER_LENGTH,
    NEED_DATA,
    RECEIVED_INPUTS,
    TRANSITIONS,
    ConnectionClosed,
    Event,
    Input,
    NeedData,
    Phase,
    PhaseMachine,
    UsbipServerConnection,
)
from usbccid.usbip.errors import UsbipLocalError, UsbipRemoteError
from usbccid.usbip.function import SetupPacket

from .helpers import DEVID_1_1
from .test_wire import DEVICE_INFO

DEVID = DEVICE_INFO.devid
IMPORT_OK = wire.OpRepImport(wire.OpStatus.OK, DEVICE_INFO)


def drain(conn: UsbipServerConnection) -> list[Event]:
    """All events now available, answering op requests like an exporter would."""
    events: list[Event] = []
    while True:
        event = conn.next_event()
        if isinstance(event, NeedData):
            return events
        events.append(event)
        if isinstance(event, wire.OpReqImport):
            conn.send(IMPORT_OK)
        elif isinstance(event, wire.OpReqDevlist):
            conn.send(wire.OpRepDevlist(()))


def imported() -> UsbipServerConnection:
    conn = UsbipServerConnection()
    conn.receive_data(wire.encode(wire.OpReqImport("3-2")))
    assert drain(conn) == [wire.OpReqImport("3-2")]
    assert conn.phase is Phase.URB
    assert conn.imported_devid == DEVID
    return conn


def submit_in(seq: int = 1, ep: int = 2, length: int = 64, devid: int = DEVID) -> wire.CmdSubmit:
    return wire.CmdSubmit(seq, devid, wire.Direction.IN, ep, length)


def submit_out(seq: int, data: bytes, ep: int = 1, devid: int = DEVID) -> wire.CmdSubmit:
    return wire.CmdSubmit(seq, devid, wire.Direction.OUT, ep, len(data), data=data)


# --- the phase table, enumerated --------------------------------------------------------


@pytest.mark.parametrize(("phase", "event"), list(itertools.product(Phase, Input)))
def test_phase_table(phase: Phase, event: Input) -> None:
    machine = PhaseMachine(phase)
    expected = TRANSITIONS.get((phase, event))
    if expected is not None:
        assert machine.process(event) is expected
    elif event in RECEIVED_INPUTS:
        with pytest.raises(UsbipRemoteError):
            machine.process(event)
        assert machine.phase is Phase.ERROR
    else:
        with pytest.raises(UsbipLocalError):
            machine.process(event)
        assert machine.phase is phase


def test_phase_table_shape() -> None:
    # Terminal phases accept nothing but EOF; every phase can see EOF except ERROR.
    assert {p for (p, _) in TRANSITIONS} == set(Phase) - {Phase.ERROR}
    assert {e for (p, e) in TRANSITIONS if p is Phase.DONE} == {Input.RECV_EOF}
    assert all((p, Input.RECV_EOF) in TRANSITIONS for p in Phase if p is not Phase.ERROR)


def test_devlist_then_done() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(wire.encode(wire.OpReqDevlist()))
    assert conn.next_event() == wire.OpReqDevlist()
    assert conn.phase is Phase.DEVLIST_PENDING
    assert conn.next_event() is NEED_DATA  # nothing parsed while a reply is due
    conn.send(wire.OpRepDevlist(()))
    assert conn.phase.value == Phase.DONE.value
    assert conn.should_close
    conn.receive_data(b"ignored once done")
    assert conn.next_event() is NEED_DATA


def test_import_refused_then_done() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(wire.encode(wire.OpReqImport("9-9")))
    assert conn.next_event() == wire.OpReqImport("9-9")
    data = conn.send(wire.OpRepImport(wire.OpStatus.NODEV))
    assert data == bytes.fromhex("0111 0003 00000004")
    assert conn.should_close
    assert conn.imported_devid is None


def test_import_then_urbs_pipelined() -> None:
    conn = UsbipServerConnection()
    # The client may send URBs right behind the import request: they wait for the reply.
    conn.receive_data(wire.encode(wire.OpReqImport("3-2")) + wire.encode(submit_in()))
    assert conn.next_event() == wire.OpReqImport("3-2")
    assert conn.next_event() is NEED_DATA
    conn.send(IMPORT_OK)
    assert conn.next_event() == submit_in()


def test_send_not_allowed_is_local_error() -> None:
    conn = UsbipServerConnection()
    with pytest.raises(UsbipLocalError):
        conn.send(wire.RetSubmit(1, 0, 0))
    with pytest.raises(UsbipLocalError):
        imported().send(IMPORT_OK)


def test_eof_at_boundary() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    assert conn.should_close
    assert conn.next_event() is NEED_DATA
    conn = imported()
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed()
    with pytest.raises(UsbipLocalError):
        conn.receive_data(b"x")


def test_eof_while_reply_pending() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(wire.encode(wire.OpReqDevlist()))
    conn.receive_data(b"")
    assert conn.next_event() == wire.OpReqDevlist()
    assert conn.next_event() is NEED_DATA
    conn.send(wire.OpRepDevlist(()))
    assert conn.should_close


# --- bad input, one test each -------------------------------------------------------------


def test_wrong_version() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(bytes.fromhex("0106 8005 00000000"))
    with pytest.raises(UsbipRemoteError):
        conn.next_event()
    assert conn.phase is Phase.ERROR
    assert conn.should_close
    with pytest.raises(UsbipRemoteError):
        conn.next_event()
    conn.receive_data(b"more")  # ignored, no growth


@pytest.mark.parametrize("code", [0x8002, 0x8004, 0x8006, 0x0005, 0x0003, 0xFFFF])
def test_unknown_op_code(code: int) -> None:
    conn = UsbipServerConnection()
    conn.receive_data(bytes.fromhex("0111") + code.to_bytes(2, "big") + bytes(4))
    with pytest.raises(UsbipRemoteError, match="op code"):
        conn.next_event()


@pytest.mark.parametrize(
    "stream",
    [
        wire.encode(wire.OpReqDevlist())[:5],
        wire.encode(wire.OpReqImport("1-1"))[:20],
    ],
)
def test_op_header_cut_off_at_eof(stream: bytes) -> None:
    conn = UsbipServerConnection()
    conn.receive_data(stream)
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(UsbipRemoteError, match="middle"):
        conn.next_event()


@pytest.mark.parametrize("cut", [1, 47, 48, 48 + 99])
def test_urb_cut_off_at_eof(cut: int) -> None:
    conn = imported()
    conn.receive_data(wire.encode(submit_out(1, bytes(100)))[:cut])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(b"")
    with pytest.raises(UsbipRemoteError, match="middle"):
        conn.next_event()


@pytest.mark.parametrize("direction", list(wire.Direction))
def test_transfer_length_over_cap(direction: wire.Direction) -> None:
    conn = imported()
    cmd = wire.CmdSubmit(1, DEVID, direction, 1, MAX_TRANSFER_LENGTH + 1)
    header = wire.encode(cmd if direction == wire.Direction.IN else submit_in(1, 1, 0))[:48]
    if direction == wire.Direction.OUT:
        header = (
            header[:12]
            + bytes(4)
            + header[16:24]
            + (MAX_TRANSFER_LENGTH + 1).to_bytes(4, "big")
            + header[28:]
        )
    conn.receive_data(header)  # only the header: the payload is never awaited
    with pytest.raises(UsbipRemoteError, match="cap"):
        conn.next_event()


def test_transfer_length_at_cap_is_fine() -> None:
    conn = UsbipServerConnection(max_transfer_length=16)
    conn.receive_data(wire.encode(wire.OpReqImport("3-2")))
    drain(conn)
    conn.receive_data(wire.encode(submit_out(1, bytes(16))))
    assert conn.next_event() == submit_out(1, bytes(16))


def test_buffer_cap() -> None:
    conn = UsbipServerConnection(max_transfer_length=16, max_buffer=100)
    conn.receive_data(bytes(100))
    with pytest.raises(UsbipRemoteError, match="buffered"):
        conn.receive_data(b"x")


@pytest.mark.parametrize(
    "cmd", [submit_in(devid=DEVID_1_1 + 1), wire.CmdUnlink(2, 0, wire.Direction.OUT, 0, 1)]
)
def test_devid_not_imported_closes(cmd: wire.CmdSubmit | wire.CmdUnlink) -> None:
    # stub_rx.c valid_request(): a PDU for another devid is a fatal TCP error.
    conn = imported()
    conn.receive_data(wire.encode(cmd))
    with pytest.raises(UsbipRemoteError, match="devid"):
        conn.next_event()
    assert conn.should_close


@pytest.mark.parametrize("reply", [wire.RetSubmit(1, 0, 0), wire.RetUnlink(1, 0)])
def test_client_may_not_send_replies(reply: wire.RetSubmit | wire.RetUnlink) -> None:
    conn = imported()
    conn.receive_data(wire.encode(reply))
    with pytest.raises(UsbipRemoteError, match="may not send"):
        conn.next_event()


def test_endpoint_number_out_of_range() -> None:
    conn = imported()
    conn.receive_data(wire.encode(submit_in(ep=16)))
    with pytest.raises(UsbipRemoteError, match="endpoint"):
        conn.next_event()


def test_unknown_urb_command() -> None:
    conn = imported()
    conn.receive_data(bytes.fromhex("00000007") + bytes(44))
    with pytest.raises(UsbipRemoteError, match="unknown USB/IP command"):
        conn.next_event()


# --- chunking invariance ------------------------------------------------------------------

STREAM_MESSAGES: list[wire.Message] = [
    wire.OpReqImport("3-2"),
    wire.CmdSubmit(1, DEVID, wire.Direction.IN, 0, 18, setup=SetupPacket(0x80, 6, 0x100, 0, 18)),
    submit_out(2, b"hello world"),
    submit_in(3),
    submit_out(4, b""),
    wire.CmdUnlink(5, DEVID, wire.Direction.OUT, 0, 3),
    submit_out(6, bytes(range(200))),
]
STREAM = b"".join(wire.encode(m) for m in STREAM_MESSAGES)
EXPECTED_EVENTS: list[Event] = [m for m in STREAM_MESSAGES if not isinstance(m, wire.OpRepImport)]  # type: ignore[misc]


def feed_chunks(chunks: list[bytes]) -> list[Event]:
    conn = UsbipServerConnection()
    events: list[Event] = []
    for chunk in chunks:
        if chunk:  # b"" would mean EOF
            conn.receive_data(chunk)
            events += drain(conn)
    conn.receive_data(b"")
    events += drain(conn)
    return events


def test_split_at_every_byte_boundary() -> None:
    expected = [*EXPECTED_EVENTS, ConnectionClosed()]
    for i in range(len(STREAM) + 1):
        assert feed_chunks([STREAM[:i], STREAM[i:]]) == expected, i


def test_byte_by_byte() -> None:
    assert feed_chunks([STREAM[i : i + 1] for i in range(len(STREAM))]) == [
        *EXPECTED_EVENTS,
        ConnectionClosed(),
    ]


@settings(max_examples=100)
@given(st.lists(st.integers(0, len(STREAM)), max_size=12))
def test_split_anywhere(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in itertools.pairwise(points)]
    assert feed_chunks(chunks) == [*EXPECTED_EVENTS, ConnectionClosed()]


# --- garbage contract ---------------------------------------------------------------------

PREFIXES = [b"", wire.encode(wire.OpReqImport("3-2")), wire.encode(wire.OpReqDevlist())]


@settings(max_examples=200)
@given(
    st.sampled_from(PREFIXES),
    st.lists(st.binary(max_size=80), max_size=6),
    st.booleans(),
)
def test_garbage_yields_events_or_remote_error(
    prefix: bytes, chunks: list[bytes], eof: bool
) -> None:
    conn = UsbipServerConnection(max_transfer_length=256, max_buffer=2048)
    try:
        for chunk in [prefix, *chunks]:
            if chunk:  # b"" would mean EOF
                conn.receive_data(chunk)
                drain(conn)
        if eof:
            conn.receive_data(b"")
            drain(conn)
    except UsbipRemoteError:
        assert conn.should_close


@settings(max_examples=200)
@given(st.lists(st.binary(min_size=1, max_size=60), max_size=6))
def test_garbage_after_valid_urb_headers(chunks: list[bytes]) -> None:
    # Header-shaped garbage: a valid CMD header with random fields exercises deeper paths.
    conn = imported()
    try:
        for chunk in chunks:
            head = wire.encode(submit_in(1))[:8] + DEVID.to_bytes(4, "big")
            conn.receive_data(head + chunk)
            drain(conn)
        conn.receive_data(b"")
        drain(conn)
    except UsbipRemoteError:
        assert conn.should_close


def test_eof_right_behind_pipelined_urbs() -> None:
    conn = UsbipServerConnection()
    conn.receive_data(wire.encode(wire.OpReqImport("3-2")) + wire.encode(submit_in()))
    conn.receive_data(b"")
    assert conn.next_event() == wire.OpReqImport("3-2")
    assert conn.next_event() is NEED_DATA  # still waiting for our reply
    conn.send(IMPORT_OK)
    assert conn.next_event() == submit_in()
    assert conn.next_event() == ConnectionClosed()
