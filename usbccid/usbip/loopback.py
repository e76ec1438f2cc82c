"""A vendor-class loopback :class:`UsbFunction`: for tests and as a demo device.

* bulk OUT 0x01: each transfer is queued as one message;
* bulk IN 0x82: returns the queued messages in order (a message longer than the IN URB is
  split across consecutive URBs, as a device FIFO would);
* interrupt IN 0x83: gets data only when :meth:`LoopbackFunction.notify` is called;
* vendor requests to the interface: ``0x01`` IN reads the control buffer, ``0x02`` OUT
  writes it, ``0x03`` OUT hands the data to a :class:`Job` whose ``finish`` sends it to
  the interrupt endpoint (so drivers can test job handling); anything else STALLs.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from usbccid.jobs import Job
from usbccid.usbip.errors import Stall
from usbccid.usbip.function import (
    DeviceIdentity,
    EndpointSpec,
    InterfaceSpec,
    SetupPacket,
    TransferType,
)

BULK_OUT = 0x01
BULK_IN = 0x82
INTERRUPT_IN = 0x83

REQ_READ_CONTROL = 0x01
REQ_WRITE_CONTROL = 0x02
REQ_JOB = 0x03

LOOPBACK_IDENTITY = DeviceIdentity(
    vendor_id=0x1209,  # pid.codes
    product_id=0x0001,  # pid.codes test PID
    bcd_device=0x0100,
    manufacturer="usbccid",
    product="usbccid loopback",
    serial_number="0001",
)


@dataclass(slots=True)
class LoopbackJob:
    """Reverses its data in ``run``; ``finish`` queues it on the interrupt endpoint."""

    function: LoopbackFunction
    data: bytes
    blocking: bool = False
    result: bytes | None = None

    def run(self) -> None:
        self.result = self.data[::-1]

    def finish(self) -> None:
        assert self.result is not None
        self.function.notify(self.result)


@dataclass(slots=True)
class LoopbackFunction:
    """The loopback function. ``blocking_jobs`` sets :attr:`LoopbackJob.blocking`."""

    blocking_jobs: bool = False
    control_buffer: bytes = b""
    echo: deque[bytes] = field(default_factory=deque)
    interrupts: deque[bytes] = field(default_factory=deque)
    jobs: deque[LoopbackJob] = field(default_factory=deque)
    resets: int = 0

    @property
    def interface(self) -> InterfaceSpec:
        return InterfaceSpec(
            interface_class=0xFF,
            interface_subclass=0x00,
            interface_protocol=0x00,
            endpoints=(
                EndpointSpec(BULK_OUT, TransferType.BULK, 64),
                EndpointSpec(BULK_IN, TransferType.BULK, 64),
                EndpointSpec(INTERRUPT_IN, TransferType.INTERRUPT, 8, interval=10),
            ),
            name="loopback",
        )

    def reset(self) -> None:
        self.control_buffer = b""
        self.echo.clear()
        self.interrupts.clear()
        self.jobs.clear()
        self.resets += 1

    def control(self, setup: SetupPacket, data: bytes) -> bytes:
        if setup.request_type == 2 and setup.direction_in and setup.bRequest == REQ_READ_CONTROL:
            return self.control_buffer
        if setup.request_type == 2 and not setup.direction_in:
            if setup.bRequest == REQ_WRITE_CONTROL:
                self.control_buffer = data
                return b""
            if setup.bRequest == REQ_JOB:
                self.jobs.append(LoopbackJob(self, data, blocking=self.blocking_jobs))
                return b""
        raise Stall(f"loopback: unsupported request {setup}")

    def bulk_out(self, endpoint: int, data: bytes) -> None:
        self.echo.append(data)

    def poll_in(self, endpoint: int, max_length: int) -> bytes | None:
        queue = self.echo if endpoint == BULK_IN else self.interrupts
        if not queue:
            return None
        head = queue.popleft()
        if len(head) > max_length:
            queue.appendleft(head[max_length:])
            head = head[:max_length]
        return head

    def notify(self, data: bytes) -> None:
        """Queue ``data`` for the interrupt endpoint (then poll the device)."""
        self.interrupts.append(data)

    def next_job(self, now: float) -> Job | None:
        return self.jobs.popleft() if self.jobs else None

    def get_timer(self) -> float | None:
        return None

    def handle_timer(self, now: float) -> None:
        pass
