"""Fuzz the USB/IP layer: one whole :class:`ExportConnection` of an :class:`Exporter` with a
loopback device (1-1) and a CCID reader holding an EchoCard (1-2), driven like the asyncio
shell drives it (jobs run inline, then a re-poll; timers fired when due).

The first input byte picks a prelude (nothing, OP_REQ_IMPORT of 1-1 or 1-2, or
OP_REQ_DEVLIST) and a mode: *raw* (the rest is the TCP stream, cut into chunks of a size
the second byte picks) or *structured* (the rest is a program of CMD_SUBMITs with fuzzed
fields, CMD_UNLINKs of earlier seqnums, CCID messages to the reader's bulk-OUT, raw bytes,
time passing and EOF; see :func:`one_input`).

The contract checked (usbip_protocol.rst; docs/usbip-api.md):

* ``receive_data`` raises nothing but :class:`UsbipRemoteError`, after which the
  connection is closing and the device released;
* every RET_SUBMIT answers an outstanding CMD_SUBMIT exactly once; an IN completion
  carries ``actual_length == len(data) <= transfer_buffer_length`` (and ``<= wLength`` on
  EP0), an OUT completion no data; control and OUT URBs are answered at once;
* every RET_UNLINK answers a CMD_UNLINK: ``-ECONNRESET`` only for a URB still pending (which
  then never gets a RET_SUBMIT), 0 otherwise;
* the unparsed buffer stays within ``max_buffer``;
* after the connection is gone, no device is imported, nothing is parked, and both devices
  can be imported again.
"""

from __future__ import annotations

import errno

from _harness import Reader, main

from usbccid.ccid import CcidReader
from usbccid.ccid.identity import make_identity
from usbccid.ccid.testcard import EchoCard
from usbccid.ccid.wire import IccPowerOn, XfrBlock, build_command
from usbccid.usbip import wire
from usbccid.usbip.connection import Event, NeedData
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.errors import UsbipRemoteError
from usbccid.usbip.exporter import ExportConnection, Exporter
from usbccid.usbip.function import SetupPacket
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, LoopbackFunction

BUSIDS = ("1-1", "1-2")
DEVIDS = (0x0001_0001, 0x0001_0002)
IN, OUT = wire.Direction.IN, wire.Direction.OUT
LENGTHS = (0, 1, 8, 10, 18, 64, 255, 271, 65546, 65556, 1 << 20, (1 << 20) + 1, 0xFFFFFFFF)
MAX_OPS = 128
ECONNRESET = -errno.ECONNRESET

# structured-mode op codes (the op byte modulo their number)
OP_SUBMIT, OP_IN, OP_CCID, OP_UNLINK, OP_RAW, OP_TIME, OP_EOF, OP_CONTROL, OP_FLOOD = range(9)
OP_COUNT = 9


def make_exporter() -> Exporter:
    reader = CcidReader([EchoCard()], identity=make_identity(serial_number="FUZZ0001"))
    return Exporter(
        [
            VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()),
            VirtualDevice(reader.identity, reader),
        ]
    )


