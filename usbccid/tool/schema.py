"""Reading a TOML configuration with errors that name the file, the line and the key.

tomllib reports syntax errors with their line but gives no positions for values, so for
semantic errors (unknown keys, bad types, a PIN of the wrong length) :class:`KeyLocator`
finds a key's line by scanning the text. :class:`Checker` is how every part of the
configuration reads its table (``usbccid.tool.config`` for the server and readers, each
card source in ``usbccid.cards`` for its own slot table): its errors are
:class:`ConfigError`, one line, ``FILE:LINE: key.path: reason``.

(A validation library was weighed for this: msgspec, for one, reports
``Expected `int`, got `str` - at `$.reader[0].slot[0].tries``` but knows no lines either,
and most of the checks here are domain rules that it would run as ``__post_init__`` with
the path of the table rather than of the key.)
"""

from __future__ import annotations

import contextlib
import re
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from usbccid.errors import UsbccidError

KeyPath = tuple[str | int, ...]


class ConfigError(UsbccidError):
    """The configuration is invalid. ``str()`` is one line: ``FILE:LINE: reason``."""

    def __init__(self, reason: str, source: str | None = None, line: int | None = None) -> None:
        self.reason = reason
        self.source = source
        self.line = line
        where = source or "<config>"
        if line is not None:
            where = f"{where}:{line}"
        super().__init__(f"{where}: {reason}")


class KeyLocator:
    """Maps key paths of a (valid) TOML document to the line where they are written.

    A path is a tuple of table keys and array indices, e.g. ``("reader", 1, "slot", 0,
    "pin")``. Headers, dotted keys, arrays of tables and inline tables/arrays are followed;
    :meth:`line_of` falls back to the nearest enclosing key that was found.
    """

    def __init__(self, text: str) -> None:
        self.lines: dict[KeyPath, int] = {}
        self._text = text
        self._pos = 0
        self._line = 1
        self._aot: dict[KeyPath, int] = {}
        with contextlib.suppress(IndexError, ValueError):  # best effort: keep what was found
            self._document()

    def line_of(self, path: KeyPath) -> int | None:
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    # the scanner -----------------------------------------------------------------------

    def _peek(self, n: int = 1) -> str:
        return self._text[self._pos : self._pos + n]

    def _advance(self, n: int = 1) -> None:
        self._line += self._text.count("\n", self._pos, self._pos + n)
        self._pos += n

    def _skip(self, newlines: bool) -> None:
        while self._pos < len(self._text):
            c = self._text[self._pos]
            if c in " \t\r" or (newlines and c == "\n"):
                self._advance()
            elif c == "#":
                end = self._text.find("\n", self._pos)
                self._advance((len(self._text) if end < 0 else end) - self._pos)
            else:
                return

    def _document(self) -> None:
        table: KeyPath = ()
        while True:
            self._skip(newlines=True)
            if self._pos >= len(self._text):
                return
            if self._peek() == "[":
                aot = self._peek(2) == "[["
                self._advance(2 if aot else 1)
                line = self._line
                keys = self._key()
                self._skip(newlines=False)
                self._advance(2 if aot else 1)
                table = self._resolve(keys, last_plain=aot)
                if aot:
                    index = self._aot.get(table, -1) + 1
                    self._aot[table] = index
                    table = (*table, index)
                self.lines.setdefault(table, line)
            else:
                self._keyval(table)

    def _resolve(self, keys: Sequence[str], last_plain: bool) -> KeyPath:
        path: KeyPath = ()
        for i, key in enumerate(keys):
            path = (*path, key)
            if path in self._aot and not (last_plain and i == len(keys) - 1):
                path = (*path, self._aot[path])
        return path

    def _key(self) -> list[str]:
        parts: list[str] = []
        while True:
            self._skip(newlines=False)
            c = self._peek()
            if c in "\"'":
                end = self._pos + 1
                while self._text[end] != c:
                    end += 2 if c == '"' and self._text[end] == "\\" else 1
                parts.append(self._text[self._pos + 1 : end])
                self._advance(end + 1 - self._pos)
            else:
                m = re.compile(r"[A-Za-z0-9_-]+").match(self._text, self._pos)
                if m is None:
                    raise ValueError("not a key")
                parts.append(m.group())
                self._advance(m.end() - self._pos)
            self._skip(newlines=False)
            if self._peek() != ".":
                return parts
            self._advance()

    def _keyval(self, table: KeyPath) -> None:
        line = self._line
        path = (*table, *self._key())
        self.lines.setdefault(path, line)
        self._skip(newlines=False)
        if self._peek() != "=":
            raise ValueError("expected =")
        self._advance()
        self._skip(newlines=False)
        self._value(path)

    def _value(self, path: KeyPath) -> None:
        c = self._peek()
        if c == "[":
            self._advance()
            index = 0
            while True:
                self._skip(newlines=True)
                if self._peek() == "]":
                    self._advance()
                    return
                if self._peek() == ",":
                    self._advance()
                    index += 1
                    continue
                self.lines.setdefault((*path, index), self._line)
                self._value((*path, index))
        elif c == "{":
            self._advance()
            while True:
                self._skip(newlines=False)
                if self._peek() == "}":
                    self._advance()
                    return
                if self._peek() == ",":
                    self._advance()
                    continue
                self._keyval(path)
        elif c in "\"'":
            quote = self._peek(3) if self._peek(3) in ('"""', "'''") else c
            end = self._pos + len(quote)
            while not self._text.startswith(quote, end):
                end += 2 if quote[0] == '"' and self._text[end] == "\\" else 1
            while self._text.startswith(quote[0], end + len(quote)):
                end += 1  # """a"""" : up to two quotes may end the content
            self._advance(end + len(quote) - self._pos)
        else:
            m = re.compile(r"[^,\]\}\s#]+").match(self._text, self._pos)
            if m is None:
                raise ValueError("not a value")
            self._advance(m.end() - self._pos)


