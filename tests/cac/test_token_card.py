"""A card whose keys and PIN live on a token (TokenCardProfile), at the CAC layer.

The token here is an in-memory model with PKCS#11's login rules (a user is logged in or
not, private-key handles are only usable while logged in, a wrong PIN sets the token's
count flags); the real modules are tested in tests/cards. These tests pin down what the
card does with it: VERIFY is the login, power off and reset log out, the status words
come from the token's flags, and the raw RSA operation is the key handle's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from tests.cac.conftest import CARD_ID, rsa_key, self_signed
from tests.cac.helpers import PKI0, PKI1, PKI2, Session, h, pin_block
from tests.cac.test_tlv_and_rsa import emsa_pkcs1_v15
from usbccid.cac.card import CacCard
from usbccid.cac.errors import CardError
from usbccid.cac.profile import (
    CardProfile,
    TokenCardProfile,
    TokenContainer,
    TokenPinInfo,
)
from usbccid.cac.rsa_raw import rsa_private_raw
from usbccid.cac.sw import SW

TOKEN_PIN = b"24682468"


@dataclass
class FakeToken:
    pin: bytes = TOKEN_PIN
    login_required: bool = True
    count_low: bool = False
    final_try: bool = False
    locked: bool = False
    logged_in: bool = False
    calls: list[str] = field(default_factory=list)

    def pin_info(self) -> TokenPinInfo:
        return TokenPinInfo(
            self.login_required, self.count_low, self.final_try, self.locked, self.logged_in
        )

    def login(self, pin: bytes) -> bool:
        self.calls.append("login")
        if self.locked:
            raise CardError(SW.AUTH_METHOD_BLOCKED, "token PIN locked")
        assert not self.logged_in, "the card logs out before it logs in"
        if pin != self.pin:
            self.count_low = True
            return False
        self.logged_in, self.count_low = True, False
        return True

    def logout(self) -> None:
        self.calls.append("logout")
        self.logged_in = False


@dataclass
class FakeTokenKey:
    """A key handle: usable only while the token is logged in (as PKCS#11 private keys)."""

    token: FakeToken
    private: rsa.RSAPrivateKey
    operations: int = 0

    @property
    def key_size(self) -> int:
        return self.private.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self.private.public_key()

    def raw_rsa(self, block: bytes) -> bytes:
        if self.token.login_required and not self.token.logged_in:
            raise CardError(SW.SECURITY_STATUS_NOT_SATISFIED, "token: user not logged in")
        self.operations += 1
        return rsa_private_raw(self.private, block)


def token_card(
    token: FakeToken, bits: list[int] | None = None
) -> tuple[CacCard, list[FakeTokenKey]]:
    keys = []
    containers = []
    for i, b in enumerate(bits or [1024, 1024, 1024]):
        private = rsa_key(b, i)
        key = FakeTokenKey(token, private)
        keys.append(key)
        containers.append(TokenContainer(f"token {i}", self_signed(private, f"TOKEN.{i}"), key))
    card = CacCard(TokenCardProfile(CARD_ID, tuple(containers), token))
    card.power_on()
    return card, keys


@pytest.fixture
def token() -> FakeToken:
    return FakeToken()


def test_token_card_is_blocking_and_logs_out_on_power(token: FakeToken) -> None:
    card, _ = token_card(token)
    assert card.blocking
    s = Session(card)
    assert s.verify(TOKEN_PIN) == 0x9000
    assert token.logged_in
    card.power_off()
    assert not token.logged_in
    card.power_on()
    assert s.sw("00 20 00 00") == 0x63C3


def test_software_card_is_not_blocking(profile_1024: CardProfile) -> None:
    from usbccid.cac.profile import MemoryPinStateStore

    assert not CacCard(profile_1024, MemoryPinStateStore()).blocking
    with pytest.raises(ValueError, match="PIN state store"):
        CacCard(profile_1024)


def test_verify_is_the_token_login(token: FakeToken) -> None:
    card, _ = token_card(token)
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x63C3  # not logged in, the token flags nothing
    assert s.verify(b"11111111") == 0x63C2  # wrong: CKF_USER_PIN_COUNT_LOW -> 63 C2
    assert not token.logged_in
    assert s.sw("00 20 00 00") == 0x63C2
    assert s.verify(TOKEN_PIN) == 0x9000
    assert token.logged_in
    assert not token.count_low
    assert s.sw("00 20 00 00") == 0x9000
    # Each VERIFY with data logs out first (libcacard vcard_emul_login), so a wrong PIN
    # after a good one leaves the card unverified.
    assert token.calls[-2:] == ["logout", "login"]
    assert s.verify(b"11111111") == 0x63C2
    assert not token.logged_in
    assert s.sw("00 20 00 00") == 0x63C2
    # P1=FF: log out.
    assert s.verify(TOKEN_PIN) == 0x9000
    assert s.sw("00 20 FF 00") == 0x9000
    assert not token.logged_in


@pytest.mark.parametrize(
    ("flags", "sw"),
    [
        ({}, 0x63C3),
        ({"count_low": True}, 0x63C2),
        ({"final_try": True}, 0x63C1),
        ({"count_low": True, "final_try": True}, 0x63C1),
        ({"locked": True}, 0x6983),
    ],
)
def test_status_words_from_token_flags(token: FakeToken, flags: dict[str, bool], sw: int) -> None:
    for name, value in flags.items():
        setattr(token, name, value)
    card, _ = token_card(token)
    s = Session(card)
    assert s.sw("00 20 00 00") == sw


def test_locked_token_answers_6983(token: FakeToken) -> None:
    card, _ = token_card(token)
    token.locked = True
    assert Session(card).verify(TOKEN_PIN) == 0x6983


def test_padding_stripped_and_long_pins(token: FakeToken) -> None:
    token.pin = b"1234"
    card, _ = token_card(token)
    s = Session(card)
    assert s.verify(b"1234") == 0x9000  # sent FF-padded to 8, as OpenSC does
    token.pin = b"a-long-token-passphrase"
    assert s.sw(h("00 20 00 00 17") + b"a-long-token-passphrase") == 0x9000
    assert s.sw(h("00 20 00 80 08") + pin_block(b"1234")) == 0x6A88
    assert s.sw("00 20 01 00") == 0x6A86


def test_token_without_login_is_verified(token: FakeToken) -> None:
    token.login_required = False  # e.g. an NSS database without a password
    card, keys = token_card(token)
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x9000
    assert s.verify(b"anything") == 0x9000
    assert "login" not in token.calls
    s.select(PKI0, 0x0C)
    assert s.rsa(emsa_pkcs1_v15(b"m", 128)).sw == 0x9000
    assert keys[0].operations == 1


def test_sign_uses_the_handle_and_needs_login(token: FakeToken) -> None:
    card, keys = token_card(token)
    s = Session(card)
    s.select(PKI1, 0x0C)
    block = emsa_pkcs1_v15(b"hello", 128)
    assert s.rsa(block).sw == 0x6982  # card-level check first: PIN not verified
    assert keys[1].operations == 0
    assert s.verify(TOKEN_PIN) == 0x9000
    r = s.rsa(block)
    assert r.sw == 0x9000
    keys[1].public_key().verify(r.data, b"hello", padding.PKCS1v15(), hashes.SHA256())
    assert [k.operations for k in keys] == [0, 1, 0]
    # The token logged out behind the card's back (e.g. another login elsewhere): the
    # handle's own error reaches the host, and the status query no longer says 90 00.
    token.logged_in = False
    assert s.rsa(block).sw == 0x6982
    assert s.sw("00 20 00 00") == 0x63C3


def test_pin_management_is_not_the_cards(token: FakeToken) -> None:
    card, _ = token_card(token)
    s = Session(card)
    assert s.sw(h("00 24 00 00 10") + pin_block(TOKEN_PIN) + pin_block(b"1357")) == 0x6A81
    assert s.sw(h("00 2C 00 00 10") + pin_block(b"87654321") + pin_block(b"1357")) == 0x6A81
    assert token.calls == ["logout"]  # only the power-on logout


def properties(s: Session, aid: str) -> bytes:
    s.select(aid, 0x0C)
    r = s.send("80 56 01 00 00")
    assert r.sw1 == 0x6C  # GET PROPERTIES wants the exact Le (libcacard)
    r = s.send(bytes((0x80, 0x56, 0x01, 0x00, r.sw2)))
    assert r.sw == 0x9000
    return r.data


def test_properties_report_the_handles_key_size(token: FakeToken) -> None:
    card, _ = token_card(token, [2048, 1024])
    s = Session(card)
    assert h("43 04 06 20 01 01") in properties(s, PKI0)
    assert h("43 04 06 10 01 01") in properties(s, PKI1)
    assert h("43 04 06 00 00 00") in properties(s, PKI2)  # coolkey's padding container
