"""USB/IP foundation, judged by the real Linux client: ``usbip`` + vhci-hcd in the guest.

One scenario: a server on the host (in-process,
:class:`usbccid.frontends.usbip.server.ServerThread`)
exports two CCID readers holding test cards; the guest lists them, attaches one, reads its
descriptors back (kernel, lsusb), detaches it, attaches both at once, and finally sees them
go away when the server stops. The host side checks who it thinks imported what.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import pytest

from tests.vm.guest import HOST, Guest
from usbccid.ccid.identity import make_identity
from usbccid.ccid.reader import CcidReader
from usbccid.ccid.testcard import EchoCard
from usbccid.frontends.usbip.server import ServerThread
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import DeviceStatus, Exporter

pytestmark = [pytest.mark.vm, pytest.mark.slow]

SERIALS = ("VMATTACH1", "VMATTACH2")
VID_PID = "0e0f:0004"  # the default "vmware" preset

# In-guest helpers (put in /share/files by the test). `dev-of SERIAL`: the sysfs folder of
# the USB device with that serial number; exit status 1 if there is none.
DEV_OF = r"""#!/bin/sh
for d in /sys/bus/usb/devices/*; do
    [ "$(cat "$d/serial" 2>/dev/null)" = "$1" ] && { echo "$d"; exit 0; }
done
exit 1
"""
# `port-of URL`: the vhci port number importing that usbip://HOST:PORT/BUSID.
PORT_OF = r"""#!/bin/sh
usbip port | awk -v want="$1" '/^Port [0-9]+:/ { p = $2 + 0 } $NF == want { print p; f = 1 }
    END { exit !f }'
"""


@pytest.fixture
def server() -> Iterator[tuple[ServerThread, list[VirtualDevice]]]:
    devices = [
        VirtualDevice(reader.identity, reader)
        for reader in (
            CcidReader([EchoCard()], identity=make_identity(serial_number=serial))
            for serial in SERIALS
        )
    ]
    thread = ServerThread(Exporter(devices))
    thread.start()
    try:
        yield thread, devices
    finally:
        thread.stop()


def _status(st: ServerThread) -> dict[str, DeviceStatus]:
    return {s.busid: s for s in st.call(st.exporter.status)}


def _wait_importers(st: ServerThread, want: dict[str, bool], timeout: float = 15.0) -> None:
    """Wait until each bus id's "imported" state is as wanted (the server learns about a
    detach asynchronously, when the guest closes the TCP connection)."""
    deadline = time.monotonic() + timeout
    while True:
        status = _status(st)
        now = {busid: status[busid].imported_by is not None for busid in want}
        if now == want:
            return
        assert time.monotonic() < deadline, f"importers {now}, want {want}: {status}"
        time.sleep(0.1)


def _section(stdout: str, name: str) -> str:
    """The text between the marker line ``=== name`` and the next marker (or the end)."""
    m = re.search(rf"^=== {re.escape(name)}\n(.*?)(?=^=== |\Z)", stdout, re.S | re.M)
    assert m is not None, f"no section {name!r} in:\n{stdout}"
    return m.group(1)


def test_list_attach_descriptors_detach_reattach_two_devices(
    vm_guest: Guest, server: tuple[ServerThread, list[VirtualDevice]]
) -> None:
    st, devices = server
    port = st.address[1] if st.address else 0
    dev_of = "sh " + vm_guest.put_file("dev-of", DEV_OF)
    port_of = "sh " + vm_guest.put_file("port-of", PORT_OF)
    usbip = f"usbip --tcp-port {port}"

    # -- list: both devices, with their VID:PID and the smart-card interface class
    r = vm_guest.run(f"{usbip} list -r {HOST}", timeout=120)
    assert r.ok, r
    for busid in ("1-1", "1-2"):
        assert re.search(
            rf"^\s*{busid}: VMware, Inc\. : Virtual CCID \({VID_PID}\)$", r.stdout, re.M
        ), r
    assert (
        r.stdout.count("0 - Chip/SmartCard / unknown subclass / unknown protocol (0b/00/00)") == 2
    ), r

    # -- attach 1-1: the kernel enumerates it; descriptors as lsusb/libusb decode them, and
    # byte for byte as the kernel read them; usbip port shows the import
    r = vm_guest.run(
        f"""
        set -e
        {usbip} attach -r {HOST} -b 1-1
        wait-for 60 {dev_of} {SERIALS[0]}
        d=$({dev_of} {SERIALS[0]})
        wait-for 30 test -e "$d:1.0"     # the kernel has set configuration 1
        echo "=== lsusb"; lsusb -v -d {VID_PID}
        echo "=== sysfs"; od -An -v -tx1 "$d/descriptors" | tr -d ' \\n'; echo
        cat "$d/bConfigurationValue" "$d/speed" "$d:1.0/bInterfaceClass"
        echo "=== port"; usbip port
        echo "=== list"; {usbip} list -r {HOST}
        """,
        timeout=180,
    )
    assert r.ok, r
    lsusb = _section(r.stdout, "lsusb")
    for line in (
        r"idVendor\s+0x0e0f VMware, Inc\.",
        r"idProduct\s+0x0004 Virtual CCID",
        r"bcdUSB\s+2\.00",
        r"iManufacturer\s+1 usbccid",
        r"iProduct\s+2 usbccid virtual CCID reader",
        rf"iSerial\s+3 {SERIALS[0]}",
        r"bNumInterfaces\s+1",
        r"bInterfaceClass\s+11 Chip/SmartCard",
        r"bInterfaceProtocol\s+0",
        r"iInterface\s+4 usbccid",
        r"ChipCard Interface Descriptor:",  # the 54-byte CCID class descriptor, decoded
        r"bLength\s+54",
        r"bDescriptorType\s+33",
        r"nMaxSlotIndex\s+0",
        r"dwProtocols\s+3\s+T=0 T=1",
        r"dwFeatures\s+000400FE",
        r"Short and extended APDU level exchange",
        r"dwMaxCCIDMsgLen\s+65554",
        r"bEndpointAddress\s+0x01\s+EP 1 OUT",
        r"bEndpointAddress\s+0x82\s+EP 2 IN",
        r"bEndpointAddress\s+0x83\s+EP 3 IN",
        r"Transfer Type\s+Interrupt",
    ):
        assert re.search(line, lsusb), f"{line!r} not in lsusb -v:\n{lsusb}"
    sysfs = _section(r.stdout, "sysfs").split()
    device = devices[0]
    assert sysfs[0] == (device.device_descriptor + device.configuration_descriptor).hex()
    assert sysfs[1:] == ["1", "12", "0b"]  # configured, full speed, CCID interface bound
    assert f"1-1 -> usbip://{HOST}:{port}/1-1" in _section(r.stdout, "port")
    listed = _section(r.stdout, "list")
    assert "1-2:" in listed
    assert "1-1:" not in listed  # an imported device is not offered again
    imported_by = _status(st)["1-1"].imported_by
    assert imported_by is not None
    assert imported_by.startswith("127.0.0.1:")  # QEMU user networking: from host loopback

    # -- detach: the device goes away on both sides and is offered again
    r = vm_guest.run(
        f"""
        set -e
        p=$({port_of} usbip://{HOST}:{port}/1-1)
        usbip detach -p "$p"
        wait-for 30 sh -c '! usbip port | grep -q "^Port"'
        if {dev_of} {SERIALS[0]}; then echo "device still there" >&2; exit 1; fi
        echo "=== list"; {usbip} list -r {HOST}
        """,
        timeout=120,
    )
    assert r.ok, r
    assert "1-1:" in _section(r.stdout, "list")
    _wait_importers(st, {"1-1": False, "1-2": False})

    # -- attach again, and both devices at once: both enumerate and work side by side
    r = vm_guest.run(
        f"""
        set -e
        {usbip} attach -r {HOST} -b 1-1
        {usbip} attach -r {HOST} -b 1-2
        wait-for 60 {dev_of} {SERIALS[0]}
        wait-for 60 {dev_of} {SERIALS[1]}
        wait-for 30 test -e "$({dev_of} {SERIALS[0]}):1.0"
        wait-for 30 test -e "$({dev_of} {SERIALS[1]}):1.0"
        echo "=== lsusb"; lsusb -v -d {VID_PID} | grep -E '^Bus|iSerial|ChipCard'
        echo "=== port"; usbip port
        """,
        timeout=180,
    )
    assert r.ok, r
    lsusb = _section(r.stdout, "lsusb")
    assert len(re.findall(rf"^Bus \d+ Device \d+: ID {VID_PID} ", lsusb, re.M)) == 2, lsusb
    assert lsusb.count("ChipCard Interface Descriptor:") == 2, lsusb
    for serial in SERIALS:
        assert re.search(rf"iSerial\s+3 {serial}$", lsusb, re.M), lsusb
    ports = _section(r.stdout, "port")
    for busid in ("1-1", "1-2"):
        assert f"{busid} -> usbip://{HOST}:{port}/{busid}" in ports, ports
    _wait_importers(st, {"1-1": True, "1-2": True})
    peers = {s.imported_by for s in _status(st).values()}
    assert len(peers) == 2  # one TCP connection per imported device
    assert all(p is not None and p.startswith("127.0.0.1:") for p in peers), peers

    # -- the server goes away: the guest's vhci-hcd notices and frees both ports
    st.stop()
    r = vm_guest.run(
        f"""
        wait-for 60 sh -c '! usbip port | grep -q "^Port"' || exit 1
        wait-for 30 sh -c '! lsusb -d {VID_PID}'
        """,
        timeout=120,
    )
    assert r.ok, r
