"""The byte stream: split anywhere it means the same; garbage gets only the layer's
errors (and their answers), never anything else, and memory stays bounded."""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.frontends.vscard.helpers import OK, Host, split_messages
from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.client import (
    MAX_PAYLOAD,
    Answered,
    ApduAnswered,
    CardInserted,
    CardRefused,
    CardRemoved,
    Closed,
    HostInit,
    Ignored,
    ReaderAdded,
    VscardClient,
)
from usbccid.frontends.vscard.errors import VscardError

R0 = wire.MINIMAL_READER_ID
EVENT_TYPES = (
    HostInit,
    ReaderAdded,
    CardInserted,
    CardRefused,
    CardRemoved,
    ApduAnswered,
    Answered,
    Ignored,
    Closed,
)
#: What a client may send (vscard_common.h directions).
CLIENT_MESSAGES = (
    wire.Init,
    wire.Error,
    wire.ReaderAdd,
    wire.ReaderRemove,
    wire.Atr,
    wire.CardRemove,
    wire.Apdu,
    wire.FlushComplete,
)

HANDSHAKE = b"".join(wire.encode(m) for m in (wire.Init(), wire.Error(OK, R0), wire.Error(OK, R0)))
TRAFFIC = b"".join(
    wire.encode(m)
    for m in (
        wire.Apdu(bytes.fromhex("8010000003010203"), R0),
        wire.Apdu(bytes.fromhex("801200ff"), R0),
        wire.Flush(R0),
        wire.Apdu(b"", R0),
        wire.Apdu(bytes.fromhex("80120200"), R0),  # too long: Error
        wire.Apdu(bytes.fromhex("8010000003010203"), 9),  # another reader: Error
        wire.Init(),  # ignored
        wire.Error(OK, R0),  # unsolicited: ignored
        wire.Apdu(bytes.fromhex("00a4040002a0b0"), R0),
    )
)


def _feed(chunks: list[bytes], host: Host) -> bytes:
    for chunk in chunks:
        if chunk:  # b"" would be EOF
            host.client.receive_data(chunk)
        host.run_jobs()
    return host.client.data_to_send()


def _inserted_host() -> Host:
    host = Host(EchoCard())
    host.handshake()
    assert host.client.state.value == "inserted"
    host.events()
    return host


def test_handshake_split_at_every_byte() -> None:
    reference = _feed([HANDSHAKE], Host(EchoCard()))
    assert len(split_messages(reference)) == 4  # Init, ReaderRemove, ReaderAdd, ATR
    for cut in range(len(HANDSHAKE) + 1):
        assert _feed([HANDSHAKE[:cut], HANDSHAKE[cut:]], Host(EchoCard())) == reference, cut
    assert _feed([HANDSHAKE[i : i + 1] for i in range(len(HANDSHAKE))], Host(EchoCard())) == (
        reference
    )


def test_traffic_split_at_every_byte() -> None:
    reference = _feed([TRAFFIC], _inserted_host())
    kinds = [type(m).__name__ for m in split_messages(reference)]
    assert kinds == ["Apdu", "Apdu", "FlushComplete", "Apdu", "Error", "Error", "Apdu"]
    for cut in range(len(TRAFFIC) + 1):
        assert _feed([TRAFFIC[:cut], TRAFFIC[cut:]], _inserted_host()) == reference, cut
    one_by_one = [TRAFFIC[i : i + 1] for i in range(len(TRAFFIC))]
    assert _feed(one_by_one, _inserted_host()) == reference


@given(st.lists(st.integers(0, len(TRAFFIC)), max_size=12))
def test_traffic_in_any_chunks(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(TRAFFIC)]
    chunks = [TRAFFIC[a:b] for a, b in itertools.pairwise(points)]
    assert _feed(chunks, _inserted_host()) == _feed([TRAFFIC], _inserted_host())


def _check(client: VscardClient, out: bytearray, max_payload: int = MAX_PAYLOAD) -> None:
    for event in client.events():
        assert isinstance(event, EVENT_TYPES), event
    assert client.buffered <= wire.HEADER_SIZE + max_payload
    out += client.data_to_send()


def _garbage_run(prefix_handshake: bool, chunks: list[bytes]) -> None:
    host = Host(EchoCard())
    if prefix_handshake:
        host.handshake()
    out = bytearray()
    received_apdus = 0
    for chunk in chunks:
        try:
            host.client.receive_data(chunk)
        except VscardError:
            assert host.client.should_close
        host.run_jobs()
        _check(host.client, out)
        if host.client.should_close:
            break
    messages = split_messages(bytes(out))
    for m in messages:
        assert isinstance(m, CLIENT_MESSAGES), m
    sent_apdus = sum(isinstance(m, wire.Apdu) for m in messages)
    received_apdus = sum(chunk.count(b"\x00\x00\x00\x07") for chunk in chunks)
    assert sent_apdus <= max(received_apdus, 0) or not sent_apdus


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(st.booleans(), st.lists(st.binary(max_size=64), max_size=20))
def test_raw_garbage(prefix_handshake: bool, chunks: list[bytes]) -> None:
    _garbage_run(prefix_handshake, chunks)


def _framed(kind: int, reader_id: int, payload: bytes) -> bytes:
    return (
        kind.to_bytes(4, "big") + reader_id.to_bytes(4, "big") + len(payload).to_bytes(4, "big")
    ) + payload


FRAMED = st.builds(
    _framed,
    st.one_of(st.integers(0, 12), st.integers(0, 0xFFFFFFFF)),
    st.sampled_from([0, 1, 0xFFFFFFFF]),
    st.one_of(
        st.binary(max_size=16),
        st.just(b"VSCD\x00\x00\x00\x02\x00\x00\x00\x00"),
        st.just(b"\x00\x00\x00\x00"),
        st.just(bytes.fromhex("8010000003010203")),
    ),
)


@settings(suppress_health_check=[HealthCheck.too_slow])
@given(
    st.booleans(),
    st.lists(st.one_of(FRAMED, st.sampled_from([b"insert", b"remove", b"leave"])), max_size=30),
)
def test_framed_garbage_with_card_events(prefix_handshake: bool, items: list[bytes]) -> None:
    """Well-framed messages of any type (the table's paths), mixed with insertions and
    removals: only events, or the layer's error once."""
    host = Host(EchoCard())
    if prefix_handshake:
        host.handshake()
    out = bytearray()
    for item in items:
        fatal = None
        try:
            if item == b"insert":
                host.client.insert(EchoCard())
            elif item == b"remove":
                host.client.remove()
            elif item == b"leave":
                host.client.leave()
            else:
                host.client.receive_data(item)
        except VscardError as e:
            fatal = e
        if fatal is not None:
            assert fatal.close, fatal
            assert host.client.should_close
        host.run_jobs()
        _check(host.client, out)
    for m in split_messages(bytes(out)):
        assert isinstance(m, CLIENT_MESSAGES), m


def test_payload_bound_is_checked_before_buffering() -> None:
    host = Host(EchoCard(), max_payload=1000)
    host.handshake()
    host.client.receive_data(_framed(7, 0, b"")[:8] + (1000).to_bytes(4, "big") + bytes(999))
    assert host.client.buffered == 12 + 999  # within the bound: held
    host.client.receive_data(b"\x00")
    assert host.client.buffered == 0
    try:
        host.client.receive_data(_framed(7, 0, b"")[:8] + (1001).to_bytes(4, "big"))
    except VscardError:
        pass
    else:
        raise AssertionError("a payload over the bound was accepted")
    assert host.client.buffered == 0
