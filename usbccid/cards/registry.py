"""The card sources by slot ``type``: each module reads its own slot table and loads it.

Adding a source: its module in ``usbccid/cards/`` with ``TYPE``, ``KEYS`` (its slot
table's keys), ``parse(checker, table, path) -> config`` and
``load(config, state_dir, now) -> LoadedCard``, and one entry in :data:`SOURCES`.

A source's module is imported the first time a slot of its type is read: the token and
PC/SC sources pull in python-pkcs11, sqlite3 and pyscard, which a server of emulated cards
never needs (with the front ends' laziness, some 50 ms of its start and 6 MiB).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from usbccid.cards.source import LoadedCard
from usbccid.tool.schema import Checker, KeyPath


class CardSourceConfig(Protocol):
    """A source's configuration of one card: which source, and where it was written."""

    @property
    def type(self) -> str: ...

    @property
    def origin(self) -> str: ...


class CardSource(Protocol):
    """A card source module."""

    @property
    def TYPE(self) -> str: ...

    @property
    def KEYS(self) -> Sequence[str]: ...

    def parse(self, ck: Checker, t: Mapping[str, Any], path: KeyPath) -> Any:
        """The card configuration of a slot table (raises ConfigError with its line)."""
        ...

    def load(self, config: Any, state_dir: Path, now: datetime) -> LoadedCard:
        """The card (raises CardLoadError, one line, or StateError)."""
        ...


#: each slot ``type`` and the module of its source (whose ``TYPE`` it is)
SOURCES: Mapping[str, str] = {
    "cac": "usbccid.cards.cac",
    "pkcs11": "usbccid.cards.pkcs11",
    "nss": "usbccid.cards.nss",
    "pcsc": "usbccid.cards.pcsc",
}


def source_module(card_type: str) -> CardSource:
    """The source module of slot type ``card_type`` (imported now if it was not yet).

    Raises:
        KeyError: no such type.
    """
    module: CardSource = importlib.import_module(SOURCES[card_type])
    return module


def load_card(config: CardSourceConfig, state_dir: Path, now: datetime) -> LoadedCard:
    """The card ``config`` describes, from its source.

    Raises:
        usbccid.cards.source.CardLoadError: a file cannot be read or used; one line.
        usbccid.cards.store.StateError: the state directory is unusable.
    """
    return source_module(config.type).load(config, state_dir, now)
