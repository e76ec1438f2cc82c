"""Every instruction of the PIV card edge against SP 800-73-4's encodings.

Part 2 §3 (the commands) and Appendix A (the GENERAL AUTHENTICATE templates); Part 1
Table 3 (objects and access rules), Tables 8-19 (object contents), Table 4b (keys). The
host side checks results with ``cryptography``: signatures verify with the certificate's
public key, decryption undoes the host's encryption, ECDH gives the host's shared secret.
"""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from tests.piv.conftest import CARD_ID, PIN, PUK, key, make_profile
from tests.piv.helpers import PIV_AID, Session, apdu, h, pad, response_value
from usbccid.cac.profile import MemoryPinStateStore
from usbccid.piv import tlv
from usbccid.piv.card import ATR_PIV, PivCard
from usbccid.piv.objects import DATA_OBJECTS, fascn
from usbccid.piv.profile import PivProfile

SHA256_INFO = h("3031300d060960864801650304020105000420")


def emsa_pkcs1_v15(message: bytes, k: int) -> bytes:
    d = hashes.Hash(hashes.SHA256())
    d.update(message)
    t = SHA256_INFO + d.finalize()
    return b"\x00\x01" + b"\xff" * (k - len(t) - 3) + b"\x00" + t


def sha(message: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    d = hashes.Hash(algorithm)
    d.update(message)
    return d.finalize()


def cert_of(s: Session, tag: int) -> x509.Certificate:
    r = s.get_data(tag)
    assert r.sw == 0x9000
    body = tlv.as_dict(tlv.parse(tlv.parse_one(r.data, 0x53)))
    assert body[0x71] == b"\x00"  # CertInfo: not compressed
    assert body[0xFE] == b""
    return x509.load_der_x509_certificate(body[0x70])


# -- SELECT (Part 2 §3.1.1) ----------------------------------------------------------------


def test_atr_and_select_application_property_template(card: PivCard, s: Session) -> None:
    assert card.power_on() == ATR_PIV
    r = s.select()
    assert r.sw == 0x9000
    apt = tlv.as_dict(tlv.parse(tlv.parse_one(r.data, 0x61)))
    assert apt[0x4F] == h("00 00 10 00 01 00")  # the PIX of the PIV AID
    assert tlv.parse_one(apt[0x79], 0x4F) == h("A0 00 00 03 08")  # NIST's RID
    assert apt[0x50] == b"usbccid PIV"
    algorithms = tlv.parse(apt[0xAC])
    assert [v for t, v in algorithms if t == 0x80] == [bytes([a]) for a in (6, 7, 0x11, 0x14)]
    assert algorithms[-1] == (0x06, b"")


def test_select_forms(s: Session) -> None:
    assert s.select(PIV_AID[:9]).sw == 0x9000  # right-truncated: without the version
    assert s.send(apdu(0, 0xA4, 0x04, 0x0C, PIV_AID)).data == b""  # P2=0C: no answer data
    assert s.select(PIV_AID[:8]).sw == 0x6A82
    assert s.select(h("A0 00 00 00 79 01 00")).sw == 0x6A82  # a CAC applet: not on this card
    assert s.sw(apdu(0, 0xA4, 0x00, 0x00, h("3F00"))) == 0x6A86  # by file ID: no
    assert s.sw(apdu(0, 0xA4, 0x04, 0x04, PIV_AID)) == 0x6A86  # FCP: no
    # A failed SELECT leaves the application selected: GET DATA still works.
    assert s.get_data(0x7E).sw == 0x9000


# -- GET DATA (Part 2 §3.1.2) and the objects (Part 1) ----------------------------------------


def test_get_data_discovery_object(s: Session) -> None:
    r = s.get_data(0x7E)
    assert r.sw == 0x9000
    body = tlv.as_dict(tlv.parse(tlv.parse_one(r.data, 0x7E)))
    assert body == {0x4F: PIV_AID, 0x5F2F: h("40 00")}  # Table 18; PIV PIN only


def test_get_data_chuid(s: Session, profile: PivProfile) -> None:
    r = s.get_data(0x5FC102)
    body = tlv.parse(tlv.parse_one(r.data, 0x53))
    tags = [t for t, _ in body]
    assert tags == [0x30, 0x34, 0x35, 0x3E, 0xFE]  # Table 9, in order, EDC last
    values = dict(body)
    f = values[0x30]
    assert len(f) == 25
    # ";9999" (agency code 9999: not issued by a federal agency), as OpenSC tests it
    assert f[:3] == h("D4 E7 39")
    assert f[3] & 0x80
    assert len(values[0x34]) == 16
    assert values[0x34][6] >> 4 == 4
    assert values[0x35] == b"20360101"


def test_fascn_encoding() -> None:
    # The FASC-N of TIG SCEPACS' example: agency 0032, system 0001, credential 092446
    # (here with our series/issue/person/organization fields), decoded back digit by digit.
    raw = fascn("0032", "0001", "092446", "1112223333")
    bits = bin(int.from_bytes(raw, "big"))[2:].zfill(200)
    chars = []
    for i in range(0, 200, 5):
        sym = bits[i : i + 5]
        assert sym.count("1") % 2 == 1  # odd parity
        chars.append(sum(1 << b for b in range(4) if sym[b] == "1"))
    digits = "".join(str(c) if c < 10 else {0xB: ";", 0xD: "=", 0xF: "?"}[c] for c in chars[:-1])
    assert digits == ";0032=0001=092446=1=1=1112223333199991?"
    lrc = 0
    for c in chars[:-1]:
        lrc ^= c
    assert chars[-1] == lrc


def test_get_data_ccc(s: Session) -> None:
    body = tlv.parse_one(s.get_data(0x5FC107).data, 0x53)
    entries = tlv.parse(body)
    tags = [t for t, _ in entries]
    assert tags == [0xF0, 0xF1, 0xF2, 0xF3, 0xF4, 0xF5, 0xF6, 0xF7, 0xFA, 0xFB, 0xFC, 0xFD, 0xFE]
    f0 = dict(entries)[0xF0]
    assert len(f0) == 21
    assert f0[:5] == h("A0 00 00 03 08")
    assert f0[-14:] == CARD_ID[-14:]


def test_get_data_key_history(s: Session) -> None:
    body = tlv.parse(tlv.parse_one(s.get_data(0x5FC10C).data, 0x53))
    assert body == [(0xC1, b"\x01"), (0xC2, b"\x00"), (0xFE, b"")]  # one retired key (82)


def test_get_data_certificates(s: Session, profile: PivProfile) -> None:
    tags = {0x9A: 0x5FC105, 0x9C: 0x5FC10A, 0x9D: 0x5FC10B, 0x9E: 0x5FC101, 0x82: 0x5FC10D}
    for slot in profile.slots:
        assert cert_of(s, tags[slot.ref]) == slot.certificate
    assert s.get_data(0x5FC10E).sw == 0x6A82  # retired 2: not on this card


def test_printed_information_needs_the_pin(s: Session) -> None:
    assert s.get_data(0x5FC109).sw == 0x6982
    assert s.get_data(0x5FC103).sw == 0x6982  # fingerprints: the rule first, absent or not
    assert s.verify(PIN) == 0x9000
    r = s.get_data(0x5FC109)
    body = tlv.parse(tlv.parse_one(r.data, 0x53))
    assert [t for t, _ in body] == [0x01, 0x02, 0x04, 0x05, 0x06, 0x07, 0xFE]
    assert dict(body)[0x01] == b"PIV TEST 9A"
    assert dict(body)[0x04] == b"2036JAN01"
    assert s.get_data(0x5FC103).sw == 0x6A82  # now it may say it is absent


def test_get_data_errors(s: Session) -> None:
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFE, h("5C 01 7E"), 0)) == 0x6A86
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF, h("5D 01 7E"), 0)) == 0x6A80  # not a tag list
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 03 5F C1"), 0)) == 0x6A80  # truncated
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 00"), 0)) == 0x6A80
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 01 7E 00"), 0)) == 0x6A80  # trailing byte
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 03 5F C1 99"), 0)) == 0x6A82  # no such object
    assert s.sw(apdu(0, 0xCB, 0x3F, 0xFF)) == 0x6A80


