"""Cards that mirror a PKCS#11 token: the keys stay on the token, the PIN is its login.

This is libcacard's ``use_hw`` (vcard_emul_nss.c ``vcard_emul_mirror_card``) on top of
python-pkcs11 (plus :mod:`usbccid.cards._cryptoki` for the calls python-pkcs11 lacks):

* the token is chosen by label or serial; its certificates become the card's PKI
  containers, by ``CKA_ID`` (default: every X.509 certificate whose ``CKA_ID`` names a
  key on the token, sorted by ``CKA_ID`` as libcacard does since 961eca7);
* the card's VERIFY is the token's ``C_Login`` (:class:`TokenConnection` implements
  :class:`usbccid.cac.profile.TokenLogin`); power off and card reset log out;
* SIGN/DECRYPT is done on the token: ``CKM_RSA_X_509`` (``C_Decrypt``, or ``C_Sign``
  for a key that may only sign) when the token has it; otherwise, as libcacard's
  ``vcard_emul_rsa_op`` (tested by its ``hwtests_no_raw``): an input that is a PKCS#1
  v1.5 type 1 block (``00 01 FF.. 00 DigestInfo``) is signed with ``CKM_RSA_PKCS``, and
  anything else is decrypted with ``CKM_RSA_PKCS`` and re-padded as a type 2 block;
* private-key handles are looked up after each login (SoftHSM invalidates them on
  logout, the reason libcacard 2.8.0 stopped caching them); containers hold only the
  ``CKA_ID`` and the public key;
* a token removed from its slot is a card removal, its return an insertion:
  :meth:`Pkcs11Source.poll` (the shell calls it now and then, off the event loop)
  reports both, from a transition table (:data:`PRESENCE_TRANSITIONS`).

All token I/O happens in the methods of this module, never in the CAC layer's own code;
the card built here is ``blocking``, so the CCID reader runs its commands as jobs.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol, cast

import pkcs11
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import Encoding
from pkcs11 import Attribute, CertificateType, KeyType, Mechanism, MechanismFlag, ObjectClass
from pkcs11 import _pkcs11 as _p11
from pkcs11 import exceptions as p11x

from usbccid.cac.applets.pki import MAX_PKI_CONTAINERS
from usbccid.cac.card import CacCard
from usbccid.cac.errors import CardError
from usbccid.cac.profile import TokenCardProfile, TokenContainer, TokenPinInfo
from usbccid.cac.rsa_raw import check_input, verify_result
from usbccid.cac.sw import SW
from usbccid.card import Card
from usbccid.cards import _cryptoki
from usbccid.cards.source import CardLoadError
from usbccid.tool.schema import Checker, KeyPath

log = logging.getLogger(__name__)

#: CKF_USER_PIN_* token flags (PKCS#11 v2.40 §3.2, Table 8).
CKF_LOGIN_REQUIRED = 0x00000004
CKF_TOKEN_INITIALIZED = 0x00000400
CKF_USER_PIN_COUNT_LOW = 0x00010000
CKF_USER_PIN_FINAL_TRY = 0x00020000
CKF_USER_PIN_LOCKED = 0x00040000
CKR_USER_ALREADY_LOGGED_IN = 0x100

MEMORY_FAILURE = 0x6581


class TokenSourceError(CardLoadError):
    """A token card source cannot be used as configured. One line, for stderr."""


# --------------------------------------------------------------------------- modules


class _PreInitialisedLib(_p11.lib):
    """python-pkcs11's library object for a module we initialised ourselves.

    ``lib.__init__`` calls ``initialize()``, which would call ``C_Initialize(NULL)``
    (see :mod:`usbccid.cards._cryptoki` for why we do not); python-pkcs11 then never
    finalises the module either.

    Instances are never deallocated (:func:`_keep`): the module stays loaded for the life
    of the process anyway, and python-pkcs11's ``__dealloc__`` looks ``unload`` up on the
    instance, which fails for a Python subclass once interpreter shutdown has cleared the
    subclass (an "Exception ignored" message at every exit).
    """

    def initialize(self) -> None:
        pass


def _keep(obj: object) -> None:
    """Take a reference that is never released."""
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(obj))


class Module:
    """One PKCS#11 module, loaded and initialised once per process (``Module.load``)."""

    _loaded: dict[str, Module] = {}  # noqa: RUF012 - the process-wide registry
    _registry_lock = threading.Lock()

    def __init__(self, path: str, library_parameters: str | None) -> None:
        self.path = path
        self.library_parameters = library_parameters
        self.finalized = False
        try:
            self.functions = _cryptoki.load(path)
        except OSError as exc:
            raise TokenSourceError(f"PKCS#11 module {path}: cannot load: {exc}") from None
        except _cryptoki.CryptokiError as exc:
            raise TokenSourceError(f"PKCS#11 module {path}: not a PKCS#11 module: {exc}") from None
        try:
            self.functions.initialize(library_parameters)
        except _cryptoki.CryptokiError as exc:
            raise TokenSourceError(f"PKCS#11 module {path}: {exc}") from None
        try:
            self.lib = _PreInitialisedLib(path)
        except p11x.PKCS11Error as exc:  # pragma: no cover - loaded and initialised above
            raise TokenSourceError(f"PKCS#11 module {path}: {_describe(exc)}") from None
        _keep(self.lib)

    @classmethod
    def load(cls, path: str, library_parameters: str | None = None) -> Module:
        """The module at ``path``, loaded on first use.

        Raises:
            TokenSourceError: it does not load or initialise, or it is already loaded
                with other library parameters (a module is initialised once per process).
        """
        with cls._registry_lock:
            module = cls._loaded.get(path)
            if module is None:
                module = cls._loaded[path] = Module(path, library_parameters)
            elif module.library_parameters != library_parameters:
                raise TokenSourceError(
                    f"PKCS#11 module {path}: already initialised with other parameters"
                )
            return module

    def finalize(self) -> None:
        """C_Finalize and forget the module (tests; every session becomes invalid)."""
        with self._registry_lock:
            if self._loaded.get(self.path) is self:
                del self._loaded[self.path]
        self.finalized = True
        self.functions.finalize()

    def tokens(self) -> list[pkcs11.Token]:
        """The initialised tokens present now (one that cannot be read is skipped).

        SoftHSM, for one, always offers an uninitialised token in a spare slot.
        """
        found = []
        for slot in self.lib.get_slots(token_present=True):
            try:
                token = slot.get_token()
            except p11x.PKCS11Error:
                continue
            if token.flags & CKF_TOKEN_INITIALIZED:
                found.append(token)
        return found


