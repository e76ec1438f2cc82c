"""A stand-in for vpcd in tests: a TCP listener speaking as vpcd.c does (length and
payload in two writes, then a blocking read of the answer)."""

from __future__ import annotations

import asyncio
import contextlib

from usbccid.frontends.vpcd.wire import Message, build_message


class FakeVpcd:
    """Listens like vpcd (vpcd.c opensock); each accepted card is one `Card` queue entry."""

    def __init__(self, port: int = 0) -> None:
        self.port = port
        self.server: asyncio.Server | None = None
        self.cards: asyncio.Queue[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = (
            asyncio.Queue()
        )
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for writer in self.writers:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
        await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        await self.cards.put((reader, writer))

    async def card(self, timeout: float = 5) -> Peer:
        reader, writer = await asyncio.wait_for(self.cards.get(), timeout)
        return Peer(reader, writer)


class Peer:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, message: Message | bytes) -> None:
        frame = message if isinstance(message, bytes) else build_message(message)
        self.writer.write(frame[:2])  # vpcd 0.9 writes the length, then the payload
        await self.writer.drain()
        self.writer.write(frame[2:])
        await self.writer.drain()

    async def ask(self, message: Message, timeout: float = 5) -> bytes:
        await self.send(message)
        header = await asyncio.wait_for(self.reader.readexactly(2), timeout)
        return await asyncio.wait_for(
            self.reader.readexactly(int.from_bytes(header, "big")), timeout
        )

    async def closed(self, timeout: float = 5) -> bool:
        return await asyncio.wait_for(self.reader.read(1), timeout) == b""

    def close(self) -> None:
        self.writer.close()
