"""The global PIN: VERIFY, 63Cx / 6983, CHANGE REFERENCE DATA, RESET RETRY COUNTER, storage."""

from __future__ import annotations

import pytest

from tests.cac.conftest import PIN, UNBLOCK_CODE, counting_random, make_profile
from tests.cac.helpers import ACA, CCC, PKI0, PKI2, Session, h, pin_block
from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets.pin import PinService
from usbccid.cac.card import CacCard
from usbccid.cac.errors import CardError
from usbccid.cac.profile import CardProfile, MemoryPinStateStore, PinState

WRONG = b"00000000"


def test_verify_status_and_login(s: Session) -> None:
    assert s.sw("00 20 00 00") == 0x63C3  # status, not verified (libcacard: 6A88)
    assert s.sw("00 20 00 00 00") == 0x63C3  # the T=0 form of the same (pitfall 18)
    assert s.verify(PIN) == 0x9000
    assert s.sw("00 20 00 00") == 0x9000
    assert s.sw("00 20 FF 00") == 0x9000  # ISO: P1=FF resets the verification status
    assert s.sw("00 20 00 00") == 0x63C3


def test_unpadded_pin_accepted(s: Session) -> None:
    assert s.sw(h("00 20 00 00 06") + b"123456") == 0x63C2  # wrong, counted
    assert s.sw(h("00 20 00 00 08") + PIN) == 0x9000


def test_wrong_pin_counts_down_then_blocks(s: Session, store: MemoryPinStateStore) -> None:
    assert s.verify(WRONG) == 0x63C2
    assert s.sw("00 20 00 00") == 0x63C2
    assert s.verify(WRONG) == 0x63C1
    assert s.verify(WRONG) == 0x63C0
    saved = store.load()
    assert saved is not None
    assert saved.tries_left == 0
    assert s.sw("00 20 00 00") == 0x6983
    assert s.verify(PIN) == 0x6983  # blocked: the right PIN no longer works
    assert s.sw("00 20 00 00") == 0x6983


def test_right_pin_resets_counter(s: Session) -> None:
    assert s.verify(WRONG) == 0x63C2
    assert s.verify(PIN) == 0x9000
    s.card.power_on()
    assert s.sw("00 20 00 00") == 0x63C3


def test_wrong_pin_drops_existing_login(s: Session) -> None:
    assert s.verify(PIN) == 0x9000
    assert s.verify(WRONG) == 0x63C2
    assert s.sw("00 20 00 00") == 0x63C2


def test_pin_is_card_global(s: Session) -> None:
    # OpenSC verifies with one PKI applet selected and signs with another (pitfall 5).
    s.select(CCC, 0x0C)
    assert s.verify(PIN) == 0x9000
    s.select(ACA, 0x0C)
    assert s.sw("00 20 00 00") == 0x9000
    s.select(PKI2, 0x0C)
    assert s.sw("00 20 00 00") == 0x9000


@pytest.mark.parametrize(
    ("apdu", "sw"),
    [
        ("00 20 00 80 08 31 32 33 34 35 36 37 38", 0x6A88),  # PIV PIN reference: none here
        ("00 20 01 00", 0x6A86),
        ("00 20 00 00 09 31 32 33 34 35 36 37 38 39", 0x6700),
        ("00 20 FF 00 01 31", 0x6700),
    ],
)
def test_verify_bad_parameters(s: Session, apdu: str, sw: int) -> None:
    assert s.sw(apdu) == sw
    assert s.sw("00 20 00 00") == 0x63C3  # none of these costs a try


class Crash(BaseException):
    """The process dies inside the store (a BaseException the card does not catch)."""


def test_state_saved_before_answer(profile_2048: CardProfile) -> None:
    # The decremented counter reaches the store before the PIN is even compared: a crash
    # right after that first save, even with the right PIN, leaves one try fewer.
    class CrashOnSecondSave(MemoryPinStateStore):
        saves = 0

        def save(self, state: PinState) -> None:
            self.saves += 1
            if self.saves == 2:
                raise Crash
            super().save(state)

    store = CrashOnSecondSave()
    card = CacCard(profile_2048, store)
    card.power_on()
    with pytest.raises(Crash):
        card.transmit(h("00 20 00 00 08") + pin_block(PIN))
    assert store.load() == PinState(PIN, 2, 10)
    restarted = Session(CacCard(profile_2048, store))
    assert restarted.sw("00 20 00 00") == 0x63C2


def test_wrong_pin_saved_once_before_answer(profile_2048: CardProfile) -> None:
    saved: list[PinState] = []

    class Spy(MemoryPinStateStore):
        def save(self, state: PinState) -> None:
            saved.append(state)
            super().save(state)

    card = CacCard(profile_2048, Spy())
    card.power_on()
    assert card.transmit(h("00 20 00 00 08") + pin_block(WRONG)) == h("63 C2")
    assert saved == [PinState(PIN, 2, 10)]


def test_failing_store_gives_no_free_guess(profile_2048: CardProfile) -> None:
    class Broken(MemoryPinStateStore):
        def save(self, state: PinState) -> None:
            raise OSError("disk full")

    card = CacCard(profile_2048, Broken())
    card.power_on()
    # Even the right PIN is not compared when the decremented counter cannot be saved.
    assert card.transmit(h("00 20 00 00 08") + pin_block(PIN)) == h("65 81")
    assert card.transmit(h("00 20 00 00")) == h("63 C3")


