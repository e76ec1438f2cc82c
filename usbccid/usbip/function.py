"""The interface between the virtual USB device and the class code behind it.

The device model (``usbccid.usbip.device``) answers the standard requests of USB 2.0 §9.4
itself and hands everything else to a *function*: class and vendor control requests
addressed to its interface, and the traffic of its endpoints. The CCID reader
(``usbccid.ccid``) is such a function. A function knows nothing of USB/IP.

IN transfers are pulled, not pushed: the device parks every bulk-IN and interrupt-IN URB
(USB 2.0 §8.5.2: the device NAKs until it has data) and asks the function with
:meth:`UsbFunction.poll_in` whenever something may have changed.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from usbccid.jobs import Job


class TransferType(enum.IntEnum):
    """bmAttributes bits 1..0 of an endpoint descriptor (USB 2.0 §9.6.6)."""

    CONTROL = 0
    ISOCHRONOUS = 1
    BULK = 2
    INTERRUPT = 3


@dataclass(frozen=True, slots=True)
class SetupPacket:
    """The 8-byte SETUP packet of a control transfer (USB 2.0 §9.3), little-endian on the wire."""

    bmRequestType: int
    bRequest: int
    wValue: int
    wIndex: int
    wLength: int

    @property
    def direction_in(self) -> bool:
        return bool(self.bmRequestType & 0x80)

    @property
    def request_type(self) -> int:
        """0 standard, 1 class, 2 vendor (bmRequestType bits 6..5)."""
        return (self.bmRequestType >> 5) & 0x03

    @property
    def recipient(self) -> int:
        """0 device, 1 interface, 2 endpoint, 3 other (bmRequestType bits 4..0)."""
        return self.bmRequestType & 0x1F


@dataclass(frozen=True, slots=True)
class EndpointSpec:
    address: int  # bEndpointAddress: bit 7 set for IN
    transfer_type: TransferType
    max_packet_size: int
    interval: int = 0


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    endpoints: tuple[EndpointSpec, ...]
    extra: bytes = b""  # class-specific descriptors that follow the interface descriptor
    name: str | None = None  # the iInterface string


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """What the device descriptor and its strings say the device is."""

    vendor_id: int
    product_id: int
    bcd_device: int
    manufacturer: str
    product: str
    serial_number: str


class UsbFunction(Protocol):
    """Class code behind one interface of a virtual device."""

    @property
    def interface(self) -> InterfaceSpec: ...

    def reset(self) -> None:
        """Back to the power-on state: a new import, or SET_CONFIGURATION."""
        ...

    def control(self, setup: SetupPacket, data: bytes) -> bytes:
        """A class or vendor request to the interface; returns the IN data (or b"").

        Raises:
            Stall: the request is not supported (USB 2.0 §9.2.7 "Request Error").
        """
        ...

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        """Data of one OUT URB on ``endpoint`` (its address, bit 7 clear).

        Raises:
            UrbError: the URB fails with that status.
        """
        ...

    def poll_in(self, endpoint: int, max_length: int) -> bytes | None:
        """Data for a parked IN URB on ``endpoint`` (bit 7 set), at most ``max_length`` bytes.

        None keeps the URB parked. Returned bytes are consumed: the function never returns
        the same bytes twice.
        """
        ...

    def next_job(self, now: float) -> Job | None:
        """Work to run for the function (card operations); ``now`` is when it starts."""
        ...

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` should next be called, or None."""
        ...

    def handle_timer(self, now: float) -> None:
        """Time has reached :meth:`get_timer` (e.g. a CCID time extension is due)."""
        ...
