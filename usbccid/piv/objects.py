"""PIV data objects: the table of SP 800-73-4 Part 1 Table 3, and the encoders of the ones
our card holds.

:data:`DATA_OBJECTS` lists every object PIV defines (tag for GET DATA, container ID,
read access rule). A card holds the Card Capability Container, the CHUID, the Discovery
Object, the Key History Object, the Printed Information and one certificate object per
key it has; GET DATA of any other object answers ``6A 82``.

Each container but the Discovery Object is a ``53`` template (SP 800-73-4 Part 1 §3) whose
last element is the Error Detection Code ``FE 00``. Encodings:

* CHUID (Table 9): ``30`` FASC-N (25 bytes), ``34`` GUID, ``35`` expiration date
  (YYYYMMDD), ``3E`` issuer asymmetric signature, ``FE``. The FASC-N has agency code,
  system code and credential number 9999 / 9999 / digits of the card ID, the form
  SP 800-73-4 Part 1 §3.1.2 and the CIO Council's PIV-I guidance give cards not issued by
  a federal agency, with a GUID (RFC 4122) to tell cards apart; OpenSC then takes the GUID
  as the token serial and honours the certificates' keyUsage (pkcs15-piv.c). The signature
  is empty: a test card has no content-signing key (its CA key is thrown away).
* CCC (Table 8): simple-TLV entries ``F0`` (card identifier: NIST RID ``A0 00 00 03 08``,
  manufacturer, card type, 14 bytes of the card ID) ``F1 F2 F3 F4 F5 F6 F7 FA FB FC FD``,
  ``FE``.
* Discovery Object (Table 18): ``7E { 4F <PIV AID>, 5F2F <PIN usage policy 40 00> }``:
  the PIV Card Application PIN is the only PIN.
* Key History (Table 19): ``C1`` retired keys with on-card certificates, ``C2`` 0, ``FE``.
* Printed Information (Table 12): ``01`` name, ``02`` employee affiliation, ``04``
  expiration date (YYYYMMMDD), ``05`` agency card serial number, ``06`` issuer
  identification, ``07`` organization affiliation, ``FE``. Read access: PIN.
* Certificates (Table 10): ``70`` the DER certificate, ``71`` CertInfo ``00``
  (uncompressed), ``FE``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from usbccid.cac.tlv import encode_simple_tlv
from usbccid.piv.keys import KEY_REFERENCES, Access
from usbccid.piv.profile import PivProfile
from usbccid.piv.tlv import tlv, tlvs

PIV_AID = bytes.fromhex("A0 00 00 03 08 00 00 10 00 01 00")
#: The AID without its version (SP 800-73-4 Part 2 §3.1.1: selection by the right-truncated AID).
PIV_AID_SHORT = PIV_AID[:9]
NIST_RID = PIV_AID[:5]

TAG_CONTAINER = 0x53
TAG_DISCOVERY = 0x7E
TAG_EDC = 0xFE


@dataclass(frozen=True)
class DataObject:
    tag: int
    name: str
    container_id: int
    access: Access  # read access (SP 800-73-4 Part 1 Table 3)


DATA_OBJECTS: dict[int, DataObject] = {
    o.tag: o
    for o in (
        DataObject(0x5FC107, "Card Capability Container", 0xDB00, Access.ALWAYS),
        DataObject(0x5FC102, "Card Holder Unique Identifier", 0x3000, Access.ALWAYS),
        DataObject(0x5FC105, "X.509 Certificate for PIV Authentication", 0x0101, Access.ALWAYS),
        DataObject(0x5FC103, "Cardholder Fingerprints", 0x6010, Access.PIN),
        DataObject(0x5FC106, "Security Object", 0x9000, Access.ALWAYS),
        DataObject(0x5FC108, "Cardholder Facial Image", 0x6030, Access.PIN),
        DataObject(0x5FC101, "X.509 Certificate for Card Authentication", 0x0500, Access.ALWAYS),
        DataObject(0x5FC10A, "X.509 Certificate for Digital Signature", 0x0100, Access.ALWAYS),
        DataObject(0x5FC10B, "X.509 Certificate for Key Management", 0x0102, Access.ALWAYS),
        DataObject(0x5FC109, "Printed Information", 0x3001, Access.PIN),
        DataObject(0x7E, "Discovery Object", 0x6050, Access.ALWAYS),
        DataObject(0x5FC10C, "Key History Object", 0x6060, Access.ALWAYS),
        *(
            DataObject(
                0x5FC10D + i,
                f"Retired X.509 Certificate for Key Management {i + 1}",
                0x1001 + i,
                Access.ALWAYS,
            )
            for i in range(20)
        ),
        DataObject(0x5FC121, "Cardholder Iris Images", 0x1015, Access.PIN),
        DataObject(0x7F61, "Biometric Information Templates Group Template", 0x1016, Access.ALWAYS),
        DataObject(0x5FC122, "Secure Messaging Certificate Signer", 0x1017, Access.ALWAYS),
        DataObject(0x5FC123, "Pairing Code Reference Data Container", 0x1018, Access.PIN),
    )
}

TAG_CCC = 0x5FC107
TAG_CHUID = 0x5FC102
TAG_PRINTED_INFORMATION = 0x5FC109
TAG_KEY_HISTORY = 0x5FC10C

# -- FASC-N (TIG SCEPACS v2.3 §6, 5-bit BCD with odd parity, least significant bit first)

_SS, _FS, _ES = 0xB, 0xD, 0xF


def _fascn_symbol(value: int) -> str:
    bits = "".join("1" if value >> i & 1 else "0" for i in range(4))  # b1 b2 b4 b8
    return bits + ("0" if bits.count("1") % 2 else "1")  # odd parity


def fascn(agency: str, system: str, credential: str, person: str) -> bytes:
    """The 25-byte FASC-N: SS agency FS system FS credential FS CS FS ICI FS PI OC OI POA ES
    LRC (series, issue 1; organizational category 1, organization 9999, association 1)."""
    for field, size in ((agency, 4), (system, 4), (credential, 6), (person, 10)):
        if len(field) != size or not field.isdigit():
            raise ValueError("FASC-N fields are fixed-size digit strings")
    values = [_SS, *map(int, agency), _FS, *map(int, system), _FS, *map(int, credential), _FS]
    values += [1, _FS, 1, _FS, *map(int, person), 1, 9, 9, 9, 9, 1, _ES]
    lrc = 0
    for v in values:
        lrc ^= v
    bits = "".join(_fascn_symbol(v) for v in (*values, lrc))
    assert len(bits) == 200
    return int(bits, 2).to_bytes(25, "big")


def fascn_digits(card_id: bytes) -> tuple[str, str]:
    """(credential number, person identifier) derived from the card ID."""
    n = int.from_bytes(hashlib.sha256(b"usbccid-fascn" + card_id).digest()[:8], "big")
    return f"{n % 10**6:06d}", f"{n // 10**6 % 10**10:010d}"


def card_guid(card_id: bytes) -> bytes:
    """A version 4 (random-form) UUID made from the card ID (RFC 4122 §4.4)."""
    digest = hashlib.sha256(b"usbccid-guid" + card_id).digest()[:16]
    return uuid.UUID(bytes=digest, version=4).bytes


def _container(items: list[tuple[int, bytes]]) -> bytes:
    return tlv(TAG_CONTAINER, tlvs([*items, (TAG_EDC, b"")]))


def chuid(card_id: bytes, expires: datetime) -> bytes:
    credential, person = fascn_digits(card_id)
    return _container(
        [
            (0x30, fascn("9999", "9999", credential, person)),
            (0x34, card_guid(card_id)),
            (0x35, f"{expires.year:04d}{expires.month:02d}{expires.day:02d}".encode()),
            (0x3E, b""),
        ]
    )


def ccc_content(card_id: bytes) -> bytes:
    """The simple-TLV entries of a PIV Card Capability Container (Table 8)."""
    identifier = NIST_RID + b"\x00\x02" + card_id[-14:].rjust(14, b"\x00")  # mfr 00, Java
    return encode_simple_tlv(
        [
            (0xF0, identifier),
            (0xF1, b"\x21"),
            (0xF2, b"\x21"),
            (0xF3, b""),
            (0xF4, b"\x00"),
            (0xF5, b"\x10"),
            (0xF6, bytes(17)),
            (0xF7, b""),
            (0xFA, b""),
            (0xFB, b""),
            (0xFC, b""),
            (0xFD, b""),
        ]
    )


def ccc(content: bytes) -> bytes:
    return tlv(TAG_CONTAINER, content + tlv(TAG_EDC, b""))


#: PIN usage policy (SP 800-73-4 Part 1 §3.3.2): 40 = the PIV Card Application PIN
#: satisfies the PIV access rules; 00 = no other PIN to prefer.
PIN_USAGE_POLICY = b"\x40\x00"


def discovery() -> bytes:
    return tlv(TAG_DISCOVERY, tlv(0x4F, PIV_AID) + tlv(0x5F2F, PIN_USAGE_POLICY))


def key_history(on_card: int) -> bytes:
    return _container([(0xC1, bytes((on_card,))), (0xC2, b"\x00")])


def certificate_object(certificate: x509.Certificate) -> bytes:
    return _container([(0x70, certificate.public_bytes(Encoding.DER)), (0x71, b"\x00")])


def _common_name(certificate: x509.Certificate) -> str:
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = names[0].value if names else "USBCCID TEST CARDHOLDER"
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")


def printed_information(name: str, card_id: bytes, expires: datetime) -> bytes:
    return _container(
        [
            (0x01, name.encode("utf-8")[:125]),
            (0x02, b"TEST"),
            (0x04, f"{expires.year:04d}{_MONTHS[expires.month - 1]}{expires.day:02d}".encode()),
            (0x05, card_id[-10:].hex().upper().encode("ascii")),
            (0x06, b"USBCCID TEST"),
            (0x07, b"USBCCID TEST CARD"),
        ]
    )


def card_objects(profile: PivProfile) -> Mapping[int, bytes]:
    """The data objects ``profile``'s card holds, by tag, encoded."""
    expires = min(s.certificate.not_valid_after_utc for s in profile.slots)
    holder = profile.slot(0x9A) or profile.slots[0]
    objects = {
        TAG_CCC: ccc(ccc_content(profile.card_id)),
        TAG_CHUID: chuid(profile.card_id, expires),
        TAG_DISCOVERY: discovery(),
        TAG_KEY_HISTORY: key_history(profile.retired_count),
        TAG_PRINTED_INFORMATION: printed_information(
            _common_name(holder.certificate), profile.card_id, expires
        ),
    }
    for slot in profile.slots:
        tag = KEY_REFERENCES[slot.ref].certificate_tag
        assert tag is not None
        objects[tag] = certificate_object(slot.certificate)
    assert all(tag in DATA_OBJECTS for tag in objects)
    return objects
