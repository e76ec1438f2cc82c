"""A scripted VSCard host (what QEMU's ccid-card-passthru does) around a VscardClient."""

from __future__ import annotations

import socket
from typing import ClassVar

from usbccid.card import Card
from usbccid.frontends.vscard import wire
from usbccid.frontends.vscard.client import Event, State, VscardClient

OK = wire.ErrorCode.SUCCESS
GENERAL = wire.ErrorCode.GENERAL_ERROR


def split_messages(data: bytes) -> list[wire.Message]:
    """Our output as messages; it must be whole, well-formed messages only."""
    messages = []
    while data:
        assert len(data) >= wire.HEADER_SIZE, f"a cut header: {data.hex()}"
        size = wire.HEADER_SIZE + int.from_bytes(data[8:12], "big")
        assert len(data) >= size, f"a cut message: {data.hex()}"
        messages.append(wire.parse_message(data[:size]))
        data = data[size:]
    return messages


class Host:
    """Drives ``client`` as QEMU would: ``send`` messages, ``take`` what came back."""

    def __init__(self, card: Card | None = None, **kwargs: int) -> None:
        self.client = VscardClient(card, **kwargs)  # type: ignore[arg-type]

    def send(self, *messages: wire.Message) -> None:
        self.client.receive_data(b"".join(wire.encode(m) for m in messages))

    def take(self) -> list[wire.Message]:
        return split_messages(self.client.data_to_send())

    def state(self) -> State:
        return self.client.state

    def run_jobs(self) -> int:
        n = 0
        while (job := self.client.next_job()) is not None:
            job.run()
            job.finish()
            n += 1
        return n

    def events(self) -> list[Event]:
        return self.client.events()

    def handshake(self) -> list[wire.Message]:
        """Our Init, the host's, ReaderRemove + ReaderAdd and their answers, and (with a
        card) the ATR and its answer, as QEMU 7.2 answers them. Returns our messages."""
        out = self.take()
        self.send(wire.Init())
        out += self.take()
        self.send(wire.Error(OK, wire.MINIMAL_READER_ID), wire.Error(OK, wire.MINIMAL_READER_ID))
        self.run_jobs()
        new = self.take()
        out += new
        if any(isinstance(m, wire.Atr) for m in new):
            self.send(wire.Error(OK, wire.MINIMAL_READER_ID))
        return out

    def apdu(self, data: bytes) -> list[wire.Message]:
        self.send(wire.Apdu(data, wire.MINIMAL_READER_ID))
        self.run_jobs()
        return self.take()


class QemuPeer:
    """A blocking-socket VSCard host, speaking to a front end as QEMU 7.2 does."""

    #: Every peer made, closed after each test (conftest.py).
    made: ClassVar[list[QemuPeer]] = []

    def __init__(self, sock: socket.socket, timeout: float = 10.0) -> None:
        QemuPeer.made.append(self)
        self.sock = sock
        self.sock.settimeout(timeout)
        self.rx = bytearray()

    @classmethod
    def connect(cls, address: tuple[str, int] | str, timeout: float = 10.0) -> QemuPeer:
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(address)
        else:
            sock = socket.create_connection(address, timeout=timeout)
        return cls(sock, timeout)

    def send(self, *messages: wire.Message) -> None:
        self.sock.sendall(b"".join(wire.encode(m) for m in messages))

    def recv(self) -> wire.Message:
        while True:
            if len(self.rx) >= wire.HEADER_SIZE:
                size = wire.HEADER_SIZE + int.from_bytes(self.rx[8:12], "big")
                if len(self.rx) >= size:
                    raw = bytes(self.rx[:size])
                    del self.rx[:size]
                    return wire.parse_message(raw)
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"closed with {len(self.rx)} bytes pending")
            self.rx += chunk

    def expect(self, *kinds: type) -> list[wire.Message]:
        got = [self.recv() for _ in kinds]
        assert [type(m) for m in got] == list(kinds), got
        return got

    def handshake(self, card: bool = True) -> bytes | None:
        """Our side of ccid-card-passthru's handshake; returns the ATR (with a card)."""
        self.expect(wire.Init)
        self.send(wire.Init())
        self.expect(wire.ReaderRemove, wire.ReaderAdd)
        self.send(wire.Error(OK, 0), wire.Error(OK, 0))
        if not card:
            return None
        (atr,) = self.expect(wire.Atr)
        assert isinstance(atr, wire.Atr)
        self.send(wire.Error(OK, 0))
        return atr.atr

    def apdu(self, data: bytes) -> bytes:
        self.send(wire.Apdu(data, 0))
        answer = self.recv()
        assert isinstance(answer, wire.Apdu), answer
        return answer.data

    def at_eof(self, timeout: float = 10.0) -> bool:
        """True if the other side closes (after any bytes it still sends)."""
        self.sock.settimeout(timeout)
        try:
            while self.sock.recv(65536):
                pass
        except (TimeoutError, ConnectionError):
            return False
        return True

    def close(self) -> None:
        self.sock.close()
