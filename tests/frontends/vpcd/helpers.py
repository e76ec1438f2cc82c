"""Drivers for the sans-IO vpcd connection in tests: run its jobs inline, collect frames."""

from __future__ import annotations

from usbccid.frontends.vpcd.protocol import VpcdConnection
from usbccid.frontends.vpcd.wire import HEADER_SIZE, Apdu, GetAtr, PowerOff, PowerOn, build_message

POWER_ON = build_message(PowerOn())
POWER_OFF = build_message(PowerOff())
GET_ATR = build_message(GetAtr())


def apdu(command: bytes) -> bytes:
    return build_message(Apdu(command))


def run_jobs(conn: VpcdConnection) -> int:
    """Run and finish every job the connection hands out, on this thread."""
    count = 0
    while (job := conn.next_job()) is not None:
        job.run()
        job.finish()
        count += 1
    return count


def split_frames(stream: bytes) -> list[bytes]:
    """The payloads of a byte stream of whole frames (asserts it is whole)."""
    payloads = []
    while stream:
        assert len(stream) >= HEADER_SIZE, f"a stray {len(stream)}-byte tail"
        size = int.from_bytes(stream[:HEADER_SIZE], "big")
        assert len(stream) >= HEADER_SIZE + size, "a frame cut short"
        payloads.append(stream[HEADER_SIZE : HEADER_SIZE + size])
        stream = stream[HEADER_SIZE + size :]
    return payloads


def exchange(conn: VpcdConnection, data: bytes) -> list[bytes]:
    """Feed ``data``, run the jobs, return the payloads sent back."""
    conn.receive_data(data)
    run_jobs(conn)
    return split_frames(conn.data_to_send())