def test_every_defined_object_answers_a_status(s: Session) -> None:
    # Every object of Part 1 Table 3 (and only those) is a GET DATA target.
    assert len(DATA_OBJECTS) == 36
    for tag in DATA_OBJECTS:
        assert s.get_data(tag).sw in (0x9000, 0x6A82, 0x6982)


def test_length_probe_then_get_response(s: Session) -> None:
    # OpenSC's piv_get_data asks for 8 bytes first (the tag and length), then re-reads.
    r = s.send(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 03 5F C1 05"), 8))
    assert len(r.data) == 8
    assert r.sw1 == 0x61
    assert r.data[:2] == h("53 82")
    total = 4 + int.from_bytes(r.data[2:4], "big")
    rest = s.full(apdu(0, 0xC0, 0, 0, le=r.sw2))
    assert rest.sw == 0x9000
    assert len(r.data) + len(rest.data) == total


# -- VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER (Part 2 §3.2.1-3.2.3) -----------------


def test_verify(s: Session) -> None:
    assert s.verify(None) == 0x63C3  # status: not verified, 3 tries
    assert s.verify(b"11111111") == 0x63C2
    assert s.verify(None) == 0x63C2
    assert s.verify(PIN) == 0x9000
    assert s.verify(None) == 0x9000
    assert s.sw(h("00 20 FF 80")) == 0x9000  # reset the security status (800-73-4)
    assert s.verify(None) == 0x63C3
    assert s.sw(h("00 20 FF 80 08") + pad(PIN)) == 0x6A80
    assert s.verify(PIN, ref=0x00) == 0x6A88  # no global PIN
    assert s.verify(PIN, ref=0x81) == 0x6A88  # the PUK is not verified this way
    assert s.sw(h("00 20 01 80 08") + pad(PIN)) == 0x6A86
    assert s.sw(h("00 20 00 80 06") + PIN[:6]) == 0x6A80  # unpadded: wrong length
    assert s.verify(None) == 0x63C3  # ...and none of these cost a try


def test_verify_blocks_and_the_puk_unblocks(s: Session, store: MemoryPinStateStore) -> None:
    assert [s.verify(b"99999999") for _ in range(3)] == [0x63C2, 0x63C1, 0x63C0]
    assert s.verify(PIN) == 0x6983
    assert s.verify(None) == 0x6983
    reset = h("00 2C 00 80 10")
    assert s.sw(reset + pad(b"11111111") + pad(b"24681357")) == 0x63C9
    assert s.sw(reset + pad(PUK) + pad(b"24681")) == 0x6A80  # 5 digits: costs nothing
    assert s.sw(reset + pad(PUK) + pad(b"24681357")) == 0x9000
    assert s.verify(None) == 0x63C3
    assert s.verify(PIN) == 0x63C2
    assert s.verify(b"24681357") == 0x9000
    state = store.load()
    assert state is not None
    assert state.pin == b"24681357"
    assert state.unblock_tries_left == 10
    assert s.sw(h("00 2C 00 81 10") + pad(PUK) + pad(PIN)) == 0x6A88
    assert s.sw(h("00 2C 01 80 08") + pad(PUK)) == 0x6A86


def test_change_pin_and_puk(s: Session, store: MemoryPinStateStore) -> None:
    change = h("00 24 00 80 10")
    assert s.sw(change + pad(b"00000000") + pad(b"13572468")) == 0x63C2
    assert s.sw(change + pad(PIN) + pad(b"1357")) == 0x6A80  # a PIV PIN is 6 to 8 digits
    assert s.sw(change + pad(PIN) + pad(b"13579a")) == 0x6A80
    assert s.sw(change + pad(PIN) + pad(b"135792")) == 0x9000
    assert s.verify(None) == 0x9000  # the old PIN verified: the new one is
    assert s.verify(b"135792") == 0x9000
    puk = h("00 24 00 81 10")
    assert s.sw(puk + pad(b"12121212") + pad(b"11223344")) == 0x63C9
    assert s.sw(puk + pad(PUK) + b"\xff" * 8) == 0x6A80
    assert s.sw(puk + pad(PUK) + b"\x01\x02\x03\x04\x05\x06\x07\x08") == 0x9000
    state = store.load()
    assert state is not None
    assert state.unblock_code == bytes(range(1, 9))
    assert state.unblock_tries_left == 10
    reset = h("00 2C 00 80 10")
    assert s.sw(reset + pad(PUK) + pad(PIN)) == 0x63C9  # the old PUK no longer works
    assert s.sw(reset + bytes(range(1, 9)) + pad(PIN)) == 0x9000
    assert s.sw(h("00 24 00 82 10") + pad(PIN) + pad(PIN)) == 0x6A88
    assert s.sw(h("00 24 01 80 10") + pad(PIN) + pad(PIN)) == 0x6A86
    assert s.sw(h("00 24 00 80 08") + pad(PIN)) == 0x6A80


def test_the_puk_blocks_for_good(s: Session) -> None:
    profile = make_profile(max_unblock_tries=2)
    s = Session(PivCard(profile, MemoryPinStateStore()))
    reset = h("00 2C 00 80 10")
    assert s.sw(reset + pad(b"00000000") + pad(PIN)) == 0x63C1
    assert s.sw(reset + pad(b"00000000") + pad(PIN)) == 0x63C0
    assert s.sw(reset + pad(PUK) + pad(PIN)) == 0x6983
    assert s.sw(h("00 24 00 81 10") + pad(PUK) + pad(PIN)) == 0x6983


def test_a_failing_store_costs_no_try_and_compares_nothing(profile: PivProfile) -> None:
    class Failing(MemoryPinStateStore):
        def save(self, state: object) -> None:
            raise OSError("disk full")

    s = Session(PivCard(profile, Failing()))
    assert s.verify(PIN) == 0x6581
    assert s.verify(None) == 0x63C3


# -- GENERAL AUTHENTICATE (Part 2 §3.2.4, Appendix A) --------------------------------------


def test_rsa_2048_signature_chained_as_opensc_sends_it(s: Session, profile: PivProfile) -> None:
    message = b"signed by the PIV Authentication key"
    block = emsa_pkcs1_v15(message, 256)
    assert s.authenticate(0x07, 0x9A, 0x81, block).sw == 0x6982  # PIN first
    assert s.verify(PIN) == 0x9000
    r = s.authenticate(0x07, 0x9A, 0x81, block)
    assert r.sw == 0x9000
    signature = response_value(r.data)
    assert len(signature) == 256
    public = key("rsa2048").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())


