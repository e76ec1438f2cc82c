"""Who the reader claims to be: VID:PID presets and the device strings.

pcscd 1.9.9 has no class-driver fallback on Linux: it and libccid (ccid_usb.c
OpenUSBByName) accept a reader only if its VID:PID is in libccid's Info.plist. So the
default borrows a VID:PID that stock libccid 1.5.2 lists, and every borrowed VID:PID brings
the quirks libccid keys on it (ccid.h readerID constants, used in ccid.c, commands.c,
ifdhandler.c, ccid_usb.c). The presets and what libccid 1.5.2 does with each:

``vmware`` (default) 0E0F:0004 "VMware Virtual USB CCID"
    Listed (readers/supported_readers.txt, section "shouldwork", so in Info.plist). No
    readerID constant in ccid.h and no entry in ccid_usb.c Bogus_firmwares: libccid treats
    it as a plain CCID reader and believes its descriptor. It also says what we are: a
    virtual CCID reader.
``gemalto-433`` / ``qemu`` 08E6:4433 "Gemalto Gemplus USB SmartCard Reader 433-Swap"
    What QEMU's usb-ccid uses. Quirks: GEMPC433 in commands.c CmdPowerOn: on bError 0xBB
    it sends Escape 1F 01 and retries, so this reader never answers 0xBB (no code path
    produces it); VENDOR_GEMALTO (ccid.c ccid_open_hack_post set_gemalto_firmware_features,
    ifdhandler.c sFirmwareID) sends PC_to_RDR_Escape 6A / 02, which this reader answers
    "command not supported", and libccid carries on. Harmless, but noisier than ``vmware``.
``canokey`` 20A0:42D4 "Canokeys Canokey"
    Listed; no readerID constant either. Impersonates a real token: use only if you must.

For any other VID:PID, add it to /usr/lib/pcsc/drivers/ifd-ccid.bundle/Contents/Info.plist
(ifdVendorID, ifdProductID, ifdFriendlyName) and restart pcscd.

The serial number must differ per exported reader: pcscd names a reader "<friendly name>
[<iInterface>] (<iSerialNumber>) 00 00" (hotplug_libudev.c), and libccid reads it
(ccid_usb.c, sIFD_serial_number).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from usbccid.usbip.function import DeviceIdentity


@dataclass(frozen=True, slots=True)
class Preset:
    vendor_id: int
    product_id: int
    plist_name: str  # the ifdFriendlyName pcscd will show


PRESETS: dict[str, Preset] = {
    "vmware": Preset(0x0E0F, 0x0004, "VMware Virtual USB CCID"),
    "gemalto-433": Preset(0x08E6, 0x4433, "Gemalto Gemplus USB SmartCard Reader 433-Swap"),
    "qemu": Preset(0x08E6, 0x4433, "Gemalto Gemplus USB SmartCard Reader 433-Swap"),
    "canokey": Preset(0x20A0, 0x42D4, "Canokeys Canokey"),
}
DEFAULT_PRESET = "vmware"

DEFAULT_MANUFACTURER = "usbccid"
DEFAULT_PRODUCT = "usbccid virtual CCID reader"
DEFAULT_BCD_DEVICE = 0x0100

_serials = itertools.count(1)


def next_serial(prefix: str = "USBCCID") -> str:
    """A serial number distinct from every other one this process made."""
    return f"{prefix}{next(_serials):04d}"


def parse_vid_pid(text: str) -> tuple[int, int]:
    """``"0e0f:0004"`` -> (0x0E0F, 0x0004)."""
    vid, sep, pid = text.partition(":")
    if not sep:
        raise ValueError(f"expected VID:PID in hex, got {text!r}")
    vendor_id, product_id = int(vid, 16), int(pid, 16)
    if not (0 <= vendor_id <= 0xFFFF and 0 <= product_id <= 0xFFFF):
        raise ValueError(f"VID:PID out of range: {text!r}")
    return vendor_id, product_id


def make_identity(
    preset: str = DEFAULT_PRESET,
    *,
    vid_pid: str | tuple[int, int] | None = None,
    serial_number: str | None = None,
    manufacturer: str = DEFAULT_MANUFACTURER,
    product: str = DEFAULT_PRODUCT,
    bcd_device: int = DEFAULT_BCD_DEVICE,
) -> DeviceIdentity:
    """A :class:`DeviceIdentity` from a preset name, or from an explicit VID:PID.

    Args:
        preset: a key of :data:`PRESETS`; ignored when ``vid_pid`` is given.
        vid_pid: ``"0e0f:0004"`` or ``(0x0E0F, 0x0004)``.
        serial_number: default: a fresh one from :func:`next_serial`.

    Raises:
        ValueError: unknown preset or malformed VID:PID.
    """
    if vid_pid is None:
        try:
            chosen = PRESETS[preset]
        except KeyError:
            raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}") from None
        vendor_id, product_id = chosen.vendor_id, chosen.product_id
    elif isinstance(vid_pid, str):
        vendor_id, product_id = parse_vid_pid(vid_pid)
    else:
        vendor_id, product_id = vid_pid
    return DeviceIdentity(
        vendor_id=vendor_id,
        product_id=product_id,
        bcd_device=bcd_device,
        manufacturer=manufacturer,
        product=product,
        serial_number=serial_number if serial_number is not None else next_serial(),
    )
