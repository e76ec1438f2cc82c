"""GSC-IS simple-TLV, and the raw RSA operation checked against cryptography's own padding."""

from __future__ import annotations

import contextlib
import hashlib

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.cac.conftest import rsa_key
from usbccid.cac.errors import CardError
from usbccid.cac.rsa_raw import rsa_private_raw
from usbccid.cac.sw import SW
from usbccid.cac.tlv import (
    TlvError,
    ber_tlv,
    encode_simple_tlv,
    parse_simple_tlv,
    parse_tl,
    simple_tlv,
    split_tl_v,
)

# -- simple-TLV (libcacard tests/simpletlv.c behaviours) ---------------------------------


def test_simple_tlv_lengths() -> None:
    assert simple_tlv(0x13, b"\x14\x18") == bytes.fromhex("13 02 14 18")
    long = simple_tlv(0x70, bytes(256))
    assert long[:4] == bytes.fromhex("70 FF 00 01")  # FF + 2 bytes little-endian
    assert len(long) == 260
    assert simple_tlv(0x70, bytes(254))[:2] == bytes.fromhex("70 FE")
    assert simple_tlv(0x70, bytes(255))[:4] == bytes.fromhex("70 FF FF 00")


def test_parse_simple_tlv() -> None:
    assert parse_simple_tlv(bytes.fromhex("13 02 14 18 DD 03 64 24 44")) == [
        (0x13, b"\x14\x18"),
        (0xDD, b"\x64\x24\x44"),
    ]
    for bad in ("13 02 14", "13", "13 FF 01", "00 00", "13 FF 05 00 01"):
        with pytest.raises(TlvError):
            parse_simple_tlv(bytes.fromhex(bad))


@settings(max_examples=200)
@given(st.lists(st.tuples(st.integers(1, 0xFE), st.binary(max_size=300)), max_size=8))
def test_tlv_roundtrip_and_split(items: list[tuple[int, bytes]]) -> None:
    encoded = encode_simple_tlv(items)
    assert parse_simple_tlv(encoded) == items
    tl, v = split_tl_v(items)
    assert [(t, len(x)) for t, x in items] == parse_tl(tl)
    assert v == b"".join(x for _, x in items)


@settings(max_examples=300)
@given(st.binary(max_size=64))
def test_tlv_fuzz(data: bytes) -> None:
    with contextlib.suppress(TlvError):
        parse_simple_tlv(data)
    with contextlib.suppress(TlvError):
        parse_tl(data)


def test_ber_tlv() -> None:
    assert ber_tlv(0x84, b"\x01") == bytes.fromhex("84 01 01")
    assert ber_tlv(0x9F7F, bytes(42))[:3] == bytes.fromhex("9F 7F 2A")
    assert ber_tlv(0x53, bytes(200))[:3] == bytes.fromhex("53 81 C8")
    assert ber_tlv(0x53, bytes(300))[:4] == bytes.fromhex("53 82 01 2C")


# -- raw RSA -------------------------------------------------------------------------------

SHA256_DIGESTINFO = bytes.fromhex("3031300d060960864801650304020105000420")


def emsa_pkcs1_v15(message: bytes, k: int) -> bytes:
    """EMSA-PKCS1-v1_5 (RFC 8017 §9.2), by hand."""
    t = SHA256_DIGESTINFO + hashlib.sha256(message).digest()
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


def oaep_decode_sha1(em: bytes, k: int) -> bytes:
    """EME-OAEP decoding (RFC 8017 §7.1.2) with SHA-1 and MGF1-SHA-1, empty label, by hand."""

    def mgf1(seed: bytes, length: int) -> bytes:
        out = b""
        counter = 0
        while len(out) < length:
            out += hashlib.sha1(seed + counter.to_bytes(4, "big")).digest()
            counter += 1
        return out[:length]

    hlen = 20
    assert em[0] == 0
    masked_seed, masked_db = em[1 : 1 + hlen], em[1 + hlen :]
    seed = bytes(a ^ b for a, b in zip(masked_seed, mgf1(masked_db, hlen), strict=True))
    db = bytes(a ^ b for a, b in zip(masked_db, mgf1(seed, k - hlen - 1), strict=True))
    assert db[:hlen] == hashlib.sha1(b"").digest()
    rest = db[hlen:].lstrip(b"\x00")
    assert rest[0] == 1
    return rest[1:]


@pytest.mark.parametrize("bits", [1024, 2048])
def test_raw_sign_matches_pkcs1v15(bits: int) -> None:
    key = rsa_key(bits, 7)
    k = bits // 8
    message = b"usbccid raw RSA test"
    expected = key.sign(message, padding.PKCS1v15(), hashes.SHA256())
    assert rsa_private_raw(key, emsa_pkcs1_v15(message, k)) == expected


@pytest.mark.parametrize("bits", [1024, 2048])
def test_raw_decrypt_unwraps_oaep(bits: int) -> None:
    key = rsa_key(bits, 7)
    k = bits // 8
    plaintext = b"1234567890\n"
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    ciphertext = key.public_key().encrypt(plaintext, oaep)
    em = rsa_private_raw(key, ciphertext)
    assert len(em) == k
    assert em[0] == 0
    assert oaep_decode_sha1(em, k) == plaintext


def test_raw_keeps_leading_zeros() -> None:
    key = rsa_key(1024, 7)
    n = key.public_key().public_numbers().n
    e = key.public_key().public_numbers().e
    m = 5  # m^e mod n, decrypted back, must come out as 127 zero bytes then 05
    c = pow(m, e, n).to_bytes(128, "big")
    assert rsa_private_raw(key, c) == bytes(127) + b"\x05"


def test_raw_range_and_length_checks() -> None:
    key = rsa_key(1024, 7)
    n = key.public_key().public_numbers().n
    with pytest.raises(CardError) as exc:
        rsa_private_raw(key, n.to_bytes(128, "big"))
    assert exc.value.sw == SW.INCORRECT_DATA
    with pytest.raises(CardError) as exc:
        rsa_private_raw(key, b"\xff" * 128)
    assert exc.value.sw == SW.INCORRECT_DATA
    with pytest.raises(CardError) as exc:
        rsa_private_raw(key, bytes(127))
    assert exc.value.sw == SW.WRONG_LENGTH
    assert rsa_private_raw(key, bytes(128)) == bytes(128)  # 0 is in range
