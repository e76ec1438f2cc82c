"""What the reader tells the host it is: the CCID interface, its endpoints and the class
descriptor (CCID Rev 1.1 §4, §5.1, §3.2 endpoints).

Values are chosen for stock pcscd 1.9.9 + libccid 1.5.2 (Debian 12); the libccid
behaviour each one relies on is cited next to it (files/functions of LudovicRousseau/CCID
at tag 1.5.2).
"""

from __future__ import annotations

from dataclasses import dataclass

from usbccid.ccid.pinpad import PinPadConfig
from usbccid.ccid.wire import (
    CLASS_DESCRIPTOR_LENGTH,
    ClassDescriptor,
    notify_slot_change_size,
)
from usbccid.usbip.function import EndpointSpec, InterfaceSpec, TransferType

# Interface class, subclass, protocol (CCID Rev 1.1 §4.1; libccid's udev rule matches
# "*:0b0000:*" and ccid_usb.c get_ccid_usb_interface wants class 0x0B, protocol 0 = CCID
# bulk transport rather than ICCD A/B).
INTERFACE_CLASS_SMART_CARD = 0x0B
INTERFACE_SUBCLASS = 0x00
INTERFACE_PROTOCOL_CCID = 0x00

# dwFeatures bits (CCID Rev 1.1 §5.1, Table 5.1-1).
FEATURE_AUTO_PARAMETERS_FROM_ATR = 0x0000_0002
FEATURE_AUTO_ACTIVATION = 0x0000_0004
FEATURE_AUTO_VOLTAGE = 0x0000_0008
FEATURE_AUTO_CLOCK = 0x0000_0010
FEATURE_AUTO_BAUD = 0x0000_0020
FEATURE_AUTO_PARAMETER_NEGOTIATION = 0x0000_0040
FEATURE_AUTO_PPS = 0x0000_0080
FEATURE_TPDU_LEVEL = 0x0001_0000
FEATURE_SHORT_APDU_LEVEL = 0x0002_0000
FEATURE_EXTENDED_APDU_LEVEL = 0x0004_0000  # short and extended APDU level
EXCHANGE_LEVEL_MASK = 0x0007_0000

# Automatic everything + short and extended APDU level = 0x000400FE.
# - 0x04/0x08: libccid CmdPowerOn then sends bPowerSelect 0 (automatic) instead of
#   walking 5 V -> 3 V -> 1.8 V.
# - 0x40 (CCID_CLASS_AUTO_PPS_PROP): libccid IFDHSetProtocolParameters logs
#   "Skip SetParameters" and sends neither PPS nor PC_to_RDR_SetParameters.
# - 0x00040000: libccid CmdXfrBlock -> CmdXfrBlockAPDU_extended: the whole APDU in one
#   XfrBlock, chained with wLevelParameter only when it exceeds dwMaxCCIDMessageLength-10;
#   responses are read in blocks while bChainParameter is 01h/03h/10h. No T=1 TPDU framing
#   in the driver, so the card sees plain APDUs whatever its protocol. ifdhandler.c also
#   reports dwMaxAPDUDataSize 0x10000 (extended APDUs allowed) to PC/SC part 10 clients.
DEFAULT_FEATURES = (
    FEATURE_AUTO_PARAMETERS_FROM_ATR
    | FEATURE_AUTO_ACTIVATION
    | FEATURE_AUTO_VOLTAGE
    | FEATURE_AUTO_CLOCK
    | FEATURE_AUTO_BAUD
    | FEATURE_AUTO_PARAMETER_NEGOTIATION
    | FEATURE_AUTO_PPS
    | FEATURE_EXTENDED_APDU_LEVEL
)

