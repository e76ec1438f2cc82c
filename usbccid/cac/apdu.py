"""ISO/IEC 7816-4 command and response APDUs (§5.1 "Command-response pairs").

A command APDU is ``CLA INS P1 P2 [Lc data] [Le]`` in one of seven cases:

====  =====================================  ==========================================
case  body                                   meaning
====  =====================================  ==========================================
1     (empty)                                no data, no response data
2S    Le (1 byte, 00 = 256)                  response data expected
3S    Lc (1 byte, 01..FF) data               command data
4S    Lc data Le                             both
2E    00 Le (2 bytes, 0000 = 65536)          extended Le
3E    00 Lc (2 bytes, 0001..FFFF) data       extended Lc
4E    00 Lc (2 bytes) data Le (2 bytes)      both extended
====  =====================================  ==========================================

Parsing is strict: any byte string that is not exactly one of these cases raises
:class:`~usbccid.cac.errors.ApduFormatError` (answered 67 00). Nothing is padded or
repaired. ``ne`` is the decoded Le ("Ne" in ISO terms): ``None`` when the Le field is
absent, else 1..256 (short) or 1..65536 (extended).
"""

from __future__ import annotations

from dataclasses import dataclass

from usbccid.cac.errors import ApduFormatError
from usbccid.cac.sw import sw_bytes

SHORT_MAX_NC = 255
SHORT_MAX_NE = 256
EXTENDED_MAX_NC = 65535
EXTENDED_MAX_NE = 65536


@dataclass(frozen=True, slots=True)
class CommandApdu:
    """One command APDU. ``extended`` records the length encoding (3-byte Lc / 2-byte Le)."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    ne: int | None = None
    extended: bool = False

    def __post_init__(self) -> None:
        # Local misuse (a bad object built by our own code) is a ValueError, not a CardError.
        for name in ("cla", "ins", "p1", "p2"):
            value = getattr(self, name)
            if not 0 <= value <= 0xFF:
                raise ValueError(f"{name} out of range")
        max_nc = EXTENDED_MAX_NC if self.extended else SHORT_MAX_NC
        max_ne = EXTENDED_MAX_NE if self.extended else SHORT_MAX_NE
        if len(self.data) > max_nc:
            raise ValueError("command data too long for the length encoding")
        if self.ne is not None and not 1 <= self.ne <= max_ne:
            raise ValueError("ne out of range for the length encoding")
        if self.extended and not self.data and self.ne is None:
            raise ValueError("case 1 has no extended form")

    @property
    def case(self) -> str:
        """The ISO 7816-4 case: ``1``, ``2S``, ``3S``, ``4S``, ``2E``, ``3E`` or ``4E``."""
        number = 1 + (self.ne is not None) + 2 * bool(self.data)
        if number == 1:
            return "1"
        return f"{number}{'E' if self.extended else 'S'}"

    @property
    def chained(self) -> bool:
        """CLA bit b5 (0x10): more commands of this chain follow (ISO 7816-4 §5.3.3)."""
        return bool(self.cla & 0x10) and self.cla != 0xFF

    @classmethod
    def parse(cls, raw: bytes) -> CommandApdu:
        """Decode ``raw``; raise :class:`ApduFormatError` unless it is exactly one case."""
        n = len(raw)
        if n < 4:
            raise ApduFormatError("shorter than a header")
        cla, ins, p1, p2 = raw[0], raw[1], raw[2], raw[3]
        if n == 4:  # case 1
            return cls(cla, ins, p1, p2)
        b1 = raw[4]
        if n == 5:  # case 2S
            return cls(cla, ins, p1, p2, ne=b1 or 256)
        if b1 != 0:  # short Lc
            if n == 5 + b1:  # case 3S
                return cls(cla, ins, p1, p2, bytes(raw[5:]))
            if n == 6 + b1:  # case 4S
                return cls(cla, ins, p1, p2, bytes(raw[5:-1]), ne=raw[-1] or 256)
            raise ApduFormatError("body length inconsistent with Lc")
        # b1 == 0 and n > 5: an extended length field follows.
        if n < 7:
            raise ApduFormatError("truncated extended length")
        value = int.from_bytes(raw[5:7], "big")
        if n == 7:  # case 2E
            return cls(cla, ins, p1, p2, ne=value or 65536, extended=True)
        if value == 0:
            raise ApduFormatError("extended Lc of zero")
        if n == 7 + value:  # case 3E
            return cls(cla, ins, p1, p2, bytes(raw[7:]), extended=True)
        if n == 9 + value:  # case 4E
            le = int.from_bytes(raw[-2:], "big")
            return cls(cla, ins, p1, p2, bytes(raw[7:-2]), ne=le or 65536, extended=True)
        raise ApduFormatError("body length inconsistent with extended Lc")

    def encode(self) -> bytes:
        """The APDU bytes; ``parse(encode(x)) == x``."""
        out = bytearray((self.cla, self.ins, self.p1, self.p2))
        if self.extended:
            if self.data:
                out += b"\x00" + len(self.data).to_bytes(2, "big") + self.data
            if self.ne is not None:
                if not self.data:
                    out += b"\x00"
                out += (self.ne % 65536).to_bytes(2, "big")
        else:
            if self.data:
                out += bytes((len(self.data),)) + self.data
            if self.ne is not None:
                out += bytes((self.ne % 256,))
        return bytes(out)


@dataclass(frozen=True, slots=True)
class ResponseApdu:
    """One response APDU: response data and the status word SW1 SW2 (ISO 7816-4 §5.1)."""

    data: bytes
    sw: int

    def __post_init__(self) -> None:
        if not 0 <= self.sw <= 0xFFFF:
            raise ValueError("sw out of range")

    @property
    def sw1(self) -> int:
        return self.sw >> 8

    @property
    def sw2(self) -> int:
        return self.sw & 0xFF

    @classmethod
    def parse(cls, raw: bytes) -> ResponseApdu:
        if len(raw) < 2:
            raise ValueError("a response APDU has at least SW1 SW2")
        return cls(bytes(raw[:-2]), int.from_bytes(raw[-2:], "big"))

    def encode(self) -> bytes:
        return self.data + sw_bytes(self.sw)
