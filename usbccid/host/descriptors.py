"""USB standard descriptors as a host reads them (USB 2.0 §9.5, §9.6), with :mod:`struct`.

Kept apart from the server's declarations on purpose: the host parses what the device
sends with its own code, so a field the server gets wrong shows up as a failure here
instead of cancelling out.

The shape follows what libusb (and so pyusb's libusb1 backend) makes of a configuration:
interfaces grouped by bInterfaceNumber into alternate settings, and every descriptor that
is neither an interface nor an endpoint kept, byte for byte, as the ``extra`` of the
configuration, interface or endpoint descriptor it follows (a CCID class descriptor is
the ``extra`` of its interface).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from usbccid.host.pdu import HostError

# bDescriptorType values, USB 2.0 Table 9-5.
DT_DEVICE = 1
DT_CONFIG = 2
DT_STRING = 3
DT_INTERFACE = 4
DT_ENDPOINT = 5

_DEVICE = struct.Struct("<BBHBBBBHHHBBBB")  # USB 2.0 §9.6.1, Table 9-8: 18 bytes
_CONFIG = struct.Struct("<BBHBBBBB")  # §9.6.3, Table 9-10: 9 bytes
_INTERFACE = struct.Struct("<BBBBBBBBB")  # §9.6.5, Table 9-12: 9 bytes
_ENDPOINT = struct.Struct("<BBBBHB")  # §9.6.6, Table 9-13: 7 bytes (audio class adds 2)


class DescriptorError(HostError):
    """A descriptor the device sent is malformed (length, type, or structure)."""


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    """USB 2.0 §9.6.1 Standard Device Descriptor."""

    bLength: int
    bDescriptorType: int
    bcdUSB: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bMaxPacketSize0: int
    idVendor: int
    idProduct: int
    bcdDevice: int
    iManufacturer: int
    iProduct: int
    iSerialNumber: int
    bNumConfigurations: int


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    """USB 2.0 §9.6.6 Standard Endpoint Descriptor, plus what follows it."""

    bLength: int
    bDescriptorType: int
    bEndpointAddress: int
    bmAttributes: int
    wMaxPacketSize: int
    bInterval: int
    bRefresh: int = 0  # only in the 9-byte audio-class form
    bSynchAddress: int = 0
    extra: bytes = b""

    @property
    def extra_descriptors(self) -> list[int]:
        """``extra`` the way pyusb's libusb1 backend gives it: a list of byte values."""
        return list(self.extra)


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    """USB 2.0 §9.6.5 Standard Interface Descriptor, its endpoints and extras."""

    bLength: int
    bDescriptorType: int
    bInterfaceNumber: int
    bAlternateSetting: int
    bNumEndpoints: int
    bInterfaceClass: int
    bInterfaceSubClass: int
    bInterfaceProtocol: int
    iInterface: int
    endpoints: tuple[EndpointDescriptor, ...] = ()
    extra: bytes = b""

    @property
    def extra_descriptors(self) -> list[int]:
        return list(self.extra)


@dataclass(frozen=True, slots=True)
class ConfigurationDescriptor:
    """USB 2.0 §9.6.3 Standard Configuration Descriptor and everything under it.

    ``interfaces[i][a]`` is logical interface ``i`` (0-based, in order of appearance),
    alternate setting ``a``: the indices pyusb's IBackend methods take.
    """

    bLength: int
    bDescriptorType: int
    wTotalLength: int
    bNumInterfaces: int
    bConfigurationValue: int
    iConfiguration: int
    bmAttributes: int
    bMaxPower: int
    interfaces: tuple[tuple[InterfaceDescriptor, ...], ...] = ()
    extra: bytes = b""

    @property
    def extra_descriptors(self) -> list[int]:
        return list(self.extra)


def parse_device(raw: bytes) -> DeviceDescriptor:
    """An 18-byte device descriptor (the reply to GET_DESCRIPTOR(DEVICE), §9.4.3)."""
    if len(raw) < _DEVICE.size:
        raise DescriptorError(f"device descriptor is {len(raw)} bytes, expected 18")
    desc = DeviceDescriptor(*_DEVICE.unpack_from(raw))
    if desc.bLength != _DEVICE.size or desc.bDescriptorType != DT_DEVICE:
        raise DescriptorError(f"not a device descriptor: {raw[:2].hex()}")
    if desc.bMaxPacketSize0 not in (8, 16, 32, 64, 9):  # §9.6.1; 9 means 512 (USB 3)
        raise DescriptorError(f"bMaxPacketSize0 {desc.bMaxPacketSize0}")
    return desc


def total_length(head: bytes) -> int:
    """wTotalLength from the first 9 bytes of a configuration descriptor (§9.6.3)."""
    if len(head) < _CONFIG.size:
        raise DescriptorError(f"configuration descriptor head is {len(head)} bytes")
    length, dtype, total = struct.unpack_from("<BBH", head)
    if length < _CONFIG.size or dtype != DT_CONFIG:
        raise DescriptorError(f"not a configuration descriptor: {head[:2].hex()}")
    if total < length:
        raise DescriptorError(f"wTotalLength {total} < bLength {length}")
    return int(total)