def _describe(exc: BaseException) -> str:
    """A PKCS#11 failure in a few words (python-pkcs11 raises one class per CKR_)."""
    text = str(exc)
    return type(exc).__name__ + (f": {text}" if text else "")


def _token_serial(token: pkcs11.Token) -> str:
    return token.serial.decode("ascii", "replace").strip()


@dataclass(frozen=True)
class TokenSelector:
    """Which token: by label and/or serial (CK_TOKEN_INFO, blank-padded fields stripped)."""

    label: str | None = None
    serial: str | None = None

    def matches(self, token: pkcs11.Token) -> bool:
        if self.label is not None and token.label.strip() != self.label:
            return False
        return self.serial is None or _token_serial(token) == self.serial

    def describe(self) -> str:
        parts = []
        if self.label is not None:
            parts.append(f"label {self.label!r}")
        if self.serial is not None:
            parts.append(f"serial {self.serial!r}")
        return "token " + (" and ".join(parts) if parts else "(any)")


def find_token(module: Module, selector: TokenSelector) -> pkcs11.Token | None:
    """The one present token ``selector`` matches, or None.

    Raises:
        TokenSourceError: several tokens match.
    """
    matching = [t for t in module.tokens() if selector.matches(t)]
    if len(matching) > 1:
        names = ", ".join(f"{t.label.strip()!r} (serial {_token_serial(t)})" for t in matching)
        raise TokenSourceError(
            f"PKCS#11 module {module.path}: {len(matching)} tokens match: {names}; "
            "choose one by serial"
        )
    return matching[0] if matching else None


# --------------------------------------------------------------------------- the connection


class _PrivateKey(Protocol):
    """What is used of python-pkcs11's RSA private key objects (its stubs lack the mixins)."""

    def __getitem__(self, key: Attribute) -> Any: ...

    def sign(self, data: bytes, *, mechanism: Mechanism) -> bytes: ...

    def decrypt(self, data: bytes, *, mechanism: Mechanism) -> bytes: ...


#: python-pkcs11 exceptions meaning the token or the session is gone.
_GONE = (
    p11x.DeviceRemoved,
    p11x.TokenNotPresent,
    p11x.SessionHandleInvalid,
    p11x.SessionClosed,
    p11x.DeviceError,
    p11x.TokenNotRecognised,
    p11x.SlotIDInvalid,
)
#: ... meaning the token refused this input or this use of the key (libcacard: 69 84).
_REFUSED = (
    p11x.DataInvalid,
    p11x.DataLenRange,
    p11x.EncryptedDataInvalid,
    p11x.EncryptedDataLenRange,
    p11x.MechanismInvalid,
    p11x.MechanismParamInvalid,
    p11x.KeyTypeInconsistent,
    p11x.KeySizeRange,
    p11x.FunctionNotSupported,
    p11x.FunctionFailed,
    p11x.GeneralError,
)
#: ... meaning the handle went stale (look the key up again, once).
_STALE = (p11x.ObjectHandleInvalid, p11x.KeyHandleInvalid)

#: C_Login return values meaning "wrong PIN" (the token may have counted it).
_WRONG_PIN = frozenset({0x0A0, 0x0A1, 0x0A2})  # PIN_INCORRECT, PIN_INVALID, PIN_LEN_RANGE
_LOGIN_GONE = frozenset({0x030, 0x032, 0x0B0, 0x0B3, 0x0E0, 0x0E1})


def _card_error(exc: p11x.PKCS11Error, what: str) -> CardError:
    """The status word for a failed token operation (libcacard ``vcard_emul_map_error``)."""
    if isinstance(exc, p11x.UserNotLoggedIn):
        return CardError(SW.SECURITY_STATUS_NOT_SATISFIED, f"{what}: token user not logged in")
    if isinstance(exc, p11x.HostMemory | p11x.DeviceMemory):
        return CardError(MEMORY_FAILURE, f"{what}: {_describe(exc)}")
    if isinstance(exc, _REFUSED):
        return CardError(SW.REFERENCE_DATA_NOT_USABLE, f"{what}: {_describe(exc)}")
    return CardError(SW.NO_PRECISE_DIAGNOSIS, f"{what}: {_describe(exc)}")


