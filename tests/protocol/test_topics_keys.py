"""Topics build and parse only valid agent topics; key files are created 0600 and refused when open."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cleanroom_protocol import (
    Channel,
    KeyFileError,
    agent_filter,
    agent_topic,
    fingerprint,
    load_or_create_private_key,
    load_private_key,
    load_public_key,
    parse_agent_topic,
    public_key_pem,
)


def test_topics_round_trip() -> None:
    topic = agent_topic("tc-042", Channel.POSTURE)
    assert topic == "cleanroom/v1/agents/tc-042/posture"
    assert parse_agent_topic(topic) == ("tc-042", Channel.POSTURE)


@pytest.mark.parametrize(
    "topic",
    ["cleanroom/v1/agents/a/nope", "cleanroom/v2/agents/a/posture", "cleanroom/v1/agents/a+b/posture",
     "cleanroom/v1/agents/a/posture/x", "cleanroom/v1/policy", "x"],
)  # fmt: skip
def test_foreign_topics_do_not_parse(topic: str) -> None:
    assert parse_agent_topic(topic) is None


def test_invalid_agent_ids_cannot_build_topics() -> None:
    for bad in ["", "a/b", "#", "+", "a" * 65, "-lead"]:
        with pytest.raises(ValueError, match="invalid agent id"):
            agent_topic(bad, Channel.EVENTS)


def test_filters() -> None:
    assert agent_filter() == "cleanroom/v1/agents/+/+"
    assert agent_filter(Channel.ACKS, share_group="ctl") == "$share/ctl/cleanroom/v1/agents/+/acks"


def test_private_key_created_0600_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "agent.key"
    key, created = load_or_create_private_key(path)
    assert created and os.stat(path).st_mode & 0o777 == 0o600
    again, created_again = load_or_create_private_key(path)
    assert not created_again and fingerprint(again) == fingerprint(key)


def test_open_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    load_or_create_private_key(path)
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="must be 0600"):
        load_private_key(path)


def test_public_key_files(tmp_path: Path) -> None:
    key, _ = load_or_create_private_key(tmp_path / "k")
    pub = tmp_path / "k.pub"
    pub.write_text(public_key_pem(key))
    assert fingerprint(load_public_key(pub)) == fingerprint(key)
    pub.write_text("not a key")
    with pytest.raises(KeyFileError, match="not a PEM public key"):
        load_public_key(pub)


def test_a_symlinked_private_key_is_refused_not_followed(tmp_path: Path) -> None:
    real = tmp_path / "elsewhere.key"
    load_or_create_private_key(real)
    link = tmp_path / "agent.key"
    link.symlink_to(real)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_private_key(link)
    with pytest.raises(KeyFileError, match="symbolic link"):
        load_or_create_private_key(link)  # nor replaced by a new key behind the link


def test_a_private_key_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.fail("needs root to give the key file to another user")
    path = tmp_path / "agent.key"
    load_or_create_private_key(path)
    os.chown(path, 65534, 65534)  # nobody: could have written any key there
    with pytest.raises(KeyFileError, match="owned by uid 65534"):
        load_private_key(path)


def test_a_crash_during_creation_leaves_no_empty_key(tmp_path: Path) -> None:
    """A process killed between creating the key file and writing it (a real child process SIGKILLs itself
    where the file is about to be written) must not leave a file that stops every later start."""
    path = tmp_path / "agent.key"
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from cleanroom_protocol import load_or_create_private_key\n"
        "def die(*args, **kwargs): os.kill(os.getpid(), signal.SIGKILL)\n"
        "os.fdopen = die\n"
        "load_or_create_private_key(Path(sys.argv[1]))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, str(path)], timeout=30, check=False)
    assert done.returncode == -signal.SIGKILL
    assert not path.exists(), "a half-written key was left under the real name"
    key, created = load_or_create_private_key(path)
    assert created and fingerprint(load_private_key(path)) == fingerprint(key)


def test_an_empty_key_file_is_named_not_parsed(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    with pytest.raises(KeyFileError, match="is empty; remove it"):
        load_or_create_private_key(path)


def test_two_processes_creating_at_once_agree_on_one_key(tmp_path: Path) -> None:
    path = tmp_path / "agent.key"
    script = (
        "import sys\nfrom pathlib import Path\n"
        "from cleanroom_protocol import fingerprint, load_or_create_private_key\n"
        "print(fingerprint(load_or_create_private_key(Path(sys.argv[1]))[0]))\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script, str(path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    prints = {p.communicate(timeout=30)[0].strip() for p in procs}
    assert prints == {fingerprint(load_private_key(path))}
