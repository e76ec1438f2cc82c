"""CcidReader driven directly as a UsbFunction: messages, framing, libccid's URB patterns."""

from __future__ import annotations

import struct

import pytest

from tests.ccid.helpers import (
    BULK_IN,
    BULK_OUT,
    INTERRUPT_IN,
    INTERRUPT_READ,
    LIBCCID_READ,
    SLOT_STATUS_READ,
    block,
    drain,
    drive,
    exchange,
    parameters,
    read,
    read_reply,
    send,
)
from usbccid.ccid import CcidReader, ReaderConfig, SlotState
from usbccid.ccid.errors import CommandStatus, IccStatus, SlotError
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.ccid.wire import (
    Abort,
    Command,
    DataBlock,
    DataRateAndClockFrequency,
    Escape,
    EscapeReply,
    GetParameters,
    GetSlotStatus,
    IccClock,
    IccPowerOff,
    IccPowerOn,
    Mechanical,
    Parameters,
    Reply,
    ResetParameters,
    Secure,
    SetDataRateAndClockFrequency,
    SetParameters,
    SlotStatus,
    T0Apdu,
    UnknownCommand,
    XfrBlock,
    build_command,
    parse_dwords,
    parse_reply,
)
from usbccid.usbip.errors import Stall
from usbccid.usbip.function import SetupPacket

SELECT = bytes.fromhex("00A4040003A00000")
# ATR of a T=1 card: TD1 = 81 (T=1, TD2 follows), TD2 = 31 (T=1, TA3 TB3), TA3 = FE
# (IFSC 254), TB3 = 45 (BWI 4, CWI 5), one historical byte, TCK.
T1_ATR = bytes.fromhex("3B818131FE4500") + bytes([0x81 ^ 0x81 ^ 0x31 ^ 0xFE ^ 0x45 ^ 0x00])


def echo(data: bytes) -> bytes:
    if len(data) <= 255:
        return bytes([0x80, 0x10, 0, 0, len(data)]) + data
    return bytes([0x80, 0x10, 0, 0, 0]) + len(data).to_bytes(2, "big") + data


def length_apdu(n: int) -> bytes:
    return bytes([0x80, 0x12, n >> 8, n & 0xFF])


def powered(card: EchoCard | None = None, **config: int) -> tuple[CcidReader, EchoCard]:
    card = card or EchoCard()
    reader = CcidReader([card], config=ReaderConfig(**config))  # type: ignore[arg-type]
    reader.poll_in(INTERRUPT_IN, 8)
    reply = exchange(reader, IccPowerOn(0, 0))
    assert reply.command_status is CommandStatus.OK
    return reader, card


def failed(reply: Reply, error: int, icc: IccStatus | None = None) -> bool:
    ok = reply.command_status is CommandStatus.FAILED and reply.error == error
    return ok and (icc is None or reply.icc_status is icc)


# ------------------------------------------------------------------- the messages


def test_power_on_returns_atr_and_every_power_on_is_a_cold_reset() -> None:
    reader, card = powered()
    assert exchange(reader, XfrBlock(0, 1, SELECT)).command_status is CommandStatus.OK
    assert card.selected == b"\xa0\x00\x00"
    reply = exchange(reader, IccPowerOn(0, 2, power_select=1))
    assert reply == DataBlock(0, 2, IccStatus.ACTIVE, data=DEFAULT_ATR)
    assert card.power_on_count == 2
    assert card.selected == b""


def test_power_on_bad_power_select() -> None:
    reader = CcidReader([EchoCard()])
    assert failed(exchange(reader, IccPowerOn(0, 1, power_select=4)), 7, IccStatus.INACTIVE)


def test_power_off_deactivates_the_card() -> None:
    reader, card = powered()
    reply = exchange(reader, IccPowerOff(0, 1))
    assert reply == SlotStatus(0, 1, IccStatus.INACTIVE)
    assert card.power_off_count == 1
    assert exchange(reader, GetSlotStatus(0, 2)) == SlotStatus(0, 2, IccStatus.INACTIVE)


def test_get_slot_status_stays_active_after_power_on() -> None:
    # libccid IFDHICCPresence: "inactive" after it powered the card means "removed".
    reader, _ = powered()
    for seq in range(5):
        assert exchange(reader, GetSlotStatus(0, seq)) == SlotStatus(0, seq, IccStatus.ACTIVE)


