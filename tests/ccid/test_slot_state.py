"""The slot table, enumerated: every (state, input) pair, idle and busy, through the reader."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.ccid.helpers import INTERRUPT_IN, drain, drive, exchange, read, read_reply, send
from usbccid.ccid import CcidReader
from usbccid.ccid.errors import CommandStatus, IccStatus, SlotError
from usbccid.ccid.slot import (
    HOST_INPUTS,
    ICC_STATUS,
    TRANSITIONS,
    Action,
    SlotInput,
    SlotState,
    rule,
)
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.ccid.wire import (
    Command,
    DataBlock,
    Escape,
    GetParameters,
    GetSlotStatus,
    IccClock,
    IccPowerOff,
    IccPowerOn,
    Mechanical,
    RdrToPc,
    Reply,
    ResetParameters,
    Secure,
    SetDataRateAndClockFrequency,
    SetParameters,
    T0Apdu,
    UnknownCommand,
    XfrBlock,
    build_command,
    build_reply,
    reply_type,
)

SELECT = bytes.fromhex("00A4040003A00000")

COMMAND_FOR: dict[SlotInput, Callable[[int], Command]] = {
    SlotInput.POWER_ON: lambda seq: IccPowerOn(0, seq),
    SlotInput.POWER_OFF: lambda seq: IccPowerOff(0, seq),
    SlotInput.GET_SLOT_STATUS: lambda seq: GetSlotStatus(0, seq),
    SlotInput.XFR_BLOCK: lambda seq: XfrBlock(0, seq, SELECT),
    SlotInput.GET_PARAMETERS: lambda seq: GetParameters(0, seq),
    SlotInput.RESET_PARAMETERS: lambda seq: ResetParameters(0, seq),
    SlotInput.SET_PARAMETERS: lambda seq: SetParameters(0, seq, 0, bytes.fromhex("1100000a00")),
    SlotInput.ESCAPE: lambda seq: Escape(0, seq, b"\x6a"),
    SlotInput.ICC_CLOCK: lambda seq: IccClock(0, seq, 0),
    SlotInput.T0_APDU: lambda seq: T0Apdu(0, seq, 0, 0, 0),
    SlotInput.SECURE: lambda seq: Secure(0, seq, b"\x00"),
    SlotInput.MECHANICAL: lambda seq: Mechanical(0, seq, 1),
    SlotInput.SET_DATA_RATE: lambda seq: SetDataRateAndClockFrequency(0, seq, bytes(8)),
    SlotInput.UNKNOWN: lambda seq: UnknownCommand(0, seq, message_type=0x99),
}


def test_table_is_complete() -> None:
    assert set(TRANSITIONS) == {(s, i) for s in SlotState for i in SlotInput}
    assert set(COMMAND_FOR) == set(HOST_INPUTS)


def test_only_hot_plug_notifies_and_only_present_cards_get_card_work() -> None:
    for (state, slot_input), step in TRANSITIONS.items():
        if step.action is Action.NOTIFY:
            assert slot_input in (SlotInput.INSERT, SlotInput.REMOVE)
        if step.action in (Action.CARD_POWER_ON, Action.CARD_POWER_OFF, Action.CARD_TRANSMIT):
            assert state is not SlotState.ABSENT
        if step.action is Action.FAIL:
            assert step.error is not None


def reader_in(state: SlotState) -> tuple[CcidReader, EchoCard]:
    card = EchoCard()
    reader = CcidReader(slots=1)
    if state is not SlotState.ABSENT:
        reader.insert(0, card)
    if state is SlotState.ACTIVE:
        atr = exchange(reader, IccPowerOn(0, 200))
        assert isinstance(atr, DataBlock)
        assert atr.data == DEFAULT_ATR
    reader.poll_in(INTERRUPT_IN, 8)  # consume the insertion notice
    assert reader.slot_state(0) is state
    return reader, card


@pytest.mark.parametrize("state", list(SlotState))
@pytest.mark.parametrize("slot_input", [i for i in SlotInput if i in HOST_INPUTS])
def test_host_input(state: SlotState, slot_input: SlotInput) -> None:
    reader, card = reader_in(state)
    step = TRANSITIONS[(state, slot_input)]
    command = COMMAND_FOR[slot_input](7)
    power_ons = card.power_on_count
    reply = exchange(reader, command)
    assert (reply.slot, reply.seq) == (0, 7)
    assert _kind(reply) == reply_type(build_command(command)[0])
    assert reader.slot_state(0) is step.next_state
    assert reply.icc_status is ICC_STATUS[step.next_state]
    if step.action is Action.FAIL:
        assert reply.command_status is CommandStatus.FAILED
        assert reply.error == step.error
    else:
        assert reply.command_status is CommandStatus.OK
        assert reply.error == 0
    if step.action is Action.CARD_POWER_ON:
        assert card.power_on_count == power_ons + 1  # every power-on is a cold reset
        assert isinstance(reply, DataBlock)
        assert reply.data == DEFAULT_ATR
    if step.action is Action.CARD_TRANSMIT:
        assert card.commands[-1] == SELECT
    assert reader.poll_in(INTERRUPT_IN, 8) is None  # commands never notify


def _kind(reply: Reply) -> RdrToPc:
    return RdrToPc(build_reply(reply)[0])


@pytest.mark.parametrize("state", list(SlotState))
@pytest.mark.parametrize("slot_input", [SlotInput.INSERT, SlotInput.REMOVE])
def test_hot_plug_input(state: SlotState, slot_input: SlotInput) -> None:
    reader, _ = reader_in(state)
    step = TRANSITIONS[(state, slot_input)]
    if step.action is Action.REJECT:
        with pytest.raises(ValueError, match="already holds"):
            reader.insert(0, EchoCard())
    elif slot_input is SlotInput.INSERT:
        reader.insert(0, EchoCard())
    else:
        reader.remove(0)
    assert reader.slot_state(0) is step.next_state
    notice = reader.poll_in(INTERRUPT_IN, 8)
    if step.action is Action.NOTIFY:
        present = step.next_state is not SlotState.ABSENT
        assert notice == bytes([0x50, 0b10 | int(present)])
    else:
        assert notice is None
    assert read(reader) is None


def busy_reader(state: SlotState) -> tuple[CcidReader, int]:
    """A reader whose slot 0 is in ``state`` with card work outstanding."""
    if state is SlotState.PRESENT_INACTIVE:
        reader, _ = reader_in(state)
        send(reader, IccPowerOn(0, 1))
        return reader, 1
    reader, _ = reader_in(SlotState.ACTIVE)
    send(reader, XfrBlock(0, 1, SELECT))
    if state is SlotState.ABSENT:
        job = reader.next_job(0.0)  # handed out: the card is busy when it is pulled
        assert job is not None
        reader.remove(0)
    return reader, 1


@pytest.mark.parametrize("state", list(SlotState))
@pytest.mark.parametrize("slot_input", [i for i in SlotInput if i in HOST_INPUTS])
def test_busy_slot_answers_cmd_slot_busy(state: SlotState, slot_input: SlotInput) -> None:
    reader, _ = busy_reader(state)
    assert rule(state, slot_input, busy=True).error == SlotError.CMD_SLOT_BUSY
    send(reader, COMMAND_FOR[slot_input](9))
    reply = read_reply(reader)
    assert (reply.seq, reply.command_status, reply.error) == (
        9,
        CommandStatus.FAILED,
        SlotError.CMD_SLOT_BUSY,
    )
    assert reader.slot_state(0) is state


def test_card_pulled_during_transmit_finishes_with_no_icc() -> None:
    reader, _ = reader_in(SlotState.ACTIVE)
    send(reader, XfrBlock(0, 3, SELECT))
    job = reader.next_job(0.0)
    assert job is not None
    reader.remove(0)
    job.run()
    job.finish()
    (reply,) = drain(reader)
    assert (reply.seq, reply.command_status, reply.error, reply.icc_status) == (
        3,
        CommandStatus.FAILED,
        SlotError.ICC_MUTE,
        IccStatus.ABSENT,
    )


def test_card_pulled_before_job_was_handed_out() -> None:
    reader, card = reader_in(SlotState.ACTIVE)
    send(reader, XfrBlock(0, 3, SELECT))
    reader.remove(0)
    assert reader.next_job(0.0) is None
    (reply,) = drain(reader)
    assert (reply.error, reply.icc_status) == (SlotError.ICC_MUTE, IccStatus.ABSENT)
    assert card.commands == []
    assert drive(reader) == 0