def test_rsa_decryption(s: Session) -> None:
    public = key("rsa2048").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    secret = b"the host encrypted this for the card"
    s.verify(PIN)
    r = s.authenticate(0x07, 0x9A, 0x81, public.encrypt(secret, padding.PKCS1v15()))
    block = response_value(r.data)
    assert block[:2] == b"\x00\x02"
    assert block.endswith(b"\x00" + secret)


def test_card_authentication_needs_no_pin(s: Session) -> None:
    block = emsa_pkcs1_v15(b"challenge from a door reader", 128)
    r = s.authenticate(0x06, 0x9E, 0x81, block)
    assert r.sw == 0x9000
    public = key("rsa1024").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(
        response_value(r.data), b"challenge from a door reader", padding.PKCS1v15(), hashes.SHA256()
    )


PREHASHED = {32: hashes.SHA256(), 48: hashes.SHA384(), 64: hashes.SHA512()}


@pytest.mark.parametrize(
    ("ref", "alg", "kind", "algorithm", "cut"),
    [
        (0x9C, 0x11, "p256", hashes.SHA256(), 32),
        (0x82, 0x11, "p256-2", hashes.SHA384(), 32),  # OpenSC cuts a long hash to the field
        (0x82, 0x11, "p256-2", hashes.SHA512(), 64),  # the card cuts it (FIPS 186-4 §6.4)
        (0x9D, 0x14, "p384", hashes.SHA384(), 48),
        (0x9D, 0x14, "p384", hashes.SHA256(), 32),  # a short hash is an integer all the same
    ],
)
def test_ecdsa_signs_a_hash_and_answers_der(
    s: Session, ref: int, alg: int, kind: str, algorithm: hashes.HashAlgorithm, cut: int
) -> None:
    digest = sha(b"usbccid ECDSA", algorithm)[:cut]
    s.verify(PIN)
    r = s.authenticate(alg, ref, 0x81, digest)
    assert r.sw == 0x9000
    der = response_value(r.data)
    utils.decode_dss_signature(der)  # a DER SEQUENCE { r, s }
    public = key(kind).public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(der, digest, ec.ECDSA(utils.Prehashed(PREHASHED[len(digest)])))


