"""Fixtures for the VM tests: one QEMU guest (Debian 12, real usbip/pcscd/OpenSC) per session.

``guest`` builds the cached image if needed (scripts/vm/build-guest, ~40 s cold) and boots
it once (~15 s under TCG); every test then runs scenarios in it with ``guest.run(...)``.
``vm_guest`` is the same guest, with ``usbip-detach-all`` run after the test so that no
attached port leaks into the next one. Missing tools skip the tests, or fail them under CI
(where a missing image is built first, which also installs the host tools).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.conftest import in_ci, require, require_tool
from tests.vm.guest import Guest, GuestError, build_image, cached_image


@pytest.fixture(scope="session")
def guest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guest]:
    if in_ci() and cached_image() is None:
        # A fresh CI machine: build-guest installs qemu/debootstrap/e2fsprogs, then builds.
        build_image()
    require_tool("qemu-system-x86_64")
    image = cached_image()
    if image is None:
        require_tool("debootstrap")
        require_tool("mke2fs")
        require(os.geteuid() == 0, "building the guest image needs root (debootstrap, chroot)")
        image = build_image()
    g = Guest(image, workdir=tmp_path_factory.mktemp("vm"))
    try:
        g.start()
    except GuestError:
        g.close()
        raise
    try:
        yield g
    finally:
        g.close()


@pytest.fixture
def vm_guest(guest: Guest) -> Iterator[Guest]:
    yield guest
    if guest.running:
        r = guest.run("usbip-detach-all", timeout=60)
        assert r.ok, f"cleanup after the test failed: {r}"
