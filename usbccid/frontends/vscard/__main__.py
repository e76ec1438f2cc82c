"""Serve one stored card to QEMU's ccid-card-passthru: ``python -m usbccid.frontends.vscard``.

    python -m usbccid.frontends.vscard --listen 127.0.0.1:2001 [--card NAME] [--state-dir DIR]
    qemu-system-x86_64 ... -usb -device usb-ccid \\
        -chardev socket,id=ccid,host=127.0.0.1,port=2001,reconnect=1,nodelay=on \\
        -device ccid-card-passthru,chardev=ccid

Also ``--listen-unix PATH`` (QEMU: ``-chardev socket,id=ccid,path=PATH,reconnect=1``),
``--connect HOST:PORT`` / ``--connect-unix PATH`` for a QEMU that listens
(``server=on,wait=off``), ``--trace`` (APDUs on stderr, secrets redacted). The card is the
stored card NAME of the state directory, generated on first use like ``usbccid serve``'s
default card. Prints ``VSCard listening on ADDRESS`` once ready; runs until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path

from usbccid.cac.card import CacCard
from usbccid.card import Card
from usbccid.frontends.vscard.frontend import VscardFrontend
from usbccid.state import default_state_dir, load_or_create_card
from usbccid.trace import TracingCard


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"HOST:PORT expected, got {text!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def _say(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


async def _serve(args: argparse.Namespace, card: Card) -> None:
    frontend = VscardFrontend(card, name=args.card)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        for host, port in args.listen:
            bound = await frontend.listen_tcp(host, port)
            _say(f"VSCard listening on {bound[0]}:{bound[1]}")
        for path in args.listen_unix:
            _say(f"VSCard listening on {await frontend.listen_unix(path)}")
        if args.connect:
            frontend.connect_tcp(*args.connect)
            _say(f"VSCard connecting to {args.connect[0]}:{args.connect[1]}")
        if args.connect_unix:
            frontend.connect_unix(args.connect_unix)
            _say(f"VSCard connecting to {args.connect_unix}")
        await stop.wait()
    finally:
        await frontend.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m usbccid.frontends.vscard", description=__doc__)
    ap.formatter_class = argparse.RawDescriptionHelpFormatter
    ap.add_argument("--listen", type=_hostport, action="append", default=[], metavar="HOST:PORT")
    ap.add_argument("--listen-unix", type=Path, action="append", default=[], metavar="PATH")
    ap.add_argument("--connect", type=_hostport, metavar="HOST:PORT")
    ap.add_argument("--connect-unix", type=Path, metavar="PATH")
    ap.add_argument("--card", default="default", help="stored card name (default: default)")
    ap.add_argument("--state-dir", type=Path, default=None)
    ap.add_argument("--trace", action="store_true", help="log APDUs (secrets redacted)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    if args.connect and args.connect_unix:
        ap.error("--connect and --connect-unix: one QEMU to connect to at most")
    if not (args.listen or args.listen_unix or args.connect or args.connect_unix):
        ap.error("nothing to do: give --listen, --listen-unix, --connect or --connect-unix")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    state_dir = args.state_dir or default_state_dir()
    provisioned, store = load_or_create_card(state_dir, datetime.now(UTC), name=args.card)
    card: Card = CacCard(provisioned.profile, store)
    if args.trace:
        card = TracingCard(card, args.card)
    asyncio.run(_serve(args, card))
    return 0


if __name__ == "__main__":
    sys.exit(main())
