"""RSA-3072 and RSA-4096 containers: answers longer than 256 bytes, and ``blocking``."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.cac.conftest import PIN, counting_random, make_profile
from tests.cac.helpers import PKI0, Session, h
from tests.cac.test_tlv_and_rsa import emsa_pkcs1_v15
from usbccid.cac.card import CacCard
from usbccid.cac.profile import MemoryPinStateStore
from usbccid.cac.tlv import parse_simple_tlv


@pytest.mark.slow
@pytest.mark.parametrize("bits", [3072, 4096])
def test_large_key_sign(bits: int) -> None:
    profile = make_profile([bits])
    card = CacCard(profile, MemoryPinStateStore(), random_bytes=counting_random())
    assert card.blocking
    card.power_on()
    s = Session(card)
    k = bits // 8
    key = profile.containers[0].private_key
    expected = key.sign(b"big", padding.PKCS1v15(), hashes.SHA256())
    block = emsa_pkcs1_v15(b"big", k)
    assert s.verify(PIN) == 0x9000
    s.select(PKI0, 0x0C)
    r = s.send("00 56 01 00 1D")
    assert dict(parse_simple_tlv(dict(parse_simple_tlv(r.data))[0x51]))[0x43][1] == bits // 64
    # OpenSC: 240-byte steps, final step with Le=FF -> 61 00 and GET RESPONSE chaining.
    r = s.rsa(block)
    assert r.sw == 0x9000
    assert r.data == expected
    # One extended APDU with extended Le: everything at once.
    r = s.send(h("00 42 00 00 00") + k.to_bytes(2, "big") + block + h("00 00"))
    assert r.sw == 0x9000
    assert r.data == expected
    # Extended Lc but short Le=00: 256 bytes is less than k, so 61 00 and GET RESPONSE.
    assert s.sw(h("00 42 00 00 00") + k.to_bytes(2, "big") + block + h("01 00")) == 0x6100
    first = s.send("00 C0 00 00 00")
    assert first.sw == 0x6100 + (k - 256 if k - 256 < 256 else 0)
    rest = s.send(bytes((0, 0xC0, 0, 0, (k - 256) & 0xFF)))
    assert first.data + rest.data == expected
