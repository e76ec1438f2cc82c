"""The registries of card sources and front ends: every entry resolves to what it names,
and a module is imported only when a configuration uses it (start time, issue 12)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from usbccid.cards import registry as cards
from usbccid.frontends import registry as frontends
from usbccid.frontends.base import Frontend
from usbccid.tool import config as cfg


@pytest.mark.parametrize("card_type", sorted(cards.SOURCES))
def test_each_card_type_names_the_module_of_that_type(card_type: str) -> None:
    module = cards.source_module(card_type)
    assert card_type == module.TYPE
    assert callable(module.parse)
    assert callable(module.load)
    assert all(isinstance(key, str) for key in module.KEYS)


def test_an_unknown_card_type_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        cards.source_module("smartcard-hsm")


@pytest.mark.parametrize("name", sorted(frontends.FRONTENDS))
def test_each_front_end_name_resolves_to_a_front_end_class(name: str) -> None:
    cls = frontends.frontend_class(name)
    assert isinstance(cls, type)
    members = [m for m in vars(Frontend) if not m.startswith("_")]
    assert "add_reader" in members
    assert [m for m in members if not hasattr(cls, m)] == []


#: modules that only a token, NSS, PC/SC card or a vpcd/VSCard reader needs
UNNEEDED_FOR_EMULATED_USBIP = (
    "pkcs11",
    "smartcard",
    "sqlite3",
    "usbccid.cards.pkcs11",
    "usbccid.cards.nss",
    "usbccid.cards.pcsc",
    "usbccid.frontends.vpcd",
    "usbccid.frontends.vscard",
)

_MODULES_AFTER = """
import json, sys
from usbccid.tool.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "modules": sorted(sys.modules)}))
"""


def modules_after(*argv: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["code"] == 0, done.stderr
    return set(result["modules"])


def loaded(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules for n in names if m == n or m.startswith(n + "."))


def test_serving_emulated_cards_over_usbip_loads_no_other_source_or_front_end(
    tmp_path: Path,
) -> None:
    modules = modules_after("serve", "--check", "--state-dir", str(tmp_path / "state"))
    assert "usbccid.frontends.usbip.frontend" in modules  # the check sees what it loads
    assert "usbccid.cards.cac" in modules
    assert loaded(modules, UNNEEDED_FOR_EMULATED_USBIP) == []


def test_a_token_slot_is_read_by_its_own_source() -> None:
    config = cfg.parse_config(
        '[[reader]]\nname = "r"\n[[reader.slot]]\ntype = "pkcs11"\n'
        'module = "/usr/lib/softhsm/libsofthsm2.so"\ntoken_label = "t"\n'
    )
    card = config.readers[0].slots[0].card
    assert card is not None
    assert card.type == "pkcs11"
    assert type(card).__module__ == "usbccid.cards.pkcs11"
    assert "usbccid.cards.pkcs11" in sys.modules


def test_only_usbip_readers_come_and_go_while_running() -> None:
    hot = {name: frontends.frontend_class(name).hot_plug for name in frontends.FRONTENDS}
    assert hot == {"usbip": True, "vpcd": False, "vscard": False}
