"""USB/IP and USB descriptor wire formats, each declared once with construct.

Sources: Linux ``Documentation/usb/usbip_protocol.rst`` (all USB/IP fields big-endian),
``include/uapi/linux/usbip.h``, ``tools/usb/usbip/libsrc/usbip_common.h``; USB 2.0 §9.3
(SETUP packet) and §9.6 (standard descriptors), both little-endian.

The same struct parses and builds. construct Containers never leave this module: every
message is a frozen dataclass, converted in :func:`parse_*` / :func:`encode`. A
construct error while parsing peer bytes becomes :class:`UsbipRemoteError` here, once;
while building our own message it becomes :class:`UsbipLocalError` (a bug).

Nothing here decides whether enough bytes have arrived: the caller (``connection.py``)
checks lengths first (``OP_COMMON_SIZE``, ``URB_HEADER_SIZE``, ...) and construct's
``StreamError`` is never used as a "need more data" signal.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, TypeAlias

from construct import (
    Array,
    Bytes,
    Const,
    Construct,
    ConstructError,
    Container,
    Int8ub,
    Int8ul,
    Int16ub,
    Int16ul,
    Int32sb,
    Int32ub,
    PaddedString,
    Padding,
    Rebuild,
    Struct,
    Terminated,
    this,
)

from usbccid.compiled import StructLayout, compiled, parse_fast
from usbccid.usbip.errors import UsbipLocalError, UsbipRemoteError
from usbccid.usbip.function import SetupPacket

USBIP_VERSION = 0x0111
"""usbip_protocol.rst: "USBIP version" 1.1.1, always sent (and required) as 0x0111."""


class OpCode(enum.IntEnum):
    """op_common.code (usbip_protocol.rst; ``OP_REQUEST = 0x80 << 8``, ``OP_REPLY = 0``)."""

    REQ_DEVLIST = 0x8005
    REP_DEVLIST = 0x0005
    REQ_IMPORT = 0x8003
    REP_IMPORT = 0x0003


class OpStatus(enum.IntEnum):
    """op_common.status (tools/usb/usbip/libsrc/usbip_common.h)."""

    OK = 0x00
    NA = 0x01  # device not available
    DEV_BUSY = 0x02  # device busy (exported)
    DEV_ERR = 0x03  # device in error state
    NODEV = 0x04  # device not found
    ERROR = 0x05  # unexpected response


class Speed(enum.IntEnum):
    """enum usb_device_speed (include/uapi/linux/usb/ch9.h), the ``speed`` of usbip_usb_device."""

    UNKNOWN = 0
    LOW = 1
    FULL = 2
    HIGH = 3
    WIRELESS = 4
    SUPER = 5
    SUPER_PLUS = 6


class UrbCommand(enum.IntEnum):
    """usbip_header_basic.command (usbip_protocol.rst)."""

    CMD_SUBMIT = 1
    CMD_UNLINK = 2
    RET_SUBMIT = 3
    RET_UNLINK = 4


class Direction(enum.IntEnum):
    """usbip_header_basic.direction: USBIP_DIR_OUT 0, USBIP_DIR_IN 1."""

    OUT = 0
    IN = 1


class DescriptorType(enum.IntEnum):
    """bDescriptorType (USB 2.0 Table 9-5; BOS from USB 3.x §9.6.2)."""

    DEVICE = 1
    CONFIGURATION = 2
    STRING = 3
    INTERFACE = 4
    ENDPOINT = 5
    DEVICE_QUALIFIER = 6
    OTHER_SPEED_CONFIGURATION = 7
    INTERFACE_POWER = 8
    BOS = 15


LANGID_EN_US = 0x0409

# --------------------------------------------------------------------------------------
# construct declarations (module-private; the public surface is dataclasses + functions)
# --------------------------------------------------------------------------------------

# op_common: every op-phase message starts with it.
_OP_COMMON = Struct(
    "version" / Const(USBIP_VERSION, Int16ub),
    "code" / Int16ub,
    "status" / Int32ub,
)
OP_COMMON_SIZE = 8
_OP_COMMON_ALONE = Struct("h" / _OP_COMMON, Terminated)

# usbip_usb_device: 312 bytes (usbip_protocol.rst OP_REP_DEVLIST offsets 0x0C..0x143).
_USB_DEVICE = Struct(
    "path" / PaddedString(256, "ascii"),
    "busid" / PaddedString(32, "ascii"),
    "busnum" / Int32ub,
    "devnum" / Int32ub,
    "speed" / Int32ub,
    "idVendor" / Int16ub,
    "idProduct" / Int16ub,
    "bcdDevice" / Int16ub,
    "bDeviceClass" / Int8ub,
    "bDeviceSubClass" / Int8ub,
    "bDeviceProtocol" / Int8ub,
    "bConfigurationValue" / Int8ub,
    "bNumConfigurations" / Int8ub,
    "bNumInterfaces" / Int8ub,
)
USB_DEVICE_SIZE = 312

# usbip_usb_interface: 4 bytes, the last one padding.
_USB_INTERFACE = Struct(
    "bInterfaceClass" / Int8ub,
    "bInterfaceSubClass" / Int8ub,
    "bInterfaceProtocol" / Int8ub,
    Padding(1),
)

_OP_REQ_DEVLIST = Struct("header" / _OP_COMMON, Terminated)

_OP_REP_DEVLIST = Struct(
    "header" / _OP_COMMON,
    "ndev" / Rebuild(Int32ub, lambda ctx: len(ctx.devices)),
    "devices"
    / Array(
        this.ndev,
        Struct(
            "device" / _USB_DEVICE,
            # One usbip_usb_interface per bNumInterfaces, right after the device.
            "interfaces" / Array(this.device.bNumInterfaces, _USB_INTERFACE),
        ),
    ),
    Terminated,
)

_OP_REQ_IMPORT = Struct("header" / _OP_COMMON, "busid" / PaddedString(32, "ascii"), Terminated)
OP_REQ_IMPORT_BODY_SIZE = 32

# OP_REP_IMPORT: the usbip_usb_device follows only when status == 0 (usbip_protocol.rst:
# "the following fields are only present if status == 0"); a refusal is 8 bytes.
_OP_REP_IMPORT_OK = Struct("header" / _OP_COMMON, "device" / _USB_DEVICE, Terminated)
_OP_REP_IMPORT_FAIL = Struct("header" / _OP_COMMON, Terminated)

# The 8-byte SETUP packet inside CMD_SUBMIT is a raw USB packet: little-endian (USB 2.0
# §9.3), never byte-swapped by the kernel, unlike every other USB/IP field.
_SETUP_PACKET = Struct(
    "bmRequestType" / Int8ul,
    "bRequest" / Int8ul,
    "wValue" / Int16ul,
    "wIndex" / Int16ul,
    "wLength" / Int16ul,
)
SETUP_PACKET_SIZE = 8
_SETUP_PACKET_ALONE = Struct("s" / _SETUP_PACKET, Terminated)

# usbip_header: 20-byte usbip_header_basic + 28 command-specific bytes = 48 bytes.
_HEADER_BASIC = Struct(
    "command" / Int32ub,
    "seqnum" / Int32ub,
    "devid" / Int32ub,
    "direction" / Int32ub,
    "ep" / Int32ub,
)
URB_HEADER_SIZE = 48
HEADER_BASIC_SIZE = 20

_CMD_SUBMIT_HEADER = Struct(
    "basic" / _HEADER_BASIC,
    "transfer_flags" / Int32ub,
    "transfer_buffer_length" / Int32ub,
    "start_frame" / Int32sb,
    "number_of_packets" / Int32sb,  # 0xffffffff (-1) for non-ISO per the doc; 0 is common
    "interval" / Int32sb,
    "setup" / _SETUP_PACKET,
)
_RET_SUBMIT_HEADER = Struct(
    "basic" / _HEADER_BASIC,
    "status" / Int32sb,  # 0 or a negative Linux errno, copied into urb->status by vhci
    "actual_length" / Int32ub,
    "start_frame" / Int32sb,
    "number_of_packets" / Int32sb,
    "error_count" / Int32sb,
    Padding(8),
)
_CMD_UNLINK_HEADER = Struct("basic" / _HEADER_BASIC, "unlink_seqnum" / Int32ub, Padding(24))
_RET_UNLINK_HEADER = Struct("basic" / _HEADER_BASIC, "status" / Int32sb, Padding(24))

_URB_HEADERS: dict[UrbCommand, Construct[Any, Any]] = {
    UrbCommand.CMD_SUBMIT: _CMD_SUBMIT_HEADER,
    UrbCommand.RET_SUBMIT: _RET_SUBMIT_HEADER,
    UrbCommand.CMD_UNLINK: _CMD_UNLINK_HEADER,
    UrbCommand.RET_UNLINK: _RET_UNLINK_HEADER,
}

# The hot path (every APDU is two CMD_SUBMITs and two RET_SUBMITs) reads and writes these
# two headers with one precompiled struct.Struct each, derived from the declarations above
# (usbccid.compiled.StructLayout); the SETUP packet rides along as its 8 raw bytes, since
# it is little-endian. The names are checked here, at import, against the order in which
# the code below unpacks and packs them.
CMD_SUBMIT_LAYOUT = StructLayout(_CMD_SUBMIT_HEADER, raw=("setup",))
RET_SUBMIT_LAYOUT = StructLayout(_RET_SUBMIT_HEADER)
_BASIC_NAMES = ("basic.command", "basic.seqnum", "basic.devid", "basic.direction", "basic.ep")
if CMD_SUBMIT_LAYOUT.names != (
    *_BASIC_NAMES,
    "transfer_flags",
    "transfer_buffer_length",
    "start_frame",
    "number_of_packets",
    "interval",
    "setup",
) or RET_SUBMIT_LAYOUT.names != (
    *_BASIC_NAMES,
    "status",
    "actual_length",
    "start_frame",
    "number_of_packets",
    "error_count",
):  # pragma: no cover - a declaration changed without the code below
    raise ImportError("the URB header layouts no longer match their declarations")
if CMD_SUBMIT_LAYOUT.size != URB_HEADER_SIZE or RET_SUBMIT_LAYOUT.size != URB_HEADER_SIZE:
    raise ImportError("URB headers must be 48 bytes")  # pragma: no cover

# Standard USB descriptors (USB 2.0 §9.6), little-endian.
_DEVICE_DESCRIPTOR = Struct(
    "bLength" / Const(18, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE.value, Int8ul),
    "bcdUSB" / Int16ul,
    "bDeviceClass" / Int8ul,
    "bDeviceSubClass" / Int8ul,
    "bDeviceProtocol" / Int8ul,
    "bMaxPacketSize0" / Int8ul,
    "idVendor" / Int16ul,
    "idProduct" / Int16ul,
    "bcdDevice" / Int16ul,
    "iManufacturer" / Int8ul,
    "iProduct" / Int8ul,
    "iSerialNumber" / Int8ul,
    "bNumConfigurations" / Int8ul,
    Terminated,
)
_DEVICE_QUALIFIER_DESCRIPTOR = Struct(  # USB 2.0 §9.6.2
    "bLength" / Const(10, Int8ul),
    "bDescriptorType" / Const(DescriptorType.DEVICE_QUALIFIER.value, Int8ul),
    "bcdUSB" / Int16ul,
    "bDeviceClass" / Int8ul,
    "bDeviceSubClass" / Int8ul,
    "bDeviceProtocol" / Int8ul,
    "bMaxPacketSize0" / Int8ul,
    "bNumConfigurations" / Int8ul,
    "bReserved" / Const(0, Int8ul),
    Terminated,
)
_CONFIGURATION_DESCRIPTOR = Struct(  # USB 2.0 §9.6.3
    "bLength" / Const(9, Int8ul),
    "bDescriptorType" / Const(DescriptorType.CONFIGURATION.value, Int8ul),
    "wTotalLength" / Int16ul,
    "bNumInterfaces" / Int8ul,
    "bConfigurationValue" / Int8ul,
    "iConfiguration" / Int8ul,
    "bmAttributes" / Int8ul,
    "bMaxPower" / Int8ul,
    Terminated,
)
_INTERFACE_DESCRIPTOR = Struct(  # USB 2.0 §9.6.5
    "bLength" / Const(9, Int8ul),
    "bDescriptorType" / Const(DescriptorType.INTERFACE.value, Int8ul),
    "bInterfaceNumber" / Int8ul,
    "bAlternateSetting" / Int8ul,
    "bNumEndpoints" / Int8ul,
    "bInterfaceClass" / Int8ul,
    "bInterfaceSubClass" / Int8ul,
    "bInterfaceProtocol" / Int8ul,
    "iInterface" / Int8ul,
    Terminated,
)
_ENDPOINT_DESCRIPTOR = Struct(  # USB 2.0 §9.6.6
    "bLength" / Const(7, Int8ul),
    "bDescriptorType" / Const(DescriptorType.ENDPOINT.value, Int8ul),
    "bEndpointAddress" / Int8ul,
    "bmAttributes" / Int8ul,
    "wMaxPacketSize" / Int16ul,
    "bInterval" / Int8ul,
    Terminated,
)
# USB 2.0 §9.6.7: string descriptor 0 lists LANGIDs, the others are UTF-16LE text.
_STRING_DESCRIPTOR = Struct(
    "bLength" / Rebuild(Int8ul, lambda ctx: 2 + len(ctx.bString)),
    "bDescriptorType" / Const(DescriptorType.STRING.value, Int8ul),
    "bString" / Bytes(this.bLength - 2),
    Terminated,
)


# --------------------------------------------------------------------------------------
# Dataclasses: the messages as the rest of the package sees them
# --------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class UsbInterfaceInfo:
    """usbip_usb_interface: one interface's class triple in OP_REP_DEVLIST."""

    interface_class: int
    interface_subclass: int
    interface_protocol: int


