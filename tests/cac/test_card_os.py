"""The card OS: class byte, selection, response sizing, GET RESPONSE, chaining, power."""

from __future__ import annotations

import pytest

from tests.cac.conftest import PIN, counting_random, make_profile
from tests.cac.helpers import CCC, GP, MSFT, PKI0, PKI1, Session, h, pin_block
from usbccid.cac.card import ATR_LIBCACARD_CAC, ATR_VCARD_NSS, CacCard
from usbccid.cac.profile import CardProfile, MemoryPinStateStore
from usbccid.cac.tlv import parse_simple_tlv
from usbccid.card import Card

FCI_CCC = h("6F 0B 84 07 A0 00 00 01 16 DB 00 A5 00")


def test_implements_card_protocol(card: CacCard) -> None:
    c: Card = card
    assert c.power_on() == ATR_VCARD_NSS
    assert not c.blocking


def test_atrs() -> None:
    # TS T0 TD1 + "VCARD_NSS"; TD1=00 says T=0, no TA1, so no PPS is needed.
    assert h("3B 89 00") + b"VCARD_NSS" == ATR_VCARD_NSS
    assert h("3B 7A 18 00 00") + b"sfte cd144" == ATR_LIBCACARD_CAC


def test_atr_is_configurable(profile_2048: CardProfile) -> None:
    c = CacCard(profile_2048, MemoryPinStateStore(), atr=ATR_LIBCACARD_CAC)
    assert c.power_on() == ATR_LIBCACARD_CAC


@pytest.mark.parametrize(
    ("cla", "sw"),
    [
        (0x01, 0x6881),  # logical channel 1 (ISO 7816-4 §5.4.1)
        (0x03, 0x6881),
        (0x41, 0x6881),  # further interindustry class: channels 4..19
        (0x04, 0x6882),  # secure messaging
        (0x0C, 0x6882),
        (0x84, 0x6882),
        (0x20, 0x6E00),  # RFU
        (0xA0, 0x6E00),
        (0xFF, 0x6E00),
    ],
)
def test_class_byte(s: Session, cla: int, sw: int) -> None:
    assert s.sw(bytes((cla, 0xA4, 0x04, 0x00, 7)) + h(CCC)) == sw


def test_unknown_ins_is_6d00(s: Session) -> None:
    assert s.sw("00 FF 00 00") == 0x6D00
    assert s.sw("00 B0 00 00 10") == 0x6D00
    assert s.select(CCC).sw == 0x610D
    assert s.sw("00 B0 00 00 10") == 0x6D00
    assert s.sw("00 4C 21 00 FF") == 0x6D00  # GET ACR exists only in the ACA (libcacard test)


def test_nothing_selected_after_power_on(s: Session, card: CacCard) -> None:
    assert card.selected_aid is None
    assert s.sw("00 52 00 00 02 01 02 02") == 0x6900
    assert s.sw("00 56 01 00 FF") == 0x6900
    assert s.sw("00 CA DF 30 05") == 0x6900  # as in the trace: OpenSC's setcos probe
    assert s.sw("00 A4 02 00 02 01 00") == 0x6A82


def test_select_fci_and_p2(s: Session, card: CacCard) -> None:
    assert s.select(CCC, p2=0x0C).sw == 0x9000  # no response data requested
    assert s.select(CCC).sw == 0x610D  # case 3: FCI via GET RESPONSE (T=0 style)
    r = s.send("00 C0 00 00 0D")
    assert (r.data, r.sw) == (FCI_CCC, 0x9000)
    r = s.send("00 A4 04 00 07 A0 00 00 01 16 DB 00 00")  # case 4 with Le=256
    assert (r.data, r.sw) == (FCI_CCC, 0x9000)
    assert s.sw("00 A4 04 01 07 A0 00 00 01 16 DB 00") == 0x6A86  # next occurrence
    assert card.selected_aid == h(CCC)


def test_failed_select_keeps_current_applet(s: Session, card: CacCard) -> None:
    assert s.select(PKI0, 0x0C).sw == 0x9000
    assert s.select("A0 00 00 05 27 20 01 01").sw == 0x6A82
    assert s.select("A0 00 00 03 08 00 00 10 00").sw == 0x6A82  # no PIV applet
    assert s.select("A0 00 00 00 79 01").sw == 0x6A82  # no partial-AID match
    assert card.selected_aid == h(PKI0)
    assert s.sw("00 A4 02 0C 02 01 00") == 0x9000


def test_select_by_file_id_is_not_found(s: Session) -> None:
    assert s.sw("00 A4 00 00 02 3F 00") == 0x6A82
    assert s.sw("00 A4 08 00 02 3F 00") == 0x6A82


def test_select_object(s: Session) -> None:
    s.select(PKI1, 0x0C)
    assert s.sw("00 A4 02 00 02 01 01") == 0x9000
    assert s.sw("00 A4 02 0C 02 01 01") == 0x9000
    assert s.sw("00 A4 02 00 02 01 00") == 0x6A82  # another applet's object
    assert s.sw("00 A4 02 00 01 01") == 0x6700
    assert s.sw("00 A4 02 00 07 A0 00 00 00 79 01 01") == 0x6700


