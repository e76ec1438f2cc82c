"""Identity presets, the interface the device model will describe, and ATR parameters."""

from __future__ import annotations

import pytest

from usbccid.ccid import PRESETS, CcidReader, ReaderConfig, make_identity
from usbccid.ccid.atr import default_parameters, parse_atr
from usbccid.ccid.testcard import DEFAULT_ATR
from usbccid.usbip.function import TransferType


def test_default_identity_is_the_quirk_free_vmware_entry() -> None:
    identity = make_identity()
    assert (identity.vendor_id, identity.product_id) == (0x0E0F, 0x0004)
    assert identity.manufacturer
    assert identity.product
    assert identity.serial_number


def test_serial_numbers_differ_per_reader() -> None:
    serials = {CcidReader(slots=1).identity.serial_number for _ in range(10)}
    assert len(serials) == 10


@pytest.mark.parametrize(
    ("preset", "vid_pid"),
    [("vmware", (0x0E0F, 0x0004)), ("gemalto-433", (0x08E6, 0x4433)), ("qemu", (0x08E6, 0x4433))],
)
def test_presets(preset: str, vid_pid: tuple[int, int]) -> None:
    identity = make_identity(preset, serial_number="X1")
    assert (identity.vendor_id, identity.product_id) == vid_pid
    assert identity.serial_number == "X1"
    assert preset in PRESETS


def test_explicit_vid_pid() -> None:
    assert make_identity(vid_pid="1209:beee").product_id == 0xBEEE
    assert make_identity(vid_pid=(0x20A0, 0x42D4)).vendor_id == 0x20A0
    with pytest.raises(ValueError, match="VID:PID"):
        make_identity(vid_pid="1209")
    with pytest.raises(ValueError, match="range"):
        make_identity(vid_pid="12345:1")
    with pytest.raises(ValueError, match="unknown preset"):
        make_identity("nope")


def test_interface_spec() -> None:
    spec = CcidReader(slots=1, interface_name="CAC reader").interface
    assert (spec.interface_class, spec.interface_subclass, spec.interface_protocol) == (0x0B, 0, 0)
    assert spec.name == "CAC reader"
    # the 54-byte class descriptor is the only extra (libccid: extra_length == 54)
    assert len(spec.extra) == 54
    assert spec.extra[:2] == b"\x36\x21"
    bulk_out, bulk_in, interrupt = spec.endpoints
    assert (bulk_out.address, bulk_out.transfer_type, bulk_out.max_packet_size) == (
        0x01,
        TransferType.BULK,
        64,
    )
    assert (bulk_in.address, bulk_in.transfer_type, bulk_in.max_packet_size) == (
        0x82,
        TransferType.BULK,
        64,
    )
    assert (interrupt.address, interrupt.transfer_type) == (0x83, TransferType.INTERRUPT)
    assert interrupt.max_packet_size == 8
    assert 1 <= interrupt.interval <= 255


def test_interrupt_endpoint_grows_for_many_slots() -> None:
    assert CcidReader(slots=28).interface.endpoints[2].max_packet_size == 8
    assert CcidReader(slots=29).interface.endpoints[2].max_packet_size == 64


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="positive"):
        ReaderConfig(time_extension_interval=0)
    with pytest.raises(ValueError, match="one byte"):
        ReaderConfig(time_extension_multiplier=256)
    with pytest.raises(ValueError, match="dwMaxCCIDMessageLength"):
        ReaderConfig(max_message_length=65555)


@pytest.mark.parametrize(
    ("atr", "protocols", "protocol", "parameters"),
    [
        (DEFAULT_ATR, {0}, 0, "1100000a00"),
        (b"", {0}, 0, "1100000a00"),
        (bytes.fromhex("3B"), {0}, 0, "1100000a00"),
        # TA1 = 96 (Fi/Di), TC1 = 02 (guard time), TD1 -> TC2 = 20 (WI), T=0
        (bytes.fromhex("3B D0 96 02 40 20"), {0}, 0, "9600022000"),
        # inverse convention
        (bytes.fromhex("3F 00"), {0}, 0, "1102000a00"),
        # T=1: TD1 = 81, TD2 = 31, TA3 = FE, TB3 = 45; TCK omitted (not checked)
        (bytes.fromhex("3B 81 81 31 FE 45 00"), {1}, 1, "11100045" + "00fe00"),
        # T=0 and T=1 offered, T=0 first: parameters are T=0's
        (bytes.fromhex("3B 80 80 01 00"), {0, 1}, 0, "1100000a00"),
        # TD2 with CRC requested in TC3
        (bytes.fromhex("3B 80 81 71 FE 45 01"), {1}, 1, "11110045" + "00fe00"),
        # truncated ATR: what is there counts, the rest falls back
        (bytes.fromhex("3B F0 11"), {0}, 0, "1100000a00"),
    ],
)
def test_atr_parameters(atr: bytes, protocols: set[int], protocol: int, parameters: str) -> None:
    assert set(parse_atr(atr).protocols) == protocols
    assert default_parameters(atr) == (protocol, bytes.fromhex(parameters))
