"""One VSCard connection, message by message, as QEMU 7.2's ccid-card-passthru drives it
(hw/usb/ccid-card-passthru.c ``ccid_card_vscard_handle_message``)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.frontends.vscard.helpers import GENERAL, OK, Host
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.client import (
    MAX_RESPONSE,
    Answered,
    CardInserted,
    CardRefused,
    CardRemoved,
    Closed,
    ReaderAdded,
    State,
)
from usbccid.frontends.vscard.errors import VscardProtocolError

ECHO = bytes.fromhex("8010000003010203")
R0 = wire.MINIMAL_READER_ID


def echo_answer() -> wire.Apdu:
    return wire.Apdu(b"\x01\x02\x03\x90\x00", R0)


def test_handshake_and_an_apdu() -> None:
    card = EchoCard()
    host = Host(card)
    out = host.handshake()
    assert out == [
        wire.Init(wire.VERSION, (0,), b"VSCD", wire.UNDEFINED_READER_ID),  # ours, first
        wire.ReaderRemove(R0),  # what a previous connection left (vscclient does this)
        wire.ReaderAdd(b"usbccid", wire.UNDEFINED_READER_ID),
        wire.Atr(DEFAULT_ATR, R0),  # = card inserted
    ]
    assert host.state() is State.INSERTED
    assert card.power_on_count == 1
    events = host.events()
    assert ReaderAdded(R0) in events
    assert CardInserted(DEFAULT_ATR) in events
    assert host.apdu(ECHO) == [echo_answer()]
    assert card.commands == [ECHO]
    status = host.client.status()
    assert status.card_inserted
    assert status.atr == DEFAULT_ATR
    assert status.host_version == "0.0.2"
    assert status.apdus == 1


def test_no_card_then_insert_remove_insert() -> None:
    host = Host()
    out = host.handshake()
    assert not [m for m in out if isinstance(m, wire.Atr)]
    assert host.state() is State.EMPTY
    card = EchoCard()
    host.client.insert(card)
    host.run_jobs()
    assert host.take() == [wire.Atr(DEFAULT_ATR, R0)]
    host.send(wire.Error(OK, R0))
    assert host.state() is State.INSERTED
    host.client.remove()
    assert host.take() == [wire.CardRemove(R0)]
    host.run_jobs()
    assert card.power_off_count == 1  # removed = powered off
    host.send(wire.Error(OK, R0))
    assert host.state() is State.EMPTY
    assert CardRemoved() in host.events()
    host.client.insert(card)
    host.run_jobs()
    assert host.take() == [wire.Atr(DEFAULT_ATR, R0)]
    assert card.power_on_count == 2  # a cold reset per insertion


def test_replacing_the_card_removes_the_old_one_first() -> None:
    old, new = EchoCard(), EchoCard(atr=bytes.fromhex("3B02") + b"ab")
    host = Host(old)
    host.handshake()
    host.client.insert(new)
    assert host.take() == [wire.CardRemove(R0)]
    host.send(wire.Error(OK, R0))  # QEMU: card removed
    host.run_jobs()
    assert host.take() == [wire.Atr(new.atr, R0)]
    host.send(wire.Error(OK, R0))
    assert host.apdu(ECHO) == [echo_answer()]
    assert new.commands == [ECHO]
    assert old.commands == []
    assert old.power_off_count == 1


def test_remove_while_the_atr_is_unanswered() -> None:
    """The ATR's answer arrives after our CardRemove: it is overtaken, not 'inserted'."""
    host = Host(EchoCard())
    host.take()
    host.send(wire.Init())
    host.take()
    host.send(wire.Error(OK, R0), wire.Error(OK, R0))
    host.run_jobs()
    assert host.take() == [wire.Atr(DEFAULT_ATR, R0)]
    host.client.remove()
    assert host.take() == [wire.CardRemove(R0)]
    host.send(wire.Error(OK, R0))  # for the ATR
    assert host.state() is State.REMOVING
    host.send(wire.Error(OK, R0))  # for the CardRemove
    assert host.state() is State.EMPTY


def test_refused_atr() -> None:
    host = Host(EchoCard())
    host.take()
    host.send(wire.Init())
    host.send(wire.Error(OK, R0), wire.Error(OK, R0))
    host.run_jobs()
    host.take()
    host.send(wire.Error(GENERAL, R0))  # check_atr failed
    assert host.state() is State.REFUSED
    assert any(isinstance(e, CardRefused) for e in host.events())
    # QEMU would not forward an APDU now; if something does, it gets an answer.
    assert host.apdu(ECHO) == [wire.Error(GENERAL, R0)]


@pytest.mark.parametrize("atr", [b"", b"\x3b", bytes([0x3B, 0x0F]) + bytes(39)])
def test_an_atr_qemu_cannot_take_is_not_sent(atr: bytes) -> None:
    host = Host(EchoCard(atr=atr))
    out = host.handshake()
    assert not [m for m in out if isinstance(m, wire.Atr)]
    assert host.state() is State.REFUSED