def test_get_slot_status_no_card_is_not_a_failure() -> None:
    reader = CcidReader(slots=1)
    assert exchange(reader, GetSlotStatus(0, 4)) == SlotStatus(0, 4, IccStatus.ABSENT)


def test_xfr_block_echo_and_4k_response_in_one_block() -> None:
    reader, card = powered()
    reply = exchange(reader, XfrBlock(0, 1, echo(b"hello")))
    assert reply == DataBlock(0, 1, IccStatus.ACTIVE, data=b"hello\x90\x00")
    reply = exchange(reader, XfrBlock(0, 2, length_apdu(5000)))
    assert isinstance(reply, DataBlock)
    assert reply.chain_parameter == 0
    assert len(reply.data) == 5002
    assert card.commands[-1] == length_apdu(5000)


def test_extended_apdu_both_ways_at_maximum_size() -> None:
    reader, _ = powered()
    payload = bytes(range(256)) * 255 + bytes(255)  # 65535 bytes: Lc = FFFF
    apdu = echo(payload)
    assert len(build_command(XfrBlock(0, 1, apdu))) <= 65554
    reply = exchange(reader, XfrBlock(0, 1, apdu))
    assert isinstance(reply, DataBlock)
    assert reply.data == payload + b"\x90\x00"
    assert reply.chain_parameter == 0


def test_xfr_block_no_card() -> None:
    reader = CcidReader(slots=1)
    reply = exchange(reader, XfrBlock(0, 1, SELECT))
    assert isinstance(reply, DataBlock)
    assert failed(reply, SlotError.ICC_MUTE, IccStatus.ABSENT)
    assert reply.data == b""


def test_xfr_block_unpowered_card() -> None:
    reader = CcidReader([EchoCard()])
    assert failed(exchange(reader, XfrBlock(0, 1, SELECT)), SlotError.ICC_MUTE, IccStatus.INACTIVE)


def test_power_on_no_card() -> None:
    reader = CcidReader(slots=1)
    reply = exchange(reader, IccPowerOn(0, 1))
    assert isinstance(reply, DataBlock)
    assert failed(reply, SlotError.ICC_MUTE, IccStatus.ABSENT)


def test_parameters_t0_card() -> None:
    reader, _ = powered()
    t0_defaults = bytes.fromhex("1100000a00")
    assert exchange(reader, GetParameters(0, 1)) == Parameters(
        0, 1, IccStatus.ACTIVE, protocol_num=0, data=t0_defaults
    )
    new = bytes.fromhex("9600001000")
    assert exchange(reader, SetParameters(0, 2, 0, new)) == Parameters(
        0, 2, IccStatus.ACTIVE, protocol_num=0, data=new
    )
    assert parameters(exchange(reader, GetParameters(0, 3))).data == new
    assert parameters(exchange(reader, ResetParameters(0, 4))).data == t0_defaults
    # T=1 is not in this card's ATR
    reply = exchange(reader, SetParameters(0, 5, 1, bytes.fromhex("1110004d002000")))
    assert failed(reply, SlotError.ICC_PROTOCOL_NOT_SUPPORTED)
    assert isinstance(reply, Parameters)


def test_parameters_t1_card() -> None:
    reader, _ = powered(EchoCard(atr=T1_ATR))
    reply = exchange(reader, GetParameters(0, 1))
    # bmTCCKST1 0x10 (LRC, direct), BWI/CWI from TB3, IFSC from TA3 (CCID §6.1.7)
    assert reply == Parameters(
        0, 1, IccStatus.ACTIVE, protocol_num=1, data=bytes.fromhex("111000450" + "0fe00")
    )


@pytest.mark.parametrize(
    ("protocol", "data", "error"),
    [
        (0, bytes(7), SlotError.BAD_LENGTH),
        (1, bytes(5), SlotError.BAD_LENGTH),
        (2, bytes(5), 7),  # bProtocolNum is at offset 7
        (0x80, bytes(5), 7),
    ],
)
def test_set_parameters_rejects(protocol: int, data: bytes, error: int) -> None:
    reader = CcidReader([EchoCard()])
    reply = exchange(reader, SetParameters(0, 1, protocol, data))
    assert isinstance(reply, Parameters)
    assert failed(reply, error)