def pkcs1_type1_payload(block: bytes) -> bytes | None:
    """The data of ``00 01 FF.. 00 data`` (RFC 8017 §9.2 EMSA-PKCS1-v1_5), else None.

    As libcacard: any run of FF (the token's CKM_RSA_PKCS sign re-creates the same run
    for the same data length, and the result is checked against the input).
    """
    if len(block) < 3 or block[0] != 0x00 or block[1] != 0x01:
        return None
    i = 2
    while i < len(block) and block[i] == 0xFF:
        i += 1
    if i >= len(block) or block[i] != 0x00:
        return None
    return block[i + 1 :]


def pkcs1_type2_block(plaintext: bytes, k: int, random_bytes: Any = secrets.token_bytes) -> bytes:
    """``00 02 PS 00 plaintext`` of length ``k``, PS non-zero random (RFC 8017 §7.2.1).

    The token stripped the original padding; the host only strips this one again.
    """
    pad = k - 3 - len(plaintext)
    if pad < 8:
        raise CardError(SW.NO_PRECISE_DIAGNOSIS, "token plaintext too long for PKCS#1")
    ps = bytearray()
    while len(ps) < pad:
        ps += bytes(b for b in random_bytes(pad - len(ps) + 8) if b)
    return b"\x00\x02" + bytes(ps[:pad]) + b"\x00" + plaintext


class RawMode(enum.Enum):
    """How a key's raw operation is done (libcacard's ``failedX509`` tri-state)."""

    UNKNOWN = enum.auto()  # CKM_RSA_X_509 not tried yet
    X509 = enum.auto()  # CKM_RSA_X_509 works
    PKCS1 = enum.auto()  # emulated with CKM_RSA_PKCS