# dwMaxCCIDMessageLength: 65544 + 10 = 65554, the maximum CCID Rev 1.1 §5.1 allows at
# extended APDU level ("between 261 + 10 and 65544 + 10").
# - libccid 1.5.2 commands.c CmdXfrBlockAPDU_extended chains a command only when it is
#   longer than dwMaxCCIDMessageLength-10 (or CMD_BUF_SIZE = 4+3+65536+3, defs.h); the
#   longest extended APDU (4 + 3 + 65535 + 2 = 65544 bytes) fits, so libccid never chains.
# - CCID_Receive reads into a 10 + CMD_BUF_SIZE buffer, so a response of any legal size
#   (up to 65536 data + SW) arrives in one RDR_to_PC_DataBlock: 4 KiB+ certificates and
#   READ BUFFER answers need no round trip per block.
# - Neither libccid (ccid_usb.c just stores it) nor pcscd 1.9.9 (winscard_svc.c uses fixed
#   MAX_BUFFER_SIZE_EXTENDED = 65548 buffers) rejects the value; libccid only reports it as
#   SCARD_ATTR_MAXINPUT (= value - 10).
# The reader still implements both chaining directions, for hosts or configurations with a
# smaller value (see ReaderConfig.max_message_length).
MAX_MESSAGE_LENGTH_EXTENDED = 65544 + 10
MIN_MESSAGE_LENGTH = 261 + 10  # a short APDU (§5.1)


@dataclass(frozen=True, slots=True)
class ReaderConfig:
    """Everything configurable about the reader's USB/CCID face and timing."""

    max_message_length: int = MAX_MESSAGE_LENGTH_EXTENDED  # dwMaxCCIDMessageLength
    features: int = DEFAULT_FEATURES  # dwFeatures
    protocols: int = 0x03  # dwProtocols: T=0 and T=1 (APDU level: the card decides)
    voltage_support: int = 0x07  # bVoltageSupport: 5 V, 3 V, 1.8 V
    default_clock: int = 4000  # dwDefaultClock, kHz (libccid T0/T1_card_timeout use it)
    maximum_clock: int = 4000  # dwMaximumClock, kHz
    data_rate: int = 10752  # dwDataRate, bps: 4 MHz / 372 (F=372, D=1)
    max_data_rate: int = 10752  # dwMaxDataRate, bps
    max_ifsd: int = 254  # dwMaxIFSD (T=1; libccid reads it for TPDU T=1 only)
    bulk_out_address: int = 0x01
    bulk_in_address: int = 0x82
    interrupt_in_address: int = 0x83
    bulk_max_packet_size: int = 64  # full speed (USB 2.0 §5.8.3)
    interrupt_interval: int = 16  # bInterval, ms at full speed
    # Time extension (CCID Rev 1.1 §6.2.6 bmCommandStatus 2): while card work runs
    # longer than this, one RDR_to_PC_DataBlock "time extension requested" is sent per
    # interval. libccid CCID_Receive multiplies its read timeout (3 s by default,
    # DEFAULT_COM_READ_TIMEOUT; more after the ATR) by bError for the next read only, so
    # a 1 s interval with multiplier 1 keeps any host timeout >= 1 s from expiring.
    time_extension_interval: float = 1.0
    time_extension_multiplier: int = 1
    # Multi-slot readers repeat a slot's NotifySlotChange until the host asks that slot's
    # status (see CcidReader._poll_interrupt_in: libccid's multi-slot polling loses
    # notifications): first after renotify_interval seconds, then doubling up to
    # renotify_max_interval, at most renotify_limit times per change.
    renotify_interval: float = 0.25
    renotify_max_interval: float = 2.0
    renotify_limit: int = 8
    # A PIN pad (usbccid.ccid.pinpad): bPINSupport and wLcdLayout say so, and the reader
    # serves PC_to_RDR_Secure. None: no PIN pad, Secure is "command not supported".
    pinpad: PinPadConfig | None = None
    # Multi-slot readers never answer an interrupt-IN URB the moment it comes: a
    # NotifySlotChange goes out once an interrupt poll has seen it pending this long, so
    # the URB it completes has been pending at least this long (see
    # CcidReader._poll_interrupt_in: libccid 1.5.2 loses a completion that comes too soon).
    notify_holdoff: float = 0.2

    def __post_init__(self) -> None:
        if not MIN_MESSAGE_LENGTH <= self.max_message_length <= MAX_MESSAGE_LENGTH_EXTENDED:
            raise ValueError(f"dwMaxCCIDMessageLength {self.max_message_length} out of range")
        if self.time_extension_interval <= 0:
            raise ValueError("time_extension_interval must be positive")
        if not 0 <= self.time_extension_multiplier <= 0xFF:
            raise ValueError("time_extension_multiplier is one byte")
        if not 0 < self.renotify_interval <= self.renotify_max_interval:
            raise ValueError("need 0 < renotify_interval <= renotify_max_interval")
        if self.renotify_limit < 0:
            raise ValueError("renotify_limit must not be negative")
        if self.notify_holdoff < 0:
            raise ValueError("notify_holdoff must not be negative")

    @property
    def max_data_length(self) -> int:
        """Largest abData of one message (dwMaxCCIDMessageLength - 10 header bytes)."""
        return self.max_message_length - 10


