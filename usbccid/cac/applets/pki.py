"""PKI container applets ``A0 00 00 00 79 01 0n`` (GSC-IS 2.1, CAC PKI applet).

Buffers (clients.md finding 8, §1.4): T = ``71 01 | 70 LL | 72 LL | FE 00``; V = CertInfo,
certificate, MSCUID, EDC. The certificate is stored **zlib-compressed with CertInfo 01**,
as real CACs do: Debian's coolkey 1.1.0 always inflates CAC-2 certificates and fails on
libcacard's uncompressed ones; OpenSC inflates when ``CertInfo & 3 == 1``.

SIGN/DECRYPT ``42`` (GSC-IS 2.1 VM card edge; card-cac.c ``cac_rsa_op``): P1=80 "more data
follows", P1=00 "last block"; P2=00. The concatenated input must be the full, already
padded, modulus-sized block; the card returns the raw RSA result, modulus-sized
(clients.md finding 10). Without a verified PIN the answer is ``69 82`` so that OpenSC
re-verifies from its PIN cache and coolkey logs in again (finding 11).

The raw operation is the container key's (:class:`usbccid.cac.profile.ContainerKey`):
in memory for a software container, on the token for a mirrored one.
"""

from __future__ import annotations

import functools
import zlib

from cryptography.hazmat.primitives.serialization import Encoding

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets import CardContext
from usbccid.cac.applets.buffers import (
    APPLET_INFO,
    INS_SIGN_DECRYPT,
    TAG_APPLET_INFORMATION,
    TAG_BUFFER_PROPERTIES,
    TAG_NUMBER_OF_OBJECTS,
    TAG_OBJECT_ID,
    TAG_PKI_OBJECT,
    TAG_PKI_PROPERTIES,
    BufferApplet,
)
from usbccid.cac.errors import CardError
from usbccid.cac.profile import Container, TokenContainer
from usbccid.cac.rsa_raw import modulus_bytes
from usbccid.cac.sw import SW
from usbccid.cac.tlv import encode_simple_tlv

PKI_AID_PREFIX = bytes.fromhex("A00000007901")
MAX_PKI_CONTAINERS = 16  # OpenSC probes 79 01 00..0F (card-cac.c MAX_CAC_SLOTS)

TAG_CERTIFICATE = 0x70
TAG_CERTINFO = 0x71
TAG_MSCUID = 0x72
TAG_ERROR_DETECTION_CODE = 0xFE

CERTINFO_COMPRESSED = 0x01  # bit 0..1 = 01: zlib (GSC-IS 2.1 / OpenSC cac_read_binary)
ALGORITHM_RSA = 0x06  # GSC-IS 2.1 Table 5-6

P1_SIGN_MORE = 0x80
P1_SIGN_LAST = 0x00


@functools.lru_cache(maxsize=256)
def _compressed(der: bytes) -> bytes:
    """The certificate as the applet stores it; cached, since every slot holding the same
    card builds the same applets."""
    return zlib.compress(der, 9)


def pki_aid(index: int) -> bytes:
    return PKI_AID_PREFIX + bytes((index,))


def pki_oid(index: int) -> bytes:
    return bytes((0x01, index))


