"""The vpcd front end: a usbccid card in vsmartcard's virtual reader (pcscd driver).

vpcd (Debian: ``vsmartcard-vpcd``) is a pcscd reader driver that listens on TCP for a
virtual card; this front end is that card, as ``virt_cacard`` is for libcacard. pcscd
then sees our card with no kernel module and no root.

* :mod:`.wire`: the framing (construct) and the messages (frozen dataclasses);
* :mod:`.protocol`: one connection, sans-IO, with its state table;
* :mod:`.shell`: the asyncio shell that connects, reconnects and runs card work;
* :mod:`.errors`: the error family (every error closes the connection).
"""

from usbccid.frontends.vpcd.errors import VpcdCardError, VpcdError, VpcdProtocolError
from usbccid.frontends.vpcd.protocol import State, VpcdConnection
from usbccid.frontends.vpcd.shell import VpcdFrontend, VpcdStatus
from usbccid.frontends.vpcd.wire import VPCD_PORT

__all__ = [
    "VPCD_PORT",
    "State",
    "VpcdCardError",
    "VpcdConnection",
    "VpcdError",
    "VpcdFrontend",
    "VpcdProtocolError",
    "VpcdStatus",
]