def test_parameters_without_card() -> None:
    reader = CcidReader(slots=1)
    assert failed(exchange(reader, GetParameters(0, 1)), SlotError.ICC_MUTE, IccStatus.ABSENT)


@pytest.mark.parametrize(
    ("command", "reply_class"),
    [
        (Escape(0, 1, b"\x6a"), EscapeReply),  # libccid's Gemalto GET_FIRMWARE_FEATURES
        (Escape(0, 1, b"\x1f\x01"), EscapeReply),
        (IccClock(0, 1, 1), SlotStatus),
        (T0Apdu(0, 1, 3, 0, 0), SlotStatus),
        (Secure(0, 1, bytes(20)), DataBlock),
        (Mechanical(0, 1, 1), SlotStatus),
        (UnknownCommand(0, 1, message_type=0x99, data=b"xyz"), SlotStatus),
        (UnknownCommand(0, 1, message_type=0x00), SlotStatus),
    ],
)
def test_not_supported_commands(command: Command, reply_class: type) -> None:
    reader, _ = powered()
    reply = exchange(reader, command)
    assert isinstance(reply, reply_class)
    assert failed(reply, SlotError.CMD_NOT_SUPPORTED, IccStatus.ACTIVE)
    assert reply.seq == 1


def test_never_berror_0xbb() -> None:
    # libccid GEMPC433 / CHERRYXX33 quirk (commands.c CmdPowerOn): 0xBB triggers an escape
    # and a retry. The reader has no such code at all.
    assert 0xBB not in set(SlotError)


def test_set_data_rate_and_clock_frequency() -> None:
    reader, _ = powered()
    request = struct.pack("<II", 8000, 20000)
    reply = exchange(reader, SetDataRateAndClockFrequency(0, 1, request))
    assert reply == DataRateAndClockFrequency(
        0, 1, IccStatus.ACTIVE, clock_frequency=4000, data_rate=10752
    )
    reply = exchange(reader, SetDataRateAndClockFrequency(0, 2, bytes(7)))
    assert isinstance(reply, DataRateAndClockFrequency)  # dwLength stays 8 (§6.2.5)
    assert failed(reply, SlotError.BAD_LENGTH)


@pytest.mark.parametrize("seq", [0, 1, 0x7F, 0xFF])
def test_seq_and_slot_are_echoed(seq: int) -> None:
    reader = CcidReader([None, EchoCard()])
    reply = exchange(reader, GetSlotStatus(1, seq))
    assert (reply.slot, reply.seq) == (1, seq)


def test_bad_slot() -> None:
    reader = CcidReader([EchoCard()])
    for command in (GetSlotStatus(1, 3), IccPowerOn(5, 4), XfrBlock(255, 5, SELECT)):
        reply = exchange(reader, command)
        assert (reply.slot, reply.seq) == (command.slot, command.seq)
        assert failed(reply, SlotError.BAD_SLOT, IccStatus.ABSENT)


def test_second_command_while_busy() -> None:
    reader, _ = powered()
    send(reader, XfrBlock(0, 1, echo(b"one")))
    send(reader, XfrBlock(0, 2, echo(b"two")))
    busy = read_reply(reader)
    assert busy.seq == 2
    assert failed(busy, SlotError.CMD_SLOT_BUSY, IccStatus.ACTIVE)
    assert read(reader) is None
    drive(reader)
    assert read_reply(reader) == DataBlock(0, 1, IccStatus.ACTIVE, data=b"one\x90\x00")
    assert drive(reader) == 0


def test_card_exception_becomes_hardware_error() -> None:
    class BrokenCard(EchoCard):
        def transmit(self, command: bytes) -> bytes:
            raise RuntimeError("bug")

    reader, _ = powered(BrokenCard())
    assert failed(exchange(reader, XfrBlock(0, 1, SELECT)), SlotError.HW_ERROR, IccStatus.ACTIVE)
    assert exchange(reader, GetSlotStatus(0, 2)).command_status is CommandStatus.OK