def test_digital_signature_key_needs_the_pin_every_time(s: Session) -> None:
    digest = sha(b"x", hashes.SHA256())
    assert s.verify(PIN) == 0x9000
    assert s.authenticate(0x11, 0x9C, 0x81, digest).sw == 0x9000
    assert s.authenticate(0x11, 0x9C, 0x81, digest).sw == 0x6982  # PIN Always
    assert s.authenticate(0x07, 0x9A, 0x81, bytes(255) + b"\x01").sw == 0x9000  # 9A: still
    assert s.verify(None) == 0x9000
    assert s.verify(PIN) == 0x9000
    assert s.authenticate(0x11, 0x9C, 0x81, digest).sw == 0x9000


@pytest.mark.parametrize(("curve", "alg", "kind"), [(ec.SECP384R1(), 0x14, "p384")])
def test_ecdh_key_agreement(s: Session, curve: ec.EllipticCurve, alg: int, kind: str) -> None:
    host = ec.generate_private_key(curve)
    point = host.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    s.verify(PIN)
    r = s.authenticate(alg, 0x9D, 0x85, point)
    assert r.sw == 0x9000
    card_public = key(kind).public_key()
    assert isinstance(card_public, ec.EllipticCurvePublicKey)
    assert response_value(r.data) == host.exchange(ec.ECDH(), card_public)
    compressed = host.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint
    )
    assert s.authenticate(alg, 0x9D, 0x85, compressed).sw == 0x6A80
    off_curve = point[:-1] + bytes([point[-1] ^ 1])
    assert s.authenticate(alg, 0x9D, 0x85, off_curve).sw == 0x6A80
    assert s.authenticate(0x07, 0x9A, 0x85, point).sw == 0x6A80  # RSA cannot agree


