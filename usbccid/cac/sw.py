"""ISO/IEC 7816-4 status words (SW1 SW2), as the card sends them.

The fixed words are an :class:`SW` ``IntEnum``, grouped by SW1 class as in ISO 7816-4
§5.6 (Table 5 and 6). The three parameterised families (61xx, 6Cxx, 63Cx) are built by
the constructor functions below, which return plain ``int`` status words.
"""

from __future__ import annotations

from enum import IntEnum


class SW(IntEnum):
    # 90 00: normal processing (ISO 7816-4 §5.6, Table 5).
    NO_ERROR = 0x9000

    # 63 xx: warning, non-volatile memory changed.
    VERIFY_FAILED = 0x6300  # no counter information; 63Cx carries one (see verify_failed)

    # 67 00 / 68 xx: checking errors in CLA.
    WRONG_LENGTH = 0x6700
    LOGICAL_CHANNEL_NOT_SUPPORTED = 0x6881
    SECURE_MESSAGING_NOT_SUPPORTED = 0x6882
    LAST_COMMAND_OF_CHAIN_EXPECTED = 0x6883
    COMMAND_CHAINING_NOT_SUPPORTED = 0x6884

    # 69 xx: command not allowed.
    COMMAND_NOT_ALLOWED = 0x6900
    SECURITY_STATUS_NOT_SATISFIED = 0x6982
    AUTH_METHOD_BLOCKED = 0x6983
    REFERENCE_DATA_NOT_USABLE = 0x6984
    CONDITIONS_NOT_SATISFIED = 0x6985

    # 6A xx / 6B 00: wrong parameters P1-P2 or data.
    WRONG_PARAMETERS = 0x6A00
    INCORRECT_DATA = 0x6A80
    FUNCTION_NOT_SUPPORTED = 0x6A81
    FILE_NOT_FOUND = 0x6A82
    INCORRECT_P1P2 = 0x6A86
    LC_INCONSISTENT_WITH_P1P2 = 0x6A87
    REFERENCED_DATA_NOT_FOUND = 0x6A88
    WRONG_P1P2 = 0x6B00

    # 6D 00 / 6E 00 / 6F 00.
    INS_NOT_SUPPORTED = 0x6D00
    CLA_NOT_SUPPORTED = 0x6E00
    NO_PRECISE_DIAGNOSIS = 0x6F00


def bytes_remaining(n: int) -> int:
    """61 xx: ``n`` response bytes are still available (ISO 7816-4 §5.3.4, GET RESPONSE).

    ``xx`` is ``n`` when it fits one byte; 256 or more is encoded as ``61 00``.
    """
    if n <= 0:
        raise ValueError("61xx needs at least one byte remaining")
    return 0x6100 | (n if n < 256 else 0)


def wrong_le(n: int) -> int:
    """6C xx: wrong Le; ``xx`` is the exact number of bytes available (ISO 7816-4 §5.6)."""
    if not 0 < n <= 256:
        raise ValueError("6Cxx encodes 1..256 bytes")
    return 0x6C00 | (n & 0xFF)


def verify_failed(tries_left: int) -> int:
    """63 Cx: verification failed, ``x`` further tries allowed (ISO 7816-4 §5.6, Table 6)."""
    if not 0 <= tries_left <= 15:
        raise ValueError("63Cx encodes 0..15 tries")
    return 0x63C0 | tries_left


def sw_bytes(sw: int) -> bytes:
    """The two trailer bytes SW1 SW2."""
    return sw.to_bytes(2, "big")
