"""The pkcs11 card source against real SoftHSM2 tokens, APDU by APDU through CacCard.

What libcacard's hwtests check (login, sign one-shot and chained, decipher, the
sign-logout-sign regression, bad data; and the same without CKM_RSA_X_509), plus the
token's PIN counter flags, token removal, and one clear error line for each bad input.
Every signature is verified with the certificate's public key.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pkcs11 import Attribute, ObjectClass

from tests.cac.helpers import PKI0, PKI1, PKI2, Session, h
from tests.cac.test_tlv_and_rsa import emsa_pkcs1_v15
from tests.cards.conftest import SoftHsm
from usbccid.cac.apdu import ResponseApdu
from usbccid.cac.card import CacCard
from usbccid.cac.profile import TokenCardProfile, TokenContainer
from usbccid.cards.pkcs11 import (
    PRESENCE_TRANSITIONS,
    Observation,
    Pkcs11Config,
    Pkcs11Source,
    PresenceAction,
    TokenConnection,
    TokenKey,
    TokenSelector,
    TokenSourceError,
    pkcs1_type1_payload,
    pkcs1_type2_block,
)


def source_for(hsm: SoftHsm, **kwargs: object) -> Pkcs11Source:
    config = Pkcs11Config(hsm.module, TokenSelector(label=hsm.label), **kwargs)  # type: ignore[arg-type]
    return Pkcs11Source(config)


def open_card(hsm: SoftHsm, **kwargs: object) -> CacCard:
    card = source_for(hsm, **kwargs).open()
    card.power_on()
    return card


def containers(card: CacCard) -> list[TokenContainer]:
    profile = card.profile
    assert isinstance(profile, TokenCardProfile)
    return list(profile.containers)


def public(card: CacCard, index: int) -> rsa.RSAPublicKey:
    key = containers(card)[index].certificate.public_key()
    assert isinstance(key, rsa.RSAPublicKey)
    return key


def rsa_op(s: Session, block: bytes, chunk: int = 240) -> ResponseApdu:
    """SIGN/DECRYPT as OpenSC's cac_rsa_op sends it; stops at the first failing step."""
    while len(block) > chunk:
        r = s.send(bytes((0x00, 0x42, 0x80, 0x00, chunk)) + block[:chunk] + b"\xff")
        if r.sw != 0x9000:
            return r
        block = block[chunk:]
    return s.full(bytes((0x00, 0x42, 0x00, 0x00, len(block))) + block + b"\xff")


def sign_and_check(s: Session, card: CacCard, index: int, message: bytes) -> int:
    """SIGN/DECRYPT a PKCS#1 v1.5 SHA-256 block; verify it with the certificate; the SW."""
    key = public(card, index)
    k = key.key_size // 8
    s.select([PKI0, PKI1, PKI2][index], 0x0C)
    r = rsa_op(s, emsa_pkcs1_v15(message, k))
    if r.sw == 0x9000:
        assert len(r.data) == k
        key.verify(r.data, message, padding.PKCS1v15(), hashes.SHA256())
    return r.sw


def test_token_card_signs_and_decrypts(hsm: SoftHsm) -> None:
    card = open_card(hsm)
    assert card.blocking
    s = Session(card)
    assert [c.label for c in containers(card)] == ["id", "sign"]  # the CA cert has no key
    assert [c.certificate for c in containers(card)] == [
        hsm.certificates["01"],
        hsm.certificates["02"],
    ]
    assert sign_and_check(s, card, 0, b"before login") == 0x6982
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"hello") == 0x9000
    assert sign_and_check(s, card, 1, b"hello 1024") == 0x9000
    # One extended APDU, as libcacard's /hw-tests/sign.
    block = emsa_pkcs1_v15(b"extended", 256)
    s.select(PKI0, 0x0C)
    r = s.send(h("80 42 00 00 00 01 00") + block + h("00 00"))
    assert r.sw == 0x9000
    public(card, 0).verify(r.data, b"extended", padding.PKCS1v15(), hashes.SHA256())
    # Decipher: the card returns the raw RSA result, the host unpads it.
    ciphertext = public(card, 0).encrypt(b"1234567890\n", padding.PKCS1v15())
    r = rsa_op(s, ciphertext)
    assert r.sw == 0x9000
    assert r.data[:2] == h("00 02")
    assert r.data.endswith(b"\x001234567890\n")
    # OAEP and PSS work too, because the token does raw RSA (OpenSC pads them itself).
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), None)
    assert rsa_op(s, public(card, 0).encrypt(b"oaep", oaep)).sw == 0x9000
    card.power_off()


