"""Fuzz the CAC card OS: :meth:`CacCard.transmit` on a small card (two RSA-1024 containers).

The first input byte picks the mode:

* even: the rest is one APDU, sent to a freshly powered card;
* odd: the rest is a program of steps (:func:`one_input`): raw APDUs, known-good APDUs
  (SELECT of every applet, VERIFY with the right PIN, GET RESPONSE, ...) to get deep
  quickly, known headers with fuzzed bodies, and power cycles.

The contract checked after every APDU (usbccid.card.Card.transmit, ISO/IEC 7816-4 §5.1,
§5.6):

* ``transmit`` returns bytes and never raises;
* the response is at least SW1 SW2, and SW1 is 61..6F or 90..9F;
* an error status (SW1 64..6F) carries no response data;
* response data never exceeds Ne (an absent Le means Ne = 0, except for GET RESPONSE,
  where the card assumes 256);
* no response contains 16 consecutive bytes of a private exponent, a prime or a CRT
  exponent.

The RSA keys are generated once and kept as PEM files in the temp directory
(``usbccid-fuzz-rsa1024-N.pem``), so a crash reproduces with the same card.
"""

from __future__ import annotations

import datetime
import os
import tempfile
from functools import cache
from pathlib import Path

from _harness import Reader, main
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.card import CacCard
from usbccid.cac.errors import ApduFormatError
from usbccid.cac.profile import CardProfile, MemoryPinStateStore
from usbccid.cards.generate import default_card_spec, generate_card
from usbccid.cards.provision import DEFAULT_PIN, DEFAULT_UNBLOCK_CODE

KEY_BITS = 1024
CARD_ID = bytes.fromhex("F0 22 00 11 22 33 44 55 66 77 88 99 AA BB CC DD")
NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
MAX_STEPS = 64
INS_GET_RESPONSE = 0xC0


def _key(index: int) -> rsa.RSAPrivateKey:
    """The ``index``-th fuzzing key: loaded from the temp dir, generated on first use."""
    path = Path(tempfile.gettempdir()) / f"usbccid-fuzz-rsa{KEY_BITS}-{index}.pem"
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if isinstance(key, rsa.RSAPrivateKey) and key.key_size == KEY_BITS:
            return key
    except (OSError, ValueError):
        pass
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(pem)
    os.replace(tmp, path)  # atomic: concurrent runs agree on one key
    return key


@cache
def profile() -> CardProfile:
    keys = iter([_key(i) for i in range(3)])
    spec = default_card_spec(CARD_ID, containers=2, key_size=KEY_BITS, ca_key_size=KEY_BITS)
    card = generate_card(
        NOW, spec, card_id=CARD_ID, random=lambda n: bytes(n), new_key=lambda bits: next(keys)
    )
    return card.profile


@cache
def secrets_windows() -> tuple[bytes, ...]:
    windows = []
    for container in profile().containers:
        numbers = container.private_key.private_numbers()
        for value in (numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1):
            raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
            windows += [raw[:16], raw[len(raw) // 2 : len(raw) // 2 + 16], raw[-16:]]
    return tuple(windows)


def _random_bytes(n: int) -> bytes:
    return bytes(i & 0xFF for i in range(n))


def new_card() -> CacCard:
    card = CacCard(profile(), MemoryPinStateStore(), random_bytes=_random_bytes)
    card.power_on()
    return card


@cache
def aids() -> tuple[bytes, ...]:
    return tuple(sorted(new_card()._by_aid))


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


def transmit(card: CacCard, command: bytes) -> bytes:
    response = card.transmit(command)
    check(command, response)
    return response


def _known_apdus() -> list[bytes]:
    """Valid commands that lead somewhere: every SELECT, the PIN, reads, a sign step."""
    out = [bytes([0x00, 0xA4, 0x04, 0x00, len(aid)]) + aid for aid in aids()]
    out += [
        b"\x00\x20\x00\x00\x08" + DEFAULT_PIN,  # VERIFY (right PIN)
        b"\x00\x20\x00\x00\x08" + b"00000000",  # VERIFY (wrong PIN)
        b"\x00\x20\x00\x00",  # VERIFY status
        b"\x00\x2c\x00\x00\x10" + DEFAULT_UNBLOCK_CODE + DEFAULT_PIN,  # RESET RETRY COUNTER
        b"\x00\xc0\x00\x00\x00",  # GET RESPONSE
        b"\x80\x56\x00\x00\x00",  # GET PROPERTIES
        b"\x80\x52\x00\x00\x02\x01\x02",  # READ BUFFER tag list... (a guess for the fuzzer)
        b"\x80\x52\x01\x00\x02\x02\x00",
        b"\x80\x52\x00\x00\x02\x02\x02",
        b"\x80\x4c\x00\x00\x00",  # GET ACR
        b"\x00\x84\x00\x00\x08",  # GET CHALLENGE
        b"\x80\x42\x00\x00\x80" + bytes(0x80),  # SIGN / DECRYPT, one 128-byte block
        b"\x80\x42\x80\x00\x40" + bytes(0x40),  # SIGN step 1 of 2
        b"\x80\x42\x00\x00\x40" + bytes(0x40) + b"\x00",  # step 2
        b"\x00\xa4\x02\x00\x02\x01\x02",  # SELECT object
        b"\x00\xca\x9f\x7f\x00",  # GET DATA (CPLC)
        b"\x80\x4c\x01\x00\x01\x00",  # GET ACR: one ACR entry
        b"\x80\x4c\x20\x00\x00",  # GET ACR: AMP table
        b"\x80\x4c\x21\x00\x00",  # GET ACR: service table
        b"\x00\x24\x00\x80\x10" + DEFAULT_PIN + b"87654321",  # CHANGE REFERENCE DATA
        b"\x00\x24\x01\x80\x08" + b"1234\xff\xff\xff\xff",  # ... new PIN only
        b"\x80\x58\x00\x00\x04\x01\x02\x00\x00",  # UPDATE BUFFER (a guess)
    ]
    return out


KNOWN = _known_apdus()
HEADERS = [apdu[:4] for apdu in KNOWN]


def one_input(data: bytes) -> None:
    r = Reader(data)
    card = new_card()
    if r.byte() % 2 == 0:
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
            assert card.power_on() == card.atr
        else:  # fresh card, same PIN store semantics (a new MemoryPinStateStore)
            card = new_card()


def seeds() -> list[bytes]:
    """Each known APDU alone, and a few sessions: select, verify, read, sign."""
    out = [b"\x00" + apdu for apdu in KNOWN]
    pki = [i for i, apdu in enumerate(KNOWN) if apdu[5:12] == bytes.fromhex("A0000000790100")]
    select_pki = pki[0] if pki else 0
    verify = len(aids())
    program = [
        1,
        select_pki,
        1,
        verify,
        *[x for i in range(verify + 4, len(KNOWN)) for x in (1, i)],
        3,
        1,
        select_pki,
        1,
        verify + 2,
    ]
    out.append(bytes([1, *program]))
    out.append(bytes([1, 1, select_pki, 2, verify + 5, 0, 0x03, 0xAA, 0xBB, 0xCC]))
    return out


if __name__ == "__main__":
    main(one_input, seeds)
