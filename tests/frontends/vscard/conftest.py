from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.frontends.vscard.helpers import QemuPeer


@pytest.fixture(autouse=True)
def _close_peers() -> Iterator[None]:
    yield
    while QemuPeer.made:
        QemuPeer.made.pop().close()
