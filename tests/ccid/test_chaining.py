"""Extended-APDU chaining (CCID Rev 1.1 §6.1.4 wLevelParameter, §6.2.1 bChainParameter),
driven the way libccid 1.5.2 commands.c CmdXfrBlockAPDU_extended does it."""

from __future__ import annotations

import pytest

from tests.ccid.helpers import (
    INTERRUPT_IN,
    Seq,
    block,
    drain,
    drive,
    exchange,
    read,
    read_reply,
    send,
)
from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.errors import CommandStatus, IccStatus, SlotError
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import DataBlock, IccPowerOff, IccPowerOn, XfrBlock


def libccid_transmit(
    reader: CcidReader, apdu: bytes, seq: Seq, max_message_length: int
) -> tuple[bytes, list[int], list[int]]:
    """CmdXfrBlockAPDU_extended: returns (response, wLevelParameters sent, bChainParameters
    received)."""
    block_size = max_message_length - 10
    levels: list[int] = []
    chains: list[int] = []
    # send the APDU: one block (00h), or 01h, 03h..., 02h with a nul block read after each
    # block but the last
    chain = 0x00
    block = apdu
    if len(apdu) > block_size:
        chain, block = 0x01, apdu[:block_size]
    sent = 0
    while True:
        levels.append(chain)
        send(reader, XfrBlock(0, seq(), block, level_parameter=chain))
        drive(reader)
        sent += len(block)
        if chain in (0x00, 0x02):
            break
        nul = read_reply(reader)  # CCID_Receive(..., NULL, NULL): must be empty
        assert isinstance(nul, DataBlock)
        assert nul.command_status is CommandStatus.OK
        assert nul.data == b""
        assert nul.chain_parameter == 0x10
        rest = apdu[sent:]
        if len(rest) > block_size:
            chain, block = 0x03, rest[:block_size]
        else:
            chain, block = 0x02, rest
    # receive: while bChainParameter is 01h, 03h or 10h send an empty XfrBlock 0010h
    response = b""
    while True:
        reply = read_reply(reader)
        assert isinstance(reply, DataBlock)
        assert reply.seq == seq.history[-1]
        assert reply.command_status is CommandStatus.OK
        assert len(reply.data) <= block_size  # never over dwMaxCCIDMessageLength
        response += reply.data
        chains.append(reply.chain_parameter)
        if reply.chain_parameter in (0x00, 0x02):
            break
        levels.append(0x10)
        send(reader, XfrBlock(0, seq(), b"", level_parameter=0x10))
        drive(reader)
    assert read(reader) is None
    return response, levels, chains


def small_reader(max_message_length: int = 271) -> tuple[CcidReader, EchoCard, Seq]:
    card = EchoCard()
    reader = CcidReader([card], config=ReaderConfig(max_message_length=max_message_length))
    reader.poll_in(INTERRUPT_IN, 8)
    seq = Seq()
    assert exchange(reader, IccPowerOn(0, seq())).command_status is CommandStatus.OK
    return reader, card, seq


def echo(data: bytes) -> bytes:
    return bytes([0x80, 0x10, 0, 0, 0]) + len(data).to_bytes(2, "big") + data


def test_chained_command_and_chained_response() -> None:
    reader, card, seq = small_reader(271)
    payload = bytes(i & 0xFF for i in range(600))
    apdu = echo(payload)  # 607 bytes: 261 + 261 + 85
    response, levels, chains = libccid_transmit(reader, apdu, seq, 271)
    assert card.commands == [apdu]  # the card saw one whole APDU
    assert response == payload + b"\x90\x00"
    assert levels == [0x01, 0x03, 0x02, 0x10, 0x10]
    assert chains == [0x01, 0x03, 0x02]


@pytest.mark.parametrize(
    ("response_length", "chains"),
    [
        (261, [0x00]),
        (262, [0x01, 0x02]),
        (522, [0x01, 0x02]),
        (523, [0x01, 0x03, 0x02]),
    ],
)
def test_response_block_boundaries(response_length: int, chains: list[int]) -> None:
    reader, _, seq = small_reader(271)
    n = response_length - 2
    response, _, got = libccid_transmit(reader, bytes([0x80, 0x12, n >> 8, n & 0xFF]), seq, 271)
    assert len(response) == response_length
    assert got == chains