class PkiApplet(BufferApplet):
    """One certificate and its private key."""

    def __init__(self, index: int, container: Container | TokenContainer) -> None:
        if not 0 <= index < MAX_PKI_CONTAINERS:
            raise ValueError("PKI container index out of range")
        key = container.key  # raises ValueError for a software key that is not RSA
        der = container.certificate.public_bytes(Encoding.DER)
        items = [
            (TAG_CERTINFO, bytes((CERTINFO_COMPRESSED,))),
            (TAG_CERTIFICATE, _compressed(der)),
            (TAG_MSCUID, b""),
            (TAG_ERROR_DETECTION_CODE, b""),
        ]
        super().__init__(pki_aid(index), pki_oid(index), items)
        self.index = index
        self._key = key
        self._k = modulus_bytes(key)
        self._sign_buffer = bytearray()

    @property
    def key_bits(self) -> int:
        return self._key.key_size

    def short_properties(self) -> list[tuple[int, bytes]]:
        # 43: algorithm, key length / 64 bits, private key initialised, public key initialised.
        pki = bytes((ALGORITHM_RSA, self._key.key_size // 64, 0x01, 0x01))
        obj = encode_simple_tlv(
            [
                (TAG_OBJECT_ID, self.oid),
                (TAG_BUFFER_PROPERTIES, self.object_properties()),
                (TAG_PKI_PROPERTIES, pki),
            ]
        )
        return [
            (TAG_APPLET_INFORMATION, APPLET_INFO),
            (TAG_NUMBER_OF_OBJECTS, b"\x01"),
            (TAG_PKI_OBJECT, obj),
        ]

    def on_select(self) -> None:
        # Chunks of an unfinished operation never survive a (re)selection (pitfall 17).
        self._sign_buffer.clear()

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins == INS_SIGN_DECRYPT:
            return self.sign_decrypt(apdu, ctx)
        return super().process(apdu, ctx)

    def sign_decrypt(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.p2 != 0x00 or apdu.p1 not in (P1_SIGN_MORE, P1_SIGN_LAST):
            self._sign_buffer.clear()
            raise CardError(SW.INCORRECT_P1P2)
        if not ctx.pin.verified:
            self._sign_buffer.clear()
            raise CardError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN not verified")
        if len(self._sign_buffer) + len(apdu.data) > self._k:
            self._sign_buffer.clear()
            raise CardError(SW.WRONG_LENGTH, "more input than the modulus length")
        self._sign_buffer += apdu.data
        if apdu.p1 == P1_SIGN_MORE:
            return b""
        block = bytes(self._sign_buffer)
        self._sign_buffer.clear()
        return self._key.raw_rsa(block)


class EmptyPkiApplet(BufferApplet):
    """A PKI applet whose container holds no key (an uninitialised CAC container).

    Debian's coolkey 1.1.0 loads PKI instances 0, 1 and 2 unconditionally
    (slot.cpp ``Slot::loadObjects``), and for an instance missing from the CCC it finds an
    empty AID in ``selectCACApplet``, **disconnects** from the card and reports the token
    removed: a card with one or two containers shows an empty slot. Real CACs always have
    three PKI applets, so cards with fewer containers pad the CCC with these: SELECT of the
    applet and of its object succeeds; READ BUFFER answers ``6A 82`` (no data), which
    coolkey treats as "no certificate in pki 1/2", non-fatal, and OpenSC's CAC emulation
    as "No cert found" (skipped); GET PROPERTIES says the private key is not initialised;
    SIGN/DECRYPT answers ``6A 88``. (Empty buffers would not do: Debian's coolkey then
    goes on to parse an empty certificate and drops every object of the token.)
    """

    def __init__(self, index: int) -> None:
        if not 0 <= index < MAX_PKI_CONTAINERS:
            raise ValueError("PKI container index out of range")
        super().__init__(pki_aid(index), pki_oid(index), [])
        self.index = index

    def short_properties(self) -> list[tuple[int, bytes]]:
        # 43: RSA, no key length, private key and public key not initialised.
        pki = bytes((ALGORITHM_RSA, 0x00, 0x00, 0x00))
        obj = encode_simple_tlv(
            [
                (TAG_OBJECT_ID, self.oid),
                (TAG_BUFFER_PROPERTIES, self.object_properties()),
                (TAG_PKI_PROPERTIES, pki),
            ]
        )
        return [
            (TAG_APPLET_INFORMATION, APPLET_INFO),
            (TAG_NUMBER_OF_OBJECTS, b"\x01"),
            (TAG_PKI_OBJECT, obj),
        ]

    def read_buffer(self, apdu: CommandApdu) -> bytes:
        raise CardError(SW.FILE_NOT_FOUND, "empty container")

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        if apdu.ins == INS_SIGN_DECRYPT:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "no key in this container")
        return super().process(apdu, ctx)
