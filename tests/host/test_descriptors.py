"""The host's own descriptor parser (USB 2.0 §9.6), on hand-assembled descriptor sets."""

from __future__ import annotations

import struct

import pytest

from usbccid.host.descriptors import (
    DescriptorError,
    parse_configuration,
    parse_device,
    parse_string,
    total_length,
)

# USB 2.0 Table 9-8, written out field by field: bcdUSB 1.10, mps0 64, 08e6:3437.
DEVICE = bytes.fromhex("12 01 1001 00 00 00 40 e608 3734 0001 01 02 03 01")

# A CCID class descriptor (CCID rev 1.10 §5.1): 54 bytes, type 0x21.
CCID = bytes.fromhex(
    "36 21 1001 00 07 01000000 a00f0000 a00f0000 00 80250000 00c20100 00"
    " fe000000 00000000 00000000 fe000400 0f010000 ff ff 0000 00 01"
)


def interface(number: int, alt: int, n_eps: int, cls: int = 0x0B) -> bytes:
    return bytes([9, 4, number, alt, n_eps, cls, 0, 0, 0])


def endpoint(address: int, attributes: int, mps: int, interval: int = 0) -> bytes:
    return struct.pack("<BBBBHB", 7, 5, address, attributes, mps, interval)


def config(body: bytes, n_interfaces: int) -> bytes:
    return struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), n_interfaces, 1, 0, 0xA0, 50) + body


CCID_CONFIG = config(
    interface(0, 0, 3)
    + CCID
    + endpoint(0x81, 3, 8, 255)
    + endpoint(0x82, 2, 64)
    + endpoint(0x03, 2, 64),
    1,
)


def test_device_descriptor() -> None:
    assert len(DEVICE) == 18
    desc = parse_device(DEVICE)
    assert (desc.bcdUSB, desc.bMaxPacketSize0) == (0x0110, 64)
    assert (desc.idVendor, desc.idProduct, desc.bcdDevice) == (0x08E6, 0x3437, 0x0100)
    assert (desc.iManufacturer, desc.iProduct, desc.iSerialNumber) == (1, 2, 3)
    assert desc.bNumConfigurations == 1


@pytest.mark.parametrize(
    "raw",
    [
        DEVICE[:17],
        b"\x11" + DEVICE[1:],
        DEVICE[:1] + b"\x02" + DEVICE[2:],
        DEVICE[:7] + b"\x07" + DEVICE[8:],
    ],
)
def test_bad_device_descriptor(raw: bytes) -> None:
    with pytest.raises(DescriptorError):
        parse_device(raw)


def test_ccid_class_descriptor_is_the_interface_extra() -> None:
    assert len(CCID) == 54
    assert total_length(CCID_CONFIG[:9]) == len(CCID_CONFIG) == 9 + 9 + 54 + 21
    cfg = parse_configuration(CCID_CONFIG)
    assert (cfg.bNumInterfaces, cfg.bConfigurationValue, cfg.bmAttributes) == (1, 1, 0xA0)
    assert cfg.extra == b""
    (alts,) = cfg.interfaces
    (intf,) = alts
    assert intf.bInterfaceClass == 0x0B
    assert intf.extra == CCID
    assert bytes(intf.extra_descriptors) == CCID  # pyusb's shape: a list of ints
    assert [
        (e.bEndpointAddress, e.bmAttributes, e.wMaxPacketSize, e.bInterval) for e in intf.endpoints
    ] == [(0x81, 3, 8, 255), (0x82, 2, 64, 0), (0x03, 2, 64, 0)]
    assert all(e.extra == b"" for e in intf.endpoints)
    # dwMaxCCIDMessageLength at offset 44 of the class descriptor, little-endian.
    assert struct.unpack_from("<I", intf.extra, 44)[0] == 271


def test_extras_follow_libusb_placement_and_alternates_group() -> None:
    iad = bytes([8, 0x0B, 0, 2, 0xFF, 0, 0, 0])  # before the first interface -> config
    companion = bytes([6, 0x30, 0, 0, 0, 0])  # after an endpoint -> that endpoint
    raw = config(
        iad
        + interface(0, 0, 0, 0xFF)
        + interface(0, 1, 1, 0xFF)
        + endpoint(0x81, 2, 512)
        + companion
        + interface(1, 0, 1, 0xFF)
        + bytes([4, 0x24, 1, 2])  # class-specific after an interface -> that interface
        + endpoint(0x02, 2, 512, 0),
        2,
    )
    cfg = parse_configuration(raw + b"trailing bytes beyond wTotalLength are ignored")
    assert cfg.extra == iad
    first, second = cfg.interfaces
    assert [a.bAlternateSetting for a in first] == [0, 1]
    assert first[1].endpoints[0].extra == companion
    assert second[0].extra == bytes([4, 0x24, 1, 2])
    assert second[0].endpoints[0].bEndpointAddress == 0x02


def test_audio_endpoint_has_refresh_and_synch_address() -> None:
    ep = struct.pack("<BBBBHBBB", 9, 5, 0x01, 0x05, 192, 1, 0, 0x82)
    cfg = parse_configuration(config(interface(0, 0, 1, 1) + ep, 1))
    assert cfg.interfaces[0][0].endpoints[0].bSynchAddress == 0x82


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (CCID_CONFIG[:-1], "wTotalLength"),
        (config(interface(0, 0, 2) + endpoint(0x81, 2, 64), 1), "bNumEndpoints 2"),
        (config(interface(0, 0, 0), 2), "bNumInterfaces 2"),
        (config(endpoint(0x81, 2, 64), 0), "outside an interface"),
        (config(interface(0, 0, 0) + b"\x01\x24", 1), "bLength 1"),
        (config(interface(0, 0, 0) + b"\x05\x24\x00", 1), "bLength 5"),
        (config(interface(0, 0, 0) + DEVICE, 1), "inside a configuration"),
        (config(bytes([8, 4, 0, 0, 0, 0, 0, 0]), 1), "interface descriptor of 8"),
        (DEVICE, "not a configuration"),
    ],
)
def test_malformed_configurations(raw: bytes, match: str) -> None:
    with pytest.raises(DescriptorError, match=match):
        parse_configuration(raw)


def test_string_descriptor() -> None:
    assert parse_string(bytes([8, 3]) + "CAC".encode("utf-16-le")) == "CAC"
    with pytest.raises(DescriptorError):
        parse_string(bytes([9, 3]) + "CAC".encode("utf-16-le"))
