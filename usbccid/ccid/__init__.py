"""The CCID class (USB CCID rev 1.1) behind the virtual device's endpoints, sans-IO.

Typical use::

    from usbccid.ccid import CcidReader, make_identity

    reader = CcidReader(slots=1, identity=make_identity("vmware"))
    reader.insert(0, card)          # any usbccid.card.Card
"""

from __future__ import annotations

from usbccid.ccid.cardjob import CardJob
from usbccid.ccid.descriptor import ReaderConfig
from usbccid.ccid.errors import CcidError, CommandStatus, IccStatus, SlotError
from usbccid.ccid.identity import PRESETS, make_identity
from usbccid.ccid.reader import CcidReader
from usbccid.ccid.slot import SlotState

__all__ = [
    "PRESETS",
    "CardJob",
    "CcidError",
    "CcidReader",
    "CommandStatus",
    "IccStatus",
    "ReaderConfig",
    "SlotError",
    "SlotState",
    "make_identity",
]
