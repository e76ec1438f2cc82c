"""Extended APDU level chaining of one slot (CCID Rev 1.1 §6.1.4 Table 6.1-4, §6.2.1).

At extended APDU level an XfrBlock's wLevelParameter says whether its abData is a whole
command APDU or a part of one, and a DataBlock's bChainParameter whether its abData is
a whole response or a part. This is what libccid 1.5.2 commands.c
CmdXfrBlockAPDU_extended does: after each command block but the last it reads an empty
DataBlock (bChainParameter 10h); while a response DataBlock has bChainParameter
01h/03h/10h it sends an empty XfrBlock with wLevelParameter 0010h and reads the next
block. Sans-IO like the rest of the reader: bytes in, the next step out.
"""

from __future__ import annotations

from dataclasses import dataclass

from usbccid.ccid.errors import CcidError, SlotError

# XfrBlock wLevelParameter (§6.1.4 Table 6.1-4) and DataBlock bChainParameter (§6.2.1).
CHAIN_BEGIN_AND_END = 0x00
CHAIN_BEGIN = 0x01
CHAIN_END = 0x02
CHAIN_CONTINUE = 0x03
CHAIN_EMPTY = 0x10  # empty abData: "send me the next block" / "go on with the command"

# The longest command APDU (ISO/IEC 7816-3 §12.1.3 case 4E: 4 + 3 + 65535 + 3) a chained
# XfrBlock may assemble; libccid's own limit is CMD_BUF_SIZE = 65546 (defs.h).
MAX_CHAINED_APDU = 4 + 3 + 65535 + 3


@dataclass(frozen=True, slots=True)
class ResponseBlock:
    """One DataBlock's abData and bChainParameter."""

    data: bytes
    chain: int


#: §6.2.1 bChainParameter 10h with empty abData: "continuation of the command APDU is
#: expected in next PC_to_RDR_XfrBlock command".
COMMAND_BLOCK_ACK = ResponseBlock(b"", CHAIN_EMPTY)


class ApduChain:
    """The chains in progress in one slot: a command being assembled, a response being
    sent. ``block_size`` is the longest abData of a DataBlock (dwMaxCCIDMessageLength -
    10)."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._command: bytearray | None = None
        self._response_rest: bytes | None = None

    def reset(self) -> None:
        """Forget both chains (power off, a new command, an abort)."""
        self._command = None
        self._response_rest = None

    def command(self, level: int, data: bytes) -> bytes | ResponseBlock:
        """An XfrBlock's wLevelParameter and abData: the whole command APDU to send to the
        card now, or the block to answer with.

        Raises:
            CcidError: a chain that does not follow Table 6.1-4.
        """
        if level == CHAIN_BEGIN_AND_END:
            self.reset()
            return data
        if level == CHAIN_BEGIN:
            self._response_rest = None
            self._command = bytearray(data)
            return COMMAND_BLOCK_ACK
        if level in (CHAIN_CONTINUE, CHAIN_END):
            if self._command is None:
                raise CcidError(SlotError.BAD_PARAMETER_8, "no command chain to continue")
            self._command += data
            if len(self._command) > MAX_CHAINED_APDU:
                self._command = None
                raise CcidError(SlotError.BAD_LENGTH, "chained APDU too long")
            if level == CHAIN_CONTINUE:
                return COMMAND_BLOCK_ACK
            apdu, self._command = bytes(self._command), None
            return apdu
        if level == CHAIN_EMPTY:
            if self._response_rest is None:
                raise CcidError(SlotError.BAD_PARAMETER_8, "no response chain to continue")
            if data:
                raise CcidError(SlotError.BAD_LENGTH, "wLevelParameter 0010h with data")
            return self._next_block(self._response_rest, first=False)
        raise CcidError(SlotError.BAD_PARAMETER_8, f"wLevelParameter 0x{level:04X}")

    def respond(self, response: bytes) -> ResponseBlock:
        """The first DataBlock of the card's response; the rest waits for 0010h blocks."""
        return self._next_block(response, first=True)

    def _next_block(self, response: bytes, *, first: bool) -> ResponseBlock:
        block, rest = response[: self.block_size], response[self.block_size :]
        self._response_rest = rest or None
        if first:
            return ResponseBlock(block, CHAIN_BEGIN if rest else CHAIN_BEGIN_AND_END)
        return ResponseBlock(block, CHAIN_CONTINUE if rest else CHAIN_END)
