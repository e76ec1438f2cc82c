"""``usbccid card new/show/list`` through the installed console script."""

from __future__ import annotations

import json
from pathlib import Path

from tests.cli.helpers import (
    assert_one_line_error,
    make_cert_and_key,
    make_pkcs12,
    run,
    running_server,
    usbccid_env,
)


def test_new_generated_card_and_show(tmp_path: Path) -> None:
    state = tmp_path / "state"
    result = run(
        "card", "new", "--state-dir", state, "--name", "alice", "--containers", "2",
        "--key-size", "1024,2048", "--cn", "DOE.JANE.1234567890", "--pin", "2468",
        "--unblock-code", "13579135", "--tries", "5",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f'card "alice" created in {state / "cards" / "alice"}' in result.stdout
    assert "PIN: 2468 (5 of 5 tries left)" in result.stdout
    shown = json.loads(
        run("card", "show", "--state-dir", state, "--name", "alice", "--json").stdout
    )
    assert shown["pin"] == "2468"
    assert shown["unblock_code"] == "13579135"
    assert [c["key_size"] for c in shown["containers"]] == [1024, 2048]
    assert [c["label"] for c in shown["containers"]] == [
        "CAC ID Certificate",
        "CAC Email Signature Certificate",
    ]
    assert "CN=DOE.JANE.1234567890" in shown["containers"][0]["subject"]
    assert shown["ca_certificate"].endswith("ca.pem")
    text = run("card", "show", "--state-dir", state, "--name", "alice").stdout
    assert "container 1: CAC Email Signature Certificate, RSA 2048" in text
    assert run("card", "list", "--state-dir", state).stdout.split() == ["alice"]
    # it serves from a configuration
    config = tmp_path / "c.toml"
    config.write_text("[[reader]]\n[[reader.slot]]\ncard = 'alice'\n")
    with running_server(["--config", config], state) as server:
        assert any(
            'stored card "alice" (2 containers), inserted, PIN 2468' in line
            for line in server.banner
        )


def test_new_with_subject(tmp_path: Path) -> None:
    result = run(
        "card", "new", "--state-dir", tmp_path, "--containers", "1", "--key-size", "1024",
        "--subject", "CN=SMITH.JOHN.1111111111,OU=USA,O=U.S. Government,C=US",
        "--all-purpose", "-q",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(run("card", "show", "--state-dir", tmp_path, "--json").stdout)
    assert (
        shown["containers"][0]["subject"]
        == "CN=SMITH.JOHN.1111111111,OU=USA,O=U.S. Government,C=US"
    )


def test_new_from_files(tmp_path: Path) -> None:
    cert, key = make_cert_and_key(tmp_path, "id", passphrase=b"s3cret")
    p12 = make_pkcs12(tmp_path, "sig", b"s3cret")
    env = usbccid_env({"PW": "s3cret"})
    result = run(
        "card", "new", "--state-dir", tmp_path / "s", "--name", "bob", "--cert", cert, "--key", key,
        "--pkcs12", p12, "--passphrase-env", "PW", "--pin", "0000", env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    shown = json.loads(
        run("card", "show", "--state-dir", tmp_path / "s", "--name", "bob", "--json").stdout
    )
    assert [c["subject"] for c in shown["containers"]] == [
        "CN=usbccid test id",
        "CN=usbccid test sig",
    ]
    assert shown["pin"] == "0000"
    assert "ca_certificate" not in shown


def test_card_errors(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cert, key = make_cert_and_key(tmp_path, "id", passphrase=b"right")
    p12 = make_pkcs12(tmp_path, "sig", b"right")
    (tmp_path / "pw").write_text("wrong\n")
    assert_one_line_error(
        run(
            "card",
            "new",
            "--state-dir",
            state,
            "--pkcs12",
            p12,
            "--passphrase-file",
            tmp_path / "pw",
        ),
        "wrong passphrase",
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--cert", cert, "--key", key),
        "encrypted: a passphrase is needed",
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--cert", cert, "--key", tmp_path / "absent.key"),
        "cannot read",
        "absent.key",
    )
    (tmp_path / "garbage.key").write_text(
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--cert", cert, "--key", tmp_path / "garbage.key"),
        "cannot read the private key",
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--cert", cert), "1 --cert but 0 --key"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--pin", "12"), "--pin must be 4 to 8 digits"
    )
    assert_one_line_error(run("card", "new", "--state-dir", state, "--key-size", "512"), "512")
    assert_one_line_error(run("card", "new", "--state-dir", state, "--containers", "17"), "1 to 16")
    assert_one_line_error(run("card", "new", "--state-dir", state, "--tries", "0"), "retry limit")
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--subject", "garbage"), "RFC 4514"
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--passphrase-env", "X"), "only for --key/--pkcs12"
    )
    assert_one_line_error(
        run("card", "show", "--state-dir", state, "--name", "nobody"), "no card named 'nobody'"
    )
    assert (
        run(
            "card", "new", "--state-dir", state, "--containers", "1", "--key-size", "1024"
        ).returncode
        == 0
    )
    assert_one_line_error(
        run("card", "new", "--state-dir", state, "--containers", "1", "--key-size", "1024"),
        "already exists",
    )
    result = run("card", "list", "--state-dir", tmp_path / "empty")
    assert result.returncode == 0
    assert "no cards" in result.stderr
