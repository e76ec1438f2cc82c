"""``--trace`` on a PIV card: PINs, PUKs and key operations redacted, the rest shown.

A real :class:`PivCard` behind the server's :class:`~usbccid.tool.trace.TracingCard`: the
log of a whole session (VERIFY, CHANGE REFERENCE DATA of the PIN and the PUK, RESET RETRY
COUNTER, an RSA-2048 signature sent as OpenSC sends it -- chained, its answer in 61xx and
GET RESPONSE pieces --, ECDH, GET DATA) holds none of the secrets, and still the headers
and status words.
"""

from __future__ import annotations

import logging

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.piv.conftest import PIN, PUK, counting_random
from tests.piv.helpers import Session, pad, response_value
from usbccid.cac.profile import MemoryPinStateStore
from usbccid.piv.card import PivCard
from usbccid.piv.profile import PivProfile
from usbccid.tool.trace import TracingCard


def test_a_piv_session_traced(profile: PivProfile, caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("usbccid.tool.trace.test")
    card = TracingCard(
        PivCard(profile, MemoryPinStateStore(), random_bytes=counting_random()), "r/0", logger
    )
    s = Session(card)
    host = ec.generate_private_key(ec.SECP384R1())
    point = host.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    block = b"\x00\x01" + b"\xab" * 254
    new_pin, new_puk = b"24681357", b"13572468"
    with caplog.at_level(logging.INFO, logger=logger.name):
        card.power_on()
        s.select()
        assert s.verify(PIN) == 0x9000
        signature = response_value(s.authenticate(0x07, 0x9A, 0x81, block).data)
        secret = response_value(s.authenticate(0x14, 0x9D, 0x85, point).data)
        assert s.sw(bytes.fromhex("00 24 00 80 10") + pad(PIN) + pad(new_pin)) == 0x9000
        assert s.sw(bytes.fromhex("00 24 00 81 10") + pad(PUK) + pad(new_puk)) == 0x9000
        assert s.sw(bytes.fromhex("00 2C 00 80 10") + pad(new_puk) + pad(PIN)) == 0x9000
        assert s.get_data(0x5FC105).sw == 0x9000
    log = "\n".join(r.getMessage() for r in caplog.records)
    flat = log.replace(" ", "")
    for value in (PIN, PUK, new_pin, new_puk):
        assert value.hex() not in flat
    for value in (signature, secret, block, point):
        for i in range(0, len(value) - 8, 8):  # no 8-byte piece of it, anywhere
            assert value[i : i + 8].hex() not in flat
    assert "r/0 > 00 20 00 80 08 [8 bytes redacted]" in log
    assert "r/0 > 10 87 07 9a ff [255 bytes redacted]" in log  # the chained command
    assert "r/0 < [256 bytes redacted] 61 08" in log  # 7C 82 01 04 82 82 01 00 + 256
    assert "r/0 > 00 c0 00 00 08" in log
    assert "r/0 < [8 bytes redacted] 90 00" in log  # its GET RESPONSE too
    assert "r/0 > 00 cb 3f ff 05 5c 03 5f c1 05 00" in log  # GET DATA shown
    assert "53 82" in log  # ...with the certificate object
