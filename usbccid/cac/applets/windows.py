"""Two applets libcacard 2.7 added for Windows guests (libcacard.md §2.6, §2.7).

* The **GlobalPlatform card manager** (``A0 00 00 00 03 00 00 00``, the Open Platform ISD
  AID; libcacard selects the 7-byte prefix, so both are accepted) with GET DATA ``9F 7F``
  (CPLC, GlobalPlatform Card Spec 2.3 §H.4 "Card Production Life Cycle") and ``00 66``
  (Card Recognition Data, GP §H.2). No secure channel: every other instruction is 6D00.
* The **Microsoft smart card Plug and Play** applet (``A0 00 00 03 97 43 49 44 5F 01
  00``) with GET DATA ``7F 68``, which Windows reads to find a minidriver (Microsoft
  "Smart Card Discovery Process"). Its GUID identifies the card *type*, so it is constant.

Unlike libcacard, reading the PnP data does not flip the card into a "Windows mode" with
a fake retry counter: our VERIFY status is always the real ``63 Cx``.
"""

from __future__ import annotations

import hashlib

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets import Applet, CardContext
from usbccid.cac.errors import CardError
from usbccid.cac.sw import SW
from usbccid.cac.tlv import ber_tlv

INS_GET_DATA = 0xCA

GP_AID = bytes.fromhex("A000000003000000")
GP_AID_SHORT = GP_AID[:7]
MSFT_AID = bytes.fromhex("A0000003974349445F0100")

# 1.2.840.114283 (GlobalPlatform) arcs used by Card Recognition Data (GP §H.2).
_GP_OID_PREFIX = bytes.fromhex("2A864886FC6B")


def _oid(suffix: str) -> bytes:
    return ber_tlv(0x06, _GP_OID_PREFIX + bytes.fromhex(suffix))


#: 66 { 73 { OID gp.1 (card recognition data), 60 { OID gp.2.2.2.1 (GP 2.2.1) },
#: 63 { OID gp.3 (card identification scheme) }, 64 { OID gp.4.3.16 (SCP03) } } }:
#: the same content libcacard sends (taken from a real card).
CARD_RECOGNITION_DATA = ber_tlv(
    0x66,
    ber_tlv(
        0x73,
        _oid("01")
        + ber_tlv(0x60, _oid("02020201"))
        + ber_tlv(0x63, _oid("03"))
        + ber_tlv(0x64, _oid("040310")),
    ),
)

#: The GP FCI: 6F { 84 <ISD AID>, A5 { 9F6E <life cycle data>, 9F65 <max block FF> } }.
GP_FCI = ber_tlv(
    0x6F,
    ber_tlv(0x84, GP_AID)
    + ber_tlv(0xA5, ber_tlv(0x9F6E, bytes.fromhex("129151810100")) + ber_tlv(0x9F65, b"\xff")),
)

#: DER SEQUENCE { INTEGER 0 (version), IA5String "MSFT", SEQUENCE { OCTET STRING GUID } }.
MSFT_PNP_GUID = bytes.fromhex("E280E9D25188874F81D64F254E38001D")
MSFT_PNP_DATA = ber_tlv(
    0x30,
    ber_tlv(0x02, b"\x00") + ber_tlv(0x16, b"MSFT") + ber_tlv(0x30, ber_tlv(0x04, MSFT_PNP_GUID)),
)


def cplc(card_id: bytes) -> bytes:
    """The 42-byte CPLC (GP Card Spec §H.4); IC serial number and batch from the card id."""
    serial = hashlib.sha256(b"usbccid-cplc" + card_id).digest()
    return b"".join(
        [
            bytes.fromhex("4790"),  # IC fabricator
            bytes.fromhex("5167"),  # IC type
            bytes.fromhex("4791"),  # operating system identifier
            bytes.fromhex("9182"),  # operating system release date
            bytes.fromhex("0100"),  # operating system release level
            bytes.fromhex("0000"),  # IC fabrication date
            serial[:4],  # IC serial number
            serial[4:6],  # IC batch identifier
            bytes(2),  # IC module fabricator
            bytes(2),  # IC module packaging date
            bytes(2),  # ICC manufacturer
            bytes(2),  # IC embedding date
            bytes(2),  # IC pre-personaliser
            bytes(2),  # IC pre-perso equipment date
            bytes(4),  # IC pre-perso equipment ID
            bytes(2),  # IC personaliser
            bytes(2),  # IC personalisation date
            bytes(4),  # IC perso equipment ID
        ]
    )


class GpCardManagerApplet(Applet):
    aids = (GP_AID, GP_AID_SHORT)

    def __init__(self, card_id: bytes) -> None:
        self._cplc = ber_tlv(0x9F7F, cplc(card_id))

    def fci(self, aid: bytes) -> bytes:
        return GP_FCI

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins != INS_GET_DATA:
            return super().process(apdu, ctx)
        tag = (apdu.p1 << 8) | apdu.p2
        if tag == 0x9F7F:
            return self._cplc
        if tag == 0x0066:
            return CARD_RECOGNITION_DATA
        raise CardError(SW.REFERENCED_DATA_NOT_FOUND)


class MsftPnpApplet(Applet):
    aids = (MSFT_AID,)

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins != INS_GET_DATA:
            return super().process(apdu, ctx)
        if (apdu.p1, apdu.p2) == (0x7F, 0x68):
            return MSFT_PNP_DATA
        raise CardError(SW.REFERENCED_DATA_NOT_FOUND)
