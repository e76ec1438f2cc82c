"""Fuzz the PIN pad: PC_to_RDR_Secure structures, the keypad, and the reader around them.

The input is a configuration byte, then operations (:func:`one_input`): Secure messages
(raw abData from the input, or an OpenSC-like structure whose fields the input sets),
keypad entries (digits, then OK or Cancel), time passing, card work, bulk-IN reads, other
commands to the busy slot, ABORT, card removal and insertion, and resets.

The contract checked (usbccid.ccid.pinpad, CCID Rev 1.1 §6.1.11):

* ``bulk_out`` never raises; :func:`pin_request` raises nothing but :class:`CcidError`
  (bError a byte), and what it accepts builds an APDU for any entries within its limits;
* every keyed APDU the card sees is a whole APDU no longer than the template's Lc allows;
* the bulk-IN stream is whole RDR_to_PC messages; a Secure is answered by a DataBlock;
* at the end, with the time past every deadline, no PIN entry is left waiting.

Run: ``scripts/fuzz/run --seconds 60 pinpad``.
"""

from __future__ import annotations

from _harness import Reader, main
from fuzz_ccid import InStream

from usbccid.ccid import CcidError, CcidReader, ReaderConfig
from usbccid.ccid.identity import make_identity
from usbccid.ccid.pinpad import PinPadConfig, pin_request
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import (
    Abort,
    GetSlotStatus,
    IccPowerOn,
    PinFormat,
    PinModify,
    PinVerify,
    Secure,
    XfrBlock,
    build_command,
    build_secure_data,
)
from usbccid.jobs import Job
from usbccid.usbip.function import SetupPacket

BULK_OUT, BULK_IN = 0x01, 0x82
MAX_OPS = 128

OP_SECURE_RAW, OP_SECURE, OP_KEYS, OP_TIME, OP_JOBS = 0, 1, 2, 3, 4
OP_READ, OP_OTHER, OP_ABORT, OP_CARD, OP_RESET, OP_POWER = 5, 6, 7, 8, 9, 10
OP_COUNT = 11


class KeyedCard(EchoCard):
    """An EchoCard that checks the keyed APDUs it gets."""

    def transmit_keyed(self, command: bytes) -> bytes:
        assert len(command) >= 4, "a keyed APDU without a header"
        assert len(command) <= 4 + 3 + 65535 + 2, "a keyed APDU longer than an APDU"
        return self.transmit(command)


def _structure(r: Reader) -> bytes:
    """An OpenSC/libccid-like structure with fields from the input."""
    fmt = PinFormat(
        units_bytes=bool(r.byte() & 1),
        position=r.byte() & 0x0F,
        right_justify=bool(r.byte() & 1),
        pin_type=r.byte() % 4,
        length_size=r.byte() & 0x0F,
        block_size=r.byte() & 0x0F,
        length_units_bytes=bool(r.byte() & 1),
        length_position=r.byte() & 0x0F,
        length_rfu=1 if r.byte() == 0xFF else 0,
    )
    n = r.byte()
    apdu = bytes.fromhex("80100000") + (bytes([n]) + r.take(n) if n else r.take(r.byte() % 3))
    common = {
        "format": fmt,
        "apdu": apdu,
        "timeout": r.byte() % 4,
        "min_digits": r.byte() % 10,
        "max_digits": r.byte() % 20,
        "entry_validation": r.byte() % 9,
        "number_message": r.byte(),
    }
    if r.byte() & 1:
        return build_secure_data(PinVerify(msg_index=r.byte() % 4, **common))  # type: ignore[arg-type]
    number = common["number_message"]
    assert isinstance(number, int)
    count = 1 + (number != 0) + (number >= 3)
    return build_secure_data(
        PinModify(
            insertion_offset_old=r.byte() % 24,
            insertion_offset_new=r.byte() % 24,
            confirm_pin=r.byte() % 5,
            msg_indexes=tuple(r.byte() % 4 for _ in range(count)),
            **common,  # type: ignore[arg-type]
        )
    )


def _check_request(data: bytes, gemalto: bool) -> None:
    try:
        request = pin_request(data, gemalto=gemalto)
    except CcidError as exc:
        error: int | None = exc.error
    else:
        error = None
    if error is not None:
        assert 0 <= error <= 0xFF
        return
    for count in {request.min_digits, request.max_digits}:
        apdu = request.apdu({stage: "7" * count for stage in request.stages})
        assert len(apdu) >= 4


