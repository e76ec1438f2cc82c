"""The card side of one vpcd connection, sans-IO.

Bytes from vpcd go in through :meth:`VpcdConnection.receive_data` (``b""`` for EOF);
card work comes out through :meth:`VpcdConnection.next_job` (a :class:`usbccid.jobs.Job`
the driver runs, on a thread when the card is slow, then finishes); bytes for vpcd come
out of :meth:`VpcdConnection.data_to_send`. When :attr:`VpcdConnection.should_close` turns
true, the driver closes the socket. Nothing here blocks, sleeps or reads a clock.

The conversation (vsmartcard ``virtualsmartcard/src/vpcd/vpcd.c``, ``ifd-vpcd/ifd-vpcd.c``):
vpcd speaks, the card answers. Messages are taken one at a time, in order, and the next is
only looked at once the card work of the previous one is done: vpcd may send "power on"
and "get ATR" back to back, and the ATR must be the one the power on produced.

Card presence has no message: vpcd takes a closed connection (or a 0-length answer) as
"card removed" (``vicc_eject``) and a new connection as "card inserted" (its presence
poll accepts it, ``vicc_connect``). So a connection *is* an inserted card:
:meth:`VpcdConnection.remove` closes it, and the shell connects again on insertion. We
never answer with 0 bytes: after a 0-length APDU answer vpcd returns success with an
empty response to pcscd before it notices the removal.

Power (the table :data:`TRANSITIONS`): :class:`~usbccid.card.Card` has only cold reset,
so power on and reset both call ``power_on()``. vpcd asks for the ATR on every presence
poll (every 400 ms, pcsc-lite ``PCSCLITE_STATUS_POLL_RATE``), before any power on and
while the card is off, so the card is activated on the first request that needs it and
its ATR is kept while it is inserted; a later GET ATR is answered at once, without
calling the card. An APDU to a card that is off activates it first (vpcd only sends
APDUs after a power on, but must get an answer or it waits forever).

Memory stays bounded: a frame holds at most 0xFFFF bytes, and while the card works at
most ``max_buffer`` unread bytes are kept (a working vpcd has one frame in flight; more
than a few is a broken peer: :class:`VpcdProtocolError`).
"""

from __future__ import annotations

import contextlib
import enum
import logging
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Final

from usbccid.card import Card
from usbccid.frontends.vpcd.errors import VpcdCardError, VpcdError, VpcdProtocolError
from usbccid.frontends.vpcd.wire import (
    HEADER_SIZE,
    MAX_FRAME,
    Apdu,
    GetAtr,
    Message,
    PowerOff,
    PowerOn,
    Reset,
    build_frame,
    frame_length,
    parse_message,
)

logger = logging.getLogger(__name__)

MAX_BUFFER: Final = 4 * MAX_FRAME
"""Unread bytes kept at most (default): four full frames; vpcd has one in flight."""


class State(enum.Enum):
    INSERTED = "inserted"  # connected, the card not activated yet: its ATR is unknown
    OFF = "off"  # activated before, now powered off; its ATR is known
    ON = "on"  # powered; its ATR is known
    CLOSED = "closed"  # removed, EOF from vpcd, or an error: the socket is to be closed


class Input(enum.Enum):
    POWER_OFF = "power off"
    POWER_ON = "power on"
    RESET = "reset"
    GET_ATR = "get ATR"
    APDU = "APDU"
    EOF = "EOF"  # vpcd closed the connection (pcscd stopped, or vpcd ejected us)
    REMOVE = "remove"  # the card is taken out (local)


class Step(enum.Enum):
    """What the card side does for an input, in order."""

    CARD_POWER_ON = "card.power_on()"  # a job; remembers the ATR
    CARD_POWER_OFF = "card.power_off()"  # a job
    CARD_TRANSMIT = "card.transmit()"  # a job; its response is sent
    SEND_ATR = "send the ATR"


_INPUT_OF: Final[dict[type[Message], Input]] = {
    PowerOff: Input.POWER_OFF,
    PowerOn: Input.POWER_ON,
    Reset: Input.RESET,
    GetAtr: Input.GET_ATR,
    Apdu: Input.APDU,
}

_ON, _OFF = Step.CARD_POWER_ON, Step.CARD_POWER_OFF
_TX, _ATR = Step.CARD_TRANSMIT, Step.SEND_ATR

