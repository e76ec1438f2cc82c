"""A usbccid server inside your test process: a pytest fixture and a context manager.

With pytest (the plugin is registered through the ``pytest11`` entry point, so installing
usbccid is enough)::

    def test_my_tool(usbccid_server):
        print(usbccid_server.host, usbccid_server.port, usbccid_server.bus_id)
        dev = usbccid_server.device()          # a pyusb device, imported over USB/IP
        dev.set_configuration()
        ...
        usbccid_server.remove()                # take the card out (NotifySlotChange)

Without pytest::

    from usbccid.testing import usbccid_server

    with usbccid_server() as server:
        subprocess.run(["sudo", "usbip", "--tcp-port", str(server.port),
                        "attach", "-r", server.host, "-b", server.bus_id])

The server listens on a free port of 127.0.0.1 and serves one reader holding the default
test card (PIN ``server.pin``), from a state directory of its own. Pass a
:class:`usbccid.tool.config.Config` for anything else. Generating a card takes a second or two,
so the fixture generates the default card once per session and copies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from usbccid.tool import config as cfg

if TYPE_CHECKING:
    from usbccid.tool.app import App

# Loaded by pytest for every test run (the pytest11 entry point): keep the imports at the
# top light, so that nothing heavy (or broken) is imported until a fixture is used.

T = TypeVar("T")

__all__ = ["UsbccidServer", "usbccid_server"]


@dataclass
class UsbccidServer:
    """A running in-process server. Change it only through its methods (they run on the
    server's event loop)."""

    host: str
    port: int
    bus_id: str
    state_dir: Path
    app: App
    loop: asyncio.AbstractEventLoop
    _devices: list[Any] = field(default_factory=list)

    @property
    def bus_ids(self) -> list[str]:
        return [r.busid for r in self.app.readers]

    @property
    def pin(self) -> str:
        """The PIN of the card in the first reader's first slot."""
        card = self.app.readers[0].slots[0].card
        assert card is not None, "the first slot is configured empty"
        pin = card.current_pin
        assert pin is not None, "the first slot's card has no PIN of ours to tell"
        return pin

    @property
    def control_socket(self) -> Path:
        path = self.app.control_path
        assert path is not None
        return path

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the server's event loop and return its result."""

        async def run() -> T:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout=30)

    def insert(self, reader: str | None = None, slot: int = 0) -> None:
        """Insert the card of ``reader`` (name or bus id; default the first) ``slot``."""
        self.call(lambda: self.app.insert(reader or self.bus_id, slot))

    def remove(self, reader: str | None = None, slot: int = 0) -> None:
        self.call(lambda: self.app.remove(reader or self.bus_id, slot))

    def device(self, bus_id: str | None = None) -> Any:
        """A ``usb.core.Device`` for the reader at ``bus_id`` (default: the first),
        imported over USB/IP by :mod:`usbccid.host.pyusb_backend`; released when the server
        stops (or with ``usb.util.dispose_resources(dev); dev.backend.close()``)."""
        from usbccid.host.pyusb_backend import find

        dev = find(self.host, self.port, bus_id or self.bus_id)
        if dev is None:
            raise LookupError(f"bus id {bus_id or self.bus_id} is not exported (or imported)")
        self._devices.append(dev)
        return dev

    def close_devices(self) -> None:
        import usb.util

        for dev in self._devices:
            with contextlib.suppress(Exception):
                usb.util.dispose_resources(dev)
                dev.backend.close()
        self._devices.clear()


def _default_config(state_dir: Path) -> cfg.Config:
    return cfg.Config(
        server=cfg.ServerConfig(host="127.0.0.1", port=0),
        state_dir=state_dir,
    )


@contextlib.contextmanager
def usbccid_server(
    config: cfg.Config | None = None,
    *,
    state_dir: Path | None = None,
    template: Path | None = None,
) -> Iterator[UsbccidServer]:
    """Run a server on a thread of this process for the duration of the block.

    Args:
        config: what to serve; default: one reader with the default card, on a free port
            of 127.0.0.1. Its ``state_dir`` is replaced by ``state_dir`` when given.
        state_dir: default: a temporary directory, removed afterwards.
        template: a state directory to copy first (e.g. one holding a pre-made card).
    """
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="usbccid-")))
        if template is not None:
            shutil.copytree(template, state_dir, dirs_exist_ok=True)
        config = (
            _default_config(state_dir) if config is None else replace(config, state_dir=state_dir)
        )
        started: Future[UsbccidServer] = Future()
        stop: list[Callable[[], object]] = []

        from usbccid.tool.app import App

        async def main() -> None:
            loop = asyncio.get_running_loop()
            stopped = asyncio.Event()
            try:
                app = App(config)
                address = await app.start()
                if address is None:
                    raise ValueError("usbccid_server needs a reader on USB/IP")
                host, port = address
            except BaseException as exc:
                started.set_exception(exc)
                return
            stop.append(lambda: loop.call_soon_threadsafe(stopped.set))
            started.set_result(
                UsbccidServer(
                    host=host,
                    port=port,
                    bus_id=app.readers[0].busid,
                    state_dir=state_dir,
                    app=app,
                    loop=loop,
                )
            )
            try:
                await stopped.wait()
            finally:
                await app.close()

        thread = threading.Thread(target=asyncio.run, args=(main(),), name="usbccid-test-server")
        thread.start()
        try:
            server = started.result(timeout=120)
        except BaseException:
            thread.join(timeout=30)
            raise
        try:
            yield server
        finally:
            server.close_devices()
            stop[0]()
            thread.join(timeout=30)


def make_template(directory: Path) -> Path:
    """A state directory holding the default card, to copy into each test's."""
    from datetime import UTC, datetime

    from usbccid.cards.store import load_or_create_default_card

    load_or_create_default_card(directory, datetime.now(UTC))
    return directory


# --------------------------------------------------------------------------- pytest plugin

try:
    import pytest
except ImportError:  # pragma: no cover - usable without pytest
    pass
else:

    @pytest.fixture(scope="session")
    def usbccid_state_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
        """A state directory with the default card, generated once per session."""
        return make_template(tmp_path_factory.mktemp("usbccid-template"))

    @pytest.fixture(name="usbccid_server")
    def _usbccid_server_fixture(
        tmp_path_factory: pytest.TempPathFactory, usbccid_state_template: Path
    ) -> Iterator[UsbccidServer]:
        """A usbccid server in this process: ``.host``, ``.port``, ``.bus_id``, ``.pin``,
        ``.device()`` (pyusb), ``.insert()``, ``.remove()``."""
        from usbccid.tool.app import AppError

        state = tmp_path_factory.mktemp("usbccid-state")
        try:
            with usbccid_server(state_dir=state, template=usbccid_state_template) as server:
                yield server
        except AppError as exc:  # pragma: no cover
            pytest.fail(f"usbccid server did not start: {exc}")
