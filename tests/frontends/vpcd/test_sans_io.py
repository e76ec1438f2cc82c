"""The vpcd front end's protocol modules are sans-IO, as the protocol layers are
(docs/architecture.md); only shell.py and keepalive.py touch sockets, threads, ctypes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_layout import IO_MODULES, imports

PACKAGE = Path(__file__).resolve().parents[3] / "usbccid" / "frontends" / "vpcd"


@pytest.mark.parametrize("module", ["wire.py", "protocol.py", "errors.py"])
def test_protocol_modules_are_sans_io(module: str) -> None:
    names = imports(PACKAGE / module)
    bad = [name for name in names if name.split(".")[0] in (*IO_MODULES, "ctypes")]
    assert not bad, bad
    assert not [name for name in names if name.startswith("usbccid.frontends.vpcd.shell")]


def test_the_check_sees_the_shells_imports() -> None:
    assert "asyncio" in imports(PACKAGE / "shell.py")