def test_containers_hold_handles_not_keys(hsm: SoftHsm) -> None:
    card = open_card(hsm)
    for container in containers(card):
        key = container.key
        assert isinstance(key, TokenKey)
        assert {f.name for f in dataclasses.fields(key)} == {"connection", "key_id", "public"}
        assert isinstance(key.public, rsa.RSAPublicKey)
        assert not hasattr(key, "private_numbers")
        assert not hasattr(key, "private_bytes")
    # The token made the keys and will not let them out: the card works with them anyway.
    connection = containers(card)[0].key
    assert isinstance(connection, TokenKey)
    session = connection.connection
    s = Session(card)
    assert s.verify(hsm.pin.encode()) == 0x9000
    for key_id in (b"\x01", b"\x02"):
        (obj,) = session.session.get_objects(
            {Attribute.CLASS: ObjectClass.PRIVATE_KEY, Attribute.ID: key_id}
        )
        assert obj[Attribute.SENSITIVE] is True
        assert obj[Attribute.EXTRACTABLE] is False
    assert sign_and_check(s, card, 0, b"never extractable") == 0x9000


def test_sign_logout_sign(hsm: SoftHsm) -> None:
    """libcacard /hw-tests/sign-logout-sign: handles die with the login (NSS bug 1576642)."""
    card = open_card(hsm)
    s = Session(card)
    key = containers(card)[0].key
    assert isinstance(key, TokenKey)
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"one") == 0x9000
    assert s.verify(hsm.pin.encode()) == 0x9000  # logs out first, then in again
    assert sign_and_check(s, card, 0, b"two") == 0x9000
    card.power_off()  # logs out
    card.power_on()
    assert sign_and_check(s, card, 0, b"three") == 0x6982
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"four") == 0x9000
    assert key.connection.logins == 3


def test_wrong_token_pin_uses_the_tokens_flags(hsm: SoftHsm) -> None:
    card = open_card(hsm)
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x63C3  # not logged in; no flag set yet
    assert s.verify(b"0000") == 0x63C2  # SoftHSM sets CKF_USER_PIN_COUNT_LOW
    assert s.sw("00 20 00 00") == 0x63C2
    assert sign_and_check(s, card, 0, b"x") == 0x6982
    assert s.verify(hsm.pin.encode()) == 0x9000  # a good login clears the flag
    assert s.sw("00 20 00 00") == 0x9000
    assert s.verify(b"00000000") == 0x63C2  # a wrong PIN logs out (VERIFY logs out first)
    assert sign_and_check(s, card, 0, b"x") == 0x6982
    card.power_on()
    assert s.verify(hsm.pin.encode()) == 0x9000
    card.power_on()
    assert s.sw("00 20 00 00") == 0x63C3


def test_explicit_ids_order_and_unknown_id(hsm: SoftHsm) -> None:
    card = open_card(hsm, ids=(b"\x02", b"\x01"))
    assert [c.label for c in containers(card)] == ["sign", "id"]
    s = Session(card)
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"1024 first") == 0x9000
    with pytest.raises(TokenSourceError) as info:
        source_for(hsm, ids=(b"\x01", b"\x07")).open()
    assert str(info.value) == (
        f"PKCS#11 module {hsm.module}: token 'CAC test': no certificate with CKA_ID 07 "
        "(the token has: 01, 02, 0a)"
    )
    # A certificate without a key may be listed; signing with it then finds no key.
    card = open_card(hsm, ids=(b"\x0a",))
    s = Session(card)
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"no key") == 0x6A88


