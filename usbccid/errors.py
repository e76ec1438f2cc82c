"""The root of every error family in usbccid.

Each protocol layer has one error family (``usbccid.usbip.errors``,
``usbccid.ccid.errors``, ``usbccid.cac.errors``), and each error carries the answer it
becomes on the wire: a TCP close, a CCID bError, an ISO 7816 status word. The layer turns
it into that answer in exactly one place. Any other exception escaping a layer is a bug.
"""

from __future__ import annotations


class UsbccidError(Exception):
    """Base class of all usbccid errors; never raised directly."""