class TokenConnection:
    """One card's session with its token: login, logout, and the private operations.

    Implements :class:`usbccid.cac.profile.TokenLogin`. Every method takes ``lock``:
    the card's jobs and the shell's presence poll may run on different threads, and a
    PKCS#11 session must not be used by two at once (v2.40 §5.6).
    """

    def __init__(self, module: Module, token: pkcs11.Token) -> None:
        self.module = module
        self.token = token
        self.slot = token.slot
        self.serial = _token_serial(token)
        self.lock = threading.RLock()
        #: The session is unusable: the token went away, or a search failed (python-pkcs11
        #: then keeps the session's operation lock, so no other thread may use it again).
        #: The presence poll replaces a card whose connection is gone.
        self.gone = False
        self.closed = False
        try:
            self.session = token.open()
            mechanisms = self.slot.get_mechanisms()
            self._raw_flags = MechanismFlag(0)
            if Mechanism.RSA_X_509 in mechanisms:
                self._raw_flags = self.slot.get_mechanism_info(Mechanism.RSA_X_509).flags
        except p11x.PKCS11Error as exc:
            raise TokenSourceError(
                f"PKCS#11 module {module.path}: token {self.serial}: {_describe(exc)}"
            ) from None
        self._keys: dict[bytes, _PrivateKey] = {}
        self._modes: dict[bytes, RawMode] = {}
        self.logins = 0  # successful C_Login calls (for tests and ``card show``)
        self.logged_in = False  # by this connection's C_Login

    @property
    def has_raw_rsa(self) -> bool:
        """The token lists CKM_RSA_X_509 for decrypt or sign."""
        return bool(self._raw_flags & (MechanismFlag.DECRYPT | MechanismFlag.SIGN))

    def _handle(self) -> int:
        return int(cast(Any, self.session).handle)

    @property
    def alive(self) -> bool:
        return not (self.gone or self.closed or self.module.finalized)

    def _alive(self) -> None:
        """Fail fast on a session known dead (removed token, failed search; see ``gone``)."""
        if not self.alive:
            raise CardError(SW.NO_PRECISE_DIAGNOSIS, "token session lost")

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self._keys.clear()
            # A failure means the token is gone, or the module closed the session itself.
            with contextlib.suppress(p11x.PKCS11Error):
                self.session.close()

    # -- TokenLogin ----------------------------------------------------------------

    def pin_info(self) -> TokenPinInfo:
        with self.lock:
            self._alive()
            try:
                flags = int(self.slot.get_token().flags)
            except p11x.PKCS11Error as exc:
                self.gone = True
                raise CardError(SW.NO_PRECISE_DIAGNOSIS, f"token: {_describe(exc)}") from None
            return TokenPinInfo(
                login_required=bool(flags & CKF_LOGIN_REQUIRED),
                count_low=bool(flags & CKF_USER_PIN_COUNT_LOW),
                final_try=bool(flags & CKF_USER_PIN_FINAL_TRY),
                locked=bool(flags & CKF_USER_PIN_LOCKED),
                logged_in=self._user_logged_in(),
            )

    def login(self, pin: bytes) -> bool:
        with self.lock:
            self._alive()
            self._keys.clear()
            self.logged_in = False
            rv = self.module.functions.login(self._handle(), pin)
            if rv == CKR_USER_ALREADY_LOGGED_IN:
                # Someone else in this process logged the token in (the login state is
                # per application, not per session): C_Login did not check this PIN.
                # Log out and try once more, so that a wrong PIN is never accepted.
                self.module.functions.logout(self._handle())
                rv = self.module.functions.login(self._handle(), pin)
                if rv == CKR_USER_ALREADY_LOGGED_IN:
                    raise CardError(SW.CONDITIONS_NOT_SATISFIED, "token: another login in the way")
            if rv == _cryptoki.CKR_OK:
                self.logins += 1
                self.logged_in = True
                return True
            if rv in _WRONG_PIN:
                return False
            name = _cryptoki.rv_name(rv)
            if rv == 0x0A4:  # CKR_PIN_LOCKED
                raise CardError(SW.AUTH_METHOD_BLOCKED, "token: PIN locked")
            if rv == 0x0A3:  # CKR_PIN_EXPIRED: only C_SetPIN would be allowed
                raise CardError(SW.REFERENCE_DATA_NOT_USABLE, "token: PIN expired")
            if rv in _LOGIN_GONE:
                self.gone = True
            raise CardError(SW.NO_PRECISE_DIAGNOSIS, f"token: C_Login: {name}")

    def _user_logged_in(self) -> bool:
        try:
            return self.module.functions.user_logged_in(self._handle())
        except _cryptoki.CryptokiError:
            return self.logged_in

    def logout(self) -> None:
        with self.lock:
            self._keys.clear()
            self.logged_in = False
            if self.gone or self.closed:
                return
            # CKR_USER_NOT_LOGGED_IN is the usual answer; any other failure means the
            # session or the token is gone, and then nobody is logged in either.
            self.module.functions.logout(self._handle())

    # -- keys ----------------------------------------------------------------------

    def _private_key(self, key_id: bytes, public: rsa.RSAPublicNumbers) -> _PrivateKey:
        key = self._keys.get(key_id)
        if key is not None:
            return key
        attrs = {
            Attribute.CLASS: ObjectClass.PRIVATE_KEY,
            Attribute.KEY_TYPE: KeyType.RSA,
            Attribute.ID: key_id,
        }
        try:
            candidates = list(self.session.get_objects(attrs))
            for candidate in candidates:
                try:
                    modulus = candidate[Attribute.MODULUS]
                except p11x.PKCS11Error:
                    modulus = None  # unreadable on this token: trust the CKA_ID
                if modulus is None or int.from_bytes(modulus, "big") == public.n:
                    key = cast(_PrivateKey, candidate)
                    break
        except p11x.PKCS11Error as exc:
            self.gone = True
            raise _card_error(exc, "token: finding the key") from None
        if key is None:
            # Private keys are invisible until login (CKA_PRIVATE): say "verify first"
            # when that may be why (the token may also have been logged out behind our
            # back: the login is shared by every session of the process), else it is missing.
            if not self._user_logged_in() and self.pin_info().login_required:
                raise CardError(SW.SECURITY_STATUS_NOT_SATISFIED, "token: no key before login")
            raise CardError(SW.REFERENCED_DATA_NOT_FOUND, f"token: no private key {key_id.hex()}")
        self._keys[key_id] = key
        return key

    def raw_rsa(self, key_id: bytes, public: rsa.RSAPublicNumbers, block: bytes) -> bytes:
        """``block^d mod n`` with the private key ``key_id`` (see the module docstring)."""
        c = check_input(public, block)
        with self.lock:
            self._alive()
            for attempt in (1, 2):
                key = self._private_key(key_id, public)
                try:
                    return self._raw_with(key, key_id, public, block, c)
                except _STALE as exc:
                    self._keys.pop(key_id, None)  # handle invalidated: look it up again
                    if attempt == 2:
                        raise _card_error(exc, "token") from None
                except _GONE as exc:
                    self.gone = True
                    raise _card_error(exc, "token") from None
                except p11x.PKCS11Error as exc:
                    raise _card_error(exc, "token") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _raw_with(
        self,
        key: _PrivateKey,
        key_id: bytes,
        public: rsa.RSAPublicNumbers,
        block: bytes,
        c: int,
    ) -> bytes:
        k = len(block)
        mode = self._modes.get(key_id, RawMode.UNKNOWN)
        if mode is not RawMode.PKCS1 and self.has_raw_rsa:
            try:
                out = self._x509(key, block)
            except (*_GONE, *_STALE, p11x.UserNotLoggedIn):
                raise
            except p11x.PKCS11Error:
                if mode is RawMode.X509:
                    raise  # it worked before: this failure is about this input
                out = None
            if out is not None and len(out) <= k:
                m = int.from_bytes(out, "big")
                if verify_result(public, c, m):
                    self._modes[key_id] = RawMode.X509
                    return m.to_bytes(k, "big")
            if mode is RawMode.X509:
                raise CardError(SW.NO_PRECISE_DIAGNOSIS, "token: raw RSA result is wrong")
            log.info("token %s: CKM_RSA_X_509 does not work, using CKM_RSA_PKCS", self.serial)
        # Emulation with CKM_RSA_PKCS (libcacard vcard_emul_rsa_op, "hwtests_no_raw").
        self._modes[key_id] = RawMode.PKCS1
        payload = pkcs1_type1_payload(block)
        if payload is not None:
            signature = key.sign(payload, mechanism=Mechanism.RSA_PKCS)
            m = int.from_bytes(signature, "big")
            if len(signature) > k or not verify_result(public, c, m):
                raise CardError(SW.NO_PRECISE_DIAGNOSIS, "token: signature does not check")
            return m.to_bytes(k, "big")
        plaintext = key.decrypt(block, mechanism=Mechanism.RSA_PKCS)
        return pkcs1_type2_block(plaintext, k)

    def _x509(self, key: _PrivateKey, block: bytes) -> bytes:
        """The raw operation with CKM_RSA_X_509: C_Decrypt if allowed, else C_Sign."""
        can_decrypt = self._raw_flags & MechanismFlag.DECRYPT and _allows(key, Attribute.DECRYPT)
        if can_decrypt or not self._raw_flags & MechanismFlag.SIGN:
            return key.decrypt(block, mechanism=Mechanism.RSA_X_509)
        return key.sign(block, mechanism=Mechanism.RSA_X_509)


