"""Exec decisions (pure): names, hashes, allowlist, loader opens (loaders by path, name and content), the
loader as interpreter or as a program, ELF interpreter parsing (on this machine's real binaries), rule
round trip."""

from __future__ import annotations

import struct
from pathlib import Path

from cleanroom_agent.enforcers.capture import KnownFile, exec_rules_for
from cleanroom_agent.enforcers.execrules import (
    ExecRules,
    InterpreterTracker,
    elf_interpreter,
    judge_exec,
    judge_open,
    loader_match,
    split_allow,
)
from cleanroom_protocol import Policy

H = "a" * 64
RULES = ExecRules(deny_names=frozenset({"scrot"}), deny_hashes=frozenset({H}), deny_sizes=frozenset({10}))


def test_name_hash_and_unknown() -> None:
    assert judge_exec(RULES, "/usr/bin/scrot", None, 1000).matched == "name"
    assert judge_exec(RULES, "/tmp/renamed", H, 1000).matched == "sha256"
    assert judge_exec(RULES, "/tmp/x (deleted)", H, None).deny
    assert not judge_exec(RULES, "/bin/true", "b" * 64, 1000).deny
    assert RULES.needs_hash(10)
    assert not RULES.needs_hash(11)


def test_allowlist_applies_to_session_users_only() -> None:
    names, paths, hashes = split_allow(["echo", "/opt/vdi/bin/client", "sha256:" + "c" * 64])
    rules = ExecRules(allowlist=True, allow_names=names, allow_paths=paths, allow_hashes=hashes)
    assert judge_exec(rules, "/bin/true", None, 1000).matched == "allowlist"
    assert not judge_exec(rules, "/bin/true", None, 0).deny
    assert not judge_exec(rules, "/bin/true", None, None).deny
    assert not judge_exec(rules, "/bin/echo", None, 1000).deny
    assert not judge_exec(rules, "/opt/vdi/bin/client", None, 1000).deny
    assert not judge_exec(rules, "/tmp/anything", "c" * 64, 1000).deny


LOADER = "/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"
L = "1" * 64  # the loader's content hash


def test_loader_open_denied_only_for_the_loader() -> None:
    rules = ExecRules(loader_paths=frozenset({LOADER}), loader_hashes=frozenset({L}))
    assert loader_match(rules, LOADER, None) == "path"
    assert loader_match(rules, "/lib/ld-musl-x86_64.so.1", None) == "name"
    assert loader_match(rules, "/usr/bin/cp", None) is None
    assert loader_match(rules, "/usr/bin/cp", "2" * 64) is None
    assert (
        judge_open(RULES, "/usr/bin/scrot", None, "/lib64/ld-linux-x86-64.so.2", "path").matched == "loader"
    )
    assert not judge_open(RULES, "/usr/bin/scrot", None, "/usr/bin/cp", None).deny
    assert not judge_open(RULES, "/usr/lib/libc.so.6", None, "/lib64/ld-linux-x86-64.so.2", "path").deny


def test_a_copied_loader_is_a_loader_by_content() -> None:
    rules = ExecRules(
        loader_paths=frozenset({LOADER}), loader_hashes=frozenset({L}), loader_sizes=frozenset({9})
    )
    assert loader_match(rules, "/home/u/x", L) == "sha256"
    assert loader_match(rules, "/home/u/x (deleted)", L) == "sha256"
    assert rules.may_be_loader(9)
    assert not rules.may_be_loader(10)
    verdict = judge_open(RULES, "/usr/bin/scrot", None, "/home/u/x", "sha256")
    assert verdict.matched == "loader"
    assert "x (a copy of the dynamic loader)" in verdict.reason


def test_allowlist_lets_the_loader_in_only_as_an_interpreter() -> None:
    rules = ExecRules(allowlist=True, allow_names=frozenset({"echo"}), loader_paths=frozenset({LOADER}))
    assert not judge_exec(rules, LOADER, None, 1000, as_interpreter=True).deny
    program = judge_exec(rules, LOADER, None, 1000, as_interpreter=False)
    assert (program.deny, program.matched) == (True, "allowlist")
    assert "run as a program" in program.reason
    assert not judge_exec(rules, LOADER, None, 0, as_interpreter=False).deny  # root: deny list only
    copied = judge_exec(rules, "/home/u/x", L, 1000, as_interpreter=True)  # a copy is no interpreter path
    assert copied.deny


