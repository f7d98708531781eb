"""Screenshot-folder watcher (screenshots.py): the pure decisions, the no-symlink folder walk on real
directories, and the watcher thread on a real folder with real inotify, surviving an error raised while
it reports (as when the agent's event loop has closed under it)."""

from __future__ import annotations

import os
import stat
import struct
import threading
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.screenshots import (
    IN_CREATE,
    IN_ISDIR,
    EntryAction,
    FolderPathError,
    FolderStatus,
    ImageSeen,
    Report,
    ScreenshotFolders,
    WatcherFailed,
    folder_components,
    is_image_name,
    judge_entry,
    open_folder,
    parse_inotify,
)
from tests.support.wait import wait_for


def test_image_names_and_entries() -> None:
    assert is_image_name("Screenshot from today.PNG")
    assert is_image_name("a.tar.jpeg")
    assert not is_image_name("png")
    assert not is_image_name("notes.txt")
    assert judge_entry(stat.S_IFREG | 0o644) is EntryAction.REMOVE
    assert judge_entry(stat.S_IFLNK | 0o777) is EntryAction.REMOVE  # the link itself
    assert judge_entry(stat.S_IFDIR | 0o755) is EntryAction.KEEP_DIRECTORY
    assert judge_entry(stat.S_IFIFO | 0o644) is EntryAction.KEEP_OTHER


def test_folder_paths_refused_with_the_reason() -> None:
    assert folder_components("/home/u//Pictures/") == ["home", "u", "Pictures"]
    for bad, why in (("Pictures", "absolute"), ("/", "root"), ("/home/u/../root", "'..'"), ("/a\0b", "NUL")):
        with pytest.raises(FolderPathError, match=why):
            folder_components(bad)


def test_inotify_records_parsed_with_padding() -> None:
    def record(wd: int, mask: int, name: bytes) -> bytes:
        padded = name + b"\0" * (16 - len(name) % 16) if name else b""
        return struct.pack("=iIII", wd, mask, 0, len(padded)) + padded

    data = record(1, IN_CREATE, b"a.png") + record(2, IN_CREATE | IN_ISDIR, b"d.png") + record(1, 0x800, b"")
    events = parse_inotify(data)
    assert [(e.wd, e.name) for e in events] == [(1, "a.png"), (2, "d.png"), (1, "")]
    assert events[1].mask & IN_ISDIR


def test_open_folder_refuses_a_symlink_anywhere_in_the_path(tmp_path: Path) -> None:
    real = tmp_path / "real" / "Pictures"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "Pics").symlink_to(real)
    fd = open_folder(str(real))
    try:
        assert os.fstat(fd).st_ino == real.stat().st_ino
    finally:
        os.close(fd)
    with pytest.raises(FolderPathError, match=r"/link is a symlink \(not followed\)"):
        open_folder(str(tmp_path / "link" / "Pictures"))
    with pytest.raises(FolderPathError, match=r"/Pics is a symlink"):
        open_folder(str(tmp_path / "Pics"))
    with pytest.raises(FolderPathError, match="does not exist"):
        open_folder(str(tmp_path / "absent"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(FolderPathError, match="is not a directory"):
        open_folder(str(tmp_path / "file"))


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.reports: list[Report] = []
        self.statuses: list[FolderStatus] = []
        self._fail = fail_first
        self._lock = threading.Lock()

    def report(self, report: Report) -> None:
        with self._lock:
            if self._fail and isinstance(report, ImageSeen):
                self._fail -= 1
                raise RuntimeError("Event loop is closed")
            self.reports.append(report)

    def status(self, status: FolderStatus) -> None:
        self.statuses.append(status)


def test_an_error_in_the_watcher_is_reported_degrades_and_the_watch_goes_on(tmp_path: Path) -> None:
    folder = tmp_path / "Pictures"
    folder.mkdir()
    seen = Recorder(fail_first=1)
    watcher = ScreenshotFolders([str(folder)], remove=lambda: True, report=seen.report, on_status=seen.status)
    assert watcher.start() == FolderStatus(None, None)
    try:
        (folder / "first.png").write_bytes(b"png")  # removed, but reporting it raises
        wait_for(lambda: watcher.status.degraded, timeout=5, what="degraded after the error")
        assert "RuntimeError: Event loop is closed" in (watcher.status.degraded or "")
        assert any(isinstance(r, WatcherFailed) for r in seen.reports)
        (folder / "second.png").write_bytes(b"png")
        wait_for(lambda: not (folder / "second.png").exists(), timeout=5, what="a later image removed")
        wait_for(
            lambda: ImageSeen(f"{folder}/second.png", removed=True) in seen.reports,
            timeout=5,
            what="the later image reported",
        )
        assert not (folder / "first.png").exists()
    finally:
        watcher.stop()


def test_a_folder_missing_at_start_is_degraded_then_watched_when_it_appears(tmp_path: Path) -> None:
    folder = tmp_path / "Pictures"
    seen = Recorder()
    watcher = ScreenshotFolders([str(folder)], remove=lambda: True, report=seen.report, on_status=seen.status)
    status = watcher.start()
    try:
        assert status.degraded is not None and "does not exist" in status.degraded
        folder.mkdir()
        wait_for(lambda: watcher.status.degraded is None, timeout=5, what="the folder watched once created")
        (folder / "shot.png").write_bytes(b"png")
        wait_for(lambda: not (folder / "shot.png").exists(), timeout=5, what="image removed")
    finally:
        watcher.stop()
