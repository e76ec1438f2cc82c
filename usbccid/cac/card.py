"""The card OS of the emulated CAC: the one place where commands meet applets.

:class:`CacCard` implements :class:`usbccid.card.Card`. Per command it:

1. drops any unfetched response unless the command is GET RESPONSE (libcacard ≥ 2.5.3
   does the same; ISO 7816-4 §5.3.4 lets the card discard it);
2. parses the APDU strictly (:meth:`CommandApdu.parse`, 67 00 on malformed input);
3. checks the class byte (ISO 7816-4 §5.4.1): logical channels other than 0 → 68 81,
   secure messaging → 68 82, other classes → 6E 00. The interindustry class ``0x``
   and the proprietary class ``8x`` (GSC-IS commands, coolkey's ``80 52``) are accepted
   with the same bit layout;
4. assembles command chains (CLA bit 0x10, ISO 7816-4 §5.3.3);
5. dispatches: SELECT by AID, GET RESPONSE, the PIN commands and GET CHALLENGE are
   card-level; everything else goes to the selected applet;
6. sizes the answer (ISO 7816-4 §5.3.4): data that fits Ne is returned with 90 00; data
   with no Le (a T=0 case-4 command arrives without it, clients.md §0.2) or more than Ne
   is kept for GET RESPONSE and announced with ``61 xx``.

:class:`~usbccid.cac.errors.CardError` is turned into a status word only here.

Section numbers are those of ISO/IEC 7816-4:2020 (5.3.3 command chaining, 5.3.4 response
chaining and GET RESPONSE, 5.4.1 class byte, 5.6 status bytes, 11.1.1 SELECT).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from usbccid.cac.apdu import CommandApdu, ResponseApdu
from usbccid.cac.applets import Applet, CardContext
from usbccid.cac.applets.aca import AcaApplet
from usbccid.cac.applets.buffers import (
    INS_GET_ACR,
    INS_GET_PROPERTIES,
    INS_READ_BUFFER,
    INS_SIGN_DECRYPT,
    INS_UPDATE_BUFFER,
)
from usbccid.cac.applets.ccc import CCC_AID, CccApplet
from usbccid.cac.applets.pin import CardPin, PinService, TokenPinService
from usbccid.cac.applets.pki import MAX_PKI_CONTAINERS, EmptyPkiApplet, PkiApplet
from usbccid.cac.applets.windows import (
    GP_AID,
    INS_GET_DATA,
    GpCardManagerApplet,
    MsftPnpApplet,
)
from usbccid.cac.errors import CardError
from usbccid.cac.iso_card import IsoCard
from usbccid.cac.profile import (
    CardProfile,
    Container,
    PinStateStore,
    TokenCardProfile,
    TokenContainer,
)
from usbccid.cac.sw import SW, bytes_remaining

#: The ATR virt_cacard presents (libcacard ``vcard_emul_get_atr``): TS=3B, T0=89 (TD1,
#: 9 historical bytes), TD1=00 (T=0, no TA1 so no PPS speed change), "VCARD_NSS".
#: Our default: no OpenSC ATR table knows it, so only the APDU probes decide, and it ends
#: in the cac driver as in OpenSC's own CI (clients.md finding 3, §4).
ATR_VCARD_NSS = bytes.fromhex("3B 89 00 56 43 41 52 44 5F 4E 53 53")
#: libcacard's "official CAC" ATR (G&D, historical bytes "sfte cd144"). OpenSC's PIV driver
#: lists it as PIV_II_GI_DE_DUAL_CAC, so the PIV driver probes first (GET DATA without
#: SELECT) and would claim the card if a PIV applet were ever added.
ATR_LIBCACARD_CAC = bytes.fromhex("3B 7A 18 00 00 73 66 74 65 20 63 64 31 34 34")

INS_SELECT = 0xA4
INS_GET_RESPONSE = 0xC0
INS_VERIFY = 0x20
INS_CHANGE_REFERENCE_DATA = 0x24
INS_RESET_RETRY_COUNTER = 0x2C
INS_GET_CHALLENGE = 0x84

SELECT_BY_DF_NAME = 0x04
SELECT_OBJECT = 0x02  # GSC-IS 2.1: select a container object by its 2-byte OID

#: Instructions some applet implements: with no applet selected they answer 69 00
#: ("command not allowed", as libcacard); anything else is 6D 00.
APPLET_INSTRUCTIONS = frozenset(
    {
        INS_SIGN_DECRYPT,
        INS_GET_ACR,
        INS_READ_BUFFER,
        INS_GET_PROPERTIES,
        INS_UPDATE_BUFFER,
        INS_GET_DATA,
    }
)

#: Key size from which an RSA operation is slow enough to leave the event loop.
BLOCKING_KEY_BITS = 3072
#: Fewest PKI applets a card shows: coolkey loads instances 0, 1 and 2 and gives up on the
#: whole token when one of them cannot be selected (pki.EmptyPkiApplet).
MIN_PKI_APPLETS = 3
MAX_CHAIN_DATA = 65535
CHALLENGE_LEN = 8  # OpenSC's cac_get_challenge wants exactly 8 bytes


@dataclass
class _Chain:
    header: tuple[int, int, int, int]
    data: bytearray


class CacCard(IsoCard):
    """A DoD CAC (GSC-IS 2.1) holding ``profile``'s containers; implements ``Card``.

    Args:
        profile: containers (one PKI applet each, in order), card id and PIN policy; or,
            for a card mirroring a token, containers holding key handles and the token
            login that is the card's PIN. A token card is ``blocking``: its power on/off
            (logout) and its commands may do token I/O.
        pin_store: where the PIN state lives; loaded now, saved before each answer that
            changes it. Required for a :class:`CardProfile`, unused for a token.
        atr: the ATR returned by :meth:`power_on`.
        random_bytes: the source of GET CHALLENGE bytes.
    """

    def __init__(
        self,
        profile: CardProfile | TokenCardProfile,
        pin_store: PinStateStore | None = None,
        *,
        atr: bytes = ATR_VCARD_NSS,
        random_bytes: Callable[[int], bytes] = secrets.token_bytes,
    ) -> None:
        if not 1 <= len(profile.containers) <= MAX_PKI_CONTAINERS:
            raise ValueError(f"a CAC holds 1 to {MAX_PKI_CONTAINERS} PKI containers")
        self.profile = profile
        self.atr = atr
        self._pin: CardPin
        if isinstance(profile, TokenCardProfile):
            self._pin = TokenPinService(profile.login)
        elif pin_store is None:
            raise ValueError("a card with its own PIN needs a PIN state store")
        else:
            self._pin = PinService(profile.pin_policy, pin_store)
        self._ctx = CardContext(pin=self._pin, random_bytes=random_bytes)
        containers: tuple[Container | TokenContainer, ...] = profile.containers
        self.pki_applets = [PkiApplet(i, c) for i, c in enumerate(containers)]
        # coolkey needs PKI instances 0-2 (see EmptyPkiApplet): pad with empty containers.
        self.empty_pki_applets = [
            EmptyPkiApplet(i) for i in range(len(self.pki_applets), MIN_PKI_APPLETS)
        ]
        pki_aids = [a.aid for a in (*self.pki_applets, *self.empty_pki_applets)]
        applets: list[Applet] = [
            CccApplet(profile.card_id, pki_aids),
            AcaApplet(CCC_AID, pki_aids, GP_AID),
            *self.pki_applets,
            *self.empty_pki_applets,
            GpCardManagerApplet(profile.card_id),
            MsftPnpApplet(),
        ]
        self._by_aid: dict[bytes, Applet] = {}
        for applet in applets:
            for aid in applet.aids:
                assert aid not in self._by_aid, "duplicate AID"
                self._by_aid[aid] = applet
        self._blocking = isinstance(profile, TokenCardProfile) or any(
            a.key_bits >= BLOCKING_KEY_BITS for a in self.pki_applets
        )
        #: Card-level instructions (whatever applet is selected); the rest go to the applet.
        self._card_commands: dict[int, Callable[[CommandApdu], bytes]] = {
            INS_SELECT: self._select,
            INS_VERIFY: self._pin.verify,
            INS_CHANGE_REFERENCE_DATA: self._pin.change_reference_data,
            INS_RESET_RETRY_COUNTER: self._pin.reset_retry_counter,
            INS_GET_CHALLENGE: self._get_challenge,
            INS_GET_RESPONSE: self._get_response_in_chain,
        }
        self._selected: Applet | None = None
        self._pending = b""
        self._chain: _Chain | None = None

    # -- state -------------------------------------------------------------------

    @property
    def pin(self) -> CardPin:
        return self._pin

    @property
    def selected_aid(self) -> bytes | None:
        return None if self._selected is None else self._selected.aids[0]

    def reset(self) -> None:
        """Cold reset (ISO 7816-3 §6.2.2): no applet, no security status, nothing pending."""
        if self._selected is not None:
            self._selected.on_select()
        self._selected = None
        self._pending = b""
        self._chain = None
        self._pin.reset_security_status()

    # -- command processing ---------------------------------------------------------

    def _process(self, raw: bytes) -> ResponseApdu:
        pending, self._pending = self._pending, b""
        apdu = CommandApdu.parse(raw)
        self._check_class(apdu.cla)
        if apdu.ins == INS_GET_RESPONSE and self._chain is None:
            return self._get_response(apdu, pending)
        full = self._assemble_chain(apdu)
        if full is None:
            return ResponseApdu(b"", SW.NO_ERROR)
        data = self._dispatch(full)
        return self._size(data, full.ne)

    @staticmethod
    def _check_class(cla: int) -> None:
        """ISO 7816-4 §5.4.1, Tables 2 and 3 (class byte)."""
        if cla == 0xFF or 0x20 <= cla <= 0x3F or cla >= 0xA0:
            raise CardError(SW.CLA_NOT_SUPPORTED)
        if 0x40 <= cla <= 0x7F:
            # Further interindustry class: channels 4..19, SM in bit b6.
            raise CardError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
        # First interindustry class (0x) or proprietary 8x/9x with the same layout:
        # b2-b1 logical channel, b4-b3 secure messaging, b5 chaining.
        if cla & 0x03:
            raise CardError(SW.LOGICAL_CHANNEL_NOT_SUPPORTED)
        if cla & 0x0C:
            raise CardError(SW.SECURE_MESSAGING_NOT_SUPPORTED)

    def _get_response(self, apdu: CommandApdu, pending: bytes) -> ResponseApdu:
        """GET RESPONSE ``00 C0 00 00 Le`` (ISO 7816-4 §5.3.4)."""
        if apdu.p1 != 0x00 or apdu.p2 != 0x00:
            self._pending = pending
            raise CardError(SW.INCORRECT_P1P2)
        if apdu.data:
            raise CardError(SW.WRONG_LENGTH)
        if not pending:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "no response data pending")
        ne = 256 if apdu.ne is None else apdu.ne
        out, rest = pending[:ne], pending[ne:]
        if rest:
            self._pending = rest
            return ResponseApdu(out, bytes_remaining(len(rest)))
        return ResponseApdu(out, SW.NO_ERROR)

    def _assemble_chain(self, apdu: CommandApdu) -> CommandApdu | None:
        """Command chaining (ISO 7816-4 §5.3.3): None while the chain is incomplete."""
        header = (apdu.cla & ~0x10, apdu.ins, apdu.p1, apdu.p2)
        chain = self._chain
        if chain is not None and chain.header != header:
            self._chain = None
            raise CardError(SW.LAST_COMMAND_OF_CHAIN_EXPECTED)
        if apdu.chained:
            if chain is None:
                chain = self._chain = _Chain(header, bytearray())
            if len(chain.data) + len(apdu.data) > MAX_CHAIN_DATA:
                self._chain = None
                raise CardError(SW.WRONG_LENGTH, "chained data too long")
            chain.data += apdu.data
            return None
        if chain is None:
            return apdu
        self._chain = None
        data = bytes(chain.data) + apdu.data
        if len(data) > MAX_CHAIN_DATA:
            raise CardError(SW.WRONG_LENGTH, "chained data too long")
        extended = len(data) > 255 or (apdu.ne is not None and apdu.ne > 256)
        return CommandApdu(header[0], apdu.ins, apdu.p1, apdu.p2, data, apdu.ne, extended)

    def _dispatch(self, apdu: CommandApdu) -> bytes:
        handler = self._card_commands.get(apdu.ins)
        if handler is not None:
            return handler(apdu)
        if self._selected is None:
            if apdu.ins in APPLET_INSTRUCTIONS:
                raise CardError(SW.COMMAND_NOT_ALLOWED, "no applet selected")
            raise CardError(SW.INS_NOT_SUPPORTED)
        return self._selected.process(apdu, self._ctx)

    @staticmethod
    def _get_response_in_chain(apdu: CommandApdu) -> bytes:
        raise CardError(SW.LAST_COMMAND_OF_CHAIN_EXPECTED)  # GET RESPONSE ending a chain

    def _select(self, apdu: CommandApdu) -> bytes:
        """SELECT (ISO 7816-4 §11.1.1): by DF name (P1=04) or a GSC-IS object (P1=02)."""
        if apdu.p1 == SELECT_OBJECT:
            if len(apdu.data) != 2:
                raise CardError(SW.WRONG_LENGTH, "an object ID is 2 bytes")
            if apdu.p2 not in (0x00, 0x0C):
                raise CardError(SW.INCORRECT_P1P2)
            if self._selected is None:
                raise CardError(SW.FILE_NOT_FOUND, "no applet selected")
            self._selected.select_object(apdu.data)
            return b""  # CAC cards return no FCI here (card-cac.c "fake one")
        if apdu.p1 != SELECT_BY_DF_NAME:
            raise CardError(SW.FILE_NOT_FOUND, "no file system, only applets")
        # P2: b2-b1 = 00 first or only occurrence; b4-b3 = 00 FCI, 01 FCP, 10 FMD, 11 none.
        if apdu.p2 & 0xF3:
            raise CardError(SW.INCORRECT_P1P2)
        applet = self._by_aid.get(apdu.data)
        if applet is None:
            # The current applet stays selected (ISO 7816-4 §11.1.1; clients.md pitfall 11).
            raise CardError(SW.FILE_NOT_FOUND, "unknown AID")
        if self._selected is not None and self._selected is not applet:
            self._selected.on_select()
        applet.on_select()
        self._selected = applet
        if apdu.p2 == 0x0C:
            return b""
        return applet.fci(apdu.data)

    def _get_challenge(self, apdu: CommandApdu) -> bytes:
        """GET CHALLENGE ``00 84 00 00 Le`` (ISO 7816-4 §11.5.3); 8 bytes if Le is absent."""
        if apdu.p1 != 0x00 or apdu.p2 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        if apdu.data:
            raise CardError(SW.WRONG_LENGTH)
        n = CHALLENGE_LEN if apdu.ne is None else min(apdu.ne, 256)
        return self._ctx.random_bytes(n)

    def _size(self, data: bytes, ne: int | None) -> ResponseApdu:
        """Answer ``data`` directly if it fits Ne, else keep it for GET RESPONSE (61 xx)."""
        if not data:
            return ResponseApdu(b"", SW.NO_ERROR)
        if ne is not None and len(data) <= ne:
            return ResponseApdu(data, SW.NO_ERROR)
        self._pending = data
        return ResponseApdu(b"", bytes_remaining(len(data)))
