"""Fuzz the vpcd front end: a :class:`VpcdConnection` holding an EchoCard.

The input is a little program: a configuration byte (a blocking card or not, the unread
buffer bound), then operations, each an op byte and its operands: raw bytes, a framed
payload, a control byte, the stream split into pieces, jobs run at once or held and
finished later, removal, and EOF.

The contract checked (``usbccid/frontends/vpcd/protocol.py``):

* ``receive_data``, ``remove``, ``next_job`` and ``finish`` never raise;
* what goes to vpcd is a sequence of whole frames, none empty (0 bytes means "card
  removed" to vpcd), at most one per GET ATR or APDU received, and nothing after the
  close;
* the unread buffer never exceeds its bound, and a closed connection says why.

Run: ``scripts/fuzz/run --seconds 60 vpcd`` (or this file with libFuzzer flags).
"""

from __future__ import annotations

from _harness import Reader, main

from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.vpcd.protocol import MAX_BUFFER, VpcdConnection, VpcdJob
from usbccid.frontends.vpcd.wire import HEADER_SIZE, MAX_FRAME

MAX_OPS = 256
BUFFERS = (MAX_BUFFER, MAX_FRAME)

OP_RAW, OP_FRAME, OP_CONTROL, OP_PIECES, OP_RUN_JOBS = 0, 1, 2, 3, 4
OP_TAKE_JOB, OP_FINISH_JOB, OP_REMOVE, OP_EOF = 5, 6, 7, 8
OP_COUNT = 9


class OutStream:
    """Checks what the connection sends: whole, non-empty frames, one per question."""

    def __init__(self) -> None:
        self.partial = b""
        self.answers = 0

    def feed(self, data: bytes) -> None:
        stream = self.partial + data
        while len(stream) >= HEADER_SIZE:
            size = int.from_bytes(stream[:HEADER_SIZE], "big")
            assert size > 0, "a 0-length answer (vpcd: card removed)"
            if len(stream) < HEADER_SIZE + size:
                break
            stream = stream[HEADER_SIZE + size :]
            self.answers += 1
        self.partial = stream
        assert not self.partial, "data_to_send returned part of a frame"


def _questions(data: bytes) -> int:
    """An upper bound of the frames vpcd could expect answers to: every frame start."""
    return len(data) // HEADER_SIZE + 1


def one_input(data: bytes) -> None:
    r = Reader(data)
    config = r.byte()
    card = EchoCard(blocking=bool(config & 1))
    conn = VpcdConnection(card, max_buffer=BUFFERS[(config >> 1) % len(BUFFERS)])
    out = OutStream()
    held: list[VpcdJob] = []
    received = 0
    closed_output = False

    def feed(chunk: bytes) -> None:
        nonlocal received
        was_closed = conn.should_close
        conn.receive_data(chunk)  # must not raise
        received += len(chunk)
        assert len(conn._buffer) <= conn.max_buffer, "unread buffer over its bound"
        if was_closed:
            assert conn.should_close, "a closed connection opened again"

    def flush() -> None:
        nonlocal closed_output
        sent = conn.data_to_send()
        if closed_output:
            assert not sent, "bytes after the close"
        out.feed(sent)
        if conn.should_close:
            closed_output = True
            assert conn.close_reason, "closed without a reason"

    for _ in range(MAX_OPS):
        if not r:
            break
        op = r.byte() % OP_COUNT
        if op == OP_RAW:
            n = r.byte()
            feed(r.take(r.u16() if n == 0xFF else n))
        elif op == OP_FRAME:
            n = r.byte()
            payload = r.take(r.u16() if n == 0xFF else n)
            feed(len(payload).to_bytes(2, "big") + payload)
        elif op == OP_CONTROL:
            feed(b"\x00\x01" + bytes([r.byte() % 6]))  # mostly the defined ones
        elif op == OP_PIECES:
            size = r.byte() % 8 + 1
            chunk = r.take(r.byte())
            for start in range(0, len(chunk), size):
                feed(chunk[start : start + size])
        elif op == OP_RUN_JOBS:
            while (job := conn.next_job()) is not None:
                job.run()
                job.finish()
        elif op == OP_TAKE_JOB:
            job = conn.next_job()
            if job is not None:
                job.run()
                held.append(job)
        elif op == OP_FINISH_JOB:
            if held:
                held.pop(r.byte() % len(held)).finish()
        elif op == OP_REMOVE:
            conn.remove()
            assert conn.should_close
        else:
            assert op == OP_EOF
            feed(b"")
            assert conn.should_close
        flush()

    for job in held:
        job.finish()
    while (job := conn.next_job()) is not None:
        job.run()
        job.finish()
    flush()
    assert out.answers <= _questions(b"\x00" * received), "more answers than questions"


def _program(*ops: bytes, config: int = 0) -> bytes:
    return bytes([config]) + b"".join(ops)


def _frame(payload: bytes) -> bytes:
    if len(payload) < 0xFF:
        return bytes([OP_FRAME, len(payload)]) + payload
    return bytes([OP_FRAME, 0xFF]) + len(payload).to_bytes(2, "big") + payload


GET_ATR = bytes([OP_CONTROL, 4])
POWER_ON = bytes([OP_CONTROL, 1])
POWER_OFF = bytes([OP_CONTROL, 0])
RESET = bytes([OP_CONTROL, 2])
RUN = bytes([OP_RUN_JOBS])
ECHO = _frame(bytes.fromhex("80100000 03 010203"))


def seeds() -> list[bytes]:
    """Conversations as pcscd holds them through vpcd, and their edges."""
    return [
        _program(GET_ATR, RUN, POWER_ON, RUN, GET_ATR, RUN, ECHO, RUN),
        _program(GET_ATR, RUN, POWER_ON, GET_ATR, ECHO, RUN, POWER_OFF, RUN, GET_ATR, RUN),
        _program(POWER_ON, RUN, RESET, RUN, GET_ATR, RUN, _frame(bytes.fromhex("8012FFFD")), RUN),
        _program(
            POWER_ON,
            ECHO,
            bytes([OP_TAKE_JOB, OP_TAKE_JOB]),
            GET_ATR,
            bytes([OP_FINISH_JOB, 0]),
            RUN,
            config=1,
        ),
        _program(POWER_ON, RUN, ECHO, bytes([OP_TAKE_JOB, OP_REMOVE, OP_FINISH_JOB, 0])),
        _program(bytes([OP_PIECES, 0, 9]) + b"\x00\x01\x04\x00\x04\x80\x10\x00\x00", RUN),
        _program(bytes([OP_CONTROL, 3]), RUN),
        _program(ECHO[:4], bytes([OP_EOF])),
        _program(_frame(b""), _frame(b"\x80"), RUN),
        _program(bytes([OP_RAW, 0xFF, 0xFF, 0xFF]) + bytes(0xFFFF), RUN, config=2),
    ]


if __name__ == "__main__":
    import logging

    logging.disable(logging.ERROR)  # every close logs a warning: noise at fuzzing speed
    main(one_input, seeds)
