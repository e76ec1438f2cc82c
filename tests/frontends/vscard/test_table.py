"""The connection state table, enumerated: every pair is either in it or an error."""

from __future__ import annotations

import pytest

from usbccid.frontends.vscard.client import (
    RECEIVED_INPUTS,
    TRANSITIONS,
    Action,
    Input,
    State,
    StateMachine,
)
from usbccid.frontends.vscard.errors import VscardLocalError, VscardProtocolError

PAIRS = [(s, i) for s in State for i in Input]


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=lambda x: x.name)
def test_every_pair(state: State, event: Input) -> None:
    machine = StateMachine(state)
    if (state, event) in TRANSITIONS:
        new, action = TRANSITIONS[(state, event)]
        assert machine.process(event) is action
        assert machine.state is new
    elif event in RECEIVED_INPUTS:
        with pytest.raises(VscardProtocolError):
            machine.process(event)
        assert machine.state is State.CLOSED  # the peer's fault: the connection ends
    else:
        with pytest.raises(VscardLocalError):
            machine.process(event)
        assert machine.state is state  # our bug: nothing changes


def test_every_state_is_reachable() -> None:
    seen, todo = {State.AWAIT_INIT}, [State.AWAIT_INIT]
    while todo:
        here = todo.pop()
        for (state, _), (new, _) in TRANSITIONS.items():
            if state is here and new not in seen:
                seen.add(new)
                todo.append(new)
    assert seen == set(State)


def test_closed_is_final_and_eof_always_closes() -> None:
    for (state, _), (new, _) in TRANSITIONS.items():
        if state is State.CLOSED:
            assert new is State.CLOSED
    for state in State:
        assert TRANSITIONS[(state, Input.RECV_EOF)][0] is State.CLOSED
        assert TRANSITIONS[(state, Input.LEAVE)][0] is State.CLOSED


def test_a_type_no_host_sends_is_never_allowed() -> None:
    assert not [p for p in TRANSITIONS if p[1] is Input.RECV_UNEXPECTED]


def test_apdus_reach_the_card_only_when_the_host_has_it() -> None:
    transmit = {s for (s, i), (_, a) in TRANSITIONS.items() if a is Action.TRANSMIT}
    assert transmit == {State.INSERTING, State.INSERTED}
    assert all(
        i is Input.RECV_APDU for (_, i), (_, a) in TRANSITIONS.items() if a is Action.TRANSMIT
    )
    # Every state but CLOSED answers or drops an APDU: none is left for QEMU to wait on.
    for state in State:
        if state is not State.CLOSED:
            assert (state, Input.RECV_APDU) in TRANSITIONS


def test_insert_and_remove_are_local_and_always_allowed() -> None:
    for state in State:
        assert (state, Input.INSERT) in TRANSITIONS
        assert (state, Input.REMOVE) in TRANSITIONS
