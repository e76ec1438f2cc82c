"""A server on an asyncio event loop of its own, in a background thread.

Tests, the benchmarks and the pyusb backend run a front end's server beside blocking code:
the server lives on its loop in a daemon thread, and the blocking side reaches it only
through :meth:`LoopThread.on_loop`, which runs a coroutine there and waits for its result
(the servers are single-threaded). A subclass says how its server is opened on the loop
and closed when the thread stops.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")

#: how long :meth:`LoopThread.on_loop` waits for the loop's answer, and :meth:`stop` for
#: the thread, in seconds
CALL_TIMEOUT = 30
STOP_TIMEOUT = 10


class LoopThread(Generic[S]):
    """Runs the server that :meth:`open` makes on a new event loop in a daemon thread,
    from :meth:`start_thread` until :meth:`stop` (which awaits :meth:`shut` first)."""

    def __init__(self, name: str, what: str) -> None:
        """``name`` names the thread; ``what`` the server, in the error of a failed start."""
        self.what = what
        self.server: S | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    async def open(self) -> S:
        """Make (and start) the server, on the loop."""
        raise NotImplementedError

    async def shut(self, server: S) -> None:
        """Close the server, on the loop, as the thread stops."""
        raise NotImplementedError

    def _main(self) -> None:
        try:
            asyncio.run(self._run())
        except BaseException as e:  # reported to the starting thread
            self._error = e
            self._ready.set()

    async def _run(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self.server = await self.open()
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self.shut(self.server)

    def start_thread(self) -> S:
        """Start the thread and wait until the server is open; the server.

        Raises:
            RuntimeError: :meth:`open` failed (the cause is chained).
        """
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise RuntimeError(f"{self.what} failed to start") from self._error
        assert self.server is not None
        return self.server

    def stop(self) -> None:
        """Close the server and end the thread (no-op if it is not running)."""
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=STOP_TIMEOUT)

    def on_loop(self, coro: Callable[[S], Awaitable[T]]) -> T:
        """``await coro(server)`` on the server's loop, from another thread; its result."""
        assert self._loop is not None, "not started"
        assert self.server is not None
        server = self.server

        async def in_loop() -> T:
            return await coro(server)

        return asyncio.run_coroutine_threadsafe(in_loop(), self._loop).result(CALL_TIMEOUT)
