"""The card owner's side of one VSCard connection to QEMU's ccid-card-passthru, sans-IO.

Feed what the socket gives to :meth:`VscardClient.receive_data` (``b""`` for EOF), write
what :meth:`~VscardClient.data_to_send` returns, and run the card work that
:meth:`~VscardClient.next_job` hands out (``run()``, possibly on a thread, then
``finish()`` here). The stream may be split anywhere: a message is parsed once all of it
has arrived, and its length is checked on the 12-byte header, before its payload is held.

The conversation, as QEMU 7.2 holds it (hw/usb/ccid-card-passthru.c,
``ccid_card_vscard_handle_message``; libcacard vscclient.c is the reference client):

1. We send ``Init`` first: QEMU's own ``Init``, written when the device is realized, is
   lost when nobody was connected yet; QEMU answers every ``Init`` with its own.
2. On the host's ``Init`` (magic ``VSCD``, major version 0) we send ``ReaderRemove`` (as
   vscclient does: QEMU keeps its reader and card across a chardev reconnect, since it
   ignores CHR_EVENT_CLOSED, so this clears what a previous connection left) and
   ``ReaderAdd``. QEMU answers each with ``Error``, ReaderAdd's carrying our reader id
   (0: QEMU has one reader per device).
3. With a card, ``card.power_on()`` gives the ``ATR`` we send: that is "card inserted".
   QEMU checks it (at most 40 bytes, TS 3B/3F, consistent length) and answers
   ``Error(SUCCESS)`` or ``Error(GENERAL_ERROR)``.
4. QEMU sends each guest APDU as ``APDU``; we answer with ``APDU`` (the card's response)
   or, if the card cannot answer, ``Error`` (QEMU then fails the guest's XfrBlock).
   ``Flush`` is answered with ``FlushComplete`` once every APDU before it is answered
   (QEMU 7.2 never sends it; vscclient answers it).
5. Removal is ``CardRemove``; leaving is ``CardRemove`` + ``ReaderRemove``.

QEMU sends no power or reset over VSCard: usb-ccid answers the guest's IccPowerOn with
the ATR it stored and IccPowerOff locally (dev-smartcard-reader.c), so the card is
powered on once per insertion and off when it is removed.

Every ``Error`` QEMU sends answers one of our requests, in order (it handles messages one
at a time and answers at once); we keep the requests in a queue and match each ``Error``
to the oldest. Only the answer to the newest request moves the state: an older one has
been overtaken (an ATR answered after we already sent CardRemove, say).

The connection's states are the table :data:`TRANSITIONS`. A received input the table does
not list raises :class:`VscardProtocolError` (answered with ``Error`` and a close); a
local one raises :class:`VscardLocalError` (our bug).

Never answer with ``Error`` when QEMU has no APDU waiting: ``ccid_card_card_error`` then
only marks the *next* reply to the guest (whatever it is) as failed. Hence APDUs that
QEMU sent before it saw our ReaderRemove or CardRemove (it has already dropped them) are
dropped here too, without an answer.

Memory stays bounded: a payload over ``max_payload`` bytes is refused on its header, at
most ``max_pending`` APDUs wait for the card (QEMU sends one at a time), and the input
buffer holds at most one partial message besides the last chunk given.
"""

from __future__ import annotations

import enum
import logging
from collections import deque
from dataclasses import dataclass
from typing import Final, TypeAlias

from usbccid.card import Card
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.errors import (
    UNDEFINED_READER_ID,
    ErrorCode,
    VscardError,
    VscardLocalError,
    VscardMessageError,
    VscardProtocolError,
)
from usbccid.jobs import Job

log = logging.getLogger(__name__)

MAX_PAYLOAD: Final = 1 << 16
"""Largest payload accepted. QEMU's usb-ccid reassembles a guest command in 64 KiB
(``BULK_OUT_DATA_SIZE``), so its C-APDUs stay below that (65526 bytes)."""

MAX_RESPONSE: Final = 374
"""Largest R-APDU sent to QEMU. usb-ccid queues each reply to the guest in a 384-byte
buffer (``BULK_IN_BUF_SIZE``; 10 bytes of CCID header): a longer one is discarded
(QEMU 7.2) or failed (newer QEMU) there, so we answer ``Error`` instead, which fails the
guest's XfrBlock at once rather than leaving it to time out."""

