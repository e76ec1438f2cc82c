"""The real Linux stack as the judge: a guest attaches ``usbccid serve`` with usbip, pcscd
sees the card, and ``usbccid ctl remove/insert`` are card removals and insertions for it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.cli.helpers import run, running_server
from tests.conftest import require_tool
from tests.vm.guest import HOST, Guest

pytestmark = [pytest.mark.vm, pytest.mark.slow]

PROBE = """
import sys, time
from smartcard.System import readers
from smartcard.Exceptions import CardConnectionException, NoCardException

want = sys.argv[1]  # "present" or "absent"
deadline = time.monotonic() + 60
while True:
    state = "no reader"
    rs = readers()
    if rs:
        try:
            c = rs[0].createConnection()
            c.connect()
            atr = bytes(c.getATR()).hex()
            # SELECT the CAC's first PKI applet: an APDU through PC_to_RDR_XfrBlock
            _, sw1, sw2 = c.transmit(list(bytes.fromhex("00a4040007a000000079010000")))
            state = f"present {atr} {sw1:02x}{sw2:02x}"
            c.disconnect()
        except (NoCardException, CardConnectionException) as e:
            state = "absent"
    if state.split()[0] == want:
        print(rs[0], state)
        break
    if time.monotonic() > deadline:
        print("timed out; last state:", state)
        sys.exit(1)
    time.sleep(0.3)
"""


def test_ctl_remove_insert_seen_by_pcscd(
    vm_guest: Guest,
    tmp_path: Path,
    usbccid_state_template: Path,
) -> None:
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    probe = vm_guest.put_file("card_probe.py", PROBE)
    pcap = tmp_path / "usb.pcap"
    with running_server(["--pcap", pcap, "--trace"], state) as server:
        r = vm_guest.run(
            f"usbip --tcp-port {server.port} attach -r {HOST} -b 1-1 && python3 {probe} present",
            timeout=120,
        )
        assert r.ok, r
        assert "usbccid reader0" in r.stdout  # our iInterface in pcscd's reader name
        assert "present 3b" in r.stdout
        assert r.stdout.strip().endswith(" 9000"), r

        status = json.loads(run("ctl", "--state-dir", state, "--json", "status").stdout)
        assert status["readers"][0]["client"] is not None  # the guest, through QEMU's NAT

        assert run("ctl", "--state-dir", state, "remove", "reader0").returncode == 0
        r = vm_guest.run(f"python3 {probe} absent", timeout=90)
        assert r.ok, r

        assert run("ctl", "--state-dir", state, "insert", "reader0").returncode == 0
        r = vm_guest.run(f"python3 {probe} present", timeout=90)
        assert r.ok, r

    # The capture of what the kernel and libccid really did decodes down to CCID messages.
    tshark = require_tool("tshark")
    out = subprocess.run(
        [tshark, "-r", str(pcap), "-V"], capture_output=True, text=True, timeout=300, check=True
    ).stdout
    for name in (
        "CONFIGURATION DESCRIPTOR",
        "bInterfaceClass: Smart Card (0x0b)",
        "PC_to_RDR_IccPowerOn",
        "PC_to_RDR_GetSlotStatus",
        "PC_to_RDR_XfrBlock",
        "RDR_to_PC_DataBlock",
        "RDR_to_PC_SlotStatus",
        # tshark 4.0's usbccid dissector does not take interrupt transfers: the
        # NotifySlotChange messages (card removed, card inserted) show as raw data
        "Leftover Capture Data: 5002",
        "Leftover Capture Data: 5003",
    ):
        assert name in out, name


#: A PC/SC session that keeps working: connects to the reader whose name contains argv[1]
#: and sends SELECTs until /tmp/session.stop exists; prints JSON {ok, errors, seconds}.
SESSION = r"""
import json, os, sys, time
from smartcard.System import readers
name = next(str(r) for r in readers() if sys.argv[1] in str(r))
reader = next(r for r in readers() if str(r) == name)
c = reader.createConnection()
c.connect()
ok, errors, t0 = 0, [], time.monotonic()
open("/tmp/session.started", "w").close()
while not os.path.exists("/tmp/session.stop"):
    try:
        _, sw1, sw2 = c.transmit(list(bytes.fromhex("00a4040007a000000079010000")))
        if (sw1, sw2) == (0x90, 0x00):
            ok += 1
        else:
            errors.append(f"{sw1:02x}{sw2:02x}")
    except Exception as exc:
        errors.append(repr(exc))
    time.sleep(0.05)