def test_token_without_raw_rsa(hsm_no_raw: SoftHsm) -> None:
    """libcacard's hwtests_no_raw: sign and decipher emulated with CKM_RSA_PKCS."""
    hsm = hsm_no_raw
    card = open_card(hsm)
    key = containers(card)[0].key
    assert isinstance(key, TokenKey)
    assert not key.connection.has_raw_rsa
    s = Session(card)
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"pkcs1 sign") == 0x9000
    assert sign_and_check(s, card, 1, b"pkcs1 sign 1024") == 0x9000
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"after a new login") == 0x9000
    ciphertext = public(card, 0).encrypt(b"1234567890\n", padding.PKCS1v15())
    s.select(PKI0, 0x0C)
    r = rsa_op(s, ciphertext)
    assert r.sw == 0x9000
    assert len(r.data) == 256
    assert r.data[:2] == h("00 02")
    pad_end = r.data.index(b"\x00", 2)
    assert pad_end >= 10  # at least 8 non-zero padding bytes (RFC 8017 §7.2.1)
    assert r.data[pad_end + 1 :] == b"1234567890\n"
    # /hw-tests/sign-bad-data: neither a type 1 block nor a valid ciphertext: 69 84.
    assert rsa_op(s, b"\x00" + b"\xff" * 255).sw == 0x6984
    # PSS needs raw RSA: refused the same way, and the card goes on working.
    pss = bytes([0x00]) + bytes(range(1, 256))
    assert rsa_op(s, pss).sw == 0x6984
    assert sign_and_check(s, card, 0, b"still fine") == 0x9000


def test_token_removal_is_a_card_removal(hsm: SoftHsm) -> None:
    source = source_for(hsm)
    card = source.open()
    card.power_on()
    s = Session(card)
    assert s.verify(hsm.pin.encode()) == 0x9000
    assert source.poll() == []
    # SoftHSM has no removable hardware: taking its token directory away is the nearest
    # thing (C_GetTokenInfo then fails); it cannot bring a token back without a restart.
    (token_dir,) = (hsm.directory / "tokens").iterdir()
    away = hsm.directory / "away"
    shutil.move(token_dir, away)
    events = source.poll()
    assert [e.action for e in events] == [PresenceAction.REMOVE]
    assert source.card is None
    assert source.poll() == []
    assert sign_and_check(s, card, 0, b"gone") in (0x6F00, 0x6984)


def test_presence_table_is_complete() -> None:
    assert set(PRESENCE_TRANSITIONS) == {(c, o) for c in (False, True) for o in Observation}
    assert PRESENCE_TRANSITIONS[True, Observation.OTHER] == (
        PresenceAction.REMOVE,
        PresenceAction.INSERT,
    )


def test_check(hsm: SoftHsm) -> None:
    source = source_for(hsm)
    info = source.check()
    assert (info.token_label, info.raw_rsa, info.login_required) == ("CAC test", True, True)
    assert [(c.key_id, c.label, c.key_size) for c in info.containers] == [
        (b"\x01", "id", 2048),
        (b"\x02", "sign", 1024),
    ]
    assert info.token_serial == hsm.serial()
    assert not info.pin_checked
    assert source.check(pin=hsm.pin).pin_checked
    with pytest.raises(TokenSourceError) as exc:
        source.check(pin="0000")
    assert str(exc.value) == f"PKCS#11 module {hsm.module}: token 'CAC test': wrong PIN"
    by_serial = Pkcs11Source(Pkcs11Config(hsm.module, TokenSelector(serial=hsm.serial())))
    assert by_serial.check().token_label == "CAC test"


def test_token_not_present(hsm: SoftHsm) -> None:
    with pytest.raises(TokenSourceError) as exc:
        Pkcs11Source(Pkcs11Config(hsm.module, TokenSelector(label="nope"))).open()
    assert str(exc.value) == (
        f"PKCS#11 module {hsm.module}, token label 'nope': token not present "
        f"(present: 'CAC test' (serial {hsm.serial()}))"
    )


def test_module_that_does_not_load(tmp_path: Path) -> None:
    missing = str(tmp_path / "nope.so")
    with pytest.raises(TokenSourceError) as exc:
        Pkcs11Source(Pkcs11Config(missing)).open()
    message = str(exc.value)
    assert message.startswith(f"PKCS#11 module {missing}: cannot load: ")
    assert "\n" not in message
    libz = "/usr/lib/x86_64-linux-gnu/libz.so.1"
    with pytest.raises(TokenSourceError) as exc:
        Pkcs11Source(Pkcs11Config(libz)).open()
    assert str(exc.value) == (
        f"PKCS#11 module {libz}: not a PKCS#11 module: "
        "C_GetFunctionList: CKR_FUNCTION_NOT_SUPPORTED"
    )