def _allows(key: _PrivateKey, attribute: Attribute) -> bool:
    try:
        return bool(key[attribute])
    except p11x.PKCS11Error:
        return True  # unknown: let the token decide


@dataclass(frozen=True)
class TokenKey:
    """A container key on a token: only its ``CKA_ID``, its public key and the connection.

    Implements :class:`usbccid.cac.profile.ContainerKey`. No private key material, and no
    object handle either (those are looked up after each login).
    """

    connection: TokenConnection
    key_id: bytes
    public: rsa.RSAPublicKey = field(repr=False)

    @property
    def key_size(self) -> int:
        return self.public.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self.public

    def raw_rsa(self, block: bytes) -> bytes:
        return self.connection.raw_rsa(self.key_id, self.public.public_numbers(), block)


# --------------------------------------------------------------------------- the card


@dataclass(frozen=True)
class TokenCertificate:
    """An X.509 certificate object on the token."""

    key_id: bytes
    label: str
    certificate: x509.Certificate


def token_certificates(
    session: pkcs11.Session, where: str, *, rsa_only: bool = True
) -> list[TokenCertificate]:
    """The token's X.509 certificate objects (with an RSA key), in ``CKA_ID`` order."""
    found = []
    try:
        objects = list(
            session.get_objects(
                {
                    Attribute.CLASS: ObjectClass.CERTIFICATE,
                    Attribute.CERTIFICATE_TYPE: CertificateType.X_509,
                }
            )
        )
        for obj in objects:
            key_id = bytes(obj[Attribute.ID])
            label = str(obj[Attribute.LABEL])
            der = bytes(obj[Attribute.VALUE])
            try:
                cert = x509.load_der_x509_certificate(der)
            except ValueError:
                log.warning("%s: certificate %r is not valid DER, skipped", where, label)
                continue
            if rsa_only and not isinstance(cert.public_key(), rsa.RSAPublicKey):
                log.info("%s: certificate %r has no RSA key, skipped", where, label)
                continue
            found.append(TokenCertificate(key_id, label, cert))
    except p11x.PKCS11Error as exc:
        raise TokenSourceError(f"{where}: reading certificates: {_describe(exc)}") from None
    found.sort(key=lambda c: c.key_id)
    return found


def key_ids(session: pkcs11.Session, where: str) -> set[bytes]:
    """``CKA_ID`` of the RSA keys visible now (public keys, and private ones if visible)."""
    ids = set()
    try:
        for cls in (ObjectClass.PRIVATE_KEY, ObjectClass.PUBLIC_KEY):
            for obj in session.get_objects({Attribute.CLASS: cls, Attribute.KEY_TYPE: KeyType.RSA}):
                ids.add(bytes(obj[Attribute.ID]))
    except p11x.PKCS11Error as exc:
        raise TokenSourceError(f"{where}: reading keys: {_describe(exc)}") from None
    return ids


def select_containers(
    certificates: Sequence[TokenCertificate],
    with_keys: set[bytes],
    wanted: Sequence[bytes] | None,
    where: str,
) -> list[TokenCertificate]:
    """The certificates that become containers, in container order.

    ``wanted`` (``CKA_ID`` values) picks them explicitly; by default every certificate
    whose ``CKA_ID`` names a key visible now (certificates without one are CA or other
    people's certificates). A token that hides all its keys until login needs ``wanted``.

    Raises:
        TokenSourceError: an ID names no certificate; nothing to use; too many.
    """
    by_id: dict[bytes, TokenCertificate] = {}
    for cert in certificates:
        by_id.setdefault(cert.key_id, cert)
    if wanted is not None:
        missing = [i.hex() for i in wanted if i not in by_id]
        if missing:
            have = ", ".join(i.hex() for i in by_id) or "none"
            raise TokenSourceError(
                f"{where}: no certificate with CKA_ID {', '.join(missing)} (the token has: {have})"
            )
        chosen = [by_id[i] for i in wanted]
    else:
        chosen = [c for i, c in by_id.items() if i in with_keys]
        if not chosen:
            detail = (
                f"{len(by_id)} certificates, none with a key visible before login; list them by ids"
                if by_id
                else "no RSA certificate"
            )
            raise TokenSourceError(f"{where}: {detail}")
    if len(chosen) > MAX_PKI_CONTAINERS:
        raise TokenSourceError(
            f"{where}: {len(chosen)} certificates; a CAC holds at most {MAX_PKI_CONTAINERS}"
        )
    return chosen


def card_id_for(kind: str, identity: str, first: x509.Certificate) -> bytes:
    """A card ID stable for one token and its first certificate (CCC, GP CPLC, serial)."""
    der = first.public_bytes(Encoding.DER)
    return hashlib.sha256(f"{kind}\0{identity}\0".encode() + der).digest()[:16]


def make_card(
    connection: TokenConnection,
    chosen: Iterable[TokenCertificate],
    card_id: bytes,
) -> CacCard:
    containers = []
    for cert in chosen:
        public = cert.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        key = TokenKey(connection, cert.key_id, public)
        containers.append(TokenContainer(cert.label, cert.certificate, key))
    return CacCard(TokenCardProfile(card_id, tuple(containers), connection))


# --------------------------------------------------------------------------- the source