def test_forty_byte_atr_is_sent() -> None:
    atr = bytes([0x3B, 0x0F]) + bytes(38)
    host = Host(EchoCard(atr=atr))
    assert wire.Atr(atr, R0) in host.handshake()


def test_apdu_before_init_is_answered_with_error() -> None:
    """After a reconnect QEMU may still hold the old card and forward a guest APDU
    before it answers our Init: Error fails it at once (the guest does not hang)."""
    host = Host(EchoCard())
    host.take()
    host.send(wire.Apdu(ECHO, R0))
    assert host.take() == [wire.Error(GENERAL, R0)]
    assert host.state() is State.AWAIT_INIT
    host.send(wire.Init())
    assert host.take() == [wire.ReaderRemove(R0), wire.ReaderAdd(b"usbccid")]


def test_apdus_qemu_has_dropped_get_no_answer() -> None:
    """Sent before QEMU saw our CardRemove: it flushed that APDU already, and an Error
    with nothing pending would only mark the guest's next reply as failed."""
    card = EchoCard()
    host = Host(card)
    host.handshake()
    host.client.remove()
    host.take()
    assert host.apdu(ECHO) == []
    assert card.commands == []


def test_an_answer_for_a_removed_card_is_not_sent() -> None:
    card = EchoCard()
    host = Host(card)
    host.handshake()
    host.send(wire.Apdu(ECHO, R0))
    job = host.client.next_job()
    assert job is not None
    job.run()
    host.client.remove()
    job.finish()
    assert host.take() == [wire.CardRemove(R0)]


def test_queued_apdus_for_a_removed_card_never_reach_it() -> None:
    card = EchoCard()
    host = Host(card)
    host.handshake()
    host.send(wire.Apdu(ECHO, R0))
    host.client.remove()
    host.run_jobs()
    assert card.commands == []


def test_apdu_for_another_reader() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.send(wire.Apdu(ECHO, 5))
    assert host.take() == [wire.Error(GENERAL, 5)]
    assert any(isinstance(e, Answered) for e in host.events())
    assert host.apdu(ECHO) == [echo_answer()]  # the connection goes on


def test_answer_length_bound() -> None:
    host = Host(EchoCard())
    host.handshake()
    n = MAX_RESPONSE - 2
    ok = host.apdu(bytes([0x80, 0x12, n >> 8, n & 0xFF]))
    assert ok == [wire.Apdu(bytes(i & 0xFF for i in range(n)) + b"\x90\x00", R0)]
    n += 1
    assert host.apdu(bytes([0x80, 0x12, n >> 8, n & 0xFF])) == [wire.Error(GENERAL, R0)]
    assert host.client.status().errors == 1


def test_extended_command_apdu() -> None:
    """usb-ccid passes C-APDUs up to 64 KiB - 10; the card gets them whole."""
    card = EchoCard()
    host = Host(card, max_response=65536 + 2)
    host.handshake()
    data = bytes(range(256)) * 255
    apdu = b"\x80\x10\x00\x00\x00" + len(data).to_bytes(2, "big") + data
    assert host.apdu(apdu) == [wire.Apdu(data + b"\x90\x00", R0)]
    assert card.commands == [apdu]


@dataclass
class BrokenCard(EchoCard):
    def transmit(self, command: bytes) -> bytes:
        if command == b"\x00\x00\x00\x00":
            return b"\x90"  # no status word
        raise RuntimeError("card bug")


def test_card_failures_become_errors() -> None:
    host = Host(BrokenCard())
    host.handshake()
    assert host.apdu(ECHO) == [wire.Error(GENERAL, R0)]
    assert host.apdu(b"\x00\x00\x00\x00") == [wire.Error(GENERAL, R0)]
    assert host.state() is State.INSERTED


@dataclass
class NoPowerCard(EchoCard):
    def power_on(self) -> bytes:
        raise OSError("the reader is gone")


def test_power_on_failure() -> None:
    host = Host(NoPowerCard())
    host.handshake()
    assert host.state() is State.REFUSED
    assert any(isinstance(e, CardRefused) for e in host.events())


def test_flush_waits_for_the_pending_apdus() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.send(wire.Flush(R0))
    assert host.take() == [wire.FlushComplete(R0)]  # nothing pending: at once
    host.send(wire.Apdu(ECHO, R0), wire.Flush(R0))
    assert host.take() == []
    host.run_jobs()
    assert host.take() == [echo_answer(), wire.FlushComplete(R0)]


def test_second_init_is_ignored() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.send(wire.Init())
    assert host.take() == []
    assert host.state() is State.INSERTED


