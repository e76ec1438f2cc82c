"""The package's layering, checked on the source: no arrow runs back up.

Protocol layers (usbip, ccid, cac, piv) are sans-IO and know nothing of the program around
them; card sources know no front end and front ends no card source; only ``usbccid.tool``
(and the public ``usbccid.testing``) knows them all (docs/architecture.md).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "usbccid"

#: package -> the usbccid packages it must never import
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "usbip": ("ccid", "cac", "piv", "cards", "frontends", "tool", "host", "testing"),
    "ccid": ("cac", "piv", "cards", "frontends", "tool", "host", "testing"),
    "cac": ("usbip", "ccid", "piv", "cards", "frontends", "tool", "host", "testing"),
    "piv": ("usbip", "ccid", "cards", "frontends", "tool", "host", "testing"),
    "cards": ("frontends", "host", "testing", "tool.app", "tool.cli", "tool.config"),
    "frontends": ("cards", "host", "testing", "tool.app", "tool.cli"),
    "host": ("usbip", "ccid", "cac", "piv", "cards", "frontends", "tool", "testing"),
}
#: sans-IO: the protocol layers touch no I/O, threads or clock
SANS_IO = ("usbip", "ccid", "cac", "piv")
IO_MODULES = ("asyncio", "socket", "threading", "time", "selectors", "subprocess")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def modules(package: str) -> list[Path]:
    found = sorted((PACKAGE / package).rglob("*.py"))
    assert found, package
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_runs_back_up(package: str) -> None:
    bad = []
    for path in modules(package):
        for name in imports(path):
            for other in FORBIDDEN[package]:
                target = f"usbccid.{other}"
                if name == target or name.startswith(target + "."):
                    bad.append(f"{path.relative_to(PACKAGE)} imports {name}")
    assert not bad, bad


@pytest.mark.parametrize("package", SANS_IO)
def test_protocol_layers_are_sans_io(package: str) -> None:
    bad = [
        f"{path.relative_to(PACKAGE)} imports {name}"
        for path in modules(package)
        for name in imports(path)
        if name.split(".")[0] in IO_MODULES
    ]
    assert not bad, bad


def test_the_checker_sees_imports() -> None:
    # the check itself: a module known to import across layers is seen doing so
    assert "usbccid.cards.registry.load_card" in imports(PACKAGE / "tool" / "app.py")
