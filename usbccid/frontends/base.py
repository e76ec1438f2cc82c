"""What every front end gives the composition root: readers that hold cards.

A front end is how hosts reach readers: ``usbip`` exports each reader as a USB CCID device
over USB/IP; ``vpcd`` connects each slot to vsmartcard's vpcd driver of pcscd;
``vscard`` is one reader per ``ccid-card-passthru`` device of a QEMU, inside QEMU's own
usb-ccid. It builds one
:class:`FrontendReader` per configured reader (``add_reader``), runs whatever listening or
connecting it needs between ``start`` and ``close``, and reports who is connected. It
knows nothing of where cards come from: the composition root (``usbccid.tool.app``) loads
them (``usbccid.cards``) and inserts fresh :class:`~usbccid.card.Card` objects.
"""

from __future__ import annotations

from typing import ClassVar, Protocol

from usbccid.card import Card
from usbccid.ccid.pinpad import PinPad
from usbccid.errors import UsbccidError
from usbccid.tool.config import ReaderConfig
from usbccid.usbip.function import DeviceIdentity


class FrontendError(UsbccidError):
    """A front end cannot serve its configuration, or cannot start. One line, for stderr."""


class FrontendReader(Protocol):
    """One reader of a front end, as the composition root drives it."""

    @property
    def address(self) -> str:
        """Where hosts find it, e.g. the USB/IP bus id "1-1"."""
        ...

    @property
    def identity(self) -> DeviceIdentity | None:
        """The reader's USB identity (what pcscd shows as the reader's name); None for a
        reader that is no USB device of ours (vpcd: pcscd names it after its reader.conf;
        vscard: the device is QEMU's usb-ccid)."""
        ...

    @property
    def client(self) -> str | None:
        """The host using it now (the importer's address), or None."""
        ...

    def insert(self, slot: int, card: Card) -> None:
        """Put ``card`` into the empty ``slot`` (the host sees an insertion)."""
        ...

    def remove(self, slot: int) -> None:
        """Take the card out of ``slot`` (the host sees a removal)."""
        ...

    def slot_state(self, slot: int) -> str:
        """ "empty", "present" (card in, not powered) or "active" (powered)."""
        ...

    def slot_detail(self, slot: int) -> str | None:
        """More about the slot for ``ctl status`` (vpcd: connected or why not; vscard:
        which QEMU has it), or None."""
        ...


class PinPadReader(FrontendReader, Protocol):
    """A reader that may have a PIN pad (the USB/IP CCID reader): ``pinpad`` is its keypad
    (:class:`usbccid.ccid.pinpad.PinPad`) or None. Front ends without PC_to_RDR_Secure
    need not have the attribute; the composition root asks with ``getattr``."""

    @property
    def pinpad(self) -> PinPad | None: ...


class Frontend(Protocol):
    """A way for hosts to reach readers (one instance serves all readers of its kind)."""

    #: whether readers come and go while running (:meth:`add_reader` and
    #: :meth:`remove_reader` after :meth:`start`): USB/IP devices are plugged in and out
    #: of a running server; a vpcd or VSCard reader is a connection or a listening
    #: endpoint of its own, made at start, so its readers change only by a restart
    hot_plug: ClassVar[bool]

    def add_reader(self, config: ReaderConfig) -> FrontendReader:
        """Build the reader ``config`` describes (before :meth:`start`, or while running:
        hosts see it plugged in).

        Raises:
            FrontendError: the configuration cannot be served.
        """
        ...

    def remove_reader(self, reader: FrontendReader) -> None:
        """Take away a reader :meth:`add_reader` made (also while running): hosts see it
        unplugged."""
        ...

    async def start(self) -> None:
        """Listen or connect.

        Raises:
            FrontendError: cannot (a port in use...).
        """
        ...

    async def close(self) -> None:
        """Stop; every host sees its readers go away."""
        ...

    def poke(self) -> None:
        """Something changed outside a host's request (a card inserted): tell the hosts."""
        ...

    def counters(self) -> dict[str, int]:
        """Totals for ``ctl status`` (connections, refused, ...)."""
        ...

    def banner(self) -> list[str]:
        """What a human needs to know to connect (printed at start)."""
        ...
