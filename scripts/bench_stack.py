"""APDUs per second through the stack: the card alone, reader + card, and USB/IP.

Usage: ``.venv/bin/python scripts/bench_stack.py [--seconds 1.0] [--bits 2048] [--no-usbip]``

The same APDUs are timed at three levels, and each rate is also shown as a ratio of the
card-alone rate (1.00 = no overhead at all):

* ``card``: ``CacCard.transmit`` called directly (no CCID, no USB);
* ``reader``: a ``CcidReader`` holding the card, driven as the USB/IP device layer drives
  it: PC_to_RDR_XfrBlock written with ``bulk_out``, the card work run with the testcard's
  inline driver (``usbccid.ccid.testcard.run_jobs_inline``), RDR_to_PC_DataBlock read
  with ``poll_in``; no I/O and no threads;
* ``usbip``: the same reader exported by
  ``usbccid.frontends.usbip.server.ServerThread`` on 127.0.0.1 and
  imported by pyusb over ``usbccid.host.pyusb_backend``: every APDU is one bulk-OUT URB and one
  bulk-IN URB over TCP. Client and server share this interpreter (and its GIL), so this
  level is a floor for what a kernel host (vhci-hcd + libccid) sees, not a ceiling.

Operations: SELECT of a PKI applet (P2=0C, a 12-byte command and a 2-byte answer), READ
BUFFER of 240 bytes (as OpenSC reads certificates), and one RSA private-key operation
(VERIFY once beforehand; 240-byte ``42 80`` steps then the final step with Le=00, then
GET RESPONSE while the card answers ``61 xx``), counted as the APDUs it takes.
"""

from __future__ import annotations

import argparse
import datetime
import struct
import time
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from usbccid.cac.card import CacCard
from usbccid.cac.profile import CardProfile, Container, MemoryPinStateStore, PinPolicy
from usbccid.ccid import CcidReader
from usbccid.ccid.identity import make_identity
from usbccid.ccid.testcard import run_jobs_inline

PIN = b"12345678"
BULK_OUT, BULK_IN = 0x01, 0x82
PC_TO_RDR_ICC_POWER_ON = 0x62
PC_TO_RDR_XFR_BLOCK = 0x6F
RDR_TO_PC_DATA_BLOCK = 0x80
HEADER = struct.Struct("<BIBBBH")  # CCID Rev 1.1 §6.1: type, dwLength, slot, seq, 3 bytes
#: libccid reads a whole reply into a buffer of this size (10 + CMD_BUF_SIZE).
READ_SIZE = 10 + 4 + 3 + 65536 + 3

Transmit = Callable[[bytes], bytes]


def make_card(bits: int) -> CacCard:
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "BENCH.STACK")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    profile = CardProfile(
        card_id=bytes(range(16)),
        containers=(Container("bench", cert, key),),
        pin_policy=PinPolicy(PIN, b"87654321"),
    )
    return CacCard(profile, MemoryPinStateStore())


def ccid_message(message_type: int, seq: int, data: bytes = b"") -> bytes:
    return HEADER.pack(message_type, len(data), 0, seq, 0, 0) + data


def data_block(reply: bytes, seq: int) -> bytes:
    message_type, length, _slot, got_seq, status, _error, _chain = struct.unpack_from(
        "<BIBBBBB", reply
    )
    if message_type != RDR_TO_PC_DATA_BLOCK or got_seq != seq or status & 0xC0:
        raise SystemExit(f"unexpected CCID reply {reply[:10].hex(' ')}")
    return reply[10 : 10 + length]


class ReaderHost:
    """libccid's side of the conversation, on a CcidReader with no I/O in between."""

    def __init__(self, reader: CcidReader) -> None:
        self.reader = reader
        self.seq = 0

    def exchange(self, message_type: int, data: bytes = b"") -> bytes:
        seq = self.seq
        self.seq = (self.seq + 1) & 0xFF
        self.reader.bulk_out(BULK_OUT, ccid_message(message_type, seq, data))
        run_jobs_inline(self.reader)
        reply = self.reader.poll_in(BULK_IN, READ_SIZE)
        if reply is None:
            raise SystemExit("the reader did not answer")
        return data_block(reply, seq)

    def transmit(self, apdu: bytes) -> bytes:
        return self.exchange(PC_TO_RDR_XFR_BLOCK, apdu)