MAX_ATR: Final = 40
"""ccid-card-passthru.c ``MAX_ATR_SIZE``: a longer ATR is refused."""

MAX_PENDING: Final = 16
"""APDUs that may wait for the card. QEMU forwards one guest APDU at a time."""

MAX_REQUESTS: Final = 64
"""Our requests (ReaderAdd, ATR, CardRemove, ...) that may wait for their answers."""

MAX_MESSAGES_PER_READ: Final = 64
"""Messages one :meth:`VscardClient.receive_data` may hold. QEMU answers our few requests
and sends one APDU, then waits for our answer, so what it sends between two of our writes
is a handful of messages; a peer that packs thousands of small messages into one read
(each is parsed, and answered) is cut off instead of keeping the loop busy."""


class State(enum.Enum):
    AWAIT_INIT = "await-init"  # our Init sent; the host's awaited
    ADDING_READER = "adding-reader"  # ReaderRemove + ReaderAdd sent; their answers awaited
    EMPTY = "empty"  # the host has our reader, no card in it
    POWERING = "powering"  # card.power_on() running for the ATR
    INSERTING = "inserting"  # ATR sent; its answer awaited
    INSERTED = "inserted"  # the host took the ATR: APDUs flow
    REFUSED = "refused"  # the host refused the ATR, or the card gave none it could take
    REMOVING = "removing"  # CardRemove sent; its answer awaited
    CLOSED = "closed"  # EOF, a fatal error, or we left


class Input(enum.Enum):
    RECV_INIT = "recv Init"
    RECV_READER_ADDED = "recv Error(SUCCESS) for ReaderAdd"
    RECV_READER_REFUSED = "recv Error(failure) for ReaderAdd"
    RECV_ATR_ACCEPTED = "recv Error(SUCCESS) for ATR"
    RECV_ATR_REFUSED = "recv Error(failure) for ATR"
    RECV_CARD_REMOVED = "recv Error for CardRemove"
    RECV_OVERTAKEN_ANSWER = "recv Error for an overtaken or no request"
    RECV_APDU = "recv APDU"
    RECV_FLUSH = "recv Flush"
    RECV_UNEXPECTED = "recv a type no host sends"
    RECV_EOF = "recv EOF"
    POWERED = "card powered on"
    POWER_FAILED = "card power-on failed"
    INSERT = "insert"
    REMOVE = "remove"
    LEAVE = "leave"


class Action(enum.Enum):
    NONE = "none"
    SEND_READER_ADD = "send ReaderRemove + ReaderAdd"
    POWER_ON = "start card.power_on()"
    SEND_ATR = "send ATR"
    SEND_CARD_REMOVE = "send CardRemove, power the card off"
    TRANSMIT = "queue the APDU for the card"
    REJECT = "answer Error(GENERAL_ERROR)"
    DROP = "drop the APDU: the host has dropped it already"
    FLUSH = "queue FlushComplete behind the pending APDUs"
    LEAVE = "send CardRemove (if in) + ReaderRemove, close"
    CLOSE = "close"


RECEIVED_INPUTS: Final = frozenset(i for i in Input if i.name.startswith("RECV_"))

_AFTER_INIT: Final = (
    State.ADDING_READER,
    State.EMPTY,
    State.POWERING,
    State.INSERTING,
    State.INSERTED,
    State.REFUSED,
    State.REMOVING,
)
_OPEN: Final = (State.AWAIT_INIT, *_AFTER_INIT)


