"""The card's one global PIN: VERIFY, CHANGE REFERENCE DATA, RESET RETRY COUNTER.

A CAC has a single card-global PIN (clients.md finding 9, pitfall 5): OpenSC verifies
while *some* PKI applet is selected and then signs with another, so the security status
belongs to the card, not to an applet. PIN reference ``00`` (P2=00) is the only one.

Rules, with the ISO/IEC 7816-4:2020 clauses they follow:

* VERIFY §11.5.6: with data, compare; ``63 Cx`` on a mismatch (x = tries left, so the
  try that blocks answers ``63 C0``), ``69 83`` once blocked. Without data, report the
  status: ``90 00`` if verified, else ``63 Cx`` (or ``69 83``). P1=FF without data
  resets the verification status.
* CHANGE REFERENCE DATA §11.5.7: P1=00 data = old PIN || new PIN; P1=01 data = new PIN
  (allowed only while verified).
* RESET RETRY COUNTER §11.5.10: P1=00 data = unblock code || new PIN; P1=01 data =
  unblock code only (the counter is reset, the PIN kept).

OpenSC's cac driver (card-cac.c ``cac_pin_cmd`` → iso7816.c ``iso7816_build_pin_apdu``, and
pkcs15-pin.c ``sc_pkcs15_unblock_pin``) sends every PIN and unblock code as ASCII digits
padded with ``FF`` to 8 bytes (pkcs15-cac.c: stored length 8, pad char FF, min 4, max 8,
NEEDS_PADDING). So ``24`` arrives as ``00 24 00 00 10 <old 8> <new 8>`` and
``pkcs11-tool --unlock-pin`` as ``00 2C 00 00 10 <unblock code 8> <new PIN 8>``; the
unblock code is validated by OpenSC against the PIN's 4..8 length rule.

Anti-tearing: before a reference value is compared, the decremented counter is written
through :meth:`PinStateStore.save`; only a match restores it (saved again). A crash or a
failing store can therefore never hand out a free guess: a store failure (read-only or
full state directory, a corrupt file) answers ``65 81`` and compares nothing. ISO 7816-4
§5.6 Table 6 gives ``65 81`` "memory failure" under "execution error, state of
non-volatile memory changed/unchanged": it is the word for "the card could not write its
memory", which is what happened, and unlike ``69 85``/``69 82`` it tells the host nothing
about the PIN. Comparisons use :func:`hmac.compare_digest`; PIN bytes never appear in
exceptions or logs.

One card, one counter: every command that reads or changes the PIN state does so inside
:meth:`PinStateStore.locked` and re-reads the stored state first, so two card objects over
one store (a reload while a job runs, two slots, two processes) take turns and each
decrement is seen by the next try; the in-memory copy is only a cache.

A card that mirrors a token has no PIN of its own: :class:`TokenPinService` turns VERIFY
into the token's login (libcacard ``vcard_emul_login``, the ``use_hw`` cards), and a cold
reset into its logout (``vcard_emul_reset``). Both services implement :class:`CardPin`,
which is all the card OS and the applets use.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

from usbccid.cac.apdu import CommandApdu
from usbccid.cac.errors import CardError
from usbccid.cac.profile import PinPolicy, PinState, PinStateStore, TokenLogin, TokenPinInfo
from usbccid.cac.sw import SW, verify_failed

PIN_BLOCK_LEN = 8  # CAC PINs are sent FF-padded to 8 bytes (pkcs15-cac.c pins[])
PIN_MIN_LEN = 4
PIN_MAX_LEN = 8
MEMORY_FAILURE = 0x6581  # ISO 7816-4 §5.6, Table 6: 65 81 "memory failure"

log = logging.getLogger(__name__)


class CardPin(Protocol):
    """What the card OS and the applets need of the card's PIN."""

    @property
    def verified(self) -> bool: ...

    def reset_security_status(self) -> None:
        """Forget the verification (power off, cold reset)."""
        ...

    def verify(self, apdu: CommandApdu) -> bytes: ...

    def change_reference_data(self, apdu: CommandApdu) -> bytes: ...

    def reset_retry_counter(self, apdu: CommandApdu) -> bytes: ...


