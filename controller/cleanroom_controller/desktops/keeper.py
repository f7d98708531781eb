"""The desktops file in force: loaded at start, reloaded when it changes (the policy's file watch, filewatch.py), and never
replaced by a broken one: the error (file, line, field) is logged and audited and the pools in force stay.
At start a broken file is fatal, like the policy: the controller will not guess which desktops exist."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from ..audit.recorder import Recorder
from ..filewatch import watch_reloads
from .config import Desktops, DesktopsError, load_desktops

log = structlog.get_logger("cleanroom.controller.desktops")


class DesktopsKeeper:
    def __init__(self, *, recorder: Recorder, path: Path | None) -> None:
        self._recorder = recorder
        self.path = path
        self._desktops = Desktops.empty()
        self._digest: str | None = None

    @property
    def desktops(self) -> Desktops:
        return self._desktops

    def load_initial(self) -> Desktops:
        """The file's desktops; raises :class:`DesktopsError` when it is broken (start refused)."""
        if self.path is None:
            return self._desktops
        try:
            desktops = load_desktops(self.path)
        except DesktopsError as exc:
            self._recorder.record("desktops.rejected", str(self.path), {"error": str(exc), "at": "start"})
            raise
        self._enforce(desktops)
        return desktops

    def reload(self) -> bool:
        """Re-read the file; ``True`` when other desktops are now in force."""
        if self.path is None:
            return False
        try:
            desktops = load_desktops(self.path)
        except DesktopsError as exc:
            log.error("desktops_rejected", error=str(exc), kept=self._digest)
            self._recorder.record(
                "desktops.rejected", str(self.path), {"error": str(exc), "kept": self._digest}
            )
            return False
        if _digest(desktops) == self._digest:
            return False
        self._enforce(desktops)
        return True

    async def watch(
        self,
        on_change: Callable[[], Awaitable[None]],
        started: asyncio.Event | None = None,
        on_failed: Callable[[Exception], None] | None = None,
    ) -> None:
        """Reload on every change of the file; ``on_change`` when other desktops are then in force.
        ``started`` is set once the watch is in place; ``on_failed`` hears of a reload that could not be
        audited (the desktops in force stay; the caller reloads again later)."""
        await watch_reloads(
            self.path, self.reload, on_change, what="desktops", started=started, on_failed=on_failed
        )

    def _enforce(self, desktops: Desktops) -> None:
        digest = _digest(desktops)
        # Audited, then in force: a database that fails meanwhile leaves the desktops in force unchanged, and
        # a reload later tries again.
        self._recorder.record(
            "desktops.loaded",
            desktops.source or "desktops",
            {
                "pools": [p.id for p in desktops.file.pool],
                "desktops": len(desktops),
                "hash": digest,
            },
        )
        self._desktops = desktops
        self._digest = digest
        log.info("desktops_in_force", pools=len(desktops.file.pool), desktops=len(desktops))


def _digest(desktops: Desktops) -> str:
    return "sha256:" + hashlib.sha256(desktops.file.model_dump_json().encode()).hexdigest()