def test_power_on_exception_leaves_card_inactive() -> None:
    class DeadCard(EchoCard):
        def power_on(self) -> bytes:
            raise RuntimeError("dead")

    reader = CcidReader([DeadCard()])
    assert failed(exchange(reader, IccPowerOn(0, 1)), SlotError.HW_ERROR, IccStatus.INACTIVE)
    assert reader.slot_state(0) is SlotState.PRESENT_INACTIVE


# ------------------------------------------------------------------- class requests


def setup(request_type: int, request: int, value: int = 0, length: int = 0) -> SetupPacket:
    return SetupPacket(request_type, request, value, 0, length)


def test_get_clock_frequencies_and_data_rates() -> None:
    reader = CcidReader(slots=1)
    assert parse_dwords(reader.control(setup(0xA1, 0x02, length=256), b"")) == [4000]
    assert parse_dwords(reader.control(setup(0xA1, 0x03, length=256), b"")) == [10752]
    custom = CcidReader(config=ReaderConfig(data_rate=9600, max_data_rate=115200))
    assert parse_dwords(custom.control(setup(0xA1, 0x03, length=256), b"")) == [9600, 115200]
    assert len(custom.control(setup(0xA1, 0x03, length=4), b"")) == 4  # never over wLength


@pytest.mark.parametrize(
    "packet",
    [
        setup(0xA1, 0x04, length=8),  # unknown class request
        setup(0x21, 0x02),  # GET_CLOCK_FREQUENCIES as OUT
        setup(0xA1, 0x01, length=2),  # ABORT as IN
        setup(0xC1, 0x02, length=8),  # vendor
        setup(0x80, 0x06, 0x0100, 18),  # standard GET_DESCRIPTOR: not ours
        setup(0x21, 0x01, value=0x0105),  # ABORT for slot 5 of a 1-slot reader
    ],
)
def test_other_control_requests_stall(packet: SetupPacket) -> None:
    with pytest.raises(Stall):
        CcidReader(slots=1).control(packet, b"")


# ------------------------------------------------------------------- abort (§5.3.1)


def test_abort_control_then_bulk() -> None:
    reader, _ = powered()
    assert reader.control(setup(0x21, 0x01, value=9 << 8 | 0), b"") == b""
    send(reader, GetSlotStatus(0, 8))  # dropped: the slot waits for PC_to_RDR_Abort
    assert read(reader) is None
    send(reader, Abort(0, 9))
    assert read_reply(reader) == SlotStatus(0, 9, IccStatus.ACTIVE)
    assert exchange(reader, GetSlotStatus(0, 10)).seq == 10


def test_abort_bulk_then_control() -> None:
    reader, _ = powered()
    send(reader, Abort(0, 4))
    assert read(reader) is None  # waits for the ABORT request
    reader.control(setup(0x21, 0x01, value=4 << 8), b"")
    assert read_reply(reader) == SlotStatus(0, 4, IccStatus.ACTIVE)


def test_abort_while_card_works() -> None:
    reader, _ = powered()
    send(reader, XfrBlock(0, 1, SELECT))
    job = reader.next_job(0.0)
    assert job is not None
    reader.control(setup(0x21, 0x01, value=2 << 8), b"")
    send(reader, Abort(0, 2))
    assert read(reader) is None  # the aborted command answers first
    job.run()
    job.finish()
    aborted, done = drain(reader)
    assert aborted.seq == 1
    assert failed(aborted, SlotError.CMD_ABORTED)
    assert done == SlotStatus(0, 2, IccStatus.ACTIVE)


def test_abort_before_the_job_is_handed_out() -> None:
    reader, card = powered()
    send(reader, XfrBlock(0, 1, SELECT))
    reader.control(setup(0x21, 0x01, value=2 << 8), b"")
    assert reader.next_job(0.0) is None
    send(reader, Abort(0, 2))
    aborted, done = drain(reader)
    assert failed(aborted, SlotError.CMD_ABORTED)
    assert done.seq == 2
    assert card.commands == []


# ------------------------------------------------------------------- bulk-OUT framing


