"""Screen-capture enforcer (policy ``[capture]``): capture tools cannot start, Print is grabbed,
screenshot folders are watched.

* Exec control: a fanotify listener process (fanotify.py) answers every exec on the root mount: denied by
  executable name and by SHA-256 content hash (the hashes of the denied names found on this machine are
  computed at start, so a renamed copy is denied too), and loader invocations of a denied file
  (``ld-linux… /usr/bin/scrot``) are refused at the loader's open. Optional allowlist mode for session
  users. Without fanotify: proc-connector exec notifications and SIGKILL (procconn.py), status degraded.
* Print key: XGrabKey on the root window with AnyModifier (x11.PrintKeyGrab); presses are reported as
  ``printkey.grabbed``. In audit mode the key is only observed through RECORD (x11.PrintKeyWatch) and
  reported as ``printkey.detected``.
* Screenshot folders (screenshots.py, inotify on directory fds opened without following symlinks): a new
  image is ``screenshot.created``; removed when the policy says so; a renamed or replaced folder is
  ``screenshot.folder_changed``; a folder not watched or a watcher failure degrades the status.

Audit mode: the listener answers allow and reports ``exec.detected``; the procconn fallback kills nothing;
Print is observed, not grabbed; images are reported and kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import hashlib
import json
import os
import signal
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from cleanroom_protocol import EnforcerState, Event, Mode, Policy, Severity

from .base import Enforcer, EventSink
from .execrules import ExecRules, judge_exec, split_allow
from .fanotify import BOOTSTRAP, MAX_HASH_BYTES
from .ratelimit import EventBudget
from .screenshots import FolderChanged, FolderStatus, ImageSeen, Report, ScreenshotFolders
from .x11 import PrintKeyGrab, PrintKeyWatch, X11Unavailable, display_problem

ExecBackend = Literal["fanotify", "procconn"]
SEARCH_DIRS = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin", "/snap/bin")
LOADER_GLOBS = (
    "/lib64/ld-*.so*",
    "/lib/ld-*.so*",
    "/lib/*/ld-*.so*",
    "/usr/lib64/ld-*.so*",
    "/usr/lib/*/ld-*.so*",
)
_READY_TIMEOUT_S = 10.0
MULTI_CALL = frozenset({"busybox", "toybox", "coreutils"})


@dataclass(frozen=True)
class KnownFile:
    name: str  # the denied name it was found under
    path: str  # real path
    sha256: str
    size: int


def hash_file(path: str) -> tuple[str, int] | None:
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_HASH_BYTES:
                return None
            return hashlib.file_digest(f, "sha256").hexdigest(), size
    except OSError:
        return None


def find_denied_files(names: list[str], search_dirs: tuple[str, ...]) -> list[KnownFile]:
    """The files the denied names resolve to on this machine (symlinks followed: ImageMagick's
    ``import`` is ``import-im6.q16``), with their hashes."""
    found: dict[str, KnownFile] = {}
    for name in names:
        for directory in search_dirs:
            candidate = os.path.join(directory, name)
            if not os.path.isfile(candidate):
                continue
            real = os.path.realpath(candidate)
            if real in found or os.path.basename(real) in MULTI_CALL:
                continue  # hashing busybox would deny every applet on the machine
            hashed = hash_file(real)
            if hashed is not None:
                found[real] = KnownFile(name, real, hashed[0], hashed[1])
    return list(found.values())


def find_loaders(patterns: tuple[str, ...] = LOADER_GLOBS) -> list[KnownFile]:
    """The dynamic loaders installed here, under each path they are found at and their real path, with
    their hashes: a copy of one under any name is recognised by content (execrules.loader_match)."""
    found: dict[str, KnownFile] = {}
    hashes: dict[str, tuple[str, int] | None] = {}
    for pattern in patterns:
        for path in glob.glob(pattern):
            real = os.path.realpath(path)
            if real not in hashes:
                hashes[real] = hash_file(real) if os.path.isfile(real) else None
            hashed = hashes[real]
            if hashed is not None:
                for where in (path, real):
                    found[where] = KnownFile(os.path.basename(where), where, hashed[0], hashed[1])
    return [found[p] for p in sorted(found)]


def exec_rules_for(
    policy: Policy, *, enforce: bool, known: list[KnownFile], loaders: list[KnownFile]
) -> ExecRules:
    """Pure: the listener's rules from the policy and what was found on disk."""
    section = policy.capture
    allow_names, allow_paths, allow_hashes = split_allow(section.allow)
    names = (
        {n for n in section.deny}
        | {n.lower() for n in section.deny}
        | {os.path.basename(k.path) for k in known}
    )
    return ExecRules(
        deny_names=frozenset(names),
        deny_hashes=frozenset(section.deny_sha256) | frozenset(k.sha256 for k in known),
        deny_sizes=frozenset(k.size for k in known),
        hash_all=bool(section.deny_sha256),
        allowlist=section.allowlist,
        allow_names=allow_names,
        allow_paths=allow_paths,
        allow_hashes=allow_hashes,
        loader_paths=frozenset(k.path for k in loaders),
        loader_hashes=frozenset(k.sha256 for k in loaders),
        loader_sizes=frozenset(k.size for k in loaders),
        open_marks=tuple(sorted({k.path for k in known})),
        enforce=enforce,
    )