def test_general_authenticate_errors(s: Session) -> None:
    s.verify(PIN)
    assert s.authenticate(0x11, 0x9A, 0x81, bytes(32)).sw == 0x6A86  # 9A is RSA-2048
    assert s.authenticate(0x99, 0x9A, 0x81, bytes(32)).sw == 0x6A86  # no such algorithm
    assert s.authenticate(0x07, 0x42, 0x81, bytes(256)).sw == 0x6A86  # no such key reference
    assert s.authenticate(0x11, 0x83, 0x81, bytes(32)).sw == 0x6A88  # retired 2: empty
    assert s.authenticate(0x07, 0x9A, 0x81, bytes(255)).sw == 0x6A80  # not modulus-sized
    assert s.authenticate(0x07, 0x9A, 0x81, b"\xff" * 256).sw == 0x6A80  # not below n
    assert s.authenticate(0x11, 0x9C, 0x81, bytes(65)).sw == 0x6A80  # not a hash
    ga = h("00 87 07 9A")
    assert s.sw(ga + bytes([4]) + h("7C 02 81 00")) == 0x6A80  # no 82 asked for
    assert s.sw(ga + bytes([6]) + h("7C 04 82 00 82 00")) == 0x6A80  # 82 twice
    assert s.sw(ga + bytes([5]) + h("7C 03 82 01 00")) == 0x6A80  # 82 not empty
    assert s.sw(ga + bytes([4]) + h("7D 02 82 00")) == 0x6A80  # not 7C
    assert s.sw(ga + bytes([3]) + h("7C 02 82")) == 0x6A80  # truncated


def test_card_management_key_challenge(s: Session) -> None:
    # OpenSC's C_GenerateRandom: 00 87 00 9B 04 7C 02 81 00 -> 7C 0A 81 08 <8 bytes>
    r = s.full(h("00 87 00 9B 04 7C 02 81 00 00"))
    assert r.sw == 0x9000
    challenge = tlv.parse_one(tlv.parse_one(r.data, 0x7C), 0x81)
    assert challenge == bytes(range(1, 9))  # the card's (here: counting) random source
    assert s.sw(h("00 87 03 9B 04 7C 02 81 00")) == 0x610C  # no Le: all of it waits
    # The response to it would authenticate the administrator: never accepted.
    assert s.sw(h("00 87 03 9B 0C 7C 0A 82 08") + bytes(8)) == 0x6982
    assert s.sw(h("00 87 03 9B 04 7C 02 80 00")) == 0x6982
    assert s.sw(h("00 87 11 9B 04 7C 02 81 00")) == 0x6A86  # 9B is Triple DES


