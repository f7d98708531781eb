"""Which executions to deny (policy ``[capture]``). Pure and stdlib-only: the fanotify listener process
imports it without the rest of the agent.

A file is denied when its name is on the deny list, or its SHA-256 content hash is (so a renamed copy is
denied too), or — in allowlist mode — when a session user (uid ≥ ``session_uid_min``) starts anything not
on the allow list. A plain open of a denied file is denied only when the opener is the dynamic loader
(``ld-linux-x86-64.so.2 /usr/bin/scrot`` loads the tool with open+mmap, bypassing exec checks).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_LOADER_NAME = re.compile(r"^ld(-linux[-\w.]*|-musl[-\w.]*)?\.so(\.\d+)*$|^ld-[\w.-]*\.so[\w.]*$")


@dataclass(frozen=True)
class ExecRules:
    deny_names: frozenset[str] = frozenset()
    deny_hashes: frozenset[str] = frozenset()
    deny_sizes: frozenset[int] = frozenset()  # sizes of files with a denied hash, when known
    hash_all: bool = False  # policy hashes of unknown size: every executed file must be hashed
    allowlist: bool = False
    allow_names: frozenset[str] = frozenset()
    allow_paths: frozenset[str] = frozenset()
    allow_hashes: frozenset[str] = frozenset()
    session_uid_min: int = 1000
    loader_paths: frozenset[str] = frozenset()
    open_marks: tuple[str, ...] = ()  # denied files to watch for loader opens
    enforce: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            k: sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
            for k, v in self.__dict__.items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecRules:
        kwargs: dict[str, Any] = {}
        for name, f in cls.__dataclass_fields__.items():
            if name not in data:
                continue
            value = data[name]
            kind = str(f.type)
            if kind.startswith("frozenset"):
                kwargs[name] = frozenset(value)
            elif kind.startswith("tuple"):
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def needs_hash(self, size: int) -> bool:
        return self.hash_all or size in self.deny_sizes or (self.allowlist and bool(self.allow_hashes))


@dataclass(frozen=True)
class ExecVerdict:
    deny: bool
    reason: str
    matched: str = ""  # "name", "sha256", "allowlist", "loader" or ""
    extra: dict[str, str] = field(default_factory=dict)


ALLOW = ExecVerdict(False, "not matched")


def file_name(path: str) -> str:
    path = path.removesuffix(" (deleted)")
    return path.rsplit("/", 1)[-1]


def judge_exec(rules: ExecRules, path: str, sha256: str | None, uid: int | None) -> ExecVerdict:
    name = file_name(path)
    if name in rules.deny_names or name.lower() in rules.deny_names:
        return ExecVerdict(True, f"executable name {name!r} is denied", "name")
    if sha256 is not None and sha256 in rules.deny_hashes:
        return ExecVerdict(True, f"content hash of {name!r} is denied", "sha256")
    if rules.allowlist and uid is not None and uid >= rules.session_uid_min:
        clean = path.removesuffix(" (deleted)")
        if not (
            name in rules.allow_names
            or clean in rules.allow_paths
            or (sha256 is not None and sha256 in rules.allow_hashes)
            or clean in rules.loader_paths
        ):
            return ExecVerdict(True, f"{name!r} is not on the allowlist", "allowlist")
    return ALLOW


def is_loader(exe_path: str, loader_paths: frozenset[str]) -> bool:
    exe_path = exe_path.removesuffix(" (deleted)")
    return exe_path in loader_paths or bool(_LOADER_NAME.match(file_name(exe_path)))


def judge_open(
    rules: ExecRules, path: str, sha256: str | None, opener_exe: str | None, opener_is_loader: bool
) -> ExecVerdict:
    """A plain open of a watched (denied) file: deny it to the loader only."""
    if not opener_is_loader:
        return ALLOW
    verdict = judge_exec(rules, path, sha256, None)
    if not verdict.deny:
        return ALLOW
    return ExecVerdict(True, f"loaded by {file_name(opener_exe or '?')}: {verdict.reason}", "loader")


def split_allow(entries: list[str]) -> tuple[frozenset[str], frozenset[str], frozenset[str]]:
    """Allow-list entries: an absolute path, a 64-hex SHA-256 (optionally ``sha256:``-prefixed), or a name."""
    names, paths, hashes = set(), set(), set()
    for entry in entries:
        value = entry.removeprefix("sha256:")
        if re.fullmatch(r"[0-9a-f]{64}", value):
            hashes.add(value)
        elif entry.startswith("/"):
            paths.add(entry)
        else:
            names.add(entry)
    return frozenset(names), frozenset(paths), frozenset(hashes)
