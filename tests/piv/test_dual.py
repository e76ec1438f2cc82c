"""The ``cac+piv`` card: its CAC edge is the CAC card, its PIV edge the PIV card, one PIN.

* :data:`ROUTES` covers every (edge, command kind) pair;
* the whole OpenSC/coolkey conversation of tests/cac/vectors, replayed against a ``cac``
  card and a ``cac+piv`` card made of the same profile, gets the same answers byte for
  byte, except where the client SELECTs the PIV AID (a CAC answers ``6A 82``, the dual
  card its PIV application) -- so the CAC edge is unchanged;
* switching edges loses the security status; a PIN or PUK changed on one edge is the
  other's too; the CCC through PIV is a PIV one (see usbccid.piv.dual).
"""

from __future__ import annotations

import itertools

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cac.conftest import make_profile as make_cac_profile
from tests.cac.test_traces import SECTIONS
from tests.piv.conftest import PIN, PUK, counting_random, slot
from tests.piv.helpers import PIV_AID, Session, apdu, h, pad
from tests.piv.test_stateful import check_response
from usbccid.cac.card import ATR_VCARD_NSS, CacCard
from usbccid.cac.profile import CardProfile, MemoryPinStateStore
from usbccid.cac.tlv import parse_simple_tlv
from usbccid.piv import tlv
from usbccid.piv.dual import ROUTES, DualCard, Edge, Kind
from usbccid.piv.profile import PivProfile

CAC = make_cac_profile([2048, 2048, 2048])
PIV = PivProfile(
    card_id=CAC.card_id,
    slots=(slot(0x9A, "rsa2048"), slot(0x9D, "p256")),
    pin_policy=CAC.pin_policy,
)
PKI0 = h("A0 00 00 00 79 01 00")


def dual(store: MemoryPinStateStore | None = None, cac: CardProfile = CAC) -> DualCard:
    card = DualCard(cac, PIV, store or MemoryPinStateStore(), random_bytes=counting_random())
    card.power_on()
    return card


def active(card: DualCard) -> Edge:
    return card.active  # (a call, so that mypy does not keep an earlier narrowing)


def test_routes_cover_every_case() -> None:
    assert set(ROUTES) == set(itertools.product(Edge, Kind))
    for (active, kind), (target, switch) in ROUTES.items():
        assert switch == (target != active)
        expected = Edge.PIV if kind is Kind.SELECT_PIV else Edge.CAC
        if kind is Kind.OTHER:
            expected = active  # everything else stays where it is
        assert target == expected, (active, kind)


def test_the_cac_edge_answers_the_cac_conversation_unchanged() -> None:
    cac = CacCard(CAC, MemoryPinStateStore(), random_bytes=counting_random())
    cac.power_on()
    both = dual()
    assert both.power_on() == cac.power_on() == ATR_VCARD_NSS
    different = []
    n = 0
    for section in SECTIONS.values():
        # Each section is one client process on a freshly inserted card. (Within one power
        # cycle the cards would differ after a PIV probe: switching edges loses the CAC's
        # security status, as on real dual cards.)
        assert cac.power_on() == both.power_on()
        for exchange in section:
            n += 1
            a, b = cac.transmit(exchange.command), both.transmit(exchange.command)
            if a != b:
                different.append((exchange.command.hex(" "), a.hex(" "), b.hex(" ")))
    assert n == 575
    # Only OpenSC's PIV probes (SELECT A0 00 00 03 08 00 00 10 00) differ: the dual card
    # has a PIV application, so it answers them with its property template.
    assert different
    for command, cac_answer, dual_answer in different:
        assert command == "00 a4 04 00 09 a0 00 00 03 08 00 00 10 00", command
        assert cac_answer == "6a 82"
        # a T=0 client sends no Le: the template waits for GET RESPONSE
        assert dual_answer == "61 2a", dual_answer


