"""The state of one reader slot, as a table.

A slot is ABSENT (no card), PRESENT_INACTIVE (card in, not powered) or ACTIVE (card
powered, ATR given). Its inputs are the host's commands and the local card hot-plug. The
table :data:`TRANSITIONS` says, for every (state, input), what the reader does and which
state follows; the reader (``usbccid.ccid.reader``) only interprets it, and the tests
enumerate it exhaustively.

Not in the table, because they cut across every state:

* BUSY: while card work (a :class:`usbccid.jobs.Job`) runs for a slot, or its PIN pad
  waits for the keypad, every command to that slot except PC_to_RDR_Abort fails with
  CMD_SLOT_BUSY (CCID Rev 1.1 §6.2.6;
  bMaxCCIDBusySlots, §5.1). See :func:`rule`.
* ABORT: the control-request / bulk-message pairing of CCID Rev 1.1 §5.3.1.
* Extended-APDU chaining inside XfrBlock (§6.1.4 wLevelParameter): a chained command is
  transmitted when its last block arrives, a chained response is handed out block by block.
* What happens when card work fails or the card left during it (reader.py, ``_finish``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from usbccid.ccid.errors import IccStatus, SlotError


class SlotState(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    ABSENT = enum.auto()
    PRESENT_INACTIVE = enum.auto()
    ACTIVE = enum.auto()


class SlotInput(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    # local hot-plug
    INSERT = enum.auto()
    REMOVE = enum.auto()
    # host commands (PC_to_RDR, CCID Rev 1.1 §6.1)
    POWER_ON = enum.auto()  # IccPowerOn §6.1.1
    POWER_OFF = enum.auto()  # IccPowerOff §6.1.2
    GET_SLOT_STATUS = enum.auto()  # §6.1.3
    XFR_BLOCK = enum.auto()  # §6.1.4
    GET_PARAMETERS = enum.auto()  # §6.1.5
    RESET_PARAMETERS = enum.auto()  # §6.1.6
    SET_PARAMETERS = enum.auto()  # §6.1.7
    ESCAPE = enum.auto()  # §6.1.8
    ICC_CLOCK = enum.auto()  # §6.1.9
    T0_APDU = enum.auto()  # §6.1.10
    SECURE = enum.auto()  # §6.1.11
    MECHANICAL = enum.auto()  # §6.1.12
    SET_DATA_RATE = enum.auto()  # SetDataRateAndClockFrequency §6.1.14
    UNKNOWN = enum.auto()  # any other bMessageType


class Action(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    NOTIFY = enum.auto()  # presence changed: queue a NotifySlotChange (§6.3.1)
    IGNORE = enum.auto()  # nothing happens
    REJECT = enum.auto()  # local misuse (insert into an occupied slot): ValueError
    REPLY = enum.auto()  # answer at once from the reader's own state
    FAIL = enum.auto()  # answer at once: command failed with ``error``
    CARD_POWER_ON = enum.auto()  # job: card.power_on() (cold reset), reply DataBlock(ATR)
    CARD_POWER_OFF = enum.auto()  # job: card.power_off(), reply SlotStatus
    CARD_TRANSMIT = enum.auto()  # job: card.transmit(APDU), reply DataBlock(response)
    PIN_ENTRY = enum.auto()  # PIN pad: wait for the keypad, then a keyed card transmit


@dataclass(frozen=True, slots=True)
class Rule:
    action: Action
    next_state: SlotState  # for card jobs: the state once the job has succeeded
    error: SlotError | None = None


ICC_STATUS: dict[SlotState, IccStatus] = {
    SlotState.ABSENT: IccStatus.ABSENT,
    SlotState.PRESENT_INACTIVE: IccStatus.INACTIVE,
    SlotState.ACTIVE: IccStatus.ACTIVE,
}

_A, _P, _ON = SlotState.ABSENT, SlotState.PRESENT_INACTIVE, SlotState.ACTIVE
_I = SlotInput


def _fail(state: SlotState, error: SlotError) -> Rule:
    return Rule(Action.FAIL, state, error)


def _reply(state: SlotState) -> Rule:
    return Rule(Action.REPLY, state)


_MUTE = SlotError.ICC_MUTE
_UNSUPPORTED = SlotError.CMD_NOT_SUPPORTED

# Commands this reader answers "command not supported" (bError 0, §6.2.6) in every state:
# no vendor escapes; no clock control (dwFeatures lacks 0x100, §5.1); T0APDU only matters
# to a reader doing GET RESPONSE itself, and ours passes 61xx through; Secure unless the
# reader has a PIN pad (bPINSupport 0; see PINPAD_TRANSITIONS); no mechanical functions
# (dwMechanical 0); unknown message types.
_NOT_SUPPORTED = (
    _I.ESCAPE,
    _I.ICC_CLOCK,
    _I.T0_APDU,
    _I.SECURE,
    _I.MECHANICAL,
    _I.UNKNOWN,
)

TRANSITIONS: dict[tuple[SlotState, SlotInput], Rule] = {
    # ---- no card -----------------------------------------------------------------
    (_A, _I.INSERT): Rule(Action.NOTIFY, _P),
    (_A, _I.REMOVE): Rule(Action.IGNORE, _A),
    # §6.2.6: "ICC_MUTE ... no ICC present", bmICCStatus 2 (libccid CCID_Receive maps
    # 0xFE + "no ICC" to IFD_ICC_NOT_PRESENT).
    (_A, _I.POWER_ON): _fail(_A, _MUTE),
    (_A, _I.POWER_OFF): _reply(_A),
    (_A, _I.GET_SLOT_STATUS): _reply(_A),
    (_A, _I.XFR_BLOCK): _fail(_A, _MUTE),
    (_A, _I.GET_PARAMETERS): _fail(_A, _MUTE),
    (_A, _I.RESET_PARAMETERS): _fail(_A, _MUTE),
    (_A, _I.SET_PARAMETERS): _fail(_A, _MUTE),
    (_A, _I.SET_DATA_RATE): _reply(_A),
    # ---- card present, not powered -----------------------------------------------
    (_P, _I.INSERT): Rule(Action.REJECT, _P),
    (_P, _I.REMOVE): Rule(Action.NOTIFY, _A),
    (_P, _I.POWER_ON): Rule(Action.CARD_POWER_ON, _ON),
    (_P, _I.POWER_OFF): _reply(_P),  # already off: nothing to tell the card
    (_P, _I.GET_SLOT_STATUS): _reply(_P),
    # An XfrBlock to an unpowered card: ICC_MUTE with bmICCStatus 1 (as QEMU's
    # ccid_on_apdu_from_guest; libccid then reports IFD_COMMUNICATION_ERROR).
    (_P, _I.XFR_BLOCK): _fail(_P, _MUTE),
    (_P, _I.GET_PARAMETERS): _reply(_P),
    (_P, _I.RESET_PARAMETERS): _reply(_P),
    (_P, _I.SET_PARAMETERS): _reply(_P),
    (_P, _I.SET_DATA_RATE): _reply(_P),
    # ---- card powered --------------------------------------------------------------
    (_ON, _I.INSERT): Rule(Action.REJECT, _ON),
    (_ON, _I.REMOVE): Rule(Action.NOTIFY, _A),
    # Every IccPowerOn is a cold reset of the card, also when it is already active.
    (_ON, _I.POWER_ON): Rule(Action.CARD_POWER_ON, _ON),
    (_ON, _I.POWER_OFF): Rule(Action.CARD_POWER_OFF, _P),
    (_ON, _I.GET_SLOT_STATUS): _reply(_ON),
    (_ON, _I.XFR_BLOCK): Rule(Action.CARD_TRANSMIT, _ON),
    (_ON, _I.GET_PARAMETERS): _reply(_ON),
    (_ON, _I.RESET_PARAMETERS): _reply(_ON),
    (_ON, _I.SET_PARAMETERS): _reply(_ON),
    (_ON, _I.SET_DATA_RATE): _reply(_ON),
}
for _state in SlotState:
    for _input in _NOT_SUPPORTED:
        TRANSITIONS[(_state, _input)] = _fail(_state, _UNSUPPORTED)

# A reader with a PIN pad (usbccid.ccid.pinpad) serves PC_to_RDR_Secure (CCID Rev 1.1
# §6.1.11) to a powered card; without a powered card there is no APDU to send, answered
# like an XfrBlock would be.
PINPAD_TRANSITIONS: dict[tuple[SlotState, SlotInput], Rule] = {
    (_A, _I.SECURE): _fail(_A, _MUTE),
    (_P, _I.SECURE): _fail(_P, _MUTE),
    (_ON, _I.SECURE): Rule(Action.PIN_ENTRY, _ON),
}

HOST_INPUTS = frozenset(SlotInput) - {SlotInput.INSERT, SlotInput.REMOVE}


def rule(
    state: SlotState, slot_input: SlotInput, *, busy: bool = False, pinpad: bool = False
) -> Rule:
    """What happens when ``slot_input`` meets a slot in ``state`` (of a reader with a PIN
    pad when ``pinpad``).

    A busy slot answers every host command with CMD_SLOT_BUSY and keeps its state;
    hot-plug still applies to it.
    """
    if busy and slot_input in HOST_INPUTS:
        return Rule(Action.FAIL, state, SlotError.CMD_SLOT_BUSY)
    if pinpad and (state, slot_input) in PINPAD_TRANSITIONS:
        return PINPAD_TRANSITIONS[(state, slot_input)]
    return TRANSITIONS[(state, slot_input)]