def test_response_sizing(s: Session) -> None:
    s.select(CCC, 0x0C)
    r = s.send("00 52 00 00 02 01 02 02")  # Le = exact
    assert (r.data, r.sw) == (h("1E 00"), 0x9000)
    r = s.send("00 52 00 00 02 01 02 01")  # Le too small: keep for GET RESPONSE
    assert (r.data, r.sw) == (b"", 0x6102)
    r = s.send("00 C0 00 00 01")
    assert (r.data, r.sw) == (h("1E"), 0x6101)
    r = s.send("00 C0 00 00 01")
    assert (r.data, r.sw) == (h("00"), 0x9000)
    assert s.sw("00 C0 00 00 01") == 0x6A88  # nothing pending


def test_pending_response_dropped_by_other_commands(s: Session) -> None:
    s.select(CCC, 0x0C)
    assert s.sw("00 52 00 00 02 01 02") == 0x6102
    assert s.sw("00 84 00 00 08") == 0x9000
    assert s.sw("00 C0 00 00 02") == 0x6A88


def test_get_response_p1p2_checked_and_buffer_kept(s: Session) -> None:
    s.select(CCC, 0x0C)
    assert s.sw("00 52 00 00 02 01 02") == 0x6102
    assert s.sw("00 C0 01 00 02") == 0x6A86
    assert s.send("00 C0 00 00 02").data == h("1E 00")


def test_malformed_apdu_is_6700_and_changes_nothing(s: Session, card: CacCard) -> None:
    s.select(PKI0, 0x0C)
    assert s.sw("00 A4 04 00 07 A0 00") == 0x6700
    assert s.sw("00") == 0x6700
    assert s.sw(b"") == 0x6700
    assert card.selected_aid == h(PKI0)


def test_command_chaining(s: Session) -> None:
    # VERIFY split over two commands with CLA bit 0x10 (ISO 7816-4 §5.3.3).
    block = pin_block(b"12345678")
    assert s.sw(h("10 20 00 00 04") + block[:4]) == 0x9000
    assert s.sw(h("00 20 00 00 04") + block[4:]) == 0x9000
    assert s.sw("00 20 00 00") == 0x9000


def test_command_chain_interrupted(s: Session) -> None:
    assert s.sw("10 20 00 00 02 31 32") == 0x9000
    assert s.sw("00 84 00 00 08") == 0x6883
    assert s.sw("00 84 00 00 08") == 0x9000  # the chain is gone


def test_chained_sign_iso_style(s1024: Session) -> None:
    s1024.verify(b"12345678")
    s1024.select(PKI0, 0x0C)
    block = b"\x00\x01" + b"\xff" * 100 + b"\x00" + bytes(25)
    assert s1024.sw(h("10 42 00 00 40") + block[:64]) == 0x9000
    r = s1024.full(h("00 42 00 00 40") + block[64:] + b"\x00")
    assert r.sw == 0x9000
    assert len(r.data) == 128


def test_power_cycle_clears_volatile_state(s: Session, card: CacCard) -> None:
    assert s.verify(b"12345678") == 0x9000
    s.select(CCC, 0x0C)
    assert s.sw("00 52 00 00 02 01 02") == 0x6102
    card.power_off()
    assert card.power_on() == ATR_VCARD_NSS
    assert card.selected_aid is None
    assert s.sw("00 C0 00 00 02") == 0x6A88
    assert s.sw("00 20 00 00") == 0x63C3


def test_get_challenge(s: Session) -> None:
    r = s.send("00 84 00 00 08")
    assert (r.data, r.sw) == (h("01 02 03 04 05 06 07 08"), 0x9000)
    r = s.send("00 84 00 00 08")
    assert r.data == h("09 0A 0B 0C 0D 0E 0F 10")
    assert s.sw("00 84 00 00") == 0x6108  # no Le: 8 bytes via GET RESPONSE
    assert s.sw("00 84 01 00 08") == 0x6A86
    s.select(PKI0, 0x0C)  # works with any applet selected (libcacard: 6D00)
    assert s.send("00 84 00 00 08").sw == 0x9000


def test_get_challenge_default_source(profile_2048: CardProfile) -> None:
    c = CacCard(profile_2048, MemoryPinStateStore())
    c.power_on()
    a, b = c.transmit(h("00 84 00 00 08")), c.transmit(h("00 84 00 00 08"))
    assert len(a) == len(b) == 10
    assert a != b


def test_blocking_for_large_keys() -> None:
    assert CacCard(make_profile([1024, 3072]), MemoryPinStateStore()).blocking
    assert not CacCard(make_profile([1024, 2048]), MemoryPinStateStore()).blocking


def test_container_count_limits() -> None:
    with pytest.raises(ValueError, match="containers"):
        CacCard(make_profile([]), MemoryPinStateStore())
    with pytest.raises(ValueError, match="containers"):
        CacCard(make_profile([1024] * 17), MemoryPinStateStore())


