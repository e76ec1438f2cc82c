"""usbccid: a virtual USB CCID smart-card reader with an emulated CAC card, over USB/IP."""

from __future__ import annotations

__version__ = "0.1.0"
