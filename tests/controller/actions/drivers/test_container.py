"""The container driver against a real, private dockerd (Debian's docker.io, ``tests/support/dockerd.py``) and a
real image (static busybox, imported: no registry is reachable here). Data is written into the desktop with
``exec``, as a user's session would; the runner test drives the real state machine, store and audit chain.
One daemon serves the whole module."""

from __future__ import annotations

import asyncio
import socket
import tempfile
import time
from collections.abc import Coroutine, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
import pytest

from cleanroom_controller.actions.drivers.base import SessionRef
from cleanroom_controller.actions.drivers.container import (
    WIPE_LABEL,
    ContainerDriver,
    FreshDesktop,
    engine_time,
    wipe_problems,
)
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.desktops.config import DesktopSpec, parse_desktops
from cleanroom_controller.desktops.machine import DesktopState
from cleanroom_controller.desktops.runner import DesktopRunner
from cleanroom_controller.store import Store
from tests.support.dockerd import Dockerd
from tests.support.wait import async_wait_for

IMAGE = "cleanroom-test/busybox:1"
# PID 1 of a container has no default signal handlers: the trap makes SIGTERM end it at once.
COMMAND = '["/bin/sh", "-c", "trap \'exit 0\' TERM; sleep 3600 & wait"]'


@pytest.fixture(scope="module")
def daemon() -> Iterator[Dockerd]:
    d = Dockerd()
    d.start()
    try:
        d.import_busybox()
        yield d
    finally:
        d.stop()


def desktop(
    uri: str,
    desktop_id: str,
    *,
    image: str = IMAGE,
    timeout_s: float = 20,
    pool_extra: str = "",
    desktop_extra: str = "",
) -> DesktopSpec:
    spec = parse_desktops(f"""
[[pool]]
id = "p"
driver = "container"
uri = "{uri}"
image = "{image}"
timeout_s = {timeout_s}
stop_grace_s = 0.5
{pool_extra}
[[pool.desktop]]
id = "{desktop_id}"
address = "10.9.0.1"
volumes = ["{desktop_id}-data:/data"]
command = {COMMAND}
{desktop_extra}
""").get(desktop_id)
    assert spec is not None
    return spec


def sh(daemon: Dockerd, name: str, script: str) -> int:
    """Run ``script`` inside the desktop, as a session would; its exit code."""
    code, _out = daemon.client.containers.get(name).exec_run(["/bin/sh", "-c", script])
    return int(code)


def stage_data(daemon: Dockerd, name: str) -> None:
    """The user stages data in the container's own filesystem and in its volume."""
    assert sh(daemon, name, "echo phi > /tmp/staged && echo phi > /data/staged") == 0
    assert sh(daemon, name, "test -e /tmp/staged && test -e /data/staged") == 0


def assert_fresh(daemon: Dockerd, name: str) -> None:
    assert sh(daemon, name, "test -e /tmp/staged") == 1, "the container's filesystem kept the session's file"
    assert sh(daemon, name, "test -e /data/staged") == 1, "the volume kept the session's file"


def image_facts(daemon: Dockerd) -> tuple[object, ...]:
    image = daemon.client.images.get(IMAGE)
    return image.id, tuple(image.tags), image.attrs["Created"], image.attrs["RootFS"]["Layers"]


def test_wipe_drops_what_the_session_wrote_in_the_container_and_its_volume_and_leaves_the_image(
    daemon: Dockerd,
) -> None:
    spec = desktop(daemon.uri, "w1")
    driver = ContainerDriver()
    first = asyncio.run(driver.wipe(spec))  # from nothing: the first wipe makes the desktop
    assert first.result == "clean", first.detail
    stage_data(daemon, "w1")
    old_id = daemon.client.containers.get("w1").id
    before = image_facts(daemon)

    off = asyncio.run(driver.log_off(spec, SessionRef("a1", "s1", "u1", "violation")))
    assert off.result == "ended", off.detail
    outcome = asyncio.run(driver.wipe(spec))

    assert outcome.result == "clean", outcome.detail
    new = daemon.client.containers.get("w1")
    assert new.id != old_id and new.status == "running"
    assert_fresh(daemon, "w1")
    assert image_facts(daemon) == before  # never pulled, retagged or removed
    assert daemon.client.volumes.get("w1-data").attrs["Labels"][WIPE_LABEL] == new.labels[WIPE_LABEL]
    driver.close()


