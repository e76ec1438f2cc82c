"""Fuzz the VSCard front end: one :class:`VscardClient` holding an EchoCard, driven like the
asyncio shell drives it, with QEMU's side played by the input.

The input is a little program: a configuration byte (payload bound, card at the start or
not), then operations, each an op byte and its operands (:func:`one_input`): raw bytes,
framed messages of any type (known types mostly, with fuzzed reader ids and payloads),
the answers QEMU gives (Init, ``Error(SUCCESS)``, ``Error`` with another code), APDUs,
Flush, card jobs run at once or held and finished later, insertion, removal, leaving, EOF.

The contract checked (vscard_common.h, ccid-card-passthru.c; client.py's docstring):

* ``receive_data`` raises nothing but :class:`VscardError` with ``close`` set, after which
  the connection is CLOSED and stays silent; events are the layer's event types only;
* what we send is whole, well-formed messages of the types a client sends (Init, Error,
  ReaderAdd, ReaderRemove, ATR, CardRemove, APDU, FlushComplete); an ATR is 2..40 bytes,
  an R-APDU 2..max_response bytes, and never more R-APDUs than the host sent APDUs;
* the input buffer stays within one header + ``max_payload``, the card's queue within
  ``max_pending`` (+ a power-off and a power-on) however often the card comes and goes.

Run: ``scripts/fuzz/run --seconds 60 vscard`` (or this file with libFuzzer flags).
"""

from __future__ import annotations

from _harness import Reader, main

from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.client import (
    MAX_ATR,
    MAX_PENDING,
    MAX_RESPONSE,
    Answered,
    ApduAnswered,
    CardInserted,
    CardRefused,
    CardRemoved,
    Closed,
    HostInit,
    Ignored,
    ReaderAdded,
    VscardClient,
)
from usbccid.frontends.vscard.errors import VscardError
from usbccid.jobs import Job

PAYLOAD_BOUNDS = (64, 1000, 1 << 16)
READER_IDS = (0, 1, 0xFFFFFFFF)
APDUS = (
    bytes.fromhex("8010000003010203"),  # echo
    bytes.fromhex("801200ff"),  # 255 bytes back
    bytes.fromhex("80120173"),  # 371 + 2: just fits
    bytes.fromhex("80120200"),  # too long for QEMU: Error
    bytes.fromhex("80140000"),  # SLOW (no sleep here)
    b"",
)
MAX_OPS = 256
EVENTS = (
    HostInit,
    ReaderAdded,
    CardInserted,
    CardRefused,
    CardRemoved,
    ApduAnswered,
    Answered,
    Ignored,
    Closed,
)
CLIENT_TYPES = (
    wire.Init,
    wire.Error,
    wire.ReaderAdd,
    wire.ReaderRemove,
    wire.Atr,
    wire.CardRemove,
    wire.Apdu,
    wire.FlushComplete,
)

# op codes (the op byte modulo their number)
OP_RAW, OP_FRAMED, OP_INIT, OP_OK, OP_ERROR, OP_APDU, OP_FLUSH = 0, 1, 2, 3, 4, 5, 6
OP_RUN_JOBS, OP_TAKE_JOB, OP_FINISH_JOB, OP_INSERT, OP_REMOVE, OP_LEAVE, OP_EOF = range(7, 14)
OP_COUNT = 14


def _framed(kind: int, reader_id: int, payload: bytes) -> bytes:
    return (
        kind.to_bytes(4, "big") + reader_id.to_bytes(4, "big") + len(payload).to_bytes(4, "big")
    ) + payload