_InterfaceFields = tuple[int, int, int, int, int, int, int, int, int]
_EndpointFields = tuple[int, int, int, int, int, int, int, int]
_ConfigFields = tuple[int, int, int, int, int, int, int, int]


class _InterfaceBuilder:
    def __init__(self, fields: _InterfaceFields) -> None:
        self.fields = fields
        self.extra = bytearray()
        self.endpoints: list[EndpointDescriptor] = []
        self.endpoint: tuple[_EndpointFields, bytearray] | None = None

    def close_endpoint(self) -> None:
        if self.endpoint is not None:
            fields, extra = self.endpoint
            self.endpoints.append(EndpointDescriptor(*fields, extra=bytes(extra)))
            self.endpoint = None

    def build(self) -> InterfaceDescriptor:
        self.close_endpoint()
        desc = InterfaceDescriptor(
            *self.fields, endpoints=tuple(self.endpoints), extra=bytes(self.extra)
        )
        if len(desc.endpoints) != desc.bNumEndpoints:
            raise DescriptorError(
                f"interface {desc.bInterfaceNumber} alt {desc.bAlternateSetting}: "
                f"bNumEndpoints {desc.bNumEndpoints}, {len(desc.endpoints)} endpoints follow"
            )
        return desc


def parse_configuration(raw: bytes) -> ConfigurationDescriptor:
    """A whole configuration: the reply to GET_DESCRIPTOR(CONFIGURATION) of wTotalLength.

    USB 2.0 §9.4.3: "all interface, endpoint, and class- or vendor-specific descriptors
    for the configuration follow the configuration descriptor", each starting with
    bLength and bDescriptorType (§9.5).
    """
    total = total_length(raw)
    if len(raw) < total:
        raise DescriptorError(f"configuration is {len(raw)} bytes, wTotalLength {total}")
    config_fields: _ConfigFields = _CONFIG.unpack_from(raw)
    config_extra = bytearray()
    built: list[InterfaceDescriptor] = []
    current: _InterfaceBuilder | None = None
    offset = config_fields[0]
    while offset < total:
        if total - offset < 2:
            raise DescriptorError(f"trailing byte at offset {offset}")
        length, dtype = raw[offset], raw[offset + 1]
        if length < 2 or offset + length > total:
            raise DescriptorError(f"descriptor at offset {offset}: bLength {length}")
        chunk = raw[offset : offset + length]
        if dtype == DT_INTERFACE:
            if length < _INTERFACE.size:
                raise DescriptorError(f"interface descriptor of {length} bytes")
            if current is not None:
                built.append(current.build())
            interface_fields: _InterfaceFields = _INTERFACE.unpack_from(chunk)
            current = _InterfaceBuilder(interface_fields)
        elif dtype == DT_ENDPOINT:
            if current is None:
                raise DescriptorError(f"endpoint descriptor outside an interface at {offset}")
            if length < _ENDPOINT.size:
                raise DescriptorError(f"endpoint descriptor of {length} bytes")
            current.close_endpoint()
            a, b, c, d, e, f = _ENDPOINT.unpack_from(chunk)
            refresh, synch = (chunk[7], chunk[8]) if length >= 9 else (0, 0)
            current.endpoint = ((a, b, c, d, e, f, refresh, synch), bytearray())
        elif dtype in (DT_DEVICE, DT_CONFIG):
            raise DescriptorError(f"descriptor type {dtype} inside a configuration")
        elif current is None:
            config_extra += chunk
        elif current.endpoint is not None:
            current.endpoint[1].extend(chunk)
        else:
            current.extra += chunk
        offset += length
    if current is not None:
        built.append(current.build())

    groups: dict[int, list[InterfaceDescriptor]] = {}
    for interface in built:
        groups.setdefault(interface.bInterfaceNumber, []).append(interface)
    config = ConfigurationDescriptor(
        *config_fields,
        interfaces=tuple(tuple(alts) for alts in groups.values()),
        extra=bytes(config_extra),
    )
    if len(config.interfaces) != config.bNumInterfaces:
        raise DescriptorError(
            f"bNumInterfaces {config.bNumInterfaces}, {len(config.interfaces)} interfaces follow"
        )
    return config


def parse_string(raw: bytes) -> str:
    """A string descriptor (§9.6.7): bLength, type 3, UTF-16LE text."""
    if len(raw) < 2 or raw[1] != DT_STRING or raw[0] > len(raw) or raw[0] % 2:
        raise DescriptorError(f"not a string descriptor: {raw[:2].hex()}")
    return raw[2 : raw[0]].decode("utf-16-le")