@dataclass(frozen=True, slots=True)
class UsbDeviceInfo:
    """usbip_usb_device (312 bytes), in OP_REP_DEVLIST and OP_REP_IMPORT."""

    path: str
    busid: str
    busnum: int
    devnum: int
    speed: int
    vendor_id: int
    product_id: int
    bcd_device: int
    device_class: int
    device_subclass: int
    device_protocol: int
    configuration_value: int
    num_configurations: int
    num_interfaces: int

    @property
    def devid(self) -> int:
        """What vhci puts in every URB header: ``busnum << 16 | devnum`` (usbip_attach.c)."""
        return (self.busnum << 16) | self.devnum


@dataclass(frozen=True, slots=True)
class DevlistEntry:
    device: UsbDeviceInfo
    interfaces: tuple[UsbInterfaceInfo, ...]


@dataclass(frozen=True, slots=True)
class OpReqDevlist:
    """OP_REQ_DEVLIST: the client asks for the exportable devices (8 bytes)."""


@dataclass(frozen=True, slots=True)
class OpRepDevlist:
    devices: tuple[DevlistEntry, ...]
    status: int = OpStatus.OK


@dataclass(frozen=True, slots=True)
class OpReqImport:
    busid: str


@dataclass(frozen=True, slots=True)
class OpRepImport:
    """OP_REP_IMPORT; ``device`` is present iff ``status`` is OK."""

    status: int
    device: UsbDeviceInfo | None = None


