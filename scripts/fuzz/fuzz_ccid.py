"""Fuzz the CCID layer: a :class:`CcidReader` (an EchoCard in slot 0, slot 1 empty).

The input is a little program: a configuration byte, then operations, each an op byte
and its operands (:func:`one_input`): bulk-OUT URBs (raw, a framed message, or a transfer
split into 64-byte packets), bulk-IN and interrupt-IN polls of various sizes, class
requests (ABORT, GET_CLOCK_FREQUENCIES, GET_DATA_RATES, garbage), card jobs taken and
finished later (or at once), time passing, card insertion and removal, and resets.

The contract checked (CCID Rev 1.1; the reader's docstring):

* ``bulk_out`` never raises; ``control`` raises nothing but :class:`Stall`; IN data is
  never longer than the URB;
* the bulk-IN stream is a sequence of whole, well-formed RDR_to_PC messages, one message
  per completion at most (a completion never carries the end of one message and the
  start of the next), none longer than dwMaxCCIDMessageLength;
* an interrupt-IN completion is exactly one NotifySlotChange of the right size;
* the reassembly buffer never exceeds dwMaxCCIDMessageLength.

Run: ``scripts/fuzz/run --seconds 60 ccid`` (or this file with libFuzzer flags).
"""

from __future__ import annotations

from _harness import Reader, main

from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import (
    HEADER_SIZE,
    Abort,
    GetParameters,
    GetSlotStatus,
    IccPowerOff,
    IccPowerOn,
    PcToRdr,
    SetParameters,
    XfrBlock,
    build_command,
    notify_slot_change_size,
    parse_notify_slot_change,
    parse_reply,
)
from usbccid.jobs import Job
from usbccid.usbip.errors import Stall
from usbccid.usbip.function import SetupPacket

BULK_OUT, BULK_IN, INTERRUPT_IN = 0x01, 0x82, 0x83
MESSAGE_LENGTHS = (271, 300, 65554)  # dwMaxCCIDMessageLength: short APDU, odd, extended
BULK_READS = (1, 9, 10, 64, 271, 65546, 65556)  # libccid reads 10 or 10 + 65546 bytes
INTERRUPT_READS = (1, 2, 8, 64)
MAX_OPS = 256

# op codes (the op byte modulo their number)
OP_RAW, OP_MESSAGE, OP_PACKETS, OP_READ, OP_INTERRUPT = 0, 1, 2, 3, 4
OP_CONTROL, OP_RUN_JOBS, OP_TAKE_JOB, OP_FINISH_JOB, OP_TIME = 5, 6, 7, 8, 9
OP_CARD, OP_RESET = 10, 11
OP_COUNT = 12


class InStream:
    """Checks the bulk-IN completions: whole RDR_to_PC messages, one per completion."""

    def __init__(self, max_message_length: int) -> None:
        self.max_message_length = max_message_length
        self.partial = bytearray()
        self.messages = 0

    def feed(self, piece: bytes) -> None:
        self.partial += piece
        if len(self.partial) < 5:
            return
        total = HEADER_SIZE + int.from_bytes(self.partial[1:5], "little")
        assert total <= self.max_message_length, f"reply of {total} bytes"
        # A completion never runs past the end of the message it continues.
        assert len(self.partial) <= total, "one bulk-IN completion holds two messages"
        if len(self.partial) == total:
            parse_reply(bytes(self.partial))  # CcidError here = a malformed reply
            self.partial.clear()
            self.messages += 1

    def reset(self) -> None:
        """The reader was reset: a message cut off by it is gone (the host resets too)."""
        self.partial.clear()


def _framed(r: Reader) -> bytes:
    """A PC_to_RDR message with a consistent dwLength, built from the input: type, slot,
    seq, three message-specific bytes, a data length and the data."""
    message_type = r.byte()
    known = [int(t) for t in PcToRdr]
    if message_type not in known and message_type & 0x80 == 0:
        # Mostly known types, so the fuzzer reaches the slot logic quickly.
        message_type = known[message_type % len(known)]
    slot, seq = r.byte() % 4, r.byte()
    specific = r.take(3).ljust(3, b"\0")
    n = r.byte()
    if n == 0xFF:
        n = r.u16()
    data = r.take(n)
    return (
        bytes([message_type])
        + len(data).to_bytes(4, "little")
        + bytes([slot, seq])
        + specific
        + data
    )