def _table() -> dict[tuple[State, Input], tuple[State, Action]]:
    s, i, a = State, Input, Action
    t: dict[tuple[State, Input], tuple[State, Action]] = {
        (s.AWAIT_INIT, i.RECV_INIT): (s.ADDING_READER, a.SEND_READER_ADD),
        (s.ADDING_READER, i.RECV_READER_ADDED): (s.EMPTY, a.NONE),
        (s.ADDING_READER, i.RECV_READER_REFUSED): (s.CLOSED, a.CLOSE),
        (s.INSERTING, i.RECV_ATR_ACCEPTED): (s.INSERTED, a.NONE),
        (s.INSERTING, i.RECV_ATR_REFUSED): (s.REFUSED, a.NONE),
        (s.REMOVING, i.RECV_CARD_REMOVED): (s.EMPTY, a.NONE),
        (s.POWERING, i.POWERED): (s.INSERTING, a.SEND_ATR),
        (s.POWERING, i.POWER_FAILED): (s.REFUSED, a.NONE),
        # A guest APDU. Before Init, QEMU may still hold a card from an earlier
        # connection and forward an APDU for it: Error fails it at once. Between our
        # ReaderRemove / CardRemove and its answer, QEMU has dropped it already.
        (s.AWAIT_INIT, i.RECV_APDU): (s.AWAIT_INIT, a.REJECT),
        (s.ADDING_READER, i.RECV_APDU): (s.ADDING_READER, a.DROP),
        (s.EMPTY, i.RECV_APDU): (s.EMPTY, a.REJECT),
        (s.POWERING, i.RECV_APDU): (s.POWERING, a.REJECT),
        (s.INSERTING, i.RECV_APDU): (s.INSERTING, a.TRANSMIT),
        (s.INSERTED, i.RECV_APDU): (s.INSERTED, a.TRANSMIT),
        (s.REFUSED, i.RECV_APDU): (s.REFUSED, a.REJECT),
        (s.REMOVING, i.RECV_APDU): (s.REMOVING, a.DROP),
        # Inserting a card: announced once the reader exists; a card in the reader is
        # removed first (then re-inserted on the way through EMPTY).
        (s.AWAIT_INIT, i.INSERT): (s.AWAIT_INIT, a.NONE),
        (s.ADDING_READER, i.INSERT): (s.ADDING_READER, a.NONE),
        (s.EMPTY, i.INSERT): (s.POWERING, a.POWER_ON),
        (s.POWERING, i.INSERT): (s.POWERING, a.POWER_ON),
        (s.INSERTING, i.INSERT): (s.REMOVING, a.SEND_CARD_REMOVE),
        (s.INSERTED, i.INSERT): (s.REMOVING, a.SEND_CARD_REMOVE),
        (s.REFUSED, i.INSERT): (s.POWERING, a.POWER_ON),
        (s.REMOVING, i.INSERT): (s.REMOVING, a.NONE),
        (s.AWAIT_INIT, i.REMOVE): (s.AWAIT_INIT, a.NONE),
        (s.ADDING_READER, i.REMOVE): (s.ADDING_READER, a.NONE),
        (s.EMPTY, i.REMOVE): (s.EMPTY, a.NONE),
        (s.POWERING, i.REMOVE): (s.EMPTY, a.NONE),
        (s.INSERTING, i.REMOVE): (s.REMOVING, a.SEND_CARD_REMOVE),
        (s.INSERTED, i.REMOVE): (s.REMOVING, a.SEND_CARD_REMOVE),
        (s.REFUSED, i.REMOVE): (s.EMPTY, a.NONE),
        (s.REMOVING, i.REMOVE): (s.REMOVING, a.NONE),
        (s.CLOSED, i.RECV_EOF): (s.CLOSED, a.NONE),
        (s.CLOSED, i.LEAVE): (s.CLOSED, a.NONE),
        (s.CLOSED, i.INSERT): (s.CLOSED, a.NONE),
        (s.CLOSED, i.REMOVE): (s.CLOSED, a.NONE),
    }
    for state in _AFTER_INIT:
        # A second Init (QEMU's realize-time one arriving after ours, or its answer to
        # ours when both crossed): vscard_common.h says Init is sent once; ignore it.
        t[(state, i.RECV_INIT)] = (state, a.NONE)
        t[(state, i.RECV_OVERTAKEN_ANSWER)] = (state, a.NONE)
        t[(state, i.RECV_FLUSH)] = (state, a.FLUSH)
    for state in _OPEN:
        t[(state, i.RECV_EOF)] = (s.CLOSED, a.CLOSE)
        t[(state, i.LEAVE)] = (s.CLOSED, a.LEAVE)
    # RECV_UNEXPECTED appears nowhere: a message type only clients send (ReaderAdd, ATR,
    # ...) or no one defines means the peer is not a VSCard host (VscardProtocolError).
    return t


