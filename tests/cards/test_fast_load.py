"""Fast start: a stored card's keys skip RSA validation only when they are the very bytes
that were validated (or generated) when the card was stored; a card named by many slots
is loaded once."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from usbccid.cards import keys
from usbccid.cards.generate import ProvisionedCard, default_card_spec, generate_card
from usbccid.cards.provision import MANIFEST_FILE
from usbccid.cards.store import load_card, save_card
from usbccid.tool import app as app_module
from usbccid.tool.app import App
from usbccid.tool.config import parse_config

from .test_provision import KEYS, NOW


@pytest.fixture(scope="module")
def small_card() -> ProvisionedCard:
    card_id = bytes(range(40, 56))
    spec = default_card_spec(card_id, key_size=1024, ca_key_size=1024)
    return generate_card(NOW, spec, card_id=card_id, new_key=KEYS.factory())


@pytest.fixture
def skips(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Every private key loaded: whether it skipped cryptography's RSA key validation."""
    seen: list[bool] = []
    real = serialization.load_pem_private_key

    def recording(data: bytes, password: Any = None, **kwargs: Any) -> Any:
        seen.append(bool(kwargs.get("unsafe_skip_rsa_key_validation", False)))
        return real(data, password, **kwargs)

    monkeypatch.setattr(serialization, "load_pem_private_key", recording)
    return seen


def test_stored_keys_load_without_revalidation(
    tmp_path: Path, small_card: ProvisionedCard, skips: list[bool]
) -> None:
    directory = save_card(tmp_path, small_card, "fast")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    assert all(len(entry["key_sha256"]) == 64 for entry in manifest["containers"])
    loaded = load_card(tmp_path, "fast")
    assert skips == [True] * len(small_card.profile.containers)
    for a, b in zip(loaded.profile.containers, small_card.profile.containers, strict=True):
        assert a.private_key.private_numbers() == b.private_key.private_numbers()


def test_an_edited_key_file_is_validated_in_full(
    tmp_path: Path, small_card: ProvisionedCard, skips: list[bool]
) -> None:
    directory = save_card(tmp_path, small_card, "edited")
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    first = manifest["containers"][0]["key"]
    # the same key, written differently: other bytes than the ones recorded
    key = small_card.profile.containers[0].private_key
    (directory / first).write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    load_card(tmp_path, "edited")
    assert skips[0] is False
    assert all(skips[1:])


def test_a_manifest_without_hashes_is_validated_in_full(
    tmp_path: Path, small_card: ProvisionedCard, skips: list[bool]
) -> None:
    directory = save_card(tmp_path, small_card, "old")
    path = directory / MANIFEST_FILE
    manifest = json.loads(path.read_text())
    for entry in manifest["containers"]:
        del entry["key_sha256"]  # as cards stored before the hash was recorded
    path.write_text(json.dumps(manifest))
    load_card(tmp_path, "old")
    assert skips == [False] * len(small_card.profile.containers)


def test_imported_files_are_always_validated(
    tmp_path: Path, small_card: ProvisionedCard, skips: list[bool]
) -> None:
    container = small_card.profile.containers[0]
    cert = container.certificate.public_bytes(serialization.Encoding.PEM)
    key = container.private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    keys.load_container(cert, key, label="imported")
    assert skips == [False]


def test_each_slot_loads_its_card_once_and_a_reload_keeps_them(
    tmp_path: Path, small_card: ProvisionedCard, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A card is in one slot at a time (tests/cards/test_one_card.py), so a start loads
    # each slot's card once, and a reload loads again but swaps nothing that is the same.
    names = [f"card{n}" for n in range(6)]
    for name in names:
        save_card(tmp_path, small_card, name)
    calls: list[str] = []
    real = app_module.load_card  # type: ignore[attr-defined]

    def counting(card: Any, state_dir: Path, now: Any) -> Any:
        calls.append(card.stored)
        return real(card, state_dir, now)

    monkeypatch.setattr(app_module, "load_card", counting)
    text = "".join(
        f'[[reader]]\nname = "r{n}"\n  [[reader.slot]]\n  card = "{name}"\n'
        for n, name in enumerate(names)
    )
    config = dataclasses.replace(parse_config(text, source="many.toml"), state_dir=tmp_path)
    app = App(config)
    assert sorted(calls) == names
    before = [r.slots[0].card for r in app.readers]
    calls.clear()
    result = app.reload()
    assert sorted(calls) == names
    assert result["changed"] == []
    assert [r.slots[0].card for r in app.readers] == before