def test_select_piv_then_back_to_cac() -> None:
    card = dual()
    s = Session(card)
    assert s.sw(apdu(0, 0x20, 0, 0, pad(PIN))) == 0x9000  # the CAC's global PIN
    assert s.select(PIV_AID).sw == 0x9000
    assert active(card) is Edge.PIV
    assert s.verify(None) == 0x63C3  # the CAC's verification did not come along
    assert s.verify(PIN) == 0x9000
    assert s.select(h("A0 00 00 00 01 01")).sw == 0x6A82  # coolkey's probe: no such applet
    assert active(card) is Edge.PIV
    assert s.verify(None) == 0x9000  # ...and the PIV edge kept its state
    assert s.select(PKI0).sw == 0x9000
    assert active(card) is Edge.CAC
    assert s.sw(apdu(0, 0x20, 0, 0)) == 0x63C3
    assert s.select(PIV_AID, p2=0x04).sw == 0x6A86  # a failed SELECT switches nothing
    assert active(card) is Edge.CAC


def test_one_pin_for_both_edges() -> None:
    store = MemoryPinStateStore()
    card = dual(store)
    s = Session(card)
    s.select(PIV_AID)
    assert s.verify(b"00000000") == 0x63C2
    s.select(PKI0)
    assert s.sw(apdu(0, 0x20, 0, 0)) == 0x63C2  # the CAC sees the try PIV counted
    assert s.sw(apdu(0, 0x20, 0, 0, pad(b"11111111"))) == 0x63C1
    s.select(PIV_AID)
    assert s.verify(None) == 0x63C1
    assert s.sw(h("00 24 00 80 10") + pad(PIN) + pad(b"135792")) == 0x9000
    assert s.sw(h("00 24 00 81 10") + pad(PUK) + pad(b"11223344")) == 0x9000
    s.select(PKI0)
    assert s.sw(apdu(0, 0x20, 0, 0, pad(b"135792"))) == 0x9000  # the PIN PIV set
    # The CAC's RESET RETRY COUNTER checks the PUK PIV set.
    assert s.sw(h("00 2C 00 00 10") + pad(PUK) + pad(PIN)) == 0x63C9
    assert s.sw(h("00 2C 00 00 10") + pad(b"11223344") + pad(PIN)) == 0x9000
    # A restart (new card objects on the same store) keeps all of it.
    again = Session(dual(store))
    again.select(PIV_AID)
    assert again.verify(PIN) == 0x9000


def test_piv_ccc_is_a_piv_one() -> None:
    # Not the CAC's: OpenSC would take the card for an SP 800-73-1 era dual CAC/PIV and
    # switch off what such cards lack (random numbers, the Discovery Object...).
    card = dual()
    s = Session(card)
    s.select(PIV_AID)
    entries = parse_simple_tlv(tlv.parse_one(s.get_data(0x5FC107).data, 0x53))
    f0 = dict(entries)[0xF0]
    assert f0[:5] == h("A0 00 00 03 08")  # OpenSC: PIV_CCC_F0_PIV
    assert f0[-14:] == CAC.card_id[-14:]  # the card's one ID
    assert not [v for t, v in entries if t == 0xF3 and v[:6] == h("A0 00 00 00 79 04")]


def test_power_cycle_starts_on_the_cac_edge() -> None:
    card = dual()
    s = Session(card)
    s.select(PIV_AID)
    card.power_off()
    card.power_on()
    assert active(card) is Edge.CAC
    assert s.sw(h("00 CB 3F FF 03 5C 01 7E 00")) == 0x6D00  # the CAC has no GET DATA 'CB'


def test_both_edges_share_one_card_id_and_pin() -> None:
    other = PivProfile(card_id=b"other", slots=PIV.slots, pin_policy=PIV.pin_policy)
    try:
        DualCard(CAC, other, MemoryPinStateStore())
    except ValueError:
        pass
    else:
        raise AssertionError("a dual card of two card IDs")


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.one_of(
            st.binary(max_size=270),
            st.sampled_from(
                [
                    apdu(0, 0xA4, 0x04, 0x00, PIV_AID, 256),
                    apdu(0, 0xA4, 0x04, 0x00, PKI0, 256),
                    apdu(0, 0x20, 0x00, 0x80, pad(PIN)),
                    apdu(0, 0x20, 0x00, 0x00, pad(PIN)),
                    h("00 C0 00 00 00"),
                ]
            ),
        ),
        max_size=10,
    )
)
def test_garbage_on_either_edge_gets_only_status_words(commands: list[bytes]) -> None:
    card = dual()
    for command in commands:
        check_response(card.transmit(command))
