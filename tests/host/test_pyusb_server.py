"""pyusb's ordinary API, through our USB/IP backend, against the real asyncio server.

The device is ``usbccid.usbip.loopback`` (bulk OUT 0x01 echoes to bulk IN 0x82, vendor
request 0x03 queues reversed data on interrupt IN 0x83), exported by
``usbccid.frontends.usbip.server.ServerThread``; see ``conftest.py``.
"""

from __future__ import annotations

import array
import errno
import threading
import time
from typing import Any

import pytest
import usb.core
import usb.util

from tests.host.conftest import CCID_CLASS_DESCRIPTOR, Served
from usbccid.host.pdu import ImportRefusedError
from usbccid.host.pyusb_backend import RemoteDevice, UsbipBackend, attach, find
from usbccid.host.session import Session, list_devices
from usbccid.usbip.loopback import LOOPBACK_IDENTITY

VENDOR_OUT = usb.util.CTRL_OUT | usb.util.CTRL_TYPE_VENDOR | usb.util.CTRL_RECIPIENT_INTERFACE
VENDOR_IN = usb.util.CTRL_IN | usb.util.CTRL_TYPE_VENDOR | usb.util.CTRL_RECIPIENT_INTERFACE
BULK_OUT, BULK_IN, INTR_IN = 0x01, 0x82, 0x83


def open_loopback(served: Served, busid: str = "1-1") -> tuple[UsbipBackend, Any]:
    backend = UsbipBackend(served.host, served.port, busids=[busid])
    dev = usb.core.find(backend=backend)
    assert dev is not None
    dev.set_configuration()
    return backend, dev


def notify_by_job(dev: Any, data: bytes) -> None:
    """Vendor request 0x03: a job reverses ``data`` and sends it to interrupt IN."""
    assert dev.ctrl_transfer(VENDOR_OUT, 0x03, 0, 0, data) == len(data)


def test_enumeration(served: Served) -> None:
    first, second = list_devices(served.host, served.port)
    assert (first.busid, second.busid) == ("1-1", "1-2")
    assert (first.idVendor, first.idProduct) == (0x1209, 0x0001)
    assert first.devid == 0x00010001
    assert first.speed == 2
    assert (first.bConfigurationValue, first.bNumConfigurations) == (1, 1)
    assert first.interfaces == ((0xFF, 0, 0),)
    with UsbipBackend(served.host, served.port) as backend:
        devices = list(usb.core.find(find_all=True, backend=backend))
        assert [d.bus for d in devices] == [1, 1]
        assert [d.address for d in devices] == [1, 2]
        assert all(d.speed == usb.util.SPEED_FULL for d in devices)


def test_descriptors(served: Served) -> None:
    with attach(served.host, served.port, busid="1-1") as dev:
        assert (dev.idVendor, dev.idProduct) == (LOOPBACK_IDENTITY.vendor_id, 0x0001)
        assert dev.bcdDevice == LOOPBACK_IDENTITY.bcd_device
        assert dev.bMaxPacketSize0 == 64
        assert dev.manufacturer == LOOPBACK_IDENTITY.manufacturer
        assert dev.product == LOOPBACK_IDENTITY.product
        assert dev.serial_number == LOOPBACK_IDENTITY.serial_number
        cfg = dev[0]
        assert (cfg.bConfigurationValue, cfg.bNumInterfaces) == (1, 1)
        intf = cfg[(0, 0)]
        assert (intf.bInterfaceClass, intf.bNumEndpoints) == (0xFF, 3)
        assert usb.util.get_string(dev, intf.iInterface) == "loopback"
        assert intf.extra_descriptors == []
        eps = [
            (e.bEndpointAddress, usb.util.endpoint_type(e.bmAttributes), e.wMaxPacketSize)
            for e in intf
        ]
        assert eps == [
            (BULK_OUT, usb.util.ENDPOINT_TYPE_BULK, 64),
            (BULK_IN, usb.util.ENDPOINT_TYPE_BULK, 64),
            (INTR_IN, usb.util.ENDPOINT_TYPE_INTR, 8),
        ]
        assert intf[2].bInterval == 10


def test_class_descriptor_arrives_as_extra_descriptors(served: Served) -> None:
    with attach(served.host, served.port, busid="1-2") as dev:
        intf = dev[0][(0, 0)]
        assert bytes(intf.extra_descriptors) == CCID_CLASS_DESCRIPTOR
        assert [e.extra_descriptors for e in intf] == [[], [], []]
        assert dev[0].extra_descriptors == []
        assert dev[0].wTotalLength == 9 + 9 + 54 + 3 * 7


