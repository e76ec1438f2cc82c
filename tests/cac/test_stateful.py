"""Property tests: arbitrary bytes never raise, and a random client keeps the invariants.

The state machine drives VERIFY (right, wrong, status), SELECT (known and unknown AIDs),
SIGN, READ BUFFER, GET PROPERTIES, GET CHALLENGE, unblock and power cycles in random
order against a card with small keys, checking after every step that:

* ``transmit`` returned a well-formed response (at least SW1 SW2), never an exception;
* the retry counter never goes below 0; ``63 Cx`` reports exactly the counter; a counter
  of 0 answers ``69 83``;
* SIGN before a successful VERIFY (since the last power-on) answers ``69 82``;
* no response ever contains the bytes of the private exponent or the primes.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.cac.conftest import PIN, UNBLOCK_CODE, counting_random, make_profile
from tests.cac.helpers import pin_block
from usbccid.cac.applets.pin import PinService
from usbccid.cac.card import CacCard
from usbccid.cac.profile import MemoryPinStateStore

PROFILE = make_profile([1024, 1024], max_tries=3, max_unblock_tries=5)
SECRETS: list[bytes] = []
for _c in PROFILE.containers:
    _n = _c.private_key.private_numbers()
    for _v in (_n.d, _n.p, _n.q, _n.dmp1, _n.dmq1):
        _b = _v.to_bytes((_v.bit_length() + 7) // 8, "big")
        SECRETS.append(_b[:16])  # any 16-byte window of a secret would be a leak
        SECRETS.append(_b[-16:])

AIDS = [
    bytes.fromhex("A0 00 00 01 16 DB 00"),
    bytes.fromhex("A0000000790100"),
    bytes.fromhex("A0000000790101"),
    bytes.fromhex("A0000000790300"),
    bytes.fromhex("A0 00 00 00 03 00 00 00"),
    bytes.fromhex("A0000000790102"),  # an empty container (EmptyPkiApplet: coolkey wants 3)
    bytes.fromhex("A0000000790103"),  # absent
    bytes.fromhex("A00000030800001000"),  # absent (PIV)
]


def assert_no_secrets(response: bytes) -> None:
    for secret in SECRETS:
        assert secret not in response


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=300), max_size=6))
def test_arbitrary_bytes_only_ever_get_a_response(commands: list[bytes]) -> None:
    card = CacCard(PROFILE, MemoryPinStateStore(), random_bytes=counting_random())
    card.power_on()
    for command in commands:
        response = card.transmit(command)
        assert isinstance(response, bytes)
        assert len(response) >= 2
        assert_no_secrets(response)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 255),
    st.sampled_from([0x42, 0x52, 0x56, 0x4C, 0xA4, 0x20, 0x24, 0x2C, 0x84, 0xC0, 0xCA]),
    st.integers(0, 255),
    st.integers(0, 255),
    st.binary(max_size=270),
    st.sampled_from([None, 0, 1, 2, 0xFF]),
)
def test_structured_garbage(
    cla: int, ins: int, p1: int, p2: int, data: bytes, le: int | None
) -> None:
    card = CacCard(PROFILE, MemoryPinStateStore(), random_bytes=counting_random())
    card.power_on()
    card.transmit(bytes.fromhex("00 A4 04 0C 07 A0 00 00 00 79 01 00"))
    card.transmit(b"\x00\x20\x00\x00\x08" + pin_block(PIN))
    body = (bytes((len(data),)) + data if 0 < len(data) < 256 else b"") + (
        b"" if le is None else bytes((le,))
    )
    response = card.transmit(bytes((cla, ins, p1, p2)) + body)
    assert len(response) >= 2
    assert_no_secrets(response)


class CardMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.store = MemoryPinStateStore()
        self.card = CacCard(PROFILE, self.store, random_bytes=counting_random())
        self.card.power_on()
        self.tries = 3
        self.unblock_tries = 5
        self.verified = False
        self.last: bytes = b"\x90\x00"

    def send(self, command: bytes) -> bytes:
        response = self.card.transmit(command)
        assert len(response) >= 2
        assert_no_secrets(response)
        self.last = response
        return response

    def sw(self, response: bytes) -> int:
        return int.from_bytes(response[-2:], "big")

    @rule(right=st.booleans())
    def verify(self, right: bool) -> None:
        pin = PIN if right else b"99999999"
        sw = self.sw(self.send(b"\x00\x20\x00\x00\x08" + pin_block(pin)))
        if self.tries == 0:
            assert sw == 0x6983
        elif right:
            assert sw == 0x9000
            self.tries, self.verified = 3, True
        else:
            self.tries -= 1
            self.verified = False
            assert sw == 0x63C0 | self.tries

    @rule()
    def verify_status(self) -> None:
        sw = self.sw(self.send(b"\x00\x20\x00\x00"))
        if self.verified:
            assert sw == 0x9000
        elif self.tries == 0:
            assert sw == 0x6983
        else:
            assert sw == 0x63C0 | self.tries

    @rule(right=st.booleans())
    def unblock(self, right: bool) -> None:
        code = UNBLOCK_CODE if right else b"11111111"
        sw = self.sw(self.send(b"\x00\x2c\x01\x00\x08" + pin_block(code)))
        if self.unblock_tries == 0:
            assert sw == 0x6983
        elif right:
            assert sw == 0x9000
            self.unblock_tries, self.tries, self.verified = 5, 3, False
        else:
            self.unblock_tries -= 1
            assert sw == 0x63C0 | self.unblock_tries

    @rule(aid=st.sampled_from(AIDS), p2=st.sampled_from([0x00, 0x0C]))
    def select(self, aid: bytes, p2: int) -> None:
        sw = self.sw(self.send(bytes((0x00, 0xA4, 0x04, p2, len(aid))) + aid))
        assert sw in (0x9000, 0x6A82) or sw >> 8 == 0x61

    @rule(index=st.integers(0, 1), chunked=st.booleans())
    def sign(self, index: int, chunked: bool) -> None:
        self.send(bytes.fromhex(f"00A4040C07A00000007901{index:02X}"))
        block = b"\x00\x01" + b"\xff" * 90 + b"\x00" + bytes(35)
        if chunked:
            self.send(b"\x00\x42\x80\x00\x40" + block[:64])
            response = self.send(b"\x00\x42\x00\x00\x40" + block[64:] + b"\x00")
        else:
            response = self.send(b"\x00\x42\x00\x00\x80" + block + b"\x00")
        if self.verified:
            assert self.sw(response) == 0x9000
            assert len(response) == 130
        else:
            assert self.sw(response) == 0x6982

    @rule(buffer_type=st.sampled_from([1, 2]), offset=st.integers(0, 700), n=st.integers(0, 255))
    def read_buffer(self, buffer_type: int, offset: int, n: int) -> None:
        response = self.send(bytes((0x80, 0x52, offset >> 8, offset & 0xFF, 2, buffer_type, n, n)))
        # 6A 82: READ BUFFER in the empty container (PKI 2 of this 2-container card).
        assert self.sw(response) in (0x9000, 0x6B00, 0x6900, 0x6D00, 0x6A82)

    @rule()
    def get_properties(self) -> None:
        self.send(b"\x00\x56\x01\x00\xff")

    @rule()
    def get_challenge(self) -> None:
        response = self.send(b"\x00\x84\x00\x00\x08")
        assert self.sw(response) == 0x9000
        assert len(response) == 10

    @rule()
    def get_response(self) -> None:
        self.send(b"\x00\xc0\x00\x00\x00")

    @rule()
    def power_cycle(self) -> None:
        self.card.power_off()
        self.card.power_on()
        self.verified = False

    @invariant()
    def counters(self) -> None:
        pin = self.card.pin
        assert isinstance(pin, PinService)
        assert 0 <= pin.tries_left == self.tries
        assert 0 <= pin.unblock_tries_left == self.unblock_tries
        saved = self.store.load()
        if saved is not None:
            assert saved.tries_left == pin.tries_left  # saved before answering
            assert saved.unblock_tries_left == pin.unblock_tries_left
        assert pin.verified == self.verified


CardMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestCardMachine = CardMachine.TestCase
