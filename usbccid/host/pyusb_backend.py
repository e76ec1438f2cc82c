"""A pyusb backend that drives a device exported over USB/IP (TCP), with no kernel help.

    import usb.core, usb.util
    from usbccid.host.pyusb_backend import UsbipBackend

    with UsbipBackend("127.0.0.1", 3240) as backend:
        dev = usb.core.find(backend=backend, idVendor=0x08E6)
        dev.set_configuration()
        dev.write(0x02, b"...")
        reply = dev.read(0x82, 4096, timeout=1000)

or ``find("127.0.0.1", 3240, busid="1-1")`` / ``with attach("127.0.0.1") as dev:``.

How pyusb's ``IBackend`` maps onto USB/IP (Linux ``Documentation/usb/usbip_protocol.rst``):

* ``enumerate_devices``: OP_REQ_DEVLIST on a fresh connection.
* ``open_device``: OP_REQ_IMPORT on a connection of its own (a :class:`Session`). The
  descriptors pyusb asks for before opening are read over the same import with
  GET_DESCRIPTOR control URBs (USB 2.0 §9.4.3) and parsed by
  :mod:`usbccid.host.descriptors`, independently of the server's declarations. So
  building a ``usb.core.Device`` imports it: the device is busy for other clients until
  :meth:`UsbipBackend.close_device` (``usb.util.dispose_resources``) or
  :meth:`UsbipBackend.close`.
* transfers: one CMD_SUBMIT each; a timeout unlinks (CMD_UNLINK, RET_UNLINK) and raises
  ``usb.core.USBTimeoutError``; a RET_SUBMIT status -EPIPE (stall) raises
  ``usb.core.USBError`` with errno EPIPE.
* standard requests (SET_CONFIGURATION, GET_CONFIGURATION, SET_INTERFACE,
  CLEAR_FEATURE(ENDPOINT_HALT)) are control URBs, USB 2.0 §9.4.
* claiming interfaces and the kernel-driver calls are no-ops: nothing else on this host
  owns the device.
* a session the server closed (or that broke the protocol) is not replaced behind the
  caller's back: every call fails with ENODEV (EPROTO) until the handle is closed and the
  device opened again, as libusb answers LIBUSB_ERROR_NO_DEVICE after an unplug.
* ``reset_device``: USB/IP has no reset operation and vhci handles port resets itself,
  so the device never sees one; a new import is the only reset it knows. We close the
  import and import again.

Buffers and return values follow pyusb's ``backend/libusb1.py`` (the de facto contract):
reads fill the given ``array.array`` and return a byte count, writes return a byte count,
timeouts are in milliseconds and 0 means no timeout.

pyusb is untyped, so this class does not subclass ``usb.backend.IBackend``; pyusb only
calls the methods (its docstring: "everything that behaves like an IBackend is an
IBackend").
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import struct
import threading
import time
import weakref
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

import usb.core
import usb.util

from usbccid.host.descriptors import (
    DT_CONFIG,
    DT_DEVICE,
    ConfigurationDescriptor,
    DeviceDescriptor,
    EndpointDescriptor,
    InterfaceDescriptor,
    parse_configuration,
    parse_device,
    total_length,
)
from usbccid.host.pdu import (
    ConnectionClosedError,
    ExportedDevice,
    HostError,
    ImportRefusedError,
    SubmitDone,
    UrbTimeoutError,
)
from usbccid.host.session import USBIP_PORT, Session, list_devices

__all__ = ["RemoteDevice", "UsbipBackend", "attach", "find"]

# Standard request codes, USB 2.0 Table 9-4, and feature selector Table 9-6.
CLEAR_FEATURE = 1
GET_DESCRIPTOR = 6
GET_CONFIGURATION = 8
SET_CONFIGURATION = 9
SET_INTERFACE = 11
ENDPOINT_HALT = 0
# bmRequestType, USB 2.0 Table 9-2: direction | type | recipient.
_IN_STANDARD_DEVICE = 0x80
_OUT_STANDARD_DEVICE = 0x00
_OUT_STANDARD_INTERFACE = 0x01
_OUT_STANDARD_ENDPOINT = 0x02

# Device descriptor fields that OP_REP_DEVLIST also carries (usbip_protocol.rst).
_LISTED_FIELDS = frozenset(
    (
        "idVendor",
        "idProduct",
        "bcdDevice",
        "bDeviceClass",
        "bDeviceSubClass",
        "bDeviceProtocol",
        "bNumConfigurations",
    )
)
_DESCRIPTOR_TIMEOUT_MS = 5000
_REIMPORT_GRACE = 2.0  # seconds a server may take to free a device after a close
_ST_DEV_BUSY = 2

# enum usb_device_speed (Linux, USB/IP "speed") -> libusb/pyusb speed codes.
_SPEEDS = {
    1: usb.util.SPEED_LOW,
    2: usb.util.SPEED_FULL,
    3: usb.util.SPEED_HIGH,
    4: usb.util.SPEED_HIGH,  # wireless USB: 480 Mbit/s class
    5: usb.util.SPEED_SUPER,
    6: 5,  # SUPER_PLUS: libusb's LIBUSB_SPEED_SUPER_PLUS, no pyusb constant
}


@dataclass(eq=False)
class RemoteDevice:
    """pyusb's device identification object (and device handle) for one exported device."""

    host: str
    port: int
    exported: ExportedDevice
    session: Session | None = None
    device: DeviceDescriptor | None = None
    configurations: tuple[ConfigurationDescriptor, ...] = ()
    intervals: dict[int, int] = field(default_factory=dict)  # bEndpointAddress -> bInterval
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def busid(self) -> str:
        return self.exported.busid


