"""The ``usbccid`` command line: serve readers, make and show cards, control a server.

Every failure the user can cause (a bad configuration, a port in use, an unreadable key, a
wrong passphrase, no server running) ends as one line on stderr and exit status 1; usage
errors exit with 2. Tracebacks are for bugs only (and ``-v`` shows them for those, too).
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509

from usbccid import __version__
from usbccid.errors import UsbccidError

PROG = "usbccid"
EXIT_ERROR = 1
EXIT_USAGE = 2

log = logging.getLogger("usbccid")


class UsageError(UsbccidError):
    """A command-line value is wrong in a way argparse cannot see."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, naming the command and where to look for help.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _common(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=argparse.SUPPRESS,
        help="debug log output (connections, protocol details)",
    )
    group.add_argument(
        "-q",
        "--quiet",
        action="count",
        default=argparse.SUPPRESS,
        help="less output (warnings and errors only)",
    )


def _state_dir_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--state-dir",
        type=Path,
        metavar="DIR",
        help="where cards, PIN state and the control socket live (default: "
        "$STATE_DIRECTORY, /var/lib/usbccid as root, else ~/.local/state/usbccid)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Virtual USB CCID smart-card readers holding emulated DoD CAC cards, "
        "exported over USB/IP: attach them on a Linux host with 'usbip attach' and use them "
        "with pcscd and OpenSC.",
        epilog="Start with 'usbccid serve', then on the host: 'sudo modprobe vhci-hcd; "
        "sudo usbip attach -r 127.0.0.1 -b 1-1'. See 'usbccid COMMAND --help'.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    # serve -------------------------------------------------------------------------
    serve = sub.add_parser(
        "serve",
        help="run the USB/IP server",
        description="Run the USB/IP server. Without --config it serves one reader holding "
        "the default card of the state directory (generated on first use), on "
        "127.0.0.1:3240, and prints how to attach it and the card's PIN.",
    )
    serve.add_argument(
        "--config",
        "-c",
        type=Path,
        metavar="FILE",
        help="configuration file (TOML; see examples/usbccid.toml)",
    )
    serve.add_argument(
        "--host",
        metavar="ADDR",
        help="address to listen on (default 127.0.0.1; USB/IP has no authentication: see --allow)",
    )
    serve.add_argument(
        "--port", type=_port, metavar="N", help="TCP port (default 3240; 0 picks a free one)"
    )
    serve.add_argument(
        "--allow",
        action="append",
        metavar="CIDR",
        type=_network,
        help="client network allowed to connect (repeatable; default: "
        "loopback only). Others are closed at accept",
    )
    serve.add_argument(
        "--vscard",
        metavar="PORT|HOST:PORT|PATH",
        help="instead of USB/IP, serve the default card to QEMU's ccid-card-passthru: "
        "listen on 127.0.0.1:PORT, HOST:PORT or the UNIX socket PATH for its chardev "
        "(prints the QEMU options)",
    )
    _state_dir_arg(serve)
    serve.add_argument(
        "--trace", action="store_true", help="log every APDU (PINs and key operations redacted)"
    )
    serve.add_argument(
        "--pcap",
        type=Path,
        metavar="FILE",
        help="write the USB traffic to FILE (pcap, usbmon format: "
        "Wireshark decodes it down to the CCID messages)",
    )
    serve.add_argument(
        "--vpcd",
        nargs="?",
        const="",
        metavar="HOST:PORT",
        help="no USB/IP: put the default card into pcscd's virtual reader instead, by "
        "connecting to vsmartcard's vpcd driver (default 127.0.0.1:35963; Debian: "
        "apt-get install pcscd vsmartcard-vpcd). No kernel module, no root",
    )
    serve.add_argument(
        "--pinpad",
        action="store_true",
        help="give the reader(s) a PIN pad: PC_to_RDR_Secure, typed with 'usbccid ctl pinpad'",
    )
    serve.add_argument(
        "--keypad",
        metavar="DIGITS|card-pin",
        type=_keypad,
        help="a PIN pad that types by itself (implies --pinpad): these digits, or the "
        "card's current PIN (card-pin); for unattended tests",
    )
    serve.add_argument(
        "--check",
        action="store_true",
        help="only validate the configuration and load the cards, then exit",
    )
    _common(serve)

    # card --------------------------------------------------------------------------
    card = sub.add_parser(
        "card",
        help="make and show cards in the state directory",
        description="Make and show the cards stored in the state "
        'directory; a configuration uses one with card = "NAME".',
    )
    card_sub = card.add_subparsers(dest="card_command", metavar="ACTION", parser_class=_Parser)
    card_sub.required = True
    new = card_sub.add_parser(
        "new",
        help="make a new card",
        description="Make a new card: a test card with generated keys and certificates "
        "issued by a throwaway test CA (default), or one from existing certificate and key "
        "files (--cert/--key, --pkcs12).",
    )
    _state_dir_arg(new)
    new.add_argument(
        "--name",
        default="default",
        help="the card's name in the state directory (default: default)",
    )
    new.add_argument(
        "--containers",
        type=int,
        metavar="N",
        help="number of key containers, 1-16 (default 3: ID, email signature, email encryption)",
    )
    new.add_argument(
        "--key-size",
        metavar="BITS[,BITS...]",
        help="RSA key size for all containers, or one per container "
        "(1024, 2048, 3072, 4096; default 2048)",
    )
    edges = new.add_mutually_exclusive_group()
    edges.add_argument(
        "--edges",
        choices=("cac", "piv", "cac+piv"),
        help="the card edges it answers: the CAC applets (default), the PIV Card "
        "Application (SP 800-73-4), or both with one PIN, as a DoD CAC",
    )
    edges.add_argument(
        "--piv",
        action="store_const",
        const="piv",
        dest="edges",
        help="a PIV card: same as --edges piv (keys 9A, 9C, 9D, 9E; PIN 6-8 digits)",
    )
    new.add_argument(
        "--key-type",
        metavar="TYPE[,TYPE...]",
        help="PIV key type for all PIV keys, or one per key in the order 9A, 9C, 9D, 9E, "
        "82...: rsa1024, rsa2048, rsa3072, rsa4096, p256, p384 (default rsa2048)",
    )
    new.add_argument(
        "--retired",
        type=int,
        metavar="N",
        help="also N retired PIV key management keys, 82... (0-20, default 0)",
    )
    new.add_argument("--cn", metavar="NAME", help="common name of the certificates' subject")
    new.add_argument(
        "--subject",
        metavar="DN",
        help="the certificates' whole subject, RFC 4514 "
        "(e.g. 'CN=DOE.JOHN.1234567890,OU=PKI,O=U.S. Government,C=US')",
    )
    new.add_argument("--email", metavar="ADDR", help="email address (subjectAltName)")
    new.add_argument(
        "--all-purpose", action="store_true", help="every key signs and decrypts (like virt_cacard)"
    )
    new.add_argument(
        "--cert",
        action="append",
        type=Path,
        metavar="FILE",
        help="certificate file (PEM or DER) of a container; repeatable, each with its --key",
    )
    new.add_argument(
        "--key",
        action="append",
        type=Path,
        metavar="FILE",
        help="private key file (PEM or DER, RSA) for the --cert in the same position",
    )
    new.add_argument(
        "--pkcs12",
        action="append",
        type=Path,
        metavar="FILE",
        help="PKCS#12 file holding a container's certificate and key; repeatable",
    )
    secret = new.add_mutually_exclusive_group()
    secret.add_argument(
        "--passphrase-file",
        type=Path,
        metavar="FILE",
        help="read the passphrase of the key/PKCS#12 files from FILE",
    )
    secret.add_argument(
        "--passphrase-env", metavar="VAR", help="read the passphrase from environment variable VAR"
    )
    secret.add_argument("--ask-passphrase", action="store_true", help="prompt for the passphrase")
    new.add_argument("--pin", help="the PIN, 4-8 digits (default 12345678)")
    new.add_argument(
        "--unblock-code",
        metavar="PUK",
        help="the unblock code (PUK), 4-8 digits (default 87654321)",
    )
    new.add_argument(
        "--tries",
        type=int,
        default=3,
        metavar="N",
        help="wrong PINs before the card blocks (1-15, default 3)",
    )
    new.add_argument(
        "--unblock-tries",
        type=int,
        default=10,
        metavar="N",
        help="wrong unblock codes before it blocks for good (1-15, default 10)",
    )
    _common(new)
    show = card_sub.add_parser(
        "show",
        help="show a stored card, or the card of a token or an NSS database",
        description="Show a stored card: its containers, certificates, PIN and retry counters. "
        "With --config and --slot, the card a configured slot holds (any type); with "
        "--pkcs11-module or --nss-db, the card that token or database makes.",
    )
    _state_dir_arg(show)
    show.add_argument("--name", default="default", help="the card (default: default)")
    show.add_argument("--json", action="store_true", help="machine-readable output")
    show.add_argument("--config", type=Path, metavar="FILE", help="a configuration file")
    show.add_argument(
        "--slot", metavar="READER[:N]", help="with --config: the reader (name or bus id), slot N"
    )
    show.add_argument("--pkcs11-module", metavar="PATH", help="a PKCS#11 module")
    show.add_argument("--token-label", metavar="LABEL", help="with --pkcs11-module")
    show.add_argument("--token-serial", metavar="SERIAL", help="with --pkcs11-module")
    show.add_argument("--nss-db", metavar="DB", help='an NSS database ("sql:/path")')
    show.add_argument(
        "--cert",
        action="append",
        metavar="NICKNAME",
        help="with --nss-db: a certificate nickname (repeat, in container order)",
    )
    _common(show)
    lst = card_sub.add_parser("list", help="list the stored cards")
    _state_dir_arg(lst)
    _common(lst)

    # ctl ---------------------------------------------------------------------------
    ctl = sub.add_parser(
        "ctl",
        help="control a running server",
        description="Talk to a running server through its control socket "
        "(<state dir>/control.sock, or $RUNTIME_DIRECTORY/control.sock under systemd).",
    )
    _state_dir_arg(ctl)
    ctl.add_argument("--socket", type=Path, metavar="PATH", help="the control socket itself")
    ctl.add_argument("--json", action="store_true", help="print the server's JSON reply")
    ctl.add_argument(
        "--timeout",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long to wait for the answer (default 5)",
    )
    _common(ctl)
    ctl_sub = ctl.add_subparsers(dest="ctl_command", metavar="ACTION", parser_class=_Parser)
    ctl_sub.required = True
    ctl_sub.add_parser("status", help="readers, bus ids, importing clients, slots, counters")
    for action, what in (("insert", "insert the card into"), ("remove", "remove the card from")):
        p = ctl_sub.add_parser(action, help=f"{what} a slot (the host sees the change)")
        p.add_argument(
            "target",
            metavar="READER[:SLOT]",
            help="reader name or bus id, and slot number (default 0)",
        )
        if action == "insert":
            p.add_argument(
                "--card",
                metavar="NAME",
                help="put this stored card into the (empty) slot instead of its own",
            )
    ctl_sub.add_parser(
        "reload", help="re-read the configuration: cards, and readers added or removed"
    )
    p = ctl_sub.add_parser("add-reader", help="export a new reader now (until removed)")
    p.add_argument("name", help="the reader's name")
    p.add_argument(
        "--card",
        action="append",
        metavar="NAME",
        help="a slot holding this stored card; repeat for more slots; 'none': an empty slot "
        "(default: one slot with the card 'default')",
    )
    p.add_argument("--identity", metavar="PRESET", help="USB identity preset (default vmware)")
    p.add_argument("--bus-id", metavar="BUSID", help="the bus id to use, if free (1-N)")
    p = ctl_sub.add_parser("remove-reader", help="unplug a reader (its importer sees it go)")
    p.add_argument("reader", metavar="READER", help="reader name or bus id")
    pad = ctl_sub.add_parser(
        "pinpad",
        help="type on a reader's PIN pad (while a PIN entry waits)",
        description="Type on the PIN pad of a reader while the host waits for a PIN "
        "(PC_to_RDR_Secure): each --digits is one entry, followed by OK; a PIN change asks "
        "three (current PIN, new PIN, new PIN again). The digits never reach a log.",
    )
    pad.add_argument(
        "target",
        metavar="READER[:SLOT]",
        help="reader name or bus id, and slot number (default 0)",
    )
    pad.add_argument(
        "--digits",
        action="append",
        default=[],
        metavar="DIGITS",
        help="one entry, then OK (repeatable, up to 3)",
    )
    end = pad.add_mutually_exclusive_group()
    end.add_argument("--ok", action="store_true", help="end each entry with OK (the default)")
    end.add_argument(
        "--cancel", action="store_true", help="press Cancel (after the last --digits, if any)"
    )
    pad.add_argument(
        "--wait",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to wait for the host to ask for a PIN (default 10)",
    )
    return parser


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port {value} is out of range 0-65535")
    return value


