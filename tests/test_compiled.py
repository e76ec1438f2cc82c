"""The compiled forms of our construct declarations agree with the declarations.

usbccid.compiled hands well-formed, length-checked data to construct's compiled code; the
declarations stay the reference. For every module-level declaration of the USB/IP and
CCID wire modules: whatever the compiled form accepts, the declaration accepts too, with
the same result, and both build the same bytes from it; and data of the wrong length never
reaches the compiled form (construct 2.10's compiled reads do not check for truncation).
"""

from __future__ import annotations

from typing import Any

import pytest
from construct import Construct, ConstructError
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.ccid import wire as ccid_wire
from usbccid.compiled import _fixed_size, compiled, parse_fast
from usbccid.usbip import wire as usbip_wire


def declarations() -> list[tuple[str, Construct[Any, Any]]]:
    found = []
    for module in (usbip_wire, ccid_wire):
        for name, value in vars(module).items():
            if isinstance(value, Construct):
                found.append((f"{module.__name__}.{name}", value))
    return found


DECLARATIONS = declarations()
FIXED = [(name, d) for name, d in DECLARATIONS if _fixed_size(d) is not None]
VARIABLE = [ccid_wire.PC_TO_RDR, ccid_wire.RDR_TO_PC]  # 10 + dwLength bytes


def test_the_hot_declarations_do_compile() -> None:
    hot = [
        usbip_wire._HEADER_BASIC,
        *usbip_wire._URB_HEADERS.values(),
        ccid_wire.PC_TO_RDR,
        ccid_wire.RDR_TO_PC,
    ]
    for declaration in hot:
        assert compiled(declaration) is not declaration


@pytest.mark.parametrize(("name", "declaration"), FIXED, ids=[n for n, _ in FIXED])
@settings(max_examples=60, deadline=None)  # the first example compiles the declaration
@given(data=st.data())
def test_fixed_size_compiled_parse_agrees(
    name: str, declaration: Construct[Any, Any], data: st.DataObject
) -> None:
    size = _fixed_size(declaration)
    assert size is not None
    raw = data.draw(st.binary(min_size=size, max_size=size))
    fast = parse_fast(declaration, raw)
    if fast is None:
        return  # refused: the declaration decides (and explains)
    assert declaration.parse(raw) == fast
    assert compiled(declaration).build(fast) == declaration.build(fast)


@pytest.mark.parametrize("declaration", VARIABLE, ids=["PC_TO_RDR", "RDR_TO_PC"])
@settings(max_examples=200, deadline=None)
@given(
    head=st.binary(min_size=1, max_size=1),
    tail=st.binary(min_size=5, max_size=5),  # bSlot, bSeq and three specific bytes
    body=st.binary(max_size=40),
    claimed=st.integers(0, 48),
)
def test_variable_size_compiled_parse_agrees(
    declaration: Construct[Any, Any], head: bytes, tail: bytes, body: bytes, claimed: int
) -> None:
    raw = head + claimed.to_bytes(4, "little") + tail + body
    fast = parse_fast(declaration, raw, 10 + claimed)
    if claimed != len(body):
        assert fast is None  # truncated or too long: never the compiled form
        with pytest.raises(ConstructError):
            declaration.parse(raw)
        return
    if fast is not None:
        assert declaration.parse(raw) == fast
        assert compiled(declaration).build(fast) == declaration.build(fast)


def test_truncated_data_never_reaches_the_compiled_form() -> None:
    header = usbip_wire._URB_HEADERS[usbip_wire.UrbCommand.CMD_SUBMIT]
    assert parse_fast(header, bytes(47)) is None
    assert parse_fast(header, bytes(49)) is None
    assert parse_fast(header, (1).to_bytes(4, "big") + bytes(44)) is not None
