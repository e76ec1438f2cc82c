"""Keep the local pcscd up while a card is served through its vpcd driver.

Debian runs pcscd on demand: systemd's ``pcscd.socket`` starts it when a PC/SC client
connects, and ``pcscd.service`` runs ``pcscd --foreground --auto-exit``, which quits 60 s
after the last client left (pcsc-lite ``pcscdaemon.c``, ``TIME_BEFORE_SUICIDE``). vpcd's
TCP connection is no PC/SC client, so left alone the card would vanish a minute after
every command, vpcd's port with it, and come back a second into the next client's run:
too late for a command-line tool that looks once.

So, while a card is in a local vpcd slot, the front end holds one PC/SC context with
pcscd, as any long-running client does: establishing it starts a socket-activated pcscd
(and so vpcd listens), and while it exists pcscd's exit alarm stays off (pcsc-lite
``winscard_svc.c``: ``alarm(0)`` when a context thread starts, the alarm again only when
the last one ends). The calls go through libpcsclite (``winscard.h``), loaded with
ctypes when first needed; they block (the library talks to pcscd over its socket), so
the shell makes them on a thread. Without libpcsclite nothing is kept, and nothing
breaks: vpcd then simply comes and goes with pcscd.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from typing import Final

log = logging.getLogger(__name__)

LIBRARY: Final = "libpcsclite.so.1"
SCARD_SCOPE_SYSTEM: Final = 2  # pcsclite.h
SCARD_S_SUCCESS: Final = 0
SCARD_E_NO_READERS_AVAILABLE: Final = 0x8010002E  # the daemon answered: it is up


class PcscdKeepAlive:
    """One PC/SC context, established again whenever pcscd is gone. Thread-safe."""

    def __init__(self, library: str = LIBRARY) -> None:
        self.library = library
        self._lib: ctypes.CDLL | None = None
        self._context: ctypes.c_long | None = None
        self._lock = threading.Lock()
        self.last_error: str | None = None

    @property
    def held(self) -> bool:
        return self._context is not None

    def ensure(self) -> bool:
        """Hold a live context (starting pcscd if it is socket-activated); False, with
        :attr:`last_error` set, when there is no pcscd or no libpcsclite."""
        with self._lock:
            lib = self._load()
            if lib is None:
                return False
            if self._context is not None:
                needed = ctypes.c_ulong(0)
                rv = lib.SCardListReaders(self._context, None, None, ctypes.byref(needed))
                if _code(rv) in (SCARD_S_SUCCESS, SCARD_E_NO_READERS_AVAILABLE):
                    return True
                lib.SCardReleaseContext(self._context)  # pcscd went away: a new one
                self._context = None
            context = ctypes.c_long(0)
            rv = lib.SCardEstablishContext(SCARD_SCOPE_SYSTEM, None, None, ctypes.byref(context))
            if _code(rv) != SCARD_S_SUCCESS:
                self.last_error = f"no PC/SC context with pcscd (0x{_code(rv):08X})"
                return False
            self._context = context
            self.last_error = None
            return True

    def release(self) -> None:
        with self._lock:
            if self._context is not None and self._lib is not None:
                self._lib.SCardReleaseContext(self._context)
            self._context = None

    def _load(self) -> ctypes.CDLL | None:
        if self._lib is None:
            try:
                lib = ctypes.CDLL(self.library)
            except OSError as exc:
                self.last_error = f"cannot load {self.library}: {exc}"
                return None
            # winscard.h on Linux: LONG and SCARDCONTEXT are C longs, DWORD unsigned long.
            lib.SCardEstablishContext.argtypes = [
                ctypes.c_ulong,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_long),
            ]
            lib.SCardEstablishContext.restype = ctypes.c_long
            lib.SCardListReaders.argtypes = [
                ctypes.c_long,
                ctypes.c_char_p,
                ctypes.c_char_p,
                ctypes.POINTER(ctypes.c_ulong),
            ]
            lib.SCardListReaders.restype = ctypes.c_long
            lib.SCardReleaseContext.argtypes = [ctypes.c_long]
            lib.SCardReleaseContext.restype = ctypes.c_long
            self._lib = lib
        return self._lib


def _code(rv: int) -> int:
    return rv & 0xFFFFFFFF
