"""The README's token-source sections, run as written (copy-paste examples must work)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.cards.conftest import SOFTHSM_MODULE, finalize_module
from tests.conftest import require_tool

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title: str) -> str:
    text = README.read_text()
    start = text.index(f"\n## {title}\n")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.DOTALL)


def run_shell(script: str, home: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **{k: v for k, v in os.environ.items() if k != "SOFTHSM2_CONF"},
        "HOME": str(home),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    return subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_pkcs11_section(tmp_path: Path) -> None:
    for tool in ("softhsm2-util", "pkcs11-tool", "openssl"):
        require_tool(tool)
    (script,) = blocks(section("Cards on a PKCS#11 token"), "sh")
    lines = script.splitlines()
    assert lines[-1].startswith("usbccid serve --config token.toml")
    checked = "\n".join(lines[:-1]) + "\nusbccid serve --config token.toml --check\n"
    finalize_module(SOFTHSM_MODULE)
    done = run_shell(checked, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "container 0: id, RSA 2048, CKA_ID 01" in done.stdout
    assert "subject: CN=DOE.JANE" in done.stdout
    assert "token.toml: OK (1 reader, 1 slot)" in done.stdout


def test_nss_section(tmp_path: Path) -> None:
    require_tool("certutil")
    text = section("Cards from an NSS database (QEMU's ccid-card-emulated)")
    qemu, make_db = blocks(text, "sh")
    assert "backend=certificates,db=sql:/home/me/nssdb,cert1=id-cert" in qemu
    (toml,) = blocks(text, "toml")
    done = run_shell(make_db, tmp_path)
    assert done.returncode == 0, done.stderr
    for i, nick in enumerate(("id-cert", "signing-cert", "encryption-cert")):
        assert f"container {i}: {nick}, RSA 2048" in done.stdout, done.stdout
    # The configuration as printed, pointed at this database, with its password checked.
    config = toml.replace("sql:/home/me/nssdb", f"sql:{tmp_path}/nssdb").replace(
        '# check_password_file = "nssdb.pw"', 'check_password_file = "nssdb.pw"'
    )
    (tmp_path / "qemu.toml").write_text(config)
    done = run_shell("usbccid serve --config qemu.toml --check --state-dir state", tmp_path)
    assert done.returncode == 0, done.stderr
    assert "qemu.toml: OK (1 reader, 1 slot)" in done.stdout
