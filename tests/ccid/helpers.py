"""Driving a CcidReader the way the device model and libccid would, without any I/O."""

from __future__ import annotations

from dataclasses import dataclass, field

from usbccid.ccid import CcidReader
from usbccid.ccid.testcard import run_jobs_inline
from usbccid.ccid.wire import Command, DataBlock, Parameters, Reply, build_command, parse_reply

BULK_OUT = 0x01
BULK_IN = 0x82
INTERRUPT_IN = 0x83

# libccid 1.5.2: ReadUSB for transmit uses 10 + CMD_BUF_SIZE (defs.h: 4 + 3 + 64 KiB + 3),
# CmdGetSlotStatus reads SIZE_GET_SLOT_STATUS = 10 bytes, interrupt reads are 8 bytes.
LIBCCID_READ = 10 + 4 + 3 + 65536 + 3
SLOT_STATUS_READ = 10
INTERRUPT_READ = 8


def drive(reader: CcidReader, now: float = 0.0) -> int:
    """Run every pending job inline (run, then finish); returns how many ran."""
    return run_jobs_inline(reader, now)


def send(reader: CcidReader, command: Command | bytes, urb_size: int | None = None) -> None:
    """One bulk-OUT transfer, split into URBs of ``urb_size`` bytes if given."""
    data = build_command(command) if isinstance(command, Command) else command
    if urb_size is None:
        reader.bulk_out(BULK_OUT, data)
        return
    for start in range(0, len(data), urb_size):
        reader.bulk_out(BULK_OUT, data[start : start + urb_size])


def read(reader: CcidReader, max_length: int = LIBCCID_READ) -> bytes | None:
    return reader.poll_in(BULK_IN, max_length)


def read_reply(reader: CcidReader, max_length: int = LIBCCID_READ) -> Reply:
    data = read(reader, max_length)
    assert data is not None, "no reply queued"
    return parse_reply(data)


def exchange(reader: CcidReader, command: Command, now: float = 0.0) -> Reply:
    """Send, run the card work, read exactly one reply; nothing else may be left."""
    send(reader, command)
    drive(reader, now)
    reply = read_reply(reader)
    assert read(reader) is None, "more than one reply"
    return reply


def block(reply: Reply) -> DataBlock:
    assert isinstance(reply, DataBlock), reply
    return reply


def parameters(reply: Reply) -> Parameters:
    assert isinstance(reply, Parameters), reply
    return reply


def drain(reader: CcidReader, max_length: int = LIBCCID_READ) -> list[Reply]:
    replies = []
    while (data := read(reader, max_length)) is not None:
        replies.append(parse_reply(data))
    return replies


@dataclass
class Seq:
    """bSeq as libccid keeps it: one counter per reader, wrapping at 256."""

    value: int = 0
    history: list[int] = field(default_factory=list)

    def __call__(self) -> int:
        current = self.value
        self.value = (self.value + 1) & 0xFF
        self.history.append(current)
        return current
