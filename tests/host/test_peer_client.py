"""Our server, seen by USB/IP clients we did not write.

* PyPI ``usbip`` 0.7.0 (jabezwinston/usbip-python): its host API lists, imports and
  drives our loopback device over TCP; its wire code shares nothing with ours.
* the Linux ``usbip`` tool (tools/usb/usbip, Debian package ``usbip``): ``usbip list -r``
  parses our OP_REP_DEVLIST with the kernel project's own code.

A bug that our client (usbccid.host) and our server share shows up here.
"""

from __future__ import annotations

import subprocess

import pytest
import usbip
import usbip.host

from tests.conftest import require_tool
from tests.host.conftest import Served
from usbccid.usbip.loopback import LOOPBACK_IDENTITY


def test_pypi_usbip_lists_our_devices(served: Served) -> None:
    listed = usbip.host.list_devices(usbip.USBIP(served.host, served.port))
    assert [d["busid"] for d in listed] == ["1-1", "1-2"]
    first = listed[0]
    assert (first["idVendor"], first["idProduct"]) == (0x1209, 0x0001)
    assert (first["busnum"], first["devnum"], first["speed"]) == (1, 1, 2)
    assert first["bcdDevice"] == LOOPBACK_IDENTITY.bcd_device
    assert (first["bNumConfigurations"], first["bNumInterfaces"]) == (1, 1)
    assert first["interfaces"] == [(0xFF, 0, 0)]


def test_pypi_usbip_imports_and_transfers(served: Served) -> None:
    handle = usbip.attach(served.host, "1-1", port=served.port, vid=0x1209, pid=0x0001)
    try:
        desc = handle.device_descriptor  # read by their client with GET_DESCRIPTOR
        assert (desc.idVendor, desc.idProduct, desc.bMaxPacketSize0) == (0x1209, 0x0001, 64)
        assert desc.bNumConfigurations == 1
        config = handle.control(0x80, 0x06, 0x0200, 0, 255)  # GET_DESCRIPTOR(CONFIGURATION)
        assert config[:2] == b"\x09\x02"
        assert int.from_bytes(config[2:4], "little") == len(config) == 9 + 9 + 3 * 7
        lang = handle.control(0x80, 0x06, 0x0300, 0, 255)  # string 0: LANGIDs
        assert lang == b"\x04\x03\x09\x04"
        product = handle.control(0x80, 0x06, 0x0302, 0x0409, 255)
        assert product[2:].decode("utf-16-le") == LOOPBACK_IDENTITY.product
        assert handle.control(0x41, 0x02, 0, 0, b"peer") == 4  # vendor OUT
        assert handle.control(0xC1, 0x01, 0, 0, 64) == b"peer"  # vendor IN
        with pytest.raises(usbip.Stall):
            handle.control(0xC1, 0x55, 0, 0, 8)  # unknown vendor request: -EPIPE
        assert handle.bulk_out(0x01, b"x" * 100) == 100
        assert handle.bulk_in(0x82, 64) == b"x" * 64  # split at the IN URB's length
        assert handle.bulk_in(0x82, 64) == b"x" * 36
    finally:
        handle.close()


def test_linux_usbip_list_remote(served: Served) -> None:
    tool = require_tool("usbip")
    result = subprocess.run(
        [tool, "--tcp-port", str(served.port), "list", "-r", served.host],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert any(line.startswith("1-1:") and "(1209:0001)" in line for line in lines)
    assert any(line.startswith("1-2:") and "(1209:0001)" in line for line in lines)
    assert ": /sys/devices/platform/usbccid/usb1/1-1" in lines
    # One interface line per device: "<n> - <class names> (class/subclass/protocol)".
    assert (
        sum(
            line.endswith("Vendor Specific Class / unknown subclass / unknown protocol (ff/00/00)")
            for line in lines
        )
        == 2
    )
    assert ": (Defined at Interface level) (00/00/00)" in lines
