"""The server side of one USB/IP TCP connection, sans-IO (h11 style).

Feed the bytes read from the socket to :meth:`UsbipServerConnection.receive_data`
(``b""`` for EOF), then call :meth:`~UsbipServerConnection.next_event` until it returns
:data:`NEED_DATA`. Answer with :meth:`~UsbipServerConnection.send`, which returns the bytes
to write. The stream may be split anywhere: nothing is parsed before all of its bytes have
arrived, and lengths are checked before construct sees the bytes.

A connection has two phases (usbip_protocol.rst, "The protocol"):

* the **op phase**: one OP_REQ_DEVLIST (answered with OP_REP_DEVLIST, after which the
  server closes: usbip_list.c reads the reply and closes) or one OP_REQ_IMPORT (answered
  with OP_REP_IMPORT; a refusal also ends the connection);
* the **URB phase** after a successful import: CMD_SUBMIT and CMD_UNLINK from the client,
  RET_SUBMIT and RET_UNLINK from us, until either side closes.

The phases are the table :data:`TRANSITIONS`. A received input that the table does not
allow in the current phase raises :class:`UsbipRemoteError` (the peer broke the protocol:
close the connection); a sent message that it does not allow raises
:class:`UsbipLocalError` (our bug).

Memory stays bounded: a CMD_SUBMIT may declare at most ``max_transfer_length`` bytes
(default :data:`MAX_TRANSFER_LENGTH`, 1 MiB; libccid's largest bulk read is 65 546 bytes),
and the check is made on the 48-byte header, before any payload is buffered. The unparsed
buffer may not exceed ``max_buffer`` bytes either.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, TypeAlias

from usbccid.usbip import wire
from usbccid.usbip.errors import UsbipLocalError, UsbipRemoteError

MAX_TRANSFER_LENGTH: Final = 1 << 20
"""Largest ``transfer_buffer_length`` accepted in a CMD_SUBMIT (either direction)."""

MAX_ENDPOINT_NUMBER: Final = 15  # USB 2.0 §9.6.6: bEndpointAddress bits 3..0


class Phase(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    AWAIT_OP = "await-op"  # waiting for OP_REQ_DEVLIST or OP_REQ_IMPORT
    DEVLIST_PENDING = "devlist-pending"  # OP_REQ_DEVLIST received; reply not sent yet
    IMPORT_PENDING = "import-pending"  # OP_REQ_IMPORT received; reply not sent yet
    URB = "urb"  # imported: CMD_SUBMIT / CMD_UNLINK traffic
    DONE = "done"  # finished cleanly (devlist sent, import refused, or EOF): close
    ERROR = "error"  # the peer broke the protocol: close


class Input(enum.Enum):
    # members are singletons: hash by identity, in C (Enum's own __hash__ is Python code,
    # and these are looked up in the state tables on every message)
    __hash__ = object.__hash__

    RECV_REQ_DEVLIST = "recv OP_REQ_DEVLIST"
    RECV_REQ_IMPORT = "recv OP_REQ_IMPORT"
    RECV_CMD_SUBMIT = "recv CMD_SUBMIT"
    RECV_CMD_UNLINK = "recv CMD_UNLINK"
    RECV_EOF = "recv EOF"
    SEND_REP_DEVLIST = "send OP_REP_DEVLIST"
    SEND_REP_IMPORT_OK = "send OP_REP_IMPORT(OK)"
    SEND_REP_IMPORT_REFUSED = "send OP_REP_IMPORT(refused)"
    SEND_RET_SUBMIT = "send RET_SUBMIT"
    SEND_RET_UNLINK = "send RET_UNLINK"


RECEIVED_INPUTS: Final = frozenset(i for i in Input if i.name.startswith("RECV_"))

# Every allowed (phase, input) pair and the phase it leads to. Anything missing is a
# protocol violation: by the peer for RECV_* inputs, by us for SEND_* inputs.
TRANSITIONS: Final[dict[tuple[Phase, Input], Phase]] = {
    (Phase.AWAIT_OP, Input.RECV_REQ_DEVLIST): Phase.DEVLIST_PENDING,
    (Phase.AWAIT_OP, Input.RECV_REQ_IMPORT): Phase.IMPORT_PENDING,
    (Phase.AWAIT_OP, Input.RECV_EOF): Phase.DONE,
    (Phase.DEVLIST_PENDING, Input.SEND_REP_DEVLIST): Phase.DONE,
    (Phase.DEVLIST_PENDING, Input.RECV_EOF): Phase.DONE,
    (Phase.IMPORT_PENDING, Input.SEND_REP_IMPORT_OK): Phase.URB,
    (Phase.IMPORT_PENDING, Input.SEND_REP_IMPORT_REFUSED): Phase.DONE,
    (Phase.IMPORT_PENDING, Input.RECV_EOF): Phase.DONE,
    (Phase.URB, Input.RECV_CMD_SUBMIT): Phase.URB,
    (Phase.URB, Input.RECV_CMD_UNLINK): Phase.URB,
    (Phase.URB, Input.SEND_RET_SUBMIT): Phase.URB,
    (Phase.URB, Input.SEND_RET_UNLINK): Phase.URB,
    (Phase.URB, Input.RECV_EOF): Phase.DONE,
    (Phase.DONE, Input.RECV_EOF): Phase.DONE,
}
# The hot path takes these two steps without a lookup: in URB they lead back to URB.
_URB_LOOPS: Final = (Input.RECV_CMD_SUBMIT, Input.SEND_RET_SUBMIT)
if any(TRANSITIONS.get((Phase.URB, i)) is not Phase.URB for i in _URB_LOOPS):
    raise ImportError("the hot path's URB -> URB steps are not in the table")  # pragma: no cover


class NeedData:
    """Sentinel type of :data:`NEED_DATA`."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
