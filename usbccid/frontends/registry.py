"""The front ends by name (a reader's ``frontend`` in the configuration).

Adding a front end: its package in ``usbccid/frontends/`` with a class following
:class:`usbccid.frontends.base.Frontend`, built from the whole :class:`Config`, and one
line in :data:`FRONTENDS`.

A front end's package is imported the first time a reader uses it: a server of USB/IP
readers never loads the vpcd or VSCard code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Protocol

from usbccid.frontends.base import Frontend
from usbccid.tool.config import Config

#: each front end's name and where its class is: (module, class name)
FRONTENDS: Mapping[str, tuple[str, str]] = {
    "usbip": ("usbccid.frontends.usbip.frontend", "UsbipFrontend"),
    "vpcd": ("usbccid.frontends.vpcd.frontend", "VpcdFrontends"),
    "vscard": ("usbccid.frontends.vscard.frontend", "VscardFrontend"),
}


class FrontendClass(Protocol):
    """A front end's class: built from the whole configuration."""

    hot_plug: bool  # :attr:`usbccid.frontends.base.Frontend.hot_plug`

    def __call__(self, config: Config) -> Frontend: ...


def frontend_class(name: str) -> FrontendClass:
    """The class of front end ``name`` (its module imported now if it was not yet).

    Raises:
        KeyError: no such front end.
    """
    module, attribute = FRONTENDS[name]
    cls: FrontendClass = getattr(importlib.import_module(module), attribute)
    return cls
