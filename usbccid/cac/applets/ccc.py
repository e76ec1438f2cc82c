"""The Card Capabilities Container ``A0 00 00 01 16 DB 00`` (GSC-IS 2.1 Card Capability Container).

OpenSC's cac driver matches a card by selecting this applet, and builds its certificate
list **only** from the CCC's ``F3`` CardURLs of application type ``04`` (card-cac.c
``cac_parse_CCC``/``cac_parse_cardurl``; clients.md finding 1). coolkey walks the same
``F3`` list and needs PKI instance 0 (``Slot::loadCACCert``).

Layout (simple-TLV, split into T and V buffers), in the order real cards use:

* ``F0`` card identifier (CUID): GSC RID ``A0 00 00 00 79`` · manufacturer ``03`` · card
  type ``02`` (Java card) · 14-byte card ID. OpenSC turns the card-ID bytes into the
  PKCS#11 serial number, so they come from ``profile.card_id`` and differ per card
  (libcacard's are constant; clients.md pitfall 16).
* ``F1``/``F2`` capability container / grammar version ``21``.
* ``F3`` one 16-byte CardURL per PKI applet: RID · type ``04`` · object ID ``01 0n``
  · application ID ``01 0n`` · six zero bytes (unused on VM cards). At least three, as
  on real CACs: a card with fewer containers lists empty PKI applets after them, since
  coolkey gives up on a token whose PKI instance 1 or 2 is missing (pki.EmptyPkiApplet).
* ``F4`` PKCS#15 ``00``, ``F5`` registered data model ``10``, ``F6`` access control rule
  table ``07 <ACA AID>`` + 9 zero bytes.
* ``F7 FA FB FC FD FE`` empty and **last**: OpenSC aborts CCC parsing on an empty ``FD``
  it actually reaches (pitfall 20); both parsers stop when the V buffer is used up.

Unlike libcacard, no CardURLs for generic containers (02FB, 0200, ACF 3000, ...) are
listed: we have no such applets, and OpenSC fails to read the data objects they create.
"""

from __future__ import annotations

from collections.abc import Sequence

from usbccid.cac.applets.buffers import (
    ACA_AID,
    APPLET_INFO,
    TAG_APPLET_INFORMATION,
    TAG_BUFFER_PROPERTIES,
    TAG_NUMBER_OF_OBJECTS,
    TAG_OBJECT_ID,
    TAG_TV_OBJECT,
    BufferApplet,
)
from usbccid.cac.tlv import encode_simple_tlv

CCC_AID = bytes.fromhex("A0 00 00 01 16 DB 00")
CCC_OID = bytes.fromhex("DB00")

GSC_RID = bytes.fromhex("A000000079")
MANUFACTURER_ID = 0x03
CARD_TYPE_JAVA = 0x02
CARD_ID_LEN = 14
CARDURL_TYPE_PKI = 0x04

TAG_CARD_IDENTIFIER = 0xF0
TAG_CAPABILITY_CONTAINER_VERSION = 0xF1
TAG_CAPABILITY_GRAMMAR_VERSION = 0xF2
TAG_APPLICATION_CARDURL = 0xF3
TAG_PKCS15 = 0xF4
TAG_REGISTERED_DATA_MODEL = 0xF5
TAG_ACCESS_CONTROL_RULE_TABLE = 0xF6
TAG_CARD_APDUS = 0xF7
TAG_REDIRECTION = 0xFA
TAG_CAPABILITY_TUPLES = 0xFB
TAG_STATUS_TUPLES = 0xFC
TAG_NEXT_CCC = 0xFD
TAG_ERROR_DETECTION_CODE = 0xFE


def card_id_bytes(card_id: bytes) -> bytes:
    """The 14 card-ID bytes of the CUID.

    A ``card_id`` of up to 14 bytes is used verbatim, left-padded with zeros; a longer one
    (provision.py makes 16 random bytes) contributes its last 14. Either way OpenSC's
    PKCS#11 serial, the last 8 card-ID bytes in hex, is the tail of ``card_id``.
    """
    if not card_id:
        raise ValueError("card_id must not be empty")
    return card_id[-CARD_ID_LEN:].rjust(CARD_ID_LEN, b"\x00")


def cuid(card_id: bytes) -> bytes:
    return GSC_RID + bytes((MANUFACTURER_ID, CARD_TYPE_JAVA)) + card_id_bytes(card_id)


def pki_cardurl(pki_aid: bytes) -> bytes:
    """A 16-byte CardURL for the PKI applet ``pki_aid`` (RID + 2-byte application ID)."""
    rid, app_id = pki_aid[:5], pki_aid[5:7]
    # RID · type · objectID · applicationID · pinID · accessKeyInfo(3) · keyCryptoAlgorithm
    # · padding: all zero after the IDs on VM cards.
    return rid + bytes((CARDURL_TYPE_PKI,)) + app_id + app_id + bytes(6)


class CccApplet(BufferApplet):
    def __init__(self, card_id: bytes, pki_aids: Sequence[bytes]) -> None:
        items: list[tuple[int, bytes]] = [
            (TAG_CARD_IDENTIFIER, cuid(card_id)),
            (TAG_CAPABILITY_CONTAINER_VERSION, b"\x21"),
            (TAG_CAPABILITY_GRAMMAR_VERSION, b"\x21"),
        ]
        items += [(TAG_APPLICATION_CARDURL, pki_cardurl(aid)) for aid in pki_aids]
        items += [
            (TAG_PKCS15, b"\x00"),
            (TAG_REGISTERED_DATA_MODEL, b"\x10"),
            (TAG_ACCESS_CONTROL_RULE_TABLE, bytes((len(ACA_AID),)) + ACA_AID + bytes(9)),
            (TAG_CARD_APDUS, b""),
            (TAG_REDIRECTION, b""),
            (TAG_CAPABILITY_TUPLES, b""),
            (TAG_STATUS_TUPLES, b""),
            (TAG_NEXT_CCC, b""),
            (TAG_ERROR_DETECTION_CODE, b""),
        ]
        super().__init__(CCC_AID, CCC_OID, items)

    def short_properties(self) -> list[tuple[int, bytes]]:
        obj = encode_simple_tlv(
            [(TAG_OBJECT_ID, self.oid), (TAG_BUFFER_PROPERTIES, self.object_properties())]
        )
        return [
            (TAG_APPLET_INFORMATION, APPLET_INFO),
            (TAG_NUMBER_OF_OBJECTS, b"\x01"),
            (TAG_TV_OBJECT, obj),
        ]
