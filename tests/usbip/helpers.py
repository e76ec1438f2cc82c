"""Test helpers: a minimal USB/IP client (sans-IO) and an in-memory client/server pair."""

from __future__ import annotations

from dataclasses import dataclass, field

from usbccid.usbip import wire
from usbccid.usbip.device import VirtualDevice
from usbccid.usbip.exporter import ExportConnection, Exporter
from usbccid.usbip.function import SetupPacket
from usbccid.usbip.loopback import LOOPBACK_IDENTITY, LoopbackFunction

DEVID_1_1 = 0x0001_0001


def loopback_device() -> VirtualDevice:
    return VirtualDevice(LOOPBACK_IDENTITY, LoopbackFunction())


def setup(
    bm_request_type: int, b_request: int, w_value: int = 0, w_index: int = 0, w_length: int = 0
) -> SetupPacket:
    return SetupPacket(bm_request_type, b_request, w_value, w_index, w_length)


@dataclass
class UsbipClient:
    """Builds URB requests and parses the server's reply stream (like vhci_rx.c).

    It remembers which seqnums were IN submits, since a RET_SUBMIT carries payload only
    for those (the reply's own direction field is 0).
    """

    devid: int = DEVID_1_1
    seqnum: int = 0
    buffer: bytearray = field(default_factory=bytearray)
    in_seqnums: set[int] = field(default_factory=set)

    def next_seqnum(self) -> int:
        self.seqnum += 1
        return self.seqnum

    def submit(
        self,
        ep: int,
        direction: wire.Direction,
        length: int,
        *,
        setup: SetupPacket | None = None,
        data: bytes = b"",
    ) -> tuple[int, bytes]:
        seq = self.next_seqnum()
        if direction == wire.Direction.IN:
            self.in_seqnums.add(seq)
        cmd = wire.CmdSubmit(
            seqnum=seq,
            devid=self.devid,
            direction=direction,
            ep=ep,
            transfer_buffer_length=length,
            setup=setup or SetupPacket(0, 0, 0, 0, 0),
            data=data,
        )
        return seq, wire.encode(cmd)

    def control(self, s: SetupPacket, data: bytes = b"") -> tuple[int, bytes]:
        if s.direction_in:
            return self.submit(0, wire.Direction.IN, s.wLength, setup=s)
        return self.submit(0, wire.Direction.OUT, len(data), setup=s, data=data)

    def unlink(self, victim: int) -> tuple[int, bytes]:
        seq = self.next_seqnum()
        return seq, wire.encode(wire.CmdUnlink(seq, self.devid, wire.Direction.OUT, 0, victim))

    def feed(self, data: bytes) -> list[wire.RetSubmit | wire.RetUnlink]:
        self.buffer += data
        out: list[wire.RetSubmit | wire.RetUnlink] = []
        while len(self.buffer) >= wire.URB_HEADER_SIZE:
            header = wire.parse_urb_header(bytes(self.buffer[: wire.URB_HEADER_SIZE]))
            m = header.message
            size = 0
            if isinstance(m, wire.RetSubmit) and m.seqnum in self.in_seqnums:
                size = m.actual_length
            if len(self.buffer) < wire.URB_HEADER_SIZE + size:
                break
            payload = bytes(self.buffer[wire.URB_HEADER_SIZE : wire.URB_HEADER_SIZE + size])
            del self.buffer[: wire.URB_HEADER_SIZE + size]
            reply = wire.with_payload(m, payload)
            assert isinstance(reply, wire.RetSubmit | wire.RetUnlink)
            out.append(reply)
        return out


class Pair:
    """An ExportConnection driven by a UsbipClient in memory (no sockets)."""

    def __init__(self, exporter: Exporter | None = None, peer: str = "test") -> None:
        self.exporter = exporter if exporter is not None else Exporter([loopback_device()])
        self.conn: ExportConnection = self.exporter.connect(peer)
        self.client = UsbipClient()

    def op(self, message: wire.OpReqDevlist | wire.OpReqImport) -> bytes:
        self.conn.receive_data(wire.encode(message))
        return self.conn.data_to_send()

    def import_(self, busid: str = "1-1") -> wire.OpRepImport:
        reply = wire.parse_op_rep_import(self.op(wire.OpReqImport(busid)))
        if reply.device is not None:
            self.client.devid = reply.device.devid
        return reply

    def send(self, data: bytes) -> list[wire.RetSubmit | wire.RetUnlink]:
        self.conn.receive_data(data)
        return self.client.feed(self.conn.data_to_send())

    def control(self, s: SetupPacket, data: bytes = b"") -> wire.RetSubmit:
        seq, raw = self.client.control(s, data)
        replies = self.send(raw)
        mine = [r for r in replies if r.seqnum == seq]
        assert len(mine) == 1, replies
        reply = mine[0]
        assert isinstance(reply, wire.RetSubmit)
        return reply

    def device_status(self, endpoint: int) -> bytes:
        """GET_STATUS of an endpoint (USB 2.0 §9.4.5)."""
        reply = self.control(SetupPacket(0x82, 0, 0, endpoint, 2))
        assert reply.status == 0
        return reply.data

    def submit(
        self, ep: int, direction: wire.Direction, length: int, data: bytes = b""
    ) -> tuple[int, list[wire.RetSubmit | wire.RetUnlink]]:
        seq, raw = self.client.submit(ep, direction, length, data=data)
        return seq, self.send(raw)

    def unlink(self, victim: int) -> tuple[int, list[wire.RetSubmit | wire.RetUnlink]]:
        seq, raw = self.client.unlink(victim)
        return seq, self.send(raw)

    def poll(self) -> list[wire.RetSubmit | wire.RetUnlink]:
        self.conn.poll()
        return self.client.feed(self.conn.data_to_send())