@dataclass(frozen=True, slots=True)
class CmdSubmit:
    """USBIP_CMD_SUBMIT; ``data`` is the OUT payload (empty for IN)."""

    seqnum: int
    devid: int
    direction: Direction
    ep: int
    transfer_buffer_length: int
    setup: SetupPacket = field(default_factory=lambda: SetupPacket(0, 0, 0, 0, 0))
    data: bytes = b""
    transfer_flags: int = 0
    start_frame: int = 0
    number_of_packets: int = 0
    interval: int = 0


@dataclass(frozen=True, slots=True)
class RetSubmit:
    """USBIP_RET_SUBMIT; ``data`` is the IN payload (empty for OUT).

    For IN, ``actual_length`` must equal ``len(data)``; for OUT it is the number of bytes
    the device took and no payload follows (usbip_protocol.rst).
    """

    seqnum: int
    status: int
    actual_length: int
    data: bytes = b""
    start_frame: int = 0
    number_of_packets: int = 0
    error_count: int = 0
    # The Linux server sends 0 here (stub_tx.c setup_base_pdu()), as usbip_protocol.rst
    # describes; vhci matches replies by seqnum only (vhci_rx.c).
    devid: int = 0
    direction: int = 0
    ep: int = 0


@dataclass(frozen=True, slots=True)
class CmdUnlink:
    seqnum: int
    devid: int
    direction: Direction
    ep: int
    unlink_seqnum: int


