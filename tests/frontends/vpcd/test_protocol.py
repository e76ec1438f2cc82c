"""The sans-IO vpcd connection: its state table, conversations as vpcd holds them, card
work as jobs, removal, and the bounds."""

from __future__ import annotations

import logging

import pytest

from tests.frontends.vpcd.helpers import (
    GET_ATR,
    POWER_OFF,
    POWER_ON,
    apdu,
    exchange,
    run_jobs,
    split_frames,
)
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.frontends.vpcd.protocol import (
    MAX_BUFFER,
    TRANSITIONS,
    Input,
    State,
    Step,
    VpcdConnection,
)
from usbccid.frontends.vpcd.wire import MAX_PAYLOAD, Reset, build_message

RESET = build_message(Reset())
ECHO = bytes.fromhex("80100000 03 010203")


# ---------------------------------------------------------------- the table


def test_the_table_covers_every_state_and_input() -> None:
    assert set(TRANSITIONS) == {(s, i) for s in State for i in Input}


def test_closed_absorbs_everything_and_eof_and_remove_close() -> None:
    for event in Input:
        assert TRANSITIONS[(State.CLOSED, event)] == (State.CLOSED, ())
    for state in State:
        assert TRANSITIONS[(state, Input.EOF)] == (State.CLOSED, ())
        assert TRANSITIONS[(state, Input.REMOVE)] == (State.CLOSED, ())


def _known_atr_after(state: State, steps: tuple[Step, ...]) -> list[bool]:
    """Whether the ATR is known before each step."""
    known = state in (State.ON, State.OFF)
    result = []
    for step in steps:
        result.append(known)
        known = known or step is Step.CARD_POWER_ON
    return result


@pytest.mark.parametrize(("key", "value"), list(TRANSITIONS.items()), ids=str)
def test_every_rule_is_consistent(
    key: tuple[State, Input], value: tuple[State, tuple[Step, ...]]
) -> None:
    """The ATR is never sent before it is known, APDUs only reach a powered card, power
    state follows the last power step, and only get ATR and APDUs are answered."""
    (state, event), (next_state, steps) = key, value
    powered = state is State.ON
    for step, atr_known in zip(steps, _known_atr_after(state, steps), strict=True):
        if step is Step.SEND_ATR:
            assert atr_known
        if step is Step.CARD_TRANSMIT:
            assert powered
        if step is Step.CARD_POWER_ON:
            powered = True
        if step is Step.CARD_POWER_OFF:
            powered = False
    if next_state is not State.CLOSED:
        assert (next_state is State.ON) == powered or (next_state is State.INSERTED and not powered)
    answered = [s for s in steps if s in (Step.SEND_ATR, Step.CARD_TRANSMIT)]
    expected = {Input.GET_ATR: [Step.SEND_ATR], Input.APDU: [Step.CARD_TRANSMIT]}
    if state is not State.CLOSED:
        assert answered == expected.get(event, [])
    assert steps.count(Step.CARD_POWER_ON) <= 1


def test_every_state_is_reachable() -> None:
    seen = {State.INSERTED}
    frontier = [State.INSERTED]
    while frontier:
        state = frontier.pop()
        for event in Input:
            target = TRANSITIONS[(state, event)][0]
            if target not in seen:
                seen.add(target)
                frontier.append(target)
    assert seen == set(State)


# ---------------------------------------------------------------- conversations


def test_pcscd_start_up_as_vpcd_holds_it() -> None:
    """The presence poll asks for the ATR before anything (vpcd.c vicc_present); then
    IFDHPowerICC sends power on and asks for the ATR again; then APDUs."""
    card = EchoCard()
    conn = VpcdConnection(card)
    assert (conn.state, conn.atr) == (State.INSERTED, None)
    assert exchange(conn, GET_ATR) == [DEFAULT_ATR]
    assert card.power_on_count == 1
    assert conn.state is State.ON
    assert exchange(conn, POWER_ON + GET_ATR) == [DEFAULT_ATR]
    assert card.power_on_count == 2  # a cold reset
    assert exchange(conn, apdu(ECHO)) == [b"\x01\x02\x03\x90\x00"]
    assert card.commands == [ECHO]
    assert conn.counters.apdus == 1
    assert conn.counters.atr_requests == 2


