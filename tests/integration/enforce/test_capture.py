"""Screen-capture enforcement for real, as root: the fanotify listener process answers every exec on this
machine while a test runs, so each test is short and the listener dies with the test process
(PR_SET_PDEATHSIG, stdin EOF; a closed fanotify fd lets pending execs through). Real scrot and ImageMagick
import under a real Xvfb, real xdotool key presses, a real watched folder."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.capture import CaptureEnforcer
from cleanroom_protocol import EnforcerState, Event, Mode, Policy
from tests.support.wait import wait_until

from .conftest import x_env

pytestmark = [pytest.mark.root, pytest.mark.x11]


@pytest.fixture(autouse=True)
def _needs_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("capture enforcement tests need root (fanotify permission events)")


def policy(**capture: object) -> Policy:
    return Policy.model_validate({"id": "p", "version": 1, "capture": capture})


async def sh(script: str, display: str | None = None) -> subprocess.CompletedProcess[str]:
    env = x_env(display) if display else dict(os.environ)
    return await asyncio.to_thread(
        subprocess.run,
        ["bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


class Capture:
    def __init__(self, display: str, **kwargs: object) -> None:
        self.events: list[Event] = []
        self.display = display
        self.enforcer = CaptureEnforcer(self.events.append, display=display, env=x_env(display), **kwargs)  # type: ignore[arg-type]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def reason(self) -> str:
        return self.enforcer.status().reason or ""


@pytest.fixture
async def capture(xvfb: str) -> AsyncIterator[Capture]:
    c = Capture(xvfb)
    yield c
    await c.enforcer.stop()


async def test_capture_tools_denied_renamed_copy_and_loader_too(capture: Capture, tmp_path: Path) -> None:
    renamed = tmp_path / "holiday-photos"
    shutil.copy2("/usr/bin/scrot", renamed)
    client = tmp_path / "xfreerdp"  # a stand-in VDI client: must still run
    shutil.copy2("/bin/echo", client)
    await capture.enforcer.start(policy(), Mode.ENFORCE)
    assert capture.enforcer.status().state is EnforcerState.ACTIVE
    out = tmp_path / "shots"
    out.mkdir()
    for script in (
        f"scrot {out}/a.png",
        f"import -window root {out}/b.png",
        f"{renamed} {out}/c.png",
        f"/lib64/ld-linux-x86-64.so.2 /usr/bin/scrot {out}/d.png",
    ):
        result = await sh(script, capture.display)
        assert result.returncode != 0, script
        if not script.startswith("/lib64"):
            assert result.returncode == 126, (script, result.stderr)
            assert "Operation not permitted" in result.stderr, script
    assert list(out.iterdir()) == []
    # A harmless binary copied under a denied name is denied by name, and its original stays usable.
    decoy = tmp_path / "bin" / "scrot"
    decoy.parent.mkdir()
    shutil.copy2("/bin/true", decoy)
    assert (await sh(str(decoy))).returncode == 126
    assert (await sh("/bin/true")).returncode == 0
    assert (await sh(f"{client} session-ok")).stdout.strip() == "session-ok"
    try:
        await wait_until(lambda: len(capture.of("exec.denied")) >= 5, "five exec.denied events")
    except AssertionError as exc:
        seen = [(e.details["path"], e.details["matched"]) for e in capture.of("exec.denied")]
        raise AssertionError(f"{exc}: {seen}") from None
    by = {str(e.details["matched"]) for e in capture.of("exec.denied")}
    assert by == {"name", "sha256", "loader"}
    renamed_event = next(e for e in capture.of("exec.denied") if e.details["matched"] == "sha256")
    assert renamed_event.details["path"] == str(renamed)
    assert renamed_event.blocked


async def test_audit_mode_lets_tools_run_and_reports(capture: Capture, tmp_path: Path) -> None:
    await capture.enforcer.start(policy(), Mode.AUDIT)
    result = await sh(f"scrot {tmp_path}/audit.png", capture.display)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "audit.png").exists()
    await wait_until(lambda: capture.of("exec.detected"), "exec.detected")
    event = capture.of("exec.detected")[0]
    assert (event.details["name"], event.blocked) == ("scrot", False)
    assert capture.of("exec.denied") == []


async def test_print_key_is_grabbed_and_reported(capture: Capture) -> None:
    await capture.enforcer.start(policy(), Mode.ENFORCE)
    assert capture.enforcer.status().reason is None
    assert (await sh("xdotool key Print", capture.display)).returncode == 0
    await wait_until(lambda: capture.of("printkey.grabbed"), "printkey.grabbed")
    assert (await sh("xdotool key shift+Print", capture.display)).returncode == 0
    await wait_until(lambda: len(capture.of("printkey.grabbed")) == 2, "second press (with shift)")


async def test_print_key_in_audit_mode_is_observed_not_grabbed(capture: Capture) -> None:
    await capture.enforcer.start(policy(), Mode.AUDIT)
    assert capture.enforcer.status().reason is None
    assert (await sh("xdotool key Print", capture.display)).returncode == 0
    await wait_until(lambda: capture.of("printkey.detected"), "printkey.detected")
    assert capture.of("printkey.detected")[0].blocked is False
    assert capture.of("printkey.grabbed") == []


async def test_screenshot_folder_images_reported_and_removed(capture: Capture, tmp_path: Path) -> None:
    folder = tmp_path / "Pictures"
    folder.mkdir()
    await capture.enforcer.start(
        policy(screenshot_dirs=[str(folder)], remove_screenshots=True, grab_print_key=False), Mode.ENFORCE
    )
    (folder / "notes.txt").write_text("not an image")
    (folder / "Screenshot from today.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    await wait_until(lambda: capture.of("screenshot.created"), "screenshot.created")
    event = capture.of("screenshot.created")[0]
    assert event.details["removed"] is True
    assert not (folder / "Screenshot from today.png").exists()
    assert (folder / "notes.txt").exists()


async def test_allowlist_denies_unlisted_programs_for_session_users(capture: Capture) -> None:
    await capture.enforcer.start(policy(allowlist=True, allow=["echo"], grab_print_key=False), Mode.ENFORCE)
    as_user = "setpriv --reuid=65534 --regid=65534 --clear-groups"
    assert (await sh(f"{as_user} /bin/echo listed")).stdout.strip() == "listed"
    denied = await sh(f"{as_user} /bin/true")
    assert denied.returncode != 0
    assert (await sh("/bin/true")).returncode == 0  # root/system processes are not session users
    await wait_until(lambda: capture.of("exec.denied"), "allowlist denial")
    assert capture.of("exec.denied")[0].details["matched"] == "allowlist"


async def test_burst_of_execs_all_answered(capture: Capture, tmp_path: Path) -> None:
    renamed = tmp_path / "x"
    shutil.copy2("/usr/bin/scrot", renamed)
    await capture.enforcer.start(policy(grab_print_key=False), Mode.ENFORCE)
    script = f"ok=0; no=0; for i in $(seq 200); do /bin/true && ok=$((ok+1)); {renamed} 2>/dev/null || no=$((no+1)); done; echo $ok $no"
    result = await sh(script)
    assert result.stdout.split() == ["200", "200"]
    stats = await capture.enforcer.listener_stats()
    assert stats["errors"] == 0
    assert stats["denied"] >= 200


async def test_listener_death_allows_exec_degrades_and_recovers(capture: Capture) -> None:
    await capture.enforcer.start(policy(grab_print_key=False), Mode.ENFORCE)
    listener = capture.enforcer._listener
    assert listener is not None
    os.kill(listener.proc.pid, signal.SIGKILL)
    await wait_until(
        lambda: capture.enforcer.status().state is EnforcerState.DEGRADED, "degraded after listener death"
    )
    assert (await sh("/bin/true")).returncode == 0
    await wait_until(lambda: capture.enforcer.status().state is EnforcerState.ACTIVE, "listener restarted")
    assert (await sh("scrot /tmp/never.png")).returncode == 126


async def test_proc_connector_fallback_kills_and_is_degraded(capture: Capture, tmp_path: Path) -> None:
    fake = tmp_path / "scrot"  # named like a capture tool, long-running so the kill is observable
    shutil.copy2("/bin/sleep", fake)
    fallback = Capture(capture.display, exec_backend="procconn")
    await fallback.enforcer.start(policy(grab_print_key=False), Mode.ENFORCE)
    try:
        status = fallback.enforcer.status()
        assert status.state is EnforcerState.DEGRADED
        assert "proc connector" in (status.reason or "")
        result = await sh(f"{fake} 10; echo rc=$?")
        assert "rc=137" in result.stdout  # SIGKILL
        await wait_until(lambda: fallback.of("exec.denied"), "exec.denied via procconn")
        assert fallback.of("exec.denied")[0].details["via"] == "procconn"
    finally:
        await fallback.enforcer.stop()


# --- screenshot folders turned against the agent ------------------------------------------------------
AS_NOBODY = "setpriv --reuid=65534 --regid=65534 --clear-groups"


class Tree:
    """A user's home with a watched Pictures folder (owned by ``nobody``, who acts in these tests), and a
    root-owned folder elsewhere whose image must never be touched."""

    def __init__(self, base: Path) -> None:
        self.home = base / "home"
        self.pictures = self.home / "Pictures"
        self.elsewhere = base / "elsewhere"
        self.victim = self.elsewhere / "keep.png"


@pytest.fixture
def tree() -> Iterator[Tree]:
    base = Path(tempfile.mkdtemp(prefix="cleanroom-shots-"))  # not under pytest's root-only tmp
    base.chmod(0o755)
    t = Tree(base)
    t.pictures.mkdir(parents=True)
    for d in (t.home, t.pictures):
        os.chown(d, 65534, 65534)
    t.elsewhere.mkdir()
    t.victim.write_bytes(b"\x89PNG root's own image")
    try:
        yield t
    finally:
        shutil.rmtree(base)


def removing(folder: Path) -> Policy:
    return policy(screenshot_dirs=[str(folder)], remove_screenshots=True, grab_print_key=False)


async def as_nobody(script: str) -> None:
    result = await sh(f"{AS_NOBODY} bash -c '{script}'")
    assert result.returncode == 0, (script, result.stderr)


async def test_screenshot_folder_swapped_for_a_symlink_removes_nothing_outside_it(
    capture: Capture, tree: Tree
) -> None:
    await capture.enforcer.start(removing(tree.pictures), Mode.ENFORCE)
    assert capture.enforcer.status().state is EnforcerState.ACTIVE
    # The user renames the watched folder, puts a symlink to another folder in its place, and creates
    # an image of the victim's name in the renamed folder (the watch follows it).
    await as_nobody(
        f"mv {tree.pictures} {tree.home}/old && ln -s {tree.elsewhere} {tree.pictures} "
        f"&& echo x > {tree.home}/old/keep.png"
    )
    await wait_until(lambda: capture.of("screenshot.folder_changed"), "screenshot.folder_changed")
    changed = capture.of("screenshot.folder_changed")[0].details
    assert (changed["change"], changed["watched"]) == ("moved", False)
    await wait_until(
        lambda: f"screenshot folders not watched: {tree.pictures} is a symlink" in capture.reason(),
        "the symlink named in the status",
    )
    assert capture.enforcer.status().state is EnforcerState.DEGRADED
    # A real folder back at the path is watched again (the symlink never is) and enforced.
    await as_nobody(f"rm {tree.pictures} && mkdir {tree.pictures}")
    await wait_until(lambda: capture.enforcer.status().state is EnforcerState.ACTIVE, "watched again")
    await as_nobody(f"echo x > {tree.pictures}/new.png")
    await wait_until(lambda: not (tree.pictures / "new.png").exists(), "an image in the new folder removed")
    assert tree.victim.read_bytes() == b"\x89PNG root's own image"
    assert "replaced" in capture.reason()


async def test_screenshot_folder_that_is_a_symlink_at_start_is_not_watched(
    capture: Capture, tree: Tree
) -> None:
    link = tree.home / "Shots"
    link.symlink_to(tree.elsewhere)
    await capture.enforcer.start(removing(link), Mode.ENFORCE)
    status = capture.enforcer.status()
    assert status.state is EnforcerState.DEGRADED
    assert f"{link} is a symlink" in (status.reason or "")
    (tree.elsewhere / "new.png").write_bytes(b"png")
    assert tree.victim.exists()


# The user's racer: a file named d.png swapped for a directory of that name as fast as it goes, so the
# agent's removal meets the directory (it once raised IsADirectoryError in the watcher thread, which then
# ended while capture said active).
SWAPPER = """
import os, time
end = time.monotonic() + 0.5
while time.monotonic() < end:
    for step in (lambda: open("d.png", "w").close(), lambda: os.unlink("d.png"),
                 lambda: os.mkdir("d.png"), lambda: os.rmdir("d.png")):
        try:
            step()
        except OSError:
            pass