@dataclass(frozen=True, slots=True)
class RetUnlink:
    seqnum: int
    status: int
    devid: int = 0
    direction: int = 0
    ep: int = 0


OpMessage: TypeAlias = OpReqDevlist | OpRepDevlist | OpReqImport | OpRepImport
UrbMessage: TypeAlias = CmdSubmit | RetSubmit | CmdUnlink | RetUnlink
Message: TypeAlias = OpMessage | UrbMessage


@dataclass(frozen=True, slots=True)
class OpHeader:
    code: int
    status: int


@dataclass(frozen=True, slots=True)
class UrbHeader:
    """A parsed 48-byte URB header whose payload (if any) has not been read yet.

    ``message`` has ``data=b""``; ``payload_length`` says how many bytes follow.
    """

    message: UrbMessage

    @property
    def payload_length(self) -> int:
        m = self.message
        if isinstance(m, CmdSubmit) and m.direction == Direction.OUT:
            return m.transfer_buffer_length
        return 0


class Submit(NamedTuple):
    """A CMD_SUBMIT as the hot path carries it: the header's fields in wire order (the
    SETUP packet as its 8 raw bytes), then the OUT payload. A tuple, not a dataclass: it
    is made for every URB. :meth:`to_cmd` / :meth:`from_cmd` convert to :class:`CmdSubmit`."""

    seqnum: int
    devid: int
    direction: int
    ep: int
    transfer_flags: int
    transfer_buffer_length: int
    start_frame: int
    number_of_packets: int
    interval: int
    setup: bytes
    data: bytes

    def to_cmd(self) -> CmdSubmit:
        return CmdSubmit(
            seqnum=self.seqnum,
            devid=self.devid,
            direction=Direction(self.direction),
            ep=self.ep,
            transfer_buffer_length=self.transfer_buffer_length,
            setup=parse_setup(self.setup),
            data=self.data,
            transfer_flags=self.transfer_flags,
            start_frame=self.start_frame,
            number_of_packets=self.number_of_packets,
            interval=self.interval,
        )

    @classmethod
    def from_cmd(cls, cmd: CmdSubmit) -> Submit:
        return cls(
            cmd.seqnum,
            cmd.devid,
            int(cmd.direction),
            cmd.ep,
            cmd.transfer_flags,
            cmd.transfer_buffer_length,
            cmd.start_frame,
            cmd.number_of_packets,
            cmd.interval,
            encode_setup(cmd.setup),
            cmd.data,
        )


class Ret(NamedTuple):
    """A RET_SUBMIT as the hot path carries it (devid, direction, ep and the ISO fields
    are 0, as the Linux server sends them). :meth:`to_ret_submit` gives the dataclass."""

    seqnum: int
    status: int
    actual_length: int
    data: bytes = b""

    def to_ret_submit(self) -> RetSubmit:
        return RetSubmit(self.seqnum, self.status, self.actual_length, self.data)


@dataclass(frozen=True, slots=True)
class DeviceDescriptor:
    bcd_usb: int
    device_class: int
    device_subclass: int
    device_protocol: int
    max_packet_size0: int
    vendor_id: int
    product_id: int
    bcd_device: int
    i_manufacturer: int
    i_product: int
    i_serial_number: int
    num_configurations: int


@dataclass(frozen=True, slots=True)
class DeviceQualifierDescriptor:
    bcd_usb: int
    device_class: int
    device_subclass: int
    device_protocol: int
    max_packet_size0: int
    num_configurations: int


@dataclass(frozen=True, slots=True)
class ConfigurationDescriptor:
    total_length: int
    num_interfaces: int
    configuration_value: int
    i_configuration: int
    attributes: int
    max_power: int


@dataclass(frozen=True, slots=True)
class InterfaceDescriptor:
    interface_number: int
    alternate_setting: int
    num_endpoints: int
    interface_class: int
    interface_subclass: int
    interface_protocol: int
    i_interface: int


@dataclass(frozen=True, slots=True)
class EndpointDescriptor:
    endpoint_address: int
    attributes: int
    max_packet_size: int
    interval: int


Descriptor: TypeAlias = (
    DeviceDescriptor
    | DeviceQualifierDescriptor
    | ConfigurationDescriptor
    | InterfaceDescriptor
    | EndpointDescriptor
)

# --------------------------------------------------------------------------------------
# Conversion helpers
# --------------------------------------------------------------------------------------


def _parse(struct: Construct[Any, Any], data: bytes, what: str) -> Container[Any]:
    """Parse peer bytes; the one place where construct errors become UsbipRemoteError."""
    fast = parse_fast(struct, data)  # well-formed fixed-size headers, the common case
    if fast is not None:
        return fast
    try:
        result: Container[Any] = struct.parse(data)
    except ConstructError as e:
        raise UsbipRemoteError(f"malformed {what}: {e}") from e
    return result


