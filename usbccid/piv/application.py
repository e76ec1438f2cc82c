"""The PIV Card Application's commands (SP 800-73-4 Part 2 §3), one handler per instruction.

:data:`INSTRUCTIONS` names what the card edge answers; :class:`PivApplication` maps each to
its handler. Handlers *return* response data and *raise*
:class:`~usbccid.piv.errors.PivError`; the card OS (:mod:`usbccid.piv.card`) owns
chaining, GET RESPONSE and the conversion to status words.

=======  =====================================  ===========================================
INS      command                                encoding (P1 P2, data)
=======  =====================================  ===========================================
``A4``   SELECT (§3.1.1)                        04 00, the PIV AID (or without its version)
                                                → the application property template ``61``
``CB``   GET DATA (§3.1.2)                      3F FF, ``5C`` tag list → the data object
``20``   VERIFY (§3.2.1)                        00|FF 80, 8-byte PIN or nothing
``24``   CHANGE REFERENCE DATA (§3.2.2)         00 80|81, old + new
``2C``   RESET RETRY COUNTER (§3.2.3)           00 80, PUK + new PIN
``87``   GENERAL AUTHENTICATE (§3.2.4)          algorithm, key reference, ``7C`` template
``84``   GET CHALLENGE (ISO 7816-4 §11.5.3)     00 00, Le → Le random bytes
``DB``   PUT DATA (§3.3.1)                      ``69 82``: needs the card management key
``47``   GENERATE ASYMMETRIC KEY PAIR (§3.3.2)  ``69 82`` likewise
=======  =====================================  ===========================================

GENERAL AUTHENTICATE templates (Part 2 Table 7, §A.3-A.5):

* ``7C { 82 00, 81 <data> }`` with an asymmetric key: RSA raw operation (signature or
  decryption), ECDSA (data = the hash) → ``7C { 82 <result> }``;
* ``7C { 82 00, 85 <point> }`` with an EC key: ECDH → ``7C { 82 <shared secret> }``;
* ``7C { 81 00 }`` with the card management key 9B: a challenge → ``7C { 81 <8 bytes> }``
  (what OpenSC's C_GenerateRandom asks for). We implement no card management, so the
  card never accepts the response to it (``82`` answers ``69 82``).

Error words follow Part 2 §3: wrong P1/P2 (an algorithm the key is not, an unknown key
reference) ``6A 86``; a key reference without a key ``6A 88``; a malformed data field
``6A 80``; access rule not met ``69 82``.
"""

from __future__ import annotations

from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec, rsa

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.profile import PinStateStore
from usbccid.cac.sw import SW
from usbccid.piv import tlv
from usbccid.piv.errors import PivError
from usbccid.piv.keys import (
    ALGORITHMS,
    CARD_MANAGEMENT_KEY,
    KEY_REFERENCES,
    Access,
    KeyKind,
    algorithm_of,
    ecdh,
    ecdsa_sign,
    rsa_operation,
)
from usbccid.piv.objects import DATA_OBJECTS, NIST_RID, PIV_AID, PIV_AID_SHORT, card_objects
from usbccid.piv.pin import PivPins
from usbccid.piv.profile import PivProfile

INS_SELECT = 0xA4
INS_GET_DATA = 0xCB
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_GENERAL_AUTHENTICATE = 0x87
INS_GET_CHALLENGE = 0x84
INS_PUT_DATA = 0xDB
INS_GENERATE_KEY_PAIR = 0x47
INS_GET_RESPONSE = 0xC0

INSTRUCTIONS: dict[int, str] = {
    INS_SELECT: "SELECT",
    INS_GET_DATA: "GET DATA",
    INS_VERIFY: "VERIFY",
    INS_CHANGE_REFERENCE_DATA: "CHANGE REFERENCE DATA",
    INS_RESET_RETRY_COUNTER: "RESET RETRY COUNTER",
    INS_GENERAL_AUTHENTICATE: "GENERAL AUTHENTICATE",
    INS_GET_CHALLENGE: "GET CHALLENGE",
    INS_PUT_DATA: "PUT DATA",
    INS_GENERATE_KEY_PAIR: "GENERATE ASYMMETRIC KEY PAIR",
}

TAG_DYNAMIC_AUTH = 0x7C
TAG_WITNESS = 0x80
TAG_CHALLENGE = 0x81
TAG_RESPONSE = 0x82
TAG_EXPONENTIATION = 0x85
TAG_TAG_LIST = 0x5C