def test_reset_is_a_cold_reset() -> None:
    card = EchoCard()
    conn = VpcdConnection(card)
    exchange(conn, POWER_ON + apdu(bytes.fromhex("00A40400 02 A0A0")))
    assert card.selected == b"\xa0\xa0"
    assert exchange(conn, RESET + GET_ATR) == [DEFAULT_ATR]
    assert card.selected == b""
    assert card.power_on_count == 2


def test_power_off_keeps_the_atr_for_the_presence_poll() -> None:
    card = EchoCard()
    conn = VpcdConnection(card)
    exchange(conn, POWER_ON)
    assert exchange(conn, POWER_OFF) == []
    assert card.power_off_count == 1
    assert conn.state is State.OFF
    # pcscd polls presence while the card is off: the ATR, without waking the card
    assert exchange(conn, GET_ATR * 3) == [DEFAULT_ATR] * 3
    assert card.power_on_count == 1
    assert exchange(conn, POWER_OFF) == []  # already off: the card is not called
    assert card.power_off_count == 1


def test_an_apdu_to_a_card_that_is_off_activates_it() -> None:
    card = EchoCard()
    conn = VpcdConnection(card)
    assert exchange(conn, apdu(ECHO)) == [b"\x01\x02\x03\x90\x00"]
    assert card.power_on_count == 1
    exchange(conn, POWER_OFF)
    assert exchange(conn, apdu(ECHO)) == [b"\x01\x02\x03\x90\x00"]
    assert card.power_on_count == 2
    assert conn.state is State.ON


def test_malformed_apdus_reach_the_card() -> None:
    """The card answers what is not an APDU with a status word (Card.transmit)."""
    card = EchoCard()
    conn = VpcdConnection(card)
    assert exchange(conn, apdu(b"") + apdu(b"\x80\x10")) == [b"\x67\x00", b"\x67\x00"]
    assert card.commands == [b"", b"\x80\x10"]


def test_extended_apdus_up_to_what_a_frame_holds() -> None:
    card = EchoCard()
    conn = VpcdConnection(card)
    data = bytes(i & 0xFF for i in range(MAX_PAYLOAD - 7))
    command = bytes.fromhex("80100000 00") + len(data).to_bytes(2, "big") + data
    assert len(command) == MAX_PAYLOAD
    assert exchange(conn, apdu(command)) == [data + b"\x90\x00"]
    # the longest response a frame carries: 0xFFFD data bytes + SW
    longest = bytes.fromhex("8012FFFD")
    assert exchange(conn, apdu(longest)) == [bytes(i & 0xFF for i in range(0xFFFD)) + b"\x90\x00"]
    assert not conn.should_close


def test_a_response_too_long_for_a_frame_closes(caplog: pytest.LogCaptureFixture) -> None:
    conn = VpcdConnection(EchoCard())
    with caplog.at_level(logging.WARNING):
        assert exchange(conn, apdu(bytes.fromhex("8012FFFF"))) == []
    assert conn.should_close
    assert conn.close_reason is not None
    assert "65537 bytes" in conn.close_reason


def test_every_byte_split_gives_the_same_answers() -> None:
    stream = GET_ATR + POWER_ON + GET_ATR + apdu(ECHO) + POWER_OFF + GET_ATR + apdu(ECHO)
    expected = [DEFAULT_ATR, DEFAULT_ATR, b"\x01\x02\x03\x90\x00", DEFAULT_ATR]
    expected.append(b"\x01\x02\x03\x90\x00")
    for cut in range(len(stream) + 1):
        conn = VpcdConnection(EchoCard())
        out = b""
        for chunk in (stream[:cut], stream[cut:]):
            if chunk:
                conn.receive_data(chunk)
                run_jobs(conn)
                out += conn.data_to_send()
        assert split_frames(out) == expected, cut
    conn = VpcdConnection(EchoCard())
    out = b""
    for i in range(len(stream)):
        conn.receive_data(stream[i : i + 1])
        run_jobs(conn)
        out += conn.data_to_send()
    assert split_frames(out) == expected


