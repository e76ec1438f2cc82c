"""Property tests: the PIN and PUK counters against a model, and garbage in.

The state machine drives VERIFY (right, wrong, status, reset), CHANGE REFERENCE DATA of the
PIN and of the PUK (right or wrong old value, valid or invalid new one), RESET RETRY
COUNTER (right or wrong PUK), GENERAL AUTHENTICATE with the PIN-protected 9A and the
PIN-Always 9C keys, power cycles, and new card objects on the same store (a server
restart), checking after every step that the status word is exactly the model's:

* ``63 Cx`` reports the counter left (x), the try that blocks answers ``63 C0``, a blocked
  reference ``69 83``; a malformed new value costs no try;
* a right PIN or PUK restores its counter; the PUK sets a new PIN and unblocks it;
* the counters (and a changed PIN or PUK) survive a restart, the security status does not;
* 9A needs the PIN verified, 9C a VERIFY before each signature.

The garbage tests send random bytes and random bodies under every PIV instruction: the
card answers each with a status word, never an exception, error words carry no data, and
no response holds a piece of a private key.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tests.piv.conftest import PIN, PUK, counting_random, make_profile
from tests.piv.helpers import apdu, pad
from usbccid.cac.profile import MemoryPinStateStore
from usbccid.piv import tlv
from usbccid.piv.card import PivCard
from usbccid.piv.keys import PivPrivateKey

MAX_TRIES, MAX_PUK_TRIES = 3, 4
PROFILE = make_profile(
    [(0x9A, "rsa1024"), (0x9C, "p256"), (0x9D, "p384"), (0x9E, "rsa1024-2")],
    max_tries=MAX_TRIES,
    max_unblock_tries=MAX_PUK_TRIES,
)


def _secret_windows() -> list[bytes]:
    out = []
    for s in PROFILE.slots:
        k: PivPrivateKey = s.private_key
        numbers = k.private_numbers()
        values = (
            [numbers.private_value]
            if hasattr(numbers, "private_value")
            else [numbers.d, numbers.p, numbers.q, numbers.dmp1, numbers.dmq1]
        )
        for v in values:
            raw = v.to_bytes((v.bit_length() + 7) // 8, "big")
            out += [raw[:12], raw[-12:]]
    return out


SECRETS = _secret_windows()


def check_response(response: bytes) -> int:
    assert isinstance(response, bytes)
    assert len(response) >= 2
    sw1 = response[-2]
    assert 0x61 <= sw1 <= 0x6F or 0x90 <= sw1 <= 0x9F, response.hex()
    if 0x64 <= sw1 <= 0x6F:
        assert len(response) == 2, "an error word with data"
    for window in SECRETS:
        assert window not in response, "a private key leaked"
    return int.from_bytes(response[-2:], "big")


def counter_sw(tries: int) -> int:
    return 0x63C0 | tries if tries > 0 else 0x6983


PINS = st.sampled_from([PIN, b"11111111", b"246813", b"24681357", b"999999"])
NEW_PINS = st.sampled_from([b"246813", b"24681357", b"1357", b"12ab5678", b"13572468"])
PUKS = st.sampled_from([PUK, b"00000000", b"\x01\x02\x03\x04\x05\x06\x07\x08"])


class PinMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryPinStateStore()
        self.card = PivCard(PROFILE, self.store, random_bytes=counting_random())
        self.card.power_on()
        self.pin, self.puk = PIN, PUK
        self.tries, self.puk_tries = MAX_TRIES, MAX_PUK_TRIES
        self.verified = self.granted = False

    def send(self, command: bytes) -> int:
        return check_response(self.card.transmit(command))

    def _try(self, candidate: bytes, secret: bytes, counter: str, full: int) -> int | None:
        """The model of one comparison: None on a match, else the expected status word."""
        left: int = self.tries if counter == "tries" else self.puk_tries
        if left == 0:
            return 0x6983  # blocked: nothing compared, nothing changes
        left = full if candidate == secret else left - 1
        if counter == "tries":
            self.tries = left
            if candidate != secret:  # a wrong PIN ends the security status
                self.verified = self.granted = False
        else:
            self.puk_tries = left
        return None if candidate == secret else 0x63C0 | left

    @rule(pin=PINS)
    def verify(self, pin: bytes) -> None:
        sw = self.send(apdu(0, 0x20, 0x00, 0x80, pad(pin)))
        expected = self._try(pin, self.pin, "tries", MAX_TRIES)
        if expected is None:
            self.verified = self.granted = True
        assert sw == (0x9000 if expected is None else expected)

    @rule()
    def status(self) -> None:
        sw = self.send(apdu(0, 0x20, 0x00, 0x80))
        assert sw == (0x9000 if self.verified else counter_sw(self.tries))

    @rule()
    def logout(self) -> None:
        assert self.send(apdu(0, 0x20, 0xFF, 0x80)) == 0x9000
        self.verified = self.granted = False

    @rule(old=PINS, new=NEW_PINS)
    def change_pin(self, old: bytes, new: bytes) -> None:
        sw = self.send(apdu(0, 0x24, 0x00, 0x80, pad(old) + pad(new)))
        if not (6 <= len(new) <= 8 and new.isdigit()):
            assert sw == 0x6A80
            return
        expected = self._try(old, self.pin, "tries", MAX_TRIES)
        if expected is None:
            self.pin, self.verified = new, True
        assert sw == (0x9000 if expected is None else expected)

    @rule(old=PUKS, new=PUKS)
    def change_puk(self, old: bytes, new: bytes) -> None:
        sw = self.send(apdu(0, 0x24, 0x00, 0x81, pad(old) + pad(new)))
        expected = self._try(old, self.puk, "puk_tries", MAX_PUK_TRIES)
        if expected is None:
            self.puk = new
            assert sw == 0x9000
        else:
            assert sw == expected

    @rule(puk=PUKS, new=NEW_PINS)
    def unblock(self, puk: bytes, new: bytes) -> None:
        sw = self.send(apdu(0, 0x2C, 0x00, 0x80, pad(puk) + pad(new)))
        if not (6 <= len(new) <= 8 and new.isdigit()):
            assert sw == 0x6A80
            return
        expected = self._try(puk, self.puk, "puk_tries", MAX_PUK_TRIES)
        if expected is None:
            self.pin, self.tries = new, MAX_TRIES
            self.verified = self.granted = False
            assert sw == 0x9000
        else:
            assert sw == expected

    @rule(ref=st.sampled_from([0x9A, 0x9C, 0x9E]))
    def sign(self, ref: int) -> None:
        alg, data = {
            0x9A: (0x06, bytes(127) + b"\x01"),
            0x9C: (0x11, bytes(32)),
            0x9E: (0x06, bytes(127) + b"\x02"),
        }[ref]
        template = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(0x81, data))
        sw = self.send(apdu(0, 0x87, alg, ref, template, 256))
        allowed = {0x9A: self.verified, 0x9C: self.verified and self.granted, 0x9E: True}[ref]
        assert sw == (0x9000 if allowed else 0x6982)
        if ref == 0x9C and allowed:
            self.granted = False

    @rule()
    def power_cycle(self) -> None:
        self.card.power_off()
        assert self.card.power_on() == self.card.atr
        self.verified = self.granted = False

    @rule()
    def restart(self) -> None:
        """A new card object on the same store: what a server restart does."""
        self.card = PivCard(PROFILE, self.store, random_bytes=counting_random())
        self.card.power_on()
        self.verified = self.granted = False

    @precondition(lambda self: self.tries == 0)
    @rule()
    def blocked_pin_stays_blocked(self) -> None:
        assert self.send(apdu(0, 0x20, 0x00, 0x80, pad(self.pin))) == 0x6983

    @invariant()
    def persistent_state_matches(self) -> None:
        state = self.store.load()
        if state is None:
            assert (self.tries, self.puk_tries, self.pin, self.puk) == (
                MAX_TRIES,
                MAX_PUK_TRIES,
                PIN,
                PUK,
            )
            return
        assert state.tries_left == self.tries
        assert state.unblock_tries_left == self.puk_tries
        assert state.pin == self.pin
        assert (state.unblock_code or PUK) == self.puk


TestPinMachine = PinMachine.TestCase
TestPinMachine.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


INSTRUCTIONS = [0xA4, 0xCB, 0x20, 0x24, 0x2C, 0x87, 0x84, 0xDB, 0x47, 0xC0]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_only_ever_get_a_status_word(commands: list[bytes]) -> None:
    card = PivCard(PROFILE, MemoryPinStateStore(), random_bytes=counting_random())
    card.power_on()
    for command in commands:
        check_response(card.transmit(command))


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([0x00, 0x10, 0x80, 0x0C]),
    st.sampled_from(INSTRUCTIONS),
    st.integers(0, 255),
    st.integers(0, 255),
    st.one_of(
        st.binary(max_size=270),
        st.builds(  # a template that parses, with random tags and values
            lambda items: tlv.tlv(0x7C, b"".join(tlv.tlv(t, v) for t, v in items)),
            st.lists(
                st.tuples(st.sampled_from([0x80, 0x81, 0x82, 0x85]), st.binary(max_size=100)),
                max_size=3,
            ),
        ),
        st.builds(lambda tag: tlv.tlv(0x5C, tag), st.binary(min_size=1, max_size=4)),
    ),
    st.sampled_from([None, 0, 1, 8, 0xFF]),
    st.booleans(),
)
def test_structured_garbage(
    cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None, verified: bool
) -> None:
    card = PivCard(PROFILE, MemoryPinStateStore(), random_bytes=counting_random())
    card.power_on()
    if verified:
        assert check_response(card.transmit(apdu(0, 0x20, 0, 0x80, pad(PIN)))) == 0x9000
    body = (bytes((len(data),)) + data if 0 < len(data) < 256 else b"") + (
        b"" if le is None else bytes((le,))
    )
    check_response(card.transmit(bytes((cla, ins, p1, p2)) + body))
    check_response(card.transmit(b"\x00\xc0\x00\x00\x00"))
