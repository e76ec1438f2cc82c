"""usbccid against QEMU's own reader (usb-ccid + libcacard), side by side in one guest.

Usage (as root, from the repository; ~2 min with a cached guest image)::

    .venv/bin/python scripts/bench_vm.py [--reps 5] [--selects 200] [--reads 200] [--sigs 20]
                                         [--identity vmware] [--keep]

One Debian 12 guest (tests/vm/guest.py, TCG) boots with QEMU's reference reader attached
(``-usb -device usb-ccid -device ccid-card-emulated,backend=certificates,...``: UHCI,
libcacard over an NSS database made here with ``certutil``/``pk12util`` from
libnss3-tools, installed with apt-get if missing), and the guest also attaches our reader
over USB/IP from a ``usbccid serve`` this script starts on the host (``usbccid card new
--cert/--key``, ``serve --port 0``, as tests/vm/test_opensc.py does). Both cards hold the
SAME three RSA-2048 keys and certificates (generated here) and the same PIN (for
libcacard, the NSS database password), so both move the same bytes through the same
client code; only the reader + card differ.

Each run is one Python process in the guest that holds both readers (picked by their
pcscd names) and runs every workload on both, alternating in blocks (``--block`` commands,
``--sig-block`` signatures; the first reader alternates too), so that both see the same
load on this shared machine:

* SELECT: N x SELECT of the CCC (``00 A4 04 00 07 A0 00 00 01 16 DB 00``) through
  pyscard, plus GET RESPONSE whenever the card answers ``61 xx`` (both do, T=0);
* READ BUFFER: N x 240 bytes of the first PKI applet's V buffer (the certificate;
  ``00 52 HI LO 02 02 F0``, as OpenSC reads it), cycling over the buffer, + GET RESPONSE;
* C_Sign: M x CKM_SHA256_RSA_PKCS with key 0001 (RSA-2048) through PyKCS11 and OpenSC's
  PKCS#11 module, one session per card, after one C_Login with the PIN (timed too); one
  signature per card is checked against the certificate read from it.

A third reader (``--passthru``, the default) is our card inside QEMU's own usb-ccid
device: a second ``-device usb-ccid`` holding ``-device ccid-card-passthru`` whose chardev
connects to a VSCard reader (``frontend = "vscard"``) of the same ``usbccid serve``, with
the same card. Against the reference it is the same reader code in QEMU (usb-ccid, UHCI)
and only the card differs (ours over VSCard vs libcacard in QEMU); it runs in the same
interleaved blocks and gets its own table.

The table shows the median over ``--reps`` runs of each figure, the speed-up (ours /
reference for rates, reference / ours for times: > 1 means we are faster) of the medians,
and the median and range of the per-run speed-ups. Also timed, from the guest: plugging
the reader in until its card is in pcscd: ours with ``usbip attach`` (after ``usbip
detach``), QEMU's with QMP ``device_add`` (after ``device_del``; QMP listens on the host's
loopback, which the guest reaches as 10.0.2.2), alternately; and QEMU start -> the
reference card in pcscd at boot (includes the guest's boot: no ratio).

QEMU 7.2's ccid-card-emulated has a lost-wakeup race that hangs the reference reader
under load (see :class:`FifoGuard`): this script puts that thread on SCHED_FIFO
(``--no-fifo`` to see the hang), and, to keep it even, our server's threads too
(``--no-fifo-ours``: not; then the reference is favoured when the machine is busy).

The machine has two cores shared with other guests: absolute figures vary from run to
run; only the ratios within one run mean something.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import shlex
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import NameOID

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.vm.guest import HOST, Guest, Result, build_image, cached_image  # noqa: E402

PIN = "12345678"
P12_PASSWORD = "usbccid-bench"
CARD = "bench"
PASSTHRU_CARD = "benchpt"
NICKNAMES = ("cert1", "cert2", "cert3")
#: QEMU packs "db=..., cert1..3" into 200 bytes (ccid-card-emulated): keep the path short.
MAX_DB_PATH = 100
#: pcscd names QEMU's usb-ccid readers "Gemalto ... 433-Swap [CCID Interface] (SERIAL) ..":
#: the reference's and our passthru reader's serial numbers tell them apart.
REFERENCE_SERIAL, PASSTHRU_SERIAL = "REFERENCE", "PASSTHRU"
REFERENCE_PART = f"[CCID Interface] ({REFERENCE_SERIAL})"
PASSTHRU_PART = f"[CCID Interface] ({PASSTHRU_SERIAL})"

# -- the guest side -----------------------------------------------------------------------

#: Run with the guest's python3 (pyscard, PyKCS11, cryptography from Debian):
#: ``python3 bench.py JSON`` (readers: label -> pcscd name, selects, reads, sigs, block,
#: sig_block, pin); prints ``@@json={label: figures}``. Both readers in one process, in
#: alternating blocks, so that both see the same load on the machine.
GUEST_SCRIPT = r'''
import hashlib
import json
import sys
import time

import PyKCS11
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding
from smartcard.System import readers

OPENSC = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
SELECT_CCC = bytes.fromhex("00a4040007a000000116db00")
SELECT_PKI0 = bytes.fromhex("00a4040007a0000000790100")
GET_RESPONSE = bytes.fromhex("00c00000")

cfg = json.loads(sys.argv[1])
names = cfg["readers"]  # label -> pcscd reader name
labels = list(names)
pin = cfg["pin"]
out = {label: {} for label in labels}
exchanges = dict.fromkeys(labels, 0)


def interleave(what, n, block, step):
    """n operations per reader in blocks, alternating which reader goes first; the time
    and APDU exchanges of each reader's blocks add up to its figures."""
    spent = dict.fromkeys(labels, 0.0)
    start = dict(exchanges)
    done = 0
    rnd = 0
    while done < n:
        k = min(block, n - done)
        for label in labels if rnd % 2 == 0 else labels[::-1]:
            t0 = time.perf_counter()
            for _ in range(k):
                step(label)
            spent[label] += time.perf_counter() - t0
        done += k
        rnd += 1
    for label in labels:
        out[label][what + "_s"] = spent[label]
        out[label][what + "_xchg"] = exchanges[label] - start[label]


