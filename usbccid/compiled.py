"""Compiled construct declarations: the same declaration, parsed and built faster.

construct can translate a declaration into Python source ("Compilation" in construct's
documentation): the compiled form parses and builds the same bytes as the declaration it
came from, about four times faster on our 48-byte USB/IP headers and 10-byte CCID headers,
which every APDU crosses several times. Each wire module keeps its one declaration per
format; this module only makes it faster.

One caution decides how parsing uses it: construct 2.10's compiled code does not check that
a read got all the bytes it asked for (``Bytes``, ``Padding`` take what is there), so a
truncated message could parse. The compiled form therefore only ever sees data whose length
is already known to be right; everything else, and everything it refuses, goes to the
declaration itself, which is the reference and names the error.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from construct import (
    Bytes,
    Construct,
    Container,
    FormatField,
    Padded,
    Pass,
    Rebuild,
    Renamed,
    SizeofError,
    Struct,
    Terminated,
)


@functools.cache
def compiled(declaration: Construct[Any, Any]) -> Construct[Any, Any]:
    """The compiled form of a module-level ``declaration`` (cached; same bytes both ways)."""
    try:
        result: Construct[Any, Any] = declaration.compile()
    except Exception:  # construct raises assorted errors for what it cannot compile
        return declaration
    return result


@functools.cache
def _fixed_size(declaration: Construct[Any, Any]) -> int | None:
    """The declaration's size when it does not depend on the data, else None.

    A Struct that ends in ``Terminated`` ("nothing may follow") has the size of the rest:
    construct's own sizeof() refuses it.
    """
    subcons = getattr(declaration, "subcons", None)
    parts = subcons[:-1] if subcons and subcons[-1] is Terminated else [declaration]
    try:
        return sum(int(part.sizeof()) for part in parts)
    except SizeofError:
        return None


def parse_fast(
    declaration: Construct[Any, Any], data: bytes, length: int | None = None
) -> Container[Any] | None:
    """``data`` parsed by the compiled form, or None when only the declaration may judge it.

    ``length`` is the whole message's length as its own length field gives it, for a
    declaration of variable size; a fixed-size declaration knows its own.
    """
    expected = _fixed_size(declaration) if length is None else length
    if expected is None or len(data) != expected:
        return None
    try:
        parsed: Container[Any] = compiled(declaration).parse(data)
    except Exception:  # refused: the declaration decides and explains
        return None
    return parsed


# --------------------------------------------------------------------------------------
# struct layouts: the fixed-size head of a declaration as one precompiled struct.Struct


class StructLayout:
    """The fixed-size fields at the head of a construct ``Struct``, as one ``struct.Struct``.

    The format is computed from the declaration's own fields, so the declaration stays the
    one source: integer fields (``Int32ub``, ``Int16ul``, ...) keep their format and byte
    order, ``Padding(n)`` becomes ``nx``, ``Bytes(n)`` ``ns``, ``Rebuild`` its field's
    format, nested ``Struct`` s are flattened (``"basic.seqnum"``), and the fields named in
    ``raw`` (a nested little-endian SETUP packet, a ``BitStruct`` byte) are carried as their
    bytes (``ns``) or, for one byte, as an int (``B``). The layout stops at ``stop`` (the
    name of the first variable-size field, e.g. ``abData``) or at ``Terminated``.

    ``unpack_from`` / ``pack`` are the ``struct.Struct`` methods themselves: the hot path
    pays for nothing else. :attr:`names` lists the values in order; the wire modules check
    it at import against the names they unpack into, and tests check that the layout and
    the declaration agree on every field, and refuse the same short or long inputs.

    Raises:
        TypeError: the declaration has a field this class cannot express (a ``Const``, a
            ``Switch``, an endianness change in the middle of the layout).
    """

    def __init__(
        self,
        declaration: Construct[Any, Any],
        *,
        raw: tuple[str, ...] = (),
        stop: str | None = None,
    ) -> None:
        codes: list[str] = []
        names: list[str] = []
        orders: set[str] = set()
        self._walk(declaration, "", raw, stop, codes, names, orders)
        if len(orders) > 1:
            raise TypeError(f"mixed byte orders in one layout: {sorted(orders)}")
        order = orders.pop() if orders else "<"
        self.format = order + "".join(codes)
        self.struct = struct.Struct(self.format)
        self.size = self.struct.size
        self.names = tuple(names)
        self.unpack_from = self.struct.unpack_from
        self.unpack = self.struct.unpack
        self.pack = self.struct.pack
        self.pack_into = self.struct.pack_into

    @classmethod
    def _walk(
        cls,
        con: Construct[Any, Any],
        prefix: str,
        raw: tuple[str, ...],
        stop: str | None,
        codes: list[str],
        names: list[str],
        orders: set[str],
    ) -> bool:
        """Append ``con``'s fields; False once ``stop`` or ``Terminated`` is reached."""
        for sub in getattr(con, "subcons", ()):
            name = getattr(sub, "name", None)
            if sub is Terminated or (name is not None and name == stop):
                return False
            inner = sub.subcon if isinstance(sub, Renamed) else sub
            full = f"{prefix}{name}" if name else ""
            if full in raw:
                size = int(inner.sizeof())
                codes.append("B" if size == 1 else f"{size}s")
                names.append(full)
                continue
            if isinstance(inner, Rebuild):
                inner = inner.subcon
            if isinstance(inner, Struct):
                if not cls._walk(inner, f"{full}.", raw, stop, codes, names, orders):
                    return False
            elif isinstance(inner, FormatField):
                order, code = inner.fmtstr[0], inner.fmtstr[1:]
                if struct.calcsize(code) > 1:  # a byte has no byte order
                    orders.add(order)
                codes.append(code)
                names.append(full)
            elif (
                isinstance(inner, Padded)
                and isinstance(inner.subcon, type(Pass))
                and isinstance(inner.length, int)
            ):
                codes.append(f"{inner.length}x")
            elif isinstance(inner, Bytes) and isinstance(inner.length, int):
                codes.append(f"{inner.length}s")
                names.append(full)
            else:
                raise TypeError(f"field {full or type(inner).__name__!r} has no struct format")
        return True
