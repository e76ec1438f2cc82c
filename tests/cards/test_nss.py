"""The nss card source against real NSS databases made by certutil/pk12util.

QEMU's ``ccid-card-emulated,backend=certificates,db=...,cert1=...`` inputs; NSS's own
softoken does every private operation. Also the pkcs11 source on softokn, where closing
a database's slot is a real token removal and reopening it a re-insertion.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding

from tests.cac.helpers import ACA, Session, h
from tests.cards.conftest import NssDb, ThrowawayCa, make_nss_db
from tests.cards.test_pkcs11 import containers, public, rsa_op, sign_and_check
from usbccid.cac.card import CacCard
from usbccid.cards.nss import (
    LIBRARY_PARAMETERS,
    DbLocation,
    NssConfig,
    NssSource,
    Softokn,
    _double_escape,
    _quote,
)
from usbccid.cards.pkcs11 import (
    Pkcs11Config,
    Pkcs11Source,
    PresenceAction,
    TokenKey,
    TokenSelector,
    TokenSourceError,
)


def nss_card(db: NssDb, certs: list[str] | None = None) -> CacCard:
    card = NssSource(NssConfig(db.db, tuple(certs or db.nicknames))).open()
    card.power_on()
    return card


def test_nss_card_signs_and_decrypts(nss_db: NssDb) -> None:
    card = nss_card(nss_db)
    assert card.blocking
    assert [c.label for c in containers(card)] == ["cert1", "cert2", "cert3"]
    assert [public(card, i).key_size for i in range(3)] == [2048, 2048, 1024]
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x63C3  # a database with a password: not logged in
    assert sign_and_check(s, card, 0, b"no login") == 0x6982
    s.select(ACA, 0x0C)
    assert s.verify(nss_db.password.encode()) == 0x9000  # the database password is the PIN
    for i in range(3):
        assert sign_and_check(s, card, i, f"container {i}".encode()) == 0x9000
    ciphertext = public(card, 2).encrypt(b"1234567890\n", padding.PKCS1v15())
    r = rsa_op(s, ciphertext)
    assert r.sw == 0x9000
    assert r.data[:2] == h("00 02")
    assert r.data.endswith(b"\x001234567890\n")
    card.power_off()  # logs out of the database
    card.power_on()
    assert sign_and_check(s, card, 0, b"after power off") == 0x6982


def test_container_order_is_the_nickname_order(nss_db: NssDb) -> None:
    card = nss_card(nss_db, ["cert3", "cert1"])
    assert [c.label for c in containers(card)] == ["cert3", "cert1"]
    for container in containers(card):
        assert isinstance(container.key, TokenKey)
        assert {f.name for f in dataclasses.fields(container.key)} == {
            "connection",
            "key_id",
            "public",
        }
    s = Session(card)
    assert s.verify(nss_db.password.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"cert3 first") == 0x9000


def test_wrong_password(nss_db: NssDb) -> None:
    card = nss_card(nss_db)
    s = Session(card)
    assert s.verify(b"wrong") == 0x63C3  # softokn keeps no retry counter
    assert sign_and_check(s, card, 0, b"x") == 0x6982
    assert s.verify(nss_db.password.encode()) == 0x9000
    assert s.verify(b"wrong") == 0x63C3  # logs out first
    assert sign_and_check(s, card, 0, b"x") == 0x6982


def test_database_without_password(nss_db_no_password: NssDb) -> None:
    card = nss_card(nss_db_no_password)
    s = Session(card)
    assert s.sw("00 20 00 00") == 0x9000  # no login needed (libcacard: same)
    assert sign_and_check(s, card, 1, b"no password") == 0x9000
    assert s.verify(b"1234") == 0x9000  # any PIN "logs in"
    info = NssSource(NssConfig(nss_db_no_password.db, ("cert1",))).check(password="x")
    assert not info.login_required
    assert not info.pin_checked


def test_check(nss_db: NssDb) -> None:
    source = NssSource(NssConfig(nss_db.db, ("cert2", "cert3")))
    info = source.check()
    assert info.login_required
    assert info.raw_rsa
    assert [(c.label, c.key_size) for c in info.containers] == [("cert2", 2048), ("cert3", 1024)]
    assert source.check(password=nss_db.password).pin_checked
    with pytest.raises(TokenSourceError) as exc:
        source.check(password="not it")
    assert str(exc.value) == f"NSS database sql:{nss_db.directory}: wrong password"


def test_unknown_nicknames(nss_db: NssDb) -> None:
    with pytest.raises(TokenSourceError) as exc:
        NssSource(NssConfig(nss_db.db, ("cert1", "cert4", "nope"))).open()
    assert str(exc.value) == (
        f"NSS database sql:{nss_db.directory}: no certificate with nickname 'cert4', 'nope' "
        "(the database has: ca, cert1, cert2, cert3)"
    )


def test_missing_database(tmp_path: Path) -> None:
    with pytest.raises(TokenSourceError) as exc:
        NssSource(NssConfig(f"sql:{tmp_path}/nope", ("cert1",))).open()
    assert str(exc.value) == f"NSS database sql:{tmp_path}/nope: no such directory"
    with pytest.raises(TokenSourceError) as exc:
        NssSource(NssConfig(str(tmp_path), ("cert1",))).open()
    assert str(exc.value) == (
        f"NSS database sql:{tmp_path}: not an NSS sql: database (no cert9.db, key4.db)"
    )


def test_locked_database(tmp_path: Path, throwaway_ca: ThrowawayCa) -> None:
    db = make_nss_db(tmp_path / "locked", throwaway_ca)
    writer = sqlite3.connect(db.directory / "cert9.db", isolation_level=None)
    try:
        writer.execute("BEGIN EXCLUSIVE")  # another program in the middle of a write
        with pytest.raises(TokenSourceError) as exc:
            NssSource(NssConfig(db.db, ("cert1",))).open()
        assert str(exc.value) == (
            f"NSS database sql:{db.directory}: cannot open it (CKR_NSS_CERTDB_FAILED): "
            "cert9.db is locked by another process"
        )
    finally:
        writer.execute("ROLLBACK")
        writer.close()
    card = nss_card(db, ["cert1"])  # once the lock is gone, it opens
    assert Session(card).verify(db.password.encode()) == 0x9000


def test_two_databases_side_by_side(
    nss_db: NssDb, tmp_path: Path, throwaway_ca: ThrowawayCa
) -> None:
    other = make_nss_db(tmp_path / "second", throwaway_ca, password="second1")
    a, b = nss_card(nss_db), nss_card(other)
    sa, sb = Session(a), Session(b)
    assert sa.verify(nss_db.password.encode()) == 0x9000
    assert sb.verify(b"second1") == 0x9000
    assert sign_and_check(sa, a, 0, b"a") == 0x9000
    assert sign_and_check(sb, b, 0, b"b") == 0x9000
    assert public(a, 0) != public(b, 0)


def test_database_closed_and_reopened_is_removal_and_insertion(nss_db: NssDb) -> None:
    """The pkcs11 source on softokn: CKO_NSS_DELSLOT removes the token, NEWSLOT returns it."""
    softokn = Softokn()
    location = DbLocation.parse(nss_db.db)
    token = softokn.open_database(location)
    source = Pkcs11Source(
        Pkcs11Config(
            softokn.path,
            TokenSelector(label=token.label.strip()),
            ids=None,
            library_parameters=LIBRARY_PARAMETERS,
        )
    )
    # By default: every certificate with a key (NSS stores the public keys), by CKA_ID.
    default = source.check()
    assert sorted(c.label for c in default.containers) == ["ca", "cert1", "cert2", "cert3"]
    assert [c.key_id for c in default.containers] == sorted(c.key_id for c in default.containers)
    ids = tuple(c.key_id for c in NssSource(NssConfig(nss_db.db, ("cert1",))).check().containers)
    source = Pkcs11Source(dataclasses.replace(source.config, ids=ids))
    card = source.open()
    card.power_on()
    s = Session(card)
    assert s.verify(nss_db.password.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"before removal") == 0x9000
    assert source.poll() == []
    softokn.close_database(location)
    assert [e.action for e in source.poll()] == [PresenceAction.REMOVE]
    assert source.poll() == []
    assert sign_and_check(s, card, 0, b"removed") == 0x6F00
    softokn.open_database(location)
    (event,) = source.poll()
    assert event.action is PresenceAction.INSERT
    assert event.card is not None
    assert event.card is not card
    card = event.card
    card.power_on()
    s = Session(card)
    assert sign_and_check(s, card, 0, b"back, not logged in") == 0x6982
    assert s.verify(nss_db.password.encode()) == 0x9000
    assert sign_and_check(s, card, 0, b"back") == 0x9000
    signature_key = public(card, 0)
    signature_key.verify(
        rsa_op(s, _pkcs1(b"m", 256)).data, b"m", padding.PKCS1v15(), hashes.SHA256()
    )


def _pkcs1(message: bytes, k: int) -> bytes:
    from tests.cac.test_tlv_and_rsa import emsa_pkcs1_v15

    return emsa_pkcs1_v15(message, k)


def test_parameter_quoting() -> None:
    assert _quote("/a b/it's") == "'/a b/it\\'s'"
    assert _double_escape("x='a>b]'") == "x='a\\\\>b\\]'"
    assert str(DbLocation.parse("/x/db")) == "sql:/x/db"
    assert str(DbLocation.parse("dbm:/x/db")) == "dbm:/x/db"
    assert DbLocation.parse("dbm:/x").files == ("cert8.db", "key3.db")
