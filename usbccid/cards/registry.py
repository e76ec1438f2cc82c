"""The card sources by slot ``type``: each module reads its own slot table and loads it.

Adding a source: its module in ``usbccid/cards/`` with ``TYPE``, ``KEYS`` (its slot
table's keys), ``parse(checker, table, path) -> config`` and
``load(config, state_dir, now) -> LoadedCard``, and one entry in :data:`SOURCES`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from usbccid.cards import cac, nss, pcsc, pkcs11
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


SOURCES: dict[str, CardSource] = {
    cac.TYPE: cac,
    pkcs11.TYPE: pkcs11,
    nss.TYPE: nss,
    pcsc.TYPE: pcsc,
}


def load_card(config: CardSourceConfig, state_dir: Path, now: datetime) -> LoadedCard:
    """The card ``config`` describes, from its source.

    Raises:
        usbccid.cards.source.CardLoadError: a file cannot be read or used; one line.
        usbccid.cards.store.StateError: the state directory is unusable.
    """
    return SOURCES[config.type].load(config, state_dir, now)
