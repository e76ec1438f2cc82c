"""The VSCard wire format against vscard_common.h and what QEMU 7.2 puts on the wire."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.errors import VscardLocalError, VscardProtocolError

ALL = [
    wire.Init(),
    wire.Init(wire.make_version(0, 1, 7), (1, 2, 3), reader_id=7),
    wire.Init(capabilities=()),
    wire.Error(0, 0),
    wire.Error(3, 0xFFFFFFFF),
    wire.ReaderAdd(b"usbccid"),
    wire.ReaderAdd(b""),
    wire.ReaderRemove(0),
    wire.Atr(bytes.fromhex("3b 89 00 56 43 41 52 44 5f 4e 53 53")),
    wire.CardRemove(0),
    wire.Apdu(b""),
    wire.Apdu(bytes(65526)),
    wire.Flush(0),
    wire.FlushComplete(0),
    wire.Unknown(0x77, b"\x01\x02", 9),
]


@pytest.mark.parametrize("message", ALL, ids=lambda m: type(m).__name__)
def test_round_trip(message: wire.Message) -> None:
    raw = wire.encode(message)
    assert wire.parse_message(raw) == message
    header = wire.parse_header(raw[: wire.HEADER_SIZE])
    assert header.length == len(raw) - wire.HEADER_SIZE


def test_init_as_qemu_sends_it() -> None:
    """ccid_card_vscard_send_init: type 1, reader 0xFFFFFFFF, 12 bytes: the magic as the
    four bytes "VSCD" (not byte-swapped), htonl(VSCARD_VERSION = 2), one capability 0."""
    raw = bytes.fromhex("00000001 ffffffff 0000000c 56534344 00000002 00000000")
    assert wire.encode(wire.Init()) == raw
    assert wire.parse_message(raw) == wire.Init(2, (0,), b"VSCD", 0xFFFFFFFF)


def test_header_and_numbers_are_big_endian() -> None:
    assert wire.encode(wire.Error(1, 0x01020304)) == bytes.fromhex(
        "00000002 01020304 00000004 00000001"
    )
    assert wire.encode(wire.Apdu(b"\xaa", 0)) == bytes.fromhex("00000007 00000000 00000001 aa")


def test_types_and_codes_match_vscard_common_h() -> None:
    assert [int(t) for t in wire.MsgType] == list(range(1, 10))
    assert [int(c) for c in wire.ErrorCode] == [0, 1, 2, 3]
    assert wire.UNDEFINED_READER_ID == 0xFFFFFFFF
    assert wire.MINIMAL_READER_ID == 0


def test_version_bits() -> None:
    assert wire.VERSION == 2
    assert wire.make_version(1, 0, 0) == 1 << 21
    assert wire.make_version(0, 1, 0) == 1 << 10
    assert wire.split_version(wire.make_version(5, 2047, 1023)) == (5, 2047, 1023)


@pytest.mark.parametrize(
    ("hexdata", "why"),
    [
        ("00000001 00000000 00000006 56534344 0000", "Init shorter than magic + version"),
        ("00000001 00000000 00000009 56534344 00000002 00", "Init with a partial capability"),
        ("00000002 00000000 00000003 000000", "Error of 3 bytes"),
        ("00000002 00000000 00000005 0000000000", "Error of 5 bytes"),
        ("00000008 00000000 00000001 00", "Flush with a payload"),
        ("00000004 00000000 00000002 0000", "ReaderRemove with a payload"),
    ],
)
def test_malformed_payloads(hexdata: str, why: str) -> None:
    with pytest.raises(VscardProtocolError):
        wire.parse_message(bytes.fromhex(hexdata))


def test_building_what_does_not_fit_is_our_bug() -> None:
    with pytest.raises(VscardLocalError):
        wire.encode(wire.Error(1 << 32))
    with pytest.raises(VscardLocalError):
        wire.encode(wire.Init(magic=b"VSC"))
    with pytest.raises(VscardLocalError):
        wire.parse_header(b"\0" * 11)


@given(st.integers(0, 0xFFFFFFFF), st.integers(0, 0xFFFFFFFF), st.binary(max_size=64))
def test_any_framed_message_parses_or_is_a_protocol_error(
    kind: int, reader_id: int, payload: bytes
) -> None:
    raw = (
        kind.to_bytes(4, "big") + reader_id.to_bytes(4, "big") + len(payload).to_bytes(4, "big")
    ) + payload
    try:
        message = wire.parse_message(raw)
    except VscardProtocolError:
        return
    assert message.reader_id == reader_id
    assert wire.encode(message) == raw  # what parses builds back to the same bytes