os.mkdir("d.png")
"""


async def test_directory_named_like_an_image_survives_and_the_watch_goes_on(
    capture: Capture, tree: Tree
) -> None:
    await capture.enforcer.start(removing(tree.pictures), Mode.ENFORCE)
    swapper = tree.home / "swap.py"
    swapper.write_text(SWAPPER)
    await as_nobody(f"cd {tree.pictures} && /usr/bin/python3 {swapper}")
    await as_nobody(f"echo x > {tree.pictures}/later.png")
    await wait_until(lambda: not (tree.pictures / "later.png").exists(), "a later image removed")
    assert (tree.pictures / "d.png").is_dir()
    assert capture.enforcer.status().state is EnforcerState.ACTIVE
    assert capture.of("screenshot.watch_failed") == []


async def test_symlink_named_like_an_image_is_removed_as_a_link(capture: Capture, tree: Tree) -> None:
    await capture.enforcer.start(removing(tree.pictures), Mode.ENFORCE)
    await as_nobody(
        f"ln -s {tree.victim} {tree.pictures}/x.png && ln -s {tree.elsewhere} {tree.pictures}/y.png"
    )
    await wait_until(
        lambda: not os.path.lexists(tree.pictures / "x.png") and not os.path.lexists(tree.pictures / "y.png"),
        "both links removed",
    )
    assert tree.victim.read_bytes() == b"\x89PNG root's own image"
    assert tree.elsewhere.is_dir()
    expected = {f"{tree.pictures}/x.png", f"{tree.pictures}/y.png"}

    def removed() -> set[str]:
        return {str(e.details["path"]) for e in capture.of("screenshot.created") if e.details["removed"]}

    # The watcher thread unlinks first and hands the report to the event loop after: wait for both reports.
    await wait_until(lambda: removed() == expected, f"both removals reported (so far {removed()})")


# --- loaders recognised by content --------------------------------------------------------------------
async def test_copied_loader_is_recognised_by_content(capture: Capture, tmp_path: Path) -> None:
    loader = tmp_path / secrets.token_hex(6)  # a copy of the loader under a random name
    shutil.copy2("/lib64/ld-linux-x86-64.so.2", loader)
    decoy = tmp_path / "bin" / "scrot"  # a denied name on a harmless binary
    decoy.parent.mkdir()
    shutil.copy2("/bin/true", decoy)
    renamed = tmp_path / secrets.token_hex(6)  # a copy of scrot under a random name
    shutil.copy2("/usr/bin/scrot", renamed)
    await capture.enforcer.start(policy(grab_print_key=False), Mode.ENFORCE)
    out = tmp_path / "shots"
    out.mkdir()
    # Exec'd once (denied), the copies are known to the listener, and so are their loader opens.
    assert (await sh(str(decoy))).returncode == 126
    assert (await sh(f"{renamed} {out}/a.png", capture.display)).returncode == 126
    for script in (
        f"{loader} /usr/bin/scrot {out}/b.png",
        f"{loader} {renamed} {out}/c.png",
        f"{loader} {decoy}",
        f"/lib64/ld-linux-x86-64.so.2 /usr/bin/scrot {out}/d.png",
    ):
        result = await sh(script, capture.display)
        assert result.returncode == 127, (script, result.returncode, result.stderr)
        assert "cannot open shared object file" in result.stderr, script
    assert list(out.iterdir()) == []
    assert (await sh(f"{loader} /bin/echo through-the-copy")).stdout.strip() == "through-the-copy"
    await wait_until(
        lambda: len([e for e in capture.of("exec.denied") if e.details["matched"] == "loader"]) >= 4,
        "four loader denials",
    )
    by_copy = [e for e in capture.of("exec.denied") if e.details.get("opener") == str(loader)]
    assert len(by_copy) == 3
    assert all("a copy of the dynamic loader" in str(e.details["reason"]) for e in by_copy)


async def test_allowlist_refuses_the_loader_run_as_a_program(capture: Capture) -> None:
    await capture.enforcer.start(policy(allowlist=True, allow=["echo"], grab_print_key=False), Mode.ENFORCE)
    # Run directly, the loader would load any program with a plain open no exec check sees.
    for script in ("/lib64/ld-linux-x86-64.so.2 /bin/true", "/lib64/ld-linux-x86-64.so.2 /bin/echo no"):
        result = await sh(f"{AS_NOBODY} {script}")
        assert result.returncode == 126, (script, result.stdout, result.stderr)
    # As the interpreter of an allowed program the kernel loads it as always.
    assert (await sh(f"{AS_NOBODY} /bin/echo listed")).stdout.strip() == "listed"
    assert (await sh("/lib64/ld-linux-x86-64.so.2 /bin/echo root")).stdout.strip() == "root"
    await wait_until(lambda: capture.of("exec.denied"), "exec.denied")
    assert "run as a program" in str(capture.of("exec.denied")[0].details["reason"])