class Oracle:
    """Records what the connection parsed and sent, in order, and checks every reply."""

    def __init__(self, conn: ExportConnection) -> None:
        self.outstanding: dict[int, wire.CmdSubmit] = {}
        self.unlinks: dict[int, int] = {}  # CMD_UNLINK seqnum -> the URB it targets
        self.ambiguous = False  # a seqnum reused while outstanding: replies are ambiguous
        protocol = conn.protocol
        next_fast_event, send, send_ret = (
            protocol.next_fast_event,
            protocol.send,
            protocol.send_ret,
        )

        # The exporter reads with next_fast_event (CMD_SUBMIT as a wire.Submit tuple) and
        # answers with send (op replies, RET_UNLINK) and send_ret (RET_SUBMIT tuples).
        def spy_next_fast_event() -> Event | wire.Submit | NeedData:
            event = next_fast_event()
            self.received(event.to_cmd() if isinstance(event, wire.Submit) else event)
            return event

        def spy_send(
            message: wire.OpRepDevlist | wire.OpRepImport | wire.RetSubmit | wire.RetUnlink,
        ) -> bytes:
            data = send(message)
            self.sent(message, data)
            return data

        def spy_send_ret(ret: wire.Ret) -> bytes:
            data = send_ret(ret)
            self.sent(ret.to_ret_submit(), data)
            return data

        setattr(protocol, "next_fast_event", spy_next_fast_event)  # noqa: B010
        setattr(protocol, "send", spy_send)  # noqa: B010
        setattr(protocol, "send_ret", spy_send_ret)  # noqa: B010

    def received(self, event: Event | NeedData) -> None:
        if isinstance(event, wire.CmdSubmit):
            if event.seqnum in self.outstanding or event.seqnum in self.unlinks:
                self.ambiguous = True
            self.outstanding[event.seqnum] = event
        elif isinstance(event, wire.CmdUnlink):
            if event.seqnum in self.outstanding or event.seqnum in self.unlinks:
                self.ambiguous = True
            self.unlinks[event.seqnum] = event.unlink_seqnum

    def sent(self, message: object, data: bytes) -> None:
        if isinstance(message, wire.RetSubmit):
            self.ret_submit(message, data)
        elif isinstance(message, wire.RetUnlink):
            self.ret_unlink(message)

    def ret_submit(self, ret: wire.RetSubmit, data: bytes) -> None:
        assert ret.status <= 0, ret
        if self.ambiguous:
            self.outstanding.pop(ret.seqnum, None)
            return
        assert ret.seqnum in self.outstanding, f"RET_SUBMIT for {ret.seqnum}: not pending"
        cmd = self.outstanding.pop(ret.seqnum)
        if cmd.direction == IN:
            assert ret.actual_length == len(ret.data) <= cmd.transfer_buffer_length, (cmd, ret)
            if cmd.ep == 0:
                assert len(ret.data) <= cmd.setup.wLength, (cmd, ret)
            assert len(data) == wire.URB_HEADER_SIZE + len(ret.data)
        else:
            assert not ret.data, ret
            assert ret.status != 0 or ret.actual_length == len(cmd.data), (cmd, ret)
            assert len(data) == wire.URB_HEADER_SIZE

    def ret_unlink(self, ret: wire.RetUnlink) -> None:
        if self.ambiguous:
            victim = self.unlinks.pop(ret.seqnum, None)
            if ret.status == ECONNRESET and victim is not None:
                self.outstanding.pop(victim, None)
            return
        assert ret.seqnum in self.unlinks, f"RET_UNLINK {ret.seqnum} for no CMD_UNLINK"
        victim = self.unlinks.pop(ret.seqnum)
        if ret.status == ECONNRESET:
            assert victim in self.outstanding, f"unlinked {victim}, which was not pending"
            del self.outstanding[victim]
        else:
            assert ret.status == 0, ret
            assert victim not in self.outstanding, f"{victim} is pending but RET_UNLINK is 0"

    def check_answered(self) -> None:
        """Control and OUT URBs and unlinks are answered at once; only IN URBs park."""
        if self.ambiguous:
            return
        assert not self.unlinks, f"unanswered CMD_UNLINKs {self.unlinks}"
        for cmd in self.outstanding.values():
            assert cmd.direction == IN, f"unanswered {cmd}"
            assert cmd.ep != 0, f"unanswered {cmd}"


