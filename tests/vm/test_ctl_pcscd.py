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
