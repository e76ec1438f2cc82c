"""ISO 7816-4 §5.1 APDU cases: strict parsing, round trips, status word constructors."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.cac.apdu import CommandApdu, ResponseApdu
from usbccid.cac.errors import ApduFormatError, CardError
from usbccid.cac.sw import SW, bytes_remaining, verify_failed, wrong_le


@pytest.mark.parametrize(
    ("raw", "case", "data", "ne"),
    [
        ("00 20 00 00", "1", b"", None),
        ("00 84 00 00 08", "2S", b"", 8),
        ("00 C0 00 00 00", "2S", b"", 256),
        ("00 A4 04 00 02 3F 00", "3S", b"\x3f\x00", None),
        ("00 52 00 00 02 01 02 02", "4S", b"\x01\x02", 2),
        ("00 42 00 00 01 AA 00", "4S", b"\xaa", 256),
        ("00 C0 00 00 00 01 02", "2E", b"", 258),
        ("00 C0 00 00 00 00 00", "2E", b"", 65536),
        ("00 42 00 00 00 00 02 AA BB", "3E", b"\xaa\xbb", None),
        ("00 42 00 00 00 00 01 AA 00 00", "4E", b"\xaa", 65536),
        ("00 42 00 00 00 00 01 AA 02 02", "4E", b"\xaa", 514),
    ],
)
def test_parse_each_case(raw: str, case: str, data: bytes, ne: int | None) -> None:
    apdu = CommandApdu.parse(bytes.fromhex(raw))
    assert (apdu.case, apdu.data, apdu.ne) == (case, data, ne)
    assert apdu.encode() == bytes.fromhex(raw)


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "00",
        "00 A4 04",
        "00 A4 04 00 02 3F",  # Lc says 2, one byte follows: never zero-padded
        "00 A4 04 00 02 3F 00 00 00",  # two bytes too many
        "00 A4 04 00 00 01",  # 00 then one byte: neither 2E nor 3E
        "00 42 00 00 00 00 00 AA",  # extended Lc of zero
        "00 42 00 00 00 00 03 AA BB",  # extended body too short
        "00 42 00 00 00 00 01 AA 00",  # 4E with a 1-byte Le
    ],
)
def test_malformed_is_6700(raw: str) -> None:
    with pytest.raises(ApduFormatError) as exc:
        CommandApdu.parse(bytes.fromhex(raw))
    assert exc.value.sw == SW.WRONG_LENGTH
    assert isinstance(exc.value, CardError)


def test_local_misuse_is_value_error() -> None:
    with pytest.raises(ValueError, match="range"):
        CommandApdu(0x100, 0, 0, 0)
    with pytest.raises(ValueError, match="too long"):
        CommandApdu(0, 0, 0, 0, bytes(256))
    with pytest.raises(ValueError, match="ne out of range"):
        CommandApdu(0, 0, 0, 0, ne=257)
    with pytest.raises(ValueError, match="case 1"):
        CommandApdu(0, 0, 0, 0, extended=True)


def test_chained_bit() -> None:
    assert CommandApdu(0x10, 0x42, 0, 0, b"x").chained
    assert not CommandApdu(0x00, 0x42, 0, 0, b"x").chained
    assert CommandApdu(0x90, 0x42, 0, 0, b"x").chained


@st.composite
def command_apdus(draw: st.DrawFn) -> CommandApdu:
    extended = draw(st.booleans())
    max_nc, max_ne = (65535, 65536) if extended else (255, 256)
    data = draw(st.binary(max_size=min(max_nc, 600)))
    ne = draw(st.none() | st.integers(1, max_ne))
    if extended and not data and ne is None:
        extended = False
    cla, ins, p1, p2 = (draw(st.integers(0, 255)) for _ in range(4))
    return CommandApdu(cla, ins, p1, p2, data=data, ne=ne, extended=extended)


@settings(max_examples=300)
@given(command_apdus())
def test_roundtrip(apdu: CommandApdu) -> None:
    assert CommandApdu.parse(apdu.encode()) == apdu


@settings(max_examples=300)
@given(st.binary(max_size=300))
def test_parse_never_raises_anything_else(raw: bytes) -> None:
    try:
        apdu = CommandApdu.parse(raw)
    except ApduFormatError:
        return
    assert apdu.encode() == raw


def test_response_apdu() -> None:
    r = ResponseApdu.parse(bytes.fromhex("01 02 90 00"))
    assert (r.data, r.sw, r.sw1, r.sw2) == (b"\x01\x02", 0x9000, 0x90, 0x00)
    assert r.encode() == bytes.fromhex("01 02 90 00")
    with pytest.raises(ValueError, match="SW1 SW2"):
        ResponseApdu.parse(b"\x90")


def test_sw_constructors() -> None:
    assert bytes_remaining(13) == 0x610D
    assert bytes_remaining(256) == 0x6100
    assert bytes_remaining(1000) == 0x6100
    assert wrong_le(0x1D) == 0x6C1D
    assert wrong_le(256) == 0x6C00
    assert verify_failed(3) == 0x63C3
    assert verify_failed(0) == 0x63C0
    with pytest.raises(ValueError, match="needs"):
        bytes_remaining(0)
    with pytest.raises(ValueError, match="encodes"):
        wrong_le(0)
    with pytest.raises(ValueError, match="encodes"):
        verify_failed(16)
