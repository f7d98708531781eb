"""Process identity: a real child process under a real parent."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from cleanroom_agent.enforcers.procinfo import identify


def test_identifies_session_membership_by_ancestor_name() -> None:
    child = subprocess.Popen(["sleep", "30"])
    try:
        inside = identify(child.pid, frozenset({"not-a-client"}))
        assert (inside.name, inside.in_session) == ("sleep", False)
        parent_name = identify(os.getpid(), frozenset()).name
        assert parent_name == Path("/proc/self/comm").read_text().strip()
        via_parent = identify(child.pid, frozenset({parent_name}))
        assert via_parent.in_session
        assert via_parent.session_client == parent_name
    finally:
        child.kill()
        child.wait()
    assert identify(None, frozenset()).pid is None
    assert identify(child.pid, frozenset({"sleep"})).name is None  # gone
