"""The checks OpenSC's CI runs against virt_cacard, through OpenSC's PKCS#11 module.

OpenSC's CI (``.github/test-cac.sh``, job "cac" of ``.github/workflows/linux.yml``) runs
virt_cacard on vpcd, then ``p11test -s 0 -p 12345678`` and diffs its report against
``src/tests/p11test/virt_cacard_ref.json``. p11test is not packaged (it is built from the
OpenSC tree with cmocka), so this script redoes its card checks with PyKCS11 and prints
the same tables as JSON: ``supported_mechanisms``, ``readonly`` (sign & verify, encrypt &
decrypt per key and mechanism), ``multipart`` (C_SignUpdate in pieces), ``usage`` (key
labels, sizes and flags) and ``pss_oaep`` (every PSS hash / MGF / salt combination and
OAEP). A cell is "YES" only when the result checks out independently: signatures are
verified with the certificate's public key in Python (``cryptography``), plaintexts are
compared, nothing relies on OpenSC's own verification.

Run in its own process (libpcsclite reads ``PCSCLITE_CSOCK_NAME`` once per process)::

    python -m tests.frontends.vpcd.p11_battery --module opensc-pkcs11.so --reader NAME --pin PIN
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import PyKCS11 as P
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils

Row = list[str]

# The digest mechanisms p11test's readonly and multipart tests use, in its order.
HASH_SIGN_MECHANISMS = (
    "MD5_RSA_PKCS",
    "SHA1_RSA_PKCS",
    "RIPEMD160_RSA_PKCS",
    "SHA256_RSA_PKCS",
    "SHA384_RSA_PKCS",
    "SHA512_RSA_PKCS",
    "SHA224_RSA_PKCS",
)
# RFC 8017 §9.2 note 1 (and ISO/IEC 10118-3 for RIPEMD-160): DigestInfo DER prefixes.
DIGEST_INFO = {
    "MD5": bytes.fromhex("3020300c06082a864886f70d020505000410"),
    "SHA1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "RIPEMD160": bytes.fromhex("3021300906052b2403020105000414"),
    "SHA224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "SHA256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "SHA384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "SHA512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
PSS_HASHES = ("SHA_1", "SHA224", "SHA256", "SHA384", "SHA512")
_CRYPTO_HASH: dict[str, Callable[[], hashes.HashAlgorithm]] = {
    "SHA_1": hashes.SHA1,
    "SHA224": hashes.SHA224,
    "SHA256": hashes.SHA256,
    "SHA384": hashes.SHA384,
    "SHA512": hashes.SHA512,
}
_HASHLIB = {
    "SHA_1": "sha1",
    "SHA1": "sha1",
    "SHA224": "sha224",
    "SHA256": "sha256",
    "SHA384": "sha384",
    "SHA512": "sha512",
    "MD5": "md5",
    "RIPEMD160": "ripemd160",
}
SALTS = (-2, -1, 0)  # p11test: -2 = the largest possible, -1 = the hash length, 0
MESSAGE = b"Simple message for signing & verifying. It is long enough for the multipart test."


def yes(ok: bool) -> str:
    return "YES" if ok else "NO"


def ckm(name: str) -> int:
    value: int = getattr(P, f"CKM_{name}")
    return value


class Token:
    def __init__(self, module: str, reader: str, pin: str) -> None:
        self.lib = P.PyKCS11Lib()
        self.lib.load(module)
        slots = [
            s
            for s in self.lib.getSlotList(tokenPresent=True)
            if self.lib.getSlotInfo(s).slotDescription.strip() == reader
        ]
        if not slots:
            raise SystemExit(f"no token in reader {reader!r}")
        self.slot = slots[0]
        self.session = self.lib.openSession(self.slot, P.CKF_SERIAL_SESSION)
        self.session.login(pin)
        self.keys: list[tuple[str, Any, rsa.RSAPublicKey, str]] = []
        for key in self.session.findObjects([(P.CKA_CLASS, P.CKO_PRIVATE_KEY)]):
            key_id = bytes(self.attribute(key, P.CKA_ID))
            (cert,) = self.session.findObjects(
                [(P.CKA_CLASS, P.CKO_CERTIFICATE), (P.CKA_ID, key_id)]
            )
            der = bytes(self.attribute(cert, P.CKA_VALUE))
            public = x509.load_der_x509_certificate(der).public_key()
            assert isinstance(public, rsa.RSAPublicKey)
            label = str(self.attribute(key, P.CKA_LABEL))
            self.keys.append((key_id.hex(":"), key, public, label))
        self.keys.sort(key=lambda k: k[0])

    def attribute(self, obj: Any, attribute: int) -> Any:
        return self.session.getAttributeValue(obj, [attribute])[0]

    # ---------------------------------------------------------------- tables

    def mechanisms(self) -> list[Row]:
        rows = []
        for mechanism in self.lib.getMechanismList(self.slot):
            try:
                info = self.lib.getMechanismInfo(self.slot, mechanism)
            except P.PyKCS11Error:
                continue  # listed but without information: p11test leaves it out too
            flags = ",".join(info.flags2text())
            name = mechanism.removeprefix("CKM_") if isinstance(mechanism, str) else mechanism
            rows.append([str(name), str(info.ulMinKeySize), str(info.ulMaxKeySize), flags])
        return rows

    def readonly(self) -> list[Row]:
        rows = []
        for key_id, key, public, _ in self.keys:
            k = public.key_size // 8
            raw = b"\x00" + os.urandom(k - 1)  # below the modulus
            rows.append(
                [
                    key_id,
                    "RSA_PKCS",
                    yes(self.try_(self.sign_pkcs1_raw, key, public)),
                    yes(self.try_(self.decrypt_pkcs1, key, public)),
                ]
            )
            rows.append(
                [
                    key_id,
                    "RSA_X_509",
                    yes(self.try_(self.sign_x509, key, public, raw)),
                    yes(self.try_(self.decrypt_x509, key, public, raw)),
                ]
            )
            for name in HASH_SIGN_MECHANISMS:
                ok = self.try_(self.sign_hashed, key, public, name, MESSAGE, parts=1)
                rows.append([key_id, name, yes(ok), ""])
        return rows

    def multipart(self) -> list[Row]:
        rows = []
        for key_id, key, public, _ in self.keys:
            for name in HASH_SIGN_MECHANISMS:
                ok = self.try_(self.sign_hashed, key, public, name, MESSAGE, parts=3)
                rows.append([key_id, name, yes(ok)])
        return rows

    def usage(self) -> list[Row]:
        rows = []
        for key_id, key, public, label in self.keys:
            raw_id = bytes.fromhex(key_id.replace(":", ""))
            (pub_obj,) = self.session.findObjects(
                [(P.CKA_CLASS, P.CKO_PUBLIC_KEY), (P.CKA_ID, raw_id)]
            )
            modulus = int.from_bytes(bytes(self.attribute(pub_obj, P.CKA_MODULUS)), "big")

            def flag(obj: Any, attribute: int) -> str:
                return "YES" if self.attribute(obj, attribute) else ""

            rows.append(
                [
                    key_id,
                    label,
                    "RSA" if self.attribute(key, P.CKA_KEY_TYPE) == P.CKK_RSA else "?",
                    str(public.key_size),
                    yes(modulus == public.public_numbers().n),
                    flag(key, P.CKA_SIGN),
                    flag(pub_obj, P.CKA_VERIFY),
                    flag(pub_obj, P.CKA_ENCRYPT),
                    flag(key, P.CKA_DECRYPT),
                    flag(pub_obj, P.CKA_WRAP),
                    flag(key, P.CKA_UNWRAP),
                    "",  # encapsulate / decapsulate: PKCS#11 3.2 KEMs, not RSA here
                    "",
                    flag(pub_obj, P.CKA_DERIVE),
                    flag(key, P.CKA_DERIVE),
                    flag(key, P.CKA_ALWAYS_AUTHENTICATE),
                ]
            )
        return rows

    def pss_oaep(self) -> list[Row]:
        rows = []
        for key_id, key, public, _ in self.keys:
            for h in PSS_HASHES:
                ok = self.try_(self.decrypt_oaep, key, public, h)
                rows.append([key_id, "RSA_PKCS_OAEP", h, f"MGF1_{h}", "0", "", yes(ok)])
            for h in PSS_HASHES:
                for mgf in PSS_HASHES:
                    for salt in SALTS:
                        ok = self.try_(self.sign_pss, key, public, None, h, mgf, salt)
                        rows.append(
                            [key_id, "RSA_PKCS_PSS", h, f"MGF1_{mgf}", str(salt), yes(ok), ""]
                        )
            for h in PSS_HASHES:
                mechanism = h.replace("_", "") + "_RSA_PKCS_PSS"
                for mgf in PSS_HASHES:
                    for salt in SALTS:
                        ok = self.try_(self.sign_pss, key, public, mechanism, h, mgf, salt)
                        rows.append([key_id, mechanism, h, f"MGF1_{mgf}", str(salt), yes(ok), ""])
        return rows

    # ---------------------------------------------------------------- operations

    @staticmethod
    def try_(operation: Callable[..., bool], *args: Any, **kwargs: Any) -> bool:
        try:
            return operation(*args, **kwargs)
        except (P.PyKCS11Error, InvalidSignature, ValueError) as e:
            print(f"failed: {e!r}", file=sys.stderr)
            return False

    def sign(self, key: Any, data: bytes, mechanism: Any) -> bytes:
        return bytes(self.session.sign(key, data, mechanism))

    def sign_pkcs1_raw(self, key: Any, public: rsa.RSAPublicKey) -> bool:
        signature = self.sign(key, MESSAGE[:32], P.Mechanism(P.CKM_RSA_PKCS, None))
        recovered = public.recover_data_from_signature(signature, padding.PKCS1v15(), None)
        return recovered == MESSAGE[:32]

    def sign_x509(self, key: Any, public: rsa.RSAPublicKey, raw: bytes) -> bool:
        signature = self.sign(key, raw, P.Mechanism(P.CKM_RSA_X_509, None))
        numbers = public.public_numbers()
        value = pow(int.from_bytes(signature, "big"), numbers.e, numbers.n)
        return value == int.from_bytes(raw, "big")

    def sign_hashed(
        self, key: Any, public: rsa.RSAPublicKey, name: str, message: bytes, *, parts: int
    ) -> bool:
        mechanism = P.Mechanism(ckm(name), None)
        if parts == 1:
            signature = self.sign(key, message, mechanism)
        else:
            signature = self.sign_multipart(key, message, mechanism, parts)
        hash_name = name.removesuffix("_RSA_PKCS")
        digest = hashlib.new(_HASHLIB[hash_name], message).digest()
        recovered = public.recover_data_from_signature(signature, padding.PKCS1v15(), None)
        return recovered == DIGEST_INFO[hash_name] + digest

    def sign_multipart(self, key: Any, message: bytes, mechanism: Any, parts: int) -> bytes:
        lib, handle = self.session.lib, self.session.session
        check(lib.C_SignInit(handle, mechanism.to_native(), key))
        size = -(-len(message) // parts)
        for start in range(0, len(message), size):
            check(lib.C_SignUpdate(handle, P.ckbytelist(message[start : start + size])))
        signature = P.ckbytelist()
        check(lib.C_SignFinal(handle, signature))  # the size, then the signature
        check(lib.C_SignFinal(handle, signature))
        return bytes(signature)

    def decrypt_pkcs1(self, key: Any, public: rsa.RSAPublicKey) -> bool:
        secret = os.urandom(32)
        ciphertext = public.encrypt(secret, padding.PKCS1v15())
        plain = self.session.decrypt(key, ciphertext, P.Mechanism(P.CKM_RSA_PKCS, None))
        return bytes(plain) == secret

    def decrypt_x509(self, key: Any, public: rsa.RSAPublicKey, raw: bytes) -> bool:
        numbers = public.public_numbers()
        k = public.key_size // 8
        ciphertext = pow(int.from_bytes(raw, "big"), numbers.e, numbers.n).to_bytes(k, "big")
        plain = self.session.decrypt(key, ciphertext, P.Mechanism(P.CKM_RSA_X_509, None))
        return bytes(plain).rjust(k, b"\x00") == raw

    def decrypt_oaep(self, key: Any, public: rsa.RSAPublicKey, h: str) -> bool:
        secret = os.urandom(16)
        algorithm = _CRYPTO_HASH[h]()
        ciphertext = public.encrypt(
            secret, padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)
        )
        mechanism = P.RSAOAEPMechanism(ckm(h), getattr(P, f"CKG_MGF1_{h.replace('_', '')}"))
        return bytes(self.session.decrypt(key, ciphertext, mechanism)) == secret

    def sign_pss(
        self,
        key: Any,
        public: rsa.RSAPublicKey,
        mechanism_name: str | None,
        h: str,
        mgf: str,
        salt: int,
    ) -> bool:
        algorithm = _CRYPTO_HASH[h]()
        k = public.key_size // 8
        salt_length = {-2: k - algorithm.digest_size - 2, -1: algorithm.digest_size}.get(salt, 0)
        mechanism = P.RSA_PSS_Mechanism(
            ckm(mechanism_name or "RSA_PKCS_PSS"),
            ckm(h),
            getattr(P, f"CKG_MGF1_{mgf.replace('_', '')}"),
            salt_length,
        )
        pss = padding.PSS(mgf=padding.MGF1(_CRYPTO_HASH[mgf]()), salt_length=salt_length)
        if mechanism_name is None:  # RSA_PKCS_PSS signs a digest
            digest = hashlib.new(_HASHLIB[h], MESSAGE).digest()
            signature = self.sign(key, digest, mechanism)
            public.verify(signature, digest, pss, utils.Prehashed(algorithm))
        else:
            signature = self.sign(key, MESSAGE, mechanism)
            public.verify(signature, MESSAGE, pss, algorithm)
        return True  # verify() raises InvalidSignature otherwise


def check(rv: int) -> None:
    if rv != P.CKR_OK:
        raise P.PyKCS11Error(rv)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--module", required=True)
    parser.add_argument("--reader", required=True)
    parser.add_argument("--pin", required=True)
    parser.add_argument("--tables", default="mechanisms,readonly,multipart,usage,pss_oaep")
    args = parser.parse_args()
    token = Token(args.module, args.reader, args.pin)
    report = {name: getattr(token, name)() for name in args.tables.split(",")}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
