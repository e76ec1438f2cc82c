"""The CCID layer's error family; each error carries its wire answer.

A :class:`CcidError` is the host's fault or the slot's condition, never a bug: it becomes
an RDR_to_PC reply with bmCommandStatus = 1 (failed) and the error's ``bError`` (CCID Rev
1.1 §6.2.6, "Slot error register"). The conversion happens in exactly one place,
``CcidReader._dispatch`` in ``usbccid/ccid/reader.py``; no CcidError leaves the layer.
"""

from __future__ import annotations

import enum

from usbccid.errors import UsbccidError


class IccStatus(enum.IntEnum):
    """bmICCStatus, bits 1..0 of bStatus (CCID Rev 1.1 §6.2.6)."""

    ACTIVE = 0  # an ICC is present and active (powered and selected)
    INACTIVE = 1  # an ICC is present and inactive (not activated or shut down by hardware)
    ABSENT = 2  # no ICC is present


class CommandStatus(enum.IntEnum):
    """bmCommandStatus, bits 7..6 of bStatus (CCID Rev 1.1 §6.2.6)."""

    OK = 0  # processed without error
    FAILED = 1  # failed; bError holds the error code
    TIME_EXTENSION = 2  # time extension requested; bError holds the BWT multiplier


class SlotError(enum.IntEnum):
    """bError values (CCID Rev 1.1 §6.2.6, Table 6.2-2).

    0x01..0x7F are not codes but the *offset of the offending field* in the command
    message (bMessageType is offset 0); the ones this reader uses are named here.
    """

    CMD_NOT_SUPPORTED = 0x00
    BAD_LENGTH = 0x01  # offset of dwLength
    BAD_SLOT = 0x05  # offset of bSlot: slot does not exist
    BAD_PARAMETER_7 = 0x07  # offset 7: bPowerSelect / bProtocolNum / bBWI ...
    BAD_PARAMETER_8 = 0x08  # offset 8: low byte of wLevelParameter
    CMD_SLOT_BUSY = 0xE0
    PIN_CANCELLED = 0xEF
    PIN_TIMEOUT = 0xF0
    BUSY_WITH_AUTO_SEQUENCE = 0xF2
    DEACTIVATED_PROTOCOL = 0xF3
    PROCEDURE_BYTE_CONFLICT = 0xF4
    ICC_CLASS_NOT_SUPPORTED = 0xF5
    ICC_PROTOCOL_NOT_SUPPORTED = 0xF6
    BAD_ATR_TCK = 0xF7
    BAD_ATR_TS = 0xF8
    HW_ERROR = 0xFB
    XFR_OVERRUN = 0xFC
    XFR_PARITY_ERROR = 0xFD
    ICC_MUTE = 0xFE
    CMD_ABORTED = 0xFF


class CcidError(UsbccidError):
    """A command fails. Wire answer: the command's reply type, bmCommandStatus = FAILED.

    Args:
        error: the bError to report (a :class:`SlotError` or a field offset 0x01..0x7F).
        icc_status: bmICCStatus to report; None means "the slot's current status".
        message: for logs only.
    """

    def __init__(
        self, error: int, message: str = "", *, icc_status: IccStatus | None = None
    ) -> None:
        super().__init__(message or f"CCID command failed, bError 0x{error:02X}")
        self.error = error
        self.icc_status = icc_status