class OutStream:
    """Checks what we send: whole messages, client types, sizes within the bounds."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.apdus_sent = 0

    def feed(self, chunk: bytes) -> None:
        self.data += chunk
        while len(self.data) >= wire.HEADER_SIZE:
            size = wire.HEADER_SIZE + int.from_bytes(self.data[8:12], "big")
            assert len(self.data) >= size, "we sent a cut message"
            message = wire.parse_message(bytes(self.data[:size]))  # raises if malformed
            del self.data[:size]
            assert isinstance(message, CLIENT_TYPES), f"a client never sends {message!r}"
            if isinstance(message, wire.Atr):
                assert 2 <= len(message.atr) <= MAX_ATR, message
            elif isinstance(message, wire.Apdu):
                assert 2 <= len(message.data) <= MAX_RESPONSE, len(message.data)
                self.apdus_sent += 1
            elif isinstance(message, wire.Error):
                assert message.code in {int(c) for c in wire.ErrorCode}, message
        assert not self.data, "we sent a cut header"


def one_input(data: bytes) -> None:
    r = Reader(data)
    config = r.byte()
    max_payload = PAYLOAD_BOUNDS[config % len(PAYLOAD_BOUNDS)]
    client = VscardClient(EchoCard() if config & 0x10 else None, max_payload=max_payload)
    out = OutStream()
    held: list[Job] = []
    apdus_received = 0

    def check() -> None:
        for event in client.events():
            assert isinstance(event, EVENTS), event
        out.feed(client.data_to_send())
        assert client.buffered <= wire.HEADER_SIZE + max_payload, client.buffered
        # APDUs and flushes, plus a power-off and a power-on when the card changed.
        assert client.pending <= MAX_PENDING + 2, client.pending
        assert out.apdus_sent <= apdus_received, (out.apdus_sent, apdus_received)

    def receive(chunk: bytes) -> None:
        error = None
        try:
            client.receive_data(chunk)
        except VscardError as e:
            error = e
        if error is not None:
            assert error.close, f"a non-fatal error escaped: {error!r}"
            assert client.should_close

    def feed(chunk: bytes) -> None:
        nonlocal apdus_received
        closed = client.should_close
        if chunk[:4] == b"\x00\x00\x00\x07" and len(chunk) >= wire.HEADER_SIZE:
            apdus_received += 1
        receive(chunk)
        if closed:
            assert not client.data_to_send(), "a closed connection spoke"

    out.feed(client.data_to_send())  # our Init
    for _ in range(MAX_OPS):
        if not r:
            break
        op = r.byte() % OP_COUNT
        if op == OP_RAW:
            chunk = r.take(r.byte())
            if chunk:
                # Raw bytes may frame APDUs anywhere: count the most they could hold.
                apdus_received += len(chunk) // wire.HEADER_SIZE + 1
                receive(chunk)
        elif op == OP_FRAMED:
            kind = r.byte()
            if kind >= 0xF0:
                kind = int.from_bytes(r.take(4).ljust(4, b"\0"), "big")
            else:
                kind %= 12
            feed(_framed(kind, READER_IDS[r.byte() % 3], r.take(r.byte())))
        elif op == OP_INIT:
            version = wire.make_version(r.byte() % 2, r.byte(), 0)
            feed(wire.encode(wire.Init(version, (0,), b"VSCD" if r.byte() else b"VSCX")))
        elif op == OP_OK:
            feed(wire.encode(wire.Error(wire.ErrorCode.SUCCESS, READER_IDS[r.byte() % 3])))
        elif op == OP_ERROR:
            feed(wire.encode(wire.Error(1 + r.byte() % 3, READER_IDS[r.byte() % 3])))
        elif op == OP_APDU:
            feed(wire.encode(wire.Apdu(APDUS[r.byte() % len(APDUS)], READER_IDS[r.byte() % 3])))
        elif op == OP_FLUSH:
            feed(wire.encode(wire.Flush(wire.MINIMAL_READER_ID)))
        elif op == OP_RUN_JOBS:
            while (job := client.next_job()) is not None:
                job.run()
                job.finish()
        elif op == OP_TAKE_JOB:
            job = client.next_job()
            if job is not None:
                job.run()
                held.append(job)
        elif op == OP_FINISH_JOB:
            if held:
                held.pop(r.byte() % len(held)).finish()
        elif op == OP_INSERT:
            client.insert(EchoCard(atr=bytes.fromhex("3B02") + r.take(2).ljust(2, b"x")))
        elif op == OP_REMOVE:
            client.remove()
        elif op == OP_LEAVE:
            client.leave()
        else:
            assert op == OP_EOF
            client.receive_data(b"")
            assert client.should_close
        check()

    for job in held:
        job.finish()
    while (job := client.next_job()) is not None:
        job.run()
        job.finish()
    check()


def _program(*ops: bytes, config: int = 0x12) -> bytes:
    return bytes([config]) + b"".join(ops)


INIT = bytes([OP_INIT, 0, 0, 1])
OK = bytes([OP_OK, 0])
RUN = bytes([OP_RUN_JOBS])


def seeds() -> list[bytes]:
    """QEMU 7.2's conversations: handshake with and without a card, APDUs, Flush,
    removal and insertion, refusals, leaving."""
    handshake = [INIT, OK, OK, RUN, OK]
    echo = bytes([OP_APDU, 0, 0])
    return [
        _program(*handshake, echo, RUN),
        _program(*handshake, echo, bytes([OP_APDU, 2, 0]), bytes([OP_APDU, 3, 0]), RUN),
        _program(*handshake, bytes([OP_FLUSH]), echo, bytes([OP_FLUSH]), RUN),
        _program(INIT, OK, OK, RUN, config=0x02),  # no card
        _program(INIT, OK, OK, bytes([OP_INSERT, 0x41, 0x42]), RUN, OK, echo, RUN, config=0x02),
        _program(*handshake, bytes([OP_REMOVE]), OK, bytes([OP_INSERT, 1, 2]), RUN, OK),
        _program(*handshake, echo, bytes([OP_TAKE_JOB, OP_REMOVE, OP_FINISH_JOB, 0]), OK),
        _program(INIT, OK, OK, RUN, bytes([OP_ERROR, 0, 0]), echo, RUN),  # ATR refused
        _program(INIT, OK, bytes([OP_ERROR, 1, 2])),  # reader refused
        _program(*handshake, bytes([OP_LEAVE])),
        _program(bytes([OP_FRAMED, 3, 0, 0])),  # a type only clients send
        _program(bytes([OP_INIT, 1, 0, 1])),  # major version 1
        _program(*handshake, bytes([OP_RAW, 12]) + bytes.fromhex("00000007 00000000 7fffffff")),
        _program(*handshake, bytes([OP_RAW, 7]) + bytes(7), bytes([OP_EOF])),
    ]


if __name__ == "__main__":
    main(one_input, seeds)