def test_control_transfers(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        assert dev.ctrl_transfer(VENDOR_OUT, 0x02, 0, 0, b"control data") == 12
        assert bytes(dev.ctrl_transfer(VENDOR_IN, 0x01, 0, 0, 64)) == b"control data"
        # A short read into a caller's buffer returns the count (libusb1 contract).
        buffer = array.array("B", bytes(4))
        assert dev.ctrl_transfer(VENDOR_IN, 0x01, 0, 0, buffer) == 4
        assert buffer.tobytes() == b"cont"
        # Standard requests (USB 2.0 §9.4).
        assert bytes(dev.ctrl_transfer(0x80, 0x00, 0, 0, 2)) == b"\x00\x00"  # GET_STATUS
        assert dev.get_active_configuration().bConfigurationValue == 1
        assert backend.get_configuration(backend.remote("1-1")) == 1
        dev.set_interface_altsetting(interface=0, alternate_setting=0)
        raw = bytes(dev.ctrl_transfer(0x80, 0x06, 0x0100, 0, 18))  # GET_DESCRIPTOR(DEVICE)
        assert raw[:2] == b"\x12\x01"
        assert int.from_bytes(raw[8:10], "little") == 0x1209


def test_stall_is_usberror_epipe(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        with pytest.raises(usb.core.USBError) as caught:
            dev.ctrl_transfer(VENDOR_IN, 0x55, 0, 0, 8)
        assert caught.value.errno == errno.EPIPE
        assert caught.value.backend_error_code == -errno.EPIPE
        # The control pipe recovers by itself with the next SETUP (USB 2.0 §8.5.3.4).
        assert dev.ctrl_transfer(VENDOR_OUT, 0x02, 0, 0, b"ok") == 2


def test_halted_endpoint_stalls_until_clear_halt(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        dev.ctrl_transfer(0x02, 0x03, 0, BULK_IN, None)  # SET_FEATURE(ENDPOINT_HALT)
        with pytest.raises(usb.core.USBError) as caught:
            dev.read(BULK_IN, 64, timeout=1000)
        assert caught.value.errno == errno.EPIPE
        dev.clear_halt(BULK_IN)  # CLEAR_FEATURE(ENDPOINT_HALT)
        assert dev.write(BULK_OUT, b"flowing") == 7
        assert bytes(dev.read(BULK_IN, 64, timeout=1000)) == b"flowing"


@pytest.mark.parametrize("size", [1, 64, 4096])
def test_bulk_echo(served: Served, size: int) -> None:
    backend, dev = open_loopback(served)
    payload = bytes(i % 251 for i in range(size))
    with backend:
        assert dev.write(BULK_OUT, payload) == size
        assert bytes(dev.read(BULK_IN, size)) == payload


def test_bulk_message_longer_than_the_in_urb_is_split(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        dev.write(BULK_OUT, b"0123456789")
        buffer = array.array("B", bytes(4))
        assert dev.read(BULK_IN, buffer) == 4
        assert buffer.tobytes() == b"0123"
        assert bytes(dev.read(BULK_IN, 64)) == b"456789"


def test_interrupt_in(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        notify_by_job(dev, b"\x50\x03")
        assert bytes(dev.read(INTR_IN, 8, timeout=2000)) == b"\x03\x50"
        served.thread.call(lambda: served.loopback.notify(b"\x50\x02"))
        assert bytes(dev.read(INTR_IN, 8, timeout=2000)) == b"\x50\x02"


def background_read(dev: Any, endpoint: int, timeout: int) -> tuple[threading.Thread, list[Any]]:
    """``dev.read`` on another thread; the list gets the bytes or the exception."""
    got: list[Any] = []

    def read() -> None:
        try:
            got.append(bytes(dev.read(endpoint, 8, timeout)))
        except usb.core.USBError as exc:
            got.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    return reader, got


def test_parked_in_urb_completes_when_a_job_finishes(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        reader, got = background_read(dev, INTR_IN, 10_000)
        deadline = time.monotonic() + 5
        while not served.thread.call(lambda: served.devices[0].parked_seqnums(INTR_IN)):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        notify_by_job(dev, b"later")  # nothing else happens on the link afterwards
        reader.join(2)  # well before the read's own timeout, which would unlink it
        assert got == [b"retal"]


def test_parked_in_urb_completes_while_bulk_traffic_flows(served: Served) -> None:
    backend, dev = open_loopback(served)
    device = served.devices[0]
    with backend:
        reader, got = background_read(dev, INTR_IN, 10_000)
        deadline = time.monotonic() + 5
        while not served.thread.call(lambda: device.parked_seqnums(INTR_IN)):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        for i in range(20):  # the parked URB does not hold the link up
            data = bytes([i]) * (i + 1)
            assert dev.write(BULK_OUT, data) == len(data)
            assert bytes(dev.read(BULK_IN, 64, timeout=1000)) == data
        assert got == []
        served.thread.call(lambda: served.loopback.notify(b"later"))
        reader.join(5)
        assert got == [b"later"]


def test_timeout_unlinks_and_no_late_completion_follows(served: Served) -> None:
    backend, dev = open_loopback(served)
    device = served.devices[0]
    with backend:
        session = backend.remote("1-1").session
        assert session is not None
        started = time.monotonic()
        with pytest.raises(usb.core.USBTimeoutError) as caught:
            dev.read(INTR_IN, 8, timeout=100)
        assert 0.09 < time.monotonic() - started < 2
        assert caught.value.errno == errno.ETIMEDOUT
        assert caught.value.backend_error_code == -errno.ECONNRESET  # RET_UNLINK status
        assert served.thread.call(lambda: device.parked_count) == 0
        # Data arriving now must go to the next URB, not to the unlinked one: a
        # RET_SUBMIT for the unlinked seqnum would be a ProtocolError in the session.
        served.thread.call(lambda: served.loopback.notify(b"fresh"))
        time.sleep(0.05)
        assert session.failure is None
        assert bytes(dev.read(INTR_IN, 8, timeout=2000)) == b"fresh"
        # Unlinking a bulk IN leaves the echo queue intact for the next read.
        with pytest.raises(usb.core.USBTimeoutError):
            dev.read(BULK_IN, 64, timeout=50)
        dev.write(BULK_OUT, b"queued")
        assert bytes(dev.read(BULK_IN, 64, timeout=1000)) == b"queued"
        assert session.failure is None


def test_import_is_exclusive_until_disposed(served: Served) -> None:
    first = find(served.host, served.port, busid="1-1")
    assert first is not None
    # Imported devices are not listed any more (usbipd lists only available ones) ...
    assert [d.busid for d in list_devices(served.host, served.port)] == ["1-2"]
    assert find(served.host, served.port, busid="1-1") is None
    # ... and importing one anyway is refused with ST_DEV_BUSY.
    with pytest.raises(ImportRefusedError) as refused:
        Session(served.host, served.port, busid="1-1")
    assert refused.value.status == 2
    with UsbipBackend(served.host, served.port) as other:
        stale = RemoteDevice(served.host, served.port, first.backend.remote("1-1").exported)
        with pytest.raises(usb.core.USBError) as caught:
            other.open_device(stale)
        assert caught.value.errno == errno.EBUSY
    usb.util.dispose_resources(first)  # closes the import's TCP connection
    first.backend.close()
    second = find(served.host, served.port, busid="1-1")
    assert second is not None
    assert second.product == LOOPBACK_IDENTITY.product
    second.backend.close()


def test_find_prefilters_on_devlist_fields(served: Served) -> None:
    assert find(served.host, served.port, idVendor=0xDEAD) is None
    devices = list(find(served.host, served.port, find_all=True, idProduct=0x0001))
    assert len(devices) == 2
    devices[0].backend.close()
    devices[1].backend.close()


def test_reset_device_reimports(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        before = served.thread.call(lambda: served.loopback.resets)
        dev.write(BULK_OUT, b"stale")
        dev.reset()
        assert served.thread.call(lambda: served.loopback.resets) > before
        dev.set_configuration()
        with pytest.raises(usb.core.USBTimeoutError):
            dev.read(BULK_IN, 64, timeout=50)  # the echo queue went with the reset


def test_kernel_driver_and_claim_calls_are_harmless(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        assert dev.is_kernel_driver_active(0) is False
        dev.detach_kernel_driver(0)
        usb.util.claim_interface(dev, 0)
        usb.util.release_interface(dev, 0)
        dev.attach_kernel_driver(0)


def test_server_gone_is_usberror_enodev(served: Served) -> None:
    backend, dev = open_loopback(served)
    with backend:
        session = backend.remote("1-1").session
        assert session is not None
        served.thread.stop()  # closes every connection
        session._reader.join(5)
        assert session.closed
        with pytest.raises(usb.core.USBError) as caught:
            dev.write(BULK_OUT, b"x", timeout=1000)
        assert caught.value.errno == errno.ENODEV
