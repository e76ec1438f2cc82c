"""One card, one place, one counter (issue 11): no configuration and no code path gives a
free PIN guess.

* a stored card (or a files card of the same card ID) in two slots is refused at load;
* two card objects over one PIN state take turns under the card's lock and see each
  other's decrements (a reload while a job runs; threads);
* a state directory that cannot be written (read-only, full) fails closed with 65 81 and
  a logged error, and the counter on disk is what it was;
* a PIN state file corrupted while running is 65 81 too, never a reset counter.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cac.conftest import PIN, make_profile
from tests.cac.helpers import Session
from tests.cli.helpers import assert_one_line_error, make_pkcs12, run
from tests.conftest import in_ci, require
from usbccid.cac.card import CacCard
from usbccid.cac.profile import CardProfile, PinState
from usbccid.cards.store import PIN_STATE_FILE, FilePinStateStore

WRONG = b"00000000"


@pytest.fixture(scope="module")
def profile() -> CardProfile:
    return make_profile([1024])


def card(profile: CardProfile, store: FilePinStateStore) -> Session:
    c = CacCard(profile, store)
    c.power_on()
    return Session(c)


# -- refused at load ----------------------------------------------------------------------


def test_a_stored_card_in_two_slots_is_refused(
    tmp_path: Path, usbccid_state_template: Path
) -> None:
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    config = tmp_path / "c.toml"
    config.write_text(
        "[[reader]]\nname = 'a'\n[[reader.slot]]\ncard = 'default'\n\n"
        "[[reader]]\nname = 'b'\n[[reader.slot]]\ncard = 'default'\n"
    )
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(
        result,
        'stored card "default"',
        f"{config}:3 (reader a slot 0)",
        f"{config}:8 (reader b slot 0)",
        "one slot only",
    )
    # two slots of one reader: the same
    config.write_text("[[reader]]\n[[reader.slot]]\ncard = 'default'\n[[reader.slot]]\n")
    result = run("serve", "--config", config, "--state-dir", state, "--check")
    assert_one_line_error(result, "slot 0)", "slot 1)")


def test_files_cards_of_one_card_id_are_refused(tmp_path: Path) -> None:
    p12 = make_pkcs12(tmp_path, "sig", b"pw")
    other = make_pkcs12(tmp_path, "other", b"pw")
    config = tmp_path / "c.toml"
    slot = "[[reader.slot]]\ncontainers = [{{ pkcs12 = '{}', passphrase = 'pw' }}]\n"
    # the same files twice: the derived card ID is the same
    config.write_text("[[reader]]\n" + slot.format(p12.name) + slot.format(p12.name))
    result = run("serve", "--config", config, "--state-dir", tmp_path / "s", "--check")
    assert_one_line_error(result, "card from files", "card ID", f"{config}:2 ", f"{config}:4 ")
    # different files, the same configured card_id: one PIN state file, refused as well
    config.write_text(
        "[[reader]]\n"
        + slot.format(p12.name)
        + "card_id = 'c0ffee'\n"
        + slot.format(other.name)
        + "card_id = 'c0ffee'\n"
    )
    result = run("serve", "--config", config, "--state-dir", tmp_path / "s", "--check")
    assert_one_line_error(result, "card ID c0ffee", "one slot only")
    # different card IDs: fine
    config.write_text("[[reader]]\n" + slot.format(p12.name) + slot.format(other.name))
    result = run("serve", "--config", config, "--state-dir", tmp_path / "s", "--check")
    assert result.returncode == 0, result.stderr


# -- one counter ----------------------------------------------------------------------------


def test_two_card_objects_over_one_state_share_the_counter(
    tmp_path: Path, profile: CardProfile
) -> None:
    # What a double configuration did before (63C2 63C2 63C1 63C1 ...), and what a reload
    # still does for a moment: an old and a new card object over one state file.
    path = tmp_path / PIN_STATE_FILE
    a = card(profile, FilePinStateStore(path))
    b = card(profile, FilePinStateStore(path))
    assert a.verify(WRONG) == 0x63C2
    assert b.verify(WRONG) == 0x63C1
    assert a.sw("00 20 00 00") == 0x63C1  # the status query reads the state too
    assert a.verify(WRONG) == 0x63C0
    assert b.verify(PIN) == 0x6983  # three guesses in all, then blocked
    assert FilePinStateStore(path).load() == PinState(PIN, 0, 10)


def test_concurrent_guesses_on_threads_take_turns(tmp_path: Path, profile: CardProfile) -> None:
    path = tmp_path / PIN_STATE_FILE
    sessions = [card(profile, FilePinStateStore(path)) for _ in range(12)]
    answers: list[int] = []
    start = threading.Barrier(len(sessions))

    def guess(s: Session) -> None:
        start.wait()
        answers.append(s.verify(WRONG))

    threads = [threading.Thread(target=guess, args=(s,)) for s in sessions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(answers) == sorted([0x63C2, 0x63C1, 0x63C0] + [0x6983] * 9)


def test_change_pin_from_another_card_object_is_seen(tmp_path: Path, profile: CardProfile) -> None:
    path = tmp_path / PIN_STATE_FILE
    a = card(profile, FilePinStateStore(path))
    b = card(profile, FilePinStateStore(path))
    change = bytes.fromhex("0024000010") + PIN + b"2468\xff\xff\xff\xff"
    assert a.sw(change) == 0x9000
    assert b.verify(PIN) == 0x63C2  # the old PIN is gone for every card object
    assert b.verify(b"2468") == 0x9000


# -- fail closed ------------------------------------------------------------------------------


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """Make ``directory`` unwritable for this process: a read-only bind mount as root
    (root ignores permission bits), mode 0500 otherwise."""
    if os.geteuid() != 0:
        directory.chmod(0o500)
        try:
            yield
        finally:
            directory.chmod(0o700)
        return
    mounted = subprocess.run(
        ["mount", "--bind", str(directory), str(directory)], capture_output=True, check=False
    )
    require(mounted.returncode == 0, f"cannot bind-mount: {mounted.stderr!r}")
    try:
        subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(directory)], capture_output=True, check=True
        )
        yield
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, check=False)


@contextlib.contextmanager
def full_disk(directory: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``directory`` filled to the last block (root only)."""
    require(os.geteuid() == 0 or not in_ci(), "mounting a tmpfs needs root")
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    directory.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(directory)],
        capture_output=True,
        check=False,
    )
    require(mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr!r}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True, check=False)


