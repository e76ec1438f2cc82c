"""The vpcd framing (vsmartcard vpcd.c sendToVICC/recvFromVICC, vpcd.h VPCD_CTRL_*)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from usbccid.frontends.vpcd.errors import VpcdCardError, VpcdProtocolError
from usbccid.frontends.vpcd.wire import (
    FRAME,
    HEADER_SIZE,
    MAX_PAYLOAD,
    VPCD_PORT,
    Apdu,
    GetAtr,
    PowerOff,
    PowerOn,
    Reset,
    build_frame,
    build_message,
    frame_length,
    parse_message,
)


def test_port_is_vpcds() -> None:
    assert VPCD_PORT == 0x8C7B == 35963  # vpcd.h VPCDPORT; reader.conf CHANNELID 0x8C7B


def test_frames_are_big_endian_length_then_payload() -> None:
    assert HEADER_SIZE == 2
    assert build_frame(b"\x90\x00") == b"\x00\x02\x90\x00"
    assert build_frame(bytes(0x1234)) == b"\x12\x34" + bytes(0x1234)
    assert frame_length(b"\x01\x02") == 2 + 0x0102


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"\x00", PowerOff()),
        (b"\x01", PowerOn()),
        (b"\x02", Reset()),
        (b"\x04", GetAtr()),
        (b"\x00\xa4\x04\x00", Apdu(b"\x00\xa4\x04\x00")),
        (b"", Apdu(b"")),  # any length but 1 is an APDU (vpicc VirtualICC.run)
        (b"\x04\x04", Apdu(b"\x04\x04")),  # two bytes: not a control byte
    ],
)
def test_messages(payload: bytes, message: object) -> None:
    frame = len(payload).to_bytes(2, "big") + payload
    assert parse_message(frame) == message
    assert build_message(parse_message(frame)) == frame


@pytest.mark.parametrize("code", [3, 5, 0x80, 0xFF])
def test_unknown_control_bytes_are_a_protocol_error(code: int) -> None:
    with pytest.raises(VpcdProtocolError, match="control byte"):
        parse_message(bytes([0, 1, code]))


def test_answers_vpcd_cannot_take_are_card_errors() -> None:
    with pytest.raises(VpcdCardError, match="removed"):
        build_frame(b"")  # a 0-length answer means "card removed" to vpcd
    assert len(build_frame(bytes(MAX_PAYLOAD))) == 2 + 0xFFFF
    with pytest.raises(VpcdCardError, match="65536 bytes"):
        build_frame(bytes(MAX_PAYLOAD + 1))


def test_a_one_byte_apdu_cannot_be_sent() -> None:
    with pytest.raises(ValueError, match="1-byte APDU"):
        build_message(Apdu(b"\x00"))


@given(st.binary(max_size=600))
def test_the_declaration_round_trips(payload: bytes) -> None:
    frame = FRAME.build({"payload": payload})
    assert FRAME.parse(frame).payload == payload
    assert frame_length(frame) == len(frame)
