"""The command desktop driver: a site's own scripts for Citrix, Horizon or Azure Virtual Desktop.

Each step runs an argv template from the pool's ``[pool.command]`` table, one argument per element (never a
shell), placeholders filled from the desktop and session. Exit codes: 0 done, 75 (EX_TEMPFAIL) not yet
(the runner retries after its back-off), anything else failed. Log-off and wipe calls of VDI brokers return
before the work is done (Citrix's ``Stop-BrokerSession`` is asynchronous), so ``session_gone`` and ``ready``
are polled every ``poll_s`` until they exit 0, within the pool's ``timeout_s``.

Secrets reach a script only through the environment variables the pool names in ``env`` (taken from the
controller's own environment); the child gets nothing else but ``PATH`` and ``LANG``. What a script prints
is kept short, and every secret value is blanked out of it before it reaches a log or the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping

import structlog

from ...desktops.config import CommandConfig, DesktopSpec
from .base import DesktopDriver, DesktopReport, Outcome, SessionRef

log = structlog.get_logger("cleanroom.controller.driver.command")

EX_TEMPFAIL = 75
MAX_OUTPUT = 4096  # bytes read of a script's stdout / stderr; the rest is discarded
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


class _Missing(Exception):
    pass


def render(argv: list[str], values: Mapping[str, str]) -> list[str]:
    """Fill ``{name}`` placeholders (validated at load time) in each argument; an argument stays one argument
    whatever the value holds."""
    out = []
    for arg in argv:
        for name, value in values.items():
            arg = arg.replace("{" + name + "}", value)
        out.append(arg)
    return out


def values_for(desktop: DesktopSpec, session: SessionRef | None) -> dict[str, str]:
    d = desktop.desktop
    return {
        "desktop": d.id,
        "pool": desktop.pool.id,
        "address": d.address,
        "name": d.name or "",
        "domain": d.domain or "",
        "user": (session.user if session else None) or "",
        "session": (session.session_id if session else None) or "",
        "agent": (session.agent if session else None) or "",
    }


class CommandDriver(DesktopDriver):
    name = "command"

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        if desktop is None:
            return Outcome("", "unsupported", "the command driver logs off desktops, not endpoints")
        cfg = _cfg(desktop)
        return await self._step(
            desktop, cfg, cfg.log_off, cfg.session_gone, values_for(desktop, session), "ended"
        )

    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        cfg = _cfg(desktop)
        return await self._step(desktop, cfg, cfg.wipe, cfg.ready, values_for(desktop, None), "clean")

    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        cfg = _cfg(desktop)
        if cfg.state is None:
            return DesktopReport("unknown", "no state command")
        rc, out, detail = await self._run(
            desktop, cfg, cfg.state, values_for(desktop, None), desktop.pool.timeout_s
        )
        if rc != 0:
            return DesktopReport("unknown", detail)
        first = next((line.strip() for line in out.splitlines() if line.strip()), "unknown")
        return DesktopReport(first[:64])

    async def _step(
        self,
        desktop: DesktopSpec,
        cfg: CommandConfig,
        argv: list[str],
        poll: list[str] | None,
        values: dict[str, str],
        done: str,
    ) -> Outcome:
        deadline = time.monotonic() + desktop.pool.timeout_s
        rc, _out, detail = await self._run(desktop, cfg, argv, values, desktop.pool.timeout_s)
        if rc == EX_TEMPFAIL:
            return Outcome("", "retry", detail)
        if rc != 0:
            return Outcome("", "failed", detail)
        if poll is None:
            return Outcome("", done, detail)
        polls = 0
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return Outcome(
                    "", "failed", f"not done after {desktop.pool.timeout_s:g} s ({polls} polls): {detail}"
                )
            rc, _out, detail = await self._run(desktop, cfg, poll, values, left)
            polls += 1
            if rc == 0:
                return Outcome("", done, f"confirmed after {polls} polls")
            if rc not in (1, EX_TEMPFAIL):
                return Outcome("", "failed", detail)
            await asyncio.sleep(min(cfg.poll_s, max(0.0, deadline - time.monotonic())))

    async def _run(
        self,
        desktop: DesktopSpec,
        cfg: CommandConfig,
        template: list[str],
        values: dict[str, str],
        timeout_s: float,
    ) -> tuple[int, str, str]:
        """(exit code, stdout, a short detail); -1 when it could not run or timed out."""
        try:
            env, secrets = self._env(cfg)
        except _Missing as exc:
            return -1, "", f"environment variable {exc} is not set"
        argv = render(template, values)
        what = os.path.basename(argv[0])
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group: a timeout ends the script and its children
            )
        except OSError as exc:
            return -1, "", f"{what}: cannot run: {exc.strerror}"
        try:
            out, err = await asyncio.wait_for(_read(proc), timeout_s)
        except TimeoutError:
            _kill_group(proc.pid)
            await proc.wait()
            return -1, "", f"{what} took longer than {timeout_s:g} s (killed)"
        rc = proc.returncode if proc.returncode is not None else -1
        text = _redact((err or out).strip(), secrets)[:300]
        log.info("desktop_command", desktop=desktop.id, command=what, rc=rc)
        return rc, _redact(out, secrets), f"{what} exited {rc}" + (f": {text}" if text else "")

    def _env(self, cfg: CommandConfig) -> tuple[dict[str, str], list[str]]:
        env = {"PATH": SAFE_PATH, "LANG": "C.UTF-8"}
        secrets = []
        for name in cfg.env:
            value = self._environ.get(name)
            if value is None:
                raise _Missing(name)
            env[name] = value
            if value:
                secrets.append(value)
        return env, secrets


def _cfg(desktop: DesktopSpec) -> CommandConfig:
    cfg = desktop.pool.command
    assert cfg is not None  # config validation: driver 'command' needs [pool.command]
    return cfg


async def _read(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    assert proc.stdout is not None and proc.stderr is not None

    async def head(stream: asyncio.StreamReader) -> bytes:
        data = await stream.read(MAX_OUTPUT)
        while await stream.read(65536):  # drain the rest unread, so the script never blocks on a full pipe
            pass
        return data

    out, err = await asyncio.gather(head(proc.stdout), head(proc.stderr))
    await proc.wait()
    return out.decode("utf-8", "replace"), err.decode("utf-8", "replace")


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "[secret]")
    return text
