"""Exporter and ExportConnection: several devices, bus ids, busy import, re-import."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.errors import UsbipRemoteError
from usbccid.usbip.exporter import DeviceStatus, Exporter
from usbccid.usbip.function import DeviceIdentity, SetupPacket
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, REQ_JOB, LoopbackFunction

from .helpers import Pair, setup

IN, OUT = wire.Direction.IN, wire.Direction.OUT


def three_devices() -> tuple[Exporter, list[LoopbackFunction]]:
    functions = [LoopbackFunction() for _ in range(3)]
    identities = [
        DeviceIdentity(0x1209, 0x0001 + i, 0x0100, "usbccid", f"dev{i}", f"{i}") for i in range(3)
    ]
    devices = [VirtualDevice(ident, f) for ident, f in zip(identities, functions, strict=True)]
    return Exporter(devices), functions


def test_bus_ids_and_devlist() -> None:
    exporter, _ = three_devices()
    assert list(exporter.devices) == ["1-1", "1-2", "1-3"]
    reply = wire.parse_op_rep_devlist(Pair(exporter).op(wire.OpReqDevlist()))
    assert [(e.device.busid, e.device.busnum, e.device.devnum) for e in reply.devices] == [
        ("1-1", 1, 1),
        ("1-2", 1, 2),
        ("1-3", 1, 3),
    ]
    entry = reply.devices[1]
    assert (entry.device.vendor_id, entry.device.product_id) == (0x1209, 0x0002)
    assert entry.device.speed == wire.Speed.FULL
    assert entry.interfaces == (wire.UsbInterfaceInfo(0xFF, 0, 0),)


def test_devlist_closes_the_connection() -> None:
    p = Pair()
    p.op(wire.OpReqDevlist())
    assert p.conn.should_close


def test_import_second_device_uses_its_devid() -> None:
    exporter, functions = three_devices()
    p = Pair(exporter)
    reply = p.import_("1-2")
    assert reply.device is not None
    assert reply.device.devid == 0x0001_0002
    assert reply.device.busid == "1-2"
    seq, replies = p.submit(1, OUT, 2, b"hi")
    assert replies == [wire.RetSubmit(seq, 0, 2)]
    assert list(functions[1].echo) == [b"hi"]
    assert not functions[0].echo


def test_import_unknown_busid() -> None:
    p = Pair()
    assert p.import_("9-9") == wire.OpRepImport(wire.OpStatus.NODEV)
    assert p.conn.should_close


def test_busy_import_refused() -> None:
    exporter, _ = three_devices()
    first = Pair(exporter, peer="a")
    assert first.import_("1-1").status == wire.OpStatus.OK
    second = Pair(exporter, peer="b")
    raw = second.op(wire.OpReqImport("1-1"))
    assert raw == bytes.fromhex("0111 0003 00000002")  # ST_DEV_BUSY (usbip_common.h)
    assert second.conn.should_close
    # The refusal leaves the first connection and its import alone.
    assert not first.conn.should_close
    assert exporter.status()[0] == DeviceStatus("1-1", 0x1209, 0x0001, "dev0", "a")
    # Another device is still importable.
    assert Pair(exporter, peer="c").import_("1-2").status == wire.OpStatus.OK
    # The imported devices are not offered in the device list (usbipd does the same).
    listed = wire.parse_op_rep_devlist(Pair(exporter).op(wire.OpReqDevlist()))
    assert [e.device.busid for e in listed.devices] == ["1-3"]


def test_status() -> None:
    exporter, _ = three_devices()
    assert [s.imported_by for s in exporter.status()] == [None, None, None]
    Pair(exporter, peer="10.0.0.1:5000").import_("1-3")
    assert [s.imported_by for s in exporter.status()] == [None, None, "10.0.0.1:5000"]


@pytest.mark.parametrize("how", ["connection_lost", "eof", "remote_error"])
def test_reimport_after_disconnect_resets_state(how: str) -> None:
    f = LoopbackFunction()
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, f)])
    first = Pair(exporter, peer="a")
    first.import_()
    first.control(setup(0x00, 9, 1))  # SET_CONFIGURATION(1)
    first.submit(3, IN, 8)
    first.submit(1, OUT, 5, b"stale")  # queued for bulk IN, never read
    device = exporter.device("1-1")
    assert device.configuration == 1
    assert device.parked_count == 1

    if how == "connection_lost":
        first.conn.connection_lost()
    elif how == "eof":
        first.conn.receive_data(b"")
    else:
        with pytest.raises(UsbipRemoteError):
            first.conn.receive_data(bytes.fromhex("deadbeef") + bytes(44))
    assert first.conn.should_close
    assert exporter.status()[0].imported_by is None

    second = Pair(exporter, peer="b")
    assert second.import_().status == wire.OpStatus.OK
    assert device.configuration == 0
    assert device.parked_count == 0
    assert not f.echo  # the function was reset
    _, replies = second.submit(2, IN, 64)
    assert replies == []  # the stale echo data is gone
    f.notify(b"new")
    assert second.poll() == []  # the old connection's parked interrupt URB is gone too
    nxt, replies = second.submit(3, IN, 8)
    assert replies == [wire.RetSubmit(nxt, 0, 3, b"new")]


def test_connection_lost_twice_and_stale_connection() -> None:
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())])
    a = Pair(exporter, peer="a")
    a.import_()
    a.conn.connection_lost()
    b = Pair(exporter, peer="b")
    b.import_()
    a.conn.connection_lost()  # must not release b's import
    assert exporter.status()[0].imported_by == "b"
    a.conn.poll()
    assert a.conn.data_to_send() == b""


def test_jobs_timer_and_poll_pass_through() -> None:
    f = LoopbackFunction()
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, f)])
    p = Pair(exporter)
    assert p.conn.next_job(0.0) is None  # nothing imported
    assert p.conn.get_timer() is None
    p.conn.handle_timer(0.0)
    p.import_()
    parked, _ = p.submit(3, IN, 8)
    p.control(setup(0x41, REQ_JOB, 0, 0, 3), b"abc")
    job = p.conn.next_job(1.0)
    assert job is not None
    assert not job.blocking
    assert p.conn.next_job(1.0) is None
    job.run()
    job.finish()
    assert p.poll() == [wire.RetSubmit(parked, 0, 3, b"cba")]
    assert p.conn.get_timer() is None
    p.conn.handle_timer(5.0)


@dataclass
class TimerFunction(LoopbackFunction):
    due: float | None = 10.0

    def get_timer(self) -> float | None:
        return self.due

    def handle_timer(self, now: float) -> None:
        self.due = None
        self.notify(b"tick")


def test_handle_timer_polls() -> None:
    f = TimerFunction()
    p = Pair(Exporter([VirtualDevice(LOOPBACK_IDENTITY, f)]))
    p.import_()
    assert p.conn.get_timer() == 10.0
    seq, _ = p.submit(3, IN, 8)
    p.conn.handle_timer(10.0)
    assert p.client.feed(p.conn.data_to_send()) == [wire.RetSubmit(seq, 0, 4, b"tick")]
    assert p.conn.get_timer() is None


# --- property tests over the whole stack ---------------------------------------------------

u16 = st.integers(0, 0xFFFF)
setups = st.builds(
    SetupPacket,
    st.sampled_from([0x00, 0x01, 0x02, 0x80, 0x81, 0x82, 0x41, 0xC1, 0x21, 0xA1, 0x83, 0xE0]),
    st.integers(0, 13),
    st.one_of(u16, st.sampled_from([0x0100, 0x0200, 0x0300, 0x0301, 0x0302, 0x0600, 0x0F00])),
    st.one_of(st.integers(0, 0x90), u16),
    st.integers(0, 300),
)


@st.composite
def commands(draw: st.DrawFn, seqnum: int) -> wire.CmdSubmit | wire.CmdUnlink:
    kind = draw(st.integers(0, 4))
    if kind == 0:
        victim = draw(st.integers(max(1, seqnum - 8), seqnum + 2))
        return wire.CmdUnlink(seqnum, 0x0001_0001, OUT, 0, victim)
    direction = draw(st.sampled_from([IN, OUT]))
    ep = draw(st.sampled_from([0, 0, 1, 2, 3, 4]))
    if ep == 0:
        s = draw(setups)
        direction = IN if s.direction_in else OUT
        length = s.wLength if direction == IN else draw(st.integers(0, 16))
    else:
        s = SetupPacket(0, 0, 0, 0, 0)
        length = draw(st.integers(0, 70))
    data = draw(st.binary(min_size=length, max_size=length)) if direction == OUT else b""
    return wire.CmdSubmit(seqnum, 0x0001_0001, direction, ep, length, setup=s, data=data)


@settings(max_examples=120, deadline=None)
@given(st.data())
def test_random_urb_traffic_keeps_the_invariants(data: st.DataObject) -> None:
    f = LoopbackFunction()
    p = Pair(Exporter([VirtualDevice(LOOPBACK_IDENTITY, f)]))
    p.import_()
    submitted: dict[int, wire.CmdSubmit] = {}
    answered: set[int] = set()
    unlinked: set[int] = set()
    for seqnum in range(1, data.draw(st.integers(1, 25)) + 1):
        cmd = data.draw(commands(seqnum))
        if isinstance(cmd, wire.CmdSubmit):
            submitted[seqnum] = cmd
            if cmd.direction == IN:
                p.client.in_seqnums.add(seqnum)
        if data.draw(st.booleans()):
            f.notify(data.draw(st.binary(max_size=12)))
        p.conn.receive_data(wire.encode(cmd))
        p.client.seqnum = seqnum
        for reply in p.client.feed(p.conn.data_to_send()):
            if isinstance(reply, wire.RetUnlink):
                assert reply.seqnum == seqnum
                assert reply.status in (0, -104)
                if reply.status == -104:
                    assert isinstance(cmd, wire.CmdUnlink)
                    unlinked.add(cmd.unlink_seqnum)
                continue
            # Every URB is answered at most once, never after it was unlinked, and never
            # with more than it asked for.
            assert reply.seqnum in submitted
            assert reply.seqnum not in answered
            assert reply.seqnum not in unlinked
            answered.add(reply.seqnum)
            asked = submitted[reply.seqnum]
            assert reply.actual_length <= asked.transfer_buffer_length
            assert reply.status in (0, -32)
    assert not p.conn.should_close


@settings(max_examples=150, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=100), max_size=5), st.booleans())
def test_garbage_after_import_only_raises_remote_error(chunks: list[bytes], eof: bool) -> None:
    exporter = Exporter([VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())])
    p = Pair(exporter)
    p.import_()
    header = wire.encode(wire.CmdSubmit(1, 0x0001_0001, IN, 0, 0))[:12]
    try:
        for i, chunk in enumerate(chunks):
            # Every other chunk starts like a valid CMD_SUBMIT header to get past framing.
            p.conn.receive_data(header + chunk if i % 2 else chunk)
            p.conn.data_to_send()
        if eof:
            p.conn.receive_data(b"")
    except UsbipRemoteError:
        assert p.conn.should_close
        assert exporter.status()[0].imported_by is None  # released for the next import


# -- devices that come and go (issue 11) ------------------------------------------------


def test_bus_ids_are_never_reused_for_another_device() -> None:
    exporter, _ = three_devices()
    exporter.remove("1-2")
    assert list(exporter.devices) == ["1-1", "1-3"]
    assert exporter.add(VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())) == "1-4"
    # asked for explicitly (the same reader again), a free one is given
    assert exporter.add(VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()), "1-2") == "1-2"
    with pytest.raises(ValueError, match="in use"):
        exporter.add(VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()), "1-3")
    for bad in ("2-1", "1-0", "1-01", "1-x", "1-65536", ""):
        with pytest.raises(ValueError, match="is not 1-N"):
            exporter.add(VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction()), bad)
    reply = wire.parse_op_rep_devlist(Pair(exporter).op(wire.OpReqDevlist()))
    assert [e.device.busid for e in reply.devices] == ["1-1", "1-3", "1-4", "1-2"]


def test_removing_an_imported_device_unplugs_its_importer() -> None:
    exporter, _ = three_devices()
    p = Pair(exporter)
    assert p.import_("1-2").status == wire.OpStatus.OK
    p.submit(2, IN, 64)  # a parked URB
    assert exporter.device("1-2").parked_count == 1
    device = exporter.remove("1-2")
    assert p.conn.should_close  # the driver closes the socket: vhci sees a disconnect
    assert p.conn.device is None
    assert device.parked_count == 0  # reset
    assert [s.busid for s in exporter.status()] == ["1-1", "1-3"]
    assert Pair(exporter).import_("1-2").status == wire.OpStatus.NODEV
    with pytest.raises(KeyError):
        exporter.remove("1-2")


def test_takeover_only_when_the_driver_says_so() -> None:
    exporter, _ = three_devices()
    old = Pair(exporter, peer="10.0.0.5:1000")
    assert old.import_("1-1").status == wire.OpStatus.OK
    asked: list[tuple[str, str]] = []
    verdict = False

    def takeover(holder: object, claimant: object) -> bool:
        assert holder is old.conn
        asked.append((old.conn.peer, getattr(claimant, "peer", "")))
        return verdict

    assert Pair(exporter).import_("1-1").status == wire.OpStatus.DEV_BUSY  # no policy: busy
    exporter.takeover = takeover
    assert Pair(exporter, peer="10.0.0.5:1001").import_("1-1").status == wire.OpStatus.DEV_BUSY
    verdict = True
    new = Pair(exporter, peer="10.0.0.5:1002")
    assert new.import_("1-1").status == wire.OpStatus.OK
    assert asked == [("10.0.0.5:1000", "10.0.0.5:1001"), ("10.0.0.5:1000", "10.0.0.5:1002")]
    assert old.conn.should_close
    assert old.conn.device is None
    assert exporter.status()[0].imported_by == "10.0.0.5:1002"
    old.conn.connection_lost()  # the old socket closing later does not free the new import
    assert exporter.status()[0].imported_by == "10.0.0.5:1002"
