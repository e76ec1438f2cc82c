"""The two TLV encodings the card speaks.

* **GSC-IS simple-TLV** (GSC-IS 2.1 §8.4, NISTIR 6887; the same as ISO 7816-4 §5.2.1's
  simple-TLV except for the long length): a 1-byte tag 01..FE, then a 1-byte length
  below 255, or ``FF`` followed by a **2-byte little-endian** length. CAC properties,
  CCC and ACA tables use it; the "VM card" T and V buffers are its two halves.
* **BER-TLV** (ISO 7816-4 §5.2.2), only the short forms the FCI templates need.

These are small pure functions; :func:`parse_simple_tlv` is strict and never indexes past
the end of its input (it is fuzzed in the tests).
"""

from __future__ import annotations

from collections.abc import Iterable


class TlvError(ValueError):
    """Malformed TLV input."""


def simple_tlv_length(n: int) -> bytes:
    """The simple-TLV length field for a value of ``n`` bytes."""
    if n < 0 or n > 0xFFFF:
        raise ValueError("simple-TLV length out of range")
    if n < 0xFF:
        return bytes((n,))
    return b"\xff" + n.to_bytes(2, "little")


def simple_tlv(tag: int, value: bytes) -> bytes:
    """One simple-TLV data object."""
    if not 0x01 <= tag <= 0xFE:
        raise ValueError("simple-TLV tags are 01..FE")
    return bytes((tag,)) + simple_tlv_length(len(value)) + value


def encode_simple_tlv(items: Iterable[tuple[int, bytes]]) -> bytes:
    return b"".join(simple_tlv(tag, value) for tag, value in items)


def split_tl_v(items: Iterable[tuple[int, bytes]]) -> tuple[bytes, bytes]:
    """The GSC-IS "VM card" split: (tags and lengths only, values concatenated)."""
    tl = bytearray()
    v = bytearray()
    for tag, value in items:
        tl += bytes((tag,)) + simple_tlv_length(len(value))
        v += value
    return bytes(tl), bytes(v)


def parse_simple_tlv(data: bytes) -> list[tuple[int, bytes]]:
    """Decode a flat sequence of simple-TLV objects; raise :class:`TlvError` if malformed."""
    out: list[tuple[int, bytes]] = []
    i = 0
    n = len(data)
    while i < n:
        tag = data[i]
        if tag in (0x00, 0xFF):
            raise TlvError("invalid simple-TLV tag")
        if i + 1 >= n:
            raise TlvError("missing length")
        length = data[i + 1]
        i += 2
        if length == 0xFF:
            if i + 2 > n:
                raise TlvError("truncated long length")
            length = int.from_bytes(data[i : i + 2], "little")
            i += 2
        if i + length > n:
            raise TlvError("value runs past the end")
        out.append((tag, bytes(data[i : i + length])))
        i += length
    return out


def parse_tl(tl: bytes) -> list[tuple[int, int]]:
    """Decode a T buffer (tags and lengths only) into ``(tag, length)`` pairs."""
    out: list[tuple[int, int]] = []
    i = 0
    n = len(tl)
    while i < n:
        tag = tl[i]
        if i + 1 >= n:
            raise TlvError("missing length")
        length = tl[i + 1]
        i += 2
        if length == 0xFF:
            if i + 2 > n:
                raise TlvError("truncated long length")
            length = int.from_bytes(tl[i : i + 2], "little")
            i += 2
        out.append((tag, length))
    return out


def ber_tlv(tag: int, value: bytes) -> bytes:
    """A BER-TLV object with a 1- or 2-byte tag and a definite length (ISO 7816-4 §5.2.2)."""
    tag_bytes = tag.to_bytes(2, "big") if tag > 0xFF else bytes((tag,))
    n = len(value)
    if n < 0x80:
        length = bytes((n,))
    elif n <= 0xFF:
        length = b"\x81" + bytes((n,))
    elif n <= 0xFFFF:
        length = b"\x82" + n.to_bytes(2, "big")
    else:
        raise ValueError("BER-TLV value too long")
    return tag_bytes + length + value