TRANSITIONS: Final = _table()
"""Every allowed (state, input) pair: the next state and what to do."""


class StateMachine:
    """The state of one connection, driven by :data:`TRANSITIONS`."""

    def __init__(self, state: State = State.AWAIT_INIT) -> None:
        self.state = state

    def process(self, event: Input) -> Action:
        """Apply ``event``; returns the action to take (the state is already the new one).

        Raises:
            VscardProtocolError: a received input the table does not allow (the state
                becomes CLOSED).
            VscardLocalError: a local input the table does not allow (state unchanged).
        """
        try:
            self.state, action = TRANSITIONS[(self.state, event)]
        except KeyError:
            message = f"{event.value} not allowed in state {self.state.value}"
            if event in RECEIVED_INPUTS:
                self.state = State.CLOSED
                raise VscardProtocolError(message) from None
            raise VscardLocalError(message) from None
        return action


# -- events: what happened, for logs, status displays and tests ----------------------------


@dataclass(frozen=True, slots=True)
class HostInit:
    version: int
    capabilities: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ReaderAdded:
    reader_id: int


@dataclass(frozen=True, slots=True)
class CardInserted:
    atr: bytes


@dataclass(frozen=True, slots=True)
class CardRefused:
    reason: str


@dataclass(frozen=True, slots=True)
class CardRemoved:
    pass


@dataclass(frozen=True, slots=True)
class ApduAnswered:
    command_length: int
    response_length: int