CHALLENGE_LEN = 8  # a Triple DES block: the card management key's algorithm
APPLICATION_LABEL = b"usbccid PIV"

#: (access rule, PIN verified, 9C "PIN Always" grant held) -> allowed.
ACCESS: dict[tuple[Access, bool, bool], bool] = {
    (rule, verified, granted): {
        Access.ALWAYS: True,
        Access.PIN: verified,
        Access.PIN_ALWAYS: verified and granted,
        Access.ADMIN: False,
    }[rule]
    for rule in Access
    for verified in (False, True)
    for granted in (False, True)
}


def application_property_template(algorithms: list[int]) -> bytes:
    """The answer to SELECT (SP 800-73-4 Part 2 Table 3): ``61 { 4F <PIX>, 79 { 4F <RID> },
    50 <label>, AC { 80 <algorithm>..., 06 00 } }``."""
    supported = b"".join(tlv.tlv(0x80, bytes((a,))) for a in algorithms) + tlv.tlv(0x06, b"")
    return tlv.tlv(
        0x61,
        tlv.tlv(0x4F, PIV_AID[5:])
        + tlv.tlv(0x79, tlv.tlv(0x4F, NIST_RID))
        + tlv.tlv(0x50, APPLICATION_LABEL)
        + tlv.tlv(0xAC, supported),
    )


