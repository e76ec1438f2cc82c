"""The PIV Card Application PIN (key reference 80) and its PUK (81).

Commands (SP 800-73-4 Part 2 §3.2.1-3.2.3); every reference data block is 8 bytes, the
PIN's digits padded with ``FF`` (Part 2 §2.4.3):

* VERIFY ``00 20 00 80 08 <PIN>``: ``90 00``, or ``63 Cx`` with x tries left (the try
  that blocks answers ``63 C0``), ``69 83`` once blocked. Without data: the status,
  ``90 00`` if verified, else ``63 Cx`` / ``69 83``. ``00 20 FF 80`` (no data) resets the
  security status (SP 800-73-4 Part 2 §3.2.1).
* CHANGE REFERENCE DATA ``00 24 00 80|81 10 <old> <new>``: the new PIN is 6 to 8 digits,
  the new PUK any 8 bytes (not all ``FF``: that would be no PUK at all).
* RESET RETRY COUNTER ``00 2C 00 80 10 <PUK> <new PIN>``: the PUK unblocks and sets the PIN.

Other key references: ``00`` (the global PIN) answers ``6A 88``, since the Discovery
Object says the card has none; ``81`` in VERIFY or RESET RETRY COUNTER too. A data field
of the wrong size, or a new PIN that is not 6-8 digits, answers ``6A 80`` and costs no try.

The counters live in the card's :class:`~usbccid.cac.profile.PinState` (the store a CAC
edge of the same card uses too: one PIN): the PIN's ``tries_left``, the PUK's
``unblock_tries_left``, a changed PUK in ``unblock_code``. Anti-tearing as in the CAC
(usbccid.cac.applets.pin): the decremented counter is saved before the comparison, a
match restores it, a store failure answers ``65 81`` and compares nothing.

Security status (volatile): the PIN verified, and the "PIN Always" grant of the digital
signature key 9C (Part 1 Table 4b): a successful VERIFY grants one use of 9C, which that
use consumes; the PIN stays verified for the other keys.
"""

from __future__ import annotations

import hmac
from dataclasses import replace

from usbccid.cac.profile import PinPolicy, PinState, PinStateStore
from usbccid.cac.sw import SW, verify_failed
from usbccid.piv.errors import PivError

BLOCK = 8
PAD = 0xFF
NEW_PIN_MIN = 6  # SP 800-73-4 Part 2 §2.4.3: 6 to 8 digits
NEW_PIN_MAX = 8
MEMORY_FAILURE = 0x6581

PIN_REF = 0x80
PUK_REF = 0x81


def pad(value: bytes) -> bytes:
    """``value`` padded with FF to a reference data block (shorter values only)."""
    return value.ljust(BLOCK, bytes((PAD,)))


def _valid_new_pin(block: bytes) -> bool:
    digits = block.rstrip(bytes((PAD,)))
    return NEW_PIN_MIN <= len(digits) <= NEW_PIN_MAX and digits.isdigit()


def _tries_sw(tries_left: int) -> int:
    return verify_failed(min(tries_left, 15)) if tries_left > 0 else int(SW.AUTH_METHOD_BLOCKED)