@pytest.mark.parametrize("urb_size", [64, 128, 16384])
def test_message_reassembled_across_urbs(urb_size: int) -> None:
    reader, _ = powered()
    payload = bytes(i & 0xFF for i in range(40000))
    send(reader, XfrBlock(0, 1, echo(payload)), urb_size=urb_size)
    drive(reader)
    reply = read_reply(reader)
    assert isinstance(reply, DataBlock)
    assert reply.data == payload + b"\x90\x00"


def test_message_of_exactly_64_bytes_in_one_full_urb() -> None:
    reader, _ = powered()
    apdu = echo(bytes(49))
    assert len(build_command(XfrBlock(0, 1, apdu))) == 64
    assert exchange(reader, XfrBlock(0, 1, apdu)).command_status is CommandStatus.OK


def test_dwlength_larger_than_transfer() -> None:
    reader, card = powered()
    raw = build_command(XfrBlock(0, 3, SELECT))
    reader.bulk_out(BULK_OUT, raw[:-1])  # a short URB ends the transfer one byte early
    reply = read_reply(reader)
    assert reply.seq == 3
    assert isinstance(reply, DataBlock)
    assert failed(reply, SlotError.BAD_LENGTH)
    assert card.commands == []
    assert exchange(reader, GetSlotStatus(0, 4)).command_status is CommandStatus.OK


def test_dwlength_smaller_than_transfer() -> None:
    reader, card = powered()
    raw = build_command(XfrBlock(0, 3, SELECT)) + b"\x00\x00"
    reader.bulk_out(BULK_OUT, raw)
    assert failed(read_reply(reader), SlotError.BAD_LENGTH)
    assert card.commands == []
    assert exchange(reader, GetSlotStatus(0, 4)).command_status is CommandStatus.OK


def test_message_over_max_message_length() -> None:
    reader, card = powered(max_message_length=271)
    raw = build_command(XfrBlock(0, 5, echo(bytes(300))))
    assert len(raw) > 271
    send(reader, raw, urb_size=64)  # the rest of the transfer is dropped, not parsed
    (reply,) = drain(reader)
    assert reply.seq == 5
    assert failed(reply, SlotError.BAD_LENGTH)
    assert card.commands == []
    assert exchange(reader, GetSlotStatus(0, 6)) == SlotStatus(0, 6, IccStatus.ACTIVE)


def test_message_over_max_message_length_in_one_urb() -> None:
    reader, _ = powered(max_message_length=271)
    send(reader, XfrBlock(0, 5, echo(bytes(300))))
    (reply,) = drain(reader)
    assert failed(reply, SlotError.BAD_LENGTH)
    assert exchange(reader, GetSlotStatus(0, 6)).seq == 6


def test_short_fragment_without_header_is_dropped() -> None:
    reader, _ = powered()
    reader.bulk_out(BULK_OUT, b"\x65\x00\x00")
    assert read(reader) is None
    assert exchange(reader, GetSlotStatus(0, 1)).seq == 1


def test_zero_length_urb_is_harmless() -> None:
    reader, _ = powered()
    reader.bulk_out(BULK_OUT, b"")
    assert read(reader) is None


def test_wrong_endpoint_stalls() -> None:
    with pytest.raises(Stall):
        CcidReader(slots=1).bulk_out(0x02, build_command(GetSlotStatus(0, 0)))


# ------------------------------------------------------------------- bulk-IN, libccid patterns


def test_get_slot_status_read_with_10_byte_urb() -> None:
    # libccid CmdGetSlotStatus: ReadPort with SIZE_GET_SLOT_STATUS = 10.
    reader, _ = powered()
    send(reader, GetSlotStatus(0, 1))
    data = reader.poll_in(BULK_IN, SLOT_STATUS_READ)
    assert data == bytes.fromhex("81 00000000 00 01 00 00 00")
    assert reader.poll_in(BULK_IN, SLOT_STATUS_READ) is None


def test_nothing_to_read_parks_the_urb() -> None:
    reader, _ = powered()
    assert reader.poll_in(BULK_IN, LIBCCID_READ) is None  # never a zero-length reply
    assert reader.poll_in(BULK_IN, 0) is None
    send(reader, XfrBlock(0, 1, SELECT))
    assert reader.poll_in(BULK_IN, LIBCCID_READ) is None  # card work not done yet
    drive(reader)
    assert reader.poll_in(BULK_IN, LIBCCID_READ) is not None


