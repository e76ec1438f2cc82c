"""The VSCard layer's error family; each error carries its wire answer.

VSCard (libcacard ``vscard_common.h``) has one way to say "no": a ``VSC_Error`` message
with a code. Where the message that failed is a guest APDU, QEMU's ccid-card-passthru
turns our ``VSC_Error`` into a failed XfrBlock for the guest (ccid-card-passthru.c
``VSC_Error`` -> ``ccid_card_card_error``), so the guest gets an answer instead of
waiting forever. Anything worse (a peer that is not a VSCard host, a length we will not
buffer) ends the connection.

The conversion happens in one place, ``VscardClient._answer`` in ``client.py``.
"""

from __future__ import annotations

import enum
from typing import Final

from usbccid.errors import UsbccidError

UNDEFINED_READER_ID: Final = 0xFFFFFFFF
"""``VSCARD_UNDEFINED_READER_ID`` (vscard_common.h): no reader (yet)."""


class ErrorCode(enum.IntEnum):
    """``VSCErrorCode`` (vscard_common.h), the payload of ``VSC_Error``."""

    SUCCESS = 0
    GENERAL_ERROR = 1
    CANNOT_ADD_MORE_READERS = 2
    CARD_ALREADY_INSERTED = 3  # VSC_CARD_ALREAY_INSERTED (sic)


class VscardError(UsbccidError):
    """Base of the VSCard layer's errors.

    Attributes:
        code: the ``VSC_Error`` code sent to the peer, or None to send nothing.
        reader_id: the reader id that ``VSC_Error`` carries.
        close: True when the connection ends after the answer.
    """

    close = False

    def __init__(
        self,
        message: str,
        *,
        code: ErrorCode | None = ErrorCode.GENERAL_ERROR,
        reader_id: int = UNDEFINED_READER_ID,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reader_id = reader_id


class VscardMessageError(VscardError):
    """One message is refused (an APDU with no card, for a reader that is not ours, an
    answer too long for QEMU). Wire answer: ``VSC_Error(code)``; the connection goes on."""


class VscardProtocolError(VscardError):
    """The peer broke the protocol (garbage, a wrong magic or major version, a length
    over the bound, a message type a host never sends, a peer that never reads).
    Wire answer: ``VSC_Error(GENERAL_ERROR)`` (when ``code`` is set), then close."""

    close = True


class VscardLocalError(VscardError):
    """We tried something the protocol does not allow: always a bug of ours. Wire answer:
    close, with nothing sent."""

    close = True

    def __init__(self, message: str) -> None:
        super().__init__(message, code=None)