@dataclass(frozen=True, slots=True)
class Answered:
    """We answered a message with ``Error(code)`` and went on (a :class:`VscardMessageError`)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Ignored:
    what: str


@dataclass(frozen=True, slots=True)
class Closed:
    reason: str


Event: TypeAlias = (
    HostInit
    | ReaderAdded
    | CardInserted
    | CardRefused
    | CardRemoved
    | ApduAnswered
    | Answered
    | Ignored
    | Closed
)


@dataclass(frozen=True, slots=True)
class VscardStatus:
    """One connection, for ``usbccid ctl status``."""

    state: str
    reader_id: int | None
    card_inserted: bool  # the host has our card (its ATR accepted)
    atr: bytes | None
    host_version: str | None
    apdus: int  # answered with the card's response
    errors: int  # answered with Error


# -- card work ------------------------------------------------------------------------------


class CardOp(enum.Enum):
    POWER_ON = "power_on"
    POWER_OFF = "power_off"
    TRANSMIT = "transmit"


class CardJob:
    """One call into the card, run by the driver (see :mod:`usbccid.jobs`)."""

    def __init__(
        self,
        client: VscardClient,
        op: CardOp,
        card: Card,
        generation: int,
        apdu: bytes = b"",
        reader_id: int = wire.MINIMAL_READER_ID,
    ) -> None:
        self._client = client
        self.op = op
        self.card = card
        self.generation = generation
        self.apdu = apdu
        self.reader_id = reader_id
        self.result: bytes | None = None
        self.exception: BaseException | None = None

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def run(self) -> None:
        """Call the card. Touches nothing but the card; may run on another thread."""
        try:
            if self.op is CardOp.POWER_ON:
                self.result = self.card.power_on()
            elif self.op is CardOp.POWER_OFF:
                self.card.power_off()
                self.result = b""
            else:
                self.result = self.card.transmit(self.apdu)
        except Exception as exc:  # a card bug must not leave QEMU's guest waiting
            self.exception = exc

    def finish(self) -> None:
        """Hand the result back (on the driver's thread)."""
        self._client._finish(self)

    def __repr__(self) -> str:
        return f"<CardJob {self.op.value} generation={self.generation}>"


@dataclass(frozen=True, slots=True)
class _Reply:
    """A message to send once the card work queued before it is answered (FlushComplete,
    an Error for an APDU that arrived behind others): answers leave in order."""

    message: wire.Message


_Work: TypeAlias = CardJob | _Reply


class _Request(enum.Enum):
    """Our messages that QEMU answers with Error (ccid-card-passthru.c)."""

    READER_REMOVE = "ReaderRemove"
    READER_ADD = "ReaderAdd"
    ATR = "ATR"
    CARD_REMOVE = "CardRemove"


# -- the connection ---------------------------------------------------------------------------


class VscardClient:
    """Protocol state of one connection to a VSCard host (QEMU's ccid-card-passthru).

    Args:
        card: the card in the reader from the start, or None (see :meth:`insert`).
        reader_name: sent in ReaderAdd (QEMU ignores it; vscard_common.h: "only used for
            client presentation").
        max_payload: the largest payload accepted from the host.
        max_response: the largest R-APDU sent; longer answers become ``Error``.
        max_pending: APDUs that may wait for the card before the host is cut off.

    Calls must all come from one thread. Nothing is written before :meth:`data_to_send`
    (our ``Init`` is there from the start).
    """

    def __init__(
        self,
        card: Card | None = None,
        *,
        reader_name: str = "usbccid",
        max_payload: int = MAX_PAYLOAD,
        max_response: int = MAX_RESPONSE,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self.reader_name = reader_name
        self.max_payload = max_payload
        self.max_response = max_response
        self.max_pending = max_pending
        self._machine = StateMachine()
        self._buffer = bytearray()
        self._out = bytearray()
        self._events: list[Event] = []
        self._card = card
        self._generation = 0
        self._powered: Card | None = None  # the card power_on() was last handed out for
        self._atr: bytes | None = None
        self._reader_id: int | None = None
        self._requests: deque[_Request] = deque()
        self._work: deque[_Work] = deque()
        self._running: CardJob | None = None
        self._host_version: int | None = None
        self._apdus = 0
        self._errors = 0
        self.close_reason: str | None = None
        self._send(wire.Init())

    # -- properties -------------------------------------------------------------------

    @property
    def state(self) -> State:
        return self._machine.state

    @property
    def card(self) -> Card | None:
        return self._card

    @property
    def reader_id(self) -> int | None:
        """The id the host gave our reader (QEMU: 0), once it has answered ReaderAdd."""
        return self._reader_id

    @property
    def should_close(self) -> bool:
        """True once the driver should close the socket (after writing data_to_send)."""
        return self._machine.state is State.CLOSED

    @property
    def buffered(self) -> int:
        """Unparsed input bytes held."""
        return len(self._buffer)

    @property
    def pending(self) -> int:
        """Card work and flushes queued (running included)."""
        return len(self._work)

    def status(self) -> VscardStatus:
        version = None
        if self._host_version is not None:
            version = ".".join(str(n) for n in wire.split_version(self._host_version))
        return VscardStatus(
            state=self.state.value,
            reader_id=self._reader_id,
            card_inserted=self.state is State.INSERTED,
            atr=self._atr if self.state is State.INSERTED else None,
            host_version=version,
            apdus=self._apdus,
            errors=self._errors,
        )

    def events(self) -> list[Event]:
        """What happened since the last call (and forget it)."""
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> bytes:
        """The bytes to write to the host now (and forget)."""
        data = bytes(self._out)
        self._out.clear()
        return data

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the host; ``b""`` means EOF.

        Raises:
            VscardProtocolError: the host broke the protocol. Its answer is already in
                :meth:`data_to_send`; the connection is CLOSED: write that, then close.
        """
        if self.state is State.CLOSED:
            return  # closing anyway: hold nothing more
        try:
            if not data:
                self._eof()
                return
            self._buffer += data
            self._drain()
        except VscardError as e:
            self._answer(e)
            if e.close:
                raise

    def _eof(self) -> None:
        if self._buffer:
            reason = f"EOF in the middle of a message ({len(self._buffer)} bytes)"
        else:
            reason = "EOF"
        self._buffer.clear()
        self._process(Input.RECV_EOF)
        self._closed(reason)

    def _drain(self) -> None:
        count = 0
        while self.state is not State.CLOSED and len(self._buffer) >= wire.HEADER_SIZE:
            header = wire.parse_header(bytes(self._buffer[: wire.HEADER_SIZE]))
            if header.length > self.max_payload:
                raise VscardProtocolError(
                    f"a payload of {header.length} bytes is over the bound of {self.max_payload}",
                    reader_id=header.reader_id,
                )
            size = wire.HEADER_SIZE + header.length
            if len(self._buffer) < size:
                return
            count += 1
            if count > MAX_MESSAGES_PER_READ:
                raise VscardProtocolError(
                    f"more than {MAX_MESSAGES_PER_READ} messages at once (QEMU sends a few, "
                    "then waits for our answer)",
                    reader_id=header.reader_id,
                )
            raw = bytes(self._buffer[:size])
            del self._buffer[:size]
            message = wire.parse_message(raw)
            try:
                self._handle(message)
            except VscardMessageError as e:
                self._answer(e, in_order=True)  # this message only: go on with the next
            except VscardError as e:
                if e.reader_id == UNDEFINED_READER_ID:
                    e.reader_id = message.reader_id  # answer as QEMU does: to its reader id
                raise

    def _handle(self, message: wire.Message) -> None:
        if isinstance(message, wire.Init):
            self._check_init(message)
            if self._process(Input.RECV_INIT) is Action.NONE:
                self._events.append(Ignored("a second Init"))
        elif isinstance(message, wire.Error):
            self._host_error(message)
        elif isinstance(message, wire.Apdu):
            self._check_pending(message)
            self._apdu(message)
        elif isinstance(message, wire.Flush):
            self._check_pending(message)
            self._process(Input.RECV_FLUSH)
            self._work.append(_Reply(wire.FlushComplete(message.reader_id)))
            self._pump()
        else:
            self._machine.process(Input.RECV_UNEXPECTED)  # raises: hosts never send these

    def _check_init(self, message: wire.Init) -> None:
        if message.magic != wire.MAGIC:
            raise VscardProtocolError(f"wrong magic {message.magic!r} in Init (not b'VSCD')")
        major, middle, minor = wire.split_version(message.version)
        if major != wire.split_version(wire.VERSION)[0]:
            # vscard_common.h: "The major digit is for a breaking change of protocol".
            raise VscardProtocolError(f"host speaks VSCard {major}.{middle}.{minor}, we 0.0.2")
        if self._host_version is None:
            self._host_version = message.version
            self._events.append(HostInit(message.version, message.capabilities))

    def _host_error(self, message: wire.Error) -> None:
        request = self._requests.popleft() if self._requests else None
        if request is None or self._requests:
            what = f"Error({message.code}) for {request.value if request else 'nothing'}"
            self._process(Input.RECV_OVERTAKEN_ANSWER)
            self._events.append(Ignored(what))
            return
        ok = message.code == ErrorCode.SUCCESS
        if request is _Request.READER_ADD:
            if not ok:
                self._process(Input.RECV_READER_REFUSED)
                self._closed(f"the host refused our reader (Error {message.code})")
                return
            self._process(Input.RECV_READER_ADDED)
            self._reader_id = message.reader_id
            self._events.append(ReaderAdded(message.reader_id))
            self._entered_empty()
        elif request is _Request.ATR:
            if ok:
                self._process(Input.RECV_ATR_ACCEPTED)
                assert self._atr is not None
                self._events.append(CardInserted(self._atr))
            else:
                self._process(Input.RECV_ATR_REFUSED)
                self._events.append(CardRefused(f"the host refused the ATR (Error {message.code})"))
        elif request is _Request.CARD_REMOVE:
            self._process(Input.RECV_CARD_REMOVED)
            self._events.append(CardRemoved())
            self._entered_empty()
        else:  # a ReaderRemove answered last: only when leaving, and then we are CLOSED
            self._process(Input.RECV_OVERTAKEN_ANSWER)

    def _check_pending(self, message: wire.Message) -> None:
        if len(self._work) >= self.max_pending:
            raise VscardProtocolError(
                f"more than {self.max_pending} APDUs waiting (QEMU sends one at a time)",
                reader_id=message.reader_id,
            )

    def _apdu(self, message: wire.Apdu) -> None:
        action = self._process(Input.RECV_APDU)
        if action is Action.DROP:
            self._events.append(Ignored(f"APDU of {len(message.data)} bytes in {self.state.value}"))
            return
        if action is Action.REJECT:
            raise VscardMessageError(
                f"APDU with no card in the reader (state {self.state.value})",
                reader_id=message.reader_id,
            )
        if self._reader_id is not None and message.reader_id != self._reader_id:
            raise VscardMessageError(
                f"APDU for reader {message.reader_id}, ours is {self._reader_id}",
                reader_id=message.reader_id,
            )
        assert self._card is not None
        self._work.append(
            CardJob(
                self,
                CardOp.TRANSMIT,
                self._card,
                self._generation,
                message.data,
                message.reader_id,
            )
        )

    # -- local control ----------------------------------------------------------------

    def insert(self, card: Card) -> None:
        """Put ``card`` in the reader (replacing any): power it on, send its ATR."""
        self._card = card
        self._new_generation()
        self._process(Input.INSERT)

    def remove(self) -> None:
        """Take the card out: CardRemove, then power it off."""
        self._card = None
        self._new_generation()
        self._process(Input.REMOVE)

    def _new_generation(self) -> None:
        """The card changes: work queued for the old one and not started is dropped (its
        answers could not reach the host any more), so the queue stays short however
        often the card comes and goes."""
        self._generation += 1
        self._work = deque(
            w
            for w in self._work
            if w is self._running
            or not isinstance(w, CardJob)
            or w.op is CardOp.POWER_OFF
            or w.generation == self._generation
        )

    def leave(self, reason: str = "closed by us") -> None:
        """Leave cleanly: CardRemove (if the host has the card) and ReaderRemove, so the
        reader does not linger in QEMU (it ignores the chardev closing); then CLOSED."""
        if self.state is State.CLOSED:
            return
        self._process(Input.LEAVE)
        self._closed(reason)

    # -- the table --------------------------------------------------------------------

    def _process(self, event: Input) -> Action:
        before = self.state
        action = self._machine.process(event)
        if action is Action.SEND_READER_ADD:
            self._request(_Request.READER_REMOVE, wire.ReaderRemove(wire.MINIMAL_READER_ID))
            self._request(
                _Request.READER_ADD,
                wire.ReaderAdd(self.reader_name.encode(), UNDEFINED_READER_ID),
            )
        elif action is Action.POWER_ON:
            assert self._card is not None
            self._power_off_previous()
            self._work.append(CardJob(self, CardOp.POWER_ON, self._card, self._generation))
        elif action is Action.SEND_ATR:
            assert self._atr is not None
            self._request(_Request.ATR, wire.Atr(self._atr, self._our_id()))
        elif action is Action.SEND_CARD_REMOVE:
            self._request(_Request.CARD_REMOVE, wire.CardRemove(self._our_id()))
            self._power_off_previous()
        elif action is Action.LEAVE:
            if before in (State.INSERTING, State.INSERTED):
                self._send(wire.CardRemove(self._our_id()))
            if before is not State.AWAIT_INIT:
                self._send(wire.ReaderRemove(self._our_id()))
            self._drop_work()
        elif action is Action.CLOSE:
            self._drop_work()
        if before in (State.POWERING, State.REFUSED) and self.state is State.EMPTY:
            self._power_off_previous()
        if self.state is not before:
            log.debug("vscard: %s --%s--> %s", before.value, event.value, self.state.value)
        return action

    def _drop_work(self) -> None:
        """Forget all queued card work; a job still running is ignored when it finishes."""
        self._work.clear()
        self._running = None

    def _entered_empty(self) -> None:
        """On entering EMPTY with a card held, insert it (announced or replaced)."""
        if self.state is State.EMPTY and self._card is not None:
            self._process(Input.INSERT)

    def _power_off_previous(self) -> None:
        if self._powered is not None:
            self._work.append(CardJob(self, CardOp.POWER_OFF, self._powered, self._generation))
            self._powered = None

    def _our_id(self) -> int:
        return self._reader_id if self._reader_id is not None else wire.MINIMAL_READER_ID

    def _request(self, request: _Request, message: wire.Message) -> None:
        if len(self._requests) >= MAX_REQUESTS:
            # The host answers every request at once; this many unanswered means it
            # stopped answering (or we looped): give up on the connection.
            raise VscardProtocolError(f"{MAX_REQUESTS} requests unanswered", code=None)
        self._requests.append(request)
        self._send(message)

    def _send(self, message: wire.Message) -> None:
        self._out += wire.encode(message)

    # -- the one place where errors become answers ------------------------------------

    def _answer(self, error: VscardError, *, in_order: bool = False) -> None:
        """Send ``error``'s answer: now, or (``in_order``, for a message that arrived
        behind queued card work) once the answers before it are out."""
        if error.code is not None:
            reply = wire.Error(error.code, error.reader_id)
            if in_order and not error.close and self._work:
                self._work.append(_Reply(reply))
            else:
                self._send(reply)
            self._errors += 1
        if error.close:
            self._machine.state = State.CLOSED
            self._drop_work()
            self._buffer.clear()
            self._closed(str(error))
        else:
            code = -1 if error.code is None else int(error.code)
            self._events.append(Answered(code, str(error)))

    def _closed(self, reason: str) -> None:
        if self.close_reason is None:
            self.close_reason = reason
            self._events.append(Closed(reason))

    # -- card work --------------------------------------------------------------------

    def next_job(self) -> Job | None:
        """The next card call for the driver (``run()``, maybe on a thread, then
        ``finish()``), or None; one at a time, in order."""
        self._pump()
        while self._running is None and self._work:
            head = self._work[0]
            assert isinstance(head, CardJob)
            if head.op is not CardOp.POWER_OFF and head.generation != self._generation:
                self._work.popleft()  # for a card removed or replaced since: skip it
                self._pump()
                continue
            self._running = head
            if head.op is CardOp.POWER_ON:
                self._powered = head.card  # powered from now on: powered off when it goes
            return head
        return None

    def _pump(self) -> None:
        """Send the replies that have reached the head of the queue."""
        while self._running is None and self._work and isinstance(self._work[0], _Reply):
            reply = self._work.popleft()
            assert isinstance(reply, _Reply)
            self._send(reply.message)

    def _finish(self, job: CardJob) -> None:
        if job is not self._running:
            return  # the queue was cleared (closed) while the card worked
        self._running = None
        self._work.popleft()
        try:
            if job.op is CardOp.POWER_ON:
                self._powered_on(job)
            elif job.op is CardOp.TRANSMIT:
                self._transmitted(job)
            elif job.exception is not None:
                log.warning("card %r failed to power off: %s", job.card, job.exception)
        except VscardError as e:
            self._answer(e)
        self._pump()

    def _powered_on(self, job: CardJob) -> None:
        if job.generation != self._generation or self.state is not State.POWERING:
            return  # removed or replaced meanwhile
        atr = job.result
        if job.exception is not None or atr is None:
            log.error("card %r failed to power on", job.card, exc_info=job.exception)
            reason = f"the card failed to power on: {job.exception!r}"
        elif not 2 <= len(atr) <= MAX_ATR:
            reason = f"an ATR of {len(atr)} bytes (QEMU takes 2 to {MAX_ATR})"
        else:
            self._atr = atr
            self._process(Input.POWERED)
            return
        self._process(Input.POWER_FAILED)
        self._events.append(CardRefused(reason))

    def _transmitted(self, job: CardJob) -> None:
        if job.generation != self._generation or self.state not in (
            State.INSERTING,
            State.INSERTED,
        ):
            # The host saw CardRemove (or ReaderRemove) before this answer could reach it,
            # and answered the guest already.
            self._events.append(Ignored("an answer for a card no longer in the reader"))
            return
        response = job.result
        if job.exception is not None or response is None:
            log.error("card %r failed on an APDU", job.card, exc_info=job.exception)
            raise VscardMessageError("the card failed", reader_id=job.reader_id)
        if len(response) < 2:
            raise VscardMessageError(
                f"the card answered {len(response)} bytes, no status word",
                reader_id=job.reader_id,
            )
        if len(response) > self.max_response:
            raise VscardMessageError(
                f"an answer of {len(response)} bytes is longer than QEMU's usb-ccid "
                f"passes to the guest ({self.max_response})",
                reader_id=job.reader_id,
            )
        self._send(wire.Apdu(response, job.reader_id))
        self._apdus += 1
        self._events.append(ApduAnswered(len(job.apdu), len(response)))