class _DeviceDescriptorView:
    """The device descriptor plus the bus position pyusb's ``Device`` reads from it."""

    def __init__(self, desc: DeviceDescriptor, exported: ExportedDevice) -> None:
        self._desc = desc
        self.bus: int | None = exported.busnum
        self.address: int | None = exported.devnum
        self.port_number: int | None = None
        self.port_numbers: tuple[int, ...] | None = None
        self.speed: int | None = _SPEEDS.get(exported.speed, usb.util.SPEED_UNKNOWN)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._desc, name)


class UsbipBackend:
    """pyusb backend over USB/IP to one server; a context manager that closes its imports."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = USBIP_PORT,
        *,
        busids: Collection[str] | None = None,
        prefilter: dict[str, int] | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        """``busids`` and ``prefilter`` (OP_REP_DEVLIST fields such as idVendor) narrow
        enumeration before anything is imported."""
        self.host = host
        self.port = port
        self.busids = frozenset(busids) if busids is not None else None
        self.prefilter = dict(prefilter or {})
        self.connect_timeout = connect_timeout
        self._devices: dict[str, RemoteDevice] = {}
        self._finalizer = weakref.finalize(self, _close_all, self._devices)

    # -- lifetime -------------------------------------------------------------------------

    def close(self) -> None:
        """Close every import this backend made (their devices become available again)."""
        self._finalizer()

    def __enter__(self) -> UsbipBackend:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def remote(self, busid: str) -> RemoteDevice:
        """The device object (and its :class:`Session`, once imported) for ``busid``."""
        return self._devices[busid]

    # -- enumeration and descriptors --------------------------------------------------------

    def enumerate_devices(self) -> list[RemoteDevice]:
        with _usb_errors():
            exported = list_devices(self.host, self.port, timeout=self.connect_timeout)
        found = []
        for info in exported:
            if self.busids is not None and info.busid not in self.busids:
                continue
            if any(getattr(info, k) != v for k, v in self.prefilter.items()):
                continue
            known = self._devices.get(info.busid)
            if known is None or known.exported != info:
                known = RemoteDevice(self.host, self.port, info)
                self._devices[info.busid] = known
            found.append(known)
        return found

    def get_parent(self, dev: RemoteDevice) -> None:
        return None

    def get_device_descriptor(self, dev: RemoteDevice) -> _DeviceDescriptorView:
        self._load_descriptors(dev)
        assert dev.device is not None
        return _DeviceDescriptorView(dev.device, dev.exported)

    def get_configuration_descriptor(
        self, dev: RemoteDevice, config: int
    ) -> ConfigurationDescriptor:
        self._load_descriptors(dev)
        if not 0 <= config < len(dev.configurations):
            raise IndexError(f"invalid configuration index {config}")
        return dev.configurations[config]

    def get_interface_descriptor(
        self, dev: RemoteDevice, intf: int, alt: int, config: int
    ) -> InterfaceDescriptor:
        cfg = self.get_configuration_descriptor(dev, config)
        if not 0 <= intf < len(cfg.interfaces):
            raise IndexError(f"invalid interface index {intf}")
        alternates = cfg.interfaces[intf]
        if not 0 <= alt < len(alternates):
            raise IndexError(f"invalid alternate setting index {alt}")
        return alternates[alt]

    def get_endpoint_descriptor(
        self, dev: RemoteDevice, ep: int, intf: int, alt: int, config: int
    ) -> EndpointDescriptor:
        interface = self.get_interface_descriptor(dev, intf, alt, config)
        if not 0 <= ep < len(interface.endpoints):
            raise IndexError(f"invalid endpoint index {ep}")
        return interface.endpoints[ep]

    def _load_descriptors(self, dev: RemoteDevice) -> None:
        """Device and all configuration descriptors, once per device (USB 2.0 §9.4.3)."""
        if dev.device is not None:
            return
        session = self._session(dev)
        raw = self._get_descriptor(session, DT_DEVICE, 0, 18)
        device = parse_device(raw)
        configurations = []
        for index in range(device.bNumConfigurations):
            # The first 9 bytes hold wTotalLength; then the whole set (§9.4.3).
            head = self._get_descriptor(session, DT_CONFIG, index, 9)
            whole = self._get_descriptor(session, DT_CONFIG, index, total_length(head))
            with _usb_errors():
                configurations.append(parse_configuration(whole))
        dev.configurations = tuple(configurations)
        dev.intervals = {
            ep.bEndpointAddress: ep.bInterval
            for cfg in dev.configurations
            for alternates in cfg.interfaces
            for interface in alternates
            for ep in interface.endpoints
        }
        dev.device = device

    def _get_descriptor(self, session: Session, dtype: int, index: int, length: int) -> bytes:
        setup = struct.pack(
            "<BBHHH", _IN_STANDARD_DEVICE, GET_DESCRIPTOR, (dtype << 8) | index, 0, length
        )
        done = _complete(
            session, 0x80, setup=setup, length=length, timeout_ms=_DESCRIPTOR_TIMEOUT_MS
        )
        return done.data

    # -- opening --------------------------------------------------------------------------

    def open_device(self, dev: RemoteDevice) -> RemoteDevice:
        self._session(dev)
        return dev

    def close_device(self, dev_handle: RemoteDevice) -> None:
        with dev_handle.lock:
            session, dev_handle.session = dev_handle.session, None
        if session is not None:
            session.close()

    def _session(self, dev: RemoteDevice) -> Session:
        """The device's import, made on first use.

        A session that died (server closed it, protocol error) is not silently replaced:
        like libusb's LIBUSB_ERROR_NO_DEVICE, every later call fails with ENODEV until the
        handle is closed (``usb.util.dispose_resources``) and the device opened again.
        """
        with dev.lock:
            if dev.session is None:
                with _usb_errors():
                    dev.session = self._import(dev.busid)
            elif dev.session.failure is not None:
                with _usb_errors():
                    raise dev.session.failure
            return dev.session

    def _import(self, busid: str) -> Session:
        deadline = time.monotonic() + _REIMPORT_GRACE
        while True:
            try:
                return Session(self.host, self.port, busid=busid, timeout=self.connect_timeout)
            except ImportRefusedError as refused:
                # A server frees a device when it sees our previous TCP connection close,
                # which may be a moment after we closed it.
                if refused.status != _ST_DEV_BUSY or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # -- standard requests ----------------------------------------------------------------

    def set_configuration(self, dev_handle: RemoteDevice, config_value: int) -> None:
        self._standard(dev_handle, _OUT_STANDARD_DEVICE, SET_CONFIGURATION, config_value, 0)

    def get_configuration(self, dev_handle: RemoteDevice) -> int:
        setup = struct.pack("<BBHHH", _IN_STANDARD_DEVICE, GET_CONFIGURATION, 0, 0, 1)
        done = _complete(
            self._session(dev_handle),
            0x80,
            setup=setup,
            length=1,
            timeout_ms=_DESCRIPTOR_TIMEOUT_MS,
        )
        if done.actual_length != 1:
            raise usb.core.USBError("GET_CONFIGURATION returned no byte", None, errno.EIO)
        return done.data[0]

    def set_interface_altsetting(
        self, dev_handle: RemoteDevice, intf: int, altsetting: int
    ) -> None:
        self._standard(dev_handle, _OUT_STANDARD_INTERFACE, SET_INTERFACE, altsetting, intf)

    def clear_halt(self, dev_handle: RemoteDevice, ep: int) -> None:
        self._standard(dev_handle, _OUT_STANDARD_ENDPOINT, CLEAR_FEATURE, ENDPOINT_HALT, ep)

    def _standard(
        self, dev_handle: RemoteDevice, bm_request_type: int, request: int, value: int, index: int
    ) -> None:
        setup = struct.pack("<BBHHH", bm_request_type, request, value, index, 0)
        _complete(self._session(dev_handle), 0x00, setup=setup, timeout_ms=_DESCRIPTOR_TIMEOUT_MS)

    def claim_interface(self, dev_handle: RemoteDevice, intf: int) -> None:
        return None

    def release_interface(self, dev_handle: RemoteDevice, intf: int) -> None:
        return None

    def is_kernel_driver_active(self, dev_handle: RemoteDevice, intf: int) -> bool:
        return False

    def detach_kernel_driver(self, dev_handle: RemoteDevice, intf: int) -> None:
        return None

    def attach_kernel_driver(self, dev_handle: RemoteDevice, intf: int) -> None:
        return None

    def reset_device(self, dev_handle: RemoteDevice) -> None:
        """Close the import and import again: the only reset a USB/IP device sees."""
        self.close_device(dev_handle)
        self._session(dev_handle)

    # -- transfers ------------------------------------------------------------------------

    def ctrl_transfer(
        self,
        dev_handle: RemoteDevice,
        bm_request_type: int,
        b_request: int,
        w_value: int,
        w_index: int,
        data: array.array[int],
        timeout: int,
    ) -> int:
        """A control transfer on endpoint 0; direction from bmRequestType bit 7 (§9.3.1)."""
        length = len(data) * data.itemsize
        setup = struct.pack("<BBHHH", bm_request_type, b_request, w_value, w_index, length)
        session = self._session(dev_handle)
        if bm_request_type & 0x80:
            done = _complete(session, 0x80, setup=setup, length=length, timeout_ms=timeout)
            _fill(data, done.data)
        else:
            done = _complete(session, 0x00, setup=setup, data=data.tobytes(), timeout_ms=timeout)
        return done.actual_length

    def bulk_write(
        self, dev_handle: RemoteDevice, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        done = _complete(self._session(dev_handle), ep, data=data.tobytes(), timeout_ms=timeout)
        return done.actual_length

    def bulk_read(
        self, dev_handle: RemoteDevice, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        length = len(buff) * buff.itemsize
        done = _complete(self._session(dev_handle), ep, length=length, timeout_ms=timeout)
        _fill(buff, done.data)
        return done.actual_length

    def intr_write(
        self, dev_handle: RemoteDevice, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        interval = dev_handle.intervals.get(ep, 1)
        done = _complete(
            self._session(dev_handle),
            ep,
            data=data.tobytes(),
            interval=interval,
            timeout_ms=timeout,
        )
        return done.actual_length

    def intr_read(
        self, dev_handle: RemoteDevice, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        length = len(buff) * buff.itemsize
        interval = dev_handle.intervals.get(ep, 1)
        done = _complete(
            self._session(dev_handle), ep, length=length, interval=interval, timeout_ms=timeout
        )
        _fill(buff, done.data)
        return done.actual_length

    def iso_write(
        self, dev_handle: RemoteDevice, ep: int, intf: int, data: array.array[int], timeout: int
    ) -> int:
        raise NotImplementedError("isochronous transfers are not supported")

    def iso_read(
        self, dev_handle: RemoteDevice, ep: int, intf: int, buff: array.array[int], timeout: int
    ) -> int:
        raise NotImplementedError("isochronous transfers are not supported")


def find(
    host: str = "127.0.0.1",
    port: int = USBIP_PORT,
    busid: str | None = None,
    *,
    find_all: bool = False,
    **kw: Any,
) -> Any:
    """``usb.core.find`` over a new :class:`UsbipBackend` for ``host:port``.

    Only devices that match ``busid`` and the OP_REP_DEVLIST fields among ``kw``
    (idVendor, idProduct, bDeviceClass, ...) are imported to read their descriptors.
    Release the import with ``usb.util.dispose_resources(dev)`` or ``dev.backend.close()``.
    """
    prefilter = {k: v for k, v in kw.items() if k in _LISTED_FIELDS and isinstance(v, int)}
    backend = UsbipBackend(
        host, port, busids=None if busid is None else [busid], prefilter=prefilter
    )
    return usb.core.find(find_all=find_all, backend=backend, **kw)


@contextlib.contextmanager
def attach(
    host: str = "127.0.0.1", port: int = USBIP_PORT, busid: str | None = None, **kw: Any
) -> Iterator[Any]:
    """Import one device as a ``usb.core.Device``; the import ends with the block.

    Raises:
        LookupError: no exported device matches.
    """
    dev = find(host, port, busid, **kw)
    if dev is None:
        raise LookupError(f"no matching device exported by {host}:{port}")
    try:
        yield dev
    finally:
        usb.util.dispose_resources(dev)
        dev.backend.close()


# -- helpers: the one place where client errors become pyusb errors -------------------------


@contextlib.contextmanager
def _usb_errors() -> Iterator[None]:
    """Turn :class:`HostError` into ``usb.core.USBError`` (libusb1 backend conventions)."""
    try:
        yield
    except UrbTimeoutError as exc:
        # backend_error_code: the RET_UNLINK status (-ECONNRESET when it unlinked).
        raise usb.core.USBTimeoutError(str(exc), exc.unlink_status, errno.ETIMEDOUT) from exc
    except ImportRefusedError as exc:
        code = errno.EBUSY if exc.status == _ST_DEV_BUSY else errno.ENODEV
        raise usb.core.USBError(str(exc), exc.status, code) from exc
    except (ConnectionClosedError, OSError) as exc:
        raise usb.core.USBError(f"no device: {exc}", None, errno.ENODEV) from exc
    except HostError as exc:  # ProtocolError, DescriptorError
        raise usb.core.USBError(str(exc), None, errno.EPROTO) from exc


def _complete(
    session: Session,
    endpoint: int,
    *,
    setup: bytes = bytes(8),
    length: int = 0,
    data: bytes = b"",
    interval: int = 0,
    timeout_ms: int,
) -> SubmitDone:
    """One URB; a non-zero RET_SUBMIT status becomes ``USBError`` with that errno."""
    timeout = None if timeout_ms <= 0 else timeout_ms / 1000.0  # libusb: 0 = unlimited
    with _usb_errors():
        done = session.submit(
            endpoint, length=length, data=data, setup=setup, interval=interval, timeout=timeout
        )
    if done.status != 0:
        code = -done.status
        text = "Pipe error (stall)" if code == errno.EPIPE else os.strerror(code)
        raise usb.core.USBError(text, done.status, code)
    return done


def _fill(buff: array.array[int], data: bytes) -> None:
    memoryview(buff).cast("B")[: len(data)] = data


def _close_all(devices: dict[str, RemoteDevice]) -> None:
    for dev in list(devices.values()):
        session, dev.session = dev.session, None
        if session is not None:
            session.close()
