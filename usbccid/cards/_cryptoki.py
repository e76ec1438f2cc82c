"""The few PKCS#11 calls python-pkcs11 does not make the way a card source needs them.

python-pkcs11 (``pkcs11``) does everything else: slots, tokens, object search, sign and
decrypt, with the GIL released. Three things it cannot do are done here through the
module's own function list (``C_GetFunctionList``, PKCS#11 v2.40 §5.2), on the *same*
loaded library (``dlopen`` returns one instance per process):

* ``C_Initialize`` with arguments: python-pkcs11 passes NULL, which tells the module that
  it will never be called from two threads (v2.40 §5.4; SoftHSM then switches its locks
  off), and gives NSS's softokn no configuration (before NSS 3.95 it then answers
  CKR_ARGUMENTS_BAD). We pass ``CKF_OS_LOCKING_OK`` and, for softokn, its
  ``LibraryParameters`` string (NSS ``CK_NSS_C_INITIALIZE_ARGS``, lib/util/pkcs11n.h: one
  pointer more than the standard struct, where the standard one has ``pReserved``).
* ``C_Login`` / ``C_Logout`` / ``C_GetSessionInfo`` on a session we keep: python-pkcs11
  logs in only while opening a new session (and leaks that session when the PIN is
  wrong), and does not say whether a session is logged in.
* ``C_CreateObject`` of softokn's pseudo-objects ``CKO_NSS_NEWSLOT`` / ``CKO_NSS_DELSLOT``
  (how NSS opens another database as a new slot, pk11util.c ``SECMOD_OpenNewSlot``):
  softokn returns no object handle for them, which python-pkcs11 cannot cope with.

Layout: ``CK_FUNCTION_LIST`` is ``CK_VERSION`` followed by function pointers in the order
of pkcs11f.h; on Unix the structs are not packed, ``CK_ULONG`` is ``unsigned long``.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

CK_RV = ctypes.c_ulong
CK_ULONG = ctypes.c_ulong

CKR_OK = 0x000
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191
CKF_OS_LOCKING_OK = 0x002
CKU_USER = 1

#: Return values by name, for one-line error messages (PKCS#11 v2.40 pkcs11t.h).
CKR_NAMES = {
    0x000: "CKR_OK",
    0x001: "CKR_CANCEL",
    0x002: "CKR_HOST_MEMORY",
    0x003: "CKR_SLOT_ID_INVALID",
    0x005: "CKR_GENERAL_ERROR",
    0x006: "CKR_FUNCTION_FAILED",
    0x007: "CKR_ARGUMENTS_BAD",
    0x010: "CKR_ATTRIBUTE_READ_ONLY",
    0x012: "CKR_ATTRIBUTE_TYPE_INVALID",
    0x013: "CKR_ATTRIBUTE_VALUE_INVALID",
    0x020: "CKR_DATA_INVALID",
    0x021: "CKR_DATA_LEN_RANGE",
    0x030: "CKR_DEVICE_ERROR",
    0x031: "CKR_DEVICE_MEMORY",
    0x032: "CKR_DEVICE_REMOVED",
    0x054: "CKR_FUNCTION_NOT_SUPPORTED",
    0x0A0: "CKR_PIN_INCORRECT",
    0x0A1: "CKR_PIN_INVALID",
    0x0A2: "CKR_PIN_LEN_RANGE",
    0x0A3: "CKR_PIN_EXPIRED",
    0x0A4: "CKR_PIN_LOCKED",
    0x0B0: "CKR_SESSION_CLOSED",
    0x0B3: "CKR_SESSION_HANDLE_INVALID",
    0x0D0: "CKR_TEMPLATE_INCOMPLETE",
    0x0D1: "CKR_TEMPLATE_INCONSISTENT",
    0x0E0: "CKR_TOKEN_NOT_PRESENT",
    0x0E1: "CKR_TOKEN_NOT_RECOGNIZED",
    0x0E2: "CKR_TOKEN_WRITE_PROTECTED",
    0x100: "CKR_USER_ALREADY_LOGGED_IN",
    0x101: "CKR_USER_NOT_LOGGED_IN",
    0x102: "CKR_USER_PIN_NOT_INITIALIZED",
    0x103: "CKR_USER_TYPE_INVALID",
    0x104: "CKR_USER_ANOTHER_ALREADY_LOGGED_IN",
    0x190: "CKR_CRYPTOKI_NOT_INITIALIZED",
    0x191: "CKR_CRYPTOKI_ALREADY_INITIALIZED",
}


def rv_name(rv: int) -> str:
    return CKR_NAMES.get(rv, f"CKR 0x{rv:X}")


class CryptokiError(Exception):
    """A PKCS#11 call returned ``rv`` (not CKR_OK)."""

    def __init__(self, function: str, rv: int) -> None:
        self.function = function
        self.rv = rv
        super().__init__(f"{function}: {rv_name(rv)}")


class _InitArgs(ctypes.Structure):
    # CK_C_INITIALIZE_ARGS (v2.40 §3.6) + NSS's trailing pReserved (CK_NSS_C_INITIALIZE_ARGS).
    _fields_ = (
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", CK_ULONG),
        ("LibraryParameters", ctypes.c_char_p),
        ("pReserved", ctypes.c_void_p),
    )


class _SessionInfo(ctypes.Structure):
    _fields_ = (
        ("slotID", CK_ULONG),
        ("state", CK_ULONG),
        ("flags", CK_ULONG),
        ("ulDeviceError", CK_ULONG),
    )