# Every (state, input) pair: the next state and the steps, in order. CLOSED absorbs
# everything (bytes after the close are dropped; a late remove or EOF changes nothing).
TRANSITIONS: Final[dict[tuple[State, Input], tuple[State, tuple[Step, ...]]]] = {
    (State.INSERTED, Input.POWER_OFF): (State.INSERTED, ()),
    (State.INSERTED, Input.POWER_ON): (State.ON, (_ON,)),
    (State.INSERTED, Input.RESET): (State.ON, (_ON,)),
    (State.INSERTED, Input.GET_ATR): (State.ON, (_ON, _ATR)),
    (State.INSERTED, Input.APDU): (State.ON, (_ON, _TX)),
    (State.OFF, Input.POWER_OFF): (State.OFF, ()),
    (State.OFF, Input.POWER_ON): (State.ON, (_ON,)),
    (State.OFF, Input.RESET): (State.ON, (_ON,)),
    (State.OFF, Input.GET_ATR): (State.OFF, (_ATR,)),
    (State.OFF, Input.APDU): (State.ON, (_ON, _TX)),
    (State.ON, Input.POWER_OFF): (State.OFF, (_OFF,)),
    (State.ON, Input.POWER_ON): (State.ON, (_ON,)),
    (State.ON, Input.RESET): (State.ON, (_ON,)),
    (State.ON, Input.GET_ATR): (State.ON, (_ATR,)),
    (State.ON, Input.APDU): (State.ON, (_TX,)),
    **{(s, Input.EOF): (State.CLOSED, ()) for s in State},
    **{(s, Input.REMOVE): (State.CLOSED, ()) for s in State},
    **{(State.CLOSED, i): (State.CLOSED, ()) for i in Input if i not in (Input.EOF, Input.REMOVE)},
}


def rule(state: State, event: Input) -> tuple[State, tuple[Step, ...]]:
    return TRANSITIONS[(state, event)]


class VpcdJob:
    """One card call for one connection, run by the driver (see :mod:`usbccid.jobs`)."""

    def __init__(self, connection: VpcdConnection, step: Step, card: Card, apdu: bytes) -> None:
        self._connection = connection
        self.step = step
        self.card = card
        self.apdu = apdu
        self.result: bytes | None = None
        self.exception: Exception | None = None

    @property
    def blocking(self) -> bool:
        return self.card.blocking

    def run(self) -> None:
        """Call the card. Touches nothing but the card; may run on another thread."""
        try:
            if self.step is Step.CARD_POWER_ON:
                self.result = self.card.power_on()
            elif self.step is Step.CARD_POWER_OFF:
                self.card.power_off()
                self.result = b""
            else:
                self.result = self.card.transmit(self.apdu)
        except Exception as exc:  # a card bug must not leave vpcd waiting for an answer
            self.exception = exc

    def finish(self) -> None:
        """Hand the result to the connection (on the driver's thread)."""
        self._connection._finish(self)

    def __repr__(self) -> str:
        return f"<VpcdJob {self.step.value}>"


@dataclass(frozen=True, slots=True)
class Counters:
    """What one connection did, for ``ctl status``."""

    atr_requests: int = 0
    apdus: int = 0
    power_ons: int = 0
    power_offs: int = 0


