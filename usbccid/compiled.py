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
from typing import Any

from construct import Construct, Container, SizeofError, Terminated


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