print(json.dumps({"ok": ok, "errors": errors[:5], "seconds": time.monotonic() - t0}))
"""

#: One SELECT through the reader whose name contains argv[1].
ONE_SELECT = r"""
import sys
from smartcard.System import readers
r = next(r for r in readers() if sys.argv[1] in str(r))
c = r.createConnection()
c.connect()
_, sw1, sw2 = c.transmit(list(bytes.fromhex("00a4040007a000000079010000")))
print(r, f"{sw1:02x}{sw2:02x}")
"""


def test_readers_added_and_removed_at_run_time_seen_by_pcscd(
    vm_guest: Guest,
    tmp_path: Path,
    usbccid_state_template: Path,
) -> None:
    state = tmp_path / "state"
    shutil.copytree(usbccid_state_template, state)
    shutil.copytree(state / "cards" / "default", state / "cards" / "bob")
    session = vm_guest.put_file("session.py", SESSION)
    one = vm_guest.put_file("one_select.py", ONE_SELECT)

    def ctl(*args: str) -> str:
        result = run("ctl", "--state-dir", state, "--timeout", "30", *args)
        assert result.returncode == 0, result.stderr
        return result.stdout

    with running_server([], state) as server:
        usbip = f"usbip --tcp-port {server.port}"
        r = vm_guest.run(
            f"""
            set -e
            pcscd-start
            rm -f /tmp/session.stop /tmp/session.started
            {usbip} attach -r {HOST} -b 1-1
            wait-for 90 sh -c 'opensc-tool -l | grep -qF "usbccid reader0"'
            setsid python3 {session} "usbccid reader0" > /tmp/session.out 2>&1 &
            wait-for 60 test -e /tmp/session.started
            """,
            timeout=240,
        )
        assert r.ok, r

        # added while the guest uses the first reader: listed at once, attached, used
        assert "bus id 1-2" in ctl("add-reader", "lab", "--card", "bob")
        r = vm_guest.run(
            f"""
            set -e
            {usbip} list -r {HOST}
            {usbip} attach -r {HOST} -b 1-2
            wait-for 90 sh -c 'opensc-tool -l | grep -qF "usbccid lab"'
            python3 {one} "usbccid lab"
            """,
            timeout=240,
        )
        assert r.ok, r
        assert "1-2: " in r.stdout  # in the guest's `usbip list` at once
        assert r.stdout.strip().endswith(" 9000"), r.stdout
        status = json.loads(ctl("--json", "status"))
        assert [x["client"] is not None for x in status["readers"]] == [True, True]

        # removed: the guest's port is freed and pcscd drops the reader
        assert "reader lab removed" in ctl("remove-reader", "lab")
        r = vm_guest.run(
            """
            set -e
            wait-for 60 sh -c '! opensc-tool -l 2>/dev/null | grep -qF "usbccid lab"'
            wait-for 30 sh -c '[ "$(usbip port | grep -c "^Port")" = 1 ]'
            opensc-tool -l
            touch /tmp/session.stop
            wait-for 30 sh -c 'grep -q seconds /tmp/session.out'
            cat /tmp/session.out
            """,
            timeout=240,
        )
        assert r.ok, r
        assert "usbccid reader0" in r.stdout
        out = json.loads(r.stdout.strip().splitlines()[-1])
        # the first reader's session went on undisturbed through the add and the remove
        assert out["errors"] == [], out
        assert out["ok"] >= 10, out