def test_reply_longer_than_urb_continues_in_next_urbs() -> None:
    reader, _ = powered()
    send(reader, XfrBlock(0, 1, length_apdu(1000)))
    send_after = GetSlotStatus(0, 2)
    drive(reader)
    send(reader, send_after)  # a second reply queued behind the first
    pieces = []
    while (piece := reader.poll_in(BULK_IN, 64)) is not None:
        pieces.append(piece)
        if sum(map(len, pieces)) == 1012:
            break
    assert [len(p) for p in pieces] == [64] * 15 + [52]
    assert block(parse_reply(b"".join(pieces))).data[-2:] == b"\x90\x00"
    assert reader.poll_in(BULK_IN, 64) == bytes.fromhex("81 00000000 00 02 00 00 00")


def test_64k_bulk_read_gets_one_whole_message_only() -> None:
    reader = CcidReader([EchoCard(), EchoCard()])
    for slot in (0, 1):
        assert exchange(reader, IccPowerOn(slot, 0)).command_status is CommandStatus.OK
    send(reader, XfrBlock(0, 1, echo(b"a")))
    drive(reader)
    send(reader, XfrBlock(1, 2, echo(b"b")))  # the other slot's reply queues behind
    drive(reader)
    first = reader.poll_in(BULK_IN, LIBCCID_READ)
    assert first is not None
    assert parse_reply(first).seq == 1  # one message, not two
    second = reader.poll_in(BULK_IN, LIBCCID_READ)
    assert second is not None
    assert parse_reply(second).seq == 2


def test_a_host_that_never_reads_cannot_grow_the_queue() -> None:
    # A working host leaves at most about one full-size reply per slot unread (CCID Rev
    # 1.1 §5.2.1); past one more than that, the oldest unread replies are dropped.
    reader, _ = powered()
    for seq in range(1, 50):
        send(reader, XfrBlock(0, seq, length_apdu(60000)))
        drive(reader)
    seqs = []
    while (reply := reader.poll_in(BULK_IN, LIBCCID_READ)) is not None:
        seqs.append(parse_reply(reply).seq)
    assert seqs == [47, 48, 49]


def test_unread_replies_within_the_bound_are_all_kept() -> None:
    reader, _ = powered()
    send(reader, XfrBlock(0, 1, length_apdu(60000)))
    drive(reader)
    for seq in range(2, 6):  # small replies: far below the bound, nothing is dropped
        send(reader, GetSlotStatus(0, seq))
    seqs = []
    while (reply := reader.poll_in(BULK_IN, LIBCCID_READ)) is not None:
        seqs.append(parse_reply(reply).seq)
    assert seqs == [1, 2, 3, 4, 5]


# ------------------------------------------------------------------- interrupt IN


def test_drain_on_open_gets_initial_state_once() -> None:
    # libccid ccid_open_hack_pre: InterruptRead(100 ms) with an 8-byte buffer.
    reader = CcidReader([EchoCard()])
    assert reader.poll_in(INTERRUPT_IN, INTERRUPT_READ) == b"\x50\x03"
    assert reader.poll_in(INTERRUPT_IN, INTERRUPT_READ) is None


def test_interrupt_poll_gets_nothing_without_a_card() -> None:
    reader = CcidReader(slots=1)
    assert reader.poll_in(INTERRUPT_IN, INTERRUPT_READ) is None


def test_insert_remove_notify_only_on_change() -> None:
    reader = CcidReader(slots=1)
    card = EchoCard()
    reader.insert(0, card)
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x03"
    assert reader.poll_in(INTERRUPT_IN, 8) is None
    exchange(reader, IccPowerOn(0, 1))
    exchange(reader, GetSlotStatus(0, 2))
    assert reader.poll_in(INTERRUPT_IN, 8) is None
    assert reader.remove(0) is card
    assert reader.remove(0) is None
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x02"
    assert reader.poll_in(INTERRUPT_IN, 8) is None
    reader.insert(0, card)
    reader.remove(0)  # in and out before the host looked: changed, not present
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x02"


