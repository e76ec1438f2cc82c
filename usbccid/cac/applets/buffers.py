"""GSC-IS 2.1 "VM card" containers: T and V buffers, READ BUFFER and GET PROPERTIES.

Every CAC container (CCC, PKI) is one simple-TLV object list stored as two files
(GSC-IS 2.1 §8.4): the **T buffer** (tags and lengths) and the **V buffer** (the values
concatenated). Each file starts with its own length as **2 bytes little-endian**, and
READ BUFFER offsets count from the start of the file, prefix included (clients.md §1.3,
verified against OpenSC ``cac_read_file`` and coolkey).

READ BUFFER (GSC-IS 2.1 VM card edge): ``CLA 52 <offset hi> <offset lo> 02 <type> <count>``,
CLA 00 (OpenSC) or 80 (coolkey); type 01 = T, 02 = V. The answer is exactly
``min(count, left)`` bytes; coolkey insists on the exact size.

GET PROPERTIES (GSC-IS 2.1 §5.3.3.4): ``CLA 56 P1 00 [tags] Le``. P1=01: all properties;
P1=02: only the listed top-level tags, in the order asked; P1=40: the "long" set
libcacard and real cards add (``39``, ``3A``). P1=00 (the GSC-IS 2.0 form) is refused with
6A86 as libcacard does. Le larger than the answer gives ``6C xx`` (a real Gemalto CAC and
libcacard do this; OpenSC resends once with the exact Le, clients.md finding 7). OpenSC
keeps a ``50``/``51`` object entry only if it is exactly 17 bytes long (card-cac.c
``cac_get_properties``), so PKI objects are ``41 02 · 42 05 · 43 04`` and nothing else.
"""

from __future__ import annotations

from collections.abc import Sequence

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets import Applet, CardContext
from usbccid.cac.errors import CardError
from usbccid.cac.sw import SW, wrong_le
from usbccid.cac.tlv import simple_tlv, split_tl_v

INS_SIGN_DECRYPT = 0x42
INS_GET_ACR = 0x4C
INS_READ_BUFFER = 0x52
INS_GET_PROPERTIES = 0x56
INS_UPDATE_BUFFER = 0x58

BUFFER_T = 0x01
BUFFER_V = 0x02

# Properties tags (GSC-IS 2.1 §5.3.3.4).
TAG_APPLET_INFORMATION = 0x01
TAG_NUMBER_OF_OBJECTS = 0x40
TAG_OBJECT_ID = 0x41
TAG_BUFFER_PROPERTIES = 0x42
TAG_PKI_PROPERTIES = 0x43
TAG_TV_OBJECT = 0x50
TAG_PKI_OBJECT = 0x51
TAG_UNKNOWN_39 = 0x39  # in libcacard's and real cards' long form; meaning undocumented
TAG_ACA_AID = 0x3A  # long form: the AID of the ACA

#: Applet family 10, version 02 06 02 03 (as a real Gemalto CAC reports; ACA: ...02 02).
APPLET_INFO = bytes.fromhex("1002060203")
ACA_APPLET_INFO = bytes.fromhex("1002060202")

#: The ACA as the real card's CCC (``F6``) and libcacard name it.
ACA_AID = bytes.fromhex("A0000000790300")
#: The ACA AID OpenSC looks for when a card has no CCC (card-cac.c ``cac_select_ACA``).
ACA_AID_ALT = bytes.fromhex("A0000000791000")


def length_prefixed(content: bytes) -> bytes:
    """A VM-card file: 2-byte little-endian length, then the content."""
    return len(content).to_bytes(2, "little") + content


class PropertiesMixin:
    """GET PROPERTIES over a list of top-level ``(tag, value)`` properties."""

    def short_properties(self) -> list[tuple[int, bytes]]:
        raise NotImplementedError

    def long_properties(self) -> list[tuple[int, bytes]]:
        return [*self.short_properties(), (TAG_UNKNOWN_39, b"\x00"), (TAG_ACA_AID, ACA_AID)]

    def get_properties(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        if apdu.p1 == 0x01:
            if apdu.data:
                raise CardError(SW.WRONG_LENGTH)
            answer = b"".join(simple_tlv(t, v) for t, v in self.short_properties())
        elif apdu.p1 == 0x40:
            if apdu.data:
                raise CardError(SW.WRONG_LENGTH)
            answer = b"".join(simple_tlv(t, v) for t, v in self.long_properties())
        elif apdu.p1 == 0x02:
            if not apdu.data:
                raise CardError(SW.WRONG_LENGTH)
            available = dict(self.short_properties())
            parts = []
            for tag in apdu.data:
                if tag not in available:
                    raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "unknown properties tag")
                parts.append(simple_tlv(tag, available[tag]))
            answer = b"".join(parts)
        else:
            raise CardError(SW.INCORRECT_P1P2)
        # Le larger than the answer: 6C xx with the exact length (libcacard, real Gemalto CAC).
        # Only short Le is answered this way; an extended Le simply gets the data.
        if apdu.ne is not None and apdu.ne <= 256 and apdu.ne > len(answer) and answer:
            raise CardError(wrong_le(len(answer)))
        return answer


class BufferApplet(PropertiesMixin, Applet):
    """A container applet with one object (``oid``) stored as T and V buffers."""

    def __init__(self, aid: bytes, oid: bytes, items: Sequence[tuple[int, bytes]]) -> None:
        self.aids = (aid,)
        self.aid = aid
        self.oid = oid
        tl, v = split_tl_v(items)
        self.t_file = length_prefixed(tl)
        self.v_file = length_prefixed(v)

    def object_properties(self) -> bytes:
        """``42`` buffer properties: format 00 (simple-TLV), T and V file sizes, little-endian.

        The sizes count the 2-byte prefix, as libcacard reports them (trace: ``42 05 00 0C 00
        13 03`` for a 10-byte T content and 0x311-byte V content).
        """
        return (
            b"\x00"
            + len(self.t_file).to_bytes(2, "little")
            + len(self.v_file).to_bytes(2, "little")
        )

    def select_object(self, oid: bytes) -> None:
        if oid != self.oid:
            raise CardError(SW.FILE_NOT_FOUND, "no such object in this applet")

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins == INS_READ_BUFFER:
            return self.read_buffer(apdu)
        if apdu.ins == INS_GET_PROPERTIES:
            return self.get_properties(apdu)
        if apdu.ins == INS_UPDATE_BUFFER:
            # The ACR for UPDATE BUFFER is "GP secure channel" (libcacard ACR 04); we have none.
            raise CardError(SW.SECURITY_STATUS_NOT_SATISFIED)
        return super().process(apdu, ctx)

    def read_buffer(self, apdu: CommandApdu) -> bytes:
        if len(apdu.data) != 2:
            raise CardError(SW.WRONG_LENGTH, "READ BUFFER data is <type> <count>")
        buffer_type, count = apdu.data[0], apdu.data[1]
        if buffer_type == BUFFER_T:
            file = self.t_file
        elif buffer_type == BUFFER_V:
            file = self.v_file
        else:
            raise CardError(SW.INCORRECT_DATA, "buffer type is 01 (T) or 02 (V)")
        offset = (apdu.p1 << 8) | apdu.p2
        if offset > len(file):
            # As ISO 7816-4 READ BINARY answers an offset outside the file: 6B 00.
            raise CardError(SW.WRONG_P1P2, "offset beyond the end of the buffer")
        return file[offset : offset + count]
