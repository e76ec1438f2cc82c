"""The USB/IP layer's error family; each error carries its wire answer."""

from __future__ import annotations

import errno

from usbccid.errors import UsbccidError


class UsbipError(UsbccidError):
    """Base of the USB/IP layer's errors."""


class UsbipRemoteError(UsbipError):
    """The peer broke the USB/IP protocol. Wire answer: close that TCP connection."""


class UrbError(UsbipError):
    """One URB fails. Wire answer: RET_SUBMIT with ``status`` (a negative Linux errno)."""

    def __init__(self, status: int, message: str = "") -> None:
        super().__init__(message or f"URB failed with status {status}")
        self.status = status


class Stall(UrbError):  # noqa: N818 (named after the USB handshake)
    """The endpoint (or the control pipe) answers STALL: RET_SUBMIT status -EPIPE."""

    def __init__(self, message: str = "stall") -> None:
        super().__init__(-errno.EPIPE, message)


class UsbipLocalError(UsbipError):
    """We tried to emit something illegal (a field out of range, more IN data than the URB
    asked for). Always a bug of ours; the shell logs it and closes the connection."""
