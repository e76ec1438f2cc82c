"""Fuzz the PIV card edge: :meth:`PivCard.transmit` and :meth:`DualCard.transmit` on small
cards (RSA-1024, P-256 and P-384 keys).

The first input byte picks the card (bit 1: the ``cac+piv`` dual card, else PIV only) and
the mode (bit 0):

* even: the rest is one APDU, sent to a freshly powered card;
* odd: the rest is a program of steps (:func:`one_input`): raw APDUs, known-good APDUs
  (SELECT, VERIFY with the right PIN, GET DATA of every object, GENERAL AUTHENTICATE
  templates, chained pieces, GET RESPONSE, the CAC's SELECTs on the dual card) to get deep
  quickly, known headers with fuzzed bodies, and power cycles.

The contract checked after every APDU is fuzz_cac's (usbccid.card.Card.transmit, ISO/IEC
7816-4 §5.1, §5.6): bytes back and no exception; SW1 61..6F or 90..9F; an error word
(SW1 64..6F) without data; no more data than Ne; no 12-byte piece of a private key.

The keys are generated once and kept as PEM files in the temp directory
(``usbccid-fuzz-piv-N.pem``), so a crash reproduces with the same card.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from functools import cache
from pathlib import Path

from _harness import Reader, main
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.errors import ApduFormatError
from usbccid.cac.profile import CardProfile, Container, MemoryPinStateStore, PinPolicy
from usbccid.card import Card
from usbccid.piv import tlv
from usbccid.piv.card import PivCard
from usbccid.piv.dual import DualCard
from usbccid.piv.keys import PivPrivateKey
from usbccid.piv.objects import DATA_OBJECTS, PIV_AID
from usbccid.piv.profile import PivProfile, PivSlot

PIN = b"12345678"
PUK = b"87654321"
CARD_ID = bytes.fromhex("F0 33 00 11 22 33 44 55 66 77 88 99 AA BB CC DD")
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
MAX_STEPS = 64
INS_GET_RESPONSE = 0xC0
KINDS = ("rsa1024", "p256", "p384", "rsa1024", "p256")
REFS = (0x9A, 0x9C, 0x9D, 0x9E, 0x82)


def _key(index: int) -> PivPrivateKey:
    kind = KINDS[index]
    path = Path(tempfile.gettempdir()) / f"usbccid-fuzz-piv-{index}-{kind}.pem"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            return key
    except (OSError, ValueError):
        pass
    new: PivPrivateKey
    if kind == "rsa1024":
        new = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    else:
        new = ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())
    pem = new.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)  # atomic: concurrent runs agree on one key
    return new


def _certificate(key: PivPrivateKey, cn: str) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )


@cache
def profiles() -> tuple[CardProfile, PivProfile]:
    policy = PinPolicy(PIN, PUK)
    keys = [_key(i) for i in range(len(KINDS))]
    slots = tuple(
        PivSlot(r, _certificate(k, f"FUZZ {r:02X}"), k) for r, k in zip(REFS, keys, strict=True)
    )
    cac_key = keys[0]
    assert isinstance(cac_key, rsa.RSAPrivateKey)
    cac = CardProfile(
        CARD_ID, (Container("CAC ID Certificate", slots[0].certificate, cac_key),), policy
    )
    return cac, PivProfile(CARD_ID, slots, policy)


@cache
def secrets_windows() -> tuple[bytes, ...]:
    windows = []
    for slot in profiles()[1].slots:
        numbers = slot.private_key.private_numbers()
        values = (
            [numbers.private_value]
            if isinstance(numbers, ec.EllipticCurvePrivateNumbers)
            else [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1]
        )
        for value in values:
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            windows += [raw[:12], raw[len(raw) // 2 : len(raw) // 2 + 12], raw[-12:]]
    return tuple(windows)


def _random_bytes(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


def new_card(dual: bool) -> Card:
    cac, piv = profiles()
    card: Card = (
        DualCard(cac, piv, MemoryPinStateStore(), random_bytes=_random_bytes)
        if dual
        else PivCard(piv, MemoryPinStateStore(), random_bytes=_random_bytes)
    )
    card.power_on()
    return card


def check(command: bytes, response: bytes) -> None:
    """The contract for one command/response pair (see the module docstring)."""
    assert isinstance(response, bytes), type(response)
    assert len(response) >= 2, f"response {response.hex()} has no status word"
    sw1 = response[-2]
    data = response[:-2]
    assert 0x61 <= sw1 <= 0x6F or 0x90 <= sw1 <= 0x9F, f"SW1 {sw1:02X} is not a status"
    if 0x64 <= sw1 <= 0x6F:
        assert not data, f"error {response[-2:].hex()} with {len(data)} data bytes"
    try:
        apdu = CommandApdu.parse(command)
    except ApduFormatError:
        assert not data, "a malformed APDU got response data"
    else:
        ne = apdu.ne if apdu.ne is not None else 256 if apdu.ins == INS_GET_RESPONSE else 0
        assert len(data) <= ne, f"{len(data)} data bytes for Ne={ne}"
    for window in secrets_windows():
        assert window not in response, "a private key leaked"


def transmit(card: Card, command: bytes) -> bytes:
    response = card.transmit(command)
    check(command, response)
    return response


def _ga(alg: int, ref: int, tag: int, data: bytes) -> bytes:
    template = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(tag, data))
    return CommandApdu(0x00, 0x87, alg, ref, template, 256, len(template) > 255).encode()


def _known_apdus() -> list[bytes]:
    """Valid commands that lead somewhere."""
    point = (
        _key(2)  # the card's own P-384 public key is a valid peer point
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    )
    out = [
        bytes([0x00, 0xA4, 0x04, 0x00, len(PIV_AID)]) + PIV_AID + b"\x00",  # SELECT PIV
        bytes.fromhex("00 A4 04 00 07 A0 00 00 00 79 01 00 00"),  # SELECT CAC PKI 0 (dual)
        bytes.fromhex("00 A4 04 00 07 A0 00 00 01 16 DB 00 00"),  # SELECT CAC CCC (dual)
        b"\x00\x20\x00\x80\x08" + PIN,  # VERIFY (right PIN)
        b"\x00\x20\x00\x80\x08" + b"00000000",  # VERIFY (wrong PIN)
        b"\x00\x20\x00\x80",  # VERIFY status
        b"\x00\x20\xff\x80",  # VERIFY reset
        b"\x00\x2c\x00\x80\x10" + PUK + PIN,  # RESET RETRY COUNTER
        b"\x00\x24\x00\x80\x10" + PIN + b"24681357",  # CHANGE REFERENCE DATA (PIN)
        b"\x00\x24\x00\x81\x10" + PUK + b"13572468",  # CHANGE REFERENCE DATA (PUK)
        b"\x00\xc0\x00\x00\x00",  # GET RESPONSE
        b"\x00\x84\x00\x00\x08",  # GET CHALLENGE
        bytes.fromhex("00 87 00 9B 04 7C 02 81 00 00"),  # 9B challenge
        _ga(0x06, 0x9A, 0x81, bytes(127) + b"\x01"),  # RSA
        _ga(0x06, 0x9E, 0x81, bytes(127) + b"\x02"),  # RSA, no PIN
        _ga(0x11, 0x9C, 0x81, bytes(32)),  # ECDSA P-256
        _ga(0x14, 0x9D, 0x85, point),  # ECDH P-384
        bytes.fromhex("10 87 06 9A 05 7C 81 86 82 00"),  # chained first piece
        b"\x80\x52\x00\x00\x02\x02\x02",  # CAC READ BUFFER (dual)
    ]
    out += [
        bytes([0x00, 0xCB, 0x3F, 0xFF, 2 + len(tlv.tag_bytes(tag)), 0x5C, len(tlv.tag_bytes(tag))])
        + tlv.tag_bytes(tag)
        + b"\x00"
        for tag in DATA_OBJECTS
    ]
    return out


KNOWN = _known_apdus()
HEADERS = [apdu[:4] for apdu in KNOWN]


def one_input(data: bytes) -> None:
    r = Reader(data)
    first = r.byte()
    dual = bool(first & 0x02)
    card = new_card(dual)
    if first % 2 == 0:
        transmit(card, r.rest())
        return
    for _ in range(MAX_STEPS):
        if not r:
            break
        step = r.byte() % 5
        if step == 0:  # raw APDU
            n = r.byte()
            transmit(card, r.take(r.u16() if n == 0xFF else n))
        elif step == 1:  # a known-good APDU
            transmit(card, KNOWN[r.byte() % len(KNOWN)])
        elif step == 2:  # a known header (P1, P2 maybe replaced), fuzzed body
            header = bytearray(HEADERS[r.byte() % len(HEADERS)])
            flags = r.byte()
            header[0] ^= flags & 0x10  # sometimes chained
            if flags & 0x01:
                header[2] = r.byte()
            if flags & 0x02:
                header[3] = r.byte()
            n = r.byte()
            transmit(card, bytes(header) + r.take(r.u16() if n == 0xFF else n))
        elif step == 3:  # cold reset
            card.power_off()
            card.power_on()
        else:  # a fresh card
            card = new_card(dual)


def seeds() -> list[bytes]:
    """Each known APDU alone (both cards), and sessions: select, verify, read, sign."""
    out = [bytes([mode]) + apdu for apdu in KNOWN for mode in (0, 2)]
    verify = 3
    program = [1, 0, 1, verify, *[x for i in range(len(KNOWN)) for x in (1, i)], 3, 1, 0, 1, 5]
    out.append(bytes([1, *program]))
    out.append(bytes([3, *program]))
    out.append(bytes([3, 1, 1, 1, verify, 1, 0, 2, 13, 0x13, 0x06, 0x9A, 3, 0x7C, 0x01, 0x82]))
    return out


if __name__ == "__main__":
    main(one_input, seeds)