class PivApplication:
    """The PIV Card Application of one card: its objects, keys, PIN and commands."""

    def __init__(
        self,
        profile: PivProfile,
        pin_store: PinStateStore,
        random_bytes: Callable[[int], bytes],
    ) -> None:
        self.profile = profile
        self.pins = PivPins(profile.pin_policy, pin_store)
        self.objects = card_objects(profile)
        self._slots = {slot.ref: slot for slot in profile.slots}
        self._random = random_bytes
        algorithms = sorted({algorithm_of(s.private_key).ident for s in profile.slots})
        self._apt = application_property_template(algorithms)
        self.commands: dict[int, Callable[[CommandApdu], bytes]] = {
            INS_SELECT: self.select,
            INS_GET_DATA: self.get_data,
            INS_VERIFY: lambda a: self.pins.verify(a.p1, a.p2, a.data),
            INS_CHANGE_REFERENCE_DATA: lambda a: self.pins.change_reference_data(
                a.p1, a.p2, a.data
            ),
            INS_RESET_RETRY_COUNTER: lambda a: self.pins.reset_retry_counter(a.p1, a.p2, a.data),
            INS_GENERAL_AUTHENTICATE: self.general_authenticate,
            INS_GET_CHALLENGE: self.get_challenge,
            INS_PUT_DATA: self.card_management,
            INS_GENERATE_KEY_PAIR: self.card_management,
        }
        assert set(self.commands) == set(INSTRUCTIONS)

    def process(self, apdu: CommandApdu) -> bytes:
        handler = self.commands.get(apdu.ins)
        if handler is None:
            raise PivError(SW.INS_NOT_SUPPORTED)
        return handler(apdu)

    def allowed(self, rule: Access) -> bool:
        return ACCESS[rule, self.pins.verified, self.pins.signature_granted]

    # -- commands ---------------------------------------------------------------------

    def select(self, apdu: CommandApdu) -> bytes:
        """SELECT the PIV Card Application (SP 800-73-4 Part 2 §3.1.1)."""
        if apdu.p1 != 0x04:
            raise PivError(SW.INCORRECT_P1P2, "only selection by AID")
        if apdu.p2 not in (0x00, 0x0C):
            raise PivError(SW.INCORRECT_P1P2)
        if apdu.data not in (PIV_AID, PIV_AID_SHORT):
            raise PivError(SW.FILE_NOT_FOUND, "not the PIV AID")
        return b"" if apdu.p2 == 0x0C else self._apt

    def get_data(self, apdu: CommandApdu) -> bytes:
        """GET DATA ``00 CB 3F FF Lc 5C <tag> 00`` (SP 800-73-4 Part 2 §3.1.2)."""
        if (apdu.p1, apdu.p2) != (0x3F, 0xFF):
            raise PivError(SW.INCORRECT_P1P2)
        try:
            wanted = tlv.parse_one(apdu.data, TAG_TAG_LIST)
        except tlv.TlvError:
            raise PivError(SW.INCORRECT_DATA, "expected a 5C tag list") from None
        if not 1 <= len(wanted) <= 3:
            raise PivError(SW.INCORRECT_DATA, "a tag is 1 to 3 bytes")
        info = DATA_OBJECTS.get(int.from_bytes(wanted, "big"))
        if info is None:
            raise PivError(SW.FILE_NOT_FOUND, "no such data object")
        # The access rule first: an absent protected object must not tell that it is absent
        # (OpenSC's CI_LEAKS_FILE_NOT_FOUND describes cards that do).
        if not self.allowed(info.access):
            raise PivError(SW.SECURITY_STATUS_NOT_SATISFIED)
        value = self.objects.get(info.tag)
        if value is None:
            raise PivError(SW.FILE_NOT_FOUND, "data object not on this card")
        return value

    def get_challenge(self, apdu: CommandApdu) -> bytes:
        """GET CHALLENGE ``00 84 00 00 Le`` (ISO 7816-4 §11.5.3): Le random bytes."""
        if (apdu.p1, apdu.p2) != (0x00, 0x00):
            raise PivError(SW.INCORRECT_P1P2)
        if apdu.data or apdu.ne is None or apdu.ne > 256:
            raise PivError(SW.WRONG_LENGTH)
        return self._random(apdu.ne)

    @staticmethod
    def card_management(apdu: CommandApdu) -> bytes:
        # PUT DATA and GENERATE ASYMMETRIC KEY PAIR need the card management key (9B)
        # authenticated (SP 800-73-4 Part 1 Table 4b), which this card never grants.
        raise PivError(SW.SECURITY_STATUS_NOT_SATISFIED, "card management is not implemented")

    def general_authenticate(self, apdu: CommandApdu) -> bytes:
        """GENERAL AUTHENTICATE ``00 87 <algorithm> <key> Lc 7C {...} 00`` (§3.2.4)."""
        algorithm = ALGORITHMS.get(apdu.p1)
        reference = KEY_REFERENCES.get(apdu.p2)
        if algorithm is None or reference is None:
            raise PivError(SW.INCORRECT_P1P2, "unknown algorithm or key reference")
        try:
            template = tlv.as_dict(tlv.parse(tlv.parse_one(apdu.data, TAG_DYNAMIC_AUTH)))
        except tlv.TlvError:
            raise PivError(SW.INCORRECT_DATA, "expected a 7C template") from None
        if reference.ref == CARD_MANAGEMENT_KEY:
            return self._management_key(algorithm.kind, template)
        slot = self._slots.get(reference.ref)
        if slot is None:
            raise PivError(SW.REFERENCED_DATA_NOT_FOUND, "no key in this key reference")
        if algorithm_of(slot.private_key).ident != algorithm.ident:
            raise PivError(SW.INCORRECT_P1P2, "the key is not of that algorithm")
        if set(template) not in ({TAG_RESPONSE, TAG_CHALLENGE}, {TAG_RESPONSE, TAG_EXPONENTIATION}):
            raise PivError(SW.INCORRECT_DATA, "expected 82 00 with 81 or 85")
        if template[TAG_RESPONSE]:
            raise PivError(SW.INCORRECT_DATA, "82 must be empty: it asks for the response")
        if not self.allowed(reference.access):
            raise PivError(SW.SECURITY_STATUS_NOT_SATISFIED, "PIN not verified")
        key = slot.private_key
        if TAG_EXPONENTIATION in template:
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise PivError(SW.INCORRECT_DATA, "key agreement needs an EC key")
            result = ecdh(key, template[TAG_EXPONENTIATION])
        elif isinstance(key, rsa.RSAPrivateKey):
            result = rsa_operation(key, template[TAG_CHALLENGE])
        else:
            result = ecdsa_sign(key, template[TAG_CHALLENGE])
        if reference.access is Access.PIN_ALWAYS:
            self.pins.signature_granted = False  # one verification, one signature
        return tlv.tlv(TAG_DYNAMIC_AUTH, tlv.tlv(TAG_RESPONSE, result))

    def _management_key(self, kind: KeyKind, template: dict[int, bytes]) -> bytes:
        if kind is not KeyKind.TDES:
            raise PivError(SW.INCORRECT_P1P2, "the card management key is Triple DES")
        if template == {TAG_CHALLENGE: b""}:
            challenge = self._random(CHALLENGE_LEN)
            return tlv.tlv(TAG_DYNAMIC_AUTH, tlv.tlv(TAG_CHALLENGE, challenge))
        if TAG_RESPONSE in template or TAG_WITNESS in template:
            raise PivError(SW.SECURITY_STATUS_NOT_SATISFIED, "no card management")
        raise PivError(SW.INCORRECT_DATA)
