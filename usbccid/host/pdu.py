"""The client side of the USB/IP wire protocol, sans-IO.

Bytes in, events out, the mirror image of the server's connection: :class:`ClientConnection`
builds OP_REQ_DEVLIST, OP_REQ_IMPORT, CMD_SUBMIT and CMD_UNLINK, and turns what the server
sends back into :class:`DeviceList`, :class:`ImportReply`, :class:`SubmitDone` and
:class:`UnlinkDone`. It owns no socket and no clock.

The layouts are written out here with :mod:`struct` on purpose, independently of the
server's construct declarations (``usbccid/usbip/wire.py``), so that one wrong field
width cannot hide on both sides of a test. Every layout cites Linux
``Documentation/usb/usbip_protocol.rst`` ("usbip_protocol.rst" below). All USB/IP
fields are big-endian; the 8-byte SETUP packet inside CMD_SUBMIT is a raw USB 2.0 §9.3
packet and so little-endian, passed through untouched.

The checks are the ones the Linux client (vhci-hcd and the ``usbip`` tool) makes, and a
few stricter ones: a reply that vhci would drop the device for is a
:class:`ProtocolError` here too.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import struct
from dataclasses import dataclass

from usbccid.errors import UsbccidError

USBIP_VERSION = 0x0111  # usbip_protocol.rst "Protocol Version": v1.1.1

OP_REQ_DEVLIST = 0x8005
OP_REP_DEVLIST = 0x0005
OP_REQ_IMPORT = 0x8003
OP_REP_IMPORT = 0x0003

CMD_SUBMIT = 1
CMD_UNLINK = 2
RET_SUBMIT = 3
RET_UNLINK = 4

DIR_OUT = 0
DIR_IN = 1

URB_SHORT_NOT_OK = 0x0001
URB_DIR_IN = 0x0200  # include/uapi/linux/usbip.h: USBIP_URB_DIR_IN

# OP_* common header: version u16, code u16, status u32 (usbip_protocol.rst, all OP_*).
_OP_HEADER = struct.Struct(">HHI")
# struct usbip_usb_device, 312 bytes (usbip_protocol.rst OP_REP_DEVLIST from 0x0C).
_USB_DEVICE = struct.Struct(">256s32sIIIHHHBBBBBB")
# usbip_usb_interface, 4 bytes: class, subclass, protocol, padding.
_USB_INTERFACE = struct.Struct(">BBBx")
# usbip_header_basic (20 bytes) + 28 command-specific bytes = 48 (usbip_protocol.rst).
_BASIC = struct.Struct(">IIIII")
_CMD_SUBMIT = struct.Struct(">IIIIIIIIII8s")  # ... flags, length, start_frame, npackets, interval
_CMD_UNLINK = struct.Struct(">IIIIII24x")  # ... unlink_seqnum, padding
_RET_SUBMIT = struct.Struct(">IIIIIiiiii8x")  # ... status, actual_length, start, npkts, errors
_RET_UNLINK = struct.Struct(">IIIIIi24x")  # ... status, padding
HEADER_SIZE = 48
assert _USB_DEVICE.size == 312
assert HEADER_SIZE == _CMD_SUBMIT.size == _CMD_UNLINK.size == _RET_SUBMIT.size
assert _RET_UNLINK.size == HEADER_SIZE


class HostError(UsbccidError):
    """Base of the USB/IP client's errors."""


class ProtocolError(HostError):
    """The server broke the USB/IP protocol; the connection is unusable afterwards."""


class ConnectionClosedError(HostError):
    """The TCP connection ended (or failed) while the client still needed it."""


class ImportRefusedError(HostError):
    """OP_REP_IMPORT came back with a non-zero status (1 = ST_NA, 2 = busy, ...)."""

    def __init__(self, busid: str, status: int) -> None:
        super().__init__(f"import of {busid!r} refused with status {status}")
        self.busid = busid
        self.status = status


class UrbTimeoutError(HostError):
    """A URB did not complete in time and was unlinked (CMD_UNLINK / RET_UNLINK)."""

    def __init__(self, seqnum: int, unlink_status: int) -> None:
        super().__init__(f"URB {seqnum} timed out; RET_UNLINK status {unlink_status}")
        self.seqnum = seqnum
        self.unlink_status = unlink_status