def _build(struct: Construct[Any, Any], obj: dict[str, Any], what: str) -> bytes:
    """Build our own bytes; a failure is our bug (UsbipLocalError)."""
    try:
        return bytes(compiled(struct).build(obj))
    except Exception:  # noqa: S110 - any failure: the declaration itself decides, below
        pass
    try:
        result: bytes = struct.build(obj)
    except (ConstructError, ValueError, TypeError, UnicodeError) as e:
        raise UsbipLocalError(f"cannot encode {what}: {e}") from e
    return result


def _device_to_dict(d: UsbDeviceInfo) -> dict[str, Any]:
    return {
        "path": d.path,
        "busid": d.busid,
        "busnum": d.busnum,
        "devnum": d.devnum,
        "speed": d.speed,
        "idVendor": d.vendor_id,
        "idProduct": d.product_id,
        "bcdDevice": d.bcd_device,
        "bDeviceClass": d.device_class,
        "bDeviceSubClass": d.device_subclass,
        "bDeviceProtocol": d.device_protocol,
        "bConfigurationValue": d.configuration_value,
        "bNumConfigurations": d.num_configurations,
        "bNumInterfaces": d.num_interfaces,
    }


def _device_from(c: Container[Any]) -> UsbDeviceInfo:
    return UsbDeviceInfo(
        path=c.path,
        busid=c.busid,
        busnum=c.busnum,
        devnum=c.devnum,
        speed=c.speed,
        vendor_id=c.idVendor,
        product_id=c.idProduct,
        bcd_device=c.bcdDevice,
        device_class=c.bDeviceClass,
        device_subclass=c.bDeviceSubClass,
        device_protocol=c.bDeviceProtocol,
        configuration_value=c.bConfigurationValue,
        num_configurations=c.bNumConfigurations,
        num_interfaces=c.bNumInterfaces,
    )


def _setup_to_dict(s: SetupPacket) -> dict[str, Any]:
    return {
        "bmRequestType": s.bmRequestType,
        "bRequest": s.bRequest,
        "wValue": s.wValue,
        "wIndex": s.wIndex,
        "wLength": s.wLength,
    }


def _basic(command: UrbCommand, m: UrbMessage) -> dict[str, Any]:
    return {
        "command": command.value,
        "seqnum": m.seqnum,
        "devid": m.devid,
        "direction": int(m.direction),
        "ep": m.ep,
    }


# --------------------------------------------------------------------------------------
# Public API: encode any message; parse each one
# --------------------------------------------------------------------------------------


def encode(message: Message) -> bytes:
    """The wire bytes of ``message`` (header and payload).

    Raises:
        UsbipLocalError: the message cannot be encoded (a field out of range, an IN
            RET_SUBMIT whose ``data`` does not match ``actual_length``): a bug of ours.
    """
    obj: dict[str, Any]
    hdr: dict[str, Any]
    if isinstance(message, OpReqDevlist):
        hdr = {"code": OpCode.REQ_DEVLIST, "status": 0}
        return _build(_OP_REQ_DEVLIST, {"header": hdr}, "OP_REQ_DEVLIST")
    if isinstance(message, OpRepDevlist):
        hdr = {"code": OpCode.REP_DEVLIST, "status": message.status}
        devices = []
        for entry in message.devices:
            if entry.device.num_interfaces != len(entry.interfaces):
                raise UsbipLocalError("bNumInterfaces does not match the interface list")
            devices.append(
                {
                    "device": _device_to_dict(entry.device),
                    "interfaces": [
                        {
                            "bInterfaceClass": i.interface_class,
                            "bInterfaceSubClass": i.interface_subclass,
                            "bInterfaceProtocol": i.interface_protocol,
                        }
                        for i in entry.interfaces
                    ],
                }
            )
        return _build(_OP_REP_DEVLIST, {"header": hdr, "devices": devices}, "OP_REP_DEVLIST")
    if isinstance(message, OpReqImport):
        hdr = {"code": OpCode.REQ_IMPORT, "status": 0}
        return _build(_OP_REQ_IMPORT, {"header": hdr, "busid": message.busid}, "OP_REQ_IMPORT")
    if isinstance(message, OpRepImport):
        hdr = {"code": OpCode.REP_IMPORT, "status": message.status}
        if message.status == OpStatus.OK:
            if message.device is None:
                raise UsbipLocalError("OP_REP_IMPORT with status 0 needs a device")
            obj = {"header": hdr, "device": _device_to_dict(message.device)}
            return _build(_OP_REP_IMPORT_OK, obj, "OP_REP_IMPORT")
        if message.device is not None:
            raise UsbipLocalError("a refused OP_REP_IMPORT carries no device")
        return _build(_OP_REP_IMPORT_FAIL, {"header": hdr}, "OP_REP_IMPORT")
    if isinstance(message, CmdSubmit):
        if message.direction == Direction.OUT:
            if len(message.data) != message.transfer_buffer_length:
                raise UsbipLocalError("OUT CMD_SUBMIT: data length != transfer_buffer_length")
        elif message.data:
            raise UsbipLocalError("IN CMD_SUBMIT carries no data")
        obj = {
            "basic": _basic(UrbCommand.CMD_SUBMIT, message),
            "transfer_flags": message.transfer_flags,
            "transfer_buffer_length": message.transfer_buffer_length,
            "start_frame": message.start_frame,
            "number_of_packets": message.number_of_packets,
            "interval": message.interval,
            "setup": _setup_to_dict(message.setup),
        }
        return _build(_CMD_SUBMIT_HEADER, obj, "CMD_SUBMIT") + message.data
    if isinstance(message, RetSubmit):
        if message.data and len(message.data) != message.actual_length:
            raise UsbipLocalError("RET_SUBMIT: len(data) != actual_length")
        obj = {
            "basic": _basic(UrbCommand.RET_SUBMIT, message),
            "status": message.status,
            "actual_length": message.actual_length,
            "start_frame": message.start_frame,
            "number_of_packets": message.number_of_packets,
            "error_count": message.error_count,
        }
        return _build(_RET_SUBMIT_HEADER, obj, "RET_SUBMIT") + message.data
    if isinstance(message, CmdUnlink):
        obj = {
            "basic": _basic(UrbCommand.CMD_UNLINK, message),
            "unlink_seqnum": message.unlink_seqnum,
        }
        return _build(_CMD_UNLINK_HEADER, obj, "CMD_UNLINK")
    if isinstance(message, RetUnlink):
        obj = {"basic": _basic(UrbCommand.RET_UNLINK, message), "status": message.status}
        return _build(_RET_UNLINK_HEADER, obj, "RET_UNLINK")
    raise UsbipLocalError(f"not a USB/IP message: {message!r}")  # pragma: no cover


