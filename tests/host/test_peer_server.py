"""Our pyusb backend against a USB/IP server we did not write: PyPI ``usbip`` 0.7.0's
device side (jabezwinston/usbip-python). With ``test_peer_client.py`` (their client
against our server) this closes the square: a bug that our client and server share
cannot pass both.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import usb.core
import usb.util
import usbip

from usbccid.host.pyusb_backend import UsbipBackend
from usbccid.host.session import list_devices


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Echo(usbip.Interface):  # type: ignore[misc]
    ep_out = usbip.Out(0x02)
    ep_in = usbip.In(0x82)
    ep_int = usbip.In(0x81, "interrupt", mps=8, interval=10)

    def on_out(self, ep: Any, data: bytes) -> None:
        self.ep_in.write(data)


@pytest.fixture
def peer() -> Iterator[tuple[int, Echo]]:
    port = free_port()
    dev = usbip.USBDevice(0x1209, 0x0002, product="peer", manufacturer="usbip-python")
    echo = Echo()
    dev.add(echo)
    dev.plug(via=usbip.USBIP("127.0.0.1", port))
    try:
        yield port, echo
    finally:
        dev.unplug()


def test_list_import_and_transfer(peer: tuple[int, Echo]) -> None:
    port, echo = peer
    (exported,) = list_devices("127.0.0.1", port)
    assert (exported.idVendor, exported.idProduct, exported.busid) == (0x1209, 2, "1-1")
    assert exported.interfaces == ((0xFF, 0, 0),)
    with UsbipBackend("127.0.0.1", port) as backend:
        dev = usb.core.find(backend=backend, idVendor=0x1209)
        assert dev is not None
        assert dev.product == "peer"
        dev.set_configuration()
        assert dev.get_active_configuration().bConfigurationValue == 1
        assert dev.write(0x02, b"ping") == 4
        assert bytes(dev.read(0x82, 64)) == b"ping"
        # A parked interrupt-IN that completes while other traffic goes on.
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.append(bytes(dev.read(0x81, 8, 5000))))
        reader.start()
        time.sleep(0.05)
        assert dev.write(0x02, b"bulk meanwhile") == 14
        assert bytes(dev.read(0x82, 64)) == b"bulk meanwhile"
        echo.ep_int.write(b"\x50\x03")
        reader.join(5)
        assert got == [b"\x50\x03"]
        # A timeout unlinks; the link stays usable.
        with pytest.raises(usb.core.USBTimeoutError):
            dev.read(0x81, 8, timeout=50)
        assert dev.write(0x02, b"after") == 5
        assert bytes(dev.read(0x82, 64)) == b"after"
        usb.util.dispose_resources(dev)