def test_interrupt_never_more_than_max_length() -> None:
    reader = CcidReader([EchoCard()] * 8, config=ReaderConfig(notify_holdoff=0))  # 1 + 2 bytes
    assert reader.poll_in(INTERRUPT_IN, 2) is None
    assert reader.poll_in(INTERRUPT_IN, 3) == b"\x50\xff\xff"


def test_unknown_in_endpoint() -> None:
    assert CcidReader([EchoCard()]).poll_in(0x81, 64) is None


# ------------------------------------------------------------------- reset


def test_reset_forgets_everything_but_cards() -> None:
    reader, card = powered()
    send(reader, XfrBlock(0, 1, SELECT))
    job = reader.next_job(0.0)
    assert job is not None
    send(reader, GetSlotStatus(0, 2))  # busy reply queued
    reader.bulk_out(BULK_OUT, build_command(GetSlotStatus(0, 3))[:5])  # half a header
    reader.reset()
    job.run()
    job.finish()  # from before the reset: ignored
    assert read(reader) is None
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x03"
    assert reader.slot_state(0) is SlotState.PRESENT_INACTIVE
    assert exchange(reader, GetSlotStatus(0, 4)) == SlotStatus(0, 4, IccStatus.INACTIVE)
    assert exchange(reader, IccPowerOn(0, 5)).command_status is CommandStatus.OK
    assert card.power_on_count == 2


# ------------------------------------------------------------------- time extension


def test_time_extension_for_slow_card() -> None:
    slept: list[float] = []  # the "slow" card sleeps through an injected clock
    reader, _ = powered(EchoCard(blocking=True, sleep=slept.append, slow_seconds=3.5))
    send(reader, XfrBlock(0, 7, bytes.fromhex("80140000")))
    assert reader.get_timer() is None  # not started yet
    job = reader.next_job(100.0)
    assert job is not None
    assert job.blocking
    assert reader.get_timer() == 101.0
    reader.handle_timer(100.5)
    assert read(reader) is None
    reader.handle_timer(101.0)
    assert reader.get_timer() == 102.0
    reader.handle_timer(102.0)  # the first one is still unread: no second one
    extension = read(reader)
    # bStatus 0x80: time extension requested, ICC active; bError = multiplier 1; no data
    assert extension == bytes.fromhex("80 00000000 00 07 80 01 00")
    assert read(reader) is None
    reader.handle_timer(103.0)
    assert read(reader) == extension
    job.run()
    assert slept == [3.5]
    job.finish()
    assert reader.get_timer() is None
    assert read_reply(reader) == DataBlock(0, 7, IccStatus.ACTIVE, data=b"\x90\x00")
    assert read(reader) is None


def test_unread_time_extension_dropped_when_reply_is_ready() -> None:
    reader, _ = powered(time_extension_multiplier=3)
    send(reader, XfrBlock(0, 7, SELECT))
    job = reader.next_job(0.0)
    assert job is not None
    reader.handle_timer(5.0)
    job.run()
    job.finish()
    (reply,) = drain(reader)
    assert reply.command_status is CommandStatus.OK


def test_partly_read_time_extension_is_completed() -> None:
    reader, _ = powered(time_extension_multiplier=2)
    send(reader, XfrBlock(0, 7, SELECT))
    job = reader.next_job(0.0)
    assert job is not None
    reader.handle_timer(1.0)
    head = reader.poll_in(BULK_IN, 4)
    job.run()
    job.finish()
    tail = reader.poll_in(BULK_IN, 64)
    assert head is not None
    assert tail is not None
    assert head + tail == bytes.fromhex("80 00000000 00 07 80 02 00")
    assert read_reply(reader).command_status is CommandStatus.OK


def test_no_time_extension_for_power_on() -> None:
    # libccid CmdPowerOn reads one reply and would take a time extension for an empty ATR.
    reader = CcidReader([EchoCard()])
    send(reader, IccPowerOn(0, 1))
    job = reader.next_job(0.0)
    assert job is not None
    reader.handle_timer(10.0)
    assert reader.get_timer() is None
    assert read(reader) is None
    job.run()
    job.finish()
    assert read_reply(reader).command_status is CommandStatus.OK


# ------------------------------------------------------------------- multi-slot


