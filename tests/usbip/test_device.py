"""VirtualDevice: descriptors, every standard request, parked IN URBs, unlink."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

import pytest

from usbccid.jobs import Job
from usbccid.usbip import wire
from usbccid.usbip.device import MAX_PARKED_URBS, VirtualDevice
from usbccid.usbip.errors import UrbError, UsbipLocalError, UsbipRemoteError
from usbccid.usbip.exporter import Exporter
from usbccid.usbip.function import (
    DeviceIdentity,
    EndpointSpec,
    InterfaceSpec,
    SetupPacket,
    TransferType,
)
from usbccid.usbip.loopback import (
    BULK_IN,
    BULK_OUT,
    INTERRUPT_IN,
    LOOPBACK_IDENTITY,
    REQ_READ_CONTROL,
    REQ_WRITE_CONTROL,
    LoopbackFunction,
)

from .helpers import Pair, setup

EPIPE = -errno.EPIPE
ECONNRESET = -errno.ECONNRESET
IN, OUT = wire.Direction.IN, wire.Direction.OUT

# bmRequestType values (USB 2.0 Table 9-2)
DEV_IN, DEV_OUT = 0x80, 0x00
INTF_IN, INTF_OUT = 0x81, 0x01
EP_IN, EP_OUT = 0x82, 0x02
VENDOR_INTF_IN, VENDOR_INTF_OUT = 0xC1, 0x41


def get_descriptor(kind: int, index: int = 0, length: int = 255, langid: int = 0) -> SetupPacket:
    return setup(DEV_IN, 6, (kind << 8) | index, langid, length)


def pair(function: LoopbackFunction | None = None, **kwargs: object) -> Pair:
    f = function if function is not None else LoopbackFunction()
    device = VirtualDevice(LOOPBACK_IDENTITY, f, **kwargs)  # type: ignore[arg-type]
    p = Pair(Exporter([device]))
    assert p.import_().status == wire.OpStatus.OK
    return p


def ok(reply: wire.RetSubmit) -> bytes:
    assert reply.status == 0, reply
    return reply.data


# --- descriptors ------------------------------------------------------------------------


def test_device_descriptor() -> None:
    p = pair()
    data = ok(p.control(get_descriptor(1, length=64)))  # the kernel's first 64-byte read
    assert data == bytes.fromhex("12 01 0002 00 00 00 40 0912 0100 0001 01 02 03 01")
    assert wire.parse_descriptor(data) == wire.DeviceDescriptor(
        0x0200, 0, 0, 0, 64, 0x1209, 0x0001, 0x0100, 1, 2, 3, 1
    )


def test_descriptor_truncated_to_wlength_and_buffer() -> None:
    p = pair()
    assert ok(p.control(get_descriptor(1, length=8))) == bytes.fromhex("12 01 0002 00 00 00 40")
    # transfer_buffer_length below wLength: never more than the URB holds.
    seq, raw = p.client.submit(0, IN, 4, setup=get_descriptor(1, length=18))
    (reply,) = p.send(raw)
    assert isinstance(reply, wire.RetSubmit)
    assert reply.seqnum == seq
    assert reply.data == bytes.fromhex("12 01 0002")


def test_configuration_descriptor() -> None:
    p = pair()
    head = ok(p.control(get_descriptor(2, length=9)))
    config = wire.parse_descriptor(head)
    assert isinstance(config, wire.ConfigurationDescriptor)
    assert config == wire.ConfigurationDescriptor(9 + 9 + 3 * 7, 1, 1, 0, 0x80, 50)
    full = ok(p.control(get_descriptor(2, length=config.total_length)))
    assert len(full) == config.total_length
    assert full[9:18] == bytes.fromhex("09 04 00 00 03 ff 00 00 04")
    assert full[18:] == bytes.fromhex(
        "07 05 01 02 4000 00  07 05 82 02 4000 00  07 05 83 03 0800 0a"
    )


def test_extra_bytes_follow_the_interface_descriptor() -> None:
    extra = bytes([54, 0x21]) + bytes(52)  # shaped like the CCID class descriptor

    @dataclass
    class WithExtra(LoopbackFunction):
        @property
        def interface(self) -> InterfaceSpec:
            base = LoopbackFunction().interface
            return InterfaceSpec(0x0B, 0, 0, base.endpoints, extra=extra, name=None)

    device = VirtualDevice(LOOPBACK_IDENTITY, WithExtra())
    config = device.configuration_descriptor
    assert int.from_bytes(config[2:4], "little") == len(config) == 9 + 9 + 54 + 21
    assert config[9:18] == bytes.fromhex("09 04 00 00 03 0b 00 00 00")  # no iInterface
    assert config[18:72] == extra
    assert config[72:79] == bytes.fromhex("07 05 01 02 4000 00")
    info = device.interfaces_info()
    assert info == (wire.UsbInterfaceInfo(0x0B, 0, 0),)


def test_string_descriptors() -> None:
    p = pair()
    assert ok(p.control(get_descriptor(3, 0))) == bytes.fromhex("04 03 0904")
    texts = {1: "usbccid", 2: "usbccid loopback", 3: "0001", 4: "loopback"}
    for index, text in texts.items():
        data = ok(p.control(get_descriptor(3, index, langid=0x0409)))
        assert wire.parse_string_descriptor(data) == text
    # Truncated to wLength, as for the kernel's 2-byte "how long is it" probes.
    assert ok(p.control(get_descriptor(3, 2, length=2))) == bytes([2 + 2 * 16, 3])
    assert p.control(get_descriptor(3, 5)).status == EPIPE


def test_empty_strings_get_index_zero() -> None:
    identity = DeviceIdentity(0x1234, 0x5678, 0x0001, "", "product", "")
    device = VirtualDevice(identity, LoopbackFunction())
    desc = wire.parse_descriptor(device.device_descriptor)
    assert isinstance(desc, wire.DeviceDescriptor)
    assert (desc.i_manufacturer, desc.i_product, desc.i_serial_number) == (0, 1, 0)
    assert device.strings == {1: "product", 2: "loopback"}


@pytest.mark.parametrize(
    ("kind", "index"),
    [
        (6, 0),  # DEVICE_QUALIFIER: full-speed only device → request error (§9.6.2)
        (7, 0),  # OTHER_SPEED_CONFIGURATION
        (15, 0),  # BOS: only asked of bcdUSB >= 0x0201
        (2, 1),  # a second configuration
        (4, 0),  # INTERFACE descriptors are not directly gettable
        (5, 0),  # ENDPOINT
        (0x21, 0),  # class descriptor
    ],
)
def test_unsupported_descriptors_stall(kind: int, index: int) -> None:
    assert pair().control(get_descriptor(kind, index)).status == EPIPE


def test_device_qualifier_when_high_speed() -> None:
    p = pair(speed=wire.Speed.HIGH)
    data = ok(p.control(get_descriptor(6, length=10)))
    assert data == bytes.fromhex("0a 06 0002 00 00 00 40 01 00")


# --- the other standard requests --------------------------------------------------------


def test_set_and_get_configuration() -> None:
    f = LoopbackFunction()
    p = pair(f)
    resets = f.resets
    assert ok(p.control(setup(DEV_IN, 8, w_length=1))) == b"\x00"
    assert ok(p.control(setup(DEV_OUT, 9, 1))) == b""
    assert f.resets == resets + 1  # the function starts afresh (function.py reset())
    assert ok(p.control(setup(DEV_IN, 8, w_length=1))) == b"\x01"
    assert p.control(setup(DEV_OUT, 9, 2)).status == EPIPE
    assert ok(p.control(setup(DEV_OUT, 9, 0))) == b""
    assert ok(p.control(setup(DEV_IN, 8, w_length=1))) == b"\x00"


def test_get_status() -> None:
    p = pair()
    assert ok(p.control(setup(DEV_IN, 0, w_length=2))) == b"\x00\x00"  # bus powered
    assert ok(p.control(setup(INTF_IN, 0, w_index=0, w_length=2))) == b"\x00\x00"
    assert p.control(setup(INTF_IN, 0, w_index=1, w_length=2)).status == EPIPE
    for address in (0x00, 0x80, BULK_OUT, BULK_IN, INTERRUPT_IN):
        assert ok(p.control(setup(EP_IN, 0, w_index=address, w_length=2))) == b"\x00\x00"
    assert p.control(setup(EP_IN, 0, w_index=0x85, w_length=2)).status == EPIPE


def test_set_and_clear_endpoint_halt() -> None:
    p = pair()
    _parked, replies = p.submit(2, IN, 64)
    assert replies == []
    assert ok(p.control(setup(EP_OUT, 3, 0, BULK_IN))) == b""
    halted = p.device_status(BULK_IN)
    assert halted == b"\x01\x00"
    _, replies = p.submit(2, IN, 64)
    assert [r.status for r in replies if isinstance(r, wire.RetSubmit)] == [EPIPE]
    assert ok(p.control(setup(EP_OUT, 1, 0, BULK_IN))) == b""
    assert p.device_status(BULK_IN) == b"\x00\x00"
    _, replies = p.submit(2, IN, 64)
    assert replies == []  # parked again
    # Endpoint 0 cannot be halted (but the request succeeds); unknown endpoints stall.
    assert ok(p.control(setup(EP_OUT, 3, 0, 0x00))) == b""
    assert p.control(setup(EP_OUT, 3, 0, 0x04)).status == EPIPE
    assert p.control(setup(EP_OUT, 3, 5, BULK_IN)).status == EPIPE  # not ENDPOINT_HALT
    assert p.control(setup(EP_OUT, 1, 5, BULK_IN)).status == EPIPE


def test_halt_fails_parked_urbs() -> None:
    p = pair()
    a, _ = p.submit(2, IN, 64)
    b, _ = p.submit(2, IN, 64)
    seq, raw = p.client.control(setup(EP_OUT, 3, 0, BULK_IN))
    replies = p.send(raw)
    assert [(r.seqnum, r.status) for r in replies] == [(seq, 0), (a, EPIPE), (b, EPIPE)]
    _, replies = p.submit(1, OUT, 3, b"abc")
    assert replies == [wire.RetSubmit(replies[0].seqnum, 0, 3)]  # OUT still fine


def test_halted_out_endpoint() -> None:
    p = pair()
    assert ok(p.control(setup(EP_OUT, 3, 0, BULK_OUT))) == b""
    _, replies = p.submit(1, OUT, 3, b"abc")
    assert [r.status for r in replies] == [EPIPE]
    assert ok(p.control(setup(DEV_OUT, 9, 1))) == b""  # SET_CONFIGURATION clears halts
    _, replies = p.submit(1, OUT, 3, b"abc")
    assert [r.status for r in replies] == [0]


def test_get_and_set_interface() -> None:
    p = pair()
    assert ok(p.control(setup(INTF_IN, 10, 0, 0, 1))) == b"\x00"
    assert p.control(setup(INTF_IN, 10, 0, 1, 1)).status == EPIPE
    assert ok(p.control(setup(EP_OUT, 3, 0, BULK_OUT))) == b""
    assert ok(p.control(setup(INTF_OUT, 11, 0, 0))) == b""  # clears halts (§9.4.10)
    assert p.device_status(BULK_OUT) == b"\x00\x00"
    assert p.control(setup(INTF_OUT, 11, 1, 0)).status == EPIPE
    assert p.control(setup(INTF_OUT, 11, 0, 1)).status == EPIPE


def test_device_features() -> None:
    p = pair()
    assert p.control(setup(DEV_OUT, 3, 1)).status == EPIPE  # no remote wakeup advertised
    assert p.control(setup(DEV_OUT, 1, 1)).status == EPIPE
    assert p.control(setup(DEV_OUT, 3, 2)).status == EPIPE  # TEST_MODE
    p = pair(remote_wakeup=True)
    config = wire.parse_descriptor(ok(p.control(get_descriptor(2, length=9))))
    assert isinstance(config, wire.ConfigurationDescriptor)
    assert config.attributes == 0xA0
    assert ok(p.control(setup(DEV_OUT, 3, 1))) == b""
    assert ok(p.control(setup(DEV_IN, 0, w_length=2))) == b"\x02\x00"
    assert ok(p.control(setup(DEV_OUT, 1, 1))) == b""
    assert ok(p.control(setup(DEV_IN, 0, w_length=2))) == b"\x00\x00"


def test_set_address_accepted() -> None:
    p = pair()
    assert ok(p.control(setup(DEV_OUT, 5, 7))) == b""
    assert p.control(setup(DEV_OUT, 5, 128)).status == EPIPE


@pytest.mark.parametrize(
    "s",
    [
        setup(DEV_OUT, 7, 0x0100, 0, 0),  # SET_DESCRIPTOR
        setup(EP_IN, 12, 0, BULK_IN, 2),  # SYNCH_FRAME
        setup(DEV_IN, 2, 0, 0, 2),  # reserved bRequest
        setup(DEV_IN, 99, 0, 0, 2),  # unknown bRequest
        setup(DEV_OUT, 6, 0x0100, 0, 18),  # GET_DESCRIPTOR with the wrong direction
        setup(DEV_IN, 9, 1, 0, 0),  # SET_CONFIGURATION with the wrong direction
        setup(INTF_OUT, 3, 0, 0, 0),  # interface features do not exist in USB 2.0
        setup(0x83, 0, 0, 0, 2),  # recipient "other"
        setup(0xE1, 1, 0, 0, 2),  # request type 3 (reserved)
        setup(0xC0, 1, 0, 0, 2),  # vendor request to the device, not the interface
        setup(0xC2, 1, 0, BULK_IN, 2),  # vendor request to an endpoint
        setup(VENDOR_INTF_IN, REQ_READ_CONTROL, 0, 1, 2),  # vendor request to interface 1
    ],
)
def test_unsupported_requests_stall(s: SetupPacket) -> None:
    data = b"" if s.direction_in else bytes(s.wLength)
    assert pair().control(s, data).status == EPIPE


@pytest.mark.parametrize(
    ("direction", "s"),
    [(OUT, get_descriptor(1, length=18)), (IN, setup(DEV_OUT, 9, 1))],
)
def test_urb_direction_must_match_setup(direction: wire.Direction, s: SetupPacket) -> None:
    p = pair()
    cmd = wire.CmdSubmit(99, p.client.devid, direction, 0, 18 if direction == IN else 0, setup=s)
    if direction == IN:
        p.client.in_seqnums.add(99)
    replies = p.send(wire.encode(cmd))
    assert replies == [wire.RetSubmit(99, EPIPE, 0)]
    assert p.exporter.device("1-1").configuration == 0


def test_vendor_requests_reach_the_function() -> None:
    p = pair()
    out = p.control(setup(VENDOR_INTF_OUT, REQ_WRITE_CONTROL, 0, 0, 5), b"hello")
    assert (out.status, out.actual_length, out.data) == (0, 5, b"")
    assert ok(p.control(setup(VENDOR_INTF_IN, REQ_READ_CONTROL, 0, 0, 64))) == b"hello"
    assert ok(p.control(setup(VENDOR_INTF_IN, REQ_READ_CONTROL, 0, 0, 3))) == b"hel"
    assert p.control(setup(VENDOR_INTF_IN, 0x55, 0, 0, 3)).status == EPIPE  # function stalls


# --- data endpoints and parked IN URBs -------------------------------------------------


def test_out_then_in() -> None:
    p = pair()
    seq, replies = p.submit(1, OUT, 5, b"hello")
    assert replies == [wire.RetSubmit(seq, 0, 5)]  # OUT: length, no payload
    seq, replies = p.submit(2, IN, 64)
    assert replies == [wire.RetSubmit(seq, 0, 5, b"hello")]


def test_in_parks_until_data() -> None:
    p = pair()
    in_seq, replies = p.submit(2, IN, 64)
    assert replies == []
    assert p.poll() == []
    out_seq, replies = p.submit(1, OUT, 5, b"hello")
    # The OUT completes first, then the parked IN it made completable.
    assert replies == [wire.RetSubmit(out_seq, 0, 5), wire.RetSubmit(in_seq, 0, 5, b"hello")]


def test_parked_in_fifo_per_endpoint() -> None:
    p = pair()
    a, _ = p.submit(2, IN, 64)
    i, _ = p.submit(3, IN, 8)
    b, _ = p.submit(2, IN, 64)
    _, replies = p.submit(1, OUT, 3, b"one")
    assert [(r.seqnum, r.data) for r in replies[1:] if isinstance(r, wire.RetSubmit)] == [
        (a, b"one")
    ]
    _, replies = p.submit(1, OUT, 3, b"two")
    assert [(r.seqnum, r.data) for r in replies[1:] if isinstance(r, wire.RetSubmit)] == [
        (b, b"two")
    ]
    f = p.conn.device.function  # type: ignore[union-attr]
    assert isinstance(f, LoopbackFunction)
    f.notify(b"\x50\x03")
    assert p.poll() == [wire.RetSubmit(i, 0, 2, b"\x50\x03")]


def test_in_never_exceeds_transfer_buffer_length() -> None:
    p = pair()
    p.submit(1, OUT, 11, b"hello world")
    replies = [p.submit(2, IN, 4)[1] for _ in range(3)]
    assert [r[0].data for r in replies if isinstance(r[0], wire.RetSubmit)] == [
        b"hell",
        b"o wo",
        b"rld",
    ]


def test_interrupt_in_parks_indefinitely() -> None:
    p = pair()
    seq, _replies = p.submit(3, IN, 8)
    for _ in range(5):
        p.submit(1, OUT, 1, b"x")
        p.control(get_descriptor(1))
    assert p.conn.device is not None
    assert p.conn.device.parked_seqnums(INTERRUPT_IN) == [seq]


def test_submit_to_nonexistent_endpoint() -> None:
    p = pair()
    for ep, direction in [(5, IN), (5, OUT), (2, OUT), (1, IN), (15, IN)]:
        data = b"ab" if direction == OUT else b""
        seq, replies = p.submit(ep, direction, 2, data)
        assert replies == [wire.RetSubmit(seq, EPIPE, 0)], (ep, direction)


# --- unlink -------------------------------------------------------------------------------


def test_unlink_parked_urb() -> None:
    p = pair()
    victim, _ = p.submit(3, IN, 8)
    seq, replies = p.unlink(victim)
    assert replies == [wire.RetUnlink(seq, ECONNRESET)]
    assert p.conn.device is not None
    assert p.conn.device.parked_count == 0
    # Data that arrives later goes to the next URB; the unlinked one never completes.
    f = p.conn.device.function
    assert isinstance(f, LoopbackFunction)
    f.notify(b"\x50\x03")
    assert p.poll() == []
    nxt, replies = p.submit(3, IN, 8)
    assert replies == [wire.RetSubmit(nxt, 0, 2, b"\x50\x03")]
    assert all(r.seqnum != victim for r in p.poll())


def test_unlink_completed_urb() -> None:
    p = pair()
    done, _ = p.submit(1, OUT, 1, b"x")
    seq, replies = p.unlink(done)
    assert replies == [wire.RetUnlink(seq, 0)]


def test_unlink_unknown_seqnum() -> None:
    seq, replies = pair().unlink(12345)
    assert replies == [wire.RetUnlink(seq, 0)]


def test_unlink_race_completion_first() -> None:
    # The data shows up (OUT) before the CMD_UNLINK is read: RET_SUBMIT goes out before
    # RET_UNLINK(0) in the byte stream, so vhci gives the URB back once (vhci_rx.c).
    p = pair()
    victim, _ = p.submit(2, IN, 64)
    out_seq, out_raw = p.client.submit(1, OUT, 2, data=b"hi")
    unlink_seq, unlink_raw = p.client.unlink(victim)
    replies = p.send(out_raw + unlink_raw)
    assert replies == [
        wire.RetSubmit(out_seq, 0, 2),
        wire.RetSubmit(victim, 0, 2, b"hi"),
        wire.RetUnlink(unlink_seq, 0),
    ]


def test_unlink_race_unlink_first() -> None:
    # The CMD_UNLINK is read before the data exists: RET_UNLINK(-ECONNRESET), and the
    # data later completes the next URB, never the unlinked one.
    p = pair()
    victim, _ = p.submit(2, IN, 64)
    unlink_seq, unlink_raw = p.client.unlink(victim)
    out_seq, out_raw = p.client.submit(1, OUT, 2, data=b"hi")
    nxt_seq, nxt_raw = p.client.submit(2, IN, 64)
    replies = p.send(unlink_raw + out_raw + nxt_raw)
    assert replies == [
        wire.RetUnlink(unlink_seq, ECONNRESET),
        wire.RetSubmit(out_seq, 0, 2),
        wire.RetSubmit(nxt_seq, 0, 2, b"hi"),
    ]


# --- function errors and limits ---------------------------------------------------------


@dataclass
class Scripted:
    """A UsbFunction whose answers the test sets."""

    out_error: int | None = None
    in_data: dict[int, bytes] = field(default_factory=dict)
    resets: int = 0

    @property
    def interface(self) -> InterfaceSpec:
        return InterfaceSpec(
            0xFF,
            0,
            0,
            (
                EndpointSpec(0x01, TransferType.BULK, 64),
                EndpointSpec(0x81, TransferType.BULK, 64),
            ),
        )

    def reset(self) -> None:
        self.resets += 1

    def control(self, setup: SetupPacket, data: bytes) -> bytes:
        raise UrbError(-errno.EPROTO)

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        if self.out_error is not None:
            raise UrbError(self.out_error)

    def poll_in(self, endpoint: int, max_length: int) -> bytes | None:
        return self.in_data.pop(endpoint, None)

    def next_job(self, now: float) -> Job | None:
        return None

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass


def scripted_pair(f: Scripted) -> Pair:
    p = Pair(Exporter([VirtualDevice(LOOPBACK_IDENTITY, f)]))
    p.import_()
    return p


def test_urb_error_status_from_function() -> None:
    f = Scripted(out_error=-errno.EOVERFLOW)
    p = scripted_pair(f)
    seq, replies = p.submit(1, OUT, 1, b"x")
    assert replies == [wire.RetSubmit(seq, -errno.EOVERFLOW, 0)]
    assert p.control(setup(VENDOR_INTF_IN, 1, 0, 0, 4)).status == -errno.EPROTO


def test_zero_length_in_completion() -> None:
    f = Scripted(in_data={0x81: b""})
    p = scripted_pair(f)
    seq, replies = p.submit(1, IN, 64)
    assert replies == [wire.RetSubmit(seq, 0, 0, b"")]


def test_function_returning_too_much_is_local_error() -> None:
    f = Scripted()
    p = scripted_pair(f)
    p.submit(1, IN, 4)
    f.in_data[0x81] = b"12345"
    with pytest.raises(UsbipLocalError, match="returned 5 bytes"):
        p.poll()


def test_parked_urb_cap() -> None:
    device = VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())
    for seq in range(MAX_PARKED_URBS):
        assert device.submit(wire.CmdSubmit(seq, 1, IN, 3, 8)) == []
    with pytest.raises(UsbipRemoteError, match="parked"):
        device.submit(wire.CmdSubmit(MAX_PARKED_URBS, 1, IN, 3, 8))


def test_reset_drops_parked_and_resets_function() -> None:
    f = LoopbackFunction()
    device = VirtualDevice(LOOPBACK_IDENTITY, f)
    device.submit(wire.CmdSubmit(1, 1, IN, 3, 8))
    device.submit(wire.CmdSubmit(2, 1, OUT, 0, 0, setup=setup(DEV_OUT, 9, 1)))
    assert device.configuration == 1
    resets = f.resets
    device.reset()
    assert (device.parked_count, device.configuration, f.resets) == (0, 0, resets + 1)
    f.notify(b"x")
    assert device.poll() == []


@pytest.mark.parametrize(
    "endpoints",
    [
        (EndpointSpec(0x81, TransferType.ISOCHRONOUS, 64),),
        (EndpointSpec(0x81, TransferType.CONTROL, 64),),
        (EndpointSpec(0x00, TransferType.BULK, 64),),
        (EndpointSpec(0x91, TransferType.BULK, 64),),
        (EndpointSpec(0x81, TransferType.BULK, 64), EndpointSpec(0x81, TransferType.BULK, 64)),
    ],
)
def test_bad_interface_rejected(endpoints: tuple[EndpointSpec, ...]) -> None:
    @dataclass
    class Bad(Scripted):
        @property
        def interface(self) -> InterfaceSpec:
            return InterfaceSpec(0xFF, 0, 0, endpoints)

    with pytest.raises(ValueError, match="endpoint"):
        VirtualDevice(LOOPBACK_IDENTITY, Bad())


def test_string_too_long_rejected() -> None:
    identity = DeviceIdentity(1, 2, 3, "m" * 127, "p", "s")
    with pytest.raises(ValueError, match="too long"):
        VirtualDevice(identity, LoopbackFunction())


def test_linux_enumeration_sequence() -> None:
    """The requests hub.c/message.c send after `usbip attach`, in order (research §1.8)."""
    p = pair()
    assert len(ok(p.control(get_descriptor(1, length=64)))) == 18
    assert len(ok(p.control(get_descriptor(1, length=18)))) == 18
    # bcdUSB 0x0200 at full speed: hub.c check_highspeed() asks, and must get a STALL.
    assert p.control(get_descriptor(6, length=10)).status == EPIPE
    head = ok(p.control(get_descriptor(2, length=9)))
    total = int.from_bytes(head[2:4], "little")
    assert len(ok(p.control(get_descriptor(2, length=total)))) == total
    langids = wire.parse_langid_descriptor(ok(p.control(get_descriptor(3, 0, length=255))))
    assert langids == (0x0409,)
    for index in (2, 1, 3):
        data = ok(p.control(get_descriptor(3, index, length=255, langid=0x0409)))
        assert wire.parse_string_descriptor(data)
    assert ok(p.control(setup(DEV_OUT, 9, 1))) == b""
    # libccid at open: an 8-byte interrupt read with a 100 ms timeout, then unlinked.
    victim, replies = p.submit(3, IN, 8)
    assert replies == []
    seq, replies = p.unlink(victim)
    assert replies == [wire.RetUnlink(seq, ECONNRESET)]
