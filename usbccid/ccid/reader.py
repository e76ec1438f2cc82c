"""The CCID reader: a :class:`~usbccid.usbip.function.UsbFunction`, sans-IO.

Bytes in through :meth:`CcidReader.bulk_out` and :meth:`CcidReader.control`, bytes out
through :meth:`CcidReader.poll_in`; card work out through :meth:`CcidReader.next_job`; time
in as ``now`` (CCID time extensions, :meth:`get_timer` / :meth:`handle_timer`). Nothing
here blocks, sleeps, or reads a clock.

Framing (CCID Rev 1.1 §3.2.1, §6): a command is one bulk-OUT *transfer*, which may reach
us as several OUT URBs; a URB whose length is not a multiple of the endpoint's
wMaxPacketSize ends with a short packet and so ends the transfer (USB 2.0 §5.8.3). The
message is complete when its 10-byte header plus dwLength bytes have arrived. Each reply
is one bulk-IN transfer: one whole message per IN completion, continued in the next IN
URBs when the host's buffer is smaller (libccid reads GetSlotStatus with a 10-byte buffer,
everything else with 10 + 65546 bytes), and never two messages in one completion (libccid
ReadUSB/CCID_Receive check ``length - 10 == dwLength``).

Errors: every host mistake and every slot condition is a :class:`CcidError`, which
:meth:`CcidReader._answer` turns into the command's reply type with bmCommandStatus =
FAILED and its bError. That is the only place the conversion happens.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from usbccid.card import Card
from usbccid.ccid.atr import default_parameters, parse_atr
from usbccid.ccid.cardjob import OP_MESSAGE, CardJob, CardOp
from usbccid.ccid.chaining import ApduChain, ResponseBlock
from usbccid.ccid.descriptor import ReaderConfig, interface_spec
from usbccid.ccid.errors import CcidError, CommandStatus, IccStatus, SlotError
from usbccid.ccid.identity import make_identity
from usbccid.ccid.pinpad import EntryState, PinOutcome, PinPad, pin_request
from usbccid.ccid.slot import ICC_STATUS, Action, SlotInput, SlotState, rule
from usbccid.ccid.wire import (
    HEADER_SIZE,
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
    PcToRdr,
    RdrToPc,
    Reply,
    ResetParameters,
    Secure,
    SetDataRateAndClockFrequency,
    SetParameters,
    SlotStatus,
    T0Apdu,
    T0Parameters,
    T1Parameters,
    UnknownCommand,
    XfrBlock,
    build_data_block,
    build_dwords,
    build_notify_slot_change,
    build_reply,
    parse_command,
    reply_type,
    unpack_header,
    unpack_xfr_block,
)
from usbccid.jobs import Job
from usbccid.usbip.errors import Stall
from usbccid.usbip.function import DeviceIdentity, InterfaceSpec, SetupPacket

logger = logging.getLogger(__name__)

# Class-specific requests (CCID Rev 1.1 §5.3).
REQUEST_ABORT = 0x01
REQUEST_GET_CLOCK_FREQUENCIES = 0x02
REQUEST_GET_DATA_RATES = 0x03

# libccid 1.5.2 sends every Gemalto reader (vendor 08E6h) the three message indexes of a
# PIN modification whatever bNumberMessage says (commands.c has_gemalto_modify_pin_bug).
GEMALTO_VENDOR_ID = 0x08E6

_INPUT_OF: dict[type[Command], SlotInput] = {
    IccPowerOn: SlotInput.POWER_ON,
    IccPowerOff: SlotInput.POWER_OFF,
    GetSlotStatus: SlotInput.GET_SLOT_STATUS,
    XfrBlock: SlotInput.XFR_BLOCK,
    GetParameters: SlotInput.GET_PARAMETERS,
    ResetParameters: SlotInput.RESET_PARAMETERS,
    SetParameters: SlotInput.SET_PARAMETERS,
    Escape: SlotInput.ESCAPE,
    IccClock: SlotInput.ICC_CLOCK,
    T0Apdu: SlotInput.T0_APDU,
    Secure: SlotInput.SECURE,
    Mechanical: SlotInput.MECHANICAL,
    SetDataRateAndClockFrequency: SlotInput.SET_DATA_RATE,
    UnknownCommand: SlotInput.UNKNOWN,
}


@dataclass(slots=True)
class _Outgoing:
    data: bytes
    slot: int
    time_extension: bool = False


class _Slot:
    """The reader's bookkeeping for one slot."""

    def __init__(self, index: int, card: Card | None, block_size: int) -> None:
        self.index = index
        self.card = card
        self.generation = 0
        self.state = SlotState.ABSENT
        self.job: CardJob | None = None
        self.next_extension: float | None = None
        self.atr: bytes | None = None
        self.protocol_num = 0
        self.parameters = b""
        self.chain = ApduChain(block_size)
        self.changed = False  # presence changed since the last NotifySlotChange
        # Multi-slot readers: a change was notified and the host has not asked this slot's
        # status since; it is notified again at renotify_at (armed with the next `now`).
        self.announced = False
        self.renotify_at: float | None = None
        self.renotify_count = 0
        self.abort_seq: int | None = None  # control ABORT seen, bulk Abort awaited
        self.bulk_abort_seq: int | None = None  # bulk Abort seen, control ABORT awaited
        self.deferred_abort_seq: int | None = None  # answer the bulk Abort after the job
        self.power_down()

    @property
    def busy(self) -> bool:
        return self.job is not None

    @property
    def icc_status(self) -> IccStatus:
        return ICC_STATUS[self.state]

    def power_down(self) -> None:
        """Card (if any) inactive, parameters back to defaults, no chaining in progress."""
        self.state = SlotState.PRESENT_INACTIVE if self.card is not None else SlotState.ABSENT
        self.atr = None
        self.protocol_num, self.parameters = default_parameters(None)
        self.chain.reset()