def test_sixteen_containers(profile_1024: CardProfile) -> None:
    profile = make_profile([1024] * 16)
    c = CacCard(profile, MemoryPinStateStore(), random_bytes=counting_random())
    c.power_on()
    s = Session(c)
    for i in range(16):
        assert s.select(f"A0 00 00 00 79 01 {i:02X}", 0x0C).sw == 0x9000
        assert s.sw(f"00 A4 02 00 02 01 {i:02X}") == 0x9000
    assert s.select("A0 00 00 00 79 01 10").sw == 0x6A82


def test_gp_and_msft_select(s: Session) -> None:
    r = s.full(h("00 A4 04 00 08") + h(GP))
    assert r.data == h(
        "6F 19 84 08 A0 00 00 00 03 00 00 00 A5 0D 9F 6E 06 12 91 51 81 01 00 9F 65 01 FF"
    )
    assert s.select("A0 00 00 00 03 00 00").sw == 0x611B  # libcacard's 7-byte form
    r = s.full(h("00 A4 04 00 0B") + h(MSFT))
    assert r.data == h("6F 0F 84 0B") + h(MSFT) + h("A5 00")


KNOWN = {
    None: {0xA4, 0x20, 0x24, 0x2C, 0x84, 0xC0},
    CCC: {0x52, 0x56, 0x58},
    PKI0: {0x52, 0x56, 0x58, 0x42},
    "A0 00 00 00 79 03 00": {0x56, 0x4C},
    GP: {0xCA},
    MSFT: {0xCA},
}


@pytest.mark.parametrize("aid", list(KNOWN))
def test_every_instruction_in_every_applet(s: Session, aid: str | None) -> None:
    """Enumerate INS x selected applet: only the listed instructions are not 6D00."""
    for ins in range(256):
        s.card.power_on()
        if aid is not None:
            assert s.select(aid, 0x0C).sw == 0x9000
        r = s.send(bytes((0x00, ins, 0x00, 0x00)))
        known = KNOWN[None] | KNOWN[aid]
        if ins in known:
            assert r.sw != 0x6D00, hex(ins)
        elif aid is None and ins in {0x42, 0x4C, 0x52, 0x56, 0x58, 0xCA}:
            assert r.sw == 0x6900, hex(ins)
        else:
            assert r.sw == 0x6D00, hex(ins)


def _join_tl_v(tl: bytes, v: bytes) -> list[tuple[int, bytes]]:
    """Put a VM-card T buffer and V buffer back together (simple-TLV lengths, FF = long)."""
    out = []
    i = j = 0
    while i < len(tl):
        tag, n = tl[i], tl[i + 1]
        i += 2
        if n == 0xFF:
            n = int.from_bytes(tl[i : i + 2], "little")
            i += 2
        out.append((tag, v[j : j + n]))
        j += n
    return out


@pytest.mark.parametrize("count", [1, 2])
def test_fewer_than_three_containers_padded_for_coolkey(count: int) -> None:
    """Debian's coolkey 1.1.0 loads PKI instances 0, 1 and 2 from the CCC's CardURLs and,
    when one has no CardURL or cannot be selected, disconnects and reports the token
    removed (slot.cpp selectCACApplet): a 1-container card was an empty slot in the VM
    test. Cards with fewer than three containers now list three PKI applets, the extra
    ones empty. This replays coolkey's conversation (CLA 80 reads, 255-byte chunks)."""
    card = CacCard(make_profile([1024] * count), MemoryPinStateStore())
    card.power_on()
    s = Session(card)
    assert s.full(h("00 A4 04 00 07") + h(CCC)).sw == 0x9000
    tl = s.read_file(0x01, cla=0x80, chunk=255)
    v = s.read_file(0x02, cla=0x80, chunk=255)
    urls = [value for tag, value in _join_tl_v(tl, v) if tag == 0xF3]
    assert [u[5] for u in urls] == [0x04, 0x04, 0x04]  # three PKI CardURLs
    assert [u[8:10] for u in urls] == [h("01 00"), h("01 01"), h("01 02")]
    for instance, url in enumerate(urls):
        aid = url[:5] + url[8:10]
        assert s.full(bytes((0, 0xA4, 4, 0, 7)) + aid).sw == 0x9000
        assert s.sw(h("00 A4 02 0C 02") + url[6:8]) == 0x9000
        props = dict(parse_simple_tlv(s.full("00 56 01 00").data))
        pki = dict(parse_simple_tlv(props[0x51]))[0x43]
        if instance < count:
            t_buffer = s.read_file(0x01, cla=0x80, chunk=255)
            assert t_buffer[:1] == h("71")
            assert h("70") in t_buffer
            assert pki[2] == 0x01  # private key initialised
        else:
            # A failed READ BUFFER: coolkey's non-fatal "no certificate in pki 1/2" (empty
            # buffers made it parse an empty certificate and drop the whole token);
            # OpenSC: "No cert found", skipped.
            assert s.sw("80 52 00 00 02 01 02") == 0x6A82
            assert s.sw("00 52 00 00 02 02 02") == 0x6A82
            assert pki[2] == 0x00
            assert s.verify(PIN) == 0x9000
            assert s.sw(h("00 42 00 00 80") + bytes(128)) == 0x6A88
