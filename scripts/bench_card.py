"""APDUs per second through the emulated CAC alone (no USB/IP, no CCID).

Usage: ``.venv/bin/python scripts/bench_card.py [--seconds 1.0] [--bits 2048]``

Builds a card with three freshly generated RSA keys and self-signed certificates, then
times SELECT, READ BUFFER (240-byte chunks, as OpenSC reads), GET PROPERTIES and one
complete raw-RSA sign (VERIFY once, then 240-byte P1=80 step + final P1=00 step with the
whole modulus-sized answer at Le=00/256 or via GET RESPONSE).
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from usbccid.cac.card import CacCard
from usbccid.cac.profile import CardProfile, Container, MemoryPinStateStore, PinPolicy


def make_card(bits: int) -> CacCard:
    containers = []
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    for i in range(3):
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"BENCH.{i}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(i + 1)
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        containers.append(Container(f"bench {i}", cert, key))
    profile = CardProfile(
        card_id=bytes(range(16)),
        containers=tuple(containers),
        pin_policy=PinPolicy(b"12345678", b"87654321"),
    )
    card = CacCard(profile, MemoryPinStateStore())
    card.power_on()
    return card


def rate(name: str, seconds: float, apdus_per_op: int, op: Callable[[], object]) -> None:
    op()  # warm up
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        op()
        count += 1
        now = time.perf_counter()
        if now >= deadline:
            break
    elapsed = now - start
    ops = count / elapsed
    print(f"{name:<40} {ops * apdus_per_op:>10.0f} APDU/s  ({ops:,.0f} op/s)")


def check(response: bytes, want: int = 0x9000) -> bytes:
    sw = int.from_bytes(response[-2:], "big")
    if sw != want:
        raise SystemExit(f"unexpected SW {sw:04X}")
    return response[:-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.0, help="time per measurement")
    parser.add_argument("--bits", type=int, default=2048, help="RSA key size")
    args = parser.parse_args()

    card = make_card(args.bits)
    k = args.bits // 8
    select_pki = bytes.fromhex("00 A4 04 0C 07 A0 00 00 00 79 01 00")
    select_fci = bytes.fromhex("00 A4 04 00 07 A0 00 00 00 79 01 00 00")
    read = bytes.fromhex("00 52 00 02 02 02 F0 F0")
    props = bytes.fromhex("00 56 01 00 1D")
    transmit = card.transmit

    rate("SELECT AID (P2=0C)", args.seconds, 1, lambda: check(transmit(select_pki)))
    rate("SELECT AID with FCI (Le=00)", args.seconds, 1, lambda: check(transmit(select_fci)))
    check(transmit(select_pki))
    rate("READ BUFFER V, 240 bytes", args.seconds, 1, lambda: check(transmit(read)))
    rate("GET PROPERTIES (exact Le)", args.seconds, 1, lambda: check(transmit(props)))

    check(transmit(bytes.fromhex("00 20 00 00 08") + b"12345678"))
    block = b"\x00\x01" + b"\xff" * (k - 3 - 51) + b"\x00" + bytes(51)
    steps = []
    rest = block
    while len(rest) > 240:
        steps.append(bytes((0x00, 0x42, 0x80, 0x00, 240)) + rest[:240])
        rest = rest[240:]
    final = bytes((0x00, 0x42, 0x00, 0x00, len(rest))) + rest

    def sign() -> None:
        for step in steps:
            check(transmit(step))
        if k <= 256:
            check(transmit(final + b"\x00"))
        else:
            check(transmit(final + b"\xff"), want=0x6100)
            left = k
            while left > 0:
                chunk = transmit(b"\x00\xc0\x00\x00\x00")
                left -= len(chunk) - 2

    rate(f"RSA-{args.bits} sign (chunked + final)", args.seconds, len(steps) + 1, sign)


if __name__ == "__main__":
    main()
