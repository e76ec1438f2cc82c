"""Work that a sans-IO layer hands to its driver to run, possibly off the event loop.

A card operation can be slow (a 4096-bit RSA key, a PKCS#11 token, a real card). The CCID
reader does not call the card itself: it hands out a :class:`Job`, and whoever drives the
stack (the asyncio shell, or a test calling ``run()`` then ``finish()`` inline) runs it.
``run`` touches only the card; ``finish`` hands the result back to the protocol layer and
must be called on the same thread as every other call into the stack.
"""

from __future__ import annotations

from typing import Protocol


class Job(Protocol):
    @property
    def blocking(self) -> bool:
        """True when ``run`` may take long enough that it must leave the event loop."""
        ...

    def run(self) -> None:
        """Do the work. May run on another thread; touches nothing but the card."""
        ...

    def finish(self) -> None:
        """Deliver the result to the protocol layer (on the driver's own thread)."""
        ...
