"""The Mosquitto configuration `broker-config` writes (rendering is pure; the files and the reload are
checked on disk and against real processes). What the broker makes of it: tests/integration/test_broker_mtls.py."""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from cleanroom_controller.trust import (
    BrokerConfigError,
    BrokerFiles,
    CrlKeeper,
    Listen,
    Pki,
    build_csr,
    parse_listen,
    reload_broker,
    render_acl,
    render_conf,
    write_broker_config,
    write_crl,
)
from cleanroom_controller.trust.certificates import new_key
from cleanroom_protocol import MAX_MESSAGE_BYTES


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki.init(tmp_path / "ctl")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_conf_requires_client_certificates_over_tls_12_or_newer() -> None:
    conf = lines(render_conf(BrokerFiles(Path("/b")), Listen("0.0.0.0", 8883), user="mosquitto"))
    for required in (
        "listener 8883 0.0.0.0",
        "tls_version tlsv1.2",
        "cafile /b/ca.crt",
        "certfile /b/server.crt",
        "keyfile /b/server.key",
        "crlfile /b/crl.pem",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "allow_anonymous false",
        "acl_file /b/acl",
        "persistence true",
        "persistence_location /b/data/",
        "pid_file /b/run/mosquitto.pid",
        "user mosquitto",
    ):
        assert required in conf, required
    packet = next(int(x.split()[1]) for x in conf if x.startswith("max_packet_size"))
    assert MAX_MESSAGE_BYTES < packet <= MAX_MESSAGE_BYTES + 2048
    assert not [x for x in conf if x.startswith(("password_file", "allow_anonymous true"))]


def test_acl_lets_each_agent_speak_only_for_itself() -> None:
    acl = lines(render_acl(["controller"]))
    patterns = [x for x in acl if x.startswith("pattern")]
    assert patterns == [
        "pattern write cleanroom/v1/agents/%u/posture",
        "pattern write cleanroom/v1/agents/%u/events",
        "pattern write cleanroom/v1/agents/%u/status",
        "pattern write cleanroom/v1/agents/%u/acks",
        "pattern read cleanroom/v1/agents/%u/commands",
        "pattern read cleanroom/v1/agents/%u/watermark",
        "pattern read cleanroom/v1/policy",
    ]
    # the watermark tells an agent which of its messages it may forget: only the controllers write it
    assert not [x for x in acl if "write" in x and x.endswith("/watermark") and x.startswith("pattern")]
    assert not [x for x in acl if "readwrite" in x or x.endswith(" #")]


def test_acl_gives_each_controller_the_agent_topics_and_the_commands() -> None:
    acl = lines(render_acl(["controller", "ingest-2"]))
    for name in ("controller", "ingest-2"):
        block = acl[acl.index(f"user {name}") + 1 :]
        block = block[: next((i for i, x in enumerate(block) if not x.startswith("topic")), len(block))]
        for channel in ("posture", "events", "status", "acks"):
            assert f"topic read cleanroom/v1/agents/+/{channel}" in block
            assert f"topic read $share/+/cleanroom/v1/agents/+/{channel}" in block
        assert "topic write cleanroom/v1/agents/+/commands" in block
        assert "topic write cleanroom/v1/agents/+/watermark" in block
        assert "topic write cleanroom/v1/policy" in block


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.0.0.0:8883", Listen("0.0.0.0", 8883)),
        ("[::]:8883", Listen("::", 8883)),
        ("127.0.0.1:1", Listen("127.0.0.1", 1)),
    ],
)
def test_listen_parses(text: str, expected: Listen) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["8883", "host.example:8883", "0.0.0.0:0", "0.0.0.0:70000", "0.0.0.0:x"])
def test_bad_listen_is_refused(text: str) -> None:
    with pytest.raises(BrokerConfigError, match="--listen"):
        parse_listen(text)