class Driver:
    """What the asyncio shell does per connection, minus the sockets."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter
        self.conn = exporter.connect("fuzz")
        self.oracle = Oracle(self.conn)
        self.now = 0.0
        self.closed = False

    def feed(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.conn.receive_data(data)
            self.run_jobs()
        except UsbipRemoteError:
            assert self.conn.should_close
            self.close()
            return
        protocol = self.conn.protocol
        assert len(protocol._buffer) <= protocol.max_buffer
        self.conn.data_to_send()
        self.oracle.check_answered()
        if self.conn.should_close:
            self.close()

    def run_jobs(self) -> None:
        while (job := self.conn.next_job(self.now)) is not None:
            job.run()
            job.finish()
            self.conn.poll()

    def advance(self, seconds: float) -> None:
        self.now += seconds
        if self.closed:
            return
        timer = self.conn.get_timer()
        if timer is not None and timer <= self.now:
            self.conn.handle_timer(self.now)
            self.run_jobs()
            self.oracle.check_answered()

    def close(self) -> None:
        self.conn.connection_lost()
        self.closed = True


def _submit(r: Reader, devid: int, direction: wire.Direction, ep: int, length: int) -> bytes:
    seqnum = r.u16()
    setup = SetupPacket(r.byte(), r.byte(), r.u16(), r.u16(), r.u16()) if ep == 0 else None
    data = b""
    if direction == OUT:
        n = r.byte()
        data = r.take(r.u16() if n == 0xFF else n)
        length = len(data)
    cmd = wire.CmdSubmit(
        seqnum,
        devid,
        direction,
        ep,
        length,
        setup=setup or SetupPacket(0, 0, 0, 0, 0),
        data=data,
        transfer_flags=r.byte() & 0x3,
        interval=r.byte(),
    )
    return wire.encode(cmd)


def one_input(data: bytes) -> None:
    r = Reader(data)
    mode = r.byte()
    exporter = make_exporter()
    driver = Driver(exporter)
    prelude = mode & 0x3
    devid = 0
    if prelude in (1, 2):
        busid = BUSIDS[prelude - 1]
        devid = DEVIDS[prelude - 1]
        driver.feed(wire.encode(wire.OpReqImport(busid)))
    elif prelude == 3:
        driver.feed(wire.encode(wire.OpReqDevlist()))

    if mode & 0x4 == 0:
        # raw: the rest of the input is the stream, cut into equal chunks
        size = 1 + r.byte() * 16
        stream = r.rest()
        for start in range(0, len(stream), size):
            driver.feed(stream[start : start + size])
            driver.advance(1.0)
    else:
        for _ in range(MAX_OPS):
            if not r or driver.closed:
                break
            op = r.byte() % OP_COUNT
            flags = r.byte()
            use_devid = devid if flags & 0x80 == 0 else int.from_bytes(r.take(4), "big")
            if op == OP_SUBMIT:
                direction = IN if flags & 1 else OUT
                ep = r.byte() % 17  # 16 is out of range on purpose
                length = LENGTHS[r.byte() % len(LENGTHS)] if direction == IN else 0
                driver.feed(_submit(r, use_devid, direction, ep, length))
            elif op == OP_IN:
                ep = (2, 3, 1)[flags % 3]
                length = LENGTHS[r.byte() % len(LENGTHS)]
                driver.feed(_submit(r, use_devid, IN, ep, length))
            elif op == OP_CCID:
                kind = flags % 3
                if kind == 0:
                    message = build_command(IccPowerOn(0, r.byte()))
                elif kind == 1:
                    n = r.byte()
                    message = build_command(XfrBlock(0, r.byte(), r.take(n)))
                else:
                    n = r.byte()
                    message = r.take(n)
                seqnum = r.u16()
                cmd = wire.CmdSubmit(seqnum, use_devid, OUT, 1, len(message), data=message)
                driver.feed(wire.encode(cmd))
            elif op == OP_CONTROL:
                driver.feed(_submit(r, use_devid, IN if flags & 1 else OUT, 0, r.u16()))
            elif op == OP_UNLINK:
                cmd_unlink = wire.CmdUnlink(
                    r.u16(), use_devid, IN if flags & 1 else OUT, r.byte() % 16, r.u16()
                )
                driver.feed(wire.encode(cmd_unlink))
            elif op == OP_RAW:
                n = r.byte()
                driver.feed(r.take(r.u16() if n == 0xFF else n))
            elif op == OP_FLOOD:  # many IN URBs at once: around MAX_PARKED_URBS
                count, base = r.u16() % 1100, r.u16() << 16
                length = LENGTHS[r.byte() % len(LENGTHS)]
                driver.feed(
                    b"".join(
                        wire.encode(wire.CmdSubmit(base + i, use_devid, IN, 2 + flags % 2, length))
                        for i in range(count)
                    )
                )
            elif op == OP_TIME:
                driver.advance(flags / 8)
            else:
                assert op == OP_EOF
                driver.feed(b"")
                break

    if not driver.closed:
        driver.feed(b"")  # EOF
        driver.close()
    # Nothing is left behind: no import, nothing parked, both devices importable again.
    assert all(s.imported_by is None for s in exporter.status()), exporter.status()
    assert all(d.parked_count == 0 for d in exporter.devices.values())
    for busid in BUSIDS:
        conn = exporter.connect("after")
        conn.receive_data(wire.encode(wire.OpReqImport(busid)))
        reply = wire.parse_op_rep_import(conn.data_to_send())
        assert reply.status == wire.OpStatus.OK, (busid, reply)
        conn.connection_lost()


def _urb_program(*ops: bytes, prelude: int = 2) -> bytes:
    return bytes([0x4 | prelude]) + b"".join(ops)


def seeds() -> list[bytes]:
    """Valid sessions, as raw streams and as structured programs."""
    reader_in = bytes([OP_IN, 0, 8, 0, 1, 0, 0])  # bulk IN 65546 bytes on ep 2, seqnum 1
    power_on = bytes([OP_CCID, 0, 0, 0, 2])
    echo = bytes([OP_CCID, 1, 4, 1]) + bytes.fromhex("80100000") + bytes([0, 3])
    get_descriptor = bytes([OP_CONTROL, 1, 0, 18, 0, 4, 0x80, 6, 0x01, 0x00, 0, 0, 0, 18, 0, 0])
    set_config = bytes([OP_CONTROL, 0, 0, 0, 0, 5, 0x00, 9, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    unlink = bytes([OP_UNLINK, 0, 0, 9, 2, 0, 1])
    loop_out = bytes([OP_SUBMIT, 0, 1, 0, 0, 0x10, 3]) + b"abc" + bytes([0, 0])
    loop_in = bytes([OP_IN, 0, 5, 0, 0x11, 0, 0])

    def control(bm: int, request: int, value: int, index: int, length: int) -> bytes:
        direction = bm >> 7
        setup = bytes([bm, request, value >> 8, value & 0xFF, index >> 8, index & 0xFF])
        return (
            bytes([OP_CONTROL, direction, length >> 8, length & 0xFF, 0, 9])
            + setup
            + (bytes([length >> 8, length & 0xFF]) + (b"" if direction else bytes([0])) + bytes(2))
        )

    standard = [
        control(0x80, 6, 0x0200, 0, 255),  # GET_DESCRIPTOR configuration
        control(0x80, 6, 0x0300, 0, 255),  # string 0 (LANGIDs)
        control(0x80, 6, 0x0302, 0x0409, 255),  # product string
        control(0x80, 6, 0x0600, 0, 10),  # DEVICE_QUALIFIER: stalls at full speed
        control(0x80, 0, 0, 0, 2),  # GET_STATUS device
        control(0x81, 0, 0, 0, 2),  # GET_STATUS interface
        control(0x82, 0, 0, 0x82, 2),  # GET_STATUS endpoint 0x82
        control(0x02, 3, 0, 0x82, 0),  # SET_FEATURE(ENDPOINT_HALT) on 0x82
        control(0x02, 1, 0, 0x82, 0),  # CLEAR_FEATURE(ENDPOINT_HALT)
        control(0x00, 5, 7, 0, 0),  # SET_ADDRESS
        control(0x80, 8, 0, 0, 1),  # GET_CONFIGURATION
        control(0x81, 10, 0, 0, 1),  # GET_INTERFACE
        control(0x01, 11, 0, 0, 0),  # SET_INTERFACE
        control(0xA1, 2, 0, 0, 64),  # CCID GET_CLOCK_FREQUENCIES
        control(0x21, 1, 0x0100, 0, 0),  # CCID ABORT slot 0 seq 1
    ]
    loopback_vendor = [
        control(0x41, 2, 0, 0, 0),  # write the control buffer (empty)
        control(0xC1, 1, 0, 0, 64),  # read it back
        control(0x41, 3, 0, 0, 0),  # a job: its result goes to interrupt IN 0x83
        bytes([OP_IN, 1, 5, 0, 0x21, 0, 0]),  # interrupt IN 0x83
    ]
    flood = bytes([OP_FLOOD, 0]) + (1025).to_bytes(2, "big") + bytes([0, 1, 5])

    client = wire.CmdSubmit(1, DEVIDS[0], OUT, 1, 3, data=b"xyz")
    raw_stream = (
        wire.encode(client)
        + wire.encode(wire.CmdSubmit(2, DEVIDS[0], IN, 2, 64))
        + wire.encode(wire.CmdUnlink(3, DEVIDS[0], OUT, 0, 2))
    )
    return [
        bytes([0x3]),  # devlist
        bytes([0x0, 0]) + wire.encode(wire.OpReqImport("1-2")),
        bytes([0x1, 0]) + raw_stream,
        bytes([0x1, 3]) + raw_stream,
        _urb_program(get_descriptor, set_config, reader_in, power_on, echo, unlink),
        _urb_program(reader_in, power_on, bytes([OP_TIME, 80]), reader_in, echo),
        _urb_program(loop_out, loop_in, unlink, prelude=1),
        _urb_program(*loopback_vendor, prelude=1),
        _urb_program(*standard),
        _urb_program(reader_in, standard[7], reader_in, standard[8], reader_in),
        _urb_program(flood),
        _urb_program(reader_in, unlink),  # unlinks a parked URB: -ECONNRESET
        _urb_program(reader_in, bytes([OP_EOF, 0])),
    ]


if __name__ == "__main__":
    main(one_input, seeds)
