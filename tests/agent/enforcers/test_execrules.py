"""Exec decisions (pure): names, hashes, allowlist, loader opens, rule round trip."""

from __future__ import annotations

from cleanroom_agent.enforcers.capture import KnownFile, exec_rules_for
from cleanroom_agent.enforcers.execrules import (
    ExecRules,
    is_loader,
    judge_exec,
    judge_open,
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


def test_loader_open_denied_only_for_the_loader() -> None:
    loaders = frozenset({"/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"})
    assert is_loader("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", loaders)
    assert is_loader("/lib/ld-musl-x86_64.so.1", frozenset())
    assert not is_loader("/usr/bin/cp", loaders)
    assert judge_open(RULES, "/usr/bin/scrot", None, "/lib64/ld-linux-x86-64.so.2", True).matched == "loader"
    assert not judge_open(RULES, "/usr/bin/scrot", None, "/usr/bin/cp", False).deny
    assert not judge_open(RULES, "/usr/lib/libc.so.6", None, "/lib64/ld-linux-x86-64.so.2", True).deny


def test_round_trip_through_the_control_pipe_format() -> None:
    rules = ExecRules(
        deny_names=frozenset({"obs"}), deny_sizes=frozenset({3}), open_marks=("/usr/bin/obs",), enforce=False
    )
    assert ExecRules.from_dict(rules.to_dict()) == rules


def test_rules_from_policy_include_found_files() -> None:
    policy = Policy.model_validate(
        {"id": "p", "version": 1, "capture": {"deny": ["Import"], "deny_sha256": [H]}}
    )
    known = [KnownFile("import", "/usr/bin/import-im6.q16", "d" * 64, 123)]
    rules = exec_rules_for(policy, enforce=True, known=known, loaders=["/lib64/ld-linux-x86-64.so.2"])
    assert {"Import", "import", "import-im6.q16"} <= rules.deny_names
    assert rules.deny_hashes == {H, "d" * 64}
    assert rules.deny_sizes == frozenset({123})
    assert rules.hash_all
    assert rules.open_marks == ("/usr/bin/import-im6.q16",)