conns = {}
for r in readers():
    for label, name in names.items():
        if str(r) == name:
            conns[label] = r.createConnection()
            conns[label].connect()
missing = set(labels) - set(conns)
if missing:
    raise SystemExit("readers not found: %s in %s" % (missing, readers()))


def xfer(label, apdu):
    exchanges[label] += 1
    data, sw1, sw2 = conns[label].transmit(list(apdu))
    return bytes(data), sw1 << 8 | sw2


def command(label, apdu):
    """One command as a client sends it: resend on 6C xx, GET RESPONSE while 61 xx."""
    data, sw = xfer(label, apdu)
    if sw >> 8 == 0x6C:
        data, sw = xfer(label, apdu + bytes([sw & 0xFF]))  # case 1 or 3 APDUs only
    while sw >> 8 == 0x61:
        more, sw = xfer(label, GET_RESPONSE + bytes([sw & 0xFF]))
        data += more
    if sw != 0x9000:
        raise SystemExit("%s: %s answered %04x" % (names[label], apdu.hex(), sw))
    return data


for label, conn in conns.items():
    out[label]["atr"] = bytes(conn.getATR()).hex()
    out[label]["protocol"] = {1: "T=0", 2: "T=1"}.get(conn.getProtocol(), conn.getProtocol())
    command(label, SELECT_CCC)

# SELECT of the CCC.
interleave("select", cfg["selects"], cfg["block"], lambda label: command(label, SELECT_CCC))

# READ BUFFER, 240 bytes at a time, over the first PKI applet's V buffer (certificate).
state = {}
for label in labels:
    command(label, SELECT_PKI0)
    size = int.from_bytes(command(label, bytes.fromhex("00520000020202")), "little")
    state[label] = [2, size + 2, 0]  # offset, file size, bytes read
    out[label]["v_buffer"] = size


def read(label):
    st = state[label]
    count = min(240, st[1] - st[0])
    st[2] += len(command(label, bytes([0, 0x52, st[0] >> 8, st[0] & 0xFF, 2, 2, count])))
    st[0] = st[0] + count if st[0] + count < st[1] else 2


interleave("read", cfg["reads"], cfg["block"], read)
for label in labels:
    out[label]["read_bytes"] = state[label][2]
    conns[label].disconnect()

# RSA-2048 signatures, one PKCS#11 session per card (OpenSC), after one C_Login each.
if cfg["sigs"]:
    lib = PyKCS11.PyKCS11Lib()
    lib.load(OPENSC)
    sessions = {}
    # CK_SLOT_INFO.slotDescription is the reader name; OpenSC cuts it to 61 + "...", which
    # leaves QEMU's two usb-ccid readers ("Gemalto ... 433-Swap [CCID Interface] (SERIAL)")
    # alike: each reader, in pcscd's order (which OpenSC's slots follow), takes the first
    # unused slot that matches it.
    slots = [(s, lib.getSlotInfo(s).slotDescription.strip())
             for s in lib.getSlotList(tokenPresent=True)]
    label_of = {name: label for label, name in names.items()}
    used = set()
    for name in [str(r) for r in readers()]:
        if name not in label_of:
            continue
        for s, desc in slots:
            if s not in used and (desc == name or desc.endswith("...")
                                  and name.startswith(desc[:-3])):
                used.add(s)
                sessions[label_of[name]] = lib.openSession(s, PyKCS11.CKF_SERIAL_SESSION)
                out[label_of[name]]["token_serial"] = lib.getTokenInfo(s).serialNumber.strip()
                break
    if set(sessions) != set(labels):
        raise SystemExit("PKCS#11 slots: %r, readers: %r" % (slots, names))
    if len({out[label]["token_serial"] for label in labels}) != len(labels):
        raise SystemExit("two readers' tokens look alike: %r" % out)
    keys = {}
    mech = PyKCS11.Mechanism(PyKCS11.CKM_SHA256_RSA_PKCS, None)
    for label, session in sessions.items():
        t0 = time.perf_counter()
        session.login(pin)
        out[label]["login_s"] = time.perf_counter() - t0
        find = [(PyKCS11.CKA_ID, (0, 1))]
        keys[label] = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), *find])[0]
        cert = session.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_CERTIFICATE), *find])[0]
        der = bytes(session.getAttributeValue(cert, [PyKCS11.CKA_VALUE])[0])
        out[label]["cert_sha256"] = hashlib.sha256(der).hexdigest()
        # One signature, checked against the card's certificate.
        sig = bytes(session.sign(keys[label], b"usbccid bench", mech))
        x509.load_der_x509_certificate(der).public_key().verify(
            sig, b"usbccid bench", padding.PKCS1v15(), hashes.SHA256()
        )

    def sign(label):
        sessions[label].sign(keys[label], b"usbccid bench %f" % time.time(), mech)

    interleave("sign", cfg["sigs"], cfg["sig_block"], sign)
    for session in sessions.values():
        session.logout()
        session.closeSession()
