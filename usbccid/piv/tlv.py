"""BER-TLV as the PIV card edge uses it (SP 800-73-4 Part 2 §3; ISO/IEC 7816-4 §5.2.2).

Tags are 1 to 3 bytes (``53``, ``7F61``, ``5FC102``) and kept as the integer of their
bytes; lengths are definite, 1 to 4 bytes (``LL``, ``81 LL``, ``82 LLLL``, ``83 LLLLLL``).
:func:`parse` is strict and total: it decodes one flat level of objects and raises
:class:`TlvError` for anything else (truncation, indefinite length, trailing bytes), never
indexing past its input. :func:`tlv` builds one object.
"""

from __future__ import annotations

from collections.abc import Iterable

MAX_TAG_BYTES = 3
MAX_LENGTH = 0xFFFFFF


class TlvError(ValueError):
    """Malformed BER-TLV input."""


def tag_bytes(tag: int) -> bytes:
    """The bytes of ``tag`` (an integer such as ``0x5FC102``), 1 to 3 of them."""
    if not 0 < tag <= 0xFFFFFF:
        raise ValueError("a tag is 1 to 3 bytes")
    return tag.to_bytes((tag.bit_length() + 7) // 8, "big")


def length_bytes(n: int) -> bytes:
    """The shortest definite length field for ``n`` (ISO 7816-4 §5.2.2.2)."""
    if n < 0 or n > MAX_LENGTH:
        raise ValueError("BER-TLV length out of range")
    if n < 0x80:
        return bytes((n,))
    size = (n.bit_length() + 7) // 8
    return bytes((0x80 | size,)) + n.to_bytes(size, "big")


def tlv(tag: int, value: bytes) -> bytes:
    """One BER-TLV data object."""
    return tag_bytes(tag) + length_bytes(len(value)) + value


def tlvs(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(tlv(tag, value) for tag, value in items)


def parse(data: bytes) -> list[tuple[int, bytes]]:
    """Decode a flat sequence of BER-TLV objects into ``(tag, value)`` pairs."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        first = data[i]
        if first in (0x00, 0xFF):
            raise TlvError("padding or invalid tag byte")  # ISO 7816-4 §5.2.2.1
        start = i
        i += 1
        if first & 0x1F == 0x1F:  # subsequent tag bytes, b8 set on all but the last
            while True:
                if i >= n:
                    raise TlvError("truncated tag")
                if i - start >= MAX_TAG_BYTES:
                    raise TlvError("tag longer than 3 bytes")
                more = data[i] & 0x80
                i += 1
                if not more:
                    break
        tag = int.from_bytes(data[start:i], "big")
        if i >= n:
            raise TlvError("missing length")
        b = data[i]
        i += 1
        if b < 0x80:
            length = b
        elif b == 0x80:
            raise TlvError("indefinite length")
        else:
            size = b & 0x7F
            if size > 3:
                raise TlvError("length field longer than 3 bytes")
            if i + size > n:
                raise TlvError("truncated length")
            length = int.from_bytes(data[i : i + size], "big")
            i += size
        if i + length > n:
            raise TlvError("value runs past the end")
        out.append((tag, bytes(data[i : i + length])))
        i += length
    return out


def parse_one(data: bytes, tag: int) -> bytes:
    """The value of ``data`` when it is exactly one object tagged ``tag``."""
    items = parse(data)
    if len(items) != 1 or items[0][0] != tag:
        raise TlvError(f"expected one object tagged {tag:X}")
    return items[0][1]


def as_dict(items: list[tuple[int, bytes]]) -> dict[int, bytes]:
    """``items`` by tag; a tag given twice is malformed (no PIV template repeats one)."""
    out: dict[int, bytes] = {}
    for tag, value in items:
        if tag in out:
            raise TlvError(f"tag {tag:X} given twice")
        out[tag] = value
    return out