def _strip_padding(block: bytes) -> bytes:
    """Remove the trailing FF padding of a CAC PIN block."""
    return block.rstrip(b"\xff")


def _valid_new_pin(pin: bytes) -> bool:
    return PIN_MIN_LEN <= len(pin) <= PIN_MAX_LEN and pin.isdigit()


def _status_sw(tries_left: int) -> int:
    """The answer to a status query while not verified: 63 Cx, or 69 83 once blocked."""
    return verify_failed(min(tries_left, 15)) if tries_left > 0 else int(SW.AUTH_METHOD_BLOCKED)


def _mismatch_sw(tries_left: int) -> int:
    """The answer to a wrong PIN or code: 63 Cx, so the try that blocks says 63 C0."""
    return verify_failed(min(tries_left, 15))


class PinService:
    """PIN state (persistent, through ``store``) and security status (volatile)."""

    def __init__(self, policy: PinPolicy, store: PinStateStore) -> None:
        self._policy = policy
        self._store = store
        loaded = store.load()
        self._state = loaded or PinState(
            pin=_strip_padding(policy.pin),
            tries_left=policy.max_tries,
            unblock_tries_left=policy.max_unblock_tries,
        )
        self._verified = False

    # -- state ---------------------------------------------------------------

    @property
    def verified(self) -> bool:
        return self._verified

    @property
    def tries_left(self) -> int:
        return self._state.tries_left

    @property
    def unblock_tries_left(self) -> int:
        return self._state.unblock_tries_left

    def reset_security_status(self) -> None:
        """Forget the verification (power off, cold reset)."""
        self._verified = False

    def _locked(self, command: Callable[[], bytes]) -> bytes:
        """Run ``command`` holding the card's lock, on the state as stored right now."""
        try:
            with self._store.locked():
                try:
                    loaded = self._store.load()
                except Exception as exc:  # unreadable or corrupt: never guess a counter
                    log.error("PIN refused: %s", exc)
                    raise CardError(MEMORY_FAILURE, "PIN state could not be read") from exc
                if loaded is not None:
                    self._state = loaded
                return command()
        except CardError:
            raise
        except Exception as exc:  # the lock itself failed (state directory gone...)
            log.error("PIN refused: %s", exc)
            raise CardError(MEMORY_FAILURE, "PIN state could not be locked") from exc

    def _commit(self, state: PinState) -> None:
        """Persist ``state`` before anything depends on it (never answer first)."""
        if state == self._state:
            return
        try:
            self._store.save(state)
        except Exception as exc:  # the store is I/O we do not control; fail closed
            log.error("PIN refused: %s", exc)
            raise CardError(MEMORY_FAILURE, "PIN state could not be saved") from exc
        self._state = state

    def _check_pin(self, candidate: bytes) -> bool:
        """Compare against the PIN with the counter decremented first; maintain the counter."""
        state = self._state
        if state.tries_left <= 0:
            raise CardError(SW.AUTH_METHOD_BLOCKED)
        self._commit(replace(state, tries_left=state.tries_left - 1))
        if hmac.compare_digest(candidate, state.pin):
            self._commit(replace(self._state, tries_left=self._policy.max_tries))
            return True
        self._verified = False
        return False

    def _check_unblock_code(self, candidate: bytes) -> bool:
        state = self._state
        if state.unblock_tries_left <= 0:
            raise CardError(SW.AUTH_METHOD_BLOCKED)
        self._commit(replace(state, unblock_tries_left=state.unblock_tries_left - 1))
        code = state.unblock_code  # changed through a PIV edge of the same card
        expected = _strip_padding(self._policy.unblock_code if code is None else code)
        if hmac.compare_digest(candidate, expected):
            self._commit(replace(self._state, unblock_tries_left=self._policy.max_unblock_tries))
            return True
        return False

    # -- commands --------------------------------------------------------------

    def verify(self, apdu: CommandApdu) -> bytes:
        """VERIFY ``00 20 P1 00 [Lc PIN]`` (ISO 7816-4 §11.5.6)."""
        return self._locked(lambda: self._verify(apdu))

    def _verify(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0x00:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "only the global PIN (00) exists")
        if apdu.p1 == 0xFF:
            if apdu.data:
                raise CardError(SW.WRONG_LENGTH)
            self._verified = False
            return b""
        if apdu.p1 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        if not apdu.data:
            # Status query; a T=0 host sends it as "00 20 00 00 00" (clients.md pitfall 18).
            if self._verified:
                return b""
            raise CardError(_status_sw(self._state.tries_left))
        if len(apdu.data) > PIN_BLOCK_LEN:
            raise CardError(SW.WRONG_LENGTH)
        if self._check_pin(_strip_padding(apdu.data)):
            self._verified = True
            return b""
        raise CardError(_mismatch_sw(self._state.tries_left))

    def change_reference_data(self, apdu: CommandApdu) -> bytes:
        """CHANGE REFERENCE DATA ``00 24 P1 00`` (ISO 7816-4 §11.5.7)."""
        return self._locked(lambda: self._change_reference_data(apdu))

    def _change_reference_data(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0x00:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND)
        if apdu.p1 == 0x00:
            if len(apdu.data) != 2 * PIN_BLOCK_LEN:
                raise CardError(SW.WRONG_LENGTH)
            old = _strip_padding(apdu.data[:PIN_BLOCK_LEN])
            new = _strip_padding(apdu.data[PIN_BLOCK_LEN:])
        elif apdu.p1 == 0x01:
            if not 0 < len(apdu.data) <= PIN_BLOCK_LEN:
                raise CardError(SW.WRONG_LENGTH)
            old = None
            new = _strip_padding(apdu.data)
        else:
            raise CardError(SW.INCORRECT_P1P2)
        if not _valid_new_pin(new):
            raise CardError(SW.INCORRECT_DATA, "new PIN must be 4 to 8 digits")
        if old is None:
            if self._state.tries_left <= 0:
                raise CardError(SW.AUTH_METHOD_BLOCKED)
            if not self._verified:
                raise CardError(SW.SECURITY_STATUS_NOT_SATISFIED)
        elif not self._check_pin(old):
            raise CardError(_mismatch_sw(self._state.tries_left))
        self._commit(replace(self._state, pin=new, tries_left=self._policy.max_tries))
        self._verified = True
        return b""

    def reset_retry_counter(self, apdu: CommandApdu) -> bytes:
        """RESET RETRY COUNTER ``00 2C P1 00`` (ISO 7816-4 §11.5.10)."""
        return self._locked(lambda: self._reset_retry_counter(apdu))

    def _reset_retry_counter(self, apdu: CommandApdu) -> bytes:
        if apdu.p2 != 0x00:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND)
        if apdu.p1 == 0x00:
            if len(apdu.data) != 2 * PIN_BLOCK_LEN:
                raise CardError(SW.WRONG_LENGTH)
            code = _strip_padding(apdu.data[:PIN_BLOCK_LEN])
            new: bytes | None = _strip_padding(apdu.data[PIN_BLOCK_LEN:])
            if new is not None and not _valid_new_pin(new):
                raise CardError(SW.INCORRECT_DATA, "new PIN must be 4 to 8 digits")
        elif apdu.p1 == 0x01:
            if not 0 < len(apdu.data) <= PIN_BLOCK_LEN:
                raise CardError(SW.WRONG_LENGTH)
            code = _strip_padding(apdu.data)
            new = None
        else:
            # P1=02/03 (new PIN without the code, or nothing) would need the unblock code
            # verified beforehand; a CAC has no separate way to do that.
            raise CardError(SW.INCORRECT_P1P2)
        if not self._check_unblock_code(code):
            raise CardError(_mismatch_sw(self._state.unblock_tries_left))
        pin = self._state.pin if new is None else new
        self._commit(replace(self._state, pin=pin, tries_left=self._policy.max_tries))
        self._verified = False
        return b""