@dataclass(frozen=True)
class Pkcs11Config:
    """A ``pkcs11`` card source: a module, a token in it, and the containers to show.

    ``library_parameters`` is the non-standard string some modules need in
    ``C_Initialize`` (NSS softokn's ``configdir=...``; p11-kit calls it
    ``x-init-reserved``); ``ids`` are ``CKA_ID`` values in container order.
    """

    module: str
    token: TokenSelector = TokenSelector()
    ids: tuple[bytes, ...] | None = None
    library_parameters: str | None = None

    def describe(self) -> str:
        return f"PKCS#11 module {self.module}, {self.token.describe()}"


@dataclass(frozen=True)
class ContainerInfo:
    key_id: bytes
    label: str
    subject: str
    key_size: int
    not_after: str


@dataclass(frozen=True)
class SourceInfo:
    """What ``check`` found (for ``--check`` and ``usbccid card show``)."""

    description: str
    token_label: str
    token_serial: str
    raw_rsa: bool  # CKM_RSA_X_509; else the CKM_RSA_PKCS emulation
    login_required: bool
    containers: tuple[ContainerInfo, ...]
    pin_checked: bool = False


def container_info(chosen: Iterable[TokenCertificate]) -> tuple[ContainerInfo, ...]:
    out = []
    for c in chosen:
        public = c.certificate.public_key()
        assert isinstance(public, rsa.RSAPublicKey)
        out.append(
            ContainerInfo(
                c.key_id,
                c.label,
                c.certificate.subject.rfc4514_string(),
                public.key_size,
                c.certificate.not_valid_after_utc.isoformat(),
            )
        )
    return tuple(out)


class PresenceAction(enum.Enum):
    INSERT = enum.auto()
    REMOVE = enum.auto()


class Observation(enum.Enum):
    ABSENT = enum.auto()  # no matching token (or it cannot be read)
    SAME = enum.auto()  # the token the card was made from
    OTHER = enum.auto()  # a matching token, not the one the card was made from


#: (card present?, what the poll saw) -> what the slot must do, in order.
PRESENCE_TRANSITIONS: dict[tuple[bool, Observation], tuple[PresenceAction, ...]] = {
    (False, Observation.ABSENT): (),
    (False, Observation.SAME): (PresenceAction.INSERT,),
    (False, Observation.OTHER): (PresenceAction.INSERT,),
    (True, Observation.ABSENT): (PresenceAction.REMOVE,),
    (True, Observation.SAME): (),
    (True, Observation.OTHER): (PresenceAction.REMOVE, PresenceAction.INSERT),
}


@dataclass(frozen=True)
class PresenceEvent:
    """A change :meth:`Pkcs11Source.poll` saw: ``card`` is set for an insertion."""

    action: PresenceAction
    card: CacCard | None = None


@dataclass(frozen=True)
class _Identity:
    slot_id: int
    serial: str


class Pkcs11Source:
    """The configured token as a card that comes and goes with the token.

    ``open()`` makes the card for the token present now; ``poll()`` reports its removal
    and (re)insertion. Both do token I/O: call them off the event loop.
    """

    kind = "pkcs11"

    def __init__(self, config: Pkcs11Config) -> None:
        self.config = config
        self._connection: TokenConnection | None = None
        self._identity: _Identity | None = None
        self._unusable: _Identity | None = None  # a present token we could not use
        self.card: CacCard | None = None

    def module(self) -> Module:
        return Module.load(self.config.module, self.config.library_parameters)

    @property
    def place(self) -> object:
        return ("pkcs11", os.path.realpath(self.config.module), self.config.token)

    def _where(self, token: pkcs11.Token) -> str:
        return f"PKCS#11 module {self.config.module}: token {token.label.strip()!r}"

    def _find(self) -> pkcs11.Token | None:
        return find_token(self.module(), self.config.token)

    def _require(self) -> pkcs11.Token:
        token = self._find()
        if token is None:
            present = ", ".join(
                f"{t.label.strip()!r} (serial {_token_serial(t)})" for t in self.module().tokens()
            )
            raise TokenSourceError(
                f"{self.config.describe()}: token not present"
                + (f" (present: {present})" if present else " (no token present)")
            )
        return token

    def _chosen(self, token: pkcs11.Token, session: pkcs11.Session) -> list[TokenCertificate]:
        where = self._where(token)
        certificates = token_certificates(session, where)
        with_keys = key_ids(session, where) if self.config.ids is None else set()
        return select_containers(certificates, with_keys, self.config.ids, where)

    def _build(self, token: pkcs11.Token) -> CacCard:
        connection = TokenConnection(self.module(), token)
        try:
            chosen = self._chosen(token, connection.session)
            card_id = card_id_for(self.kind, _token_serial(token), chosen[0].certificate)
            card = make_card(connection, chosen, card_id)
        except BaseException:
            connection.close()
            raise
        self._close()
        self._connection = connection
        self._identity = _Identity(token.slot.slot_id, connection.serial)
        self.card = card
        return card

    @property
    def alive(self) -> bool:
        """There is a card, and its token session still works as far as we know."""
        return self._connection is not None and self._connection.alive

    @property
    def profile(self) -> TokenCardProfile | None:
        """The profile of the card for the token present now (None: no token)."""
        if self.card is None:
            return None
        profile = self.card.profile
        assert isinstance(profile, TokenCardProfile)
        return profile

    def open(self) -> CacCard:
        """The card for the token present now.

        Raises:
            TokenSourceError: the module, the token or its certificates are unusable.
        """
        return self._build(self._require())

    def check(self, pin: str | None = None) -> SourceInfo:
        """The start-up checks: module, token, certificates; with ``pin``, the login too.

        Raises:
            TokenSourceError: the first problem, in one line.
        """
        token = self._require()
        connection = TokenConnection(self.module(), token)
        try:
            chosen = self._chosen(token, connection.session)
            info = connection.pin_info()
            checked = False
            if pin is not None and info.login_required:
                self._check_login(connection, pin.encode())
                checked = True
            return SourceInfo(
                description=self.config.describe(),
                token_label=token.label.strip(),
                token_serial=connection.serial,
                raw_rsa=connection.has_raw_rsa,
                login_required=info.login_required,
                containers=container_info(chosen),
                pin_checked=checked,
            )
        except CardError as exc:
            raise TokenSourceError(f"{self._where(token)}: {exc}") from None
        finally:
            connection.close()

    def _check_login(self, connection: TokenConnection, pin: bytes) -> None:
        where = self._where(connection.token)
        connection.logout()
        try:
            if not connection.login(pin):
                raise TokenSourceError(f"{where}: wrong PIN")
        except CardError as exc:
            raise TokenSourceError(f"{where}: login failed: {exc}") from None
        connection.logout()

    def _close(self) -> None:
        if self._connection is not None:
            self._connection.close()
        self._connection = None
        self._identity = None
        self.card = None

    def _observe(self) -> tuple[Observation, pkcs11.Token | None]:
        try:
            token = self._find()
        except (TokenSourceError, p11x.PKCS11Error) as exc:
            log.debug("%s: poll: %s", self.config.describe(), exc)
            return Observation.ABSENT, None
        if token is None:
            return Observation.ABSENT, None
        try:
            identity = _Identity(token.slot.slot_id, _token_serial(token))
            token.slot.get_token()  # still readable (SoftHSM: its directory is gone)
        except p11x.PKCS11Error:
            return Observation.ABSENT, None
        if self._connection is not None and self._connection.gone:
            return Observation.OTHER, token  # same token, but the session died
        if identity == self._identity:
            return Observation.SAME, token
        return Observation.OTHER, token

    def poll(self) -> list[PresenceEvent]:
        """Compare the token present now with the card's: removal, insertion, or both.

        A matching token that cannot be made into a card (no certificate, ...) is logged
        once and treated as absent until it goes away.
        """
        observation, token = self._observe()
        if observation is Observation.ABSENT:
            self._unusable = None
        events = []
        for action in PRESENCE_TRANSITIONS[self.card is not None, observation]:
            if action is PresenceAction.REMOVE:
                self._close()
                events.append(PresenceEvent(action))
                continue
            assert token is not None
            identity = _Identity(token.slot.slot_id, _token_serial(token))
            if identity == self._unusable:
                continue
            try:
                card = self._build(token)
            except TokenSourceError as exc:
                log.warning("%s", exc)
                self._unusable = identity
                continue
            events.append(PresenceEvent(action, card))
        return events