class CcidReader:
    """A virtual CCID reader (CCID Rev 1.1) with one or more slots.

    Args:
        slots: the number of slots (all empty), or one entry per slot: a card or None.
        identity: the USB device identity; default: the ``vmware`` preset with a fresh
            serial number (:func:`usbccid.ccid.identity.make_identity`).
        config: descriptor values and timing (:class:`ReaderConfig`).
        interface_name: the iInterface string; pcscd puts it in the reader name.

    Example::

        reader = CcidReader(identity=make_identity("vmware"), slots=1)
        reader.insert(0, card)
    """

    def __init__(
        self,
        slots: int | Sequence[Card | None] = 1,
        *,
        identity: DeviceIdentity | None = None,
        config: ReaderConfig | None = None,
        interface_name: str | None = "usbccid",
    ) -> None:
        cards: list[Card | None] = [None] * slots if isinstance(slots, int) else list(slots)
        if not 1 <= len(cards) <= 256:
            raise ValueError(f"a CCID reader has 1..256 slots, not {len(cards)}")
        self.identity = identity if identity is not None else make_identity()
        self.config = config if config is not None else ReaderConfig()
        self._interface = interface_spec(self.config, len(cards), interface_name)
        self._slots = [
            _Slot(index, card, self.config.max_data_length) for index, card in enumerate(cards)
        ]
        self._epoch = 0
        self._rx = bytearray()
        self._discard = 0  # bytes of a rejected bulk-OUT transfer still to drop
        self._out: deque[_Outgoing] = deque()
        self._out_offset = 0
        self._jobs: deque[CardJob] = deque()
        #: The PIN pad (PC_to_RDR_Secure) when the configuration has one: its keypad API
        #: (``enter``, ``prompt``) and ``policy`` are the local side (usbccid.ccid.pinpad).
        self.pinpad: PinPad | None = None
        if self.config.pinpad is not None:
            self.pinpad = PinPad(self.config.pinpad, self._pin_outcome)
        # Multi-slot readers: a NotifySlotChange goes out only once an interrupt poll has
        # seen it pending for notify_holdoff (armed with the next `now`).
        self._notify_seen = False
        self._notify_ready = False
        self._notify_ready_at: float | None = None
        self.reset()

    # ---------------------------------------------------------------- local API

    @property
    def slot_count(self) -> int:
        return len(self._slots)

    def slot_state(self, slot: int) -> SlotState:
        return self._local_slot(slot).state

    def card(self, slot: int) -> Card | None:
        return self._local_slot(slot).card

    def insert(self, slot: int, card: Card) -> None:
        """Put ``card`` into ``slot`` (hot-plug); the host is told by NotifySlotChange.

        Raises:
            ValueError: no such slot, or the slot already holds a card.
        """
        record = self._local_slot(slot)
        step = rule(record.state, SlotInput.INSERT)
        if step.action is Action.REJECT:
            raise ValueError(f"slot {slot} already holds a card")
        record.card = card
        record.generation += 1
        record.power_down()
        record.state = step.next_state
        record.changed = True
        record.renotify_count = 0

    def remove(self, slot: int) -> Card | None:
        """Take the card out of ``slot``; returns it (None if the slot was empty).

        Card work already handed out for it finishes, but its result is dropped: the
        host gets ICC_MUTE with bmICCStatus "no ICC", as after a real card removal.

        Raises:
            ValueError: no such slot.
        """
        record = self._local_slot(slot)
        step = rule(record.state, SlotInput.REMOVE)
        if step.action is Action.IGNORE:
            return None
        card, record.card = record.card, None
        record.generation += 1
        record.power_down()
        record.state = step.next_state
        record.changed = True
        record.renotify_count = 0
        job = record.job
        if job is not None and not job.started:
            # Not handed out yet: it never reaches the card.
            self._jobs.remove(job)
            record.job = None
            self._answer(OP_MESSAGE[job.op], record.index, job.seq, self._card_gone)
        self._drop_pin_entry(record, self._card_gone)
        return card

    # ---------------------------------------------------------------- UsbFunction

    @property
    def interface(self) -> InterfaceSpec:
        return self._interface

    def reset(self) -> None:
        """Back to the power-on state (new import, SET_CONFIGURATION).

        Cards stay in their slots but are inactive; queued replies, partial messages and
        outstanding jobs are forgotten (a job handed out before is ignored when it
        finishes). The next interrupt-IN poll reports every occupied slot as "present,
        changed" (CCID Rev 1.1 §6.3.1: the initial state).
        """
        self._epoch += 1
        self._rx.clear()
        self._discard = 0
        self._out.clear()
        self._out_offset = 0
        self._jobs.clear()
        if self.pinpad is not None:
            self.pinpad.clear()
        self._hold_notifications()
        for record in self._slots:
            record.job = None
            record.next_extension = None
            record.abort_seq = record.bulk_abort_seq = record.deferred_abort_seq = None
            record.power_down()
            record.changed = record.card is not None
            record.announced = False
            record.renotify_at = None
            record.renotify_count = 0

    def control(self, setup: SetupPacket, data: bytes) -> bytes:
        """CCID class requests (CCID Rev 1.1 §5.3); anything else stalls.

        Raises:
            Stall: not a CCID class request to the interface, wrong direction, or an
                ABORT for a slot that does not exist.
        """
        if setup.request_type != 1 or setup.recipient != 1:
            raise Stall(f"not a CCID class request: bmRequestType 0x{setup.bmRequestType:02X}")
        if setup.bRequest == REQUEST_ABORT and not setup.direction_in:
            # §5.3.1: wValue = bSeq << 8 | bSlot
            slot, seq = setup.wValue & 0xFF, setup.wValue >> 8
            if slot >= len(self._slots):
                raise Stall(f"ABORT for slot {slot}")
            self._control_abort(self._slots[slot], seq)
            return b""
        if setup.bRequest == REQUEST_GET_CLOCK_FREQUENCIES and setup.direction_in:
            clocks = sorted({self.config.default_clock, self.config.maximum_clock})
            return build_dwords(clocks)[: setup.wLength]
        if setup.bRequest == REQUEST_GET_DATA_RATES and setup.direction_in:
            rates = sorted({self.config.data_rate, self.config.max_data_rate})
            return build_dwords(rates)[: setup.wLength]
        raise Stall(f"unsupported CCID class request 0x{setup.bRequest:02X}")

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        """One bulk-OUT URB: part or all of a PC_to_RDR message.

        Never raises for anything the host sends: a message that cannot be framed is
        answered with bError 01h (dwLength) when its header is known, dropped otherwise.

        Raises:
            Stall: ``endpoint`` is not this reader's bulk-OUT endpoint.
        """
        if endpoint != self.config.bulk_out_address:
            raise Stall(f"bulk OUT to endpoint 0x{endpoint:02X}")
        ends_transfer = len(data) % self.config.bulk_max_packet_size != 0 or not data
        if self._discard > 0:
            self._discard -= len(data)
            if ends_transfer:
                self._discard = 0
            return
        self._rx += data
        if len(self._rx) < HEADER_SIZE:
            if ends_transfer and self._rx:
                # Without bSlot/bSeq there is nothing to answer (libccid never does this).
                logger.debug("dropping a %d-byte bulk-OUT fragment", len(self._rx))
                self._rx.clear()
            return
        message_type, length, slot, seq, _ = unpack_header(self._rx)
        total = HEADER_SIZE + length
        if total > self.config.max_message_length or (len(self._rx) < total and ends_transfer):
            # §5.1 dwMaxCCIDMessageLength exceeded, or the transfer ended early.
            self._reject_length(message_type, slot, seq)
            if not ends_transfer:
                self._discard = total - len(self._rx)
            self._rx.clear()
            return
        if len(self._rx) < total:
            return  # a full-size URB: the transfer goes on
        if len(self._rx) > total:
            # More bytes than dwLength announces: the transfer disagrees with the header.
            self._reject_length(message_type, slot, seq)
            if not ends_transfer:
                self._discard = self.config.max_message_length
            self._rx.clear()
            return
        message = bytes(self._rx)
        self._rx.clear()
        self._answer(message_type, slot, seq, lambda: self._command(message))

    def poll_in(self, endpoint: int, max_length: int) -> bytes | None:
        """Data for an IN URB of ``max_length`` bytes, or None to keep it parked."""
        if max_length <= 0:
            return None
        if endpoint == self.config.bulk_in_address:
            return self._poll_bulk_in(max_length)
        if endpoint == self.config.interrupt_in_address:
            return self._poll_interrupt_in(max_length)
        return None

    def next_job(self, now: float) -> Job | None:
        """The next card operation to run; ``now`` is when it starts."""
        self._arm_renotify(now)  # the driver calls this after every event
        if self.pinpad is not None:
            for slot in self.pinpad.arm(now):  # new PIN entries: deadline, time extensions
                if self.pinpad.waiting(slot):
                    self._slots[slot].next_extension = now + self.config.time_extension_interval
        if not self._jobs:
            return None
        job = self._jobs.popleft()
        job.started = True
        if job.op is CardOp.TRANSMIT:
            # Only XfrBlock waits are extended: libccid reads time extensions in
            # CCID_Receive (and CmdEscapeCheck) only; CmdPowerOn would take one for an
            # empty ATR (commands.c), so power-on/off never get one.
            self._slots[job.slot].next_extension = now + self.config.time_extension_interval
        return job

    def get_timer(self) -> float | None:
        deadlines = [s.next_extension for s in self._slots if s.next_extension is not None]
        deadlines += [s.renotify_at for s in self._slots if s.renotify_at is not None]
        pin_deadline = self.pinpad.get_timer() if self.pinpad is not None else None
        if pin_deadline is not None:
            deadlines.append(pin_deadline)
        if self._notify_ready_at is not None and not self._notify_ready:
            deadlines.append(self._notify_ready_at)
        return min(deadlines) if deadlines else None

    def handle_timer(self, now: float) -> None:
        """Queue a time extension (CCID Rev 1.1 §6.2.6, bmCommandStatus 2) for every
        transmit that is due one. At most one is waiting per slot at any time, so every
        bulk-IN completion carries at most one, and never with the final reply. Also
        repeats the unanswered slot notifications of a multi-slot reader (_renotify) and
        ends its notification hold-off."""
        if self._notify_ready_at is not None and now >= self._notify_ready_at:
            self._notify_ready = True
        self._renotify(now)
        if self.pinpad is not None:
            self.pinpad.expire(now)  # a PIN entry past its bTimeOut: PIN_TIMEOUT
        interval = self.config.time_extension_interval
        for record in self._slots:
            due = record.next_extension
            seq = self._pending_seq(record)
            if due is None or now < due or seq is None:
                continue
            if not any(o.time_extension and o.slot == record.index for o in self._out):
                extension = DataBlock(
                    record.index,
                    seq,
                    icc_status=record.icc_status,
                    command_status=CommandStatus.TIME_EXTENSION,
                    error=self.config.time_extension_multiplier,
                )
                self._out.append(_Outgoing(build_reply(extension), record.index, True))
            record.next_extension = now + interval

    # ---------------------------------------------------------------- replies

    def _answer(
        self, message_type: int, slot: int, seq: int, produce: Callable[[], Reply | bytes | None]
    ) -> None:
        """Run ``produce`` and queue its reply (a :class:`Reply`, or one already built: the
        hot path's DataBlock); a CcidError becomes the failed reply.

        This is the one place where the CCID error family meets the wire.
        """
        try:
            reply = produce()
        except CcidError as exc:
            record = self._slots[slot] if slot < len(self._slots) else None
            if exc.icc_status is not None:
                icc = exc.icc_status
            elif record is not None:
                icc = record.icc_status
            else:
                icc = IccStatus.ABSENT
            reply = self._failed(reply_type(message_type), slot, seq, icc, exc.error)
        if type(reply) is bytes:
            self._out.append(_Outgoing(reply, slot))
        elif reply is not None:
            assert isinstance(reply, Reply)
            self._send(reply)

    def _failed(self, kind: RdrToPc, slot: int, seq: int, icc: IccStatus, error: int) -> Reply:
        common = (slot, seq, icc, CommandStatus.FAILED, error)
        match kind:
            case RdrToPc.DATA_BLOCK:
                return DataBlock(*common)
            case RdrToPc.PARAMETERS:
                return Parameters(*common)
            case RdrToPc.ESCAPE:
                return EscapeReply(*common)
            case RdrToPc.DATA_RATE_AND_CLOCK_FREQUENCY:
                # §6.2.5: dwLength is always 8
                return DataRateAndClockFrequency(
                    *common,
                    clock_frequency=self.config.default_clock,
                    data_rate=self.config.data_rate,
                )
        return SlotStatus(*common)

    def _send(self, reply: Reply) -> None:
        self._out.append(_Outgoing(build_reply(reply), reply.slot))

    def _reject_length(self, message_type: int, slot: int, seq: int) -> None:
        def fail() -> Reply:
            raise CcidError(SlotError.BAD_LENGTH, "dwLength disagrees with the transfer")

        self._answer(message_type, slot, seq, fail)

    def _poll_bulk_in(self, max_length: int) -> bytes | None:
        if not self._out:
            return None
        head = self._out[0]
        chunk = head.data[self._out_offset : self._out_offset + max_length]
        self._out_offset += len(chunk)
        if self._out_offset >= len(head.data):
            self._out.popleft()
            self._out_offset = 0
        return chunk

    def _poll_interrupt_in(self, max_length: int) -> bytes | None:
        """RDR_to_PC_NotifySlotChange (§6.3.1) for the slots that changed, if any.

        A multi-slot reader also notes which slots it announced: libccid 1.5.2 keeps one
        interrupt URB per multi-slot reader (ccid_usb.c Multi_PollingProc) and passes each
        notification to the slots' pcscd threads with a pthread_cond_broadcast
        (Multi_InterruptRead); a slot thread that is not waiting at that moment -- busy with
        its own GetSlotStatus, a power-off at the end of pcscd's grace period, a command
        of the other slot -- misses it, and pcscd sees the change only at the thread's
        next timeout (5 s, or 10 minutes for an unpowered card). A real card is not
        moved twice within milliseconds, a virtual one is. So such a slot is notified
        again (:meth:`_renotify`) until the host sends it a PC_to_RDR_GetSlotStatus, which
        is what pcscd's slot thread does first when it wakes up.

        And a multi-slot reader never completes an interrupt URB the moment it arrives.
        libccid 1.5.2's polling thread (ccid_usb.c Multi_PollingProc) submits its URB and
        only then sets the ``completed`` flag the completion callback sets; the callback
        may run first on another thread handling libusb events (Multi_ReadProc's bulk
        read), and then its ``completed = 1`` is overwritten, and the polling thread waits
        in libusb_handle_events_completed forever: no card event of that reader reaches
        pcscd again (the removal is seen at pcscd's 5 s status poll, an insertion not at
        all). Upstream fixed it in 1.7.0 (commit 571eaf8, "multi slots: fix potential race
        in interrupt handling"). A real reader answers at its next bInterval with a change
        that is rarely pending already; ours had one pending whenever a change (or a
        repeat) came while the host was between two URBs, and always at import. Seen in
        the guest (tests/vm/test_pcscd.py): the polling thread stuck after its "waiting"
        log line, the slot threads waiting on its broadcast. So a notification goes out
        only once an interrupt poll has seen it pending for ``notify_holdoff`` seconds: a
        URB that arrives with a change pending is answered that much later, never at once
        (the first one after an import, one resubmitted after a completion however late
        the host's thread gets to it), and a change that comes while a URB is parked
        waits as long.
        """
        if not any(record.changed for record in self._slots):
            return None  # nothing changed since the last report: keep the URB parked
        if self._holds_notifications and not self._notify_ready:
            self._notify_seen = True  # the hold-off starts with the next `now`
            return None
        message = build_notify_slot_change(
            [record.card is not None for record in self._slots],
            [record.changed for record in self._slots],
        )
        if len(message) > max_length:
            return None
        for record in self._slots:
            if record.changed and len(self._slots) > 1:
                record.announced = True
                record.renotify_at = None  # armed by the next _arm_renotify(now)
            record.changed = False
        self._hold_notifications()
        return message

    @property
    def _holds_notifications(self) -> bool:
        return len(self._slots) > 1 and self.config.notify_holdoff > 0

    def _hold_notifications(self) -> None:
        """Start over: the next NotifySlotChange waits to be seen for notify_holdoff."""
        self._notify_seen = self._notify_ready = False
        self._notify_ready_at = None

    def _arm_renotify(self, now: float) -> None:
        if self._notify_seen and self._notify_ready_at is None:
            self._notify_ready_at = now + self.config.notify_holdoff
        for record in self._slots:
            if record.announced and record.renotify_at is None and not record.changed:
                delay = self.config.renotify_interval * 2**record.renotify_count
                record.renotify_at = now + min(delay, self.config.renotify_max_interval)

    def _renotify(self, now: float) -> None:
        """Notify again the announced slots whose status the host has not asked for."""
        self._arm_renotify(now)
        for record in self._slots:
            if record.renotify_at is None or now < record.renotify_at:
                continue
            record.renotify_at = None
            if record.renotify_count >= self.config.renotify_limit:
                record.announced = False  # nobody is listening: give up
                continue
            record.renotify_count += 1
            record.changed = True

    # ---------------------------------------------------------------- commands

    def _command(self, message: bytes) -> Reply | bytes | None:
        message_type, _, slot, seq, specific = unpack_header(message)
        self._bound_unread_replies()
        if slot >= len(self._slots):
            raise CcidError(SlotError.BAD_SLOT, icc_status=IccStatus.ABSENT)
        record = self._slots[slot]
        if record.abort_seq is not None and message_type != PcToRdr.ABORT:
            # §5.3.1: after the ABORT request the slot drops everything but the matching
            # PC_to_RDR_Abort.
            return None
        if message_type == PcToRdr.XFR_BLOCK:
            # The hot path: an APDU, framed by bulk_out already (10 + dwLength bytes, the
            # whole of PC_TO_RDR's checks for an XfrBlock), without a parsed Command.
            step = rule(record.state, SlotInput.XFR_BLOCK, busy=record.busy)
            if step.action is Action.CARD_TRANSMIT:
                _bwi, level = unpack_xfr_block(specific)
                return self._xfr_block(record, seq, level, message[HEADER_SIZE:], step.next_state)
        command = parse_command(message)
        if isinstance(command, GetSlotStatus):
            # The host has looked at this slot since its last notification.
            record.announced = False
            record.renotify_at = None
        if isinstance(command, Abort):
            return self._bulk_abort(record, command.seq)
        busy = record.busy or (self.pinpad is not None and self.pinpad.waiting(record.index))
        step = rule(
            record.state, _INPUT_OF[type(command)], busy=busy, pinpad=self.pinpad is not None
        )
        match step.action:
            case Action.FAIL:
                assert step.error is not None
                raise CcidError(step.error)
            case Action.REPLY:
                return self._reply_now(record, command)
            case Action.CARD_POWER_ON:
                assert isinstance(command, IccPowerOn)
                if command.power_select > 3:  # §6.1.1: 0 automatic, 1..3 a voltage
                    raise CcidError(SlotError.BAD_PARAMETER_7, "bPowerSelect")
                record.chain.reset()
                return self._start(record, CardOp.POWER_ON, command.seq, step.next_state)
            case Action.CARD_POWER_OFF:
                record.chain.reset()
                return self._start(record, CardOp.POWER_OFF, command.seq, step.next_state)
            case Action.CARD_TRANSMIT:
                assert isinstance(command, XfrBlock)
                return self._xfr_block(
                    record, command.seq, command.level_parameter, command.data, step.next_state
                )
            case Action.PIN_ENTRY:
                assert isinstance(command, Secure)
                assert self.pinpad is not None
                gemalto = self.identity.vendor_id == GEMALTO_VENDOR_ID
                request = pin_request(command.data, command.level_parameter, gemalto=gemalto)
                record.chain.reset()
                self.pinpad.start(record.index, command.seq, request)
                return None  # answered when the entry ends (_pin_outcome)
        raise AssertionError(f"no host command leads to {step.action}")

    def _reply_now(self, record: _Slot, command: Command) -> Reply:
        slot, seq, icc = record.index, command.seq, record.icc_status
        match command:
            case GetSlotStatus() | IccPowerOff():
                if isinstance(command, IccPowerOff):
                    record.chain.reset()
                return SlotStatus(slot, seq, icc)
            case GetParameters():
                return Parameters(
                    slot, seq, icc, protocol_num=record.protocol_num, data=record.parameters
                )
            case ResetParameters():
                record.protocol_num, record.parameters = default_parameters(record.atr)
                return Parameters(
                    slot, seq, icc, protocol_num=record.protocol_num, data=record.parameters
                )
            case SetParameters():
                self._set_parameters(record, command)
                return Parameters(
                    slot, seq, icc, protocol_num=record.protocol_num, data=record.parameters
                )
            case SetDataRateAndClockFrequency():
                if len(command.data) != 8:
                    raise CcidError(SlotError.BAD_LENGTH)
                # One clock, one rate (bNumClockSupported = bNumDataRatesSupported = 0,
                # automatic clock and baud): §6.2.5 answers with the values in use.
                return DataRateAndClockFrequency(
                    slot,
                    seq,
                    icc,
                    clock_frequency=self.config.default_clock,
                    data_rate=self.config.data_rate,
                )
        raise AssertionError(f"no immediate reply for {command!r}")

    def _set_parameters(self, record: _Slot, command: SetParameters) -> None:
        """PC_to_RDR_SetParameters (§6.1.7): 5 bytes for T=0, 7 for T=1."""
        if command.protocol_num not in (0, 1):
            raise CcidError(SlotError.BAD_PARAMETER_7, "bProtocolNum")
        if len(command.data) != (5 if command.protocol_num == 0 else 7):
            raise CcidError(SlotError.BAD_LENGTH, "abProtocolDataStructure length")
        if command.protocol_num == 0:
            data = T0Parameters.parse(command.data).build()
        else:
            data = T1Parameters.parse(command.data).build()
        if record.atr is not None and command.protocol_num not in parse_atr(record.atr).protocols:
            raise CcidError(SlotError.ICC_PROTOCOL_NOT_SUPPORTED)
        record.protocol_num, record.parameters = command.protocol_num, data

    def _xfr_block(
        self, record: _Slot, seq: int, level: int, data: bytes, next_state: SlotState
    ) -> Reply | bytes | None:
        """XfrBlock at extended APDU level: a whole APDU starts the card, a chain block
        is acknowledged or answered with the next response block (usbccid.ccid.chaining)."""
        step = record.chain.command(level, data)
        if isinstance(step, bytes):
            return self._start(record, CardOp.TRANSMIT, seq, next_state, step)
        return self._data_block(record, seq, step)

    def _data_block(self, record: _Slot, seq: int, block: ResponseBlock) -> bytes:
        """The RDR_to_PC_DataBlock carrying ``block``, built (the hot path's reply)."""
        return build_data_block(
            record.index, seq, ICC_STATUS[record.state], block.data, block.chain
        )

    def _start(
        self,
        record: _Slot,
        op: CardOp,
        seq: int,
        next_state: SlotState,
        apdu: bytes = b"",
        *,
        keyed: bool = False,
    ) -> Reply | None:
        """Queue card work for ``record``; the reply comes when the job finishes (None)."""
        assert record.card is not None
        assert record.job is None
        job = CardJob(
            self,
            epoch=self._epoch,
            slot=record.index,
            generation=record.generation,
            seq=seq,
            op=op,
            card=record.card,
            next_state=next_state,
            apdu=apdu,
            keyed=keyed,
        )
        record.job = job
        self._jobs.append(job)
        return None

    def _card_gone(self) -> Reply:
        raise CcidError(SlotError.ICC_MUTE, "the card left during the command")

    def _finish(self, job: CardJob) -> None:
        if job.epoch != self._epoch:
            return  # the reader was reset since
        record = self._slots[job.slot]
        if record.job is not job:
            return
        record.job = None
        record.next_extension = None
        self._drop_unread_time_extensions(job.slot)
        self._answer(OP_MESSAGE[job.op], job.slot, job.seq, lambda: self._job_reply(record, job))
        if record.deferred_abort_seq is not None:
            seq, record.deferred_abort_seq = record.deferred_abort_seq, None
            self._send(SlotStatus(record.index, seq, record.icc_status))

    def _job_reply(self, record: _Slot, job: CardJob) -> Reply | bytes:
        """What the host hears about finished card work (outside the slot table)."""
        if job.generation != record.generation:
            return self._card_gone()  # removed (or replaced) while the card worked
        if job.exception is not None or job.result is None:
            logger.error("card %r failed in %s", job.card, job.op.name, exc_info=job.exception)
            if job.op is not CardOp.TRANSMIT:
                record.power_down()
            raise CcidError(SlotError.HW_ERROR, "card failure")
        if job.op is CardOp.POWER_ON:
            record.power_down()
            record.state = job.next_state
            record.atr = job.result
            record.protocol_num, record.parameters = default_parameters(job.result)
        elif job.op is CardOp.POWER_OFF:
            record.power_down()
            record.state = job.next_state
        if job.aborted:
            raise CcidError(SlotError.CMD_ABORTED)
        if job.op is CardOp.POWER_OFF:
            return SlotStatus(record.index, job.seq, record.icc_status)
        return self._data_block(record, job.seq, record.chain.respond(job.result))

    # ---------------------------------------------------------------- abort (§5.3.1)

    def _control_abort(self, record: _Slot, seq: int) -> None:
        record.chain.reset()
        job = record.job
        if job is not None and not job.started:
            self._jobs.remove(job)
            record.job = None

            def aborted() -> Reply:
                raise CcidError(SlotError.CMD_ABORTED)

            self._answer(OP_MESSAGE[job.op], record.index, job.seq, aborted)
        elif job is not None:
            job.aborted = True

        def aborted_entry() -> Reply:
            raise CcidError(SlotError.CMD_ABORTED)

        self._drop_pin_entry(record, aborted_entry)
        if record.bulk_abort_seq == seq:
            record.bulk_abort_seq = None
            self._complete_abort(record, seq)
        else:
            record.abort_seq = seq

    def _bulk_abort(self, record: _Slot, seq: int) -> Reply | None:
        if record.abort_seq == seq:
            record.abort_seq = None
            self._complete_abort(record, seq)
        else:
            record.bulk_abort_seq = seq  # wait for the ABORT control request
        return None

    def _complete_abort(self, record: _Slot, seq: int) -> None:
        if record.job is not None:
            record.deferred_abort_seq = seq  # after the aborted command's own reply
        else:
            self._send(SlotStatus(record.index, seq, record.icc_status))

    # ---------------------------------------------------------------- PIN pad (§6.1.11)

    def _pin_outcome(self, slot: int, outcome: PinOutcome) -> None:
        """A PIN entry ended (keys, policy or timeout): answer its Secure command."""
        record = self._slots[slot]
        record.next_extension = None
        self._drop_unread_time_extensions(slot)
        if outcome.state is EntryState.ENTERED:
            # The keyed APDU goes to the card like an XfrBlock's; the answer is its response.
            self._start(
                record, CardOp.TRANSMIT, outcome.seq, SlotState.ACTIVE, outcome.apdu, keyed=True
            )
            return

        def answer() -> Reply:
            if outcome.state is EntryState.CANCELLED:
                raise CcidError(SlotError.PIN_CANCELLED, "PIN entry cancelled")
            if outcome.state is EntryState.TIMED_OUT:
                raise CcidError(SlotError.PIN_TIMEOUT, "PIN entry timed out")
            return DataBlock(record.index, outcome.seq, record.icc_status, data=outcome.status_word)

        self._answer(PcToRdr.SECURE, slot, outcome.seq, answer)

    def _drop_pin_entry(self, record: _Slot, answer: Callable[[], Reply | None]) -> None:
        """End the slot's waiting PIN entry without the keypad (card gone, abort)."""
        seq = self.pinpad.drop(record.index) if self.pinpad is not None else None
        if seq is None:
            return
        record.next_extension = None
        self._drop_unread_time_extensions(record.index)
        self._answer(PcToRdr.SECURE, record.index, seq, answer)

    def _pending_seq(self, record: _Slot) -> int | None:
        """bSeq of the command the slot is busy with (card work or a PIN entry)."""
        if record.job is not None:
            return record.job.seq
        return self.pinpad.seq(record.index) if self.pinpad is not None else None

    # ---------------------------------------------------------------- helpers

    def _bound_unread_replies(self) -> None:
        """Before a new command: drop the oldest unread replies past a bound.

        The host reads each command's response before it sends the next command to that
        slot (CCID Rev 1.1 §5.2.1, §6.2), so a working host never leaves more than about
        one full-size reply per slot unread. The bound, one full-size message more than
        that, is never reached by such a host; a host that sends commands and never
        reads meets it, and the replies it gave up on go first (libccid would skip them
        anyway: it discards replies with a stale bSeq, ccid_usb.c ReadUSB). A reply the
        host has started to read is completed.
        """
        if not self._out:
            return  # the common case: the host read everything before its next command
        limit = (len(self._slots) + 1) * self.config.max_message_length
        first_unread = 1 if self._out_offset else 0
        unread = sum(len(o.data) for o in itertools.islice(self._out, first_unread, None))
        while unread > limit and len(self._out) > first_unread:
            dropped = self._out[first_unread]
            del self._out[first_unread]
            unread -= len(dropped.data)

    def _drop_unread_time_extensions(self, slot: int) -> None:
        """A time extension the host has not started to read is moot once the reply is
        there; one already partly read must be completed."""
        if not any(o.time_extension for o in self._out):
            return
        kept = deque(
            o
            for index, o in enumerate(self._out)
            if not (o.time_extension and o.slot == slot) or (index == 0 and self._out_offset)
        )
        self._out = kept

    def _local_slot(self, slot: int) -> _Slot:
        if not 0 <= slot < len(self._slots):
            raise ValueError(f"no slot {slot}; this reader has {len(self._slots)}")
        return self._slots[slot]