"""Returned by :meth:`UsbipServerConnection.next_event` when no complete event is buffered."""


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer closed its side (EOF) at a message boundary."""


Event: TypeAlias = (
    wire.OpReqDevlist | wire.OpReqImport | wire.CmdSubmit | wire.CmdUnlink | ConnectionClosed
)
"""What :meth:`UsbipServerConnection.next_event` returns besides NEED_DATA."""


class PhaseMachine:
    """The phase of one connection, driven by :data:`TRANSITIONS` (h2-style)."""

    def __init__(self, phase: Phase = Phase.AWAIT_OP) -> None:
        self.phase = phase

    def process(self, event: Input) -> Phase:
        """Apply ``event``; returns the new phase.

        Raises:
            UsbipRemoteError: a RECV_* input the table does not allow (phase becomes ERROR).
            UsbipLocalError: a SEND_* input the table does not allow (phase unchanged).
        """
        try:
            self.phase = TRANSITIONS[(self.phase, event)]
        except KeyError:
            phase = self.phase
            message = f"{event.value} not allowed in phase {phase.value}"
            if event in RECEIVED_INPUTS:
                self.phase = Phase.ERROR
                raise UsbipRemoteError(message) from None
            raise UsbipLocalError(message) from None
        return self.phase


class UsbipServerConnection:
    """Protocol state of one TCP connection from a USB/IP client (e.g. ``usbip``/vhci).

    Args:
        max_transfer_length: the largest ``transfer_buffer_length`` accepted.
        max_buffer: the most unparsed bytes held; callers that drain :meth:`next_event`
            after each :meth:`receive_data` of at most ``max_buffer - 48 -
            max_transfer_length`` bytes never reach it.
    """

    def __init__(
        self,
        *,
        max_transfer_length: int = MAX_TRANSFER_LENGTH,
        max_buffer: int | None = None,
    ) -> None:
        self.max_transfer_length = max_transfer_length
        self.max_buffer = (
            max_buffer
            if max_buffer is not None
            else wire.URB_HEADER_SIZE + max_transfer_length + (1 << 20)
        )
        self._machine = PhaseMachine()
        self._buffer = bytearray()
        self._eof = False
        self._eof_reported = False
        self._devid: int | None = None
        # A parsed 48-byte header whose payload has not fully arrived yet.
        self._pending_header: wire.UrbHeader | None = None

    @property
    def phase(self) -> Phase:
        return self._machine.phase

    @property
    def imported_devid(self) -> int | None:
        """``busnum << 16 | devnum`` of the imported device, once OP_REP_IMPORT(OK) is sent."""
        return self._devid

    @property
    def should_close(self) -> bool:
        return self._machine.phase in (Phase.DONE, Phase.ERROR)

    def _transition(self, event: Input) -> None:
        self._machine.process(event)

    def _fail(self, message: str) -> UsbipRemoteError:
        self._machine.phase = Phase.ERROR
        self._buffer.clear()
        return UsbipRemoteError(message)

    # -- input ------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; ``b""`` means EOF.

        Raises:
            UsbipRemoteError: more than ``max_buffer`` bytes are waiting to be parsed.
        """
        if self._machine.phase is Phase.ERROR:
            return
        if not data:
            self._eof = True
            return
        if self._eof:
            raise UsbipLocalError("receive_data after EOF")
        if self._machine.phase is Phase.DONE:
            return  # we are closing anyway; do not hold what the peer still sends
        self._buffer += data
        if len(self._buffer) > self.max_buffer:
            raise self._fail(f"more than {self.max_buffer} unparsed bytes buffered")

    def next_event(self) -> Event | NeedData:
        """The next complete event, or :data:`NEED_DATA`.

        Raises:
            UsbipRemoteError: the peer broke the protocol (bad version, unknown op code or
                command, a length over the cap, a devid that is not the imported device, a
                message cut off by EOF, ...). The connection is then in phase ERROR and
                every further call raises again.
        """
        event = self.next_fast_event()
        if type(event) is wire.Submit:
            return event.to_cmd()
        assert not isinstance(event, wire.Submit)
        return event

    def next_fast_event(self) -> Event | wire.Submit | NeedData:
        """:meth:`next_event`, except that a CMD_SUBMIT comes as a :class:`wire.Submit`
        tuple (the hot path: no dataclass per URB). Raises as :meth:`next_event` does."""
        phase = self._machine.phase
        if phase is Phase.URB:
            event = self._next_urb()
        elif phase is Phase.ERROR:
            raise UsbipRemoteError("connection already failed")
        elif phase is Phase.AWAIT_OP:
            event = self._next_op()
        else:
            event = NEED_DATA  # a reply is due (or we are done): parse nothing meanwhile
        if event is NEED_DATA and self._eof and not self._eof_reported:
            return self._at_eof()
        return event

    def _at_eof(self) -> Event | wire.Submit | NeedData:
        if self._machine.phase in (Phase.DEVLIST_PENDING, Phase.IMPORT_PENDING):
            # The peer left before our reply: what it sent may still be answered (and
            # parsed, once the reply is out); EOF is reported after that.
            return NEED_DATA
        if (
            self._buffer or self._pending_header is not None
        ) and self._machine.phase is not Phase.DONE:
            raise self._fail(
                f"connection closed in the middle of a message ({len(self._buffer)} bytes)"
            )
        self._eof_reported = True
        self._transition(Input.RECV_EOF)
        return ConnectionClosed()

    def _next_op(self) -> Event | NeedData:
        if len(self._buffer) < wire.OP_COMMON_SIZE:
            return NEED_DATA
        try:
            header = wire.parse_op_header(bytes(self._buffer[: wire.OP_COMMON_SIZE]))
        except UsbipRemoteError as e:
            raise self._fail(str(e)) from e
        if header.code == wire.OpCode.REQ_DEVLIST:
            size = wire.OP_COMMON_SIZE
        elif header.code == wire.OpCode.REQ_IMPORT:
            size = wire.OP_COMMON_SIZE + wire.OP_REQ_IMPORT_BODY_SIZE
        else:
            raise self._fail(f"unknown or unexpected op code {header.code:#06x}")
        if len(self._buffer) < size:
            return NEED_DATA
        raw = bytes(self._buffer[:size])
        del self._buffer[:size]
        event: Event
        try:
            if header.code == wire.OpCode.REQ_DEVLIST:
                event = wire.parse_op_req_devlist(raw)
                self._transition(Input.RECV_REQ_DEVLIST)
            else:
                event = wire.parse_op_req_import(raw)
                self._transition(Input.RECV_REQ_IMPORT)
        except UsbipRemoteError as e:
            raise self._fail(str(e)) from e
        return event

    def _next_urb(self) -> Event | wire.Submit | NeedData:
        buffer = self._buffer
        if self._pending_header is None:
            available = len(buffer)
            if available < wire.URB_HEADER_SIZE:
                return NEED_DATA
            fields = wire.unpack_cmd_submit(buffer)
            if fields is None:  # not a CMD_SUBMIT: the dataclass path judges it
                return self._next_other_urb()
            # CMD_SUBMIT, the hot path: the checks of _check_header on the raw fields
            _, seqnum, devid, direction, ep, flags, length, start, packets, interval, setup = fields
            if direction > wire.Direction.IN:
                raise self._fail(f"direction must be 0 or 1, got {direction}")
            self._check_fields(devid, ep, length)
            size = length if direction == wire.Direction.OUT else 0
            end = wire.URB_HEADER_SIZE + size
            if available < end:
                # the payload is still on its way: park the parsed header meanwhile
                parked = wire.Submit._make((*fields[1:], b""))
                self._pending_header = wire.UrbHeader(parked.to_cmd())
                del buffer[: wire.URB_HEADER_SIZE]
                return NEED_DATA
            data = bytes(buffer[wire.URB_HEADER_SIZE : end]) if size else b""
            del buffer[:end]
            # (Phase.URB, RECV_CMD_SUBMIT) -> Phase.URB: no table lookup per URB (checked
            # at import: _URB_LOOPS)
            return wire.Submit(
                seqnum, devid, direction, ep, flags, length, start, packets, interval, setup, data
            )
        return self._next_pending_urb()

    def _next_other_urb(self) -> Event | wire.Submit | NeedData:
        try:
            header = wire.parse_urb_header(bytes(self._buffer[: wire.URB_HEADER_SIZE]))
        except UsbipRemoteError as e:
            raise self._fail(str(e)) from e
        self._check_header(header.message)
        del self._buffer[: wire.URB_HEADER_SIZE]
        self._pending_header = header
        return self._next_pending_urb()

    def _next_pending_urb(self) -> Event | wire.Submit | NeedData:
        header = self._pending_header
        assert header is not None
        size = header.payload_length
        if len(self._buffer) < size:
            return NEED_DATA
        payload = bytes(self._buffer[:size])
        del self._buffer[:size]
        self._pending_header = None
        message = wire.with_payload(header.message, payload)
        assert isinstance(message, wire.CmdSubmit | wire.CmdUnlink)
        if isinstance(message, wire.CmdSubmit):
            self._transition(Input.RECV_CMD_SUBMIT)
            return wire.Submit.from_cmd(message)
        self._transition(Input.RECV_CMD_UNLINK)
        return message

    def _check_header(self, message: wire.UrbMessage) -> None:
        if not isinstance(message, wire.CmdSubmit | wire.CmdUnlink):
            # RET_* flow from server to client only (usbip_protocol.rst).
            raise self._fail(f"a client may not send {type(message).__name__}")
        length = message.transfer_buffer_length if isinstance(message, wire.CmdSubmit) else 0
        self._check_fields(message.devid, message.ep, length)

    def _check_fields(self, devid: int, ep: int, transfer_buffer_length: int) -> None:
        if devid != self._devid:
            # The Linux server does the same: stub_rx.c valid_request() compares the devid
            # with the exported device and otherwise raises SDEV_EVENT_ERROR_TCP, which
            # closes the connection. We close too, rather than answer -ENODEV.
            raise self._fail(f"devid {devid:#x} is not the imported device")
        if ep > MAX_ENDPOINT_NUMBER:
            raise self._fail(f"endpoint number {ep} out of range")
        if transfer_buffer_length > self.max_transfer_length:
            raise self._fail(
                f"transfer_buffer_length {transfer_buffer_length} exceeds the cap "
                f"of {self.max_transfer_length}"
            )

    # -- output -----------------------------------------------------------------------

    def send(
        self, message: wire.OpRepDevlist | wire.OpRepImport | wire.RetSubmit | wire.RetUnlink
    ) -> bytes:
        """The bytes of our reply ``message``; advances the phase.

        Raises:
            UsbipLocalError: the reply is not allowed in the current phase.
        """
        if isinstance(message, wire.OpRepDevlist):
            event = Input.SEND_REP_DEVLIST
        elif isinstance(message, wire.OpRepImport):
            ok = message.status == wire.OpStatus.OK
            event = Input.SEND_REP_IMPORT_OK if ok else Input.SEND_REP_IMPORT_REFUSED
        elif isinstance(message, wire.RetSubmit):
            event = Input.SEND_RET_SUBMIT
        else:
            event = Input.SEND_RET_UNLINK
        data = wire.encode(message)
        self._transition(event)
        if isinstance(message, wire.OpRepImport) and message.device is not None:
            self._devid = message.device.devid
        if self._machine.phase is Phase.DONE:
            self._buffer.clear()
        return data

    def send_ret(self, ret: wire.Ret) -> bytes:
        """The bytes of a RET_SUBMIT from the hot path (:meth:`send` for a :class:`wire.Ret`).

        Raises:
            UsbipLocalError: not allowed in the current phase, or not encodable.
        """
        if self._machine.phase is not Phase.URB:  # in URB it stays URB (see _URB_LOOPS)
            self._machine.process(Input.SEND_RET_SUBMIT)
        return wire.encode_ret(ret)