def _keypad(text: str) -> str:
    from usbccid.tool.config import keypad_entry

    try:
        return keypad_entry(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _network(text: str) -> object:
    from usbccid.tool.config import parse_network

    try:
        return parse_network(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# --------------------------------------------------------------------------- logging


def _setup_logging(args: argparse.Namespace, default: int) -> None:
    verbose = getattr(args, "verbose", 0)
    quiet = getattr(args, "quiet", 0)
    level = default
    if verbose:
        level = logging.DEBUG if verbose >= 1 else level
    elif quiet:
        level = logging.WARNING if quiet == 1 else logging.ERROR
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):  # systemd's journal timestamps for us
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if getattr(args, "trace", False):
        logging.getLogger("usbccid.tool.trace").setLevel(logging.INFO)


def _state_dir(args: argparse.Namespace, configured: Path | None = None) -> Path:
    if args.state_dir is not None:
        return Path(args.state_dir)
    if configured is not None:
        return configured
    from usbccid.cards.store import default_state_dir

    return default_state_dir()


# --------------------------------------------------------------------------- commands


def cmd_serve(args: argparse.Namespace) -> int:
    from usbccid.tool import app
    from usbccid.tool.config import (
        VPCD_PORT,
        default_config,
        load_config,
        parse_hostport,
        vscard_config,
        with_overrides,
        with_vpcd,
    )

    config = load_config(args.config) if args.config else default_config()
    if args.vpcd is not None and args.vscard is not None:
        raise UsageError("--vpcd and --vscard: the default card goes to one front end")
    if args.vpcd is not None:
        if args.config:
            raise UsageError(
                '--vpcd is for the default card; in a configuration file set frontend = "vpcd" '
                "on the reader"
            )
        for option, value in (
            ("--host", args.host),
            ("--port", args.port),
            ("--allow", args.allow),
            ("--pcap", args.pcap),
            ("--pinpad", args.pinpad or None),  # a CCID feature: vpcd carries APDUs only
            ("--keypad", args.keypad),
        ):
            if value is not None:
                raise UsageError(f"{option} is for the USB/IP server, which --vpcd does not start")
        try:
            vpcd_host, vpcd_port = parse_hostport(args.vpcd, VPCD_PORT)
        except ValueError as exc:
            raise UsageError(f"--vpcd: {exc}") from None
        config = with_vpcd(config, vpcd_host, vpcd_port)
    if args.vscard is not None:
        if args.config:
            raise UsageError(
                '--vscard is for the default card; with --config, give a reader frontend = "vscard"'
            )
        for option, value in (("--host", args.host), ("--port", args.port), ("--pcap", args.pcap)):
            if value is not None:
                raise UsageError(
                    f"{option} is for the USB/IP server, which --vscard does not start"
                )
        config = vscard_config(args.vscard)
    config = with_overrides(
        config,
        host=args.host,
        port=args.port,
        allow=args.allow,
        state_dir=args.state_dir,
        trace=args.trace or None,
        pcap=args.pcap,
        pinpad=args.pinpad,
        keypad=args.keypad,
    )
    if config.trace:
        logging.getLogger("usbccid.tool.trace").setLevel(logging.INFO)
    if config.log_level and not (getattr(args, "verbose", 0) or getattr(args, "quiet", 0)):
        logging.getLogger().setLevel(config.log_level.upper())
    state_dir = _state_dir(args, config.state_dir)
    config = replace(config, state_dir=state_dir)
    if args.check:
        readers = app.check(config)
        _out(f"{config.path or 'default configuration'}: OK ({readers})")
        return 0
    app.serve(config, announce=_out)
    return 0


def cmd_card_new(args: argparse.Namespace) -> int:
    from usbccid.cac.profile import CardProfile
    from usbccid.cards.generate import (
        ProvisionedCard,
        default_card_spec,
        default_piv_spec,
        generate_card,
    )
    from usbccid.cards.keys import load_container, load_piv_slot
    from usbccid.cards.provision import container_label, make_pin_policy, new_card_id
    from usbccid.cards.store import CardExistsError, card_directory, save_card
    from usbccid.piv.profile import SLOT_ORDER

    state_dir = _state_dir(args)
    target = card_directory(state_dir, args.name)
    if target.exists():
        raise CardExistsError(f"a card named {args.name!r} already exists in {target}")
    edges = args.edges or "cac"
    has_cac, has_piv = "cac" in edges.split("+"), "piv" in edges.split("+")
    if not has_piv and (args.key_type is not None or args.retired is not None):
        raise UsageError("--key-type and --retired are for cards with a PIV edge (--piv)")
    if not has_cac and (args.containers is not None or args.key_size is not None):
        raise UsageError("--containers and --key-size are for CAC containers, not --piv")
    if has_piv and args.pin and not 6 <= len(args.pin) <= 8:
        raise UsageError("--pin: a PIV PIN is 6 to 8 digits (SP 800-73-4)")
    policy = make_pin_policy(
        **({"pin": _digits(args.pin, "--pin").encode()} if args.pin else {}),
        **(
            {"unblock_code": _digits(args.unblock_code, "--unblock-code").encode()}
            if args.unblock_code
            else {}
        ),
        max_tries=args.tries,
        max_unblock_tries=args.unblock_tries,
    )
    certs = args.cert or []
    keys = args.key or []
    p12s = args.pkcs12 or []
    from_files = bool(certs or keys or p12s)
    if from_files:
        generated = [args.containers, args.key_size, args.cn, args.subject, args.email]
        generated += [args.key_type, args.retired]
        if any(v is not None for v in generated) or args.all_purpose:
            raise UsageError(
                "--containers, --key-size, --key-type, --retired, --cn, --subject, --email "
                "and --all-purpose are for generated cards, not with --cert/--key/--pkcs12"
            )
        if len(certs) != len(keys):
            raise UsageError(f"{len(certs)} --cert but {len(keys)} --key: give them in pairs")
        if edges == "cac+piv":
            raise UsageError(
                "a cac+piv card from files needs a configuration file "
                "(containers and piv in one [[reader.slot]])"
            )
        passphrase = _passphrase(args)
        containers = []
        sources: list[tuple[Path, Path | None]] = [
            *zip(certs, keys, strict=True),
            *((p, None) for p in p12s),
        ]
        limit = 16 if has_cac else len(SLOT_ORDER)
        if len(sources) > limit:
            raise UsageError(f"a card holds at most {limit} {'containers' if has_cac else 'keys'}")
        piv_slots = []
        for index, (first, key) in enumerate(sources):
            data, key_data = _read_file(first), _read_file(key) if key is not None else None
            if has_piv:  # the i-th key goes to the i-th of 9A, 9C, 9D, 9E, 82...
                piv_slots.append(
                    load_piv_slot(
                        data,
                        key_data,
                        ref=SLOT_ORDER[index],
                        passphrase=passphrase,
                        source=str(first),
                        key_source=str(key),
                    )
                )
                continue
            containers.append(
                load_container(
                    data,
                    key_data,
                    label=container_label(index),
                    passphrase=passphrase,
                    source=str(first),
                    key_source=str(key),
                )
            )
        profile = CardProfile(
            card_id=new_card_id(), containers=tuple(containers), pin_policy=policy
        )
        card = ProvisionedCard(profile=profile, piv_slots=tuple(piv_slots), edges=edges)
    else:
        if args.passphrase_file or args.passphrase_env or args.ask_passphrase:
            raise UsageError("a passphrase is only for --key/--pkcs12 files")
        card_id = new_card_id()
        sizes = _key_sizes(args.key_size)
        n = (
            args.containers
            if args.containers is not None
            else (len(sizes) if sizes and len(sizes) > 1 else 3)
        )
        spec = default_card_spec(
            card_id,
            containers=n,
            key_size=(sizes[0] if len(sizes) == 1 else sizes) if sizes else 2048,
            common_name=args.cn,
            email=args.email,
            all_purpose=args.all_purpose,
            pin_policy=policy,
        )
        piv_specs = (
            default_piv_spec(
                card_id,
                key_types=_key_types(args.key_type),
                retired=args.retired or 0,
                common_name=args.cn,
                email=args.email,
            )
            if has_piv
            else ()
        )
        spec = replace(
            spec, containers=spec.containers if has_cac else (), piv=piv_specs, edges=edges
        )
        if args.subject:
            subject = _subject(args.subject)
            spec = replace(
                spec,
                containers=tuple(replace(c, subject=subject) for c in spec.containers),
                piv=tuple(replace(p, subject=subject) for p in spec.piv),
            )
        if not getattr(args, "quiet", 0):
            what = [f"{n} RSA key{'s' * (n != 1)}"] if has_cac else []
            what += [f"{len(piv_specs)} PIV keys"] if has_piv else []
            _err(f"generating {' and '.join(what)}...")
        card = generate_card(datetime.now(UTC), spec, card_id=card_id)
    directory = save_card(state_dir, card, args.name)
    assert directory == card_directory(state_dir, args.name)
    _out(f'card "{args.name}" created in {directory}')
    _print_card(card, directory, None)
    return 0


def cmd_card_show(args: argparse.Namespace) -> int:
    from usbccid.cards.store import PIN_STATE_FILE, FilePinStateStore, card_directory, load_card

    if args.config or args.slot or args.pkcs11_module or args.nss_db:
        return _show_source(args)
    state_dir = _state_dir(args)
    card = load_card(state_dir, args.name)
    directory = card_directory(state_dir, args.name)
    state = FilePinStateStore(directory / PIN_STATE_FILE).load()
    if args.json:
        _out(json.dumps(_card_json(card, directory, state), indent=2))
    else:
        _out(f'card "{args.name}" in {directory}')
        _print_card(card, directory, state)
    return 0


def _show_source(args: argparse.Namespace) -> int:
    """``card show`` for a configured slot, a PKCS#11 token or an NSS database."""
    from usbccid.cards.nss import NssConfig, NssSource
    from usbccid.cards.pkcs11 import Pkcs11Config, Pkcs11Source, SourceInfo, TokenCard
    from usbccid.cards.pkcs11 import TokenSelector as Selector
    from usbccid.cards.registry import load_card
    from usbccid.cards.source import EmulatedCac
    from usbccid.tool.config import load_config
    from usbccid.tool.control import find_reader

    info: SourceInfo | None = None
    if args.pkcs11_module:
        selector = Selector(label=args.token_label, serial=args.token_serial)
        info = Pkcs11Source(Pkcs11Config(args.pkcs11_module, selector)).check()
    elif args.nss_db:
        if not args.cert:
            raise UsageError("--nss-db needs at least one --cert NICKNAME")
        info = NssSource(NssConfig(args.nss_db, tuple(args.cert))).check()
    else:
        if not (args.config and args.slot):
            raise UsageError("give --config FILE and --slot READER[:N] together")
        config = load_config(args.config)
        reader, _, index_text = args.slot.partition(":")
        readers = [(r.name, r.bus_id or "") for r in config.readers]
        rc = config.readers[find_reader(readers, reader)]
        index = int(index_text or 0) if (index_text or "0").isdigit() else -1
        if not 0 <= index < len(rc.slots):
            raise UsageError(f"reader {rc.name} has no slot {index_text}")
        source = rc.slots[index].card
        if source is None:
            _out(f"reader {rc.name} slot {index}: empty")
            return 0
        state_dir = _state_dir(args, config.state_dir)
        loaded = load_card(source, state_dir, datetime.now(UTC))
        if isinstance(loaded, TokenCard):
            info = loaded.info()
        elif isinstance(loaded, EmulatedCac):
            directory = loaded.ca_file.parent if loaded.ca_file is not None else state_dir
            state = loaded.pin_store.load()
            if args.json:
                _out(json.dumps(_card_json(loaded.profile, directory, state), indent=2))
            else:
                _out(f"reader {rc.name} slot {index}: {loaded.description}")
                _print_card(loaded.profile, directory, state)
            return 0
        else:  # pragma: no cover - every source is one of the above
            _out(loaded.description)
            return 0
    assert info is not None
    if args.json:
        _out(json.dumps(_source_json(info), indent=2))
        return 0
    _out(info.description)
    _out(f"  token: {info.token_label!r}, serial {info.token_serial}")
    _out(
        "  PIN: the token's login"
        if info.login_required
        else "  PIN: none needed (the token asks for no login)"
    )
    _out(
        "  raw RSA: CKM_RSA_X_509"
        if info.raw_rsa
        else "  raw RSA: emulated with CKM_RSA_PKCS (PKCS#1 v1.5 only: no PSS, no OAEP)"
    )
    for i, c in enumerate(info.containers):
        _out(f"  container {i}: {c.label}, RSA {c.key_size}, CKA_ID {c.key_id.hex()}")
        _out(f"    subject: {c.subject}")
        _out(f"    valid until: {c.not_after}")
    return 0


def _source_json(info: object) -> dict[str, object]:
    from usbccid.cards.pkcs11 import SourceInfo

    assert isinstance(info, SourceInfo)
    return {
        "description": info.description,
        "token_label": info.token_label,
        "token_serial": info.token_serial,
        "login_required": info.login_required,
        "raw_rsa": info.raw_rsa,
        "containers": [
            {
                "label": c.label,
                "id": c.key_id.hex(),
                "subject": c.subject,
                "key_size": c.key_size,
                "not_after": c.not_after,
            }
            for c in info.containers
        ],
    }


def cmd_card_list(args: argparse.Namespace) -> int:
    from usbccid.cards.store import CARDS_DIR

    cards = _state_dir(args) / CARDS_DIR
    names = (
        sorted(p.name for p in cards.iterdir() if p.is_dir() and not p.name.startswith("."))
        if cards.is_dir()
        else []
    )
    if not names:
        _err(f"no cards in {cards} (make one with 'usbccid card new')")
        return 0
    for name in names:
        _out(name)
    return 0


def cmd_ctl(args: argparse.Namespace) -> int:
    from usbccid.tool.control import (
        decode_reply,
        encode_request,
        format_status,
        parse_target,
        status_from_json,
    )
    from usbccid.tool.control_server import request, socket_path

    if args.socket is not None:
        path = Path(args.socket)
    elif args.state_dir is not None:
        path = socket_path(Path(args.state_dir))
    else:
        # The server puts it in $RUNTIME_DIRECTORY when systemd gives it one (the example
        # unit: /run/usbccid), else in its state directory.
        candidates = [socket_path(_state_dir(args), os.environ.get("RUNTIME_DIRECTORY"))]
        if os.geteuid() == 0:
            candidates.append(socket_path(Path("/run/usbccid")))
        path = next((p for p in candidates if p.exists()), candidates[0])
    command = args.ctl_command
    reader = slot = None
    fields: dict[str, Any] = {}
    if command in ("insert", "remove", "pinpad"):
        reader, slot = parse_target(args.target)
    if command == "pinpad":
        return _ctl_pinpad(args, path, reader, slot)
    if command in ("insert", "remove"):
        fields["card"] = getattr(args, "card", None)
    elif command == "remove-reader":
        reader = args.reader
    elif command == "add-reader":
        cards = args.card or ["default"]
        fields = {
            "name": args.name,
            "cards": [None if c.lower() == "none" else c for c in cards],
            "identity": args.identity,
            "bus_id": args.bus_id,
        }
    data = encode_request(command, reader, slot, **fields)
    result = decode_reply(request(path, data, timeout=args.timeout))
    if args.json:
        _out(json.dumps(result, indent=2, sort_keys=True))
    elif command == "status":
        _out(format_status(status_from_json(result)))
    elif command == "reload":
        _out(result.get("message", "reloaded") if isinstance(result, dict) else "reloaded")
    elif command == "add-reader":
        _out(f"reader {result['reader']} added: bus id {result['bus_id']}")
    elif command == "remove-reader":
        _out(f"reader {result['reader']} removed (was bus id {result['bus_id']})")
    else:
        verb = "inserted into" if command == "insert" else "removed from"
        what = f"card {fields['card']!r}" if fields.get("card") else "card"
        _out(f"{what} {verb} {reader} slot {slot}")
    return 0


def _ctl_pinpad(args: argparse.Namespace, path: Path, reader: str | None, slot: int | None) -> int:
    """``ctl pinpad``: type when the reader asks, waiting up to ``--wait`` seconds for it."""
    import time

    from usbccid.tool.control import MAX_ENTRIES, ControlError, decode_reply, encode_request
    from usbccid.tool.control_server import request

    entries = list(args.digits)
    if len(entries) > MAX_ENTRIES:
        raise UsageError(f"at most {MAX_ENTRIES} --digits (current, new, new again)")
    for digits in entries:
        if not (digits.isascii() and digits.isdigit()):
            raise UsageError("--digits takes the digits 0-9 only")
    if not entries and not args.cancel:
        raise UsageError("give --digits DIGITS (then OK), or --cancel")
    payload = encode_request("pinpad", reader, slot, entries=entries, cancel=args.cancel)
    deadline = time.monotonic() + max(0.0, args.wait)
    while True:
        result = decode_reply(request(path, payload, timeout=args.timeout))
        if not isinstance(result, dict):
            raise ControlError("the server's reply is malformed")
        if result.get("waiting") or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    if args.json:
        _out(json.dumps(result, indent=2, sort_keys=True))
        return 0 if result.get("waiting") else EXIT_ERROR
    if not result.get("waiting"):
        raise ControlError(
            f"reader {reader} slot {slot}: no PIN entry waiting (waited {args.wait:g} s)"
        )
    ignored = result.get("ignored", 0)
    note = f" ({ignored} key{'s' * (ignored != 1)} ignored)" if ignored else ""
    typed = f"{result.get('accepted', 0)} digits typed{note}"
    _out(f"{reader} slot {slot}: {typed}: {result.get('state')}")
    nxt = result.get("next")
    if isinstance(nxt, dict):
        stage, entry, count = nxt.get("stage"), nxt.get("entry"), nxt.get("entries")
        _out(f"  now waiting for the {stage} (entry {entry} of {count})")
    return 0


# --------------------------------------------------------------------------- helpers


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _digits(value: str, option: str) -> str:
    if not (value.isdigit() and 4 <= len(value) <= 8):
        raise UsageError(f"{option} must be 4 to 8 digits")
    return value


def _key_sizes(text: str | None) -> list[int]:
    if not text:
        return []
    from usbccid.cards.provision import SUPPORTED_KEY_SIZES

    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise UsageError(f"--key-size: not a list of numbers: {text!r}") from None
    for bits in sizes:
        if bits not in SUPPORTED_KEY_SIZES:
            supported = ", ".join(map(str, SUPPORTED_KEY_SIZES))
            raise UsageError(f"--key-size: {bits}-bit RSA keys are not supported (use {supported})")
    return sizes


def _key_types(text: str | None) -> list[str]:
    from usbccid.cards.provision import DEFAULT_PIV_KEY_TYPE, PIV_KEY_TYPES

    types = [t.strip().lower() for t in (text or DEFAULT_PIV_KEY_TYPE).split(",")]
    for key_type in types:
        if key_type not in PIV_KEY_TYPES:
            raise UsageError(f"--key-type: {key_type!r} is not one of {', '.join(PIV_KEY_TYPES)}")
    return types


def _subject(text: str) -> x509.Name:
    try:
        return x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise UsageError(f"--subject: not an RFC 4514 name ({exc})") from None


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


def _passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_file:
        data = _read_file(args.passphrase_file).decode("utf-8", "replace")
        return data.rstrip("\r\n")
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise UsageError(f"environment variable {args.passphrase_env} is not set")
        return value
    if args.ask_passphrase:
        return getpass.getpass("passphrase: ")
    return None


def _card_json(card: object, directory: Path, state: object) -> dict[str, object]:
    from cryptography.hazmat.primitives import hashes

    from usbccid.cac.profile import PinState
    from usbccid.cards.generate import ProvisionedCard
    from usbccid.piv.keys import algorithm_of
    from usbccid.piv.profile import slot_name

    assert isinstance(card, ProvisionedCard)
    profile = card.profile
    policy = profile.pin_policy
    unblock = state.unblock_code if isinstance(state, PinState) else None
    out: dict[str, object] = {
        "directory": str(directory),
        "card_id": profile.card_id.hex(),
        "edges": card.edges,
        "pin": (state.pin if isinstance(state, PinState) else policy.pin).decode(
            "ascii", "replace"
        ),
        "unblock_code": (policy.unblock_code if unblock is None else unblock).decode(
            "ascii", "replace"
        ),
        "max_tries": policy.max_tries,
        "max_unblock_tries": policy.max_unblock_tries,
        "tries_left": state.tries_left if isinstance(state, PinState) else policy.max_tries,
        "unblock_tries_left": state.unblock_tries_left
        if isinstance(state, PinState)
        else policy.max_unblock_tries,
        "containers": [
            {
                "label": c.label,
                "subject": c.certificate.subject.rfc4514_string(),
                "issuer": c.certificate.issuer.rfc4514_string(),
                "key_size": c.private_key.key_size,
                "not_before": c.certificate.not_valid_before_utc.isoformat(),
                "not_after": c.certificate.not_valid_after_utc.isoformat(),
                "sha256": c.certificate.fingerprint(hashes.SHA256()).hex(),
            }
            for c in profile.containers
        ],
    }
    if card.piv_slots:
        out["piv_keys"] = [
            {
                "slot": slot_name(s.ref),
                "name": s.name,
                "algorithm": algorithm_of(s.private_key).name,
                "subject": s.certificate.subject.rfc4514_string(),
                "issuer": s.certificate.issuer.rfc4514_string(),
                "not_before": s.certificate.not_valid_before_utc.isoformat(),
                "not_after": s.certificate.not_valid_after_utc.isoformat(),
                "sha256": s.certificate.fingerprint(hashes.SHA256()).hex(),
            }
            for s in card.piv_slots
        ]
    ca = directory / "ca.pem"
    if ca.exists():
        out["ca_certificate"] = str(ca)
    return out


def _print_card(card: object, directory: Path, state: object) -> None:
    info = _card_json(card, directory, state)
    _out(f"  card id: {info['card_id']}")
    if info["edges"] != "cac":
        _out(f"  edges: {info['edges']}")
    puk = "PUK" if info["edges"] != "cac" else "unblock code"
    _out(
        f"  PIN: {info['pin']} ({info['tries_left']} of {info['max_tries']} tries left)  "
        f"{puk}: {info['unblock_code']} "
        f"({info['unblock_tries_left']} of {info['max_unblock_tries']} tries left)"
    )
    containers = info["containers"]
    assert isinstance(containers, list)
    for i, c in enumerate(containers):
        _out(f"  container {i}: {c['label']}, RSA {c['key_size']}")
        _out(f"    subject: {c['subject']}")
        _out(f"    issuer:  {c['issuer']}")
        _out(f"    valid:   {c['not_before']} to {c['not_after']}")
        _out(f"    sha256:  {c['sha256']}")
    keys = info.get("piv_keys", [])
    assert isinstance(keys, list)
    for k in keys:
        _out(f"  PIV key {k['slot'].upper()}: {k['name']}, {k['algorithm']}")
        _out(f"    subject: {k['subject']}")
        _out(f"    valid:   {k['not_before']} to {k['not_after']}")
        _out(f"    sha256:  {k['sha256']}")
    if "ca_certificate" in info:
        _out(f"  test CA certificate (trust it on the host): {info['ca_certificate']}")


_COMMANDS = {
    ("serve", None): cmd_serve,
    ("card", "new"): cmd_card_new,
    ("card", "show"): cmd_card_show,
    ("card", "list"): cmd_card_list,
    ("ctl", None): cmd_ctl,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args, logging.INFO if args.command == "serve" else logging.WARNING)
    handler = _COMMANDS[(args.command, getattr(args, "card_command", None))]
    try:
        return handler(args)
    except UsbccidError as exc:
        log.debug("error", exc_info=True)
        _err(f"{PROG}: error: {exc}")
        return EXIT_ERROR
    except OSError as exc:
        log.debug("error", exc_info=True)
        where = f" {exc.filename}" if exc.filename else ""
        _err(f"{PROG}: error:{where} {exc.strerror or exc}")
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