# --------------------------------------------------------------------------- as a slot's card


class _TokenSource(Protocol):
    @property
    def profile(self) -> TokenCardProfile | None: ...

    def check(self, pin: str | None = None) -> SourceInfo: ...

    @property
    def place(self) -> object:
        """The token (its module and selector), or the database: one login state."""
        ...


@dataclass(eq=False)
class TokenCard:
    """A token-backed card as a configured slot holds it (a ``LoadedCard``).

    Every insertion gets a fresh :class:`CacCard` on the source's current connection.
    It is a ``LiveCard``: with a ``poll_interval`` the token is looked for that often
    and the slot follows it out and back in (without one it stays as it was at start).
    """

    source: _TokenSource
    description: str
    poll_interval: float | None = None
    ca_file: Path | None = None
    _replaced: bool = field(default=False, init=False)  # absent reported; the new one next
    _closed: threading.Event = field(default_factory=threading.Event, init=False)

    @property
    def current_pin(self) -> str | None:
        return None  # the token's own

    def new_card(self) -> Card:
        profile = self.source.profile
        if profile is None:
            raise TokenSourceError(f"{self.description}: token not present")
        return CacCard(profile)

    def same_card(self, other: object) -> bool:
        return isinstance(other, TokenCard) and other.source is self.source

    @property
    def place(self) -> object:
        return self.source.place

    def poll(self) -> list[PresenceAction]:
        """Look for the token (slow I/O); what happened to it since the last look."""
        if not isinstance(self.source, Pkcs11Source):
            return []
        return [e.action for e in self.source.poll()]

    def wait_presence(self, known: bool | None, timeout: float) -> bool:
        if self._replaced:  # a token swapped for another: reported absent once, now in
            self._replaced = False
        elif known is not None:
            if self.poll_interval is None or self._closed.wait(self.poll_interval):
                return known  # not watched, or closing
            actions = self.poll()
            if PresenceAction.REMOVE in actions and PresenceAction.INSERT in actions:
                self._replaced = True
                return False
        return self.source.profile is not None

    @property
    def absence_reason(self) -> str:
        return f"{self.description}: token not present"

    def close(self) -> None:
        self._closed.set()

    def info(self) -> SourceInfo:
        return self.source.check()


def read_secret(path: Path | None, env: str | None, what: str) -> str | None:
    """A PIN or password from a file (first line) or an environment variable."""
    if path is not None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise TokenSourceError(f"cannot read {what} file {path}: {exc.strerror}") from None
        return lines[0] if lines else ""
    if env is not None:
        value = os.environ.get(env)
        if value is None:
            raise TokenSourceError(f"{what}: environment variable {env} is not set")
        return value
    return None


