"""The vpcd front end's error family; each error carries its wire answer.

The vpcd protocol has exactly one answer to trouble: closing the TCP connection. vpcd
(vsmartcard ``virtualsmartcard/src/vpcd/vpcd.c``) has no error message; when a read or a
write on the card's socket fails, or returns nothing, it calls ``vicc_eject()`` and its
next presence poll reports the card as absent (``ifd-vpcd.c`` ``IFDHICCPresence``). So
every :class:`VpcdError` becomes a close, and pcscd sees the card leave. The conversion
happens in exactly one place, :meth:`VpcdConnection._closing_on_error
<usbccid.frontends.vpcd.protocol.VpcdConnection._closing_on_error>`; no VpcdError leaves
the layer.
"""

from __future__ import annotations

from usbccid.errors import UsbccidError


class VpcdError(UsbccidError):
    """Base of the vpcd front end's errors. Wire answer: close the connection to vpcd."""


class VpcdProtocolError(VpcdError):
    """vpcd (or whatever is listening on its port) broke the protocol: an unknown control
    byte, or more unread bytes than a working vpcd can ever have in flight."""


class VpcdCardError(VpcdError):
    """The card failed: it raised, or answered with something vpcd cannot be given (an
    empty response, which vpcd reads as "card removed", or one longer than a frame)."""