def test_interpreter_tracker_pairs_a_program_with_its_interpreter() -> None:
    tracker = InterpreterTracker(limit=2)
    same = lambda interp: interp == "/lib64/ld-linux-x86-64.so.2"  # noqa: E731
    assert not tracker.is_interpreter_load(7, same)  # no program before: the loader run directly
    tracker.program_allowed(7, "/lib64/ld-linux-x86-64.so.2")
    assert tracker.is_interpreter_load(7, same)
    assert not tracker.is_interpreter_load(7, same)  # consumed: a second loader exec is a program
    tracker.program_allowed(7, "/opt/other/ld.so")
    assert not tracker.is_interpreter_load(7, same)  # named another interpreter
    tracker.program_allowed(8, None)  # a static program: nothing pending
    assert not tracker.is_interpreter_load(8, same)
    for pid in (1, 2, 3):
        tracker.program_allowed(pid, "/lib64/ld-linux-x86-64.so.2")
    assert not tracker.is_interpreter_load(1, same)  # bounded: the oldest went
    assert tracker.is_interpreter_load(3, same)


def read_elf(path: str) -> str | None:
    data = Path(path).read_bytes()
    return elf_interpreter(data[:1024], lambda offset, size: data[offset : offset + size])


def test_elf_interpreter_of_real_binaries_and_bad_input() -> None:
    assert read_elf("/bin/echo") == "/lib64/ld-linux-x86-64.so.2"
    assert read_elf("/usr/bin/scrot") == "/lib64/ld-linux-x86-64.so.2"
    assert read_elf("/lib64/ld-linux-x86-64.so.2") is None  # the loader has none
    assert elf_interpreter(b"#!/bin/sh\n", lambda o, n: b"") is None
    assert elf_interpreter(b"\x7fELF", lambda o, n: b"") is None  # truncated
    data = bytearray(Path("/bin/echo").read_bytes()[:4096])
    phoff, phnum = struct.unpack_from("<Q", data, 32)[0], struct.unpack_from("<H", data, 56)[0]
    for i in range(phnum):
        p_type, _f, p_offset, _v, _p, p_filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * i)
        if p_type == 3:
            data[p_offset + p_filesz - 1] = ord("x")  # unterminated: the kernel refuses it
    assert elf_interpreter(bytes(data[:1024]), lambda o, n: bytes(data[o : o + n])) is None


def test_round_trip_through_the_control_pipe_format() -> None:
    rules = ExecRules(
        deny_names=frozenset({"obs"}),
        deny_sizes=frozenset({3}),
        loader_hashes=frozenset({L}),
        loader_sizes=frozenset({215000}),
        open_marks=("/usr/bin/obs",),
        enforce=False,
    )
    assert ExecRules.from_dict(rules.to_dict()) == rules


def test_rules_from_policy_include_found_files() -> None:
    policy = Policy.model_validate(
        {"id": "p", "version": 1, "capture": {"deny": ["Import"], "deny_sha256": [H]}}
    )
    known = [KnownFile("import", "/usr/bin/import-im6.q16", "d" * 64, 123)]
    loaders = [
        KnownFile("ld-linux-x86-64.so.2", "/lib64/ld-linux-x86-64.so.2", L, 215000),
        KnownFile("ld-linux-x86-64.so.2", LOADER, L, 215000),
    ]
    rules = exec_rules_for(policy, enforce=True, known=known, loaders=loaders)
    assert {"Import", "import", "import-im6.q16"} <= rules.deny_names
    assert rules.deny_hashes == {H, "d" * 64}
    assert rules.deny_sizes == frozenset({123})
    assert rules.hash_all
    assert rules.open_marks == ("/usr/bin/import-im6.q16",)
    assert rules.loader_paths == {"/lib64/ld-linux-x86-64.so.2", LOADER}
    assert (rules.loader_hashes, rules.loader_sizes) == ({L}, {215000})
