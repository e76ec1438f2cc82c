"""``python -m usbccid``: the same as the ``usbccid`` command."""

from __future__ import annotations

import sys

from usbccid.tool.cli import main

sys.exit(main())
