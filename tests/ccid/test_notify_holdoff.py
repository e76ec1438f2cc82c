"""A multi-slot reader never completes an interrupt-IN URB the moment it arrives.

libccid 1.5.2's multi-slot polling thread (ccid_usb.c Multi_PollingProc) sets its
``completed`` flag to 0 *after* libusb_submit_transfer; a completion handled first by
another thread (Multi_ReadProc's bulk read handles libusb events too) is then lost, and the
thread waits forever: the reader's card events are dead (fixed upstream in 1.7.0, commit
571eaf8). Seen in the guest when the reader answered a fresh URB at once, which it did at
every import and whenever a change came between two URBs. So after each NotifySlotChange,
and after an import, the next one waits ``notify_holdoff`` seconds (armed with the driver's
next ``now``), and the URB it completes has been pending that long.
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


def test_the_first_notification_after_an_import_waits() -> None:
    reader = CcidReader([EchoCard(), None])
    assert notification(reader) is None  # the URB of the import: held
    assert reader.next_job(10.0) is None  # the driver's call after the event arms it
    assert reader.get_timer() == 10.0 + HOLDOFF
    reader.handle_timer(10.0 + HOLDOFF / 2)
    assert notification(reader) is None
    reader.handle_timer(10.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x03"


def test_a_change_right_after_a_notification_waits_for_the_holdoff() -> None:
    reader = CcidReader([EchoCard(), None])
    reader.next_job(0.0)
    reader.handle_timer(HOLDOFF)
    assert notification(reader) == b"\x50\x03"
    reader.insert(1, EchoCard())  # while the host is between two URBs
    assert reader.next_job(1.0) is None
    assert notification(reader) is None  # the next URB is fresh: not at once
    assert reader.get_timer() == 1.0 + HOLDOFF
    reader.handle_timer(1.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x0d"
    exchange(reader, GetSlotStatus(0, 1), now=1.3)  # the host looks at both slots
    exchange(reader, GetSlotStatus(1, 2), now=1.3)
    # a change long after the last notification: the hold-off is long over
    reader.handle_timer(5.0)
    reader.remove(1)
    assert notification(reader) == b"\x50\x09"


def test_repeats_are_held_too() -> None:
    reader = CcidReader([EchoCard(), None])
    reader.next_job(0.0)
    reader.handle_timer(HOLDOFF)
    assert notification(reader) == b"\x50\x03"
    reader.next_job(HOLDOFF)
    # the repeat (nobody asked slot 0's status) comes renotify_interval later, after the
    # hold-off ended: the hold-off first, then the repeat
    assert reader.get_timer() == 2 * HOLDOFF
    reader.handle_timer(2 * HOLDOFF)
    assert notification(reader) is None  # nothing to say yet
    repeat = HOLDOFF + ReaderConfig().renotify_interval
    assert reader.get_timer() == pytest.approx(repeat)
    reader.handle_timer(repeat)
    assert notification(reader) == b"\x50\x03"
    reader.next_job(repeat)
    assert reader.get_timer() == pytest.approx(repeat + HOLDOFF)  # held again


def test_reset_holds_again() -> None:
    reader = CcidReader([EchoCard(), EchoCard()])
    reader.next_job(0.0)
    reader.handle_timer(HOLDOFF)
    assert notification(reader) == b"\x50\x0f"
    reader.reset()
    assert notification(reader) is None
    reader.next_job(3.0)
    reader.handle_timer(3.0 + HOLDOFF)
    assert notification(reader) == b"\x50\x0f"


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
