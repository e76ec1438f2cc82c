"""Multi-slot readers repeat a NotifySlotChange until the host asks the slot's status.

Found with the real stack (tests/vm/test_pcscd.py): libccid 1.5.2 hands each notification
of a multi-slot reader to the slots' pcscd threads with one pthread_cond_broadcast
(ccid_usb.c Multi_PollingProc / Multi_InterruptRead). A slot thread that is not waiting at
that moment -- still busy with the GetSlotStatus it sent just before the change -- never
sees it, and pcscd reported the card removal 5 s late (its grace-period timeout) and the
next insertion not within 30 s. Reproduced in the guest by holding one GetSlotStatus reply
while the card is pulled: 5.75 s for the two-slot reader, 0.33 s for a one-slot reader.
"""

from __future__ import annotations

from tests.ccid.helpers import INTERRUPT_IN, INTERRUPT_READ, exchange, read_reply, send
from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.errors import IccStatus
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import GetSlotStatus, SlotStatus

#: These tests are about the repeats; the hold-off before each notification (which shifts
#: every timer) has its own tests in tests/ccid/test_notify_holdoff.py.
NO_HOLDOFF = ReaderConfig(notify_holdoff=0)


def notification(reader: CcidReader) -> bytes | None:
    return reader.poll_in(INTERRUPT_IN, INTERRUPT_READ)


def settled_two_slot_reader() -> CcidReader:
    """A two-slot reader (card in slot 0) whose initial notification the host has seen."""
    reader = CcidReader([EchoCard(), None], config=NO_HOLDOFF)
    assert notification(reader) == b"\x50\x03"
    assert reader.next_job(0.0) is None  # the driver's call after every event: arms
    assert reader.get_timer() == 0.25
    exchange(reader, GetSlotStatus(0, 0), now=0.1)
    assert reader.get_timer() is None
    return reader


def test_two_slot_reader_notifies_again_until_the_slot_status_is_asked() -> None:
    reader = settled_two_slot_reader()
    card = EchoCard()
    reader.insert(1, card)
    # bmSlotICCState: slot 0 present (bit 0), slot 1 present and changed (bits 2, 3)
    assert notification(reader) == b"\x50\x0d"
    assert reader.next_job(10.0) is None
    assert reader.get_timer() == 10.25
    reader.handle_timer(10.2)
    assert notification(reader) is None
    reader.handle_timer(10.25)  # nobody asked slot 1: say it again
    assert notification(reader) == b"\x50\x0d"
    assert notification(reader) is None
    assert reader.next_job(10.3) is None
    assert reader.get_timer() == 10.8  # backing off: 0.5 s
    # pcscd's slot thread wakes up and asks: the change is delivered
    send(reader, GetSlotStatus(1, 1))
    assert reader.get_timer() is None
    assert read_reply(reader) == SlotStatus(1, 1, IccStatus.INACTIVE)
    reader.handle_timer(20.0)
    assert notification(reader) is None

    # Pulled again: the count starts over.
    assert reader.remove(1) is card
    assert notification(reader) == b"\x50\x09"
    reader.handle_timer(30.0)  # arms
    assert reader.get_timer() == 30.25


def test_a_status_asked_before_the_change_does_not_count() -> None:
    # The race libccid loses: its slot thread asked GetSlotStatus, the card moved, the
    # notification came while the thread was still reading the (old) status.
    reader = settled_two_slot_reader()
    reader.insert(1, EchoCard())
    assert notification(reader) == b"\x50\x0d"
    exchange(reader, GetSlotStatus(1, 1), now=1.0)
    assert reader.get_timer() is None
    reader.remove(1)
    assert notification(reader) == b"\x50\x09"
    assert reader.next_job(2.0) is None
    reader.handle_timer(2.25)
    assert notification(reader) == b"\x50\x09"


def test_renotify_backs_off_then_gives_up() -> None:
    reader = CcidReader([None, None], config=ReaderConfig(renotify_limit=5, notify_holdoff=0))
    reader.insert(0, EchoCard())
    sent = [notification(reader)]
    now = 0.0
    delays = []
    while True:
        reader.next_job(now)
        when = reader.get_timer()
        if when is None:
            break
        delays.append(when - now)
        now = when
        reader.handle_timer(now)
        sent.append(notification(reader))
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0, 2.0]
    assert sent == [b"\x50\x03"] * 6 + [None]  # the change, 5 repeats, then silence
    assert notification(reader) is None


def test_one_slot_reader_notifies_once() -> None:
    # libccid's one-slot InterruptRead submits its own URB each time its thread waits, so
    # a notification waits for it: nothing to repeat.
    reader = CcidReader([EchoCard()])
    assert notification(reader) == b"\x50\x03"
    assert reader.next_job(0.0) is None
    assert reader.get_timer() is None
    reader.handle_timer(100.0)
    assert notification(reader) is None


def test_reset_forgets_pending_repeats() -> None:
    reader = CcidReader([EchoCard(), EchoCard()], config=NO_HOLDOFF)
    assert notification(reader) == b"\x50\x0f"
    reader.next_job(0.0)
    assert reader.get_timer() == 0.25
    reader.reset()  # a new import: the initial notification again, nothing pending
    assert reader.get_timer() is None
    assert notification(reader) == b"\x50\x0f"
