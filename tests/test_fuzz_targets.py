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
TARGETS = ("usbip", "ccid", "cac", "piv")


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
