"""Operations per second through the emulated PIV card alone (no USB/IP, no CCID).

Usage: ``.venv/bin/python scripts/bench_piv.py [--seconds 1.0]``

Builds a PIV card (9A RSA-2048, 9C ECC P-256, 9D ECC P-384, 9E ECC P-256) and a
``cac+piv`` card, then times what OpenSC sends: SELECT of the PIV AID; GET DATA of the
PIV Authentication certificate (its 8-byte length probe, then the whole object with Le 256
and GET RESPONSE); GENERAL AUTHENTICATE with RSA-2048 (two chained pieces, the answer
through GET RESPONSE), ECDSA P-256 and P-384, ECDH P-384; and on the dual card, one
switch from the CAC edge to the PIV edge and back (two SELECTs).
"""

from __future__ import annotations

import argparse
import datetime
import time
from collections.abc import Callable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from usbccid.cac.profile import CardProfile, Container, MemoryPinStateStore, PinPolicy
from usbccid.card import Card
from usbccid.piv import tlv
from usbccid.piv.card import PivCard
from usbccid.piv.dual import DualCard
from usbccid.piv.keys import PivPrivateKey
from usbccid.piv.profile import PivProfile, PivSlot

POLICY = PinPolicy(b"12345678", b"87654321")
START = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)


def _cert(key: PivPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(START)
        .not_valid_after(START + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


def _send(card: Card, apdu: bytes) -> bytes:
    """Send, follow 61xx with GET RESPONSE; return the data, or fail on an error word."""
    out = card.transmit(apdu)
    data = out[:-2]
    while out[-2] == 0x61:
        out = card.transmit(bytes((0, 0xC0, 0, 0, out[-1])))
        data += out[:-2]
    if out[-2:] != b"\x90\x00":
        raise SystemExit(f"{apdu[:4].hex()} answered {out[-2:].hex()}")
    return data


def _ga(card: Card, alg: int, ref: int, tag: int, data: bytes) -> bytes:
    template = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(tag, data))
    while len(template) > 255:
        _send(card, bytes((0x10, 0x87, alg, ref, 255)) + template[:255])
        template = template[255:]
    return _send(card, bytes((0x00, 0x87, alg, ref, len(template))) + template + b"\x00")


def rate(name: str, seconds: float, op: Callable[[], object]) -> None:
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        op()
        n += 1
    elapsed = time.perf_counter() - t0
    print(f"{name:<52} {n / elapsed:9.1f} /s  ({1e6 * elapsed / n:8.1f} us each)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    k9a = rsa.generate_private_key(65537, 2048)
    k9c, k9d, k9e = (
        ec.generate_private_key(c) for c in (ec.SECP256R1(), ec.SECP384R1(), ec.SECP256R1())
    )
    slots = tuple(
        PivSlot(r, _cert(k, f"BENCH {r:02X}"), k)
        for r, k in ((0x9A, k9a), (0x9C, k9c), (0x9D, k9d), (0x9E, k9e))
    )
    piv = PivProfile(bytes(range(16)), slots, POLICY)
    card = PivCard(piv, MemoryPinStateStore())
    card.power_on()
    select = bytes.fromhex("00 A4 04 00 09 A0 00 00 03 08 00 00 10 00 00")
    verify = b"\x00\x20\x00\x80\x08" + POLICY.pin
    probe = bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 08")
    whole = bytes.fromhex("00 CB 3F FF 05 5C 03 5F C1 05 00")
    peer = (
        ec.generate_private_key(ec.SECP384R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    block = b"\x00\x01" + b"\xff" * 200 + bytes(54)
    rate("SELECT PIV AID", args.seconds, lambda: _send(card, select))
    rate(
        "GET DATA 9A certificate (probe + whole, 1.1 KB)",
        args.seconds,
        lambda: (_send(card, probe), _send(card, whole)),
    )
    _send(card, verify)
    rate(
        "GENERAL AUTHENTICATE RSA-2048 (9A, chained)",
        args.seconds,
        lambda: _ga(card, 0x07, 0x9A, 0x81, block),
    )
    rate(
        "VERIFY + GENERAL AUTHENTICATE ECDSA P-256 (9C)",
        args.seconds,
        lambda: (_send(card, verify), _ga(card, 0x11, 0x9C, 0x81, bytes(32))),
    )
    rate(
        "GENERAL AUTHENTICATE ECDSA P-256 (9E, no PIN)",
        args.seconds,
        lambda: _ga(card, 0x11, 0x9E, 0x81, bytes(32)),
    )
    rate(
        "GENERAL AUTHENTICATE ECDH P-384 (9D)",
        args.seconds,
        lambda: _ga(card, 0x14, 0x9D, 0x85, peer),
    )
    cac = CardProfile(bytes(range(16)), (Container("bench", slots[0].certificate, k9a),), POLICY)
    dual = DualCard(cac, piv, MemoryPinStateStore())
    dual.power_on()
    cac_select = bytes.fromhex("00 A4 04 00 07 A0 00 00 00 79 01 00 00")
    rate(
        "dual card: SELECT PIV, then SELECT CAC PKI (a switch)",
        args.seconds,
        lambda: (_send(dual, select), _send(dual, cac_select)),
    )


if __name__ == "__main__":
    main()
