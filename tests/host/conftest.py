"""The real asyncio USB/IP server (usbccid.frontends.usbip.server.ServerThread), loopback device."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from usbccid.frontends.usbip.server import ServerThread
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import InterfaceSpec
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, LoopbackFunction

# A CCID class descriptor (CCID rev 1.10 §5.1, 54 bytes, type 0x21), to ride along as the
# second device's interface extra.
CCID_CLASS_DESCRIPTOR = bytes.fromhex(
    "36 21 1001 00 07 01000000 a00f0000 a00f0000 00 80250000 00c20100 00"
    " fe000000 00000000 00000000 fe000400 0f010000 ff ff 0000 00 01"
)


class ExtraLoopback(LoopbackFunction):
    """The loopback function with a class descriptor after its interface descriptor."""

    @property
    def interface(self) -> InterfaceSpec:
        spec = super().interface
        return InterfaceSpec(
            spec.interface_class,
            spec.interface_subclass,
            spec.interface_protocol,
            spec.endpoints,
            extra=CCID_CLASS_DESCRIPTOR,
            name=spec.name,
        )


@dataclass
class Served:
    host: str
    port: int
    thread: ServerThread
    loopback: LoopbackFunction  # exported as "1-1"
    extra: ExtraLoopback  # exported as "1-2"
    devices: tuple[VirtualDevice, VirtualDevice]


@pytest.fixture
def served() -> Iterator[Served]:
    loopback = LoopbackFunction()
    extra = ExtraLoopback()
    devices = (VirtualDevice(LOOPBACK_IDENTITY, loopback), VirtualDevice(LOOPBACK_IDENTITY, extra))
    thread = ServerThread(Exporter(devices))
    host, port = thread.start()
    try:
        yield Served(host, port, thread, loopback, extra, devices)
    finally:
        thread.stop()