#: Longest token PIN VERIFY accepts (a short APDU's data). CAC hosts send at most 8 bytes.
TOKEN_PIN_MAX_LEN = 255


def token_pin_sw(info: TokenPinInfo) -> int:
    """The status word for a token user that is not logged in, from the token's flags.

    PKCS#11 reports no count, so: CKF_USER_PIN_LOCKED -> 69 83; CKF_USER_PIN_FINAL_TRY
    -> 63 C1; CKF_USER_PIN_COUNT_LOW -> 63 C2 (low, but not the last try); no flag -> 63 C3
    (the CAC default of three tries; the token says nothing more).
    """
    if info.locked:
        return int(SW.AUTH_METHOD_BLOCKED)
    if info.final_try:
        return verify_failed(1)
    if info.count_low:
        return verify_failed(2)
    return verify_failed(3)


class TokenPinService:
    """The PIN of a card mirroring a token: VERIFY logs the token's user in.

    As libcacard's ``vcard_emul_login``: trailing FF padding is stripped and the token is
    logged out before each login, so a failed VERIFY leaves the card unverified; a token
    that needs no login (CKF_LOGIN_REQUIRED clear, e.g. an NSS database without a
    password) counts as verified and VERIFY does not call it. Unlike libcacard, a wrong
    PIN answers 63 Cx (from the token's flags, :func:`token_pin_sw`) rather than 69 85,
    so that OpenSC reports "PIN incorrect". The PIN is the token's business: CHANGE
    REFERENCE DATA and RESET RETRY COUNTER answer 6A 81 (function not supported).
    """

    def __init__(self, login: TokenLogin) -> None:
        self._login = login
        self._verified = False

    @property
    def verified(self) -> bool:
        return self._verified

    def reset_security_status(self) -> None:
        """Log the token out; a token that needs no login is verified straight away."""
        self._verified = False
        self._login.logout()
        try:
            self._verified = not self._login.pin_info().login_required
        except CardError:
            self._verified = False  # the token is gone: its removal is reported elsewhere

    def verify(self, apdu: CommandApdu) -> bytes:
        """VERIFY ``00 20 P1 00 [Lc PIN]`` (ISO 7816-4 §11.5.6) against the token."""
        if apdu.p2 != 0x00:
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND, "only the global PIN (00) exists")
        if apdu.p1 == 0xFF:
            if apdu.data:
                raise CardError(SW.WRONG_LENGTH)
            self.reset_security_status()
            return b""
        if apdu.p1 != 0x00:
            raise CardError(SW.INCORRECT_P1P2)
        if not apdu.data:
            info = self._login.pin_info()
            if not info.login_required:
                self._verified = True
                return b""
            if info.logged_in is False:
                self._verified = False  # logged out behind the card's back (a shared login)
            if self._verified:
                return b""
            raise CardError(token_pin_sw(info))
        if len(apdu.data) > TOKEN_PIN_MAX_LEN:
            raise CardError(SW.WRONG_LENGTH)
        self._verified = False
        self._login.logout()
        if not self._login.pin_info().login_required:
            self._verified = True
            return b""
        if self._login.login(_strip_padding(apdu.data)):
            self._verified = True
            return b""
        raise CardError(token_pin_sw(self._login.pin_info()))

    def change_reference_data(self, apdu: CommandApdu) -> bytes:
        raise CardError(SW.FUNCTION_NOT_SUPPORTED, "the PIN belongs to the token")

    def reset_retry_counter(self, apdu: CommandApdu) -> bytes:
        raise CardError(SW.FUNCTION_NOT_SUPPORTED, "the PIN belongs to the token")