def parse_op_header(data: bytes) -> OpHeader:
    """The 8-byte op_common header.

    Raises:
        UsbipRemoteError: wrong version (not 0x0111) or not exactly 8 bytes.
    """
    c = _parse(_OP_COMMON_ALONE, data, "op_common header")
    return OpHeader(code=c.h.code, status=c.h.status)


def parse_op_req_devlist(data: bytes) -> OpReqDevlist:
    c = _parse(_OP_REQ_DEVLIST, data, "OP_REQ_DEVLIST")
    _expect_code(c, OpCode.REQ_DEVLIST)
    return OpReqDevlist()


def parse_op_req_import(data: bytes) -> OpReqImport:
    c = _parse(_OP_REQ_IMPORT, data, "OP_REQ_IMPORT")
    _expect_code(c, OpCode.REQ_IMPORT)
    return OpReqImport(busid=c.busid)


def parse_op_rep_devlist(data: bytes) -> OpRepDevlist:
    c = _parse(_OP_REP_DEVLIST, data, "OP_REP_DEVLIST")
    _expect_code(c, OpCode.REP_DEVLIST)
    entries = tuple(
        DevlistEntry(
            device=_device_from(d.device),
            interfaces=tuple(
                UsbInterfaceInfo(i.bInterfaceClass, i.bInterfaceSubClass, i.bInterfaceProtocol)
                for i in d.interfaces
            ),
        )
        for d in c.devices
    )
    return OpRepDevlist(devices=entries, status=c.header.status)


def parse_op_rep_import(data: bytes) -> OpRepImport:
    if len(data) == OP_COMMON_SIZE:
        c = _parse(_OP_REP_IMPORT_FAIL, data, "OP_REP_IMPORT")
        _expect_code(c, OpCode.REP_IMPORT)
        if c.header.status == OpStatus.OK:
            raise UsbipRemoteError("OP_REP_IMPORT with status 0 but no device")
        return OpRepImport(status=c.header.status)
    c = _parse(_OP_REP_IMPORT_OK, data, "OP_REP_IMPORT")
    _expect_code(c, OpCode.REP_IMPORT)
    if c.header.status != OpStatus.OK:
        raise UsbipRemoteError("a refused OP_REP_IMPORT must be 8 bytes")
    return OpRepImport(status=OpStatus.OK, device=_device_from(c.device))


def _expect_code(c: Container[Any], code: OpCode) -> None:
    if c.header.code != code:
        raise UsbipRemoteError(f"expected op code {code:#06x}, got {c.header.code:#06x}")


def parse_setup(data: bytes) -> SetupPacket:
    """The 8-byte little-endian SETUP packet (USB 2.0 §9.3)."""
    c = _parse(_SETUP_PACKET_ALONE, data, "setup packet")
    return _setup_from(c.s)


def encode_setup(setup: SetupPacket) -> bytes:
    return _build(_SETUP_PACKET, _setup_to_dict(setup), "setup packet")


def _setup_from(c: Container[Any]) -> SetupPacket:
    return SetupPacket(c.bmRequestType, c.bRequest, c.wValue, c.wIndex, c.wLength)


