"""Cards with a PIV edge from every card source: generated and stored, made from files in a
configuration, and by ``usbccid card new --piv``; what each gives the server."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.cli.helpers import assert_one_line_error, make_cert_and_key, run, running_server
from tests.piv.helpers import PIV_AID, Session
from usbccid.cac.card import CacCard
from usbccid.cards import files, stored
from usbccid.cards.cac import CardConfig
from usbccid.cards.generate import CardSpec, default_card_spec, default_piv_spec, generate_card
from usbccid.cards.manifest import card_from_files, card_to_files
from usbccid.cards.piv import EmulatedPiv
from usbccid.cards.provision import ProvisionError
from usbccid.cards.source import EmulatedCac
from usbccid.cards.store import save_card
from usbccid.piv.card import PivCard
from usbccid.piv.dual import DualCard
from usbccid.piv.keys import algorithm_of
from usbccid.tool.config import parse_config
from usbccid.tool.schema import ConfigError

NOW = datetime.datetime(2026, 6, 1, tzinfo=datetime.UTC)
CARD_ID = bytes(range(16))


def _spec(edges: str, key_types: list[str], retired: int = 0) -> CardSpec:
    from dataclasses import replace

    spec = default_card_spec(CARD_ID, key_size=1024, ca_key_size=1024)
    piv = default_piv_spec(CARD_ID, key_types=key_types, retired=retired)
    return replace(spec, containers=spec.containers if "cac" in edges else (), piv=piv, edges=edges)


def keys_of_size(bits: int) -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(65537, bits)


def test_generated_piv_card_usages_and_round_trip() -> None:
    spec = _spec("piv", ["rsa1024", "p256", "p384", "p256"], retired=1)
    card = generate_card(NOW, spec, card_id=CARD_ID, new_key=keys_of_size)
    assert card.profile.containers == ()
    refs = [s.ref for s in card.piv_slots]
    assert refs == [0x9A, 0x9C, 0x9D, 0x9E, 0x82]
    kinds = [algorithm_of(s.private_key).name for s in card.piv_slots]
    assert kinds == ["RSA 1024", "ECC P-256", "ECC P-384", "ECC P-256", "ECC P-256"]
    usage = {
        s.ref: s.certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        for s in card.piv_slots
    }
    assert usage[0x9A].digital_signature
    assert not usage[0x9A].key_encipherment
    assert usage[0x9C].content_commitment
    assert usage[0x9D].key_agreement
    assert not usage[0x9D].digital_signature
    assert usage[0x82].key_agreement
    eku = card.piv_slots[3].certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert [o.dotted_string for o in eku.value] == ["2.16.840.1.101.3.6.8"]  # id-PIV-cardAuth
    eku9a = card.piv_slots[0].certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert ExtendedKeyUsageOID.SMARTCARD_LOGON in list(eku9a.value)
    # every certificate is issued by the card's CA
    assert card.ca_certificate is not None
    for s in card.piv_slots:
        assert s.certificate.issuer == card.ca_certificate.subject
        s.certificate.verify_directly_issued_by(card.ca_certificate)
    files_ = card_to_files(card)
    manifest = json.loads(files_["card.json"])
    assert manifest["version"] == 2
    assert manifest["edges"] == "piv"
    assert [e["slot"] for e in manifest["piv_slots"]] == ["9a", "9c", "9d", "9e", "82"]
    back = card_from_files(files_.__getitem__)
    assert back.edges == "piv"
    assert [(s.ref, s.certificate) for s in back.piv_slots] == [
        (s.ref, s.certificate) for s in card.piv_slots
    ]
    rsa_usage = generate_card(NOW, _spec("piv", ["rsa1024"]), card_id=CARD_ID, new_key=keys_of_size)
    km = rsa_usage.piv_slots[2].certificate.extensions.get_extension_for_class(x509.KeyUsage).value
    assert km.key_encipherment
    assert not km.key_agreement


def test_a_cac_stays_version_1() -> None:
    spec = default_card_spec(CARD_ID, containers=1, key_size=1024, ca_key_size=1024)
    card = generate_card(NOW, spec, card_id=CARD_ID, new_key=keys_of_size)
    manifest = json.loads(card_to_files(card)["card.json"])
    assert manifest["version"] == 1
    assert "edges" not in manifest


def test_edges_need_their_keys() -> None:
    from dataclasses import replace

    with pytest.raises(ProvisionError, match="needs at least one key"):
        generate_card(NOW, replace(_spec("piv", ["rsa1024"]), piv=()), card_id=CARD_ID)
    with pytest.raises(ProvisionError, match="has no PIV keys"):
        generate_card(NOW, replace(_spec("cac+piv", ["p256"]), edges="cac"), card_id=CARD_ID)
    with pytest.raises(ProvisionError, match="not supported"):
        generate_card(NOW, _spec("piv", ["ed25519"]), card_id=CARD_ID, new_key=keys_of_size)
    with pytest.raises(ProvisionError, match="unknown card edges"):
        generate_card(NOW, _spec("piv+cac", ["rsa1024"]), card_id=CARD_ID, new_key=keys_of_size)


def test_stored_cards_give_piv_and_dual_cards(tmp_path: Path) -> None:
    for name, edges, kind in (("p", "piv", PivCard), ("d", "cac+piv", DualCard)):
        card = generate_card(NOW, _spec(edges, ["p256"]), new_key=keys_of_size)
        save_card(tmp_path, card, name)
        loaded = stored.load(name, tmp_path, NOW)
        assert isinstance(loaded, EmulatedPiv)
        assert loaded.same_card(stored.load(name, tmp_path, NOW))
        c = loaded.new_card()
        assert isinstance(c, kind)
        c.power_on()
        s = Session(c)
        assert s.select(PIV_AID).sw == 0x9000
        assert s.verify(b"00000000") == 0x63C2
        # the PIN state file of the stored card counted the try
        state = json.loads((tmp_path / "cards" / name / "pin-state.json").read_text())
        assert state["tries_left"] == 2
    description = stored.load("d", tmp_path, NOW).description
    assert description == 'stored card "d" (CAC+PIV, 3 containers, 4 PIV keys)'
    assert isinstance(stored.load("default", tmp_path, NOW), EmulatedCac)  # unchanged


def _ec_cert_and_key(directory: Path, name: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(7)
        .not_valid_before(NOW).not_valid_after(NOW + datetime.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    (directory / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / f"{name}.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return directory / f"{name}.pem", directory / f"{name}.key"


def _parse(text: str, base: Path) -> CardConfig:
    config = parse_config(text, "t.toml", base)
    card = config.readers[0].slots[0].card
    assert isinstance(card, CardConfig)
    return card


def test_files_source_feeds_piv_slots(tmp_path: Path) -> None:
    _ec_cert_and_key(tmp_path, "auth")
    make_cert_and_key(tmp_path, "id")
    text = """
