"""The front ends by name (a reader's ``frontend`` in the configuration).

Adding a front end: its package in ``usbccid/frontends/`` with a class following
:class:`usbccid.frontends.base.Frontend`, built from the whole :class:`Config`, and one
line in :data:`FRONTENDS`.
"""

from __future__ import annotations

from collections.abc import Callable

from usbccid.frontends.base import Frontend
from usbccid.frontends.usbip.frontend import UsbipFrontend
from usbccid.frontends.vpcd.frontend import VpcdFrontends
from usbccid.tool.config import Config

FRONTENDS: dict[str, Callable[[Config], Frontend]] = {
    "usbip": UsbipFrontend,
    "vpcd": VpcdFrontends,
}
