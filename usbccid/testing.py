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
:class:`usbccid.tool.config.Config` for anything else.

A reader with a PIN pad (``usbccid_server(pinpad=True)``, or ``pinpad = true`` in the
configuration) answers PC_to_RDR_Secure by waiting for its keypad; a test types on it
while the host waits::

    with usbccid_server(pinpad=True) as server:
        ...                                      # a client starts a PIN verification
        server.reader().pinpad.type("12345678")  # waits for the prompt, types, OK
        server.reader().pinpad.type("1234", "567890", "567890")  # a PIN change
        server.reader().pinpad.cancel()

``keypad="card-pin"`` (or digits) makes the pad type by itself, for unattended tests.

Generating a card takes a second or two, so the fixture generates the default card once
per session and copies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
import threading
import time
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

__all__ = ["PinPadHandle", "ReaderHandle", "UsbccidServer", "usbccid_server"]


class PinPadHandle:
    """The keypad of one reader of a running server (see the module's docstring)."""

    def __init__(self, server: UsbccidServer, reader: str) -> None:
        self._server = server
        self._reader = reader

    def prompt(self, slot: int = 0) -> Any:
        """What the pad waits for on ``slot`` (a :class:`usbccid.tool.control.PinPrompt`),
        or None."""
        status = self._server.call(self._server.app.status)
        for r in status.readers:
            if self._reader in (r.name, r.bus_id):
                return r.slots[slot].pinpad
        raise LookupError(f"no reader {self._reader!r}")

    def wait_for_prompt(self, slot: int = 0, timeout: float = 10.0) -> Any:
        """Wait until the host asks for a PIN on ``slot``; return the prompt.

        Raises:
            TimeoutError: nobody asked within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while (prompt := self.prompt(slot)) is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reader {self._reader} slot {slot}: no PIN entry waiting")
            time.sleep(0.05)
        return prompt

    def type(self, *entries: str, slot: int = 0, wait: float = 10.0) -> dict[str, Any]:
        """Type each entry followed by OK, once the host asks (waiting up to ``wait`` s).

        Returns the server's report (``accepted``, ``ignored``, ``state``, ``next``).
        """
        return self._press(list(entries), False, slot, wait)

    def cancel(self, digits: str = "", *, slot: int = 0, wait: float = 10.0) -> dict[str, Any]:
        """Type ``digits`` (if any), then press Cancel."""
        return self._press([digits] if digits else [], True, slot, wait)

    def _press(self, entries: list[str], cancel: bool, slot: int, wait: float) -> dict[str, Any]:
        app = self._server.app
        deadline = time.monotonic() + wait
        while True:
            result = dict(
                self._server.call(lambda: app.pinpad(self._reader, slot, entries, cancel))
            )
            if result.get("waiting"):
                return result
            if time.monotonic() >= deadline:
                raise TimeoutError(f"reader {self._reader} slot {slot}: no PIN entry waiting")
            time.sleep(0.05)


@dataclass(frozen=True)
class ReaderHandle:
    """One reader of a running server."""

    server: UsbccidServer
    name: str
    bus_id: str

    @property
    def pinpad(self) -> PinPadHandle:
        return PinPadHandle(self.server, self.name)

    def insert(self, slot: int = 0) -> None:
        self.server.insert(self.name, slot)

    def remove(self, slot: int = 0) -> None:
        self.server.remove(self.name, slot)


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

    def reader(self, name: str | None = None) -> ReaderHandle:
        """The reader named (or with the bus id) ``name``; default: the first."""
        for r in self.app.readers:
            if name is None or name in (r.config.name, r.busid):
                return ReaderHandle(self, r.config.name, r.busid)
        raise LookupError(f"no reader {name!r}")

    @property
    def pinpad(self) -> PinPadHandle:
        """The first reader's PIN pad."""
        return self.reader().pinpad

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
    pinpad: bool = False,
    keypad: str | None = None,
) -> Iterator[UsbccidServer]:
    """Run a server on a thread of this process for the duration of the block.

    Args:
        config: what to serve; default: one reader with the default card, on a free port
            of 127.0.0.1. Its ``state_dir`` is replaced by ``state_dir`` when given.
        state_dir: default: a temporary directory, removed afterwards.
        template: a state directory to copy first (e.g. one holding a pre-made card).
        pinpad: give every reader a PIN pad.
        keypad: give every reader a PIN pad that types these digits, or the card's PIN
            (``"card-pin"``), by itself.
    """
    with contextlib.ExitStack() as stack:
        if state_dir is None:
            state_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="usbccid-")))
        if template is not None:
            shutil.copytree(template, state_dir, dirs_exist_ok=True)
        config = (
            _default_config(state_dir) if config is None else replace(config, state_dir=state_dir)
        )
        if pinpad or keypad is not None:
            config = cfg.with_overrides(config, pinpad=pinpad, keypad=keypad)
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
