"""The control socket: a UNIX datagram socket (mode 0600), one request per datagram.

A thin shell around :func:`usbccid.tool.control.handle_request`: receive a datagram, answer
the sender with the reply. :func:`request` is the client's side (``usbccid ctl``), a
blocking socket bound to an abstract address so that the server can answer it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
from pathlib import Path

import asyncio_dgram

from usbccid.errors import UsbccidError
from usbccid.tool.control import (
    MAX_DATAGRAM,
    SOCKET_NAME,
    ControlError,
    ServerState,
    handle_request,
)

log = logging.getLogger(__name__)

_MAX_PATH = 107  # sizeof(sun_path) - 1


class ControlSocketError(UsbccidError):
    """The control socket cannot be created or reached. One line, for stderr."""


def socket_path(state_dir: Path, runtime_dir: str | None = None) -> Path:
    """Where the control socket of a server is: ``$RUNTIME_DIRECTORY`` or the state dir."""
    base = Path(runtime_dir.split(":")[0]) if runtime_dir else state_dir
    return base / SOCKET_NAME


def _check_length(path: Path) -> None:
    if len(os.fsencode(path)) > _MAX_PATH:
        raise ControlSocketError(f"control socket path is too long for a UNIX socket: {path}")


class ControlServer:
    """Serves :func:`handle_request` on the UNIX datagram socket ``path``."""

    def __init__(self, path: Path, state: ServerState) -> None:
        self.path = path
        self._state = state
        self._stream: asyncio_dgram.aio.DatagramServer | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        _check_length(self.path)
        if self.path.exists() or self.path.is_symlink():
            if await asyncio.to_thread(probe, self.path):
                raise ControlSocketError(
                    f"another usbccid server is running with control socket {self.path}"
                )
            self.path.unlink()  # left behind by a server that died
        # Bind under a temporary name, restrict it, then rename into place: no moment at
        # which the socket is reachable with a wider mode.
        tmp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            sock.bind(str(tmp))
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
            sock.setblocking(False)
            stream = await asyncio_dgram.from_socket(sock)
            assert isinstance(stream, asyncio_dgram.aio.DatagramServer)
            self._stream = stream
        except OSError as exc:
            sock.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise ControlSocketError(
                f"cannot create control socket {self.path}: {exc.strerror or exc}"
            ) from None
        self._task = asyncio.create_task(self._serve(), name="usbccid-control")
        log.debug("control socket at %s", self.path)

    async def _serve(self) -> None:
        stream = self._stream
        assert stream is not None
        while True:
            try:
                data, addr = await stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError as exc:
                # a send error reported late (a client gone before its answer): go on
                log.debug("control socket: %s", exc)
                continue
            reply = handle_request(data, self._state)
            if not addr:
                continue  # an unbound sender cannot be answered
            try:
                await stream.send(reply, addr)
            except (OSError, asyncio_dgram.TransportClosed) as exc:
                log.debug("cannot answer control client %r: %s", addr, exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._stream is not None:
            self._stream.close()
            self._stream = None
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def request(path: Path, payload: bytes, timeout: float = 5.0) -> bytes:
    """Send one request datagram to the server at ``path`` and return its reply.

    Raises:
        ControlSocketError: no server is listening there, or it does not answer.
    """
    _check_length(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        # An abstract address (Linux): the server can answer, and nothing to clean up.
        sock.bind(f"\0usbccid-ctl-{os.getpid()}-{secrets.token_hex(6)}")
        sock.settimeout(timeout)
        try:
            sock.connect(str(path))
        except FileNotFoundError:
            raise ControlSocketError(
                f"no usbccid server running (no control socket at {path})"
            ) from None
        except ConnectionRefusedError:
            raise ControlSocketError(
                f"no usbccid server running (stale control socket at {path})"
            ) from None
        except PermissionError:
            raise ControlSocketError(
                f"permission denied on control socket {path} (run as the server's user)"
            ) from None
        except OSError as exc:
            raise ControlSocketError(f"cannot reach control socket {path}: {exc}") from None
        try:
            sock.send(payload)
            return sock.recv(MAX_DATAGRAM)
        except TimeoutError:
            raise ControlSocketError(f"the server did not answer on {path}") from None
        except OSError as exc:
            if exc.errno == errno.ECONNREFUSED:
                raise ControlSocketError(f"no usbccid server running at {path}") from None
            raise ControlSocketError(f"control socket {path}: {exc}") from None
    finally:
        sock.close()


def probe(path: Path, timeout: float = 1.0) -> bool:
    """Whether a server answers on ``path``."""
    try:
        request(path, b'{"command":"status"}', timeout)
    except (ControlSocketError, ControlError):
        return False
    return True