def test_log_off_stops_the_container_and_report_says_running_shut_off_missing(daemon: Dockerd) -> None:
    spec = desktop(daemon.uri, "r1")
    driver = ContainerDriver()
    assert asyncio.run(driver.report(spec)).state == "missing"
    assert (
        asyncio.run(driver.log_off(spec, SessionRef(None, None, None, "op"))).result == "ended"
    )  # nothing runs
    assert asyncio.run(driver.wipe(spec)).result == "clean"
    assert asyncio.run(driver.report(spec)).state == "running"

    started = time.monotonic()
    off = asyncio.run(driver.log_off(spec, SessionRef("a1", "s1", "u1", "violation")))
    assert off.result == "ended", off.detail
    assert time.monotonic() - started < 5
    assert daemon.client.containers.get("r1").status == "exited"
    report = asyncio.run(driver.report(spec))
    assert report.state == "shut_off" and "exited" in report.detail
    assert asyncio.run(driver.log_off(spec, SessionRef("a1", "s1", "u1", "again"))).result == "ended"

    daemon.client.containers.get("r1").remove(force=True)
    assert asyncio.run(driver.report(spec)).state == "missing"
    driver.close()


def interrupt_after_removing_the_container(daemon: Dockerd, name: str) -> None:
    daemon.client.containers.get(name).remove(force=True)  # the volume, with the session's file, is left


def interrupt_after_the_log_off(daemon: Dockerd, name: str) -> None:
    daemon.client.containers.get(name).stop(timeout=1)  # the old container is left stopped, data and all


def interrupt_after_creating_the_new_container(daemon: Dockerd, name: str) -> None:
    """The old container and volume are gone; a new container is made with its new volume but never started."""
    daemon.client.containers.get(name).remove(force=True)
    daemon.client.volumes.get(f"{name}-data").remove(force=True)
    daemon.client.volumes.create(name=f"{name}-data")
    daemon.client.containers.create(IMAGE, ["/bin/sleep", "3600"], name=name, volumes=[f"{name}-data:/data"])


@pytest.mark.parametrize(
    ("name", "interrupt"),
    [
        ("i1", interrupt_after_removing_the_container),
        ("i2", interrupt_after_the_log_off),
        ("i3", interrupt_after_creating_the_new_container),
    ],
)
def test_an_interrupted_wipe_completes_on_the_next_call(daemon: Dockerd, name: str, interrupt: Any) -> None:
    spec = desktop(daemon.uri, name)
    driver = ContainerDriver()
    assert asyncio.run(driver.wipe(spec)).result == "clean"
    stage_data(daemon, name)
    interrupt(daemon, name)

    outcome = asyncio.run(driver.wipe(spec))

    assert outcome.result == "clean", outcome.detail
    assert daemon.client.containers.get(name).status == "running"
    if interrupt is interrupt_after_creating_the_new_container:
        return  # that container held nothing; what matters is that the wipe verified a fresh one
    assert_fresh(daemon, name)
    driver.close()


def test_the_fresh_container_gets_the_pools_network_ports_and_environment_and_no_secret_is_shown(
    daemon: Dockerd,
) -> None:
    spec = desktop(
        daemon.uri,
        "x1",
        pool_extra='network = "none"\nenv = ["CLEANROOM_VNC_PW"]',
        desktop_extra='ports = ["127.0.0.1:16901:6901"]',
    )
    missing = asyncio.run(ContainerDriver(environ={}).wipe(spec))
    assert missing.result == "failed" and "CLEANROOM_VNC_PW not set" in missing.detail
    with pytest.raises(docker.errors.NotFound):  # refused before anything was made
        daemon.client.containers.get("x1")

    outcome = asyncio.run(ContainerDriver(environ={"CLEANROOM_VNC_PW": "s3cr3t-pw"}).wipe(spec))
    assert outcome.result == "clean", outcome.detail
    host = daemon.client.containers.get("x1").attrs["HostConfig"]
    assert host["NetworkMode"] == "none"
    assert host["PortBindings"] == {"6901/tcp": [{"HostIp": "127.0.0.1", "HostPort": "16901"}]}
    assert sh(daemon, "x1", 'test "$CLEANROOM_VNC_PW" = s3cr3t-pw') == 0
    assert "s3cr3t-pw" not in outcome.detail


def test_an_image_missing_on_the_daemon_fails_the_wipe_and_is_never_pulled(daemon: Dockerd) -> None:
    spec = desktop(daemon.uri, "m1", image="cleanroom-test/none:1")
    outcome = asyncio.run(ContainerDriver().wipe(spec))
    assert outcome.result == "failed" and "cleanroom-test/none:1 is not on the daemon" in outcome.detail
    with pytest.raises(docker.errors.ImageNotFound):
        daemon.client.images.get("cleanroom-test/none:1")
    with pytest.raises(docker.errors.NotFound):
        daemon.client.containers.get("m1")


def test_a_daemon_that_is_not_there_fails_naming_its_socket_without_waiting() -> None:
    uri = f"unix://{tempfile.gettempdir()}/crd-not-there/d.sock"
    spec = desktop(uri, "n1", timeout_s=5)
    driver = ContainerDriver()
    started = time.monotonic()
    wipe = asyncio.run(driver.wipe(spec))
    off = asyncio.run(driver.log_off(spec, SessionRef("a1", "s1", "u1", "violation")))
    report = asyncio.run(driver.report(spec))
    assert time.monotonic() - started < 3
    assert wipe.result == "failed" and uri in wipe.detail, wipe.detail
    assert off.result == "failed" and uri in off.detail
    assert report.state == "unknown" and uri in report.detail