def test_pkcs1_helpers() -> None:
    assert pkcs1_type1_payload(h("00 01 FF FF 00 AB CD")) == h("AB CD")
    assert pkcs1_type1_payload(h("00 01 00 AB")) == h("AB")
    assert pkcs1_type1_payload(h("00 01 FF FF")) is None
    assert pkcs1_type1_payload(h("00 02 FF 00 AB")) is None
    assert pkcs1_type1_payload(h("00 01 FE 00 AB")) is None
    block = pkcs1_type2_block(b"data", 64)
    assert len(block) == 64
    assert block[:2] == h("00 02")
    assert 0 not in block[2:59]
    assert block[59:] == b"\x00data"
    zeros = iter([bytes(70), bytes(range(1, 80))])
    assert pkcs1_type2_block(b"", 64, lambda n: next(zeros))[:4] == h("00 02 01 02")


def test_connection_is_a_token_login(hsm: SoftHsm) -> None:
    card = open_card(hsm)
    profile = card.profile
    assert isinstance(profile, TokenCardProfile)
    assert isinstance(profile.login, TokenConnection)


GARBAGE_INS = [0x42, 0x20, 0x24, 0x2C, 0xA4, 0xC0, 0x52, 0x56, 0x84]


def _garbage(card: CacCard, pin: bytes, commands: list[tuple[int, int, int, bytes]]) -> None:
    card.power_on()
    card.transmit(bytes.fromhex("00 A4 04 0C 07 A0 00 00 00 79 01 00"))
    card.transmit(b"\x00\x20\x00\x00\x08" + pin.ljust(8, b"\xff"))
    for ins, p1, p2, data in commands:
        body = bytes((len(data),)) + data if data else b""
        response = card.transmit(bytes((0x00, ins, p1, p2)) + body)
        assert isinstance(response, bytes)
        assert len(response) >= 2


_COMMANDS = st.lists(
    st.tuples(
        st.sampled_from(GARBAGE_INS),
        st.sampled_from([0x00, 0x80, 0xFF, 0x01]),
        st.sampled_from([0x00, 0x01]),
        st.one_of(st.binary(max_size=255), st.binary(min_size=240, max_size=240)),
    ),
    max_size=6,
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(commands=_COMMANDS)
def test_token_card_garbage_only_gets_status_words(
    hsm: SoftHsm, commands: list[tuple[int, int, int, bytes]]
) -> None:
    """Nothing the host sends makes a token call raise out of the card (CardJob would
    report a hardware error): every failure is a status word."""
    card = _garbage_card(hsm)
    _garbage(card, hsm.pin.encode(), commands)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(commands=_COMMANDS)
def test_token_card_without_raw_rsa_garbage(
    hsm_no_raw: SoftHsm, commands: list[tuple[int, int, int, bytes]]
) -> None:
    _garbage(_garbage_card(hsm_no_raw), hsm_no_raw.pin.encode(), commands)


_CARDS: dict[str, CacCard] = {}


def _garbage_card(hsm: SoftHsm) -> CacCard:
    """One card per token for all examples (a fresh CacCard each, the same session)."""
    key = str(hsm.conf)
    if key not in _CARDS:
        _CARDS.clear()
        _CARDS[key] = source_for(hsm).open()
    profile = _CARDS[key].profile
    assert isinstance(profile, TokenCardProfile)
    return CacCard(profile)


def test_a_login_elsewhere_never_lets_a_wrong_pin_in(hsm: SoftHsm) -> None:
    """PKCS#11 login state is per process: with the token already logged in (another card
    on it), C_Login answers CKR_USER_ALREADY_LOGGED_IN without checking the PIN."""
    a, b = open_card(hsm), open_card(hsm)
    conn_a, conn_b = (containers(c)[0].key.connection for c in (a, b))  # type: ignore[attr-defined]
    assert conn_a is not conn_b
    assert conn_a.login(hsm.pin.encode())
    assert not conn_b.login(b"99999999")  # not "already logged in": logged out, then refused
    sa, sb = Session(a), Session(b)
    assert sa.verify(hsm.pin.encode()) == 0x9000
    assert sb.verify(b"99999999") == 0x63C2
    # The shared login: b's VERIFY logged the token out for a too (libcacard: the same);
    # a's card says so (69 82 asks the host to verify again, its status query 63 Cx).
    assert sign_and_check(sa, a, 0, b"a") == 0x6982
    assert sa.sw("00 20 00 00") == 0x63C2
    assert sa.verify(hsm.pin.encode()) == 0x9000
    assert sign_and_check(sa, a, 0, b"a") == 0x9000
