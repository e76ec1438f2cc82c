"""The garbage contract: whatever arrives on the socket, the parser gives messages or a
VpcdError, the connection never raises, and what it sends is whole non-empty frames."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.frontends.vpcd.helpers import run_jobs, split_frames
from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.vpcd.errors import VpcdError
from usbccid.frontends.vpcd.protocol import State, VpcdConnection
from usbccid.frontends.vpcd.wire import Apdu, GetAtr, PowerOff, PowerOn, Reset, parse_message

MESSAGES = (PowerOff, PowerOn, Reset, GetAtr, Apdu)

_frame = st.binary(max_size=300).map(lambda p: len(p).to_bytes(2, "big") + p)
_control = st.integers(0, 255).map(lambda c: b"\x00\x01" + bytes([c]))
_chunk = st.one_of(
    _frame,
    _control,
    _frame.flatmap(lambda f: st.integers(0, len(f)).map(lambda i: f[:i])),
    st.binary(max_size=200),
    st.just(b"\xff\xff"),  # a 64 KiB frame announced
)


@given(st.binary(max_size=400))
def test_the_parser_gives_only_messages_or_the_familys_error(payload: bytes) -> None:
    frame = len(payload).to_bytes(2, "big") + payload
    try:
        message = parse_message(frame)
    except VpcdError:
        return
    assert isinstance(message, MESSAGES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(_chunk, max_size=12),
    blocking=st.booleans(),
    eof=st.booleans(),
    remove_at=st.integers(-1, 12),
)
def test_arbitrary_input_never_raises_and_answers_whole_frames(
    chunks: list[bytes], blocking: bool, eof: bool, remove_at: int
) -> None:
    card = EchoCard(blocking=blocking)
    conn = VpcdConnection(card)
    out = b""
    for index, chunk in enumerate(chunks):
        if index == remove_at:
            conn.remove()
        conn.receive_data(chunk)
        run_jobs(conn)
        out += conn.data_to_send()
        assert len(conn._buffer) <= conn.max_buffer
    if eof:
        conn.receive_data(b"")
        assert conn.should_close
    for payload in split_frames(out):
        assert payload  # never the 0-length "card removed" answer
    if conn.state is State.CLOSED:
        assert conn.close_reason
        assert conn.next_job() is None