class ListenerProcess:
    """The fanotify listener child: JSON lines in and out (see fanotify.py)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.stats_waiters: list[asyncio.Future[dict[str, Any]]] = []
        self.rules_sent: ExecRules | None = None  # what the listener was last given
        self._generation = 0
        self._applied: dict[int, asyncio.Future[None]] = {}

    @classmethod
    async def spawn(cls, rules: ExecRules) -> ListenerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-I",  # isolated: no environment, no user site
            "-S",  # no site module: the listener needs the stdlib only (fanotify.py)
            "-c",
            BOOTSTRAP,
            str(Path(__file__).parent),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        listener = cls(proc)
        listener.rules_sent = rules
        await listener.send({"rules": rules.to_dict()})  # the first line: read before the mark is placed
        return listener

    async def replace_rules(self, rules: ExecRules) -> None:
        """Send new rules and wait until the listener confirms they are in force (its reader task calls
        :meth:`confirmed`). Raises TimeoutError or OSError when it does not."""
        self._generation += 1
        gen = self._generation
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._applied[gen] = waiter
        try:
            await self.send({"rules": rules.to_dict(), "gen": gen})
            await asyncio.wait_for(asyncio.shield(waiter), _READY_TIMEOUT_S)
            self.rules_sent = rules
        finally:
            self._applied.pop(gen, None)

    def confirmed(self, gen: object) -> None:
        waiter = self._applied.get(gen) if isinstance(gen, int) else None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def send(self, message: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(message) + "\n").encode())
        await self.proc.stdin.drain()

    async def read(self) -> dict[str, Any] | None:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        if not line:
            return None
        try:
            message = json.loads(line)
        except ValueError:
            return {"warning": "unparsable line from listener"}
        return message if isinstance(message, dict) else {"warning": "bad message from listener"}

    async def close(self) -> None:
        if self.proc.returncode is None:
            if self.proc.stdin is not None:
                self.proc.stdin.close()  # EOF: the listener exits and its fd closes
            try:
                await asyncio.wait_for(self.proc.wait(), 3)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


class CaptureEnforcer(Enforcer):
    name = "capture"

    def __init__(
        self,
        emit: EventSink,
        *,
        display: str | None = None,
        env: Mapping[str, str] | None = None,
        exec_backend: ExecBackend = "fanotify",
        search_dirs: tuple[str, ...] = SEARCH_DIRS,
    ) -> None:
        super().__init__(emit)
        self._display = display
        self._env = env if env is not None else os.environ
        self._backend: ExecBackend = exec_backend
        self._search_dirs = search_dirs
        self._loop: asyncio.AbstractEventLoop | None = None
        self._policy: Policy | None = None
        self._mode = Mode.ENFORCE
        self._rules = ExecRules()
        self._listener: ListenerProcess | None = None
        self._reader: asyncio.Task[None] | None = None
        self._fallback: Any = None  # procconn.ExecWatcher
        self._exec_problem: str | None = None
        self._unjudged: list[str] = []  # filesystems the listener could not mark
        self._key: PrintKeyGrab | None = None
        self._watch: PrintKeyWatch | None = None
        self._key_problem: str | None = None
        self._folders: ScreenshotFolders | None = None
        self._dirs_problem: str | None = None  # a note: all folders watched
        self._dirs_degraded: str | None = None  # a folder not watched, or the watcher failed
        # Its own budget: a user flooding a watched folder must not silence exec.denied reports.
        self._folder_budget = EventBudget()
        self._budget = EventBudget()
        self._stopping = False
        self._hash_cache: dict[tuple[int, int, int, int], str | None] = {}

    # lifecycle -------------------------------------------------------------------------------------
    async def _start(self, policy: Policy, mode: Mode) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = False
        self._policy, self._mode = policy, mode
        self._rules = await self._build_rules(policy, mode)
        await self._start_exec_control()
        await self._start_print_key(policy, mode)
        self._start_dirs(policy)
        self._refresh_status()

    async def _apply(self, policy: Policy, mode: Mode) -> None:
        old_policy, old_mode = self._policy, self._mode
        self._policy, self._mode = policy, mode
        self._rules = await self._build_rules(policy, mode)
        if self._listener is not None:
            try:
                await self._listener.replace_rules(self._rules)
            except (OSError, ConnectionError, TimeoutError) as exc:
                # Not confirmed: the listener may still hold the old rules. Say so (degraded) and let the
                # base report no policy as enforced; a dead listener is restarted with the new rules.
                self._exec_problem = (
                    f"exec listener did not confirm the new rules: {exc or type(exc).__name__}"
                )
                self._refresh_status()
                raise
        if old_policy is None or (old_policy.capture.grab_print_key, old_mode) != (
            policy.capture.grab_print_key,
            mode,
        ):
            await self._stop_print_key()
            await self._start_print_key(policy, mode)
        if old_policy is None or old_policy.capture.screenshot_dirs != policy.capture.screenshot_dirs:
            self._stop_dirs()
            self._start_dirs(policy)
        self._refresh_status()

    async def _stop(self) -> None:
        self._stopping = True
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
            self._reader = None
        if self._listener is not None:
            await self._listener.close()
            self._listener = None
        if self._fallback is not None:
            await asyncio.to_thread(self._fallback.stop)
            self._fallback = None
        await self._stop_print_key()
        self._stop_dirs()
        self._set_status(EnforcerState.OFF)

    async def listener_stats(self) -> dict[str, Any]:
        """The listener's counters (events, denied, allowed, errors, dropped reports); for the benchmark."""
        if self._listener is None or self._loop is None:
            return {}
        waiter: asyncio.Future[dict[str, Any]] = self._loop.create_future()
        self._listener.stats_waiters.append(waiter)
        await self._listener.send({"stats": True})
        return await asyncio.wait_for(waiter, 5)

    # exec control ----------------------------------------------------------------------------------
    async def _build_rules(self, policy: Policy, mode: Mode) -> ExecRules:
        known = await asyncio.to_thread(find_denied_files, list(policy.capture.deny), self._search_dirs)
        loaders = await asyncio.to_thread(find_loaders)
        return exec_rules_for(policy, enforce=mode is Mode.ENFORCE, known=known, loaders=loaders)

    async def _start_exec_control(self) -> None:
        problem = None
        if self._backend == "fanotify":
            problem = await self._start_listener()
            if problem is None:
                self._exec_problem = None
                return
        reason = f"fanotify unavailable ({problem})" if problem else "fanotify not used"
        try:
            from .procconn import ExecWatcher

            self._fallback = ExecWatcher(self._on_exec_notified)
            self._fallback.start()
            self._exec_problem = f"{reason}: exec seen after the fact and killed (proc connector)"
        except OSError as exc:
            self._exec_problem = (
                f"{reason}; proc connector unavailable ({exc.strerror or exc}): no exec control"
            )

    async def _start_listener(self) -> str | None:
        self._unjudged = []  # a new listener reports its own
        try:
            listener = await ListenerProcess.spawn(self._rules)
            first = await asyncio.wait_for(listener.read(), _READY_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            return f"listener did not start: {exc}"
        if not first or not first.get("ready"):
            await listener.close()
            return str((first or {}).get("error", "listener exited"))
        self._listener = listener
        self._reader = asyncio.create_task(self._read_listener(listener), name="capture-fanotify-reader")
        return None

    async def _read_listener(self, listener: ListenerProcess) -> None:
        while True:
            message = await listener.read()
            if message is None:
                break
            if "event" in message:
                self._report_exec(message["event"])
            elif "unjudged" in message:
                unjudged = message["unjudged"]
                self._unjudged = [str(u)[:200] for u in unjudged] if isinstance(unjudged, list) else []
                self._refresh_status()
            elif "applied" in message:
                listener.confirmed(message["applied"])
            elif "stats" in message:
                for waiter in listener.stats_waiters:
                    if not waiter.done():
                        waiter.set_result(message["stats"])
                listener.stats_waiters.clear()
        if self._stopping:
            return
        # The listener died: its fd closed, so exec is allowed until it is back.
        rc = await listener.proc.wait()
        self._listener = None
        self._exec_problem = f"exec listener exited (rc {rc}); restarting"
        self._refresh_status()
        attempt = 0
        while not self._stopping:
            attempt += 1
            await asyncio.sleep(min(30.0, 0.2 * 1.5 ** min(10, attempt)))
            # Under the lifecycle lock: an apply meanwhile would otherwise find no listener to send to,
            # and the restarted one would run the rules of before.
            async with self._lifecycle:
                if self._stopping:
                    return
                problem = await self._start_listener()
                if problem is None:
                    self._exec_problem = None
                    self._refresh_status()
                    return
                self._exec_problem = f"exec listener restart failed: {problem}"
                self._refresh_status()

    def _report_exec(self, data: dict[str, Any]) -> None:
        kind = "exec.denied" if data.get("kind") == "exec.denied" else "exec.detected"
        details = {
            k: (v if isinstance(v, str | int | float | bool) or v is None else str(v))
            for k, v in data.items()
            if k
            in (
                "path",
                "name",
                "sha256",
                "reason",
                "matched",
                "pid",
                "process",
                "via",
                "opener",
                "suppressed_before",
            )
        }
        details["mode"] = self._mode.value
        self._emit(
            Event(
                kind=kind,
                at=time.time(),
                severity=Severity.WARNING,
                blocked=kind == "exec.denied",
                details=details,
            )
        )

    def _on_exec_notified(self, pid: int) -> None:
        """proc-connector fallback, in its thread: judge the new image, kill it if denied."""
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
            st = os.stat(f"/proc/{pid}/exe")
        except OSError:
            return
        rules = self._rules
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        sha = None
        if rules.needs_hash(st.st_size):
            if key not in self._hash_cache:
                hashed = hash_file(f"/proc/{pid}/exe")
                if len(self._hash_cache) > 8192:
                    self._hash_cache.clear()
                self._hash_cache[key] = hashed[0] if hashed else None
            sha = self._hash_cache[key]
        uid = None
        if rules.allowlist:
            with contextlib.suppress(OSError):
                uid = os.stat(f"/proc/{pid}").st_uid
        verdict = judge_exec(rules, exe, sha, uid)
        if not verdict.deny:
            return
        killed = False
        if rules.enforce:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                killed = True
        data = {
            "kind": "exec.denied" if killed else "exec.detected",
            "path": exe,
            "name": os.path.basename(exe),
            "sha256": sha,
            "reason": verdict.reason,
            "matched": verdict.matched,
            "pid": pid,
            "via": "procconn",
        }
        if self._loop is not None and self._budget.take() is not None:
            self._loop.call_soon_threadsafe(self._report_exec, data)

    # print key -------------------------------------------------------------------------------------
    async def _start_print_key(self, policy: Policy, mode: Mode) -> None:
        self._key_problem = None
        if not policy.capture.grab_print_key:
            return
        problem = display_problem(dict(self._env), self._display)
        if problem:
            self._key_problem = f"Print key not watched: {problem}"
            return
        if mode is not Mode.ENFORCE:
            # Audit: observe without grabbing (a grab would swallow the key).
            watch = PrintKeyWatch(self._display or self._env.get("DISPLAY"), self._key_pressed)
            try:
                await asyncio.to_thread(watch.start)
                self._watch = watch
            except X11Unavailable as exc:
                self._key_problem = f"Print key not watched: {exc}"
            return
        self._key = PrintKeyGrab(
            self._display or self._env.get("DISPLAY"), self._key_pressed, self._key_state
        )
        self._key.start()
        await asyncio.to_thread(self._key.ready.wait, 5.0)
        if self._key.problem:
            self._key_problem = f"Print key not grabbed: {self._key.problem}"

    async def _stop_print_key(self) -> None:
        key, self._key = self._key, None
        if key is not None:
            await asyncio.to_thread(key.stop)
        watch, self._watch = self._watch, None
        if watch is not None:
            await asyncio.to_thread(watch.stop)

    def _key_pressed(self, state: int) -> None:
        if self._loop is not None and self._budget.take() is not None:
            self._loop.call_soon_threadsafe(self._report_key, state)

    def _key_state(self, problem: str | None) -> None:
        if self._loop is not None and self._key is not None:
            self._loop.call_soon_threadsafe(self._on_key_state, problem)

    def _on_key_state(self, problem: str | None) -> None:
        self._key_problem = f"Print key not grabbed: {problem}" if problem else None
        self._refresh_status()

    def _report_key(self, state: int) -> None:
        grabbed = self._key is not None
        self._emit(
            Event(
                kind="printkey.grabbed" if grabbed else "printkey.detected",
                at=time.time(),
                severity=Severity.WARNING,
                blocked=grabbed,
                details={"key": "Print", "modifiers": state, "mode": self._mode.value},
            )
        )

    # screenshot folders ----------------------------------------------------------------------------
    def _start_dirs(self, policy: Policy) -> None:
        self._dirs_problem = self._dirs_degraded = None
        dirs = [d for d in policy.capture.screenshot_dirs if d]
        if not dirs:
            return
        self._folders = ScreenshotFolders(
            dirs,
            remove=self._removes_screenshots,
            report=self._folder_report,
            on_status=self._folder_status,
        )
        self._set_dirs_status(self._folders.start())

    def _stop_dirs(self) -> None:
        folders, self._folders = self._folders, None
        if folders is not None:
            folders.stop()

    def _removes_screenshots(self) -> bool:
        """Asked by the folder watcher (its thread) at each image: the policy and mode in force now."""
        policy = self._policy
        return policy is not None and policy.capture.remove_screenshots and self._mode is Mode.ENFORCE

    def _folder_report(self, report: Report) -> None:
        """In the folder watcher's thread."""
        if self._loop is not None and self._folder_budget.take() is not None:
            self._loop.call_soon_threadsafe(self._report_folder, report)

    def _folder_status(self, status: FolderStatus) -> None:
        """In the folder watcher's thread."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._set_dirs_status, status)

    def _set_dirs_status(self, status: FolderStatus) -> None:
        self._dirs_degraded, self._dirs_problem = status.degraded, status.note
        self._refresh_status()

    def _report_folder(self, report: Report) -> None:
        details: dict[str, str | bool | None]
        if isinstance(report, ImageSeen):
            kind, blocked = "screenshot.created", report.removed
            details = {"path": report.path, "removed": report.removed}
            if report.kept is not None:
                details["kept"] = report.kept[:200]
        elif isinstance(report, FolderChanged):
            kind, blocked = "screenshot.folder_changed", False
            details = {"path": report.folder[:1024], "change": report.change, "watched": report.watched}
            if report.problem is not None:
                details["problem"] = report.problem[:500]
        else:
            kind, blocked = "screenshot.watch_failed", False
            details = {"error": report.error[:500]}
        details["mode"] = self._mode.value
        self._emit(
            Event(kind=kind, at=time.time(), severity=Severity.WARNING, blocked=blocked, details=details)
        )

    # status ----------------------------------------------------------------------------------------
    def _refresh_status(self) -> None:
        notes = "; ".join(p for p in (self._key_problem, self._dirs_problem) if p) or None
        unjudged = (
            ("execs not judged on " + ", ".join(self._unjudged))
            if self._unjudged and self._listener
            else None
        )
        degraded = "; ".join(p for p in (self._exec_problem, unjudged, self._dirs_degraded) if p)
        if degraded:
            reason = degraded + (f"; {notes}" if notes else "")
            self._set_status(EnforcerState.DEGRADED, reason)
        else:
            self._set_status(EnforcerState.ACTIVE, notes)