def one_input(data: bytes) -> None:
    r = Reader(data)
    config_byte = r.byte()
    gemalto = bool(config_byte & 1)
    display = (2, 16) if config_byte & 2 else (0, 0)
    pad_config = PinPadConfig(
        default_timeout=1.0 + (config_byte >> 4), lcd_lines=display[0], lcd_columns=display[1]
    )
    identity = make_identity("gemalto-433" if gemalto else "vmware")
    cards = [KeyedCard(), KeyedCard()] if config_byte & 4 else [KeyedCard()]
    reader = CcidReader(cards, identity=identity, config=ReaderConfig(pinpad=pad_config))
    pad = reader.pinpad
    assert pad is not None
    stream = InStream(reader.config.max_message_length)
    held: list[Job] = []
    now = 0.0
    seq = 0

    def send(message: bytes) -> None:
        reader.bulk_out(BULK_OUT, message)  # must not raise

    def run_jobs() -> None:
        while (job := reader.next_job(now)) is not None:
            job.run()
            job.finish()

    send(build_command(IccPowerOn(0, 0)))
    run_jobs()
    for _ in range(MAX_OPS):
        if not r:
            break
        op = r.byte() % OP_COUNT
        slot = r.byte() % reader.slot_count
        seq = (seq + 1) & 0xFF
        if op in (OP_SECURE_RAW, OP_SECURE):
            body = r.take(r.byte()) if op == OP_SECURE_RAW else _structure(r)
            _check_request(body, gemalto)
            send(build_command(Secure(slot, seq, body, level_parameter=r.byte() % 3 // 2)))
        elif op == OP_KEYS:
            entries = [
                "".join(str(b % 10) for b in r.take(r.byte() % 12)) for _ in range(r.byte() % 4)
            ]
            report = pad.enter(slot, entries, now, cancel=bool(r.byte() & 1))
            assert report.waiting or report.accepted == 0
        elif op == OP_TIME:
            now += r.byte() / 8
            timer = reader.get_timer()
            if timer is not None and timer <= now:
                reader.handle_timer(now)
        elif op == OP_JOBS:
            if r.byte() & 1:
                job = reader.next_job(now)
                if job is not None:
                    job.run()
                    held.append(job)
            else:
                run_jobs()
                for job in held:
                    job.finish()
                held.clear()
        elif op == OP_READ:
            piece = reader.poll_in(BULK_IN, (10, 64, 65546)[r.byte() % 3])
            if piece is not None:
                stream.feed(piece)
        elif op == OP_OTHER:
            other = (GetSlotStatus(slot, seq), XfrBlock(slot, seq, bytes.fromhex("8010000001aa")))
            send(build_command(other[r.byte() & 1]))
        elif op == OP_ABORT:
            reader.control(SetupPacket(0x21, 0x01, seq << 8 | slot, 0, 0), b"")
            send(build_command(Abort(slot, seq)))
        elif op == OP_CARD:
            if reader.card(slot) is None:
                reader.insert(slot, KeyedCard())
            else:
                reader.remove(slot)
        elif op == OP_POWER:
            send(build_command(IccPowerOn(slot, seq)))
        else:
            assert op == OP_RESET
            reader.reset()
            held.clear()
            stream.reset()

    for job in held:
        job.finish()
    run_jobs()  # the driver calls next_job after every event: new entries get a deadline
    now += 4096.0  # past every bTimeOut and the default
    reader.handle_timer(now)
    run_jobs()
    for slot in range(reader.slot_count):
        assert pad.prompt(slot) is None, "a PIN entry outlived its timeout"
    while (piece := reader.poll_in(BULK_IN, 65556)) is not None:
        stream.feed(piece)
    assert not stream.partial, "the bulk-IN stream ends in the middle of a message"


def _op(op: int, slot: int = 0, *operands: int) -> bytes:
    return bytes([op, slot, *operands])


def _raw_secure(body: bytes) -> bytes:
    return _op(OP_SECURE_RAW, 0, len(body)) + body + b"\x00"


def _keys(*entries: str, cancel: bool = False) -> bytes:
    out = _op(OP_KEYS, 0, len(entries))
    for entry in entries:
        out += bytes([len(entry)]) + bytes(int(c) for c in entry)
    return out + bytes([int(cancel)])


JOBS = _op(OP_JOBS, 0, 0)
READ = _op(OP_READ, 0, 2)


def seeds() -> list[bytes]:
    """OpenSC's CAC verification and change, GLP, a timeout, a cancel, an abort."""
    ff8 = b"\xff" * 8
    cac = PinFormat(units_bytes=True, pin_type=2, block_size=8)
    verify = build_secure_data(PinVerify(format=cac, apdu=bytes.fromhex("8010000008") + ff8))
    change = build_secure_data(
        PinModify(
            format=PinFormat(pin_type=2, block_size=8),
            apdu=bytes.fromhex("8010000010") + ff8 + ff8,
            insertion_offset_new=8,
        )
    )
    glp = build_secure_data(
        PinVerify(
            format=PinFormat(
                units_bytes=False,
                position=8,
                pin_type=1,
                length_size=4,
                block_size=8,
                length_position=4,
            ),
            apdu=bytes.fromhex("8010000008 20ffffffffffffff"),
            max_digits=12,
        )
    )
    timed = build_secure_data(
        PinVerify(format=cac, apdu=bytes.fromhex("8010000008") + ff8, timeout=1)
    )
    return [
        bytes([0]) + _raw_secure(verify) + JOBS + _keys("12345678") + JOBS + READ,
        bytes([2]) + _raw_secure(change) + JOBS + _keys("1234", "567890", "567890") + JOBS + READ,
        bytes([1]) + _raw_secure(change) + JOBS + _keys("1234", "567890", "000000") + READ,
        bytes([0]) + _raw_secure(glp) + JOBS + _keys("12345") + JOBS + READ,
        bytes([0])
        + _raw_secure(timed)
        + JOBS
        + _op(OP_TIME, 0, 4)
        + READ
        + _op(OP_TIME, 0, 8)
        + READ,
        bytes([0]) + _raw_secure(verify) + JOBS + _keys("12", cancel=True) + READ,
        bytes([0]) + _raw_secure(verify) + JOBS + _op(OP_OTHER, 0, 0) + _op(OP_ABORT, 0) + READ,
        bytes([4]) + _raw_secure(verify) + JOBS + _op(OP_CARD, 0) + READ + _op(OP_RESET, 0),
    ]


if __name__ == "__main__":
    main(one_input, seeds)
