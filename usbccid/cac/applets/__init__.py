"""The applets on the emulated CAC, and what they may ask of the card OS.

An applet *returns* response data for success and *raises*
:class:`~usbccid.cac.errors.CardError` for everything else; it never builds status words
into responses itself. The card OS (:mod:`usbccid.cac.card`) owns selection, response
chaining, the PIN and GET CHALLENGE, and converts errors to status words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.applets.pin import CardPin
from usbccid.cac.errors import CardError
from usbccid.cac.sw import SW
from usbccid.cac.tlv import ber_tlv


@dataclass
class CardContext:
    """Card-global services an applet may use while processing a command."""

    pin: CardPin
    random_bytes: Callable[[int], bytes]


def simple_fci(aid: bytes) -> bytes:
    """FCI template ``6F { 84 <DF name>, A5 {} }`` (ISO 7816-4 FCI template; GSC-IS 2.1
    §5.3.3.2 Select Applet).

    This is what a real Gemalto CAC and libcacard return to SELECT by AID.
    """
    return ber_tlv(0x6F, ber_tlv(0x84, aid) + ber_tlv(0xA5, b""))


class Applet:
    """Base class: an applet that knows no object and no instruction."""

    #: AIDs this applet answers to (exact match, ISO 7816-4 §11.1.1 "first or only occurrence").
    aids: tuple[bytes, ...] = ()

    def fci(self, aid: bytes) -> bytes:
        """The response data of SELECT by AID with P2=00 (FCI requested)."""
        return simple_fci(aid)

    def on_select(self) -> None:
        """Called on every SELECT of this applet and on deselection: reset transient state."""

    def select_object(self, oid: bytes) -> None:
        """SELECT P1=02: select an object (GSC-IS container OID) inside this applet."""
        raise CardError(SW.FILE_NOT_FOUND, "no such object in this applet")

    def process(self, apdu: CommandApdu, ctx: CardContext) -> bytes:
        """Process an applet-level command; return the response data."""
        raise CardError(SW.INS_NOT_SUPPORTED)