def test_multi_slot_independent_slots() -> None:
    cards = [EchoCard(), EchoCard(), None]
    reader = CcidReader(cards, config=ReaderConfig(notify_holdoff=0))  # see test_notify_holdoff
    assert reader.interface.extra[4] == 2  # bMaxSlotIndex
    assert reader.poll_in(INTERRUPT_IN, 8) == bytes([0x50, 0b0000_1111])
    assert exchange(reader, IccPowerOn(0, 1)).command_status is CommandStatus.OK
    assert exchange(reader, IccPowerOn(1, 2)).command_status is CommandStatus.OK
    send(reader, XfrBlock(0, 3, echo(b"zero")))
    slow = reader.next_job(0.0)  # slot 0 busy...
    assert slow is not None
    assert exchange(reader, XfrBlock(1, 4, echo(b"one"))) == DataBlock(  # ...slot 1 is not
        1, 4, IccStatus.ACTIVE, data=b"one\x90\x00"
    )
    assert failed(exchange(reader, XfrBlock(2, 5, SELECT)), SlotError.ICC_MUTE, IccStatus.ABSENT)
    reader.remove(1)
    reader.insert(2, EchoCard())
    assert reader.poll_in(INTERRUPT_IN, 8) == bytes([0x50, 0b0011_1001])
    slow.run()
    slow.finish()
    (reply,) = drain(reader)
    assert reply == DataBlock(0, 3, IccStatus.ACTIVE, data=b"zero\x90\x00")
    assert cards[0] is not None
    assert cards[0].commands == [echo(b"zero")]


def test_local_api_misuse() -> None:
    reader = CcidReader(slots=2)
    with pytest.raises(ValueError, match="no slot"):
        reader.insert(2, EchoCard())
    with pytest.raises(ValueError, match="no slot"):
        reader.remove(-1)
    with pytest.raises(ValueError, match="slots"):
        CcidReader(slots=0)
    with pytest.raises(ValueError, match="dwMaxCCIDMessageLength"):
        ReaderConfig(max_message_length=100)


def test_transfer_longer_than_dwlength_in_full_size_urbs() -> None:
    reader, card = powered()
    raw = build_command(XfrBlock(0, 3, SELECT))  # 18 bytes
    reader.bulk_out(BULK_OUT, raw + bytes(64 - len(raw)))  # a full 64-byte URB...
    reader.bulk_out(BULK_OUT, bytes(64))  # ...and the rest of that transfer
    reader.bulk_out(BULK_OUT, bytes(3))  # short: the transfer ends here
    (reply,) = drain(reader)
    assert (reply.seq, reply.error) == (3, SlotError.BAD_LENGTH)
    assert card.commands == []
    assert exchange(reader, GetSlotStatus(0, 4)) == SlotStatus(0, 4, IccStatus.ACTIVE)


def test_length_error_for_a_slot_that_does_not_exist() -> None:
    reader = CcidReader(slots=1)
    reader.bulk_out(BULK_OUT, build_command(XfrBlock(7, 3, SELECT))[:-1])
    (reply,) = drain(reader)
    assert (reply.slot, reply.error, reply.icc_status) == (
        7,
        SlotError.BAD_LENGTH,
        IccStatus.ABSENT,
    )


@pytest.mark.parametrize(
    ("apdu", "response"),
    [
        (b"\x00\xa4", b"\x67\x00"),
        (bytes.fromhex("00B00000"), b"\x6d\x00"),
        (bytes.fromhex("80160000"), b"\x90\x00"),
        (bytes.fromhex("80FF0000"), b"\x6d\x00"),
        (bytes.fromhex("80100000"), b"\x90\x00"),
    ],
)
def test_test_card_commands(apdu: bytes, response: bytes) -> None:
    reader, _ = powered()
    assert block(exchange(reader, XfrBlock(0, 1, apdu))).data == response


def test_test_card_remembers_selection_until_cold_reset() -> None:
    reader, _ = powered()
    exchange(reader, XfrBlock(0, 1, SELECT))
    assert block(exchange(reader, XfrBlock(0, 2, bytes.fromhex("80160000")))).data == (
        b"\xa0\x00\x00\x90\x00"
    )
    exchange(reader, IccPowerOn(0, 3))
    assert block(exchange(reader, XfrBlock(0, 4, bytes.fromhex("80160000")))).data == b"\x90\x00"
