"""The card's one error family: every failure carries the status word it becomes.

Applets *return* response data for success and *raise* :class:`CardError` for anything
else. The card OS (:mod:`usbccid.cac.card`) is the single place where a ``CardError``
becomes a response APDU. Messages never contain PINs, keys or other secrets.
"""

from __future__ import annotations

from usbccid.cac.sw import SW
from usbccid.errors import UsbccidError


class CardError(UsbccidError):
    """A command failed; ``sw`` is the ISO 7816-4 status word the host receives."""

    def __init__(self, sw: int, detail: str = "") -> None:
        self.sw = int(sw)
        super().__init__(f"SW {self.sw:04X}" + (f": {detail}" if detail else ""))


class ApduFormatError(CardError):
    """The command APDU is malformed (ISO 7816-4 §5.1): answered with 67 00 by default."""

    def __init__(self, detail: str = "", sw: int = SW.WRONG_LENGTH) -> None:
        super().__init__(sw, detail)
