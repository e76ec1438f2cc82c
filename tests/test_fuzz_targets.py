"""The atheris targets in scripts/fuzz, run over their seed corpora and regression inputs.

Fast (no atheris needed, no fuzzing): it keeps the targets from rotting as the layers
change, and it replays every input a fuzzer ever crashed on (``REGRESSIONS``). To fuzz for
real: ``scripts/fuzz/run --seconds 300``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, cast

import pytest

from usbccid.ccid import CcidReader
from usbccid.ccid.testcard import EchoCard, run_jobs_inline
from usbccid.ccid.wire import IccPowerOn, XfrBlock, build_command
from usbccid.usbip import wire

FUZZ_DIR = Path(__file__).resolve().parent.parent / "scripts" / "fuzz"
TARGETS = ("usbip", "ccid", "cac", "vpcd", "vscard", "pinpad", "piv")


class Target(Protocol):
    one_input: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]


def load(name: str) -> Target:
    if str(FUZZ_DIR) not in sys.path:
        sys.path.insert(0, str(FUZZ_DIR))
    return cast(Target, importlib.import_module(f"fuzz_{name}"))


def _urb(message: wire.CmdSubmit | wire.CmdUnlink) -> bytes:
    return wire.encode(message)


_OUT_100 = wire.CmdSubmit(1, 0x0001_0001, wire.Direction.OUT, 1, 100, data=bytes(100))
_HUGE = wire.CmdSubmit(1, 0x0001_0001, wire.Direction.IN, 2, 0xFFFF_FFFF)

# Inputs worth replaying forever, per target: hand-made edge cases, and every input a
# fuzzer crashed on (paste the crash file's bytes, say what it found). The usbip inputs
# start with the mode byte (1 = import 1-1, raw stream) and the chunk-size byte
# (0 = one byte per receive_data).
REGRESSIONS: dict[str, list[tuple[str, bytes]]] = {
    "usbip": [
        ("header declaring a 4 GiB IN buffer", bytes([0x1, 0]) + _urb(_HUGE)),
        ("EOF in the middle of an OUT payload", bytes([0x1, 0]) + _urb(_OUT_100)[:100]),
        (
            "unlink of a parked URB, then of itself",
            bytes([0x1, 3])
            + _urb(wire.CmdSubmit(7, 0x0001_0001, wire.Direction.IN, 2, 64))
            + _urb(wire.CmdUnlink(8, 0x0001_0001, wire.Direction.OUT, 0, 7))
            + _urb(wire.CmdUnlink(9, 0x0001_0001, wire.Direction.OUT, 0, 9)),
        ),
        (
            "OP_REQ_IMPORT of an unknown bus id",
            bytes([0x0, 0]) + wire.encode(wire.OpReqImport("9-9")),
        ),
    ],
    "ccid": [
        # config 0 (dwMaxCCIDMessageLength 271), OP_MESSAGE: an XfrBlock of 272 data bytes
        (
            "XfrBlock over dwMaxCCIDMessageLength",
            bytes([0x0, 1, 0x6F, 0, 1, 0, 0, 0, 0xFF, 0x01, 0x10]) + bytes(272),
        ),
        # power on, run, read the ATR reply in 1-byte pieces, reset half-way, read again
        (
            "reset in the middle of a reply",
            bytes([0x10, 1, 0x62, 0, 1, 0, 0, 0, 0, 6, 3, 0, 3, 0, 11, 3, 5]),
        ),
    ],
    "vscard": [
        # config 0x12 (payload bound 64, a card), then OP_RAW of a header declaring 65 bytes
        (
            "payload one over the bound",
            bytes([0x12, 0, 12]) + bytes.fromhex("00000007 00000000 00000041"),
        ),
        # handshake, then an APDU held by the driver while the card is removed and a new
        # one inserted: the old answer must not reach QEMU as the new card's
        (
            "answer for a replaced card",
            bytes([0x12, 2, 0, 0, 1, 3, 0, 3, 0, 7, 3, 0, 5, 0, 0, 8, 10, 0x41, 0x42, 9, 0]),
        ),
        # found by the fuzzer: a job finished after leave() had cleared the queue under it
        # (IndexError: pop from an empty deque)
        (
            "leave while the card works",
            bytes.fromhex("120200000103000300070300050000086009000300"),
        ),
        # found by the fuzzer: insertions and removals with no job run in between queued
        # a power-on (and a power-off) each: 17 jobs for the card
        (
            "the card comes and goes while nothing runs",
            bytes.fromhex(
                "120200ffffffffff5050ff50ff00000000000aff00ff505031ffffffff5dffff50505050"
                "31ff5050ff0a00ff0afb0a00"
            ),
        ),
    ],
    # pinpad: config byte, then (op, slot, operands...): 0 = raw Secure (length, body,
    # level), 2 = keys (count, then length + digit bytes each, then cancel), 3 = time.
    "pinpad": [
        ("Secure with an empty abData", bytes([0, 0, 0, 0, 0])),
        ("keys with nothing waiting", bytes([0, 2, 0, 1, 4, 1, 2, 3, 4, 0])),
        (
            "a Secure the driver never saw before the end (no deadline yet)",
            bytes([0, 0, 0, 3, 0x00, 0x1E, 0x82, 0]),
        ),
    ],
    "piv": [
        ("empty APDU to the dual card", b"\x02"),
        (
            "GET RESPONSE after a chain piece",
            b"\x01\x00\x05\x10\x87\x06\x9a\x00\x00\x05\x00\xc0\x00\x00\x00",
        ),
        ("SELECT PIV then a CAC READ BUFFER on the dual card", b"\x03\x01\x00\x01\x12"),
    ],
    "cac": [
        ("empty APDU", b"\x00"),
        ("GET RESPONSE with an extended Le", b"\x00\x00\xc0\x00\x00\x00\x00\x00"),
        (
            "GET RESPONSE ending a chain",
            b"\x01\x00\x05\x10\xc0\x00\x00\x00\x00\x05\x00\xc0\x00\x00\x00",
        ),
    ],
    # config byte, then ops (scripts/fuzz/fuzz_vpcd.py): 1 = framed payload, 2 = control
    # byte, 4 = run jobs, 5 = take a job, 6 = finish a held job, 7 = remove
    "vpcd": [
        ("a 64 KiB frame announced, then EOF", bytes([0, 0, 2, 0xFF, 0xFF, 8])),
        (
            "removal while a slow card works, then its result",
            bytes([1, 2, 1, 4, 1, 4, 0x80, 0x14, 0, 0, 5, 7, 6, 0]),
        ),
        ("a response one byte too long for a frame", bytes([0, 1, 4, 0x80, 0x12, 0xFF, 0xFE, 4])),
    ],
}


@pytest.mark.parametrize("name", TARGETS)
def test_seeds(name: str) -> None:
    target = load(name)
    seeds = target.seeds()
    assert seeds, "every target has a seed corpus"
    for seed in seeds:
        target.one_input(seed)


@pytest.mark.parametrize(
    ("name", "why", "data"),
    [(name, why, data) for name, cases in REGRESSIONS.items() for why, data in cases],
)
def test_regressions(name: str, why: str, data: bytes) -> None:
    load(name).one_input(data)


@pytest.mark.parametrize("name", TARGETS)
def test_every_prefix_of_the_seeds(name: str) -> None:
    """Truncated inputs are inputs too: the decoders read an exhausted input as zeros."""
    target = load(name)
    for seed in target.seeds()[:4]:
        for cut in range(0, len(seed), max(1, len(seed) // 16)):
            target.one_input(seed[:cut])


@pytest.mark.parametrize("name", TARGETS)
def test_write_seeds(name: str, tmp_path: Path) -> None:
    """What scripts/fuzz/run does first: the seeds as files (no atheris needed)."""
    subprocess.run(
        [sys.executable, str(FUZZ_DIR / f"fuzz_{name}.py"), "--write-seeds", str(tmp_path)],
        check=True,
        timeout=120,
    )
    assert len(list(tmp_path.iterdir())) == len(set(load(name).seeds()))


def test_ccid_unread_replies_stay_bounded() -> None:
    """Sans-IO form of tests/test_chaos.py::test_replies_nobody_reads_stay_bounded.

    200 XfrBlocks of 14 bytes, each asking the EchoCard for 65535 bytes, and no bulk-IN
    read: before the fix the reader kept all 200 replies (13 MB). A reader has one
    response buffer per slot; a new command overwrites an unread reply.
    """
    reader = CcidReader([EchoCard()])
    reader.bulk_out(0x01, build_command(IccPowerOn(0, 0)))
    run_jobs_inline(reader)
    for seq in range(1, 201):
        reader.bulk_out(0x01, build_command(XfrBlock(0, seq, b"\x80\x12\xff\xff")))
        run_jobs_inline(reader)
    queued = sum(len(o.data) for o in reader._out)
    assert queued <= 4 * reader.config.max_message_length, f"{queued} bytes queued"
