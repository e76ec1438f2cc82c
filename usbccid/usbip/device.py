"""A virtual USB device: descriptors, the standard requests, and parked IN URBs.

:class:`VirtualDevice` is what an OP_REQ_IMPORT imports. It turns CMD_SUBMIT and
CMD_UNLINK into RET_SUBMIT and RET_UNLINK. It answers the standard requests of USB 2.0
§9.4 itself, from descriptors built out of a :class:`DeviceIdentity` and the function's
:class:`InterfaceSpec`, and hands the rest to the :class:`UsbFunction`: class and vendor
requests to its interface, OUT data, and the polling of IN data.

**Parked IN URBs.** A real device NAKs an IN token until it has data (USB 2.0 §8.5.2),
so the host's URB simply stays pending. Here every bulk-IN and interrupt-IN URB is put in
a FIFO per endpoint and completed when :meth:`UsbFunction.poll_in` returns bytes, however
long that takes (pcscd keeps an interrupt-IN pending for up to 10 minutes). Completing an
IN URB at once with 0 bytes instead would make the host spin on the interrupt endpoint and
libccid fail its bulk reads (research notes §1.7). A completion never carries more than
the URB's ``transfer_buffer_length`` bytes: vhci drops the whole device otherwise
("recv xbuf", vhci_rx.c).

**Unlink.** usbip_protocol.rst, USBIP_RET_UNLINK: if the URB was still pending it is
cancelled and RET_UNLINK carries -ECONNRESET, and that URB never gets a RET_SUBMIT (vhci
would not find its seqnum and would drop the device); if it had already completed, its
RET_SUBMIT went out first (the device is synchronous and TCP is ordered) and RET_UNLINK
carries 0. An unknown seqnum is answered with 0 as well.

**Leniency.** vhci handles SET_ADDRESS and bus resets itself and never forwards them
(vhci_hcd.c), so a new import is the reset signal (:meth:`reset`). Endpoint traffic is
accepted in the Address state too (before SET_CONFIGURATION), which test clients rely on.
"""

from __future__ import annotations

import enum
import errno
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from usbccid.usbip import wire
from usbccid.usbip.errors import Stall, UrbError, UsbipLocalError, UsbipRemoteError
from usbccid.usbip.function import (
    DeviceIdentity,
    EndpointSpec,
    SetupPacket,
    TransferType,
    UsbFunction,
)

MAX_PARKED_URBS: Final = 1024
"""Most IN URBs parked at once on one device; a peer submitting more is dropped."""

CONFIGURATION_VALUE: Final = 1  # the one configuration (bNumConfigurations = 1)
INTERFACE_NUMBER: Final = 0  # the one interface
MAX_PACKET_SIZE0: Final = 64  # USB 2.0 §5.5.3: 8, 16, 32 or 64 at full speed; 64 at high
STRING_MAX_UNITS: Final = 126  # (255 - 2) // 2 UTF-16 code units fit in bLength


class Request(enum.IntEnum):
    """bRequest of the standard requests (USB 2.0 Table 9-4)."""

    GET_STATUS = 0
    CLEAR_FEATURE = 1
    SET_FEATURE = 3
    SET_ADDRESS = 5
    GET_DESCRIPTOR = 6
    SET_DESCRIPTOR = 7
    GET_CONFIGURATION = 8
    SET_CONFIGURATION = 9
    GET_INTERFACE = 10
    SET_INTERFACE = 11
    SYNCH_FRAME = 12


class Recipient(enum.IntEnum):
    """bmRequestType bits 4..0 (USB 2.0 Table 9-2)."""

    DEVICE = 0
    INTERFACE = 1
    ENDPOINT = 2


class Feature(enum.IntEnum):
    """Standard feature selectors (USB 2.0 Table 9-6)."""

    ENDPOINT_HALT = 0
    DEVICE_REMOTE_WAKEUP = 1
    TEST_MODE = 2


#: a parked IN URB: (seqnum, transfer_buffer_length: the most bytes its completion may carry)
_ParkedUrb = tuple[int, int]


@dataclass(slots=True)
class _EndpointState:
    spec: EndpointSpec
    halted: bool = False
    parked: deque[_ParkedUrb] | None = None  # only for IN endpoints