print("@@json=" + json.dumps(out))
'''

#: ``python3 wait.py NAME_PART TIMEOUT [T0]``: seconds from T0 (a ``date +%s.%N``; default:
#: now) until a reader whose name contains NAME_PART has a card in pcscd (polling every
#: 20 ms); prints ``@@ready=SECONDS`` and ``@@name=READER``.
GUEST_WAIT = r"""
import sys
import time

from smartcard.scard import (
    SCARD_S_SUCCESS, SCARD_SCOPE_USER, SCARD_STATE_PRESENT, SCARD_STATE_UNAWARE,
    SCardEstablishContext, SCardGetStatusChange, SCardListReaders, SCardReleaseContext,
)

part, limit = sys.argv[1], float(sys.argv[2])
t0 = float(sys.argv[3]) if len(sys.argv) > 3 else time.time()
while time.time() - t0 < limit:
    rv, ctx = SCardEstablishContext(SCARD_SCOPE_USER)
    if rv == SCARD_S_SUCCESS:
        rv, names = SCardListReaders(ctx, [])
        for n in names if rv == SCARD_S_SUCCESS else []:
            if part in n:
                rv, states = SCardGetStatusChange(ctx, 0, [(n, SCARD_STATE_UNAWARE)])
                if rv == SCARD_S_SUCCESS and states[0][1] & SCARD_STATE_PRESENT:
                    print("@@ready=%.3f" % (time.time() - t0))
                    print("@@name=" + n)
                    sys.exit(0)
        SCardReleaseContext(ctx)
    time.sleep(0.02)
sys.exit(1)
"""

#: ``python3 replug.py QMP_PORT DEVICES_JSON NAME_PART``: unplug QEMU's reader (QMP ``device_del
#: ccid0`` over TCP to the host, wait for DEVICE_DELETED and for pcscd to drop it), then
#: plug it in again (``device_add`` of each device in DEVICES_JSON); prints ``@@t0=`` (the
#: time just before the first device_add) for wait.py.
GUEST_REPLUG = r"""
import json
import socket
import sys
import time

from smartcard.System import readers

port, devices, part = int(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
sock = socket.create_connection(("10.0.2.2", port), timeout=60)
stream = sock.makefile("rwb")


def send(cmd, **arguments):
    stream.write(json.dumps({"execute": cmd, "arguments": arguments}).encode() + b"\n")
    stream.flush()


def until(pred):
    while True:
        msg = json.loads(stream.readline())
        if "error" in msg:
            raise SystemExit("QMP: %s" % msg)
        if pred(msg):
            return msg


until(lambda m: "QMP" in m)
send("qmp_capabilities")
until(lambda m: "return" in m)
send("device_del", id="ccid0")
until(lambda m: "return" in m)
until(lambda m: m.get("event") == "DEVICE_DELETED" and m["data"].get("device") == "ccid0")
end = time.time() + 60
while any(part in str(r) for r in readers()):
    if time.time() > end:
        raise SystemExit("pcscd still lists QEMU's reader")
    time.sleep(0.1)
time.sleep(1)
print("@@t0=%.6f" % time.time())
for dev in devices:
    send("device_add", **dev)
    until(lambda m: "return" in m)
"""


# -- the host side ------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def values(r: Result) -> dict[str, str]:
    return dict(re.findall(r"^@@([\w.-]+)=(.*)$", r.stdout, re.MULTILINE))


def make_keys(folder: Path) -> list[tuple[Path, Path, Path]]:
    """Three RSA-2048 keys and self-signed certificates: (cert.pem, key.pem, .p12) each."""
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    files = []
    for i, nick in enumerate(NICKNAMES, 1):
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"BENCH.VM.{i}")])
        usage = x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=True,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(start + datetime.timedelta(days=365))
            .add_extension(usage, critical=True)
            .sign(key, hashes.SHA256())
        )
        pem, kpem, p12 = folder / f"c{i}.pem", folder / f"k{i}.pem", folder / f"c{i}.p12"
        pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        kpem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        kpem.chmod(0o600)
        p12.write_bytes(
            pkcs12.serialize_key_and_certificates(
                nick.encode(),
                key,
                cert,
                None,
                serialization.BestAvailableEncryption(P12_PASSWORD.encode()),
            )
        )
        files.append((pem, kpem, p12))
    return files


def ensure_certutil() -> None:
    if shutil.which("certutil") and shutil.which("pk12util"):
        return
    log("certutil/pk12util missing: apt-get install libnss3-tools")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(
        ["apt-get", "install", "-y", "--no-install-recommends", "libnss3-tools"],
        check=True,
        env=env,
        stdout=subprocess.DEVNULL,
    )


def make_nss_db(folder: Path, keys: list[tuple[Path, Path, Path]]) -> Path:
    """The NSS database libcacard reads: the three keys + certificates, password = PIN."""
    ensure_certutil()
    db = folder / "nss"
    db.mkdir()
    pw, p12pw = folder / "nss.pw", folder / "p12.pw"
    pw.write_text(PIN + "\n")
    p12pw.write_text(P12_PASSWORD + "\n")
    subprocess.run(
        ["certutil", "-N", "-d", f"sql:{db}", "-f", str(pw)], check=True, capture_output=True
    )
    for _pem, _key, p12 in keys:
        subprocess.run(
            ["pk12util", "-i", str(p12), "-d", f"sql:{db}", "-k", str(pw), "-w", str(p12pw)],
            check=True,
            capture_output=True,
        )
    listing = subprocess.run(
        ["certutil", "-K", "-d", f"sql:{db}", "-f", str(pw)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    for nick in NICKNAMES:
        if nick not in listing:
            raise SystemExit(f"NSS database {db}: no key for {nick}:\n{listing}")
    return db


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def usbccid_cli() -> list[str]:
    exe = Path(sys.executable).with_name("usbccid")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "usbccid"]


@contextlib.contextmanager
def usbccid_serve(
    folder: Path,
    keys: list[tuple[Path, Path, Path]],
    identity: str,
    passthru: bool,
    pcap: Path | None = None,
) -> Iterator[tuple[int, int, int | None]]:
    """``usbccid card new`` with the keys, then ``usbccid serve --port 0`` (capturing the
    USB/IP reader's traffic to ``pcap``); yield its port, PID, and (``passthru``) the port
    of its VSCard reader for QEMU's ccid-card-passthru."""
    cli = usbccid_cli()
    state = folder / "state"
    # The passthru reader gets its own stored card with the same keys and certificates
    # and another card ID (the PKCS#11 token serial), so that the guest can tell the
    # tokens apart (and checks that it did).
    for name in (CARD, PASSTHRU_CARD) if passthru else (CARD,):
        args = [*cli, "card", "new", "--state-dir", str(state), "--name", name, "--pin", PIN]
        for pem, key, _p12 in keys:
            args += ["--cert", str(pem), "--key", str(key)]
        subprocess.run([*args, "-q"], check=True, capture_output=True, timeout=300)
    config = folder / "usbccid.toml"
    config.write_text(
        "\n".join(
            [
                "[server]",
                'host = "127.0.0.1"',
                "port = 0",
                "[[reader]]",
                f'name = "{CARD}"',
                f'identity = "{identity}"',
                "  [[reader.slot]]",
                f'  card = "{CARD}"',
                "",
                *(
                    [
                        "[[reader]]",
                        'name = "passthru"',
                        'frontend = "vscard"',
                        'vscard = { listen = "127.0.0.1:0" }',
                        "  [[reader.slot]]",
                        f'  card = "{PASSTHRU_CARD}"',
                        "",
                    ]
                    if passthru
                    else []
                ),
            ]
        )
    )
    log_file = folder / "serve.log"
    with open(log_file, "wb") as out:
        proc = subprocess.Popen(
            [
                *cli,
                "serve",
                "--state-dir",
                str(state),
                "--config",
                str(config),
                *(["--pcap", str(pcap)] if pcap is not None else []),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        while "control socket:" not in log_file.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"usbccid serve exited:\n{log_file.read_text()}")
            if time.monotonic() > deadline:
                raise SystemExit(f"usbccid serve not ready:\n{log_file.read_text()}")
            time.sleep(0.1)
        text = log_file.read_text()
        m = re.search(r"listening on 127\.0\.0\.1:(\d+)", text)
        if m is None:
            raise SystemExit(f"no port in usbccid serve's output:\n{text}")
        vscard = re.search(r"^reader passthru: vscard 127\.0\.0\.1:(\d+)$", text, re.MULTILINE)
        if passthru and vscard is None:
            raise SystemExit(f"no VSCard port in usbccid serve's output:\n{text}")
        yield int(m.group(1)), proc.pid, int(vscard.group(1)) if vscard else None
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# The server's capture (usbccid serve --pcap): pcap records of Linux usbmon packets
# (Documentation/usb/usbmon.rst, binary API), each URB a submission "S" when the server
# read it and a completion "C" when it wrote the answer, stamped by the server's clock.
_PCAP_HEADER = struct.Struct("<IHHiIII")
_PCAP_RECORD = struct.Struct("<IIII")
_USBMON = struct.Struct("<QBBBBHbbqiiII8siiII")
_BULK = 3  # usbmon's xfer_type of bulk transfers
_BULK_OUT, _BULK_IN = 0x01, 0x82  # our reader's endpoints (CCID bulk OUT, bulk IN)
#: an exchange's middle records and how many of its records come before each
_MIDDLE_STEPS = {(_BULK_OUT, ord("C")): 1, (_BULK_IN, ord("S")): 2}


@dataclass
class Split:
    """Where one APDU exchange's time goes, from the server's capture (medians, µs)."""

    exchanges: int
    server_us: float  # bulk OUT read -> its completion written, + bulk IN read -> answer
    guest_us: float  # OUT completion -> the IN's submission, + answer -> next OUT
    server_total_s: float  # every exchange's server time added up
    guest_total_s: float  # the same for the in-exchange guest time (OUT done -> IN read)


def exchange_split(pcap: Path) -> Split | None:
    """One exchange, as libccid makes it (a bulk OUT of PC_to_RDR_XfrBlock, then a bulk
    IN for the answer), split into the server's time and the guest's from the capture's
    timestamps. The guest's time includes the network (TCP over QEMU's user network) and
    everything the guest does: vhci-hcd, libusb, libccid, pcscd, pyscard or OpenSC. The
    gap after an answer is counted only to the median (it also holds the idle time while
    the other reader runs its block)."""
    data = pcap.read_bytes()
    at = _PCAP_HEADER.size
    state: dict[tuple[int, int], list[float]] = {}  # device -> [t_out_s, t_out_c, t_in_s]
    last_answer: dict[tuple[int, int], float] = {}
    server: list[float] = []
    between: list[float] = []
    after: list[float] = []
    while at + _PCAP_RECORD.size <= len(data):
        _, _, captured, _ = _PCAP_RECORD.unpack_from(data, at)
        at += _PCAP_RECORD.size
        record = data[at : at + captured]
        at += captured
        if len(record) < _USBMON.size:
            continue
        fields = _USBMON.unpack_from(record)
        _, kind, xfer, ep, devnum, busnum = fields[:6]
        sec, usec = fields[8], fields[9]
        if xfer != _BULK:
            continue
        t = sec + usec / 1e6
        device = (busnum, devnum)
        steps = state.setdefault(device, [])
        if (ep, kind) == (_BULK_OUT, ord("S")):
            if device in last_answer:
                after.append(t - last_answer.pop(device))
            steps[:] = [t]
        elif _MIDDLE_STEPS.get((ep, kind)) == len(steps):
            steps.append(t)
        elif (ep, kind) == (_BULK_IN, ord("C")) and len(steps) == 3:
            out_s, out_c, in_s = steps
            server.append((out_c - out_s) + (t - in_s))
            between.append(in_s - out_c)
            last_answer[device] = t
            steps.clear()
    if not server or not after:
        return None
    return Split(
        exchanges=len(server),
        server_us=median(server) * 1e6,
        guest_us=(median(between) + median(after)) * 1e6,
        server_total_s=sum(server),
        guest_total_s=sum(between),
    )


@dataclass
class Reader:
    label: str  # "ours" / "reference"
    name: str  # pcscd's reader name


@dataclass
class Sample:
    select_rate: float  # SELECTs/s
    select_xchg_rate: float  # APDU exchanges/s
    read_rate: float
    read_xchg_rate: float
    read_kib_s: float
    sign_rate: float
    login_s: float
    select_xchg: int
    read_xchg: int
    protocol: str
    atr: str
    cert_sha256: str
    v_buffer: int
    total_s: float  # the time of all three workloads on this reader


def run_workloads(
    guest: Guest, script: str, readers: list[Reader], args: argparse.Namespace
) -> dict[str, Sample]:
    """One guest process runs every workload on all ``readers``, interleaved."""
    cfg = {
        "readers": {r.label: r.name for r in readers},
        "selects": args.selects,
        "reads": args.reads,
        "sigs": args.sigs,
        "block": args.block,
        "sig_block": args.sig_block,
        "pin": PIN,
    }
    r = guest.run(f"python3 {script} {shlex.quote(json.dumps(cfg))}", timeout=args.timeout)
    v = values(r)
    if not r.ok or "json" not in v:
        raise SystemExit(f"the workloads failed:\n{r}\n{diagnose(guest)}")
    samples = {}
    for label, d in json.loads(v["json"]).items():
        samples[label] = Sample(
            select_rate=args.selects / d["select_s"],
            select_xchg_rate=d["select_xchg"] / d["select_s"],
            read_rate=args.reads / d["read_s"],
            read_xchg_rate=d["read_xchg"] / d["read_s"],
            read_kib_s=d["read_bytes"] / 1024 / d["read_s"],
            sign_rate=args.sigs / d["sign_s"] if args.sigs else float("nan"),
            login_s=d.get("login_s", float("nan")),
            select_xchg=d["select_xchg"],
            read_xchg=d["read_xchg"],
            protocol=str(d["protocol"]),
            atr=d["atr"],
            cert_sha256=d.get("cert_sha256", ""),
            v_buffer=d["v_buffer"],
            total_s=d["select_s"] + d["read_s"] + d.get("sign_s", 0.0),
        )
    return samples


def qemu_pid(guest: Guest) -> int | None:
    """The PID of this guest's QEMU (the process whose command line names its console log)."""
    needle = str(guest.console_log).encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if needle in (entry / "cmdline").read_bytes():
                    return int(entry.name)
    return None


class FifoGuard:
    """Keep threads of a process (those named ``comm``, or all) on SCHED_FIFO priority 1
    while the benchmark runs; a watcher catches threads created later (device_add, thread
    pools).

    Why: QEMU 7.2's ccid-card-emulated has a lost-wakeup race (below) that the reference
    needs this for; ``--fifo-ours`` (the default) gives our server's threads the same
    treatment so that neither card emulation waits for the CPU behind other processes.

    QEMU 7.2's ccid-card-emulated (hw/usb/ccid-card-emulated.c ``handle_apdu_thread``)
    waits on its condition variable without a predicate: it pushes the answer to the
    guest, leaves ``vreader_mutex``, then takes ``handle_apdu_mutex`` and waits. If the
    guest's next APDU is signalled in between, the wakeup is lost and the reader hangs
    until libccid gives up (~4 min, then SCARD_E_NOT_TRANSACTED / CKR_GENERAL_ERROR).
    That takes a preemption of the thread at the wrong moment: on our shared 2-core
    machine it hung 4 times out of 4, each time by the second process of 20 signatures
    (also with QEMU's reader alone in the guest). Real-time priority for that thread (it
    sleeps between APDUs) closes the window: 10 of 10 such processes passed, and every
    benchmark run since. Alone, it favours the reference (its RSA, in that thread, is never
    preempted); hence the same for our server unless ``--no-fifo-ours``.
    """

    def __init__(self, pid: int, comm: str | None = None) -> None:
        self.pid = pid
        self.comm = comm
        self.done: set[int] = set()
        self.initial: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def apply(self) -> int:
        count = 0
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{self.pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    tid = int(task.name)
                    if tid in self.done:
                        continue
                    if self.comm and (task / "comm").read_text().strip() != self.comm:
                        continue
                    os.sched_setscheduler(tid, os.SCHED_FIFO, os.sched_param(1))
                    self.done.add(tid)
                    count += 1
        return count

    def _watch(self) -> None:
        while not self._stop.wait(0.05):
            self.apply()

    def __enter__(self) -> FifoGuard:
        self.initial = sorted(self.done) if self.apply() else []
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def diagnose(guest: Guest) -> str:
    """The guest's pcscd log and kernel messages, and QEMU's log (for a failure report)."""
    try:
        r = guest.run("tail -n 40 /tmp/pcscd.log; dmesg | tail -n 30; usbip port", timeout=60)
        text = f"--- guest: pcscd.log, dmesg, usbip port ---\n{r.stdout}{r.stderr}"
    except Exception as e:  # the guest may be gone
        text = f"--- guest unreachable: {e}"
    with contextlib.suppress(OSError):
        text += f"\n--- qemu.log ---\n{guest.qemu_log.read_text(errors='replace')[-3000:]}"
    return text


def attach_ours(guest: Guest, port: int, wait: str, timeout: float) -> tuple[float, str]:
    """Attach our reader; return (seconds from ``usbip attach`` to card in pcscd, name)."""
    r = guest.run(
        "t0=$(date +%s.%N)\n"
        f"usbip --tcp-port {port} attach -r {HOST} -b 1-1 >/dev/null || exit 90\n"
        f'python3 {wait} usbccid {timeout} "$t0"',
        timeout=timeout + 30,
    )
    v = values(r)
    if not r.ok or "ready" not in v:
        raise SystemExit(f"attaching our reader failed:\n{r}")
    return float(v["ready"]), v["name"]


def replug_reference(
    guest: Guest, qmp_port: int, devices: list[dict[str, str]], wait: str, replug: str
) -> tuple[float, str]:
    """device_del + device_add QEMU's reader from the guest; return (seconds from
    device_add to card in pcscd, reader name)."""
    part = shlex.quote(REFERENCE_PART)
    r = guest.run(
        f"python3 {replug} {qmp_port} {shlex.quote(json.dumps(devices))} {part} "
        ">/tmp/replug.out || { cat /tmp/replug.out; exit 90; }\n"
        "cat /tmp/replug.out\n"
        f"t0=$(sed -n 's/^@@t0=//p' /tmp/replug.out)\n"
        f'python3 {wait} {part} 120 "$t0"',
        timeout=240,
    )
    v = values(r)
    if not r.ok or "ready" not in v:
        raise SystemExit(f"re-plugging QEMU's reader failed:\n{r}\n{diagnose(guest)}")
    return float(v["ready"]), v["name"]


def detach_ours(guest: Guest) -> None:
    r = guest.run("usbip-detach-all && sleep 1", timeout=60)
    if not r.ok:
        raise SystemExit(f"detaching failed:\n{r}")


def median(xs: list[float]) -> float:
    return statistics.median(xs)


@dataclass
class Row:
    what: str
    ours: list[float]  # one figure per run
    ref: list[float]
    unit: str
    lower_is_better: bool = False  # times: the ratio column is then ref / ours
    digits: int = 1


def table(rows: list[Row]) -> str:
    """A Markdown table: medians, their ratio, and the median (range) of per-run ratios.

    Ratios are ours / reference for rates and reference / ours for times: > 1 is always
    "ours is faster"."""
    lines = [
        "| workload | ours | reference | speed-up, medians | per run: median (min–max) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        ours, ref = median(r.ours), median(r.ref)
        ratios = [a / b for a, b in zip(r.ours, r.ref, strict=True)]
        if r.lower_is_better:
            ours, ref = ref, ours  # for the ratio only
            ratios = [1 / x for x in ratios]
        lines.append(
            f"| {r.what} | {median(r.ours):.{r.digits}f} {r.unit} | "
            f"{median(r.ref):.{r.digits}f} {r.unit} | {ours / ref:.2f} | "
            f"{median(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f}) |"
        )
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--selects", type=int, default=200, help="SELECTs of the CCC per run")
    ap.add_argument("--reads", type=int, default=200, help="240-byte READ BUFFERs per run")
    ap.add_argument("--sigs", type=int, default=20, help="RSA-2048 signatures per run")
    ap.add_argument("--reps", type=int, default=5, help="runs (medians shown)")
    ap.add_argument("--block", type=int, default=20, help="commands per interleaved block")
    ap.add_argument("--sig-block", type=int, default=2, help="signatures per interleaved block")
    ap.add_argument("--attaches", type=int, default=3, help="plug-in timings per reader")
    ap.add_argument(
        "--identity", default="vmware", help="our reader's identity preset (vmware, qemu, ...)"
    )
    ap.add_argument("--timeout", type=float, default=300.0, help="per guest run, seconds")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    ap.add_argument(
        "--no-replug", action="store_true", help="do not time re-plugging QEMU's reader"
    )
    ap.add_argument(
        "--passthru",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run our card through QEMU's usb-ccid + ccid-card-passthru (VSCard)",
    )
    ap.add_argument(
        "--no-fifo",
        action="store_true",
        help="leave QEMU's ccid/apdu thread at normal priority (shows QEMU's lost-wakeup hang)",
    )
    ap.add_argument(
        "--fifo-ours",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="put usbccid serve's threads on SCHED_FIFO too, like QEMU's ccid/apdu thread",
    )
    args = ap.parse_args()
    if min(args.reps, args.attaches, args.block, args.sig_block) < 1:
        ap.error("--reps, --attaches, --block and --sig-block must be at least 1")

    image = cached_image() or build_image()
    # A short folder name: QEMU packs the NSS db path and the nicknames into 200 bytes.
    work = Path(tempfile.mkdtemp(prefix="ubv", dir="/tmp"))
    log(f"work folder {work}")
    try:
        keys = make_keys(work)
        db = make_nss_db(work, keys)
        if len(f"sql:{db}") > MAX_DB_PATH:
            raise SystemExit(f"NSS db path too long for QEMU: {db}")
        devices: list[dict[str, str]] = [
            {"driver": "usb-ccid", "id": "ccid0", "serial": REFERENCE_SERIAL},
            {
                "driver": "ccid-card-emulated",
                "bus": "ccid0.0",
                "backend": "certificates",
                "db": f"sql:{db}",
                **{f"cert{i}": n for i, n in enumerate(NICKNAMES, 1)},
            },
        ]
        qemu_args = ["-usb"]
        for dev in devices:
            qemu_args += ["-device", ",".join([dev["driver"]] + [
                f"{k}={v}" for k, v in dev.items() if k != "driver"
            ])]  # fmt: skip
        if not args.no_fifo:
            qemu_args += ["-name", "debug-threads=on"]  # names the thread "ccid/apdu"
        # QMP on the host's loopback; the guest reaches it at 10.0.2.2 to re-plug the reader.
        qmp_port = free_port()
        qemu_args += ["-qmp", f"tcp:127.0.0.1:{qmp_port},server=on,wait=off"]
        with contextlib.ExitStack() as stack:
            port, serve_pid, vscard_port = stack.enter_context(
                usbccid_serve(work, keys, args.identity, args.passthru, pcap=work / "ours.pcap")
            )
            if vscard_port is not None:
                # Our card in a second usb-ccid, as the serve banner says (+ serial, bus).
                qemu_args += [
                    "-chardev",
                    f"socket,id=vscb,host=127.0.0.1,port={vscard_port},reconnect=1,nodelay=on",
                    "-device", f"usb-ccid,id=ccidp,serial={PASSTHRU_SERIAL}",
                    "-device", "ccid-card-passthru,chardev=vscb,bus=ccidp.0",
                ]  # fmt: skip
            g = stack.enter_context(
                Guest(image, workdir=work / "vm", keep_workdir=True, extra_qemu_args=qemu_args)
            )
            log(f"guest booted in {g.boot_seconds:.1f} s; usbccid serve on port {port}")
            pid = qemu_pid(g)
            guard: FifoGuard | None = None
            if not args.no_fifo and pid is not None:
                guard = stack.enter_context(FifoGuard(pid, "ccid/apdu"))
                log(f"QEMU {pid}: ccid/apdu thread(s) {guard.initial} on SCHED_FIFO")
            elif not args.no_fifo:
                log("warning: QEMU's PID not found; the reference reader may hang")
            ours_guard: FifoGuard | None = None
            if args.fifo_ours:
                ours_guard = stack.enter_context(FifoGuard(serve_pid))
                log(f"usbccid serve {serve_pid}: threads {ours_guard.initial} on SCHED_FIFO")
            bench = g.put_file("bench.py", GUEST_SCRIPT)
            wait = g.put_file("wait.py", GUEST_WAIT)
            replug = g.put_file("replug.py", GUEST_REPLUG)
            # The reference reader: present since boot. QEMU start -> card in pcscd.
            assert g.boot_seconds is not None
            r = g.run(f"python3 {wait} {shlex.quote(REFERENCE_PART)} 120", timeout=150)
            v = values(r)
            if not r.ok or "name" not in v:
                raise SystemExit(f"QEMU's reader is not in pcscd:\n{r}\n{g.console_tail()}")
            ref_ready = g.boot_seconds + r.elapsed
            ref = Reader("reference", v["name"])
            log(f"reference reader: {ref.name!r} (QEMU start -> visible <= {ref_ready:.1f} s)")
            passthru: Reader | None = None
            if vscard_port is not None:
                r = g.run(f"python3 {wait} {shlex.quote(PASSTHRU_PART)} 120", timeout=150)
                v = values(r)
                if not r.ok or "name" not in v:
                    raise SystemExit(f"our passthru reader is not in pcscd:\n{r}")
                passthru = Reader("passthru", v["name"])
                log(f"passthru reader: {passthru.name!r} (VSCard, port {vscard_port})")

            # Plug-in time, alternating: ours (usbip attach; detach before the next one),
            # QEMU's (device_del, then device_add over QMP), both started from the guest.
            attach_s: list[float] = []
            replug_s: list[float] = []
            for i in range(args.attaches):
                secs, name = attach_ours(g, port, wait, 120)
                attach_s.append(secs)
                log(f"our reader: {name!r} (usbip attach -> card in pcscd {secs:.2f} s)")
                if i + 1 < args.attaches:
                    detach_ours(g)
                if not args.no_replug:
                    secs, ref.name = replug_reference(g, qmp_port, devices, wait, replug)
                    replug_s.append(secs)
                    log(f"reference re-plugged: {ref.name!r} (device_add -> card {secs:.2f} s)")
            ours = Reader("ours", name)

            samples: dict[str, list[Sample]] = {"ours": [], "reference": [], "passthru": []}
            serve_cpu: list[float] = []  # usbccid serve's CPU seconds in each run
            loads: list[float] = []  # the host's 1-minute load average after each run
            for rep in range(args.reps):
                # Within a run the readers alternate block by block; across runs the
                # first reader alternates too.
                order = [ref, ours] + ([passthru] if passthru is not None else [])
                if rep % 2:
                    order.reverse()
                cpu0 = cpu_seconds(serve_pid)
                got = run_workloads(g, bench, order, args)
                serve_cpu.append(cpu_seconds(serve_pid) - cpu0)
                loads.append(os.getloadavg()[0])
                for label, smp in got.items():
                    samples[label].append(smp)
                    log(
                        f"run {rep + 1} {label:>9}: {smp.select_rate:6.1f} SELECT/s, "
                        f"{smp.read_rate:6.1f} READ BUFFER/s, {smp.sign_rate:5.2f} sig/s"
                    )
            kernel = g.kernel_release
            if guard is not None:
                log(f"QEMU ccid/apdu threads put on SCHED_FIFO: {len(guard.done)}")
            if ours_guard is not None:
                log(f"usbccid serve threads put on SCHED_FIFO: {len(ours_guard.done)}")
        o, f, pt = samples["ours"], samples["reference"], samples["passthru"]

        def workload_rows(o: list[Sample], f: list[Sample]) -> list[Row]:
            def row(what: str, attr: str, unit: str) -> Row:
                return Row(what, [getattr(x, attr) for x in o], [getattr(x, attr) for x in f], unit)

            return [
                row(f"SELECT CCC x{args.selects} (pyscard)", "select_rate", "cmd/s"),
                row("  APDU exchanges", "select_xchg_rate", "xchg/s"),
                row(f"READ BUFFER 240 B x{args.reads} (pyscard)", "read_rate", "cmd/s"),
                row("  APDU exchanges", "read_xchg_rate", "xchg/s"),
                row("  payload", "read_kib_s", "KiB/s"),
                row(f"RSA-2048 C_Sign x{args.sigs} (PyKCS11 + OpenSC)", "sign_rate", "sig/s"),
                Row("C_Login (PIN)", [x.login_s * 1000 for x in o], [x.login_s * 1000 for x in f],
                    "ms", lower_is_better=True, digits=0),
            ]  # fmt: skip

        rows = workload_rows(o, f)
        print()
        print(
            f"usbccid ({args.identity} identity, USB/IP, vhci-hcd) vs QEMU 7.2 usb-ccid + "
            f"libcacard (UHCI); guest {kernel}, TCG; {args.reps} runs, readers interleaved "
            f"in blocks of {args.block} commands / {args.sig_block} signatures; SCHED_FIFO: "
            f"reference card thread {'no' if args.no_fifo else 'yes'}, usbccid serve "
            f"{'yes' if args.fifo_ours else 'no'}"
        )
        print(f"ours:      {ours.name}  ({o[0].protocol}, ATR {o[0].atr})")
        print(f"reference: {ref.name}  ({f[0].protocol}, ATR {f[0].atr})")
        print(
            f"APDU exchanges per command: SELECT {o[0].select_xchg / args.selects:.2f} (ours) / "
            f"{f[0].select_xchg / args.selects:.2f} (ref), READ BUFFER "
            f"{o[0].read_xchg / args.reads:.2f} / {f[0].read_xchg / args.reads:.2f}; "
            f"certificate V buffer {o[0].v_buffer} / {f[0].v_buffer} bytes"
        )
        if o[0].cert_sha256 != f[0].cert_sha256:
            print("WARNING: the two cards returned different certificates")
        print()
        if replug_s:
            rows.append(Row("plug-in -> card in pcscd (usbip attach / QMP device_add)",
                            attach_s, replug_s, "s", lower_is_better=True, digits=2))  # fmt: skip
        print(table(rows))
        print(
            f"\nplug-in -> card in pcscd: ours {median(attach_s):.2f} s (`usbip attach`, median of "
            f"{len(attach_s)}); reference "
            + (
                f"{median(replug_s):.2f} s (QMP device_add, median of {len(replug_s)}); "
                if replug_s
                else ""
            )
            + f"QEMU start -> reference card in pcscd {ref_ready:.1f} s (incl. guest boot)"
        )
        if passthru is not None and pt:
            print(
                "\nours through QEMU's usb-ccid + ccid-card-passthru (VSCard, "
                f"{passthru.name}) vs the reference (same usb-ccid code, libcacard card); "
                f"'ours' column = passthru ({pt[0].protocol}, ATR {pt[0].atr}; SELECT "
                f"{pt[0].select_xchg / args.selects:.2f} exchanges per command)"
            )
            if pt[0].cert_sha256 != f[0].cert_sha256:
                print("WARNING: the passthru card returned a different certificate")
            print(table(workload_rows(pt, f)))
        busy = [c / x.total_s for c, x in zip(serve_cpu, o, strict=True)]
        print(
            f"usbccid serve (host) CPU per run: median {median(serve_cpu):.2f} s (the USB/IP "
            f"reader{' and the passthru reader' if pt else ''}, and the capture), i.e. "
            f"{median(busy) * 100:.0f} % of the time our USB/IP reader's workloads took in "
            "the guest"
        )
        split = exchange_split(work / "ours.pcap")
        if split is not None:
            share = split.server_us / (split.server_us + split.guest_us)
            print(
                f"one APDU exchange through our reader (median of {split.exchanges}, from the "
                f"server's capture): server {split.server_us:.0f} µs, guest + network "
                f"{split.guest_us:.0f} µs (server {share * 100:.0f} %); over all exchanges, "
                f"server {split.server_total_s:.2f} s, guest between OUT and IN "
                f"{split.guest_total_s:.2f} s"
            )
        print("\nper run, ours / reference (SELECT/s, READ BUFFER/s, sig/s), host load:")
        for x, y, load in zip(o, f, loads, strict=True):
            print(
                f"  {x.select_rate:6.1f} / {y.select_rate:6.1f}   {x.read_rate:6.1f} / "
                f"{y.read_rate:6.1f}   {x.sign_rate:5.2f} / {y.sign_rate:5.2f}   {load:.2f}"
            )
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