def test_crossed_inits() -> None:
    """QEMU with wait=on: its realize-time Init arrives, then its answer to ours."""
    host = Host(EchoCard())
    host.take()
    host.send(wire.Init(), wire.Init())
    assert host.take() == [wire.ReaderRemove(R0), wire.ReaderAdd(b"usbccid")]


def test_other_middle_and_minor_versions_are_accepted() -> None:
    host = Host()
    host.take()
    host.send(wire.Init(wire.make_version(0, 3, 9), (1, 2)))
    assert host.state() is State.ADDING_READER


@pytest.mark.parametrize(
    "message",
    [
        wire.Init(magic=b"VSCX"),
        wire.Init(magic=b"DCSV"),  # byte-swapped
        wire.Init(wire.make_version(1, 0, 0)),
        wire.Unknown(0x63, b"", R0),
        wire.ReaderAdd(b""),  # only clients send these
        wire.Atr(b"\x3b\x00"),
        wire.FlushComplete(),
        wire.Flush(),  # before Init
        wire.Error(OK, R0),  # before Init: answers nothing of ours
    ],
    ids=repr,
)
def test_fatal_before_init(message: wire.Message) -> None:
    host = Host(EchoCard())
    host.take()
    with pytest.raises(VscardProtocolError):
        host.send(message)
    assert host.take() == [wire.Error(GENERAL, message.reader_id)]  # the answer, then close
    assert host.client.should_close
    assert any(isinstance(e, Closed) for e in host.events())
    host.client.receive_data(b"more")  # ignored once closed
    assert host.take() == []


def test_unknown_type_after_init_is_fatal_too() -> None:
    host = Host(EchoCard())
    host.handshake()
    with pytest.raises(VscardProtocolError):
        host.send(wire.Unknown(42, b"x", R0))
    assert host.take() == [wire.Error(GENERAL, R0)]
    assert host.client.should_close


def test_absurd_length_is_refused_on_the_header() -> None:
    host = Host(EchoCard())
    host.handshake()
    with pytest.raises(VscardProtocolError):
        host.client.receive_data(bytes.fromhex("00000007 00000000 7fffffff") + b"x")
    assert host.client.buffered == 0
    assert host.take() == [wire.Error(GENERAL, R0)]


def test_too_many_pending_apdus() -> None:
    host = Host(EchoCard(), max_pending=4)
    host.handshake()
    host.send(*[wire.Apdu(ECHO, R0)] * 4)
    with pytest.raises(VscardProtocolError):
        host.send(wire.Apdu(ECHO, R0))
    assert host.client.should_close
    assert host.client.next_job() is None


def test_overtaken_or_unsolicited_errors_are_ignored() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.send(wire.Error(OK, R0), wire.Error(GENERAL, R0))
    assert host.take() == []
    assert host.state() is State.INSERTED


def test_reader_refused() -> None:
    host = Host(EchoCard())
    host.take()
    host.send(wire.Init())
    host.take()
    host.send(wire.Error(OK, R0), wire.Error(wire.ErrorCode.CANNOT_ADD_MORE_READERS, 0xFFFFFFFF))
    assert host.client.should_close
    assert host.take() == []  # nothing to answer: QEMU said no


def test_eof() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.client.receive_data(wire.encode(wire.Apdu(ECHO))[:7])
    host.client.receive_data(b"")
    assert host.client.should_close
    (closed,) = [e for e in host.events() if isinstance(e, Closed)]
    assert "middle of a message (7 bytes)" in closed.reason
    assert host.client.next_job() is None


def test_leave_removes_card_and_reader() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.client.leave()
    assert host.take() == [wire.CardRemove(R0), wire.ReaderRemove(R0)]
    assert host.client.should_close


def test_leave_without_card_or_before_init() -> None:
    host = Host()
    host.handshake()
    host.client.leave()
    assert host.take() == [wire.ReaderRemove(R0)]
    host = Host(EchoCard())
    host.take()
    host.client.leave()
    assert host.take() == []


def test_a_job_finishing_after_leave_is_ignored() -> None:
    host = Host(EchoCard())
    host.handshake()
    host.send(wire.Apdu(ECHO, R0))
    job = host.client.next_job()
    assert job is not None
    job.run()
    host.client.leave()
    host.take()
    job.finish()
    assert host.take() == []
    assert host.client.next_job() is None


def test_a_flood_of_small_messages_in_one_read_is_cut_off() -> None:
    """QEMU sends a few messages, then waits for our answer: thousands in one read are a
    peer keeping the loop busy (each would be parsed and answered)."""
    host = Host()  # no card: every APDU is answered with Error at once
    host.handshake()
    with pytest.raises(VscardProtocolError, match="more than 64 messages at once"):
        host.send(*[wire.Apdu(ECHO, R0)] * 1000)
    assert host.client.should_close
    assert len(host.take()) == 64 + 1  # 64 answered, then the Error that closes
