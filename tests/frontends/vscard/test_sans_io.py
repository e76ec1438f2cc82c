"""The VSCard front end's protocol modules are sans-IO, as the protocol layers are
(docs/architecture.md): only server.py (the asyncio shell) touches sockets and threads."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_layout import IO_MODULES, imports

PACKAGE = Path(__file__).resolve().parents[3] / "usbccid" / "frontends" / "vscard"


@pytest.mark.parametrize("module", ["wire.py", "client.py", "errors.py"])
def test_protocol_modules_are_sans_io(module: str) -> None:
    names = imports(PACKAGE / module)
    bad = [name for name in names if name.split(".")[0] in IO_MODULES]
    assert not bad, bad
    assert not [
        n for n in names if n.startswith(("usbccid.frontends.vscard.server", "usbccid.tool"))
    ]


def test_the_check_sees_the_shells_imports() -> None:
    assert "asyncio" in imports(PACKAGE / "server.py")