class UsbipHost:
    """The same conversation through a real TCP USB/IP import and pyusb."""

    def __init__(self, dev: Any) -> None:
        self.dev = dev
        self.seq = 0

    def exchange(self, message_type: int, data: bytes = b"") -> bytes:
        seq = self.seq
        self.seq = (self.seq + 1) & 0xFF
        self.dev.write(BULK_OUT, ccid_message(message_type, seq, data), timeout=10_000)
        reply = bytes(self.dev.read(BULK_IN, READ_SIZE, timeout=10_000))
        return data_block(reply, seq)

    def transmit(self, apdu: bytes) -> bytes:
        return self.exchange(PC_TO_RDR_XFR_BLOCK, apdu)


def check(response: bytes, want: int = 0x9000) -> bytes:
    sw = int.from_bytes(response[-2:], "big")
    if sw != want:
        raise SystemExit(f"unexpected SW {sw:04X}")
    return response[:-2]


def operations(transmit: Transmit, bits: int) -> list[tuple[str, int, Callable[[], object]]]:
    """(name, APDUs per operation, operation) for one transport."""
    k = bits // 8
    select = bytes.fromhex("00 A4 04 0C 07 A0 00 00 00 79 01 00")
    read = bytes.fromhex("00 52 00 02 02 02 F0 F0")
    block = b"\x00\x01" + b"\xff" * (k - 3 - 51) + b"\x00" + bytes(51)
    steps = []
    rest = block
    while len(rest) > 240:
        steps.append(bytes((0x00, 0x42, 0x80, 0x00, 240)) + rest[:240])
        rest = rest[240:]
    final = bytes((0x00, 0x42, 0x00, 0x00, len(rest))) + rest + b"\x00"

    def sign() -> int:
        """One private-key operation; returns the number of APDUs it took."""
        for step in steps:
            check(transmit(step))
        answer = transmit(final)
        count = len(steps) + 1
        while answer[-2] == 0x61:  # more data: GET RESPONSE (OpenSC's apdu.c loop)
            answer = transmit(bytes((0x00, 0xC0, 0x00, 0x00, answer[-1])))
            count += 1
        check(answer)
        return count

    def read_buffer() -> None:
        check(transmit(read))

    check(transmit(select))
    check(transmit(bytes.fromhex("00 20 00 00 08") + PIN))
    return [
        ("SELECT PKI applet (P2=0C)", 1, lambda: check(transmit(select))),
        ("READ BUFFER, 240 bytes", 1, read_buffer),
        (f"RSA-{bits} sign", sign(), sign),
    ]


def rate(seconds: float, op: Callable[[], object]) -> float:
    """Operations per second, timed for about ``seconds``."""
    op()  # warm up
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        op()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            return count / (now - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--bits", type=int, default=2048, help="RSA key size of the card")
    parser.add_argument("--no-usbip", action="store_true", help="skip the USB/IP level")
    args = parser.parse_args()

    levels: dict[str, list[tuple[str, int, Callable[[], object]]]] = {}
    card = make_card(args.bits)
    card.power_on()
    levels["card"] = operations(card.transmit, args.bits)

    reader = CcidReader([make_card(args.bits)], identity=make_identity("vmware"))
    host = ReaderHost(reader)
    host.exchange(PC_TO_RDR_ICC_POWER_ON)
    levels["reader"] = operations(host.transmit, args.bits)

    server = None
    if not args.no_usbip:
        from usbccid.frontends.usbip.server import ServerThread
        from usbccid.host.pyusb_backend import find
        from usbccid.usbip.device import VirtualDevice
        from usbccid.usbip.exporter import Exporter

        exported = CcidReader([make_card(args.bits)], identity=make_identity("vmware"))
        server = ServerThread(Exporter([VirtualDevice(exported.identity, exported)]))
        address, port = server.start()
        dev = find(address, port, busid="1-1")
        if dev is None:
            raise SystemExit("the USB/IP server exports no reader")
        dev.set_configuration()
        remote = UsbipHost(dev)
        remote.exchange(PC_TO_RDR_ICC_POWER_ON)
        levels["usbip"] = operations(remote.transmit, args.bits)

    try:
        print(f"{'operation':<28} {'level':<7} {'APDU/s':>10} {'vs card':>8}")
        for i, (name, apdus, _op) in enumerate(levels["card"]):
            base = 0.0
            for level, ops in levels.items():
                apdu_rate = rate(args.seconds, ops[i][2]) * apdus
                base = base or apdu_rate
                print(f"{name:<28} {level:<7} {apdu_rate:>10.0f} {apdu_rate / base:>8.2f}")
    finally:
        if server is not None:
            import usb.util

            usb.util.dispose_resources(dev)
            dev.backend.close()
            server.stop()


if __name__ == "__main__":
    main()