def test_state_loaded_from_store(profile_2048: CardProfile) -> None:
    card = CacCard(profile_2048, MemoryPinStateStore(PinState(b"4321", 1, 10)))
    card.power_on()
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x63C1
    assert s.verify(PIN) == 0x63C0  # the stored PIN wins over the policy
    assert s.sw("00 20 00 00") == 0x6983


def test_state_survives_a_new_card_object(profile_2048: CardProfile) -> None:
    store = MemoryPinStateStore()
    first = Session(CacCard(profile_2048, store))
    assert first.verify(WRONG) == 0x63C2
    second = Session(CacCard(profile_2048, store))
    assert second.sw("00 20 00 00") == 0x63C2


def test_change_reference_data(s: Session, store: MemoryPinStateStore) -> None:
    # What OpenSC's cac_pin_cmd sends: old and new PIN, each FF-padded to 8.
    assert s.sw(h("00 24 00 00 10") + pin_block(PIN) + pin_block(b"246810")) == 0x9000
    assert s.sw("00 20 00 00") == 0x9000
    saved = store.load()
    assert saved is not None
    assert saved.pin == b"246810"
    s.card.power_on()
    assert s.verify(PIN) == 0x63C2
    assert s.verify(b"246810") == 0x9000


def test_change_reference_data_errors(s: Session) -> None:
    assert s.sw(h("00 24 00 00 10") + pin_block(WRONG) + pin_block(b"246810")) == 0x63C2
    assert s.sw(h("00 24 00 00 10") + pin_block(PIN) + pin_block(b"12ab")) == 0x6A80
    assert s.sw(h("00 24 00 00 10") + pin_block(PIN) + pin_block(b"123")) == 0x6A80
    assert s.sw(h("00 24 00 00 08") + pin_block(PIN)) == 0x6700
    assert s.sw(h("00 24 00 80 10") + pin_block(PIN) * 2) == 0x6A88
    assert s.sw(h("00 24 02 00 08") + pin_block(PIN)) == 0x6A86
    # P1=01: new PIN only, allowed only while verified.
    assert s.sw(h("00 24 01 00 08") + pin_block(b"97531")) == 0x6982
    assert s.verify(PIN) == 0x9000
    assert s.sw(h("00 24 01 00 08") + pin_block(b"97531")) == 0x9000
    s.card.power_on()
    assert s.verify(b"97531") == 0x9000


def test_reset_retry_counter(s: Session) -> None:
    for _ in range(3):
        s.verify(WRONG)
    assert s.sw("00 20 00 00") == 0x6983
    # pkcs11-tool --unlock-pin through OpenSC: 00 2C 00 00 10 <code 8> <new PIN 8>.
    apdu = h("00 2C 00 00 10") + pin_block(UNBLOCK_CODE) + pin_block(b"11223344")
    assert s.sw(apdu) == 0x9000
    assert s.sw("00 20 00 00") == 0x63C3  # unblocked, not verified
    assert s.verify(b"11223344") == 0x9000


def test_reset_retry_counter_keep_pin(s: Session) -> None:
    for _ in range(3):
        s.verify(WRONG)
    assert s.sw(h("00 2C 01 00 08") + pin_block(UNBLOCK_CODE)) == 0x9000
    assert s.verify(PIN) == 0x9000


def test_unblock_code_counter(profile_2048: CardProfile) -> None:
    profile = make_profile([1024], max_unblock_tries=2)
    s = Session(CacCard(profile, MemoryPinStateStore(), random_bytes=counting_random()))
    bad = h("00 2C 00 00 10") + pin_block(b"99999999") + pin_block(b"1111")
    assert s.sw(bad) == 0x63C1
    assert s.sw(bad) == 0x63C0
    good = h("00 2C 00 00 10") + pin_block(UNBLOCK_CODE) + pin_block(b"1111")
    assert s.sw(good) == 0x6983
    assert s.sw(h("00 2C 03 00")) == 0x6A86
    assert s.sw(h("00 2C 00 01 10") + pin_block(UNBLOCK_CODE) * 2) == 0x6A88


def test_pin_never_in_error_messages(profile_2048: CardProfile) -> None:
    service = PinService(profile_2048.pin_policy, MemoryPinStateStore())
    with pytest.raises(CardError) as exc:
        service.verify(CommandApdu(0, 0x20, 0, 0, pin_block(b"98765432")))
    assert "98765432" not in str(exc.value)
    assert "12345678" not in str(exc.value)


def test_sign_needs_pin(s: Session) -> None:
    s.select(PKI0, 0x0C)
    block = b"\x00\x01" + b"\xff" * 200 + b"\x00" + bytes(53)
    assert s.sw(h("00 42 80 00 F0") + block[:240]) == 0x6982  # already at the first step
    assert s.sw(h("00 42 00 00 00 01 00") + block) == 0x6982  # libcacard: 6985
    assert s.verify(PIN) == 0x9000
    assert len(s.rsa(block).data) == 256
