"""The Access Control Applet (GSC-IS 2.1 §5.3.3.5, GET ACR ``4C``).

Answers at ``A0 00 00 00 79 03 00`` (named by the real card's CCC ``F6`` and by
libcacard) and at ``A0 00 00 00 79 10 00`` (where OpenSC's cac driver looks when a card
has no CCC, card-cac.c ``cac_select_ACA``). The tables are informational: the card
enforces only "PIN before SIGN/DECRYPT" (libcacard enforces no ACR either).

GET ACR ``CLA 4C P1 00`` forms implemented, each answer starting with the applet
information ``01 05 10 02 06 02 02``:

* P1=00 ACR table (Table 5-15): ``A1 01 <n>`` then ``A0`` entries ``<ACRID> <ACR type> <n AMP>
  (<AMP id> <key ref>)*``.
* P1=01 one ACR by ACRID (data: 1 byte); unknown ACRID → 6A88.
* P1=20 Access Method Provider table (Table 5-20): ``91 01 <n>`` then ``90`` entries
  ``<AMP id> 92 <len> <AID>``.
* P1=21 Service Applet table (Table 5-21): ``94 01 <n>`` then ``93`` entries
  ``<applet id> 92 07 <AID>`` (the only table OpenSC reads; ``cac_parse_ACA_service``).

libcacard emits raw C-struct memory in the simple-TLV forms of these tables
(libcacard.md §2.5); ours carry the real values. The applet/object ACR tables
(P1=10/11/12) and libcacard's undocumented "extended" forms (P1 bit 40) answer 6A81.
"""

from __future__ import annotations

from collections.abc import Sequence

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets import Applet, CardContext
from usbccid.cac.applets.buffers import (
    ACA_AID,
    ACA_AID_ALT,
    ACA_APPLET_INFO,
    INS_GET_ACR,
    INS_GET_PROPERTIES,
    TAG_APPLET_INFORMATION,
    PropertiesMixin,
)
from usbccid.cac.errors import CardError
from usbccid.cac.sw import SW
from usbccid.cac.tlv import encode_simple_tlv

TAG_ACR_ENTRY = 0xA0
TAG_ACR_NUM_ENTRIES = 0xA1
TAG_AMP_ENTRY = 0x90
TAG_AMP_NUM_ENTRIES = 0x91
TAG_AID = 0x92
TAG_SERVICE_ENTRY = 0x93
TAG_SERVICE_NUM_ENTRIES = 0x94

# ACR types (GSC-IS 2.1 Table 3-2).
ACR_ALWAYS = 0x00
ACR_NEVER = 0x01
ACR_SECURE_CHANNEL_GP = 0x04
ACR_PIN = 0x06

AMP_SECURE_CHANNEL_GP = 0x1F
AMP_PIN = 0x1E

#: ACRID → (ACR type, ((AMP id, key reference), ...)).
ACR_TABLE: dict[int, tuple[int, tuple[tuple[int, int], ...]]] = {
    0x00: (ACR_ALWAYS, ()),
    0x01: (ACR_NEVER, ()),
    0x04: (ACR_SECURE_CHANNEL_GP, ((AMP_SECURE_CHANNEL_GP, 0x21),)),
    0x06: (ACR_PIN, ((AMP_PIN, 0x00),)),
}

#: Service applet IDs: 0x4F for the CCC, 0x61 + n for PKI container n (as libcacard).
CCC_SERVICE_ID = 0x4F
PKI_SERVICE_ID_BASE = 0x61


def _acr_entry(acrid: int) -> bytes:
    acr_type, methods = ACR_TABLE[acrid]
    body = bytes((acrid, acr_type, len(methods)))
    for amp, key in methods:
        body += bytes((amp, key))
    return body


class AcaApplet(PropertiesMixin, Applet):
    def __init__(self, ccc_aid: bytes, pki_aids: Sequence[bytes], gp_aid: bytes) -> None:
        self.aids = (ACA_AID, ACA_AID_ALT)
        self._services = [(CCC_SERVICE_ID, ccc_aid)] + [
            (PKI_SERVICE_ID_BASE + i, aid) for i, aid in enumerate(pki_aids)
        ]
        self._amps = [(AMP_PIN, ACA_AID), (AMP_SECURE_CHANNEL_GP, gp_aid)]

    def short_properties(self) -> list[tuple[int, bytes]]:
        return [(TAG_APPLET_INFORMATION, ACA_APPLET_INFO)]

    def long_properties(self) -> list[tuple[int, bytes]]:
        return self.short_properties()

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins == INS_GET_PROPERTIES:
            return self.get_properties(apdu)
        if apdu.ins == INS_GET_ACR:
            return self.get_acr(apdu)
        return super().process(apdu, ctx)

    def get_acr(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        info = [(TAG_APPLET_INFORMATION, ACA_APPLET_INFO)]
        if apdu.p1 == 0x00:
            self._no_data(apdu)
            items = [*info, (TAG_ACR_NUM_ENTRIES, bytes((len(ACR_TABLE),)))]
            items += [(TAG_ACR_ENTRY, _acr_entry(acrid)) for acrid in ACR_TABLE]
        elif apdu.p1 == 0x01:
            if len(apdu.data) != 1:
                raise CardError(SW.WRONG_LENGTH)
            if apdu.data[0] not in ACR_TABLE:
                raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "unknown ACRID")
            items = [*info, (TAG_ACR_ENTRY, _acr_entry(apdu.data[0]))]
        elif apdu.p1 == 0x20:
            self._no_data(apdu)
            items = [*info, (TAG_AMP_NUM_ENTRIES, bytes((len(self._amps),)))]
            items += [
                (TAG_AMP_ENTRY, bytes((amp, TAG_AID, len(aid))) + aid) for amp, aid in self._amps
            ]
        elif apdu.p1 == 0x21:
            self._no_data(apdu)
            items = [*info, (TAG_SERVICE_NUM_ENTRIES, bytes((len(self._services),)))]
            items += [
                (TAG_SERVICE_ENTRY, bytes((sid, TAG_AID, len(aid))) + aid)
                for sid, aid in self._services
            ]
        elif apdu.p1 in (0x10, 0x11, 0x12) or apdu.p1 & 0x40:
            raise CardError(SW.FUNCTION_NOT_SUPPORTED, "table not implemented")
        else:
            raise CardError(SW.INCORRECT_P1P2)
        return encode_simple_tlv(items)

    @staticmethod
    def _no_data(apdu: CommandApdu) -> None:
        if apdu.data:
            raise CardError(SW.WRONG_LENGTH)
