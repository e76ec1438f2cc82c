"""The README's "QEMU ccid-card-passthru" section says what the program does: its banner
and QEMU options are the program's, its configuration parses. (tests/vm/test_vscard.py
gives those options to a real QEMU.)"""

from __future__ import annotations

from pathlib import Path

from usbccid.frontends.vscard.frontend import VscardFrontend
from usbccid.tool.config import parse_config, vscard_config

README = Path(__file__).resolve().parents[3] / "README.md"


def section() -> str:
    text = README.read_text()
    start = text.index("## QEMU ccid-card-passthru")
    return text[start : text.index("\n## ", start + 1)]


def blocks(kind: str) -> list[str]:
    """The section's fenced code blocks of ``kind`` ("" for plain ones), in order."""
    found: list[str] = []
    current: list[str] | None = None
    lang = ""
    for line in section().splitlines():
        if line.startswith("```"):
            if current is None:
                current, lang = [], line[3:].strip()
            else:
                if lang == kind:
                    found.append("\n".join(current) + "\n")
                current = None
        elif current is not None:
            current.append(line)
    return found


def test_the_printed_qemu_options_are_the_programs() -> None:
    install = blocks("sh")[0]
    assert install.strip().endswith("usbccid serve --vscard 2001")
    banner = blocks("")[0]
    config = vscard_config("2001")
    frontend = VscardFrontend(config)
    reader = frontend.add_reader(config.readers[0])
    assert f"reader reader0: vscard {reader.address}" in banner
    assert banner.splitlines()[-2:] == frontend.banner()
    qemu = blocks("sh")[1]
    options = " ".join(qemu.replace("\\\n", " ").split()).split("guest.qcow2 ", 1)[1]
    assert options == reader.qemu_options()


def test_the_configuration_parses(tmp_path: Path) -> None:
    (toml,) = blocks("toml")
    config = parse_config(toml, "README.md", tmp_path)
    (reader,) = config.readers
    assert reader.frontend == "vscard"
    assert reader.vscard is not None
    assert reader.vscard.describe() == "127.0.0.1:2001"