def _stall(seqnum: int) -> wire.Ret:
    return wire.Ret(seqnum, -errno.EPIPE, 0)


class VirtualDevice:
    """One virtual USB device with one configuration and one interface.

    Args:
        identity: VID/PID, bcdDevice and the manufacturer, product and serial strings.
        function: the class code behind interface 0.
        speed: what OP_REP_IMPORT reports; vhci picks the root hub by it.
        bcd_usb: bcdUSB of the device descriptor. 0x0200: the Linux hub driver then asks
            a full-speed device for its DEVICE_QUALIFIER (hub.c check_highspeed), which
            we STALL as USB 2.0 §9.6.2 requires of a full-speed-only device; below 0x0201
            no BOS descriptor is requested.
        max_power_ma: bMaxPower × 2 mA (USB 2.0 §9.6.3).
        remote_wakeup: advertise remote wakeup (bmAttributes bit 5) and accept
            SET_FEATURE(DEVICE_REMOTE_WAKEUP).

    Raises:
        ValueError: the function's interface cannot be described (an isochronous or
            control endpoint, a duplicate or out-of-range address, a string too long).
    """

    def __init__(
        self,
        identity: DeviceIdentity,
        function: UsbFunction,
        speed: wire.Speed = wire.Speed.FULL,
        *,
        bcd_usb: int = 0x0200,
        max_power_ma: int = 100,
        remote_wakeup: bool = False,
    ) -> None:
        self.identity = identity
        self.function = function
        self.speed = wire.Speed(speed)
        self.bcd_usb = bcd_usb
        self.remote_wakeup_supported = remote_wakeup
        interface = function.interface
        self._endpoints: dict[int, _EndpointState] = {}
        for ep in interface.endpoints:
            number = ep.address & 0x0F
            if ep.transfer_type in (TransferType.ISOCHRONOUS, TransferType.CONTROL):
                # ISO would need the iso_packet_descriptor framing; no function needs it.
                raise ValueError(
                    f"endpoint {ep.address:#04x}: {ep.transfer_type.name} not supported"
                )
            if number == 0 or ep.address & 0x70 or ep.address in self._endpoints:
                raise ValueError(f"bad or duplicate endpoint address {ep.address:#04x}")
            is_in = bool(ep.address & 0x80)
            self._endpoints[ep.address] = _EndpointState(ep, parked=deque() if is_in else None)
        # the IN endpoints' FIFOs in address order, as _complete_parked walks them
        self._parked = [
            (address, state.parked)
            for address, state in sorted(self._endpoints.items())
            if state.parked is not None
        ]
        self._parked_queues = [parked for _, parked in self._parked]

        # String descriptors (USB 2.0 §9.6.7): index 0 is the LANGID list; empty strings
        # get index 0, which means "no string".
        self._strings: dict[int, str] = {}

        def index_of(text: str | None) -> int:
            if not text:
                return 0
            if len(text.encode("utf-16-le")) // 2 > STRING_MAX_UNITS:
                raise ValueError(f"string too long for a descriptor: {text!r}")
            index = len(self._strings) + 1
            self._strings[index] = text
            return index

        self.device_descriptor = wire.encode_descriptor(
            wire.DeviceDescriptor(
                bcd_usb=bcd_usb,
                device_class=0,  # class is given per interface
                device_subclass=0,
                device_protocol=0,
                max_packet_size0=MAX_PACKET_SIZE0,
                vendor_id=identity.vendor_id,
                product_id=identity.product_id,
                bcd_device=identity.bcd_device,
                i_manufacturer=index_of(identity.manufacturer),
                i_product=index_of(identity.product),
                i_serial_number=index_of(identity.serial_number),
                num_configurations=1,
            )
        )
        body = wire.encode_descriptor(
            wire.InterfaceDescriptor(
                interface_number=INTERFACE_NUMBER,
                alternate_setting=0,
                num_endpoints=len(interface.endpoints),
                interface_class=interface.interface_class,
                interface_subclass=interface.interface_subclass,
                interface_protocol=interface.interface_protocol,
                i_interface=index_of(interface.name),
            )
        )
        # Class-specific descriptors come right after their interface descriptor
        # (USB 2.0 §9.6.3; CCID §5.1: the 54-byte CCID descriptor, which libccid expects
        # as the interface's "extra" bytes).
        body += interface.extra
        for ep in interface.endpoints:
            body += wire.encode_descriptor(
                wire.EndpointDescriptor(
                    endpoint_address=ep.address,
                    attributes=ep.transfer_type.value,
                    max_packet_size=ep.max_packet_size,
                    interval=ep.interval,
                )
            )
        attributes = 0x80 | (0x20 if remote_wakeup else 0)  # bit 7 is reserved, set to 1
        header = wire.encode_descriptor(
            wire.ConfigurationDescriptor(
                total_length=9 + len(body),
                num_interfaces=1,
                configuration_value=CONFIGURATION_VALUE,
                i_configuration=0,
                attributes=attributes,
                max_power=max_power_ma // 2,
            )
        )
        self.configuration_descriptor = header + body

        self._standard: dict[tuple[Recipient, Request], Callable[[SetupPacket, bytes], bytes]] = {
            (Recipient.DEVICE, Request.GET_STATUS): self._get_status_device,
            (Recipient.INTERFACE, Request.GET_STATUS): self._get_status_interface,
            (Recipient.ENDPOINT, Request.GET_STATUS): self._get_status_endpoint,
            (Recipient.DEVICE, Request.CLEAR_FEATURE): self._clear_feature_device,
            (Recipient.ENDPOINT, Request.CLEAR_FEATURE): self._clear_feature_endpoint,
            (Recipient.DEVICE, Request.SET_FEATURE): self._set_feature_device,
            (Recipient.ENDPOINT, Request.SET_FEATURE): self._set_feature_endpoint,
            (Recipient.DEVICE, Request.SET_ADDRESS): self._set_address,
            (Recipient.DEVICE, Request.GET_DESCRIPTOR): self._get_descriptor,
            (Recipient.DEVICE, Request.GET_CONFIGURATION): self._get_configuration,
            (Recipient.DEVICE, Request.SET_CONFIGURATION): self._set_configuration,
            (Recipient.INTERFACE, Request.GET_INTERFACE): self._get_interface,
            (Recipient.INTERFACE, Request.SET_INTERFACE): self._set_interface,
            # Not here, so STALLed: SET_DESCRIPTOR (optional, §9.4.8), SYNCH_FRAME (only
            # for isochronous endpoints, §9.4.11), interface features (none in USB 2.0).
        }
        self.configuration = 0
        self.address = 0
        self.remote_wakeup = False
        self._failed: list[wire.Ret] = []  # parked URBs failed by SET_FEATURE(HALT)

    # -- identity for the op phase ----------------------------------------------------

    @property
    def strings(self) -> dict[int, str]:
        """String descriptor index → text (index 0, the LANGID list, not included)."""
        return dict(self._strings)

    def usbip_info(self, busid: str, busnum: int, devnum: int) -> wire.UsbDeviceInfo:
        """The usbip_usb_device for OP_REP_DEVLIST and OP_REP_IMPORT."""
        return wire.UsbDeviceInfo(
            path=f"/sys/devices/platform/usbccid/usb{busnum}/{busid}",
            busid=busid,
            busnum=busnum,
            devnum=devnum,
            speed=self.speed,
            vendor_id=self.identity.vendor_id,
            product_id=self.identity.product_id,
            bcd_device=self.identity.bcd_device,
            device_class=0,
            device_subclass=0,
            device_protocol=0,
            configuration_value=CONFIGURATION_VALUE,
            num_configurations=1,
            num_interfaces=1,
        )

    def interfaces_info(self) -> tuple[wire.UsbInterfaceInfo, ...]:
        i = self.function.interface
        return (
            wire.UsbInterfaceInfo(i.interface_class, i.interface_subclass, i.interface_protocol),
        )

    # -- lifecycle --------------------------------------------------------------------

    def reset(self) -> None:
        """Back to the just-plugged-in state (a new import): no parked URBs, no halts,
        unconfigured, and the function reset."""
        for state in self._endpoints.values():
            state.halted = False
            if state.parked is not None:
                state.parked.clear()
        self.configuration = 0
        self.address = 0
        self.remote_wakeup = False
        self._failed.clear()
        self.function.reset()

    @property
    def parked_count(self) -> int:
        return sum(map(len, self._parked_queues))

    def parked_seqnums(self, endpoint: int) -> list[int]:
        """Seqnums of the URBs parked on IN ``endpoint`` (its address), oldest first."""
        state = self._endpoints.get(endpoint)
        if state is None or state.parked is None:
            return []
        return [seqnum for seqnum, _ in state.parked]

    # -- URB traffic ------------------------------------------------------------------

    def submit(self, cmd: wire.CmdSubmit) -> list[wire.RetSubmit]:
        """Handle one CMD_SUBMIT; returns the RET_SUBMITs now due, in order.

        The list may be empty (an IN URB parked) and may complete earlier parked URBs
        (an OUT transfer or a control request gave the function something to say).
        :meth:`submit_fast` is the same on the hot path's tuples; subclasses override that.

        Raises:
            UsbipRemoteError: more than :data:`MAX_PARKED_URBS` IN URBs would be parked.
            UsbipLocalError: the function broke its contract (returned too many bytes).
        """
        return [r.to_ret_submit() for r in self.submit_fast(wire.Submit.from_cmd(cmd))]

    def submit_fast(self, cmd: wire.Submit) -> list[wire.Ret]:
        """:meth:`submit` for a :class:`wire.Submit`, answering :class:`wire.Ret` tuples."""
        replies: list[wire.Ret] = []
        ep = cmd.ep
        if ep == 0:
            replies.append(self._control(cmd))
        else:
            address = ep | 0x80 if cmd.direction == wire.Direction.IN else ep
            state = self._endpoints.get(address)
            if state is None or state.halted:
                # No such endpoint: the host would get a STALL handshake (§8.4.5).
                replies.append(_stall(cmd.seqnum))
            elif state.parked is not None:
                if self.parked_count >= MAX_PARKED_URBS:
                    raise UsbipRemoteError(f"more than {MAX_PARKED_URBS} IN URBs parked")
                state.parked.append((cmd.seqnum, cmd.transfer_buffer_length))
            else:
                replies.append(self._out(cmd, address))
        self._complete_parked(replies)
        return replies

    def _out(self, cmd: wire.Submit, address: int) -> wire.Ret:
        try:
            self.function.bulk_out(address, cmd.data)
        except UrbError as e:
            return wire.Ret(cmd.seqnum, e.status, 0)
        return wire.Ret(cmd.seqnum, 0, len(cmd.data))

    def poll(self) -> list[wire.RetSubmit]:
        """Complete the parked IN URBs for which the function now has data.

        Call it after anything outside the URB stream changed the function (a card
        inserted, a job finished, a timer fired). FIFO per endpoint. :meth:`poll_fast` is
        the same on the hot path's tuples; subclasses override that.

        Raises:
            UsbipLocalError: ``poll_in`` returned more than the URB's length.
        """
        return [r.to_ret_submit() for r in self.poll_fast()]

    def poll_fast(self) -> list[wire.Ret]:
        """:meth:`poll`, answering :class:`wire.Ret` tuples."""
        replies: list[wire.Ret] = []
        self._complete_parked(replies)
        return replies

    def _complete_parked(self, replies: list[wire.Ret]) -> None:
        if self._failed:
            replies.extend(self._failed)
            self._failed = []
        poll_in = self.function.poll_in
        for address, parked in self._parked:
            while parked:
                seqnum, length = parked[0]
                data = poll_in(address, length)
                if data is None:
                    break
                if len(data) > length:
                    raise UsbipLocalError(
                        f"poll_in({address:#04x}, {length}) returned {len(data)} bytes"
                    )
                parked.popleft()
                replies.append(wire.Ret(seqnum, 0, len(data), data))

    def unlink(self, cmd: wire.CmdUnlink) -> wire.RetUnlink:
        """Handle one CMD_UNLINK (usbip_protocol.rst, USBIP_RET_UNLINK)."""
        for state in self._endpoints.values():
            if state.parked is None:
                continue
            for urb in state.parked:
                if urb[0] == cmd.unlink_seqnum:
                    state.parked.remove(urb)
                    return wire.RetUnlink(seqnum=cmd.seqnum, status=-errno.ECONNRESET)
        # Completed already (its RET_SUBMIT was sent before) or never seen.
        return wire.RetUnlink(seqnum=cmd.seqnum, status=0)

    # -- control transfers (USB 2.0 §9.4) ---------------------------------------------

    def _control(self, cmd: wire.Submit) -> wire.Ret:
        setup = wire.parse_setup(cmd.setup)
        if setup.direction_in != (cmd.direction == wire.Direction.IN):
            # The URB's direction decides whether the reply carries a payload (vhci_rx.c
            # reads one only for IN pipes); a SETUP that disagrees gets no answer but a
            # STALL, so that the stream stays in sync.
            return _stall(cmd.seqnum)
        try:
            answer = self._request(setup, cmd.data)
        except UrbError as e:
            return wire.Ret(cmd.seqnum, e.status, 0)
        if setup.direction_in:
            # The device sends at most wLength bytes (§9.3.5), the URB holds at most
            # transfer_buffer_length.
            data = answer[: min(setup.wLength, cmd.transfer_buffer_length)]
            return wire.Ret(cmd.seqnum, 0, len(data), data)
        return wire.Ret(cmd.seqnum, 0, len(cmd.data))

    def _request(self, setup: SetupPacket, data: bytes) -> bytes:
        if setup.request_type == 0:  # standard
            try:
                key = (Recipient(setup.recipient), Request(setup.bRequest))
            except ValueError:
                raise Stall(f"unsupported standard request {setup}") from None
            handler = self._standard.get(key)
            if handler is None:
                raise Stall(f"unsupported standard request {setup}")
            # GET_* requests are device-to-host, the others host-to-device (Table 9-3).
            wants_in = key[1] in (
                Request.GET_STATUS,
                Request.GET_DESCRIPTOR,
                Request.GET_CONFIGURATION,
                Request.GET_INTERFACE,
            )
            if setup.direction_in != wants_in:
                raise Stall(f"wrong direction for {key[1].name}")
            return handler(setup, data)
        if (
            setup.request_type in (1, 2)
            and setup.recipient == Recipient.INTERFACE
            and setup.wIndex & 0xFF == INTERFACE_NUMBER
        ):
            return self.function.control(setup, data)
        raise Stall(f"unsupported request {setup}")

    def _endpoint_for(self, setup: SetupPacket) -> _EndpointState | None:
        """The endpoint addressed by wIndex; None for endpoint 0 (§9.3.4)."""
        address = setup.wIndex & 0xFF
        if address & 0x7F == 0:
            return None
        state = self._endpoints.get(address)
        if state is None:
            raise Stall(f"no endpoint {address:#04x}")
        return state

    def _check_interface(self, setup: SetupPacket) -> None:
        if setup.wIndex != INTERFACE_NUMBER:
            raise Stall(f"no interface {setup.wIndex}")

    def _get_status_device(self, setup: SetupPacket, data: bytes) -> bytes:
        # §9.4.5: bit 0 self-powered (we are bus-powered), bit 1 remote wakeup enabled.
        return bytes([0x02 if self.remote_wakeup else 0x00, 0x00])

    def _get_status_interface(self, setup: SetupPacket, data: bytes) -> bytes:
        self._check_interface(setup)
        return b"\x00\x00"  # §9.4.5: reserved, zero

    def _get_status_endpoint(self, setup: SetupPacket, data: bytes) -> bytes:
        state = self._endpoint_for(setup)
        halted = state is not None and state.halted
        return bytes([0x01 if halted else 0x00, 0x00])  # §9.4.5: bit 0 Halt

    def _clear_feature_device(self, setup: SetupPacket, data: bytes) -> bytes:
        if setup.wValue == Feature.DEVICE_REMOTE_WAKEUP and self.remote_wakeup_supported:
            self.remote_wakeup = False
            return b""
        raise Stall(f"CLEAR_FEATURE({setup.wValue}) on the device")

    def _set_feature_device(self, setup: SetupPacket, data: bytes) -> bytes:
        # TEST_MODE is for high-speed devices only (§9.4.9); not supported.
        if setup.wValue == Feature.DEVICE_REMOTE_WAKEUP and self.remote_wakeup_supported:
            self.remote_wakeup = True
            return b""
        raise Stall(f"SET_FEATURE({setup.wValue}) on the device")

    def _clear_feature_endpoint(self, setup: SetupPacket, data: bytes) -> bytes:
        if setup.wValue != Feature.ENDPOINT_HALT:
            raise Stall(f"CLEAR_FEATURE({setup.wValue}) on an endpoint")
        state = self._endpoint_for(setup)
        if state is not None:
            state.halted = False
        return b""

    def _set_feature_endpoint(self, setup: SetupPacket, data: bytes) -> bytes:
        if setup.wValue != Feature.ENDPOINT_HALT:
            raise Stall(f"SET_FEATURE({setup.wValue}) on an endpoint")
        state = self._endpoint_for(setup)
        if state is not None:
            # A halted endpoint STALLs every transaction (§9.4.5): the URBs parked on it
            # fail with -EPIPE, reported by the poll() that follows this request.
            state.halted = True
            if state.parked:
                self._failed.extend(_stall(seqnum) for seqnum, _ in state.parked)
                state.parked.clear()
        return b""

    def _set_address(self, setup: SetupPacket, data: bytes) -> bytes:
        # vhci answers SET_ADDRESS itself (vhci_hcd.c vhci_urb_enqueue); accept it anyway.
        if setup.wValue > 127:
            raise Stall("address out of range")
        self.address = setup.wValue
        return b""

    def _get_descriptor(self, setup: SetupPacket, data: bytes) -> bytes:
        kind, index = setup.wValue >> 8, setup.wValue & 0xFF
        if kind == wire.DescriptorType.DEVICE:
            return self.device_descriptor
        if kind == wire.DescriptorType.CONFIGURATION and index == 0:
            return self.configuration_descriptor
        if kind == wire.DescriptorType.STRING:
            if index == 0:
                return wire.encode_langid_descriptor((wire.LANGID_EN_US,))
            text = self._strings.get(index)
            if text is not None:  # any LANGID in wIndex gets the one language we have
                return wire.encode_string_descriptor(text)
        if kind == wire.DescriptorType.DEVICE_QUALIFIER and self.speed == wire.Speed.HIGH:
            # §9.6.2: only a high-speed capable device has one.
            return wire.encode_descriptor(
                wire.DeviceQualifierDescriptor(
                    bcd_usb=self.bcd_usb,
                    device_class=0,
                    device_subclass=0,
                    device_protocol=0,
                    max_packet_size0=MAX_PACKET_SIZE0,
                    num_configurations=1,
                )
            )
        # §9.6.2: "If a full-speed only device ... receives a GetDescriptor() request for
        # a device_qualifier, it must respond with a request error" (STALL). Likewise
        # OTHER_SPEED_CONFIGURATION, BOS (bcdUSB < 0x0201), unknown types and indexes.
        raise Stall(f"no descriptor type {kind} index {index}")

    def _get_configuration(self, setup: SetupPacket, data: bytes) -> bytes:
        return bytes([self.configuration])  # §9.4.2

    def _set_configuration(self, setup: SetupPacket, data: bytes) -> bytes:
        value = setup.wValue & 0xFF
        if value not in (0, CONFIGURATION_VALUE):
            raise Stall(f"no configuration {value}")
        # §9.4.7: configuring resets data toggles and halts; the function starts afresh.
        self.configuration = value
        for state in self._endpoints.values():
            state.halted = False
        self.function.reset()
        return b""

    def _get_interface(self, setup: SetupPacket, data: bytes) -> bytes:
        self._check_interface(setup)
        return b"\x00"  # §9.4.4: the one alternate setting

    def _set_interface(self, setup: SetupPacket, data: bytes) -> bytes:
        self._check_interface(setup)
        if setup.wValue != 0:
            raise Stall(f"no alternate setting {setup.wValue}")
        for state in self._endpoints.values():  # §9.4.10: halts cleared
            state.halted = False
        return b""
