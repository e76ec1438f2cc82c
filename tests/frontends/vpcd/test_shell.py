"""The asyncio shell against a stand-in vpcd (a TCP listener speaking as vpcd.c does:
length and payload in two writes, then a blocking read of the answer)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Awaitable, Callable

import pytest

from tests.frontends.vpcd.fakevpcd import FakeVpcd
from usbccid.ccid.testcard import DEFAULT_ATR, EchoCard
from usbccid.frontends.vpcd import VpcdFrontend
from usbccid.frontends.vpcd.wire import Apdu, GetAtr, PowerOn

ECHO = bytes.fromhex("80100000 03 010203")


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), 30))


def test_connects_and_answers() -> None:
    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        card = EchoCard()
        front = VpcdFrontend(port=port, card=card)
        await front.start()
        peer = await vpcd.card()
        await front.wait_connected(5)
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        await peer.send(PowerOn())
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        assert await peer.ask(Apdu(ECHO)) == b"\x01\x02\x03\x90\x00"
        status = front.status()
        assert status.connected
        assert status.inserted
        assert status.card_state == "on"
        assert status.atr == DEFAULT_ATR
        assert status.counters.apdus == 1
        assert "connected, on; 1 APDUs" in status.describe()
        await front.close()
        assert await peer.closed()
        await vpcd.stop()

    run(test)


def test_remove_closes_and_insert_reconnects() -> None:
    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        front = VpcdFrontend(port=port, card=EchoCard())
        await front.start()
        peer = await vpcd.card()
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        removed = front.remove()
        assert isinstance(removed, EchoCard)
        assert await peer.closed()  # vpcd reads EOF: vicc_eject, "card removed"
        with pytest.raises(asyncio.TimeoutError):
            await vpcd.card(timeout=0.5)  # no card, no connection
        assert front.status().describe().endswith(": no card")
        other = EchoCard(atr=bytes.fromhex("3B 02 AA BB"))
        front.insert(other)
        with pytest.raises(ValueError, match="already holds"):
            front.insert(EchoCard())
        peer = await vpcd.card()
        assert await peer.ask(GetAtr()) == bytes.fromhex("3B 02 AA BB")
        assert front.status().connections == 2
        await front.close()
        await vpcd.stop()

    run(test)


def test_reconnects_with_backoff_when_vpcd_goes_away() -> None:
    """pcscd restarts: the connection drops, the port is closed for a while, then vpcd
    listens again on the same port."""

    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        front = VpcdFrontend(port=port, card=EchoCard(), backoff_initial=0.05, backoff_max=0.4)
        await front.start()
        peer = await vpcd.card()
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        await vpcd.stop()
        peer.close()
        await asyncio.sleep(1.0)  # several refused attempts
        status = front.status()
        assert not status.connected
        assert status.inserted
        assert status.last_error is not None
        assert "cannot connect" in status.last_error
        assert "not connected (cannot connect" in status.describe()
        back = FakeVpcd(port)
        await back.start()
        started = time.monotonic()
        peer = await back.card()
        assert time.monotonic() - started < 2.0  # about one backoff_max (0.4 s), on a busy box
        assert await peer.ask(Apdu(ECHO)) == b"\x01\x02\x03\x90\x00"
        assert front.status().connections == 2
        await front.close()
        await back.stop()

    run(test)


def test_garbage_closes_and_the_card_comes_back() -> None:
    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        front = VpcdFrontend(port=port, card=EchoCard(), backoff_initial=0.05)
        await front.start()
        peer = await vpcd.card()
        await peer.send(b"\x00\x01\x07")  # no such control byte
        assert await peer.closed()
        peer = await vpcd.card()  # reconnected: vpcd sees a card inserted again
        assert front.status().last_error == "unknown control byte 0x07"
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        await front.close()
        await vpcd.stop()

    run(test)


def test_a_slow_card_runs_off_the_event_loop() -> None:
    threads: list[str] = []

    def slow_sleep(seconds: float) -> None:
        threads.append(threading.current_thread().name)
        time.sleep(seconds)

    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        card = EchoCard(blocking=True, sleep=slow_sleep, slow_seconds=0.5)
        front = VpcdFrontend(port=port, card=card)
        await front.start()
        peer = await vpcd.card()
        ticks = 0

        async def tick() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.05)
                ticks += 1

        ticker = asyncio.get_running_loop().create_task(tick())
        assert await peer.ask(Apdu(bytes.fromhex("80140000"))) == b"\x90\x00"
        ticker.cancel()
        assert ticks >= 3  # the loop kept running while the card worked (0.5 s)
        assert threads
        assert threads[0] != threading.main_thread().name
        await front.close()
        await vpcd.stop()

    run(test)


def test_removal_while_a_slow_card_works() -> None:
    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        card = EchoCard(blocking=True, sleep=time.sleep, slow_seconds=0.3)
        front = VpcdFrontend(port=port, card=card)
        await front.start()
        peer = await vpcd.card()
        await peer.send(Apdu(bytes.fromhex("80140000")))
        await asyncio.sleep(0.1)
        front.remove()
        assert await peer.closed()  # no answer, just the close
        await asyncio.sleep(0.4)  # the job finishes into a closed connection
        assert not front.status().connected
        await front.close()
        await vpcd.stop()

    run(test)


def test_nothing_listening_is_not_an_error_at_start() -> None:
    async def test() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]  # closed again: nothing listens there
        front = VpcdFrontend(port=port, card=EchoCard(), backoff_initial=0.05)
        await front.start()
        with pytest.raises(asyncio.TimeoutError):
            await front.wait_connected(0.3)
        assert front.status().connections == 0
        await front.close()

    run(test)


def test_a_bug_below_the_shell_closes_that_connection_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Anything but a VpcdError escaping the connection is a bug: logged with its
    traceback, the connection closed, and the card connects again."""

    class Flaky:
        """An EchoCard whose first ``blocking`` lookup raises."""

        def __init__(self) -> None:
            self.card = EchoCard()
            self.calls = 0

        @property
        def blocking(self) -> bool:
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError("bug")
            return False

        def power_on(self) -> bytes:
            return self.card.power_on()

        def power_off(self) -> None:
            self.card.power_off()

        def transmit(self, command: bytes) -> bytes:
            return self.card.transmit(command)

    async def test() -> None:
        vpcd = FakeVpcd()
        port = await vpcd.start()
        front = VpcdFrontend(port=port, card=Flaky(), backoff_initial=0.05)
        await front.start()
        peer = await vpcd.card()
        await peer.send(GetAtr())
        assert await peer.closed()
        assert "internal error" in (front.status().last_error or "")
        peer = await vpcd.card()
        assert await peer.ask(GetAtr()) == DEFAULT_ATR
        await front.close()
        await vpcd.stop()

    with caplog.at_level(logging.ERROR):
        run(test)
    assert "RuntimeError: bug" in caplog.text