@dataclass(frozen=True, slots=True)
class ExportedDevice:
    """One ``struct usbip_usb_device`` (plus its interface triples from OP_REP_DEVLIST)."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int  # enum usb_device_speed: 1 low, 2 full, 3 high, 4 wireless, 5 super
    idVendor: int
    idProduct: int
    bcdDevice: int
    bDeviceClass: int
    bDeviceSubClass: int
    bDeviceProtocol: int
    bConfigurationValue: int
    bNumConfigurations: int
    bNumInterfaces: int
    interfaces: tuple[tuple[int, int, int], ...] = ()  # (class, subclass, protocol)

    @property
    def devid(self) -> int:
        """What the client puts in every URB header: (busnum << 16) | devnum."""
        return ((self.busnum & 0xFFFF) << 16) | (self.devnum & 0xFFFF)


@dataclass(frozen=True, slots=True)
class DeviceList:
    devices: tuple[ExportedDevice, ...]


@dataclass(frozen=True, slots=True)
class ImportReply:
    status: int
    device: ExportedDevice | None  # None unless status == 0


@dataclass(frozen=True, slots=True)
class SubmitDone:
    """A RET_SUBMIT. ``data`` is the IN payload (always b"" for OUT URBs)."""

    seqnum: int
    status: int  # 0 or a negative Linux errno (-32 = -EPIPE: stall)
    actual_length: int
    data: bytes
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0


@dataclass(frozen=True, slots=True)
class UnlinkDone:
    """A RET_UNLINK for CMD_UNLINK ``seqnum`` that targeted URB ``unlink_seqnum``.

    ``cancelled`` tells whether that URB was still outstanding, i.e. whether the server
    owes us no RET_SUBMIT for it any more (usbip_protocol.rst: "after a successful
    USBIP_RET_UNLINK, the unlinked URB submission would not have a corresponding
    USBIP_RET_SUBMIT").
    """

    seqnum: int
    unlink_seqnum: int
    status: int  # -ECONNRESET (-104) when it unlinked, 0 when the URB had completed
    cancelled: bool


Event = DeviceList | ImportReply | SubmitDone | UnlinkDone


class State(enum.Enum):
    IDLE = "idle"
    AWAIT_DEVLIST = "await-devlist"
    AWAIT_IMPORT = "await-import"
    IMPORTED = "imported"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class _Outstanding:
    direction: int
    length: int


def _cstr(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("ascii", "replace")


def encode_op_request(code: int, payload: bytes = b"") -> bytes:
    """An OP_REQ_* message: the 8-byte common header then ``payload``."""
    return _OP_HEADER.pack(USBIP_VERSION, code, 0) + payload


def encode_busid(busid: str) -> bytes:
    raw = busid.encode("ascii")
    if len(raw) > 31:  # SYSFS_BUS_ID_SIZE is 32 including the NUL
        raise ValueError(f"busid too long: {busid!r}")
    return raw.ljust(32, b"\0")


def encode_cmd_submit(
    *,
    seqnum: int,
    devid: int,
    direction: int,
    ep: int,
    transfer_flags: int,
    transfer_buffer_length: int,
    setup: bytes,
    interval: int = 0,
    start_frame: int = 0,
    number_of_packets: int = 0,
    data: bytes = b"",
) -> bytes:
    """USBIP_CMD_SUBMIT: 48-byte header, then the OUT data (usbip_protocol.rst).

    Non-ISO URBs: ``number_of_packets`` is what Linux vhci sends (the URB's own 0); the
    document's table says 0xffffffff. A server must accept either.
    """
    if len(setup) != 8:
        raise ValueError("setup must be 8 bytes")
    if direction == DIR_OUT and len(data) != transfer_buffer_length:
        raise ValueError("OUT data must be exactly transfer_buffer_length bytes")
    if direction == DIR_IN and data:
        raise ValueError("an IN URB carries no data")
    header = _CMD_SUBMIT.pack(
        CMD_SUBMIT,
        seqnum,
        devid,
        direction,
        ep,
        transfer_flags,
        transfer_buffer_length,
        start_frame & 0xFFFFFFFF,
        number_of_packets & 0xFFFFFFFF,
        interval & 0xFFFFFFFF,
        setup,
    )
    return header + data


def encode_cmd_unlink(*, seqnum: int, devid: int, unlink_seqnum: int) -> bytes:
    """USBIP_CMD_UNLINK: direction and ep 0 ("for UNLINK, this shall be 0")."""
    return _CMD_UNLINK.pack(CMD_UNLINK, seqnum, devid, DIR_OUT, 0, unlink_seqnum)


def parse_usb_device(raw: bytes | bytearray | memoryview) -> ExportedDevice:
    """One 312-byte ``struct usbip_usb_device`` (no interface list)."""
    f = _USB_DEVICE.unpack(bytes(raw[: _USB_DEVICE.size]))
    return ExportedDevice(_cstr(f[0]), _cstr(f[1]), *f[2:])


class ClientConnection:
    """One TCP connection, client role: either a device list or one imported device."""

    def __init__(self, *, first_seqnum: int = 1) -> None:
        self.state = State.IDLE
        self.device: ExportedDevice | None = None
        self._busid = ""
        self._buffer = bytearray()
        self._next_seqnum = first_seqnum
        self._outstanding: dict[int, _Outstanding] = {}
        self._unlinks: dict[int, int] = {}  # CMD_UNLINK seqnum -> the URB it targets

    # -- what the client sends -------------------------------------------------------

    def request_devlist(self) -> bytes:
        """OP_REQ_DEVLIST (usbip_protocol.rst); the server answers and closes."""
        self._expect(State.IDLE)
        self.state = State.AWAIT_DEVLIST
        return encode_op_request(OP_REQ_DEVLIST)

    def request_import(self, busid: str) -> bytes:
        """OP_REQ_IMPORT with the NUL-padded 32-byte busid (usbip_protocol.rst)."""
        self._expect(State.IDLE)
        payload = encode_busid(busid)
        self._busid = busid
        self.state = State.AWAIT_IMPORT
        return encode_op_request(OP_REQ_IMPORT, payload)

    def submit(
        self,
        *,
        endpoint: int,
        length: int = 0,
        data: bytes = b"",
        setup: bytes = bytes(8),
        interval: int = 0,
        transfer_flags: int | None = None,
    ) -> tuple[int, bytes]:
        """A CMD_SUBMIT; returns (seqnum, bytes to send).

        ``endpoint`` is a bEndpointAddress (USB 2.0 §9.6.6): bit 7 set for IN. The
        control pipe is 0x00 or 0x80, its direction taken from the SETUP packet's
        bmRequestType bit 7 (USB 2.0 §9.3.1). IN URBs ask for ``length`` bytes; OUT
        URBs send ``data``.
        """
        self._expect(State.IMPORTED)
        assert self.device is not None
        number = endpoint & 0x0F
        if number == 0:
            direction = DIR_IN if setup[0] & 0x80 else DIR_OUT
        else:
            direction = DIR_IN if endpoint & 0x80 else DIR_OUT
        if direction == DIR_OUT:
            length = len(data)
        if transfer_flags is None:
            transfer_flags = URB_DIR_IN if direction == DIR_IN else 0
        seqnum = self._take_seqnum()
        pdu = encode_cmd_submit(
            seqnum=seqnum,
            devid=self.device.devid,
            direction=direction,
            ep=number,
            transfer_flags=transfer_flags,
            transfer_buffer_length=length,
            setup=setup,
            interval=interval,
            data=data,
        )
        self._outstanding[seqnum] = _Outstanding(direction, length)
        return seqnum, pdu

    def unlink(self, seqnum: int) -> tuple[int, bytes]:
        """A CMD_UNLINK for URB ``seqnum``; returns (the unlink's own seqnum, bytes)."""
        self._expect(State.IMPORTED)
        assert self.device is not None
        own = self._take_seqnum()
        self._unlinks[own] = seqnum
        return own, encode_cmd_unlink(seqnum=own, devid=self.device.devid, unlink_seqnum=seqnum)

    @property
    def outstanding(self) -> frozenset[int]:
        """Seqnums of submitted URBs with neither RET_SUBMIT nor a cancelling RET_UNLINK."""
        return frozenset(self._outstanding)

    # -- what the server sends -------------------------------------------------------

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed received bytes; returns the complete messages they finish.

        Raises:
            ProtocolError: the bytes break the protocol; the connection is closed.
        """
        if self.state is State.CLOSED:
            raise ProtocolError("data after the connection closed")
        self._buffer += data
        events: list[Event] = []
        try:
            while True:
                event = self._next_event()
                if event is None:
                    return events
                events.append(event)
        except ProtocolError:
            self.state = State.CLOSED
            raise

    def _next_event(self) -> Event | None:
        if self.state is State.AWAIT_DEVLIST:
            return self._parse_devlist()
        if self.state is State.AWAIT_IMPORT:
            return self._parse_import()
        if self.state is State.IMPORTED:
            return self._parse_urb_reply()
        if self._buffer:
            raise ProtocolError(f"unexpected bytes in state {self.state.value}")
        return None

    def _op_header(self, code: int) -> int | None:
        if len(self._buffer) < _OP_HEADER.size:
            return None
        version, got, status = _OP_HEADER.unpack_from(self._buffer)
        # The usbip tool refuses another version ("USBIP Kernel and tool version
        # mismatch") and another reply code (usbip_network.c usbip_net_recv_op_common).
        if version != USBIP_VERSION:
            raise ProtocolError(f"version {version:#06x}, expected {USBIP_VERSION:#06x}")
        if got != code:
            raise ProtocolError(f"reply code {got:#06x}, expected {code:#06x}")
        return int(status)

    def _parse_devlist(self) -> DeviceList | None:
        # OP_REP_DEVLIST: header, ndev u32, then per device 312 bytes followed by
        # bNumInterfaces 4-byte interface entries (usbip_protocol.rst).
        status = self._op_header(OP_REP_DEVLIST)
        if status is None or len(self._buffer) < 12:
            return None
        if status != 0:
            raise ProtocolError(f"OP_REP_DEVLIST status {status}")
        (count,) = struct.unpack_from(">I", self._buffer, 8)
        offset = 12
        devices: list[ExportedDevice] = []
        for _ in range(count):
            if len(self._buffer) < offset + _USB_DEVICE.size:
                return None
            device = parse_usb_device(memoryview(self._buffer)[offset:])
            offset += _USB_DEVICE.size
            end = offset + device.bNumInterfaces * _USB_INTERFACE.size
            if len(self._buffer) < end:
                return None
            triples = tuple(
                _USB_INTERFACE.unpack_from(self._buffer, offset + i * _USB_INTERFACE.size)
                for i in range(device.bNumInterfaces)
            )
            offset = end
            interfaces = tuple((t[0], t[1], t[2]) for t in triples)
            devices.append(dataclasses.replace(device, interfaces=interfaces))
        del self._buffer[:offset]
        self.state = State.CLOSED  # the server closes the connection after the list
        if self._buffer:
            raise ProtocolError("bytes after OP_REP_DEVLIST")
        return DeviceList(tuple(devices))

    def _parse_import(self) -> ImportReply | None:
        # OP_REP_IMPORT: header; with status 0 the 312-byte device follows, otherwise
        # nothing (usbip_protocol.rst).
        status = self._op_header(OP_REP_IMPORT)
        if status is None:
            return None
        if status != 0:
            del self._buffer[: _OP_HEADER.size]
            self.state = State.CLOSED
            return ImportReply(status, None)
        if len(self._buffer) < _OP_HEADER.size + _USB_DEVICE.size:
            return None
        device = parse_usb_device(memoryview(self._buffer)[_OP_HEADER.size :])
        del self._buffer[: _OP_HEADER.size + _USB_DEVICE.size]
        # usbip_attach.c compares the echoed busid with the one asked for.
        if device.busid != self._busid:
            raise ProtocolError(f"import of {self._busid!r} answered for {device.busid!r}")
        self.device = device
        self.state = State.IMPORTED
        return ImportReply(0, device)

    def _parse_urb_reply(self) -> SubmitDone | UnlinkDone | None:
        if len(self._buffer) < HEADER_SIZE:
            return None
        command, seqnum = struct.unpack_from(">II", self._buffer)
        if command == RET_SUBMIT:
            return self._parse_ret_submit(seqnum)
        if command == RET_UNLINK:
            return self._parse_ret_unlink(seqnum)
        raise ProtocolError(f"unknown command {command:#x} (seqnum {seqnum})")

    def _parse_ret_submit(self, seqnum: int) -> SubmitDone | None:
        _, _, _, _, _, status, actual, start, npackets, errors = _RET_SUBMIT.unpack_from(
            self._buffer
        )
        urb = self._outstanding.get(seqnum)
        if urb is None:
            # vhci_rx.c: "cannot find a urb of seqnum" -> the device is disconnected.
            raise ProtocolError(f"RET_SUBMIT for unknown seqnum {seqnum}")
        if status > 0:
            raise ProtocolError(f"RET_SUBMIT {seqnum}: status {status} is not a -errno")
        if actual < 0 or actual > urb.length:
            # vhci: "recv xbuf" -> disconnect; never more than transfer_buffer_length.
            raise ProtocolError(f"RET_SUBMIT {seqnum}: actual_length {actual} > {urb.length}")
        payload = actual if urb.direction == DIR_IN else 0  # OUT replies carry no data
        if len(self._buffer) < HEADER_SIZE + payload:
            return None
        data = bytes(self._buffer[HEADER_SIZE : HEADER_SIZE + payload])
        del self._buffer[: HEADER_SIZE + payload]
        del self._outstanding[seqnum]
        return SubmitDone(seqnum, status, actual, data, start, npackets, errors)

    def _parse_ret_unlink(self, seqnum: int) -> UnlinkDone:
        fields = _RET_UNLINK.unpack_from(self._buffer)
        status = fields[5]
        target = self._unlinks.pop(seqnum, None)
        if target is None:
            raise ProtocolError(f"RET_UNLINK for unknown seqnum {seqnum}")
        if status not in (0, -errno.ECONNRESET):
            raise ProtocolError(f"RET_UNLINK {seqnum}: status {status}")
        del self._buffer[:HEADER_SIZE]
        cancelled = self._outstanding.pop(target, None) is not None
        return UnlinkDone(seqnum, target, status, cancelled)

    # -- helpers ----------------------------------------------------------------------

    def _expect(self, state: State) -> None:
        if self.state is not state:
            raise HostError(f"connection is {self.state.value}, not {state.value}")

    def _take_seqnum(self) -> int:
        seqnum = self._next_seqnum
        self._next_seqnum = seqnum % 0xFFFFFFFF + 1  # 1 .. 2**32-1, never 0
        return seqnum