TYPE: Final = "pkcs11"
#: the keys of a pkcs11 slot table, beside the keys every slot has (type, inserted)
KEYS: Final = (
    "module",
    "token_label",
    "token_serial",
    "ids",
    "library_parameters",
    "check_pin_file",
    "check_pin_env",
    "poll_interval",
)
DEFAULT_POLL_INTERVAL: Final = 1.0

#: one source object per configuration in this process: a reload, or two readers of
#: one configuration, share its token session (PKCS#11 login state is per process anyway)
_SOURCES: dict[Pkcs11Config, Pkcs11Source] = {}
_SOURCES_LOCK = threading.Lock()


@dataclass(frozen=True)
class Pkcs11SlotConfig:
    """``[[reader.slot]] type = "pkcs11"``::

    [[reader.slot]]
    type = "pkcs11"
    module = "/usr/lib/softhsm/libsofthsm2.so"
    token_label = "CAC test"          # or token_serial = "...", or neither: the only token
    ids = ["01", "02"]                # CKA_ID (hex), in container order; default: all with a key
    check_pin_file = "/run/secrets/token-pin"   # optional: log in once at start-up to check it
    poll_interval = 1.0               # seconds between token presence checks; 0: never
    """

    source: Pkcs11Config
    check_pin_file: Path | None = None
    check_pin_env: str | None = None
    poll_interval: float = DEFAULT_POLL_INTERVAL
    type: str = TYPE
    origin: str = ""


def _module_path(ck: Checker, t: Mapping[str, Any], path: KeyPath, key: str) -> str | None:
    """A module path: a file (relative to the configuration), or a bare library name."""
    raw = ck.get(t, path, key, str)
    if raw is None or "/" not in raw:
        return raw
    return str(ck.file(t, path, key))


def _secret_keys(
    ck: Checker, t: Mapping[str, Any], path: KeyPath, file_key: str, env_key: str
) -> tuple[Path | None, str | None]:
    if file_key in t and env_key in t:
        raise ck.fail((*path, env_key), f"give only one of {file_key}, {env_key}")
    secret_file = ck.file(t, path, file_key) if file_key in t else None
    secret_env: str | None = ck.get(t, path, env_key, str)
    return secret_file, secret_env


def parse(ck: Checker, t: Mapping[str, Any], path: KeyPath) -> Pkcs11SlotConfig:
    """The card of the pkcs11 slot table ``t`` (at ``path``)."""
    module = _module_path(ck, t, path, "module")
    if module is None:
        raise ck.fail(path, "missing key 'module' (the PKCS#11 module's path)")
    ids = None
    raw_ids = ck.get(t, path, "ids", list)
    if raw_ids is not None:
        parsed = []
        for i, raw in enumerate(raw_ids):
            where = (*path, "ids", i)
            if not isinstance(raw, str):
                raise ck.fail(where, "expected a CKA_ID in hexadecimal (a string)")
            try:
                value = bytes.fromhex(raw)
            except ValueError:
                raise ck.fail(where, f"not hexadecimal: {raw!r}") from None
            if not value:
                raise ck.fail(where, "an empty CKA_ID")
            parsed.append(value)
        if not 1 <= len(parsed) <= MAX_PKI_CONTAINERS:
            raise ck.fail((*path, "ids"), f"1 to {MAX_PKI_CONTAINERS} ids")
        if len(set(parsed)) != len(parsed):
            raise ck.fail((*path, "ids"), "an id is listed twice")
        ids = tuple(parsed)
    pin_file, pin_env = _secret_keys(ck, t, path, "check_pin_file", "check_pin_env")
    interval: float = ck.get(t, path, "poll_interval", (int, float), DEFAULT_POLL_INTERVAL)
    if not 0 <= interval <= 3600:
        raise ck.fail((*path, "poll_interval"), "0 (never) to 3600 seconds")
    source = Pkcs11Config(
        module=module,
        token=TokenSelector(
            label=ck.get(t, path, "token_label", str), serial=ck.get(t, path, "token_serial", str)
        ),
        ids=ids,
        library_parameters=ck.get(t, path, "library_parameters", str),
    )
    return Pkcs11SlotConfig(
        source=source,
        check_pin_file=pin_file,
        check_pin_env=pin_env,
        poll_interval=float(interval),
        origin=ck.origin(path),
    )


def shared_source(config: Pkcs11Config) -> Pkcs11Source:
    with _SOURCES_LOCK:
        source = _SOURCES.get(config)
        if source is None:
            source = _SOURCES[config] = Pkcs11Source(config)
        return source


def load(config: Pkcs11SlotConfig, state_dir: Path, now: datetime) -> TokenCard:
    """The token's card (its start-up checks, and the PIN check if configured).

    Raises:
        TokenSourceError: a ``CardLoadError``: module, token, certificates, PIN; one line.
    """
    source = shared_source(config.source)
    try:
        if not source.alive:
            source.open()
            # Checked when the card is (re)made only: the check logs the token out, which
            # would end the host's login to a card already in use (a reload).
            pin = read_secret(config.check_pin_file, config.check_pin_env, "token PIN")
            if pin is not None:
                source.check(pin)
    except TokenSourceError as exc:
        raise TokenSourceError(f"{config.origin}: {exc}") from None
    profile = source.profile
    assert profile is not None
    token = source.config.token
    what = token.label or token.serial or "token"
    n = len(profile.containers)
    return TokenCard(
        source,
        f"PKCS#11 token {what!r} ({n} container{'s' * (n != 1)})",
        config.poll_interval or None,
    )