@pytest.mark.parametrize("apdu_length", [261, 262, 522, 523, 5000])
def test_command_block_boundaries(apdu_length: int) -> None:
    reader, card, seq = small_reader(271)
    apdu = echo(bytes(apdu_length - 7))
    response, levels, _ = libccid_transmit(reader, apdu, seq, 271)
    assert card.commands == [apdu]
    assert response == bytes(apdu_length - 7) + b"\x90\x00"
    if apdu_length <= 261:
        assert levels[0] == 0x00


def test_4k_response_through_the_default_reader_needs_no_chaining() -> None:
    reader, _, seq = small_reader(65554)
    response, levels, chains = libccid_transmit(reader, bytes([0x80, 0x12, 0x10, 0x00]), seq, 65554)
    assert len(response) == 4096 + 2
    assert levels == [0x00]
    assert chains == [0x00]


@pytest.mark.parametrize(
    ("level", "data", "error"),
    [
        (0x0002, b"\x00\x01", SlotError.BAD_PARAMETER_8),  # "ends" with nothing begun
        (0x0003, b"\x00\x01", SlotError.BAD_PARAMETER_8),  # "continues" with nothing begun
        (0x0010, b"", SlotError.BAD_PARAMETER_8),  # next block of no response
        (0x0004, b"\x00", SlotError.BAD_PARAMETER_8),  # not a wLevelParameter value
        (0x0100, b"\x00", SlotError.BAD_PARAMETER_8),
    ],
)
def test_chaining_out_of_order(level: int, data: bytes, error: int) -> None:
    reader, card, seq = small_reader(271)
    reply = exchange(reader, XfrBlock(0, seq(), data, level_parameter=level))
    assert isinstance(reply, DataBlock)
    assert (reply.command_status, reply.error, reply.icc_status) == (
        CommandStatus.FAILED,
        error,
        IccStatus.ACTIVE,
    )
    assert card.commands == []


def test_continuation_request_with_data_is_a_length_error() -> None:
    reader, _, seq = small_reader(271)
    send(reader, XfrBlock(0, seq(), bytes([0x80, 0x12, 0x02, 0x00])))
    drive(reader)
    assert block(read_reply(reader)).chain_parameter == 0x01
    reply = exchange(reader, XfrBlock(0, seq(), b"x", level_parameter=0x10))
    assert reply.error == SlotError.BAD_LENGTH


def test_new_command_abandons_a_pending_response() -> None:
    reader, card, seq = small_reader(271)
    send(reader, XfrBlock(0, seq(), bytes([0x80, 0x12, 0x02, 0x00])))
    drive(reader)
    assert block(read_reply(reader)).chain_parameter == 0x01
    assert exchange(reader, XfrBlock(0, seq(), bytes.fromhex("80100000 01 AA"))) == DataBlock(
        0, seq.history[-1], IccStatus.ACTIVE, data=b"\xaa\x90\x00"
    )
    reply = exchange(reader, XfrBlock(0, seq(), b"", level_parameter=0x10))
    assert reply.error == SlotError.BAD_PARAMETER_8  # the old rest is gone
    assert len(card.commands) == 2


def test_power_off_drops_a_half_sent_command() -> None:
    reader, card, seq = small_reader(271)
    reply = exchange(reader, XfrBlock(0, seq(), b"\x80\x10\x00\x00", level_parameter=0x01))
    assert block(reply).chain_parameter == 0x10
    exchange(reader, IccPowerOff(0, seq()))
    exchange(reader, IccPowerOn(0, seq()))
    reply = exchange(reader, XfrBlock(0, seq(), b"\x01", level_parameter=0x02))
    assert reply.error == SlotError.BAD_PARAMETER_8
    assert card.commands == []
    assert drain(reader) == []


def test_chained_command_longer_than_any_apdu() -> None:
    reader, card, seq = small_reader(271)
    reply = exchange(reader, XfrBlock(0, seq(), bytes(261), level_parameter=0x01))
    assert block(reply).chain_parameter == 0x10
    while True:
        reply = exchange(reader, XfrBlock(0, seq(), bytes(261), level_parameter=0x03))
        if reply.command_status is CommandStatus.FAILED:
            break
        assert block(reply).chain_parameter == 0x10
    assert reply.error == SlotError.BAD_LENGTH
    # the chain is gone: its end is out of order now
    reply = exchange(reader, XfrBlock(0, seq(), b"\x00", level_parameter=0x02))
    assert reply.error == SlotError.BAD_PARAMETER_8
    assert card.commands == []