[[reader]]
  [[reader.slot]]
  edges = "cac+piv"
  containers = [{ cert = "id.pem", key = "id.key" }]
  piv = [{ slot = "9A", cert = "auth.pem", key = "auth.key" },
         { slot = "9d", cert = "id.pem", key = "id.key" }]
  pin = "246813"
"""
    config = _parse(text, tmp_path)
    assert config.edges == "cac+piv"
    assert [p.ref for p in config.piv] == [0x9A, 0x9D]
    loaded = files.load(config, tmp_path / "state", NOW)
    assert isinstance(loaded, EmulatedPiv)
    assert loaded.description == "card from files (CAC+PIV, 1 container, 2 PIV keys)"
    card = loaded.new_card()
    card.power_on()
    s = Session(card)
    assert s.select(PIV_AID).sw == 0x9000
    assert s.verify(b"246813") == 0x9000
    assert (tmp_path / "state" / "pin-state").is_dir()
    cac_text = '[[reader]]\n[[reader.slot]]\ncontainers = [{ cert = "id.pem", key = "id.key" }]\n'
    cac_only = _parse(cac_text, tmp_path)
    assert cac_only.edges == "cac"
    assert isinstance(files.load(cac_only, tmp_path / "state", NOW).new_card(), CacCard)


@pytest.mark.parametrize(
    ("body", "line", "reason"),
    [
        (
            'edges = "pib"\n  containers = [{ cert = "id.pem", key = "id.key" }]',
            4,
            "expected one of",
        ),
        (
            'edges = "piv"\n  containers = [{ cert = "id.pem", key = "id.key" }]',
            5,
            "no use for containers",
        ),
        ('edges = "piv"\n  piv = []', 5, "at least one key"),
        (
            'edges = "cac+piv"\n  piv = [{ slot = "9a", cert = "id.pem", key = "id.key" }]',
            3,
            "at least one container",
        ),
        (
            'edges = "piv"\n  piv = [{ slot = "9b", cert = "id.pem", key = "id.key" }]',
            5,
            "unknown PIV key reference",
        ),
        ('edges = "piv"\n  piv = [{ cert = "id.pem", key = "id.key" }]', 5, "key reference"),
        (
            'edges = "piv"\n  piv = [{ slot = "9a", cert = "id.pem", key = "k.key", label = "x" }]',
            5,
            "label",
        ),
        (
            'edges = "piv"\n  piv = [{ slot = "83", cert = "id.pem", key = "id.key" }]',
            5,
            "in order from 82",
        ),
        (
            'edges = "piv"\n  piv = [{ slot = "9a", cert = "id.pem", key = "id.key" }]\n'
            '  pin = "1234"',
            6,
            "6 to 8 digits",
        ),
        ('card = "x"\n  edges = "piv"', 5, "keeps its own edges"),
    ],
)
def test_invalid_piv_slot_tables(tmp_path: Path, body: str, line: int, reason: str) -> None:
    make_cert_and_key(tmp_path, "id")
    with pytest.raises(ConfigError) as info:
        _parse(f"\n[[reader]]\n  [[reader.slot]]\n  {body}\n", tmp_path)
    assert info.value.line == line, str(info.value)
    assert reason in str(info.value)


def test_card_new_piv_and_serve(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run(
        "card", "new", "--state-dir", state, "--name", "ec", "--piv", "--key-type", "p256,p384",
        "--retired", "1", "--pin", "246813",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "edges: piv" in result.stdout
    assert "PIV key 9C: Digital Signature, ECC P-384" in result.stdout
    assert "PIV key 82: Retired Key Management 1, ECC P-384" in result.stdout  # the last repeats
    shown = json.loads(run("card", "show", "--state-dir", state, "--name", "ec", "--json").stdout)
    assert [k["slot"] for k in shown["piv_keys"]] == ["9a", "9c", "9d", "9e", "82"]
    assert shown["containers"] == []
    config = tmp_path / "c.toml"
    config.write_text("[[reader]]\n[[reader.slot]]\ncard = 'ec'\n")
    with running_server(["--config", config], state) as server:
        assert any(
            'stored card "ec" (PIV, 5 keys), inserted, PIN 246813' in line for line in server.banner
        ), server.banner


def test_card_new_piv_errors(tmp_path: Path) -> None:
    assert_one_line_error(
        run("card", "new", "--state-dir", tmp_path, "--piv", "--pin", "2468"), "6 to 8 digits"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", tmp_path, "--piv", "--key-type", "rsa512"), "--key-type"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", tmp_path, "--key-type", "p256"), "PIV edge"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", tmp_path, "--piv", "--containers", "2"), "CAC containers"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", tmp_path, "--piv", "--retired", "21"), "0 to 20"
    )
    cert, key = make_cert_and_key(tmp_path, "id")
    assert_one_line_error(
        run(
            "card",
            "new",
            "--state-dir",
            tmp_path,
            "--edges",
            "cac+piv",
            "--cert",
            cert,
            "--key",
            key,
        ),
        "configuration file",
    )
    result = run(
        "card", "new", "--state-dir", tmp_path, "--name", "f", "--piv", "--cert", cert, "--key", key
    )
    assert result.returncode == 0, result.stderr
    assert "PIV key 9A: PIV Authentication, RSA 1024" in result.stdout
