"""What the reader reads from an ATR: the protocols it offers and the default parameters.

ISO/IEC 7816-3 §8.2: TS, T0 (Y1 | K), then interface bytes TAi TBi TCi TDi as announced by
the Y nibble of T0 and of each TDi; the low nibble of TDi names a protocol T. No TD1 means
T=0 only. The reader needs this for PC_to_RDR_GetParameters / ResetParameters (CCID Rev
1.1 §6.1.5, §6.1.6: the parameters "defined by the ATR"). A malformed ATR is the card's
business: whatever cannot be read falls back to the ISO defaults.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

from usbccid.ccid.wire import T0Parameters, T1Parameters

INVERSE_CONVENTION_TS = 0x3F


@dataclass(frozen=True, slots=True)
class AtrInfo:
    protocols: frozenset[int] = frozenset({0})
    inverse: bool = False
    # interface bytes by (i, "A"/"B"/"C"), i = 1, 2, 3, ...
    interface: dict[tuple[int, str], int] = field(default_factory=dict)
    # i -> the T that TD(i-1) announced for the group of interface bytes i (i >= 2)
    group_protocol: dict[int, int] = field(default_factory=dict)

    def t1_group(self) -> int:
        """The index i of the T=1-specific bytes: the first group i >= 3 that follows a
        TD(i-1) naming T=1 (ISO/IEC 7816-3 §11.4.2); 3 when the ATR has none."""
        for index in sorted(self.group_protocol):
            if index >= 3 and self.group_protocol[index] == 1:
                return index
        return 3

    @property
    def first_protocol(self) -> int:
        """The protocol the card uses by default (ISO/IEC 7816-3 §8.2.3: TD1's T)."""
        return min(self.protocols) if self.protocols else 0


def parse_atr(atr: bytes) -> AtrInfo:
    if len(atr) < 2:
        return AtrInfo()
    interface: dict[tuple[int, str], int] = {}
    protocols: list[int] = []
    group_protocol: dict[int, int] = {}
    y = atr[1] >> 4
    pos, i = 2, 1
    while True:
        for bit, name in ((1, "A"), (2, "B"), (4, "C")):
            if y & bit:
                if pos >= len(atr):
                    break
                interface[(i, name)] = atr[pos]
                pos += 1
        if not y & 8 or pos >= len(atr):
            break
        td = atr[pos]
        pos += 1
        protocols.append(td & 0x0F)
        y = td >> 4
        i += 1
        group_protocol[i] = td & 0x0F
    offered = frozenset(t for t in protocols if t in (0, 1)) or frozenset({0})
    if protocols and protocols[0] not in (0, 1):
        offered = frozenset({0})
    return AtrInfo(offered, atr[0] == INVERSE_CONVENTION_TS, interface, group_protocol)


@functools.lru_cache(maxsize=64)
def default_parameters(atr: bytes | None) -> tuple[int, bytes]:
    """(bProtocolNum, abProtocolDataStructure) for the card's default protocol.

    Cached: a pure function of the ATR, asked at every power-down of every slot."""
    info = parse_atr(atr or b"")
    fi_di = info.interface.get((1, "A"), 0x11)
    guard = info.interface.get((1, "C"), 0x00)
    if info.first_protocol == 1:
        # CCID Rev 1.1 §6.1.7 Table 6.1-9: bmTCCKST1 = 0001 00xy b, x = inverse, y = CRC.
        t1_index = info.t1_group()
        crc = info.interface.get((t1_index, "C"), 0) & 1
        t1 = T1Parameters(
            findex_dindex=fi_di,
            tccks=0x10 | crc | (0x02 if info.inverse else 0),
            guard_time=guard,
            waiting_integers=info.interface.get((t1_index, "B"), 0x4D),
            ifsc=info.interface.get((t1_index, "A"), 0x20),
        )
        return 1, t1.build()
    t0 = T0Parameters(
        findex_dindex=fi_di,
        tccks=0x02 if info.inverse else 0x00,
        guard_time=guard,
        waiting_integer=info.interface.get((2, "C"), 0x0A),
    )
    return 0, t0.build()
