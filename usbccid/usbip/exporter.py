"""The set of exported devices, and the glue between a connection and a device.

An :class:`Exporter` holds the virtual devices, under bus ids ``"1-1"``, ``"1-2"``, ...
(busnum 1, devnum n, so vhci's devid is ``0x00010000 | n``). For each TCP connection the
driver calls :meth:`Exporter.connect` and gets an :class:`ExportConnection`, a sans-IO
object: bytes in (:meth:`~ExportConnection.receive_data`), bytes out
(:meth:`~ExportConnection.data_to_send`), and nothing else.

A device is imported by at most one connection at a time, like ``usbipd`` (a second
OP_REQ_IMPORT gets ST_DEV_BUSY, usbip_host_common.c ``usbip_export_device``); it becomes
importable again when that connection is lost, and is reset on every import, since the
device never sees a USB bus reset (vhci handles those itself).

Devices come and go while running: :meth:`Exporter.add` gives the next bus id never used
in this exporter (or the one asked for, if free), so a host never finds another device
under a bus id it knew; :meth:`Exporter.remove` unplugs a device: its importing connection
is marked lost (``should_close``), and the driver closes it as when the server stops,
which vhci reports to the host as a disconnect.

A busy device may be taken over (:meth:`Exporter.connect` with ``takeover``): when the
same host imports it again, the driver may decide that the old connection is dead (TCP
keepalive has not heard from it for its whole window) and hand the device over; the old
connection is then lost exactly as if it had been unplugged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from usbccid.jobs import Job
from usbccid.usbip import wire
from usbccid.usbip.connection import (
    MAX_TRANSFER_LENGTH,
    NEED_DATA,
    ConnectionClosed,
    UsbipServerConnection,
)
from usbccid.usbip.device import VirtualDevice

BUSNUM = 1
MAX_DEVNUM = 0xFFFF  # vhci's devid is busnum << 16 | devnum (vhci_sysfs.c)


def parse_busid(busid: str) -> int | None:
    """The device number of ``"1-N"``, or None if ``busid`` is not one of ours."""
    prefix, _, number = busid.partition("-")
    if prefix != str(BUSNUM) or not number.isdigit() or number != str(int(number)):
        return None
    devnum = int(number)
    return devnum if 1 <= devnum <= MAX_DEVNUM else None


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """One exported device, for status displays."""

    busid: str
    vendor_id: int
    product_id: int
    product: str
    imported_by: str | None  # the peer that imported it, or None when available


class Exporter:
    """The exported devices, by bus id.

    Args:
        devices: added in order as ``"1-1"``, ``"1-2"``, ...
        max_transfer_length: passed to every :class:`UsbipServerConnection`.
    """

    def __init__(
        self,
        devices: Iterable[VirtualDevice] = (),
        *,
        max_transfer_length: int = MAX_TRANSFER_LENGTH,
    ) -> None:
        self.max_transfer_length = max_transfer_length
        self._devices: dict[str, VirtualDevice] = {}
        self._numbers: dict[str, int] = {}
        self._importers: dict[str, ExportConnection] = {}
        self._next_devnum = 1
        #: decides whether a busy device may be taken from its importer by ``conn``
        #: (see :meth:`ExportConnection` ``takeover``); None: never
        self.takeover: Callable[[ExportConnection, ExportConnection], bool] | None = None
        for device in devices:
            self.add(device)

    def next_busid(self) -> str:
        """The bus id :meth:`add` gives the next device when none is asked for."""
        return f"{BUSNUM}-{self._next_devnum}"

    def add(self, device: VirtualDevice, busid: str | None = None) -> str:
        """Export ``device`` under ``busid`` (``"1-N"``, free), or else the next bus id
        never used here; returns it.

        Raises:
            ValueError: ``busid`` is malformed or taken.
        """
        if busid is None:
            devnum = self._next_devnum
            if devnum > MAX_DEVNUM:
                raise ValueError("no bus id left")
        else:
            asked = parse_busid(busid)
            if asked is None:
                raise ValueError(f"bus id {busid!r} is not {BUSNUM}-N (N = 1..{MAX_DEVNUM})")
            devnum = asked
        busid = f"{BUSNUM}-{devnum}"
        if busid in self._devices:
            raise ValueError(f"bus id {busid} is in use")
        self._devices[busid] = device
        self._numbers[busid] = devnum
        self._next_devnum = max(self._next_devnum, devnum + 1)
        return busid

    def remove(self, busid: str) -> VirtualDevice:
        """Stop exporting the device ``busid``: its importer (if any) loses its connection,
        as when the server stops. Returns the device, reset.

        Raises:
            KeyError: no such device.
        """
        device = self._devices.pop(busid)
        del self._numbers[busid]
        importer = self._importers.pop(busid, None)
        if importer is not None:
            importer._unplugged()
        device.reset()
        return device

    @property
    def devices(self) -> dict[str, VirtualDevice]:
        return dict(self._devices)

    def device(self, busid: str) -> VirtualDevice:
        return self._devices[busid]

    def usbip_info(self, busid: str) -> wire.UsbDeviceInfo:
        return self._devices[busid].usbip_info(busid, BUSNUM, self._numbers[busid])

    def status(self) -> list[DeviceStatus]:
        """Every device and who imported it."""
        result = []
        for busid, device in self._devices.items():
            importer = self._importers.get(busid)
            result.append(
                DeviceStatus(
                    busid=busid,
                    vendor_id=device.identity.vendor_id,
                    product_id=device.identity.product_id,
                    product=device.identity.product,
                    imported_by=importer.peer if importer is not None else None,
                )
            )
        return result

    def connect(self, peer: str = "") -> ExportConnection:
        """A new TCP connection from ``peer`` (for logs and :meth:`status` only)."""
        return ExportConnection(self, peer)

    # -- used by ExportConnection -----------------------------------------------------

    def _devlist(self) -> wire.OpRepDevlist:
        # Imported devices are not offered (usbipd lists only SDEV_ST_AVAILABLE ones).
        return wire.OpRepDevlist(
            devices=tuple(
                wire.DevlistEntry(self.usbip_info(busid), device.interfaces_info())
                for busid, device in self._devices.items()
                if busid not in self._importers
            )
        )

    def _claim(self, busid: str, conn: ExportConnection) -> wire.OpRepImport:
        device = self._devices.get(busid)
        if device is None:
            return wire.OpRepImport(status=wire.OpStatus.NODEV)  # usbipd: "not found"
        holder = self._importers.get(busid)
        if holder is not None:
            if holder is conn or self.takeover is None or not self.takeover(holder, conn):
                return wire.OpRepImport(status=wire.OpStatus.DEV_BUSY)
            del self._importers[busid]
            holder._unplugged()
        self._importers[busid] = conn
        device.reset()
        return wire.OpRepImport(status=wire.OpStatus.OK, device=self.usbip_info(busid))

    def _release(self, busid: str, conn: ExportConnection) -> None:
        if self._importers.get(busid) is conn:
            del self._importers[busid]
            self._devices[busid].reset()  # drop parked URBs; the next import resets again


class ExportConnection:
    """One TCP connection's view of the exporter; everything the driver needs.

    Every method that may produce output leaves the bytes for :meth:`data_to_send`.
    Calls must all come from one thread.
    """

    def __init__(self, exporter: Exporter, peer: str) -> None:
        self.exporter = exporter
        self.peer = peer
        self.protocol = UsbipServerConnection(max_transfer_length=exporter.max_transfer_length)
        self.busid: str | None = None
        self._device: VirtualDevice | None = None  # the imported one
        self._out = bytearray()
        self._lost = False

    @property
    def device(self) -> VirtualDevice | None:
        """The imported device, if any."""
        return self._device

    @property
    def should_close(self) -> bool:
        """True once the driver should close the socket (after flushing data_to_send)."""
        return self._lost or self.protocol.should_close

    def data_to_send(self) -> bytes:
        """The bytes to write to the peer now (and forget)."""
        if not self._out:
            return b""
        data = bytes(self._out)
        self._out.clear()
        return data

    def receive_data(self, data: bytes) -> None:
        """Bytes from the peer; ``b""`` for EOF.

        Raises:
            UsbipRemoteError: the peer broke the protocol; close the connection (the
                bytes already in :meth:`data_to_send` may still be sent).
            UsbipLocalError: a bug of ours (or of the function); close the connection.
        """
        try:
            self.protocol.receive_data(data)
            self._drain()
        except Exception:
            self.connection_lost()
            raise

    def _drain(self) -> None:
        protocol = self.protocol
        out = self._out
        while True:
            event = protocol.next_fast_event()
            if type(event) is wire.Submit:  # the hot path first
                device = self._device
                assert device is not None  # the protocol is in the URB phase: imported
                for ret in device.submit_fast(event):
                    out += protocol.send_ret(ret)
            elif event is NEED_DATA:
                return
            elif isinstance(event, wire.OpReqDevlist):
                out += protocol.send(self.exporter._devlist())
            elif isinstance(event, wire.OpReqImport):
                reply = self.exporter._claim(event.busid, self)
                if reply.status == wire.OpStatus.OK:
                    self.busid = event.busid
                    self._device = self.exporter.device(event.busid)
                out += protocol.send(reply)
            elif isinstance(event, wire.CmdUnlink):
                out += protocol.send(self._imported().unlink(event))
            else:
                assert isinstance(event, ConnectionClosed)
                self.connection_lost()
                return

    def _imported(self) -> VirtualDevice:
        device = self._device
        assert device is not None  # the protocol is in the URB phase only after an import
        return device

    def _unplugged(self) -> None:
        """The exporter took the device away (removed, or taken over): the connection is
        lost and the driver closes it."""
        self._lost = True
        self.busid = None
        self._device = None

    def connection_lost(self) -> None:
        """The TCP connection is gone (or being closed): release the imported device."""
        self._lost = True
        if self.busid is not None:
            self.exporter._release(self.busid, self)
            self.busid = None
            self._device = None

    # -- pass-through to the imported function ----------------------------------------

    def poll(self) -> None:
        """Complete parked IN URBs after an outside change (card inserted, job done)."""
        device = self._device
        if device is None or self._lost:
            return
        try:
            for ret in device.poll_fast():
                self._out += self.protocol.send_ret(ret)
        except Exception:
            self.connection_lost()
            raise

    def next_job(self, now: float) -> Job | None:
        """Work for the driver to run (``run()`` maybe on a thread, then ``finish()`` here,
        then :meth:`poll`)."""
        device = self._device
        return device.function.next_job(now) if device is not None else None

    def get_timer(self) -> float | None:
        device = self._device
        return device.function.get_timer() if device is not None else None

    def handle_timer(self, now: float) -> None:
        device = self._device
        if device is None:
            return
        device.function.handle_timer(now)
        self.poll()
