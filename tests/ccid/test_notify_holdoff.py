"""A multi-slot reader never completes an interrupt-IN URB the moment it arrives.

libccid 1.5.2's multi-slot polling thread (ccid_usb.c Multi_PollingProc) sets its
``completed`` flag to 0 *after* libusb_submit_transfer; a completion handled first by
another thread (Multi_ReadProc's bulk read handles libusb events too) is then lost, and the
thread waits forever: the reader's card events are dead (fixed upstream in 1.7.0, commit
571eaf8). Seen in the guest when the reader answered a fresh URB at once, which it did at
every import and whenever a change came between two URBs. So a notification goes out only
once an interrupt poll has seen it pending for ``notify_holdoff`` seconds (armed with the
driver's next ``now``, which follows every poll): the URB it completes has been pending at
least that long.
"""

from __future__ import annotations

import pytest

from tests.ccid.helpers import INTERRUPT_IN, INTERRUPT_READ, exchange
from usbccid.ccid import CcidReader, ReaderConfig
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import GetSlotStatus

HOLDOFF = ReaderConfig().notify_holdoff


def notification(reader: CcidReader) -> bytes | None:
    return reader.poll_in(INTERRUPT_IN, INTERRUPT_READ)


def test_the_default_holdoff_is_short_and_before_the_first_repeat() -> None:
    config = ReaderConfig()
    assert 0.05 <= config.notify_holdoff < config.renotify_interval


def released(reader: CcidReader, now: float) -> bytes | None:
    """What the driver does: a poll (a URB came, or a poke), its next ``now``, the timer."""
    first = notification(reader)
    reader.next_job(now)
    if first is not None:
        return first
    when = reader.get_timer()
    assert when is not None
    assert when == pytest.approx(now + HOLDOFF)
    reader.handle_timer(when)
    return notification(reader)


def test_the_first_notification_after_an_import_waits() -> None:
    reader = CcidReader([EchoCard(), None])
    assert notification(reader) is None  # the URB of the import: seen, held
    assert reader.next_job(10.0) is None  # the driver's call after the event arms it
    assert reader.get_timer() == 10.0 + HOLDOFF
    reader.handle_timer(10.0 + HOLDOFF / 2)
    assert notification(reader) is None
    reader.handle_timer(10.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x03"
    assert notification(reader) is None


def test_a_change_while_a_urb_is_parked_waits_too() -> None:
    reader = CcidReader([EchoCard(), None])
    assert released(reader, 0.0) == b"\x50\x03"
    exchange(reader, GetSlotStatus(0, 1), now=0.5)  # the host looked at slot 0
    assert notification(reader) is None  # the next URB, parked: nothing to say
    reader.insert(1, EchoCard())  # then the poke
    assert released(reader, 3.0) == b"\x50\x0d"


def test_a_urb_that_comes_late_with_a_change_pending_is_not_answered_at_once() -> None:
    # The host's polling thread resubmits long after the last completion (a loaded guest):
    # the change waits for it, and then the hold-off still runs from the URB's arrival.
    reader = CcidReader([EchoCard(), None])
    assert released(reader, 0.0) == b"\x50\x03"
    exchange(reader, GetSlotStatus(0, 1), now=0.1)
    reader.insert(1, EchoCard())  # no URB parked: nobody polls
    reader.next_job(0.2)
    reader.handle_timer(5.0)
    assert notification(reader) is None  # the URB arrives at 5.0: not at once
    reader.next_job(5.0)
    assert reader.get_timer() == 5.0 + HOLDOFF
    reader.handle_timer(5.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x0d"


def test_repeats_are_held_too() -> None:
    reader = CcidReader([EchoCard(), None])
    assert released(reader, 0.0) == b"\x50\x03"
    reader.next_job(HOLDOFF)  # arms the repeat: nobody asked slot 0's status
    repeat_at = HOLDOFF + ReaderConfig().renotify_interval
    assert reader.get_timer() == pytest.approx(repeat_at)
    reader.handle_timer(repeat_at)  # the repeat is due; the parked URB is polled
    assert notification(reader) is None  # seen: held
    reader.next_job(repeat_at)
    assert reader.get_timer() == pytest.approx(repeat_at + HOLDOFF)
    reader.handle_timer(repeat_at + HOLDOFF)
    assert notification(reader) == b"\x50\x03"


def test_reset_holds_again() -> None:
    reader = CcidReader([EchoCard(), EchoCard()])
    assert notification(reader) is None
    reader.reset()  # a new import before the hold-off was armed: it starts over
    assert notification(reader) is None
    reader.next_job(3.0)
    reader.handle_timer(3.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x0f"
    reader.reset()
    assert released(reader, 9.0) == b"\x50\x0f"


def test_one_slot_readers_are_not_held() -> None:
    # libccid's one-slot InterruptRead clears its flag before submitting: no race there.
    reader = CcidReader([EchoCard()])
    assert notification(reader) == b"\x50\x03"
    reader.remove(0)
    assert notification(reader) == b"\x50\x02"


def test_holdoff_zero_turns_it_off_and_negative_is_refused() -> None:
    reader = CcidReader([EchoCard(), None], config=ReaderConfig(notify_holdoff=0))
    assert notification(reader) == b"\x50\x03"
    with pytest.raises(ValueError, match="notify_holdoff"):
        ReaderConfig(notify_holdoff=-1)
