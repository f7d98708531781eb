"""Which executions to deny (policy ``[capture]``). Pure and stdlib-only: the fanotify listener process
imports it without the rest of the agent.

A file is denied when its name is on the deny list, or its SHA-256 content hash is (so a renamed copy is
denied too), or — in allowlist mode — when a session user (uid ≥ ``session_uid_min``) starts anything not
on the allow list. A plain open of a denied file is denied only when the opener is the dynamic loader
(``ld-linux-x86-64.so.2 /usr/bin/scrot`` loads the tool with open+mmap, bypassing exec checks).

The loader is recognised by its path, its file name, or its content: the SHA-256 of the loaders installed
on this machine (hashed by the agent at start, as the denied tools are), so a copy under any name in any
folder is still the loader. In allowlist mode a session user may run the loader only as the interpreter
the kernel loads for the program just executed (its ``PT_INTERP``), never as a program of its own: run
directly, it would load any file with a plain open the exec checks never see.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

_LOADER_NAME = re.compile(r"^ld(-linux[-\w.]*|-musl[-\w.]*)?\.so(\.\d+)*$|^ld-[\w.-]*\.so[\w.]*$")


# NamedTuples, not dataclasses: ``dataclasses`` imports ``inspect`` (and with it ast, dis, tokenize), 1.6 MB
# of the listener process's ~15 MB for two records.
class ExecRules(NamedTuple):
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
    loader_hashes: frozenset[str] = frozenset()  # content of the installed dynamic loaders
    loader_sizes: frozenset[int] = frozenset()  # their sizes: only a file of such a size is hashed
    open_marks: tuple[str, ...] = ()  # denied files to watch for loader opens
    enforce: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            k: sorted(v) if isinstance(v, frozenset) else list(v) if isinstance(v, tuple) else v
            for k, v in self._asdict().items()
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExecRules:
        kwargs: dict[str, Any] = {}
        for name, default in cls._field_defaults.items():  # every field has one, of the field's type
            if name not in data:
                continue
            value = data[name]
            if isinstance(default, frozenset):
                kwargs[name] = frozenset(value)
            elif isinstance(default, tuple):
                kwargs[name] = tuple(value)
            else:
                kwargs[name] = value
        return cls(**kwargs)

    def needs_hash(self, size: int) -> bool:
        return self.hash_all or size in self.deny_sizes or (self.allowlist and bool(self.allow_hashes))

    def may_be_loader(self, size: int) -> bool:
        """Whether a file of this size must be hashed to tell if it is a (copied) loader."""
        return size in self.loader_sizes


class ExecVerdict(NamedTuple):
    deny: bool
    reason: str
    matched: str = ""  # "name", "sha256", "allowlist", "loader" or ""


ALLOW = ExecVerdict(False, "not matched")


def file_name(path: str) -> str:
    path = path.removesuffix(" (deleted)")
    return path.rsplit("/", 1)[-1]


def judge_exec(
    rules: ExecRules,
    path: str,
    sha256: str | None,
    uid: int | None,
    *,
    as_interpreter: bool = True,
) -> ExecVerdict:
    """``as_interpreter``: the file is being loaded as the interpreter of the program just executed
    (``PT_INTERP``), not run as a program itself. Only the allowlist looks at it, and only for loaders."""
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
        ):
            if clean in rules.loader_paths:
                if as_interpreter:
                    return ALLOW  # the kernel loading the interpreter of an allowed program
                return ExecVerdict(
                    True,
                    f"{name!r} (the dynamic loader) run as a program is not on the allowlist",
                    "allowlist",
                )
            return ExecVerdict(True, f"{name!r} is not on the allowlist", "allowlist")
    return ALLOW


def loader_match(rules: ExecRules, exe_path: str, sha256: str | None) -> str | None:
    """How a process's executable is recognised as a dynamic loader: ``"path"``, ``"name"`` or
    ``"sha256"`` (a copy of an installed loader under any name), or None when it is not one."""
    exe_path = exe_path.removesuffix(" (deleted)")
    if exe_path in rules.loader_paths:
        return "path"
    if _LOADER_NAME.match(file_name(exe_path)):
        return "name"
    if sha256 is not None and sha256 in rules.loader_hashes:
        return "sha256"
    return None


def judge_open(
    rules: ExecRules, path: str, sha256: str | None, opener_exe: str | None, loader_by: str | None
) -> ExecVerdict:
    """A plain open of a watched (denied) file: deny it to the loader only (``loader_by`` says how the
    opener was recognised as one, see :func:`loader_match`)."""
    if loader_by is None:
        return ALLOW
    verdict = judge_exec(rules, path, sha256, None)
    if not verdict.deny:
        return ALLOW
    what = file_name(opener_exe or "?")
    if loader_by == "sha256":
        what += " (a copy of the dynamic loader)"
    return ExecVerdict(True, f"loaded by {what}: {verdict.reason}", "loader")


ELF_HEADER = struct.Struct("<4sBBBBB7xHHIQQQIHHHHHH")
PROGRAM_HEADER = struct.Struct("<IIQQQQQQ")
PT_INTERP = 3
MAX_INTERP = 4096  # PATH_MAX: the kernel refuses longer interpreters


def elf_interpreter(head: bytes, read_at: Callable[[int, int], bytes]) -> str | None:
    """The ``PT_INTERP`` path of a 64-bit little-endian ELF file, or None (not ELF, static, other class).
    ``head`` holds the file's first bytes; ``read_at(offset, size)`` reads more when the program headers
    lie beyond it. Pure given the reader; bounded (at most 64 program headers, 4 KiB of path)."""
    if len(head) < ELF_HEADER.size or head[:4] != b"\x7fELF":
        return None
    fields = ELF_HEADER.unpack_from(head)
    ei_class, ei_data = fields[1], fields[2]
    e_type, e_phoff, e_phentsize, e_phnum = fields[6], fields[10], fields[14], fields[15]
    if ei_class != 2 or ei_data != 1 or e_type not in (2, 3) or e_phentsize != PROGRAM_HEADER.size:
        return None
    size = PROGRAM_HEADER.size * min(e_phnum, 64)
    table = head[e_phoff : e_phoff + size] if e_phoff + size <= len(head) else read_at(e_phoff, size)
    for i in range(len(table) // PROGRAM_HEADER.size):
        p_type, _flags, p_offset, _va, _pa, p_filesz, _memsz, _align = PROGRAM_HEADER.unpack_from(
            table, i * PROGRAM_HEADER.size
        )
        if p_type != PT_INTERP:
            continue
        if not 2 <= p_filesz <= MAX_INTERP:
            return None
        raw = read_at(p_offset, p_filesz)
        if len(raw) != p_filesz or raw[-1:] != b"\0":
            return None  # the kernel refuses an unterminated interpreter
        return raw[:-1].decode("utf-8", "surrogateescape")
    return None


class InterpreterTracker:
    """Which interpreter each process's exec in progress is about to load.

    The kernel answers an ``execve`` with two exec events for the same pid: the program, then the
    interpreter named in its ``PT_INTERP`` (opened before the point of no return, so in this order). A
    loader event for a pid whose last allowed program named that loader is the interpreter load; any other
    loader event is the loader run as a program. Pure state; bounded (oldest entries dropped)."""

    def __init__(self, limit: int = 4096) -> None:
        self._limit = limit
        self._pending: dict[int, str] = {}

    def program_allowed(self, pid: int, interpreter: str | None) -> None:
        self._pending.pop(pid, None)
        if interpreter is not None:
            if len(self._pending) >= self._limit:
                del self._pending[next(iter(self._pending))]
            self._pending[pid] = interpreter

    def is_interpreter_load(self, pid: int, resolves_to: Callable[[str], bool]) -> bool:
        """Consume the pid's pending interpreter; True when ``resolves_to`` says it is this file."""
        interpreter = self._pending.pop(pid, None)
        return interpreter is not None and resolves_to(interpreter)


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
