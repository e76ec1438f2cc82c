"""usbccid.cards.store: state directory, stored cards, crash-safe PIN state."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from usbccid.cac.profile import CardProfile, PinState, PinStateStore
from usbccid.cards.generate import ProvisionedCard, default_card_spec, generate_card
from usbccid.cards.provision import CA_CERT_FILE, MANIFEST_FILE
from usbccid.cards.store import (
    CARDS_DIR,
    PIN_STATE_FILE,
    SYSTEM_STATE_DIR,
    CardExistsError,
    FilePinStateStore,
    StateError,
    card_directory,
    default_state_dir,
    load_card,
    load_or_create_card,
    load_or_create_default_card,
    save_card,
)
from usbccid.errors import UsbccidError

from .test_provision import KEYS, NOW, counting_random


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def no_new_keys(bits: int) -> rsa.RSAPrivateKey:
    raise AssertionError("a stored card must be loaded, not generated again")


@pytest.fixture(autouse=True)
def _permissive_umask() -> Iterator[None]:
    """Run with umask 000, so that the modes we check are the ones the code sets."""
    previous = os.umask(0)
    try:
        yield
    finally:
        os.umask(previous)


@pytest.fixture(scope="module")
def small_card() -> ProvisionedCard:
    card_id = bytes(range(100, 116))
    spec = default_card_spec(card_id, key_size=1024, ca_key_size=1024)
    return generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())


def assert_same_profile(a: CardProfile, b: CardProfile) -> None:
    assert a.card_id == b.card_id
    assert a.pin_policy == b.pin_policy
    assert len(a.containers) == len(b.containers)
    for x, y in zip(a.containers, b.containers, strict=True):
        assert x.label == y.label
        assert x.certificate == y.certificate
        assert x.private_key.private_numbers() == y.private_key.private_numbers()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------------------
# default_state_dir


def test_state_dir_systemd() -> None:
    env = {"STATE_DIRECTORY": "/var/lib/usbccid", "XDG_STATE_HOME": "/x", "HOME": "/home/u"}
    assert default_state_dir(env, euid=1000) == Path("/var/lib/usbccid")
    # Several StateDirectory= entries are joined with ':'; the first is ours.
    env["STATE_DIRECTORY"] = "/var/lib/usbccid:/var/lib/other"
    assert default_state_dir(env, euid=0) == Path("/var/lib/usbccid")


def test_state_dir_root() -> None:
    assert default_state_dir({"HOME": "/root", "XDG_STATE_HOME": "/root/.st"}, euid=0) == (
        SYSTEM_STATE_DIR
    )
    assert Path("/var/lib/usbccid") == SYSTEM_STATE_DIR


def test_state_dir_user() -> None:
    assert default_state_dir({"XDG_STATE_HOME": "/s", "HOME": "/home/u"}, euid=1000) == Path(
        "/s/usbccid"
    )
    assert default_state_dir({"HOME": "/home/u"}, euid=1000) == Path("/home/u/.local/state/usbccid")
    # A relative XDG_STATE_HOME is invalid (XDG spec) and ignored; so is an empty one.
    for xdg in ("relative/dir", ""):
        env = {"XDG_STATE_HOME": xdg, "HOME": "/home/u"}
        assert default_state_dir(env, euid=1000) == Path("/home/u/.local/state/usbccid")


def test_state_dir_defaults_to_process() -> None:
    assert default_state_dir() == default_state_dir(os.environ, os.geteuid())


@pytest.mark.parametrize("name", ["", ".hidden", "a/b", "..", "x" * 65, "a b"])
def test_bad_card_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(StateError, match="bad card name"):
        card_directory(tmp_path, name)


# --------------------------------------------------------------------------------------
# Cards on disk


def test_first_run_creates_then_later_runs_load(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    profile, store = load_or_create_default_card(
        state_dir, NOW, random=counting_random(7), new_key=KEYS.factory()
    )
    assert [c.label for c in profile.containers][:1] == ["CAC ID Certificate"]
    assert profile.card_id == bytes(range(7, 23))
    assert store.path == state_dir / CARDS_DIR / "default" / PIN_STATE_FILE
    assert store.load() is None  # a new card: the card starts from its PinPolicy

    again, store2 = load_or_create_default_card(
        state_dir, NOW, random=counting_random(99), new_key=no_new_keys
    )
    assert_same_profile(profile, again)
    assert store2.path == store.path


def test_layout_and_modes(tmp_path: Path) -> None:
    state_dir = tmp_path / "new" / "state"
    card, store = load_or_create_card(state_dir, NOW, new_key=KEYS.factory())
    store.save(PinState(b"12345678", 3, 10))
    directory = state_dir / CARDS_DIR / "default"
    assert card_directory(state_dir) == directory
    for created in (tmp_path / "new", state_dir, state_dir / CARDS_DIR, directory):
        assert mode(created) == 0o700, created
    names = sorted(p.name for p in directory.iterdir())
    assert names == sorted(
        [MANIFEST_FILE, CA_CERT_FILE, PIN_STATE_FILE]
        + [f"container-{i:02d}.{kind}.pem" for i in range(3) for kind in ("cert", "key")]
    )
    for file in directory.iterdir():
        assert mode(file) == 0o600, file
    assert card.ca_certificate is not None
    assert x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes()) == (
        card.ca_certificate
    )


def test_existing_state_dir_mode_untouched(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o755)
    os.chmod(state_dir, 0o755)  # e.g. made by systemd's StateDirectory=
    load_or_create_card(state_dir, NOW, new_key=KEYS.factory())
    assert mode(state_dir) == 0o755
    assert mode(state_dir / CARDS_DIR) == 0o700


def test_save_and_load_named_card(tmp_path: Path, small_card: ProvisionedCard) -> None:
    directory = save_card(tmp_path, small_card, "imported")
    assert directory == tmp_path / CARDS_DIR / "imported"
    loaded = load_card(tmp_path, "imported")
    assert_same_profile(loaded.profile, small_card.profile)
    assert loaded.ca_certificate == small_card.ca_certificate
    # A named card is also what load_or_create finds, without generating anything.
    profile, _ = load_or_create_default_card(tmp_path, NOW, name="imported", new_key=no_new_keys)
    assert_same_profile(profile, small_card.profile)


def test_save_card_never_overwrites(tmp_path: Path, small_card: ProvisionedCard) -> None:
    save_card(tmp_path, small_card)
    with pytest.raises(CardExistsError, match="already exists"):
        save_card(tmp_path, small_card)
    assert leftovers(tmp_path / CARDS_DIR) == []


def test_save_card_is_all_or_nothing(
    tmp_path: Path, small_card: ProvisionedCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_rename(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "rename", failing_rename)
    with pytest.raises(StateError, match="No space left"):
        save_card(tmp_path, small_card)
    monkeypatch.undo()
    cards = tmp_path / CARDS_DIR
    assert list(cards.iterdir()) == []  # no card, no temporary directory
    with pytest.raises(StateError, match="no card named 'default'"):
        load_card(tmp_path)


def test_missing_file_is_an_error_not_a_new_card(
    tmp_path: Path, small_card: ProvisionedCard
) -> None:
    directory = save_card(tmp_path, small_card)
    (directory / "container-01.key.pem").unlink()
    with pytest.raises(StateError, match=r"incomplete \(container-01.key.pem is missing\)"):
        load_or_create_default_card(tmp_path, NOW, new_key=no_new_keys)


def test_damaged_card_is_an_error(tmp_path: Path, small_card: ProvisionedCard) -> None:
    directory = save_card(tmp_path, small_card)
    (directory / MANIFEST_FILE).write_text("{")
    with pytest.raises(StateError, match=r"damaged: card\.json is not valid JSON") as info:
        load_card(tmp_path)
    assert isinstance(info.value, UsbccidError)
    assert "\n" not in str(info.value)


def test_unreadable_card(tmp_path: Path, small_card: ProvisionedCard) -> None:
    directory = save_card(tmp_path, small_card)
    (directory / "container-00.cert.pem").unlink()
    (directory / "container-00.cert.pem").mkdir()  # reading it fails with EISDIR
    with pytest.raises(StateError, match="cannot read card"):
        load_card(tmp_path)


# --------------------------------------------------------------------------------------
# PIN state


def test_pin_store_is_a_pin_state_store(tmp_path: Path) -> None:
    store: PinStateStore = FilePinStateStore(tmp_path / PIN_STATE_FILE)
    assert store.load() is None
    assert "pin-state.json" in repr(store)


def test_pin_state_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / PIN_STATE_FILE
    FilePinStateStore(path).save(PinState(b"12345678", 2, 10))
    FilePinStateStore(path).save(PinState(b"24681357", 3, 9))
    assert FilePinStateStore(path).load() == PinState(b"24681357", 3, 9)
    assert mode(path) == 0o600
    assert leftovers(tmp_path) == []


def test_pin_state_survives_restart_with_card(tmp_path: Path) -> None:
    _, store = load_or_create_default_card(tmp_path, NOW, new_key=KEYS.factory())
    store.save(PinState(b"12345678", 1, 10))
    _, store = load_or_create_default_card(tmp_path, NOW, new_key=no_new_keys)
    assert store.load() == PinState(b"12345678", 1, 10)


def test_odd_pin_bytes_round_trip(tmp_path: Path) -> None:
    store = FilePinStateStore(tmp_path / PIN_STATE_FILE)
    store.save(PinState(b'\x00\xff"\\', 0, 0))
    assert FilePinStateStore(store.path).load() == PinState(b'\x00\xff"\\', 0, 0)


def test_crash_before_replace_keeps_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / PIN_STATE_FILE
    store = FilePinStateStore(path)
    store.save(PinState(b"12345678", 3, 10))
    before = path.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(StateError, match=r"cannot save PIN state .*Input/output error"):
        store.save(PinState(b"12345678", 2, 10))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert FilePinStateStore(path).load() == PinState(b"12345678", 3, 10)
    assert leftovers(tmp_path) == []


def test_crash_during_write_keeps_old_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / PIN_STATE_FILE
    store = FilePinStateStore(path)
    store.save(PinState(b"12345678", 3, 10))
    calls: list[str] = []
    real_replace = os.replace

    def failing_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    def watching_replace(src: str, dst: str) -> None:
        calls.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    monkeypatch.setattr(os, "replace", watching_replace)
    with pytest.raises(StateError, match="No space left"):
        store.save(PinState(b"12345678", 2, 10))
    monkeypatch.undo()
    assert calls == []  # never renamed an unsynced file into place
    assert FilePinStateStore(path).load() == PinState(b"12345678", 3, 10)
    assert leftovers(tmp_path) == []


def test_save_syncs_file_then_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file")
        real_fsync(fd)

    def replace(src: str, dst: str) -> None:
        events.append("replace")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    FilePinStateStore(tmp_path / PIN_STATE_FILE).save(PinState(b"1234", 3, 10))
    assert events == ["fsync-file", "replace", "fsync-dir"]


def write_state(path: Path, document: object) -> None:
    path.write_text(json.dumps(document))


GOOD = {
    "format": "usbccid-pin-state",
    "version": 1,
    "pin_hex": "3132333435363738",
    "tries_left": 3,
    "unblock_tries_left": 10,
}


def test_pin_state_file_format(tmp_path: Path) -> None:
    path = tmp_path / PIN_STATE_FILE
    FilePinStateStore(path).save(PinState(b"12345678", 3, 10))
    assert json.loads(path.read_text()) == GOOD


@pytest.mark.parametrize(
    "contents",
    [
        b"",
        b"{",
        b"\xff\xfe",
        b"[]",
        json.dumps({**GOOD, "format": "x"}).encode(),
        json.dumps({**GOOD, "version": 2}).encode(),
        json.dumps({**GOOD, "pin_hex": "zz"}).encode(),
        json.dumps({**GOOD, "pin_hex": ""}).encode(),
        json.dumps({k: v for k, v in GOOD.items() if k != "pin_hex"}).encode(),
        json.dumps({**GOOD, "tries_left": -1}).encode(),
        json.dumps({**GOOD, "tries_left": True}).encode(),
        json.dumps({**GOOD, "unblock_tries_left": "10"}).encode(),
    ],
)
def test_corrupt_pin_state_is_refused(tmp_path: Path, contents: bytes) -> None:
    path = tmp_path / PIN_STATE_FILE
    path.write_bytes(contents)
    with pytest.raises(StateError, match=r"corrupt .*delete the file") as info:
        FilePinStateStore(path).load()
    assert "\n" not in str(info.value)
    assert "12345678" not in str(info.value)


def test_corrupt_pin_state_stops_startup(tmp_path: Path) -> None:
    _, store = load_or_create_default_card(tmp_path, NOW, new_key=KEYS.factory())
    store.path.write_text("{")
    with pytest.raises(StateError, match="corrupt"):
        load_or_create_default_card(tmp_path, NOW, new_key=no_new_keys)


def test_unreadable_pin_state(tmp_path: Path) -> None:
    path = tmp_path / PIN_STATE_FILE
    path.mkdir()
    with pytest.raises(StateError, match="cannot read PIN state"):
        FilePinStateStore(path).load()
    with pytest.raises(StateError, match="cannot save PIN state"):
        FilePinStateStore(path).save(PinState(b"1234", 3, 10))
    assert leftovers(tmp_path) == []


def test_store_accepts_str_path(tmp_path: Path) -> None:
    store = FilePinStateStore(str(tmp_path / PIN_STATE_FILE))
    store.save(PinState(b"1234", 3, 10))
    assert store.load() == PinState(b"1234", 3, 10)
