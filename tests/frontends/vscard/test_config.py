"""``frontend = "vscard"`` in the configuration file: what parses, what is refused (with
its line), and ``usbccid serve --vscard``'s configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from usbccid.tool.config import (
    Config,
    VscardConfig,
    parse_config,
    parse_vscard_endpoint,
    vscard_config,
)
from usbccid.tool.schema import ConfigError

BASE = Path("/etc/usbccid")


def parse(text: str) -> Config:
    return parse_config(text, "test.toml", BASE, preset_names=lambda: ["vmware", "qemu"])


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse(text)
    return info.value


def reader(body: str) -> str:
    return f'[[reader]]\nname = "q"\nfrontend = "vscard"\n{body}\n'


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('vscard = { listen = "127.0.0.1:2001" }', VscardConfig("listen", "127.0.0.1", 2001)),
        ('vscard = { listen = "2001" }', VscardConfig("listen", "127.0.0.1", 2001)),
        ('vscard = { listen = "[::1]:0" }', VscardConfig("listen", "::1", 0)),
        ('vscard = { connect = "10.0.0.5:2001" }', VscardConfig("connect", "10.0.0.5", 2001)),
        (
            'vscard = { listen = "/run/usbccid/q.sock" }',
            VscardConfig("listen", path=Path("/run/usbccid/q.sock")),
        ),
        ('vscard = { connect = "./q.sock" }', VscardConfig("connect", path=BASE / "q.sock")),
        ('[reader.vscard]\nlisten = "0.0.0.0:2001"', VscardConfig("listen", "0.0.0.0", 2001)),
    ],
)
def test_endpoints(table: str, expected: VscardConfig) -> None:
    config = parse(reader(table))
    (r,) = config.readers
    assert r.frontend == "vscard"
    assert r.vscard == expected
    assert len(r.slots) == 1


def test_with_a_slot_and_a_usbip_reader_beside_it() -> None:
    config = parse(
        '[[reader]]\nname = "desk"\n\n'
        + reader('vscard = { listen = "2001" }\n  [[reader.slot]]\n  card = "alice"')
    )
    desk, q = config.readers
    assert (desk.frontend, desk.vscard) == ("usbip", None)
    assert q.frontend == "vscard"


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        (reader(""), 1, "needs vscard = "),
        (reader("vscard = {}"), 4, "either listen or connect"),
        (reader('vscard = { listen = "1", connect = "2" }'), 4, "either listen or connect"),
        (reader('vscard = { listen = "host:port" }'), 4, "is not HOST:PORT"),
        (reader('vscard = { listen = "70000" }'), 4, "out of range 0-65535"),
        (reader('vscard = { connect = "127.0.0.1:0" }'), 4, "out of range 1-65535"),
        (reader('vscard = { listen = ":2001" }'), 4, "is not HOST:PORT"),
        (reader("vscard = { listen = 2001 }"), 4, "expected a string"),
        (reader('vscard = { lisen = "2001" }'), 4, "lisen"),
        (reader('bus_id = "1-1"\nvscard = { listen = "2001" }'), 4, "has no bus id"),
        (reader('identity = "qemu"\nvscard = { listen = "2001" }'), 4, "has no identity"),
        (
            reader('vscard = { listen = "2001" }\n[[reader.slot]]\n[[reader.slot]]'),
            6,
            "one slot",
        ),
        ('[[reader]]\nname = "d"\nvscard = { listen = "2001" }\n', 3, 'frontend = "vscard"'),
        ('[[reader]]\nname = "d"\nfrontend = "spice"\n', 3, "unknown front end 'spice'"),
    ],
)
def test_errors_name_their_line(text: str, line: int, needle: str) -> None:
    e = error(text)
    assert needle in e.reason, e
    assert e.line == line, e


def test_serve_vscard_shortcut() -> None:
    config = vscard_config("2001")
    (r,) = config.readers
    assert (r.name, r.frontend) == ("reader0", "vscard")
    assert r.vscard == VscardConfig("listen", "127.0.0.1", 2001)
    assert r.slots[0].card is not None  # the default card
    assert vscard_config("/tmp/q.sock").readers[0].vscard == VscardConfig(
        "listen", path=Path("/tmp/q.sock")
    )
    with pytest.raises(ConfigError, match="--vscard: 'x' is not HOST:PORT"):
        vscard_config("x")


def test_endpoint_text_round_trip() -> None:
    for text in ("127.0.0.1:2001", "[::1]:5", "/run/q.sock"):
        assert parse_vscard_endpoint(text).describe() == text


def test_the_examples_vscard_reader_parses() -> None:
    text = (Path(__file__).resolve().parents[3] / "examples" / "usbccid.toml").read_text()
    start = text.index('# name = "qemu"') - len("# [[reader]]\n")
    block = text[start : text.index("\n\n", start)]
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") else "" for line in block.splitlines()
    )
    (reader,) = parse(uncommented).readers
    assert (reader.frontend, reader.vscard) == (
        "vscard",
        VscardConfig("listen", "127.0.0.1", 2001),
    )