def one_input(data: bytes) -> None:
    r = Reader(data)
    config_byte = r.byte()
    max_message_length = MESSAGE_LENGTHS[config_byte % len(MESSAGE_LENGTHS)]
    config = ReaderConfig(max_message_length=max_message_length)
    card = EchoCard()
    reader = CcidReader([card, None] if config_byte & 0x10 else [card], config=config)
    stream = InStream(max_message_length)
    held: list[Job] = []
    now = 0.0

    def bulk_out(chunk: bytes) -> None:
        reader.bulk_out(BULK_OUT, chunk)  # must not raise
        assert len(reader._rx) <= max_message_length, "reassembly buffer over the cap"

    def read_bulk(size: int) -> bool:
        piece = reader.poll_in(BULK_IN, size)
        if piece is None:
            return False
        assert 0 < len(piece) <= size, f"{len(piece)} bytes for a {size}-byte URB"
        stream.feed(piece)
        return True

    for _ in range(MAX_OPS):
        if not r:
            break
        op = r.byte() % OP_COUNT
        if op == OP_RAW:
            n = r.byte()
            bulk_out(r.take(r.u16() if n == 0xFF else n))
        elif op == OP_MESSAGE:
            bulk_out(_framed(r))
        elif op == OP_PACKETS:
            message = _framed(r)
            for start in range(0, len(message), 64):
                bulk_out(message[start : start + 64])
            if len(message) % 64 == 0 and r.byte() & 1:
                bulk_out(b"")  # the zero-length packet that ends a full-size transfer
        elif op == OP_READ:
            read_bulk(BULK_READS[r.byte() % len(BULK_READS)])
        elif op == OP_INTERRUPT:
            size = INTERRUPT_READS[r.byte() % len(INTERRUPT_READS)]
            notice = reader.poll_in(INTERRUPT_IN, size)
            if notice is not None:
                assert len(notice) == notify_slot_change_size(reader.slot_count) <= size
                parse_notify_slot_change(notice, reader.slot_count)
        elif op == OP_CONTROL:
            setup = SetupPacket(r.byte(), r.byte(), r.u16(), r.u16(), r.u16())
            payload = b"" if setup.direction_in else r.take(r.byte())
            try:
                answer = reader.control(setup, payload)
            except Stall:
                pass
            else:
                assert isinstance(answer, bytes)
                assert not answer or setup.direction_in, "data in an OUT control reply"
                assert len(answer) <= setup.wLength
        elif op == OP_RUN_JOBS:
            while (job := reader.next_job(now)) is not None:
                job.run()
                job.finish()
        elif op == OP_TAKE_JOB:
            job = reader.next_job(now)
            if job is not None:
                job.run()
                held.append(job)
        elif op == OP_FINISH_JOB:
            if held:
                held.pop(r.byte() % len(held)).finish()
        elif op == OP_TIME:
            now += r.byte() / 4
            timer = reader.get_timer()
            if timer is not None and timer <= now:
                reader.handle_timer(now)
        elif op == OP_CARD:
            slot = r.byte() % reader.slot_count
            if reader.card(slot) is None:
                reader.insert(slot, EchoCard())
            else:
                reader.remove(slot)
        else:
            assert op == OP_RESET
            reader.reset()
            stream.reset()

    # Drain: finish the card work, then read everything out with libccid's buffer size.
    for job in held:
        job.finish()
    while (job := reader.next_job(now)) is not None:
        job.run()
        job.finish()
    while read_bulk(65556):
        pass
    assert not stream.partial, "the bulk-IN stream ends in the middle of a message"


def _program(*ops: bytes, config: int = 0x10) -> bytes:
    return bytes([config]) + b"".join(ops)


def _message(raw: bytes) -> bytes:
    """OP_RAW with the whole message (one bulk-OUT URB)."""
    if len(raw) < 0xFF:
        return bytes([OP_RAW, len(raw)]) + raw
    return bytes([OP_RAW, 0xFF]) + len(raw).to_bytes(2, "big") + raw


READ = bytes([OP_READ, 5])  # a 65546-byte read
RUN = bytes([OP_RUN_JOBS])


def seeds() -> list[bytes]:
    """Valid conversations: power on, APDUs (echo, long answers, chaining), parameters,
    aborts, hot-plug, time extensions."""
    on = _message(build_command(IccPowerOn(0, 1)))
    echo = _message(build_command(XfrBlock(0, 2, bytes.fromhex("80100000 03 010203"))))
    long_answer = _message(build_command(XfrBlock(0, 3, bytes.fromhex("801201F4"))))
    chain = [
        _message(build_command(XfrBlock(0, 4, b"\x80\x10\x00\x00", level_parameter=1))),
        _message(build_command(XfrBlock(0, 5, b"\x02\xaa\xbb", level_parameter=2))),
    ]
    more = _message(build_command(XfrBlock(0, 6, b"", level_parameter=0x10)))
    abort_request = bytes([OP_CONTROL, 0x21, 0x01, 0x07, 0x00, 0, 0, 0, 0, 0])
    clocks = bytes([OP_CONTROL, 0xA1, 0x02, 0, 0, 0, 0, 0, 64])
    rates = bytes([OP_CONTROL, 0xA1, 0x03, 0, 0, 0, 0, 0, 6])
    return [
        _program(on, RUN, READ),
        _program(on, RUN, READ, echo, RUN, READ),
        _program(on, RUN, READ, long_answer, RUN, READ, more, RUN, READ, config=0x10),
        _program(on, RUN, READ, *chain[:1], READ, *chain[1:], RUN, READ),
        _program(
            _message(build_command(GetSlotStatus(1, 9))),
            bytes([OP_READ, 2]),
            _message(build_command(GetParameters(0, 10))),
            READ,
            _message(build_command(SetParameters(0, 11, 1, bytes(7)))),
            READ,
            _message(build_command(IccPowerOff(0, 12))),
            RUN,
            READ,
        ),
        _program(
            on,
            RUN,
            READ,
            echo,
            bytes([OP_TAKE_JOB, OP_TIME, 40]),
            READ,
            bytes([OP_FINISH_JOB, 0]),
            READ,
        ),
        _program(on, RUN, READ, abort_request, _message(build_command(Abort(0, 7))), READ),
        _program(bytes([OP_INTERRUPT, 2]), bytes([OP_CARD, 0]), bytes([OP_INTERRUPT, 2])),
        _program(clocks, rates),
        _program(
            bytes([OP_PACKETS, 0x6F, 0, 13, 0, 0, 0, 0xFF]) + (300).to_bytes(2, "big") + bytes(300),
            RUN,
            READ,
        ),
        _program(on, RUN, bytes([OP_READ, 0]) * 3, bytes([OP_RESET]), READ),
    ]


if __name__ == "__main__":
    main(one_input, seeds)
