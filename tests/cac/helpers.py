"""A tiny host side for the card tests: send hex APDUs, follow 61xx like OpenSC does."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.apdu import ResponseApdu
from usbccid.cac.card import CacCard
from usbccid.cac.profile import Container

PKI0 = "A0 00 00 00 79 01 00"
PKI1 = "A0 00 00 00 79 01 01"
PKI2 = "A0 00 00 00 79 01 02"
CCC = "A0 00 00 01 16 DB 00"
ACA = "A0 00 00 00 79 03 00"
ACA_ALT = "A0 00 00 00 79 10 00"
GP = "A0 00 00 00 03 00 00 00"
MSFT = "A0 00 00 03 97 43 49 44 5F 01 00"


def h(text: str) -> bytes:
    return bytes.fromhex(text)


def hx(data: bytes) -> str:
    return data.hex(" ").upper()


def software_key(card: CacCard, index: int) -> rsa.RSAPrivateKey:
    """The private key of a software card's container ``index``."""
    container = card.profile.containers[index]
    assert isinstance(container, Container)
    return container.private_key


def pin_block(pin: bytes) -> bytes:
    return pin.ljust(8, b"\xff")


class Session:
    def __init__(self, card: CacCard) -> None:
        self.card = card

    def raw(self, apdu: bytes) -> ResponseApdu:
        out = self.card.transmit(apdu)
        assert len(out) >= 2
        return ResponseApdu.parse(out)

    def send(self, apdu: str | bytes) -> ResponseApdu:
        return self.raw(h(apdu) if isinstance(apdu, str) else apdu)

    def sw(self, apdu: str | bytes) -> int:
        return self.send(apdu).sw

    def full(self, apdu: str | bytes) -> ResponseApdu:
        """Send, then GET RESPONSE while the card says 61xx (as OpenSC's apdu.c)."""
        r = self.send(apdu)
        data = r.data
        while r.sw1 == 0x61:
            r = self.send(bytes((0x00, 0xC0, 0x00, 0x00, r.sw2)))
            data += r.data
        return ResponseApdu(data, r.sw)

    def select(self, aid: str, p2: int = 0x00) -> ResponseApdu:
        a = h(aid)
        return self.send(bytes((0x00, 0xA4, 0x04, p2, len(a))) + a)

    def verify(self, pin: bytes) -> int:
        return self.sw(bytes((0x00, 0x20, 0x00, 0x00, 8)) + pin_block(pin))

    def read_file(self, buffer_type: int, cla: int = 0x00, chunk: int = 240) -> bytes:
        """Read a whole T or V buffer the way OpenSC (CLA 00, 240) or coolkey (80, 255) do."""
        r = self.send(bytes((cla, 0x52, 0, 0, 2, buffer_type, 2, 2)))
        assert r.sw == 0x9000, hex(r.sw)
        size = int.from_bytes(r.data, "little")
        out = b""
        offset = 2
        while len(out) < size:
            n = min(chunk, size - len(out))
            cmd = bytes((cla, 0x52, offset >> 8, offset & 0xFF, 2, buffer_type, n, n))
            r = self.send(cmd)
            assert r.sw == 0x9000, hex(r.sw)
            assert len(r.data) == n  # coolkey insists on the exact size
            out += r.data
            offset += n
        return out

    def rsa(self, block: bytes, chunk: int = 240) -> ResponseApdu:
        """SIGN/DECRYPT the way cac_rsa_op sends it: 240-byte steps with P1=80, then P1=00."""
        while len(block) > chunk:
            r = self.send(bytes((0x00, 0x42, 0x80, 0x00, chunk)) + block[:chunk] + b"\xff")
            assert r.sw == 0x9000, hex(r.sw)
            block = block[chunk:]
        return self.full(bytes((0x00, 0x42, 0x00, 0x00, len(block))) + block + b"\xff")