class PivPins:
    """PIN and PUK state (persistent, through ``store``) and security status (volatile)."""

    def __init__(self, policy: PinPolicy, store: PinStateStore) -> None:
        self._policy = policy
        self._store = store
        self._state = self._initial()
        self.verified = False
        self.signature_granted = False  # the 9C "PIN Always" grant

    def _initial(self) -> PinState:
        return self._store.load() or PinState(
            pin=self._policy.pin.rstrip(bytes((PAD,))),
            tries_left=self._policy.max_tries,
            unblock_tries_left=self._policy.max_unblock_tries,
        )

    def reload(self) -> None:
        """Re-read the persistent state (another edge of the card may have changed it)."""
        self._state = self._initial()
        self.reset_security_status()

    def reset_security_status(self) -> None:
        self.verified = False
        self.signature_granted = False

    @property
    def state(self) -> PinState:
        return self._state

    # -- the counters ---------------------------------------------------------------

    def _commit(self, state: PinState) -> None:
        if state == self._state:
            return
        try:
            self._store.save(state)
        except Exception as exc:  # the store is I/O we do not control; fail closed
            raise PivError(MEMORY_FAILURE, "PIN state could not be saved") from exc
        self._state = state

    def _puk_block(self) -> bytes:
        code = self._state.unblock_code
        return pad(self._policy.unblock_code if code is None else code)

    @staticmethod
    def _with_tries(state: PinState, ref: int, tries: int) -> PinState:
        if ref == PIN_REF:
            return replace(state, tries_left=tries)
        return replace(state, unblock_tries_left=tries)

    def _check(self, ref: int, block: bytes) -> None:
        """Compare ``block`` with the PIN or PUK, counter decremented first; raise on a miss."""
        state = self._state
        if ref == PIN_REF:
            left, expected = state.tries_left, pad(state.pin)
        else:
            left, expected = state.unblock_tries_left, self._puk_block()
        if left <= 0:
            raise PivError(SW.AUTH_METHOD_BLOCKED)
        self._commit(self._with_tries(state, ref, left - 1))
        if hmac.compare_digest(block, expected):
            full = self._policy.max_tries if ref == PIN_REF else self._policy.max_unblock_tries
            self._commit(self._with_tries(self._state, ref, full))
            return
        if ref == PIN_REF:
            self.reset_security_status()
        raise PivError(verify_failed(min(left - 1, 15)))

    # -- commands ---------------------------------------------------------------------

    def verify(self, p1: int, p2: int, data: bytes) -> bytes:
        """VERIFY (SP 800-73-4 Part 2 §3.2.1)."""
        if p1 not in (0x00, 0xFF):
            raise PivError(SW.INCORRECT_P1P2)
        if p2 != PIN_REF:
            raise PivError(SW.REFERENCED_DATA_NOT_FOUND, "only the PIV Card Application PIN")
        if p1 == 0xFF:
            if data:
                raise PivError(SW.INCORRECT_DATA)
            self.reset_security_status()
            return b""
        if not data:
            if self.verified:
                return b""
            raise PivError(_tries_sw(self._state.tries_left))
        if len(data) != BLOCK:
            raise PivError(SW.INCORRECT_DATA, "the PIN is sent as 8 bytes")
        self._check(PIN_REF, data)
        self.verified = True
        self.signature_granted = True
        return b""

    def change_reference_data(self, p1: int, p2: int, data: bytes) -> bytes:
        """CHANGE REFERENCE DATA (SP 800-73-4 Part 2 §3.2.2)."""
        if p1 != 0x00:
            raise PivError(SW.INCORRECT_P1P2)
        if p2 not in (PIN_REF, PUK_REF):
            raise PivError(SW.REFERENCED_DATA_NOT_FOUND)
        if len(data) != 2 * BLOCK:
            raise PivError(SW.INCORRECT_DATA, "old and new reference data, 8 bytes each")
        old, new = data[:BLOCK], data[BLOCK:]
        if p2 == PIN_REF and not _valid_new_pin(new):
            raise PivError(SW.INCORRECT_DATA, "a new PIN is 6 to 8 digits")
        if p2 == PUK_REF and new == pad(b""):
            raise PivError(SW.INCORRECT_DATA, "a PUK of nothing but padding")
        self._check(p2, old)
        if p2 == PIN_REF:
            self._commit(replace(self._state, pin=new.rstrip(bytes((PAD,)))))
            self.verified = True
        else:
            self._commit(replace(self._state, unblock_code=new.rstrip(bytes((PAD,)))))
        return b""

    def reset_retry_counter(self, p1: int, p2: int, data: bytes) -> bytes:
        """RESET RETRY COUNTER (SP 800-73-4 Part 2 §3.2.3)."""
        if p1 != 0x00:
            raise PivError(SW.INCORRECT_P1P2)
        if p2 != PIN_REF:
            raise PivError(SW.REFERENCED_DATA_NOT_FOUND)
        if len(data) != 2 * BLOCK:
            raise PivError(SW.INCORRECT_DATA, "PUK and new PIN, 8 bytes each")
        puk, new = data[:BLOCK], data[BLOCK:]
        if not _valid_new_pin(new):
            raise PivError(SW.INCORRECT_DATA, "a new PIN is 6 to 8 digits")
        self._check(PUK_REF, puk)
        self._commit(
            replace(self._state, pin=new.rstrip(bytes((PAD,))), tries_left=self._policy.max_tries)
        )
        self.reset_security_status()
        return b""
