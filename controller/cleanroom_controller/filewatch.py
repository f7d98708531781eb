"""Watching one configuration file for changes (the policy, the desktops file): inotify through watchdog on the
file's directory (editors save by writing a new file and renaming it over the old one, which a watch on the
file itself would miss), debounced; when the watch cannot be set up (inotify watches exhausted), polling the
file's mtime, size and inode instead of going blind."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

log = structlog.get_logger("cleanroom.controller.filewatch")

DEBOUNCE_S = 0.2  # let the editor finish writing
POLL_S = 2.0


def stamp(path: Path) -> tuple[int, int, int] | None:
    """What tells one version of the file from the next: mtime, size, inode (``None``: not there)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


async def watch_file(
    path: Path,
    on_change: Callable[[], Awaitable[None]],
    *,
    what: str,
    started: asyncio.Event | None = None,
    debounce_s: float = DEBOUNCE_S,
    poll_s: float = POLL_S,
) -> None:
    """Await ``on_change()`` after each change of ``path`` (several changes within ``debounce_s``: once),
    until cancelled. ``started`` is set once the watch is in place; ``what`` names the file in the log."""
    from watchdog.events import FileSystemEvent, FileSystemEventHandler
    from watchdog.observers import Observer

    loop = asyncio.get_running_loop()
    changed = asyncio.Event()
    target = await asyncio.to_thread(path.resolve)

    class _Handler(FileSystemEventHandler):
        def on_any_event(self, event: FileSystemEvent) -> None:
            paths = {event.src_path, getattr(event, "dest_path", "")}
            if any(p and Path(str(p)).resolve() == target for p in paths):
                loop.call_soon_threadsafe(changed.set)

    observer = Observer()
    try:
        observer.schedule(_Handler(), str(target.parent), recursive=False)
        observer.start()
    except OSError as exc:  # e.g. inotify watches exhausted: poll instead of going blind
        log.error("file_watch_unavailable", file=what, error=str(exc), fallback=f"polling every {poll_s:g} s")
        if started is not None:
            started.set()
        await _poll(path, on_change, poll_s)
        return
    if started is not None:
        started.set()
    try:
        while True:
            await changed.wait()
            await asyncio.sleep(debounce_s)
            changed.clear()
            await on_change()
    finally:
        observer.stop()
        await asyncio.to_thread(observer.join, 5)


async def watch_reloads(
    path: Path | None,
    reload: Callable[[], bool],
    on_change: Callable[[], Awaitable[None]],
    *,
    what: str,
    started: asyncio.Event | None = None,
    on_failed: Callable[[Exception], None] | None = None,
) -> None:
    """A keeper's watch: ``reload()`` after each change of ``path`` (``None``: no file, wait forever) and
    ``on_change()`` when it put something new in force. A reload that raises (the store could not take it,
    e.g. the database is unreachable) keeps what is in force and goes to ``on_failed``, which lets the caller
    reload again later; without ``on_failed`` it propagates."""
    if path is None:
        await asyncio.Event().wait()
        return

    async def changed() -> None:
        try:
            reloaded = reload()
        except Exception as exc:
            if on_failed is None:
                raise
            on_failed(exc)
            return
        if reloaded:
            await on_change()

    await watch_file(path, changed, what=what, started=started)


async def _poll(path: Path, on_change: Callable[[], Awaitable[None]], poll_s: float) -> None:
    last = stamp(path)
    while True:
        await asyncio.sleep(poll_s)
        current = stamp(path)
        if current != last:
            last = current
            await on_change()