def test_written_files_use_absolute_paths_and_keep_the_key_from_others(
    pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    files = write_broker_config(Path("broker"), pki, listen=Listen("127.0.0.1", 8883))
    assert files.out.is_absolute()
    assert f"cafile {tmp_path}/broker/ca.crt" in files.conf.read_text()
    assert files.ca.read_bytes() == pki.ca_pem
    assert files.crl.read_bytes() == pki.crl_pem()
    key_mode = stat.S_IMODE(files.key.stat().st_mode)
    assert key_mode & 0o007 == 0
    if os.geteuid() == 0:  # Mosquitto drops to `mosquitto`: its group reads the key, it owns its data
        broker = pwd.getpwnam("mosquitto")
        assert key_mode == 0o640 and files.key.stat().st_gid == broker.pw_gid
        assert files.data.stat().st_uid == broker.pw_uid and files.run.stat().st_uid == broker.pw_uid
    else:
        assert key_mode == 0o600


def test_acl_lists_the_controllers_of_the_pki(pki: Pki, tmp_path: Path) -> None:
    pki.issue_controller("ingest-2")
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    assert {x for x in lines(files.acl.read_text()) if x.startswith("user ")} == {
        "user controller",
        "user ingest-2",
    }


def test_write_crl_refreshes_the_brokers_copy(pki: Pki, tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1")
    pki.revoke("tc-1", "lost")
    assert files.crl.read_bytes() != pki.crl_pem()
    write_crl(files.out, pki)
    assert files.crl.read_bytes() == pki.crl_pem()


def test_write_crl_needs_a_broker_config(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(BrokerConfigError, match="no broker configuration"):
        write_crl(tmp_path / "nothing", pki)


def test_reload_refuses_a_pid_that_is_not_mosquitto(pki: Pki, tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        files.pid.write_text(f"{bystander.pid}\n")
        with pytest.raises(BrokerConfigError, match="not mosquitto; not signalled"):
            reload_broker(files.out)
        assert bystander.poll() is None  # a SIGHUP would have ended it
    finally:
        bystander.kill()
        bystander.wait()


def test_reload_refuses_a_missing_or_stale_pid_file(pki: Pki, tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    with pytest.raises(BrokerConfigError, match="no pid file"):
        reload_broker(files.out)
    gone = subprocess.Popen(["true"])
    gone.wait()
    files.pid.write_text(f"{gone.pid}\n")
    with pytest.raises(BrokerConfigError, match="not running"):
        reload_broker(files.out)
    files.pid.write_text("garbage")
    with pytest.raises(BrokerConfigError, match="does not hold a process id"):
        reload_broker(files.out)


# -- keeping the CRL alive --------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


def test_crl_keeper_hands_the_crl_over_at_start_on_change_and_when_due(pki: Pki, tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    reloads: list[Path] = []
    clock = Clock()
    keeper = CrlKeeper(pki, files.out, clock=clock, reload=lambda d: reloads.append(d) or 4242)

    first = keeper.check()  # unknown whether the broker loaded the copy: reload once
    assert first is not None and first.broker_pid == 4242 and not first.refreshed
    assert keeper.check() is None and len(reloads) == 1

    pki.issue_client(build_csr(new_key(), "x"), common_name="tc-1")
    pki.revoke("tc-1", "lost")  # as `agents revoke` would, but say its own reload failed
    update = keeper.check()
    assert update is not None and update.revoked == 1 and files.crl.read_bytes() == pki.crl_pem()
    assert len(reloads) == 2

    clock.now += timedelta(days=4)
    update = keeper.check()
    assert update is not None and update.refreshed and update.broker_pid == 4242
    assert files.crl.read_bytes() == pki.crl_pem()


def test_crl_keeper_retries_a_failed_reload(pki: Pki, tmp_path: Path) -> None:
    files = write_broker_config(tmp_path / "b", pki, listen=Listen("127.0.0.1", 8883))
    attempts: list[int] = []

    def reload(_: Path) -> int:
        attempts.append(1)
        if len(attempts) == 1:
            raise BrokerConfigError("broker down")
        return 7

    keeper = CrlKeeper(pki, files.out, reload=reload)
    with pytest.raises(BrokerConfigError):
        keeper.check()
    update = keeper.check()
    assert update is not None and update.broker_pid == 7


def test_crl_keeper_without_a_broker_dir_only_refreshes(pki: Pki) -> None:
    clock = Clock()
    keeper = CrlKeeper(pki, None, clock=clock, reload=lambda _: pytest.fail("no broker to reload"))
    assert keeper.check() is None
    clock.now += timedelta(days=6)
    update = keeper.check()
    assert update is not None and update.refreshed and update.broker_pid is None