# ---------------------------------------------------------------- card work as jobs


def test_messages_wait_for_the_card_work_before_them() -> None:
    """Power on then get ATR back to back: the ATR is sent after the power on ran."""
    card = EchoCard(blocking=True)
    conn = VpcdConnection(card)
    conn.receive_data(POWER_ON + GET_ATR + apdu(ECHO))
    job = conn.next_job()
    assert job is not None
    assert job.blocking
    assert conn.next_job() is None  # handed out once; nothing else until it finishes
    assert conn.data_to_send() == b""
    assert card.power_on_count == 0
    job.run()
    assert conn.data_to_send() == b""  # run() touches only the card
    job.finish()
    # the ATR went out; the APDU is the next job
    assert split_frames(conn.data_to_send()) == [DEFAULT_ATR]
    job = conn.next_job()
    assert job is not None
    job.run()
    job.finish()
    assert split_frames(conn.data_to_send()) == [b"\x01\x02\x03\x90\x00"]


def test_removal_closes_and_drops_the_work_in_flight() -> None:
    card = EchoCard(blocking=True)
    conn = VpcdConnection(card)
    exchange(conn, POWER_ON)
    conn.receive_data(apdu(ECHO))
    job = conn.next_job()
    assert job is not None
    conn.remove()
    assert conn.should_close
    assert conn.close_reason == "card removed"
    job.run()
    job.finish()  # dropped
    assert conn.data_to_send() == b""
    conn.receive_data(GET_ATR)  # after the close: ignored
    conn.remove()
    assert conn.next_job() is None
    assert conn.data_to_send() == b""


def test_eof_closes_even_in_the_middle_of_a_frame() -> None:
    conn = VpcdConnection(EchoCard())
    conn.receive_data(apdu(ECHO)[:3])
    conn.receive_data(b"")
    assert conn.should_close
    assert conn.close_reason == "vpcd closed the connection"


def test_a_card_that_raises_closes_the_connection(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(EchoCard):
        def transmit(self, command: bytes) -> bytes:
            raise RuntimeError("card bug")

    conn = VpcdConnection(Broken())
    with caplog.at_level(logging.ERROR):
        assert exchange(conn, POWER_ON + apdu(ECHO) + GET_ATR) == []
    assert conn.should_close
    assert conn.close_reason == "the card failed in card.transmit()"
    assert "card bug" in caplog.text


@pytest.mark.parametrize(("atr", "response"), [(b"", b"\x90\x00"), (DEFAULT_ATR, b"\x90")])
def test_answers_vpcd_would_misread_close_instead(atr: bytes, response: bytes) -> None:
    class Odd(EchoCard):
        def transmit(self, command: bytes) -> bytes:
            return response

    conn = VpcdConnection(Odd(atr=atr))
    assert exchange(conn, GET_ATR + apdu(ECHO)) == ([DEFAULT_ATR] if atr else [])
    assert conn.should_close


def test_unread_bytes_stay_bounded_while_the_card_works() -> None:
    conn = VpcdConnection(EchoCard(blocking=True))
    conn.receive_data(apdu(ECHO))
    job = conn.next_job()
    assert job is not None
    conn.receive_data(bytes(MAX_BUFFER))  # frames nobody looks at until the job is done
    assert not conn.should_close
    conn.receive_data(b"\x00")
    assert conn.should_close
    assert conn.close_reason is not None
    assert "unread bytes" in conn.close_reason
    assert len(conn._buffer) == 0


def test_max_buffer_holds_a_frame() -> None:
    with pytest.raises(ValueError, match="whole frame"):
        VpcdConnection(EchoCard(), max_buffer=100)