class Checker:
    """Reads the tables of one TOML document, failing with the key's line and a reason.

    Every part of the configuration (the server, a reader, each card source's slot table)
    reads its keys through this, so that every error reads ``FILE:LINE: key: reason``.
    """

    def __init__(self, text: str, source: str, base_dir: Path) -> None:
        self.text = text
        self.source = source
        self.base_dir = base_dir
        self._locator: KeyLocator | None = None

    def line(self, path: KeyPath) -> int | None:
        if self._locator is None:
            self._locator = KeyLocator(self.text)
        return self._locator.line_of(path)

    def fail(self, path: KeyPath, reason: str) -> ConfigError:
        return ConfigError(
            f"{dotted(path)}: {reason}" if path else reason, self.source, self.line(path)
        )

    def origin(self, path: KeyPath) -> str:
        line = self.line(path)
        return self.source if line is None else f"{self.source}:{line}"

    def table(self, value: object, path: KeyPath, allowed: Sequence[str]) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a table, got {type_name(value)}")
        for key in value:
            if key not in allowed:
                hint = ", ".join(allowed)
                raise self.fail((*path, key), f"unknown key (expected one of: {hint})")
        return value

    def get(
        self,
        table: Mapping[str, Any],
        path: KeyPath,
        key: str,
        kind: type | tuple[type, ...],
        default: Any = None,
    ) -> Any:
        if key not in table:
            return default
        value = table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, not in TOML
        if isinstance(value, bool) and bool not in kinds:
            raise self.fail((*path, key), f"expected {_kind_name(kinds)}, got a boolean")
        if not isinstance(value, kinds):
            raise self.fail((*path, key), f"expected {_kind_name(kinds)}, got {type_name(value)}")
        return value

    def relative(self, raw: str | None) -> Path | None:
        """A path from the file, relative to the file's directory."""
        if raw is None:
            return None
        p = Path(raw).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def file(self, table: Mapping[str, Any], path: KeyPath, key: str) -> Path:
        raw = self.get(table, path, key, str)
        if raw is None:
            raise self.fail(path, f"missing key {key!r}")
        p = Path(raw).expanduser()
        if not p.is_absolute():
            p = self.base_dir / p
        if not p.is_file():
            raise self.fail((*path, key), f"no such file: {p}")
        return p


def dotted(path: KeyPath) -> str:
    """``("reader", 0, "slot", 1, "pin")`` -> ``reader[0].slot[1].pin``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def type_name(value: object) -> str:
    names = {
        str: "a string",
        int: "an integer",
        float: "a float",
        bool: "a boolean",
        list: "an array",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _kind_name(kinds: tuple[type, ...]) -> str:
    return " or ".join(type_name(k()) for k in kinds)


def toml_error(exc: tomllib.TOMLDecodeError, source: str) -> ConfigError:
    # "Invalid value (at line 3, column 7)"
    msg = str(exc)
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", msg)
    if m:
        reason = f"{msg[: m.start()]} (column {m.group(2)})"
        return ConfigError(f"invalid TOML: {reason}", source, int(m.group(1)))
    m = re.search(r"\s*\(at end of document\)$", msg)
    if m:
        return ConfigError(f"invalid TOML: {msg[: m.start()]} at end of file", source)
    return ConfigError(f"invalid TOML: {msg}", source)
