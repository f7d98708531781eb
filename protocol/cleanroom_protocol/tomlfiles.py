"""TOML files an operator writes (the policy, the desktops file): read bounded, parsed, validated, and every
problem reported with file, line and field, so a broken file is refused with a message that says where."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

from pydantic import ValidationError


def read_text(path: Path, *, max_bytes: int, what: str, error: type[Exception]) -> str:
    """The file's text, at most ``max_bytes`` of UTF-8; else ``error`` naming the file."""
    try:
        with path.open("rb") as f:
            raw = f.read(max_bytes + 1)
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror}") from exc
    if len(raw) > max_bytes:
        raise error(f"{path}: {what} larger than {max_bytes} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 (byte {exc.start})") from exc


def parse(text: str, *, source: str, error: type[Exception]) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # tomllib's message already says "(at line L, column C)".
        raise error(f"{source}: invalid TOML: {exc}") from exc


def describe(exc: ValidationError, text: str, source: str) -> str:
    """Each problem as ``source:line: field a.b: message``, joined by ``; ``."""
    problems = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        field = ".".join(str(p) for p in loc) or "(top level)"
        line = line_of(text, loc)
        where = f"{source}:{line}" if line else source
        msg = str(err["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}: field {field}: {msg}")
    return "; ".join(problems)


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.\-\"' ]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"^\s*([A-Za-z0-9_\-\"']+)\s*=")


def _bare(name: str) -> str:
    return name.replace('"', "").replace("'", "").replace(" ", "")


def line_of(text: str, loc: tuple[int | str, ...]) -> int | None:
    """Best effort: the line of the key at ``loc`` (``("pool", 0, "desktop", 1, "overlay")``), else of the
    closest table header above it (a missing key is reported at its table)."""
    counts: dict[tuple[int | str, ...], int] = {}
    current: tuple[int | str, ...] = ()
    lines: dict[tuple[int | str, ...], int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if m := _HEADER.match(line):
            parts = _bare(m.group(2)).split(".")
            path: list[int | str] = []
            for depth, part in enumerate(parts):
                path.append(part)
                prefix = tuple(path)
                last = depth == len(parts) - 1
                if m.group(1) == "[[" and last:
                    counts[prefix] = counts.get(prefix, -1) + 1
                if prefix in counts:
                    path.append(counts[prefix])
            current = tuple(path)
            lines.setdefault(current, number)
            continue
        if m := _KEY.match(line):
            lines.setdefault((*current, _bare(m.group(1))), number)
    for end in range(len(loc), 0, -1):
        if loc[:end] in lines:
            return lines[loc[:end]]
    return None
