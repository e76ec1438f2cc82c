"""A whole pcscd + libccid 1.5.2 session, URB by URB, with the buffer sizes libccid uses.

ccid_open_hack_pre: InterruptRead(100 ms, 8 bytes); IFDHICCPresence -> CmdGetSlotStatus
(10-byte read); IFDHPolling -> InterruptRead (8 bytes, parked for minutes, then unlinked);
IFDHPowerICC -> CmdPowerOn (bPowerSelect 0 with automatic voltage, 10 + MAX_ATR_SIZE =
43-byte read); IFDHSetProtocolParameters -> nothing (dwFeatures 0x40); IFDHTransmitToICC ->
XfrBlock (10 + CMD_BUF_SIZE read); power-off after 5 s idle -> CmdPowerOff (10-byte read).
"""

from __future__ import annotations

from tests.ccid.helpers import BULK_IN, BULK_OUT, INTERRUPT_IN, LIBCCID_READ, Seq, drive
from usbccid.ccid import CcidReader, make_identity
from usbccid.ccid.errors import CommandStatus, IccStatus
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.ccid.wire import (
    DataBlock,
    Escape,
    EscapeReply,
    GetSlotStatus,
    IccPowerOff,
    IccPowerOn,
    SlotStatus,
    XfrBlock,
    build_command,
    parse_reply,
)

POWER_ON_READ = 10 + 33
SLOT_STATUS_READ = 10


class Host:
    def __init__(self, reader: CcidReader) -> None:
        self.reader = reader
        self.seq = Seq()

    def command(self, make: type, *args: object, read: int = LIBCCID_READ, **kw: object) -> object:
        seq = self.seq()
        self.reader.bulk_out(BULK_OUT, build_command(make(0, seq, *args, **kw)))
        drive(self.reader)
        data = self.reader.poll_in(BULK_IN, read)
        assert data is not None
        assert len(data) <= read
        reply = parse_reply(data)
        assert reply.seq == seq  # ReadUSB would skip it otherwise
        return reply


def test_pcscd_session() -> None:
    card = EchoCard()
    reader = CcidReader(slots=1, identity=make_identity("gemalto-433"))
    reader.reset()  # SET_CONFIGURATION during enumeration
    host = Host(reader)
    # open: drain the interrupt pipe; nothing is pending without a card (URB unlinked)
    assert reader.poll_in(INTERRUPT_IN, 8) is None
    # Gemalto VID: ccid_open_hack_post set_gemalto_firmware_features -> Escape 6A
    reply = host.command(Escape, b"\x6a", read=10 + 16)
    assert isinstance(reply, EscapeReply)
    assert reply.command_status is CommandStatus.FAILED  # "not supported": libccid goes on
    # the event thread: presence, then a long interrupt read
    for _ in range(3):
        reply = host.command(GetSlotStatus, read=SLOT_STATUS_READ)
        assert reply == SlotStatus(0, host.seq.history[-1], IccStatus.ABSENT)
        assert reader.poll_in(INTERRUPT_IN, 8) is None
    # a card goes in: the parked interrupt URB completes
    reader.insert(0, card)
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x03"
    reply = host.command(GetSlotStatus, read=SLOT_STATUS_READ)
    assert isinstance(reply, SlotStatus)
    assert reply.icc_status is IccStatus.INACTIVE
    reply = host.command(IccPowerOn, 0, read=POWER_ON_READ)
    assert reply == DataBlock(0, host.seq.history[-1], IccStatus.ACTIVE, data=DEFAULT_ATR)
    reply = host.command(XfrBlock, bytes.fromhex("00A4040003A00000"))
    assert isinstance(reply, DataBlock)
    assert reply.data == b"\x90\x00"
    reply = host.command(GetSlotStatus, read=SLOT_STATUS_READ)
    assert isinstance(reply, SlotStatus)
    assert reply.icc_status is IccStatus.ACTIVE
    # 5 s idle: power off; then SCardConnect powers on again (a cold reset)
    reply = host.command(IccPowerOff, read=SLOT_STATUS_READ)
    assert reply == SlotStatus(0, host.seq.history[-1], IccStatus.INACTIVE)
    host.command(IccPowerOn, 0, read=POWER_ON_READ)
    assert card.power_on_count == 2
    assert card.power_off_count == 1
    # the card is pulled
    reader.remove(0)
    assert reader.poll_in(INTERRUPT_IN, 8) == b"\x50\x02"
    reply = host.command(GetSlotStatus, read=SLOT_STATUS_READ)
    assert isinstance(reply, SlotStatus)
    assert reply.icc_status is IccStatus.ABSENT
    # libccid keeps one counter for bSeq, wrapping at 256
    for _ in range(260):
        host.command(GetSlotStatus, read=SLOT_STATUS_READ)
    assert reader.poll_in(BULK_IN, LIBCCID_READ) is None
