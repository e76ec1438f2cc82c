"""A tiny host side for the PIV tests: APDUs in hex, 61xx followed like OpenSC's apdu.c,
GENERAL AUTHENTICATE templates built and read."""

from __future__ import annotations

from usbccid.cac.apdu import ResponseApdu
from usbccid.card import Card
from usbccid.piv import tlv

PIV_AID = bytes.fromhex("A0 00 00 03 08 00 00 10 00 01 00")


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def pad(value: bytes) -> bytes:
    return value.ljust(8, b"\xff")


def apdu(cla: int, ins: int, p1: int, p2: int, data: bytes = b"", le: int | None = None) -> bytes:
    """A short APDU (data up to 255 bytes); le 256 is written 00."""
    out = bytes((cla, ins, p1, p2))
    if data:
        out += bytes((len(data),)) + data
    if le is not None:
        out += bytes((le % 256,))
    return out


class Session:
    def __init__(self, card: Card) -> None:
        self.card = card

    def send(self, command: str | bytes) -> ResponseApdu:
        raw = h(command) if isinstance(command, str) else command
        out = self.card.transmit(raw)
        assert len(out) >= 2
        return ResponseApdu.parse(out)

    def sw(self, command: str | bytes) -> int:
        return self.send(command).sw

    def full(self, command: str | bytes) -> ResponseApdu:
        """Send, then GET RESPONSE while the card says 61xx."""
        r = self.send(command)
        data = r.data
        while r.sw1 == 0x61:
            r = self.send(bytes((0x00, 0xC0, 0x00, 0x00, r.sw2)))
            data += r.data
        return ResponseApdu(data, r.sw)

    def chained(self, ins: int, p1: int, p2: int, data: bytes, chunk: int = 255) -> ResponseApdu:
        """Command chaining as OpenSC's sc_transmit does (CLA 10, 255-byte pieces), then
        the answer fetched with GET RESPONSE."""
        while len(data) > chunk:
            r = self.send(apdu(0x10, ins, p1, p2, data[:chunk]))
            assert r.sw == 0x9000, hex(r.sw)
            data = data[chunk:]
        return self.full(apdu(0x00, ins, p1, p2, data, 256))

    def select(self, aid: bytes = PIV_AID, p2: int = 0x00) -> ResponseApdu:
        return self.send(apdu(0x00, 0xA4, 0x04, p2, aid, 256))

    def get_data(self, tag: int) -> ResponseApdu:
        return self.full(apdu(0x00, 0xCB, 0x3F, 0xFF, tlv.tlv(0x5C, tlv.tag_bytes(tag)), 256))

    def verify(self, pin: bytes | None, ref: int = 0x80) -> int:
        return self.sw(apdu(0x00, 0x20, 0x00, ref, pad(pin) if pin is not None else b""))

    def authenticate(self, alg: int, ref: int, tag: int, data: bytes) -> ResponseApdu:
        """GENERAL AUTHENTICATE 7C { 82 00, <tag> <data> } (chained when long)."""
        template = tlv.tlv(0x7C, tlv.tlv(0x82, b"") + tlv.tlv(tag, data))
        return self.chained(0x87, alg, ref, template)


def response_value(data: bytes) -> bytes:
    """The 82 value of a 7C { 82 ... } answer."""
    inner = tlv.parse_one(data, 0x7C)
    return tlv.parse_one(inner, 0x82)
