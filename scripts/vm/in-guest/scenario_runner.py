"""Scenario loop of the test guest (runs inside the guest, started by init.sh).

Protocol, all files in the 9p share and all written atomically (temporary name, then rename):

* host -> guest: ``IN/NNN.sh`` — a bash script; an optional line ``# usbccid-timeout: SECONDS``
  sets its time limit. Scenarios run one at a time, in order of NNN.
* guest -> host: ``OUT/NNN.json`` — ``{"id", "rc", "stdout", "stderr", "elapsed",
  "timed_out"}``; ``rc`` is the script's exit status, or -SIGNAL when a signal ended it.
  On a timeout the script's whole process group is killed and ``timed_out`` is true.
* host -> guest: ``IN/poweroff`` — the loop ends (then init powers the guest off).

The loop also ends by itself when no scenario arrives for --idle seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

SCENARIO = re.compile(r"^(\d+)\.sh$")
TIMEOUT_LINE = re.compile(rb"^#\s*usbccid-timeout:\s*([0-9.]+)\s*$", re.MULTILINE)
MAX_OUTPUT = 16 * 1024 * 1024


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def read_output(f: IO[bytes]) -> str:
    f.seek(0)
    data = f.read(MAX_OUTPUT + 1)
    text = data[:MAX_OUTPUT].decode("utf-8", errors="replace")
    if len(data) > MAX_OUTPUT:
        text += "\n[... output truncated by the guest runner ...]\n"
    return text


def kill_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, 3.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            # Let the rest of the group go too (background children of the script).
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
        return


def run_scenario(script: Path, default_timeout: float) -> dict[str, object]:
    body = script.read_bytes()
    m = TIMEOUT_LINE.search(body)
    timeout = float(m.group(1)) if m else default_timeout
    with (
        tempfile.TemporaryFile(dir="/tmp") as out,
        tempfile.TemporaryFile(dir="/tmp") as err,
    ):
        start = time.monotonic()
        timed_out = False
        proc = subprocess.Popen(
            ["/bin/bash", str(script)],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            cwd="/root",
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_group(proc)
            rc = proc.wait()
        elapsed = time.monotonic() - start
        return {
            "id": script.stem,
            "rc": rc,
            "stdout": read_output(out),
            "stderr": read_output(err),
            "elapsed": round(elapsed, 3),
            "timed_out": timed_out,
        }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("indir", type=Path)
    ap.add_argument("outdir", type=Path)
    ap.add_argument("--idle", type=float, default=3600.0, help="end after this long without work")
    ap.add_argument("--timeout", type=float, default=600.0, help="default scenario time limit")
    ap.add_argument("--poll", type=float, default=0.05, help="poll interval while busy")
    ap.add_argument("--idle-poll", type=float, default=0.25, help="poll interval when idle")
    ap.add_argument("--ready", type=Path, help="rename this file to OUT/ready once polling")
    args = ap.parse_args()
    indir: Path = args.indir
    outdir: Path = args.outdir
    if args.ready is not None:
        os.rename(args.ready, outdir / "ready")
    done: set[str] = set()
    last_work = time.monotonic()
    while True:
        names = sorted(os.listdir(indir))
        todo = [n for n in names if SCENARIO.match(n) and n not in done]
        if todo:
            todo.sort(key=lambda n: int(n.split(".")[0]))
            for name in todo:
                result = run_scenario(indir / name, args.timeout)
                write_atomic(outdir / f"{Path(name).stem}.json", json.dumps(result).encode())
                done.add(name)
            last_work = time.monotonic()
            continue
        if "poweroff" in names:
            return 0
        idle = time.monotonic() - last_work
        if idle > args.idle:
            print(f"runner: no scenario for {args.idle:.0f} s, giving up", file=sys.stderr)
            return 1
        # Poll fast while scenarios keep coming, slowly when idle (TCG burns CPU on it).
        time.sleep(args.poll if idle < 3.0 else args.idle_poll)


if __name__ == "__main__":
    sys.exit(main())