def parse_urb_header(data: bytes) -> UrbHeader:
    """The 48-byte URB header of any of the four commands, without its payload.

    Raises:
        UsbipRemoteError: not 48 bytes, an unknown command, or a direction other than 0/1.
    """
    if len(data) != URB_HEADER_SIZE:
        raise UsbipRemoteError(f"URB header must be {URB_HEADER_SIZE} bytes, got {len(data)}")
    basic = _parse(_HEADER_BASIC, data[:HEADER_BASIC_SIZE], "usbip_header_basic")
    try:
        command = UrbCommand(basic.command)
    except ValueError:
        raise UsbipRemoteError(f"unknown USB/IP command {basic.command:#x}") from None
    c = _parse(_URB_HEADERS[command], data, command.name)  # exactly 48 bytes, checked above
    b = c.basic
    if command is UrbCommand.RET_SUBMIT:
        return UrbHeader(
            RetSubmit(
                seqnum=b.seqnum,
                status=c.status,
                actual_length=c.actual_length,
                start_frame=c.start_frame,
                number_of_packets=c.number_of_packets,
                error_count=c.error_count,
                devid=b.devid,
                direction=b.direction,
                ep=b.ep,
            )
        )
    if command is UrbCommand.RET_UNLINK:
        return UrbHeader(
            RetUnlink(b.seqnum, c.status, devid=b.devid, direction=b.direction, ep=b.ep)
        )
    if b.direction not in (Direction.OUT, Direction.IN):
        raise UsbipRemoteError(f"direction must be 0 or 1, got {b.direction}")
    direction = Direction(b.direction)
    if command is UrbCommand.CMD_UNLINK:
        return UrbHeader(CmdUnlink(b.seqnum, b.devid, direction, b.ep, c.unlink_seqnum))
    return UrbHeader(
        CmdSubmit(
            seqnum=b.seqnum,
            devid=b.devid,
            direction=direction,
            ep=b.ep,
            transfer_buffer_length=c.transfer_buffer_length,
            setup=_setup_from(c.setup),
            transfer_flags=c.transfer_flags,
            start_frame=c.start_frame,
            number_of_packets=c.number_of_packets,
            interval=c.interval,
        )
    )


_unpack_cmd_submit = CMD_SUBMIT_LAYOUT.unpack_from
_pack_ret_submit = RET_SUBMIT_LAYOUT.pack


def unpack_cmd_submit(buffer: bytes | bytearray) -> tuple[Any, ...] | None:
    """The first 48 bytes of ``buffer`` as a CMD_SUBMIT header's values in wire order
    (``CMD_SUBMIT_LAYOUT.names``), or None when they are another command (then
    :func:`parse_urb_header` judges them). ``buffer`` holds at least 48 bytes."""
    fields = _unpack_cmd_submit(buffer)
    return fields if fields[0] == UrbCommand.CMD_SUBMIT else None


def encode_ret(ret: Ret) -> bytes:
    """The bytes of a RET_SUBMIT from the hot path (same bytes as :func:`encode` of
    ``ret.to_ret_submit()``).

    Raises:
        UsbipLocalError: a field out of range, or ``data`` not ``actual_length`` long.
    """
    seqnum, status, actual_length, data = ret
    if data and len(data) != actual_length:
        raise UsbipLocalError("RET_SUBMIT: len(data) != actual_length")
    try:
        header = _pack_ret_submit(
            UrbCommand.RET_SUBMIT, seqnum, 0, 0, 0, status, actual_length, 0, 0, 0
        )
    except struct.error as e:
        raise UsbipLocalError(f"cannot encode RET_SUBMIT: {e}") from e
    return header + data if data else header


def with_payload(message: UrbMessage, payload: bytes) -> UrbMessage:
    """``message`` (from :func:`parse_urb_header`) with its payload attached."""
    if isinstance(message, CmdSubmit | RetSubmit):
        return _replace_data(message, payload)
    if payload:
        raise UsbipRemoteError(f"{type(message).__name__} has no payload")
    return message


def _replace_data(message: CmdSubmit | RetSubmit, payload: bytes) -> CmdSubmit | RetSubmit:
    return replace(message, data=payload)


def parse_urb(data: bytes, *, in_reply: bool = False) -> UrbMessage:
    """A whole URB PDU (header plus payload), e.g. for golden tests and test clients.

    ``in_reply``: for RET_SUBMIT, whether the URB it answers was IN, i.e. whether
    ``actual_length`` payload bytes follow (the reply's own direction field is 0).

    Raises:
        UsbipRemoteError: malformed, or the payload length does not match the header.
    """
    header = parse_urb_header(data[:URB_HEADER_SIZE])
    m = header.message
    expected = header.payload_length
    if isinstance(m, RetSubmit) and in_reply:
        expected = m.actual_length
    payload = data[URB_HEADER_SIZE:]
    if len(payload) != expected:
        raise UsbipRemoteError(f"payload is {len(payload)} bytes, expected {expected}")
    return with_payload(m, payload)


# --- USB descriptors ------------------------------------------------------------------