#: CK_SESSION_INFO.state values with a user logged in (v2.40 §5.7, Table 9).
CKS_USER_STATES = frozenset({1, 3})  # CKS_RO_USER_FUNCTIONS, CKS_RW_USER_FUNCTIONS


class _Attribute(ctypes.Structure):
    _fields_ = (("type", CK_ULONG), ("pValue", ctypes.c_void_p), ("ulValueLen", CK_ULONG))


_P = ctypes.c_void_p
_Initialize = ctypes.CFUNCTYPE(CK_RV, _P)
_Finalize = ctypes.CFUNCTYPE(CK_RV, _P)
_Login = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, CK_ULONG, ctypes.c_char_p, CK_ULONG)
_Logout = ctypes.CFUNCTYPE(CK_RV, CK_ULONG)
_GetSessionInfo = ctypes.CFUNCTYPE(CK_RV, CK_ULONG, ctypes.POINTER(_SessionInfo))
_CreateObject = ctypes.CFUNCTYPE(
    CK_RV, CK_ULONG, ctypes.POINTER(_Attribute), CK_ULONG, ctypes.POINTER(CK_ULONG)
)

#: pkcs11f.h order, up to the last function used here.
_FUNCTIONS = (
    "C_Initialize",
    "C_Finalize",
    "C_GetInfo",
    "C_GetFunctionList",
    "C_GetSlotList",
    "C_GetSlotInfo",
    "C_GetTokenInfo",
    "C_GetMechanismList",
    "C_GetMechanismInfo",
    "C_InitToken",
    "C_InitPIN",
    "C_SetPIN",
    "C_OpenSession",
    "C_CloseSession",
    "C_CloseAllSessions",
    "C_GetSessionInfo",
    "C_GetOperationState",
    "C_SetOperationState",
    "C_Login",
    "C_Logout",
    "C_CreateObject",
)


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class _FunctionList(ctypes.Structure):
    _fields_ = (("version", _Version), *((name, ctypes.c_void_p) for name in _FUNCTIONS))


@dataclass
class FunctionList:
    """The calls of one loaded module that are made here (the library stays loaded)."""

    dll: ctypes.CDLL
    _list: _FunctionList

    def _fn(self, name: str) -> int:
        address = getattr(self._list, name)
        if not address:
            raise CryptokiError(name, 0x054)  # CKR_FUNCTION_NOT_SUPPORTED
        return int(address)

    def initialize(self, library_parameters: str | None) -> bool:
        """C_Initialize with OS locking; False if the module was already initialised."""
        params = None if library_parameters is None else library_parameters.encode()
        args = _InitArgs(flags=CKF_OS_LOCKING_OK, LibraryParameters=params)
        rv = _Initialize(self._fn("C_Initialize"))(ctypes.byref(args))
        if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            return False
        if rv != CKR_OK:
            raise CryptokiError("C_Initialize", rv)
        return True

    def finalize(self) -> None:
        rv = _Finalize(self._fn("C_Finalize"))(None)
        if rv != CKR_OK:
            raise CryptokiError("C_Finalize", rv)

    def login(self, session: int, pin: bytes) -> int:
        """C_Login(CKU_USER); returns the CK_RV (the caller maps PIN errors)."""
        return int(_Login(self._fn("C_Login"))(session, CKU_USER, pin, len(pin)))

    def logout(self, session: int) -> int:
        return int(_Logout(self._fn("C_Logout"))(session))

    def user_logged_in(self, session: int) -> bool:
        """C_GetSessionInfo: is the token's user logged in (for this application)?"""
        info = _SessionInfo()
        rv = _GetSessionInfo(self._fn("C_GetSessionInfo"))(session, ctypes.byref(info))
        if rv != CKR_OK:
            raise CryptokiError("C_GetSessionInfo", rv)
        return int(info.state) in CKS_USER_STATES

    def create_pseudo_object(self, session: int, attributes: list[tuple[int, bytes]]) -> None:
        """C_CreateObject for an object that gets no handle (softokn's NEWSLOT/DELSLOT)."""
        buffers = [ctypes.create_string_buffer(value, len(value)) for _, value in attributes]
        template = (_Attribute * len(attributes))(
            *(
                _Attribute(kind, ctypes.cast(buf, ctypes.c_void_p), len(value))
                for (kind, value), buf in zip(attributes, buffers, strict=True)
            )
        )
        handle = CK_ULONG(0)
        rv = _CreateObject(self._fn("C_CreateObject"))(
            session, template, len(attributes), ctypes.byref(handle)
        )
        if rv != CKR_OK:
            raise CryptokiError("C_CreateObject", rv)


def load(path: str) -> FunctionList:
    """``dlopen`` ``path`` and fetch its function list.

    Raises:
        OSError: the library cannot be loaded (the message is dlerror's).
        CryptokiError: it has no usable ``C_GetFunctionList``.
    """
    dll = ctypes.CDLL(path)
    try:
        get = dll.C_GetFunctionList
    except AttributeError:
        raise CryptokiError("C_GetFunctionList", 0x054) from None
    get.restype = CK_RV
    get.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
    pointer = ctypes.POINTER(_FunctionList)()
    rv = get(ctypes.byref(pointer))
    if rv != CKR_OK or not pointer:
        raise CryptokiError("C_GetFunctionList", rv or 0x005)
    return FunctionList(dll, pointer.contents)
