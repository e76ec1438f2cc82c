"""Shared test helpers.

Real clients are the judge: a test that needs a real tool (usbip, qemu, pcscd, tshark, ...)
calls :func:`require_tool`. Outside CI a missing tool skips the test; under ``CI=true`` it
fails it, so that CI never passes by skipping the real-client tests.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import settings

# Hypothesis' per-example deadline is a timed assertion: on a loaded two-core machine a slow
# example is not a bug (speed is measured in scripts/, not asserted in tests).
settings.register_profile("usbccid", deadline=None)
settings.load_profile("usbccid")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require(condition: bool, why: str) -> None:
    """Skip (outside CI) or fail (under CI=true) unless ``condition`` holds."""
    if condition:
        return
    if in_ci():
        pytest.fail(f"required under CI=true: {why}")
    pytest.skip(why)


def require_tool(name: str) -> str:
    """The path of the executable ``name``; skip or fail (under CI) when it is missing."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    require(path is not None, f"{name} is not installed")
    assert path is not None
    return path