def test_a_daemon_that_never_answers_fails_at_the_pool_timeout(tmp_path: Path) -> None:
    """Simulated: a daemon that accepts connections and never answers (a hung dockerd) is a listening unix
    socket nobody reads from."""
    path = tmp_path / "hung.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    spec = desktop(f"unix://{path}", "h1", timeout_s=1)

    async def timed() -> tuple[float, str, str]:
        started = time.monotonic()
        outcome = await ContainerDriver().wipe(spec)
        took = time.monotonic() - started
        listener.close()  # the worker thread's pending read ends now, not at the client's own timeout
        return took, outcome.result, outcome.detail

    try:
        took, result, detail = asyncio.run(timed())
    finally:
        listener.close()
    assert result == "failed" and "took longer than 1 s" in detail and str(path) in detail, detail
    assert took < 2.0


def test_verify_names_what_is_not_fresh() -> None:
    """The verification alone (pure): an old container, an old image, an old volume."""
    began = datetime(2026, 11, 28, 8, 0, 0, 500_000, tzinfo=UTC)
    expected = FreshDesktop("old", began, "sha256:img", "tok", (("v", "/data"),))
    good: dict[str, Any] = {
        "Id": "new",
        "Created": "2026-11-28T08:00:00.600000001Z",
        "Image": "sha256:img",
        "State": {"Running": True, "Status": "running"},
        "Config": {"Labels": {WIPE_LABEL: "tok"}},
        "Mounts": [{"Type": "volume", "Name": "v", "Destination": "/data"}],
    }
    volume = {"CreatedAt": "2026-11-28T08:00:00Z", "Labels": {WIPE_LABEL: "tok"}}
    assert wipe_problems(expected, good, {"v": volume}) == []
    stale = {**good, "Id": "old", "Created": "2026-11-28T07:59:59.9Z", "Image": "sha256:other"}
    assert len(wipe_problems(expected, stale, {"v": volume})) == 3
    old_volume = {"CreatedAt": "2026-11-28T07:59:59+00:00", "Labels": {WIPE_LABEL: "earlier"}}
    assert [p for p in wipe_problems(expected, good, {"v": old_volume}) if "volume v" in p] == [
        "volume v created 2026-11-28T07:59:59+00:00, before the wipe began",
        "volume v was not made by this wipe",
    ]
    assert engine_time("2026-11-28T09:00:00.123456789+01:00") == datetime(
        2026, 11, 28, 8, 0, 0, 123_456, tzinfo=UTC
    )


def test_a_violation_takes_a_container_desktop_through_the_runner_to_clean(
    daemon: Dockerd, tmp_path: Path
) -> None:
    """violation → ending → ended → wiping → clean with the real state machine, store and audit chain."""
    spec = desktop(daemon.uri, "e1")
    driver = ContainerDriver()
    assert asyncio.run(driver.wipe(spec)).result == "clean"  # the desktop as the pool made it
    stage_data(daemon, "e1")
    old_id = daemon.client.containers.get("e1").id
    store = Store.open(tmp_path)
    tasks: list[asyncio.Task[None]] = []

    def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
        tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

    desktops = parse_desktops(f"""
[[pool]]
id = "p"
driver = "container"
uri = "{daemon.uri}"
image = "{IMAGE}"
timeout_s = 20
stop_grace_s = 0.5
retries = 1
[[pool.desktop]]
id = "e1"
address = "10.9.0.1"
volumes = ["e1-data:/data"]
command = {COMMAND}
""")
    runner = DesktopRunner(
        store=store,
        recorder=Recorder(store, "controller:test"),
        desktops=lambda: desktops,
        drivers={"container": driver},
        spawn=spawn,
    )
    runner.sync()

    async def main() -> None:
        with store.transaction():
            assert runner.session_started("a1", "s1", address="10.9.0.1", name=None, user="w1", now=1.0)
            runner.end_session("a1", "s1", reason="violation")

        async def settled() -> bool:
            runner.poll()
            await asyncio.sleep(0.02)
            d = store.desktop("e1")
            done = (DesktopState.CLEAN, DesktopState.QUARANTINED)
            return d is not None and d.state in done and all(t.done() for t in tasks)

        await async_wait_for(settled, timeout=20, what="desktop e1 clean or quarantined")

    asyncio.run(main())
    d = store.desktop("e1")
    assert d is not None and d.state is DesktopState.CLEAN, d
    kinds = [e.kind for e in store.audit_entries() if e.kind.startswith("desktop.")]
    assert kinds == [
        "desktop.added",
        "desktop.in_use",
        "desktop.ending",
        "desktop.ended",
        "desktop.wiping",
        "desktop.clean",
    ]
    assert daemon.client.containers.get("e1").id != old_id
    assert_fresh(daemon, "e1")
    store.close()
    driver.close()