def class_descriptor(config: ReaderConfig, slot_count: int) -> ClassDescriptor:
    """The CCID class descriptor (CCID Rev 1.1 §5.1) for ``slot_count`` slots."""
    return ClassDescriptor(
        bcd_ccid=0x0110,  # CCID Rev 1.1
        max_slot_index=slot_count - 1,
        voltage_support=config.voltage_support,
        protocols=config.protocols,
        default_clock=config.default_clock,
        maximum_clock=config.maximum_clock,
        # 0: default and maximum only. libccid ccid_usb.c calls GET_CLOCK_FREQUENCIES
        # never, and GET_DATA_RATES only when bNumDataRatesSupported != 0; both are still
        # answered (reader.control) for hosts that ask anyway (Windows usbccid.sys).
        num_clock_supported=0,
        data_rate=config.data_rate,
        max_data_rate=config.max_data_rate,
        num_data_rates_supported=0,
        max_ifsd=config.max_ifsd,
        synch_protocols=0,
        mechanical=0,  # no capture/eject/lock
        features=config.features,
        max_ccid_message_length=config.max_message_length,
        class_get_response=0xFF,  # echo the APDU's CLA (§5.1)
        class_envelope=0xFF,
        # libccid 1.5.2 ccid_usb.c reads wLcdLayout and bPINSupport from bytes 50..52;
        # ifdhandler.c offers FEATURE_VERIFY_PIN_DIRECT for bit 0, FEATURE_MODIFY_PIN_DIRECT
        # for bit 1, FEATURE_IFD_PIN_PROPERTIES (wLcdLayout) for either.
        lcd_layout=config.pinpad.lcd_layout if config.pinpad else 0,
        pin_support=config.pinpad.pin_support if config.pinpad else 0,
        # Each slot runs its own card work. libccid 1.5.2 ifdhandler.c
        # TAG_IFD_SLOT_THREAD_SAFE answers 1 ("all slots can be used simultaneously")
        # only when bMaxCCIDBusySlots == bMaxSlotIndex + 1; otherwise pcscd serialises.
        max_ccid_busy_slots=slot_count,
    )


def interface_spec(config: ReaderConfig, slot_count: int, name: str | None = None) -> InterfaceSpec:
    """The CCID interface: bulk OUT, bulk IN, interrupt IN (CCID Rev 1.1 §3.2, §4.2).

    The 54-byte class descriptor is the interface's only extra descriptor: libccid
    1.5.2 ccid_usb.c get_ccid_device_descriptor accepts ``extra_length == 54`` only.
    """
    extra = class_descriptor(config, slot_count).build()
    assert len(extra) == CLASS_DESCRIPTOR_LENGTH
    notify_size = notify_slot_change_size(slot_count)
    # libccid submits 8-byte interrupt buffers (ccid_usb.c CCID_INTERRUPT_SIZE); an 8-byte
    # endpoint carries NotifySlotChange for up to 28 slots in one packet.
    interrupt_mps = 8 if notify_size <= 8 else 64
    return InterfaceSpec(
        interface_class=INTERFACE_CLASS_SMART_CARD,
        interface_subclass=INTERFACE_SUBCLASS,
        interface_protocol=INTERFACE_PROTOCOL_CCID,
        endpoints=(
            EndpointSpec(config.bulk_out_address, TransferType.BULK, config.bulk_max_packet_size),
            EndpointSpec(config.bulk_in_address, TransferType.BULK, config.bulk_max_packet_size),
            EndpointSpec(
                config.interrupt_in_address,
                TransferType.INTERRUPT,
                interrupt_mps,
                config.interrupt_interval,
            ),
        ),
        extra=extra,
        name=name,
    )
