"""The garbage contract: whatever the host sends, only well-formed RDR_to_PC replies come
out, each echoing a bSlot/bSeq the host used, and nothing raises."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.ccid.helpers import BULK_IN, BULK_OUT, INTERRUPT_IN, drive
from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import (
    IccPowerOn,
    XfrBlock,
    build_command,
    notify_slot_change_size,
    parse_notify_slot_change,
    parse_reply,
)

# Chunks that are mostly plausible: valid messages, their prefixes and suffixes, headers
# with wild dwLength, and raw noise.
_valid = st.one_of(
    st.builds(lambda s, q: build_command(IccPowerOn(s, q)), st.integers(0, 3), st.integers(0, 255)),
    st.builds(
        lambda s, q, d, w: build_command(XfrBlock(s, q, d, level_parameter=w)),
        st.integers(0, 3),
        st.integers(0, 255),
        st.binary(max_size=400),
        st.sampled_from([0, 1, 2, 3, 0x10, 7]),
    ),
    st.builds(
        lambda t, s, q, d: bytes([t]) + len(d).to_bytes(4, "little") + bytes([s, q]) + d[:3] + d,
        st.integers(0x60, 0x75),
        st.integers(0, 3),
        st.integers(0, 255),
        st.binary(max_size=20),
    ),
)
_chunk = st.one_of(
    _valid,
    _valid.flatmap(lambda m: st.integers(0, len(m)).map(lambda i: m[:i])),
    _valid.flatmap(lambda m: st.integers(0, len(m)).map(lambda i: m[i:])),
    st.binary(max_size=200),
    st.just(bytes(64)),
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    chunks=st.lists(_chunk, max_size=12),
    max_message_length=st.sampled_from([271, 300, 65554]),
    read_sizes=st.lists(st.sampled_from([1, 10, 64, 65556]), min_size=1, max_size=4),
)
def test_arbitrary_bulk_out_gives_only_valid_replies(
    chunks: list[bytes], max_message_length: int, read_sizes: list[int]
) -> None:
    reader = CcidReader(
        [EchoCard(), None], config=ReaderConfig(max_message_length=max_message_length)
    )
    stream = b""
    for index, chunk in enumerate(chunks):
        reader.bulk_out(BULK_OUT, chunk)
        drive(reader, float(index))
        reader.handle_timer(float(index) + 5)
        size = read_sizes[index % len(read_sizes)]
        while (piece := reader.poll_in(BULK_IN, size)) is not None:
            assert 0 < len(piece) <= size
            stream += piece
    while (piece := reader.poll_in(BULK_IN, 65556)) is not None:
        stream += piece
    # the IN stream is a sequence of whole RDR_to_PC messages
    while stream:
        assert len(stream) >= 10
        length = int.from_bytes(stream[1:5], "little")
        message, stream = stream[: 10 + length], stream[10 + length :]
        reply = parse_reply(message)
        assert reply.slot <= 255
    notice = reader.poll_in(INTERRUPT_IN, 8)
    assert notice is None or len(notice) == notify_slot_change_size(2)
    if notice is not None:
        parse_notify_slot_change(notice, 2)
