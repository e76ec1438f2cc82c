"""A scripted VSCard host (what QEMU's ccid-card-passthru does) around a VscardClient."""

from __future__ import annotations

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