def test_rsa_4096_answer_comes_in_pieces() -> None:
    profile = make_profile([(0x9A, "rsa4096")])
    card = PivCard(profile, MemoryPinStateStore())
    s = Session(card)
    assert card.blocking
    s.verify(PIN)
    message = b"RSA-4096 over short APDUs"
    template = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(0x81, emsa_pkcs1_v15(message, 512)))
    assert len(template) == 522
    first = s.send(apdu(0x10, 0x87, 0x16, 0x9A, template[:255]))
    second = s.send(apdu(0x10, 0x87, 0x16, 0x9A, template[255:510]))
    last = s.send(apdu(0x00, 0x87, 0x16, 0x9A, template[510:], 256))
    assert (first.sw, second.sw) == (0x9000, 0x9000)
    assert len(last.data) == 256
    assert last.sw == 0x6100
    more = s.send(h("00 C0 00 00 00"))
    assert len(more.data) == 256
    assert more.sw == 0x6108
    tail = s.send(h("00 C0 00 00 08"))
    assert tail.sw == 0x9000
    answer = last.data + more.data + tail.data
    public = key("rsa4096").public_key()
    assert isinstance(public, rsa.RSAPublicKey)
    public.verify(response_value(answer), message, padding.PKCS1v15(), hashes.SHA256())
    # One extended APDU does the same.
    ext = b"\x00\x87\x16\x9a\x00" + len(template).to_bytes(2, "big") + template + b"\x00\x00"
    r = s.send(ext)
    assert r.sw == 0x9000
    assert response_value(r.data) == response_value(answer)


# -- GET CHALLENGE, card management, the card OS ------------------------------------------------


def test_get_challenge(s: Session) -> None:
    r = s.send(h("00 84 00 00 10"))
    assert r.sw == 0x9000
    assert r.data == bytes(range(1, 17))
    assert s.sw(h("00 84 00 00")) == 0x6700
    assert s.sw(h("00 84 01 00 08")) == 0x6A86


def test_card_management_commands_need_the_admin_key(s: Session) -> None:
    s.verify(PIN)
    assert s.sw(h("00 DB 3F FF 06 5C 01 7E 53 01 00")) == 0x6982  # PUT DATA
    assert s.sw(h("00 47 00 9A 05 AC 03 80 01 11")) == 0x6982  # GENERATE ASYMMETRIC KEY PAIR


@pytest.mark.parametrize(
    ("command", "sw"),
    [
        ("00", 0x6700),  # shorter than a header
        ("00 CB 3F FF 05 5C 01", 0x6700),  # Lc says more than there is
        ("80 CB 3F FF 03 5C 01 7E 00", 0x6E00),  # proprietary class
        ("01 CB 3F FF 03 5C 01 7E 00", 0x6881),  # logical channel 1
        ("41 CB 3F FF 03 5C 01 7E 00", 0x6881),
        ("0C CB 3F FF 03 5C 01 7E 00", 0x6882),  # secure messaging
        ("FF CB 3F FF 03 5C 01 7E 00", 0x6E00),
        ("00 CA 00 66 00", 0x6D00),  # GET DATA of ISO's INS CA: not a PIV instruction
        ("00 C0 00 00 00", 0x6985),  # GET RESPONSE with nothing pending
        ("00 B0 00 00 00", 0x6D00),  # READ BINARY: PIV has no files
    ],
)
def test_card_os_errors(s: Session, command: str, sw: int) -> None:
    assert s.sw(command) == sw


def test_chain_rules(s: Session) -> None:
    assert s.sw(apdu(0x10, 0x87, 0x07, 0x9A, bytes(10))) == 0x9000
    assert s.sw(apdu(0x00, 0xCB, 0x3F, 0xFF, h("5C 01 7E"), 0)) == 0x6883  # chain broken
    assert s.get_data(0x7E).sw == 0x9000  # ...and forgotten
    assert s.sw(apdu(0x10, 0xCB, 0x3F, 0xFF, h("5C"))) == 0x9000
    assert s.full(apdu(0x00, 0xCB, 0x3F, 0xFF, h("01 7E"), 0)).sw == 0x9000  # 5C 01 7E, chained
    assert s.sw(apdu(0x10, 0x87, 0x07, 0x9A, bytes(10))) == 0x9000
    assert s.sw(h("00 C0 00 00 00")) == 0x6883


def test_an_unfetched_answer_is_dropped_by_the_next_command(s: Session) -> None:
    r = s.send(apdu(0, 0xCB, 0x3F, 0xFF, h("5C 03 5F C1 05")))  # no Le: all of it pending
    assert r.data == b""
    assert r.sw1 == 0x61
    assert s.get_data(0x7E).sw == 0x9000
    assert s.sw(h("00 C0 00 00 00")) == 0x6985


def test_power_cycle_forgets_the_security_status(card: PivCard, s: Session) -> None:
    assert s.verify(PIN) == 0x9000
    card.power_off()
    card.power_on()
    assert s.verify(None) == 0x63C3
