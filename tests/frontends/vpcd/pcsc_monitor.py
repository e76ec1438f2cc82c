"""Print card insertions and removals of every PC/SC reader as JSON lines (pyscard).

Run under Debian's Python, which has python3-pyscard: ``/usr/bin/python3 pcsc_monitor.py``.
One line per presence change: ``{"t": monotonic seconds, "reader": name, "present": bool,
"atr": hex}``, taken the moment SCardGetStatusChange returns. pcscd restarts are ridden
out (a new context, after which every reader is reported again). Exits when its stdin
closes, so it never outlives the test.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from smartcard import scard


def _exit_with_stdin() -> None:
    while sys.stdin.buffer.read(4096):
        pass
    os._exit(0)


def main() -> None:
    threading.Thread(target=_exit_with_stdin, daemon=True).start()
    known: dict[str, bool] = {}
    while True:
        hr, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
        if hr != scard.SCARD_S_SUCCESS:
            time.sleep(0.1)
            continue
        states: dict[str, int] = {}
        while True:
            hr, readers = scard.SCardListReaders(context, [])
            if hr != scard.SCARD_S_SUCCESS or not readers:
                if hr not in (scard.SCARD_S_SUCCESS, scard.SCARD_E_NO_READERS_AVAILABLE):
                    break
                time.sleep(0.1)
                continue
            query = [(r, states.get(r, scard.SCARD_STATE_UNAWARE)) for r in readers]
            hr, result = scard.SCardGetStatusChange(context, 500, query)
            now = time.monotonic()
            if hr == scard.SCARD_E_TIMEOUT:
                continue
            if hr != scard.SCARD_S_SUCCESS:
                break  # pcscd went away (or the readers changed): start again
            for reader, event, atr in result:
                states[reader] = event & ~scard.SCARD_STATE_CHANGED
                present = bool(event & scard.SCARD_STATE_PRESENT)
                if known.get(reader) != present:
                    known[reader] = present
                    line = {"t": now, "reader": reader, "present": present, "atr": bytes(atr).hex()}
                    print(json.dumps(line), flush=True)
        scard.SCardReleaseContext(context)
        known.clear()  # a new pcscd: report every reader afresh
        time.sleep(0.1)


if __name__ == "__main__":
    main()