def encode_descriptor(d: Descriptor) -> bytes:
    """The bytes of one standard descriptor (USB 2.0 §9.6)."""
    if isinstance(d, DeviceDescriptor):
        obj: dict[str, Any] = {
            "bcdUSB": d.bcd_usb,
            "bDeviceClass": d.device_class,
            "bDeviceSubClass": d.device_subclass,
            "bDeviceProtocol": d.device_protocol,
            "bMaxPacketSize0": d.max_packet_size0,
            "idVendor": d.vendor_id,
            "idProduct": d.product_id,
            "bcdDevice": d.bcd_device,
            "iManufacturer": d.i_manufacturer,
            "iProduct": d.i_product,
            "iSerialNumber": d.i_serial_number,
            "bNumConfigurations": d.num_configurations,
        }
        return _build(_DEVICE_DESCRIPTOR, obj, "device descriptor")
    if isinstance(d, DeviceQualifierDescriptor):
        obj = {
            "bcdUSB": d.bcd_usb,
            "bDeviceClass": d.device_class,
            "bDeviceSubClass": d.device_subclass,
            "bDeviceProtocol": d.device_protocol,
            "bMaxPacketSize0": d.max_packet_size0,
            "bNumConfigurations": d.num_configurations,
        }
        return _build(_DEVICE_QUALIFIER_DESCRIPTOR, obj, "device qualifier descriptor")
    if isinstance(d, ConfigurationDescriptor):
        obj = {
            "wTotalLength": d.total_length,
            "bNumInterfaces": d.num_interfaces,
            "bConfigurationValue": d.configuration_value,
            "iConfiguration": d.i_configuration,
            "bmAttributes": d.attributes,
            "bMaxPower": d.max_power,
        }
        return _build(_CONFIGURATION_DESCRIPTOR, obj, "configuration descriptor")
    if isinstance(d, InterfaceDescriptor):
        obj = {
            "bInterfaceNumber": d.interface_number,
            "bAlternateSetting": d.alternate_setting,
            "bNumEndpoints": d.num_endpoints,
            "bInterfaceClass": d.interface_class,
            "bInterfaceSubClass": d.interface_subclass,
            "bInterfaceProtocol": d.interface_protocol,
            "iInterface": d.i_interface,
        }
        return _build(_INTERFACE_DESCRIPTOR, obj, "interface descriptor")
    obj = {
        "bEndpointAddress": d.endpoint_address,
        "bmAttributes": d.attributes,
        "wMaxPacketSize": d.max_packet_size,
        "bInterval": d.interval,
    }
    return _build(_ENDPOINT_DESCRIPTOR, obj, "endpoint descriptor")


def parse_descriptor(data: bytes) -> Descriptor:
    """One standard descriptor, chosen by its bDescriptorType (the second byte).

    Raises:
        UsbipRemoteError: malformed or of a type this module does not declare.
    """
    if len(data) < 2:
        raise UsbipRemoteError("descriptor shorter than 2 bytes")
    kind = data[1]
    if kind == DescriptorType.DEVICE:
        c = _parse(_DEVICE_DESCRIPTOR, data, "device descriptor")
        return DeviceDescriptor(
            c.bcdUSB,
            c.bDeviceClass,
            c.bDeviceSubClass,
            c.bDeviceProtocol,
            c.bMaxPacketSize0,
            c.idVendor,
            c.idProduct,
            c.bcdDevice,
            c.iManufacturer,
            c.iProduct,
            c.iSerialNumber,
            c.bNumConfigurations,
        )
    if kind == DescriptorType.DEVICE_QUALIFIER:
        c = _parse(_DEVICE_QUALIFIER_DESCRIPTOR, data, "device qualifier descriptor")
        return DeviceQualifierDescriptor(
            c.bcdUSB,
            c.bDeviceClass,
            c.bDeviceSubClass,
            c.bDeviceProtocol,
            c.bMaxPacketSize0,
            c.bNumConfigurations,
        )
    if kind == DescriptorType.CONFIGURATION:
        c = _parse(_CONFIGURATION_DESCRIPTOR, data, "configuration descriptor")
        return ConfigurationDescriptor(
            c.wTotalLength,
            c.bNumInterfaces,
            c.bConfigurationValue,
            c.iConfiguration,
            c.bmAttributes,
            c.bMaxPower,
        )
    if kind == DescriptorType.INTERFACE:
        c = _parse(_INTERFACE_DESCRIPTOR, data, "interface descriptor")
        return InterfaceDescriptor(
            c.bInterfaceNumber,
            c.bAlternateSetting,
            c.bNumEndpoints,
            c.bInterfaceClass,
            c.bInterfaceSubClass,
            c.bInterfaceProtocol,
            c.iInterface,
        )
    if kind == DescriptorType.ENDPOINT:
        c = _parse(_ENDPOINT_DESCRIPTOR, data, "endpoint descriptor")
        return EndpointDescriptor(c.bEndpointAddress, c.bmAttributes, c.wMaxPacketSize, c.bInterval)
    raise UsbipRemoteError(f"unsupported descriptor type {kind}")


def encode_string_descriptor(text: str) -> bytes:
    """A string descriptor: UTF-16LE text (USB 2.0 §9.6.7), at most 126 code units."""
    return _build(_STRING_DESCRIPTOR, {"bString": text.encode("utf-16-le")}, "string descriptor")


def encode_langid_descriptor(langids: tuple[int, ...] = (LANGID_EN_US,)) -> bytes:
    """String descriptor zero: the supported LANGIDs (USB 2.0 §9.6.7, Table 9-15)."""
    body = b"".join(langid.to_bytes(2, "little") for langid in langids)
    return _build(_STRING_DESCRIPTOR, {"bString": body}, "LANGID descriptor")


def parse_string_descriptor(data: bytes) -> str:
    c = _parse(_STRING_DESCRIPTOR, data, "string descriptor")
    try:
        return bytes(c.bString).decode("utf-16-le")
    except UnicodeDecodeError as e:
        raise UsbipRemoteError(f"string descriptor is not UTF-16LE: {e}") from e


def parse_langid_descriptor(data: bytes) -> tuple[int, ...]:
    c = _parse(_STRING_DESCRIPTOR, data, "LANGID descriptor")
    body = bytes(c.bString)
    if len(body) % 2:
        raise UsbipRemoteError("LANGID descriptor has an odd length")
    return tuple(int.from_bytes(body[i : i + 2], "little") for i in range(0, len(body), 2))
