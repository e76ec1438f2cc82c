"""A tiny ISO/IEC 7816-4 card for testing the reader (and the stack above it) without CAC.

Commands (CLA 00 for SELECT, CLA 80 for the proprietary ones):

========================  =======================================================
``00 A4 04 00 Lc AID``    SELECT by AID: 9000 (the AID is remembered until reset)
``80 10 00 00 Lc data``   ECHO: data + 9000 (short or extended Lc)
``80 12 P1 P2 [Le]``      LENGTH: (P1 << 8 | P2) bytes i & 0xFF + 9000 (up to 65535)
``80 14 00 00``           SLOW: sleeps ``slow_seconds`` through the injected ``sleep``
                          (if any), then 9000
``80 16 00 00``           WHO: the selected AID (empty if none) + 9000
anything else             6D00 (INS not supported); fewer than 4 bytes: 6700
========================  =======================================================

It records every call so that tests can check cold resets and APDU framing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from usbccid.usbip.function import UsbFunction

# TS 3B (direct), T0 = 07: no interface bytes (T=0 only), 7 historical bytes "usbccid".
DEFAULT_ATR = bytes.fromhex("3B07") + b"usbccid"

SW_OK = b"\x90\x00"
SW_WRONG_LENGTH = b"\x67\x00"
SW_INS_NOT_SUPPORTED = b"\x6d\x00"


def _command_data(apdu: bytes) -> bytes:
    """The data field of a case 3/4 APDU (short or extended Lc); empty otherwise."""
    body = apdu[4:]
    if not body:
        return b""
    if body[0] == 0 and len(body) >= 3:  # extended Lc: 00 Lc1 Lc2
        lc = int.from_bytes(body[1:3], "big")
        return body[3 : 3 + lc]
    return body[1 : 1 + body[0]]


@dataclass
class EchoCard:
    """The test card. ``blocking`` tells the driver to run it off the event loop."""

    atr: bytes = DEFAULT_ATR
    blocking: bool = False
    sleep: Callable[[float], None] | None = None
    slow_seconds: float = 2.0
    power_on_count: int = 0
    power_off_count: int = 0
    commands: list[bytes] = field(default_factory=list)
    selected: bytes = b""

    def power_on(self) -> bytes:
        self.power_on_count += 1
        self.selected = b""  # cold reset: volatile state is gone
        return self.atr

    def power_off(self) -> None:
        self.power_off_count += 1
        self.selected = b""

    def transmit(self, command: bytes) -> bytes:
        self.commands.append(command)
        if len(command) < 4:
            return SW_WRONG_LENGTH
        cla, ins, p1, p2 = command[:4]
        if cla == 0x00 and ins == 0xA4:
            self.selected = _command_data(command)
            return SW_OK
        if cla != 0x80:
            return SW_INS_NOT_SUPPORTED
        if ins == 0x10:
            return _command_data(command) + SW_OK
        if ins == 0x12:
            return bytes(i & 0xFF for i in range(p1 << 8 | p2)) + SW_OK
        if ins == 0x14:
            if self.sleep is not None:
                self.sleep(self.slow_seconds)
            return SW_OK
        if ins == 0x16:
            return self.selected + SW_OK
        return SW_INS_NOT_SUPPORTED


def run_jobs_inline(function: UsbFunction, now: float = 0.0) -> int:
    """The smallest driver: run every pending job on this thread (``run()`` then
    ``finish()``), as the asyncio shell would with a thread pool. Returns how many ran."""
    count = 0
    while (job := function.next_job(now)) is not None:
        job.run()
        job.finish()
        count += 1
    return count