def fill(directory: Path) -> None:
    with open(directory / "filler", "wb", buffering=0) as f, contextlib.suppress(OSError):
        while True:
            f.write(b"\0" * 4096)


def assert_fails_closed(
    s: Session, path: Path, before: PinState, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="usbccid.cac.applets.pin"):
        assert s.verify(PIN) == 0x6581  # not even the right PIN is compared
        assert s.verify(WRONG) == 0x6581
    assert any(str(path) in r.getMessage() for r in caplog.records), caplog.records
    assert FilePinStateStore(path).load() == before
    assert s.sw("00 20 00 00") == 0x63C2  # the status still reads; nothing was guessed


def test_read_only_state_directory_fails_closed(
    tmp_path: Path, profile: CardProfile, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "cards" / "default"
    directory.mkdir(parents=True)
    path = directory / PIN_STATE_FILE
    s = card(profile, FilePinStateStore(path))
    assert s.verify(WRONG) == 0x63C2
    before = FilePinStateStore(path).load()
    assert before is not None
    with read_only(directory):
        assert_fails_closed(s, path, before, caplog)
    assert s.verify(PIN) == 0x9000  # writable again: works again


def test_full_state_directory_fails_closed(
    tmp_path: Path, profile: CardProfile, caplog: pytest.LogCaptureFixture
) -> None:
    with full_disk(tmp_path / "state") as directory:
        path = directory / PIN_STATE_FILE
        s = card(profile, FilePinStateStore(path))
        assert s.verify(WRONG) == 0x63C2
        before = FilePinStateStore(path).load()
        assert before is not None
        fill(directory)
        assert_fails_closed(s, path, before, caplog)
        (directory / "filler").unlink()
        assert s.verify(PIN) == 0x9000


def test_corrupt_state_while_running_is_not_a_reset(
    tmp_path: Path, profile: CardProfile, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / PIN_STATE_FILE
    s = card(profile, FilePinStateStore(path))
    assert s.verify(WRONG) == 0x63C2
    path.write_text("{ not json")
    with caplog.at_level(logging.ERROR, logger="usbccid.cac.applets.pin"):
        assert s.verify(PIN) == 0x6581
    assert any(f"PIN state {path} is corrupt" in r.getMessage() for r in caplog.records)
    assert path.read_text() == "{ not json"  # left for a human, not overwritten
