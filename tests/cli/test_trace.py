"""APDU traces never show PINs or key-operation data."""

from __future__ import annotations

import logging

import pytest

from usbccid.tool.trace import Redactor, TracingCard

PIN = bytes.fromhex("3132333435363738")  # "12345678"


def test_verify_pin_is_redacted() -> None:
    r = Redactor()
    line = r.command(bytes.fromhex("00200080") + b"\x08" + PIN)
    assert line == "00 20 00 80 08 [8 bytes redacted]"
    assert r.response(bytes.fromhex("9000")) == "90 00"


@pytest.mark.parametrize("ins", [0x20, 0x24, 0x2C])
def test_pin_commands(ins: int) -> None:
    apdu = bytes([0x00, ins, 0x00, 0x80, 16]) + PIN + PIN
    line = Redactor().command(apdu)
    assert "31 32" not in line
    assert "[16 bytes redacted]" in line


def test_sign_decrypt_and_its_get_response_are_redacted() -> None:
    r = Redactor()
    data = bytes(range(200))
    line = r.command(bytes.fromhex("80420000") + bytes([len(data)]) + data + b"\x00")
    assert line == "80 42 00 00 c8 [200 bytes redacted] 00"
    assert r.response(bytes(range(100)) + bytes.fromhex("6150")) == "[100 bytes redacted] 61 50"
    r.command(bytes.fromhex("00c0000050"))
    assert r.response(bytes(0x50) + bytes.fromhex("9000")) == "[80 bytes redacted] 90 00"
    # after the chain: GET RESPONSE of something else is shown
    r.command(bytes.fromhex("00c0000002"))
    assert r.response(bytes.fromhex("01029000")) == "01 02 90 00"


def test_extended_length_and_other_commands() -> None:
    r = Redactor()
    data = bytes(300)
    line = r.command(
        bytes.fromhex("0087000000") + len(data).to_bytes(2, "big") + data + b"\x00\x00"
    )
    assert line == "00 87 00 00 00 01 2c [300 bytes redacted] 00 00"
    select = bytes.fromhex("00a4040007a000000079010000")
    assert r.command(select) == select.hex(" ")
    assert r.response(bytes.fromhex("6f009000")) == "6f 00 90 00"
    assert "malformed" in r.command(b"\x00\x20")


def test_tracing_card_logs(caplog: pytest.LogCaptureFixture) -> None:
    class Card:
        blocking = False

        def power_on(self) -> bytes:
            return bytes.fromhex("3b00")

        def power_off(self) -> None:
            pass

        def transmit(self, command: bytes) -> bytes:
            return bytes.fromhex("9000")

    card = TracingCard(Card(), "desk/0")
    with caplog.at_level(logging.INFO, logger="usbccid.tool.trace"):
        assert card.power_on() == bytes.fromhex("3b00")
        card.transmit(bytes.fromhex("00200080") + b"\x08" + PIN)
        card.power_off()
    text = caplog.text
    assert "desk/0 ATR 3b 00" in text
    assert "desk/0 > 00 20 00 80 08 [8 bytes redacted]" in text
    assert "31 32 33" not in text
    assert not card.blocking


def test_keyed_apdus_are_redacted_whatever_the_instruction(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An APDU built by the PIN pad (PC_to_RDR_Secure) carries digits typed on the keypad:
    its data is redacted even when its INS is not one of the PIN instructions."""
    r = Redactor()
    assert (
        r.keyed_command(bytes.fromhex("0020000008") + PIN)
        == "00 20 00 00 08 [8 bytes keyed on the PIN pad, redacted]"
    )
    proprietary = bytes.fromhex("80ee0000") + b"\x04" + PIN[:4]
    assert r.command(proprietary) == proprietary.hex(" ")  # an ordinary one would show
    assert r.keyed_command(proprietary) == "80 ee 00 00 04 [4 bytes keyed on the PIN pad, redacted]"
    assert r.response(bytes.fromhex("63c2")) == "63 c2"
    assert r.keyed_command(b"\x31\x32") == "[2 bytes keyed on the PIN pad, redacted]"

    from usbccid.card import transmit_keyed
    from usbccid.ccid.testcard import EchoCard
    from usbccid.tool.trace import CountingCard

    counters: dict[str, int] = {}
    card = TracingCard(CountingCard(EchoCard(), counters), "desk/0")
    with caplog.at_level(logging.INFO, logger="usbccid.tool.trace"):
        response = transmit_keyed(card, bytes.fromhex("80100000") + b"\x08" + PIN)
    assert response == PIN + b"\x90\x00"  # the echo card saw the digits
    lines = [rec.getMessage() for rec in caplog.records]
    assert lines == [
        "desk/0 > 80 10 00 00 08 [8 bytes keyed on the PIN pad, redacted]",
        "desk/0 < [8 bytes redacted] 90 00",  # the response's data too: it could echo
    ]
    assert counters == {"apdus": 1, "pinpad_entries": 1}