class VpcdConnection:
    """The card side of one TCP connection to vpcd, holding ``card``.

    Args:
        card: the inserted card.
        max_buffer: unread bytes kept at most while the card works.

    Example (a driver)::

        conn = VpcdConnection(card)
        conn.receive_data(sock.recv(65536))
        while (job := conn.next_job()) is not None:
            job.run()       # on a thread when job.blocking
            job.finish()
        sock.sendall(conn.data_to_send())
        if conn.should_close: sock.close()
    """

    def __init__(self, card: Card, *, max_buffer: int = MAX_BUFFER) -> None:
        if max_buffer < MAX_FRAME:
            raise ValueError(f"max_buffer must hold a whole frame ({MAX_FRAME} bytes)")
        self.card = card
        self.max_buffer = max_buffer
        self._state = State.INSERTED
        self._buffer = bytearray()
        self._steps: deque[Step] = deque()
        self._apdu = b""
        self._job: VpcdJob | None = None  # created, maybe handed out, not finished
        self._job_taken = False
        self._out = bytearray()
        self._atr: bytes | None = None
        self._counters = Counters()
        self.close_reason: str | None = None

    # ---------------------------------------------------------------- state

    @property
    def state(self) -> State:
        return self._state

    @property
    def atr(self) -> bytes | None:
        """The card's ATR once it was activated on this connection."""
        return self._atr

    @property
    def counters(self) -> Counters:
        return self._counters

    @property
    def should_close(self) -> bool:
        return self._state is State.CLOSED

    @property
    def busy(self) -> bool:
        """Card work is outstanding (created and not finished)."""
        return self._job is not None

    # ---------------------------------------------------------------- input

    def receive_data(self, data: bytes) -> None:
        """Bytes read from vpcd; ``b""`` means EOF. Never raises for what vpcd sent."""
        if self._state is State.CLOSED:
            return
        with self._closing_on_error():
            if not data:
                self._apply(Input.EOF, "vpcd closed the connection")
                return
            if len(self._buffer) + len(data) > self.max_buffer:
                raise VpcdProtocolError(
                    f"{len(self._buffer) + len(data)} unread bytes from vpcd "
                    f"(at most {self.max_buffer})"
                )
            self._buffer += data
            self._advance()

    def remove(self) -> None:
        """The card is taken out: close the connection (vpcd then reports it removed).
        Card work already handed out finishes, but its result is dropped."""
        self._apply(Input.REMOVE, "card removed")

    def connection_lost(self, reason: str = "connection lost") -> None:
        """The socket is gone (the driver saw an error or closed it)."""
        if self._state is not State.CLOSED:
            self._apply(Input.EOF, reason)

    # ---------------------------------------------------------------- output

    def next_job(self) -> VpcdJob | None:
        """Card work to run, once; then :meth:`VpcdJob.finish` it before anything else
        is processed."""
        if self._job is None or self._job_taken or self._state is State.CLOSED:
            return None
        self._job_taken = True
        return self._job

    def data_to_send(self) -> bytes:
        """Frames for vpcd produced since the last call."""
        data = bytes(self._out)
        self._out.clear()
        return data

    # ---------------------------------------------------------------- internals

    @contextlib.contextmanager
    def _closing_on_error(self) -> Iterator[None]:
        """The one place where a :class:`VpcdError` becomes its wire answer: a close."""
        try:
            yield
        except VpcdError as error:
            logger.warning("vpcd connection: %s; closing", error)
            self._apply(Input.EOF, str(error))
            self._buffer.clear()

    def _apply(self, event: Input, reason: str | None = None) -> tuple[Step, ...]:
        state, steps = rule(self._state, event)
        if state is State.CLOSED and self._state is not State.CLOSED:
            self.close_reason = reason or event.value
            self._steps.clear()
            self._job = None
        self._state = state
        return steps

    def _advance(self) -> None:
        """Run steps, then messages, until card work is outstanding or input runs out."""
        while self._state is not State.CLOSED and self._job is None:
            if self._steps:
                self._step(self._steps.popleft())
                continue
            message = self._next_message()
            if message is None:
                return
            steps = self._apply(_INPUT_OF[type(message)])
            self._apdu = message.command if isinstance(message, Apdu) else b""
            self._steps.extend(steps)
            self._count(message)

    def _next_message(self) -> Message | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        size = frame_length(bytes(self._buffer[:HEADER_SIZE]))
        if len(self._buffer) < size:
            return None
        frame = bytes(self._buffer[:size])
        del self._buffer[:size]
        return parse_message(frame)

    def _step(self, step: Step) -> None:
        if step is Step.SEND_ATR:
            assert self._atr is not None, "the table activates the card before SEND_ATR"
            self._out += build_frame(self._atr)
            return
        apdu = self._apdu if step is Step.CARD_TRANSMIT else b""
        self._job = VpcdJob(self, step, self.card, apdu)
        self._job_taken = False

    def _finish(self, job: VpcdJob) -> None:
        if job is not self._job:
            return  # the connection closed since: the card left while it worked
        self._job = None
        with self._closing_on_error():
            if job.exception is not None or job.result is None:
                logger.error(
                    "card %r failed in %s", job.card, job.step.value, exc_info=job.exception
                )
                raise VpcdCardError(f"the card failed in {job.step.value}")
            if job.step is Step.CARD_POWER_ON:
                if not job.result:
                    raise VpcdCardError("the card gave an empty ATR")
                self._atr = job.result
            elif job.step is Step.CARD_TRANSMIT:
                if len(job.result) < 2:
                    raise VpcdCardError(f"a {len(job.result)}-byte response APDU (no SW1 SW2)")
                self._out += build_frame(job.result)
            self._advance()

    def _count(self, message: Message) -> None:
        c = self._counters
        match message:
            case GetAtr():
                self._counters = replace(c, atr_requests=c.atr_requests + 1)
            case Apdu():
                self._counters = replace(c, apdus=c.apdus + 1)
            case PowerOn() | Reset():
                self._counters = replace(c, power_ons=c.power_ons + 1)
            case PowerOff():
                self._counters = replace(c, power_offs=c.power_offs + 1)
