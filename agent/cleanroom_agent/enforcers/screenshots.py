"""Screenshot folders (policy ``[capture] screenshot_dirs``, ``remove_screenshots``): a new image in a
watched folder is reported, and removed when the policy says so.

The agent is root and the folders belong to users, so nothing here follows a path a user can change:

* A folder is opened once, one path component at a time from ``/``, each with ``O_NOFOLLOW`` relative to
  the directory before it (a symlink anywhere in the path is refused, named). Everything after that goes
  through that directory fd: ``fstatat(name, AT_SYMLINK_NOFOLLOW)`` then ``unlinkat(name)``. Only a
  regular file or a symlink (removed as a link, never followed) is removed; a directory never (and
  ``unlinkat`` without ``AT_REMOVEDIR`` refuses one anyway). A user who renames the folder and puts a
  symlink in its place can at most make the agent remove images *inside the folder it opened*.
* inotify (ctypes, not watchdog) watches the open directory itself through ``/proc/self/fd/N`` (so the
  watch is on exactly the opened inode) and tells about the folder: ``IN_MOVE_SELF`` / ``IN_DELETE_SELF``
  when it is renamed or removed. Every ``RECHECK_S`` the path is walked again and compared with the open
  fd's (dev, inode), which also catches a renamed parent. A changed folder is reported
  (``screenshot.folder_changed``); the folder now at the path is opened only if it is a real directory
  reached without symlinks; while a folder is not watched the status is degraded, naming it.
* No error ends the watcher: anything raised in its thread is reported (``screenshot.watch_failed``) and
  degrades the status until the next full check passes.

Why not watchdog: its handler exceptions end its emitter thread silently (the folder was then unwatched
while capture said ``active``), it re-resolves paths, it says nothing about the folder itself, and it is
a dependency of ~4 MB of imports; this needs four syscalls.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum

IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".xwd", ".ppm"}
)

IN_MODIFY = 0x00000002
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
# No IN_DONT_FOLLOW: the watch is placed through the /proc/self/fd/N magic link, which must be followed
# to reach the opened directory (it cannot be swapped: it names the fd, not a path).
WATCH_MASK = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_MOVE_SELF | IN_DELETE_SELF | IN_ONLYDIR
EVENT_HEADER = struct.Struct("=iIII")  # wd, mask, cookie, len
READ_BUFFER = 64 * 1024
RECHECK_S = 2.0  # how often each folder's path is compared with the open directory
RETRY_S = 1.0  # how often an unwatched folder is tried again
FAILURE_HOLD_S = 30.0  # a failure keeps the status degraded at least this long (posture sees it)
MAX_FOLDERS = 64
MAX_PATH = 4096
MAX_RESCAN = 10_000  # entries looked at after an inotify queue overflow


# --- pure parts ---------------------------------------------------------------------------------------
class FolderPathError(ValueError):
    pass


def folder_components(path: str) -> list[str]:
    """The components of a configured folder path; refuses what cannot be walked without ambiguity."""
    if not path.startswith("/"):
        raise FolderPathError(f"screenshot folder {path[:200]!r}: not an absolute path")
    if len(path) > MAX_PATH or "\0" in path:
        raise FolderPathError(f"screenshot folder {path[:200]!r}: too long or contains NUL")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise FolderPathError("screenshot folder '/': the root directory cannot be a screenshot folder")
    bad = [p for p in parts if p in (".", "..")]
    if bad:
        raise FolderPathError(f"screenshot folder {path[:200]!r}: contains {bad[0]!r}")
    return parts


def is_image_name(name: str) -> bool:
    _, dot, suffix = name.rpartition(".")
    return bool(dot) and f".{suffix.lower()}" in IMAGE_SUFFIXES


class EntryAction(Enum):
    REMOVE = "remove"
    KEEP_DIRECTORY = "directory"
    KEEP_OTHER = "not a regular file"


def judge_entry(st_mode: int) -> EntryAction:
    """What to do with an image-named entry, from its own (not followed) mode: a regular file or a
    symlink is removed (the link itself); a directory, device, fifo or socket never."""
    if stat.S_ISREG(st_mode) or stat.S_ISLNK(st_mode):
        return EntryAction.REMOVE
    if stat.S_ISDIR(st_mode):
        return EntryAction.KEEP_DIRECTORY
    return EntryAction.KEEP_OTHER


@dataclass(frozen=True)
class InotifyEvent:
    wd: int
    mask: int
    name: str


def parse_inotify(buf: bytes) -> list[InotifyEvent]:
    """``struct inotify_event`` records (wd, mask, cookie, len, name padded with NULs)."""
    events, pos = [], 0
    while pos + EVENT_HEADER.size <= len(buf):
        wd, mask, _cookie, length = EVENT_HEADER.unpack_from(buf, pos)
        pos += EVENT_HEADER.size
        raw = buf[pos : pos + length]
        pos += length
        name = raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        events.append(InotifyEvent(wd, mask, name))
    return events


# --- what the watcher tells its owner ---------------------------------------------------------------
@dataclass(frozen=True)
class ImageSeen:
    path: str  # the configured folder path joined with the name (for the report only)
    removed: bool
    kept: str | None = None  # why an image-named entry was not removed ("directory", an error, …)


@dataclass(frozen=True)
class FolderChanged:
    folder: str
    change: str  # "moved", "deleted", "replaced", "unmounted", "appeared"
    watched: bool  # whether the folder now at the path is watched
    problem: str | None = None


@dataclass(frozen=True)
class WatcherFailed:
    error: str


Report = ImageSeen | FolderChanged | WatcherFailed


@dataclass(frozen=True)
class FolderStatus:
    degraded: str | None  # something is not enforced: a folder not watched, a failure
    note: str | None  # worth saying, all enforced


# --- OS parts -----------------------------------------------------------------------------------------
class Inotify:
    """An inotify instance (ctypes; the stdlib has none)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1.argtypes = [ctypes.c_int]
        libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
        libc.inotify_rm_watch.argtypes = [ctypes.c_int, ctypes.c_int]
        self._libc = libc
        fd = libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        self.fd: int = fd

    def watch_fd(self, dir_fd: int, mask: int = WATCH_MASK) -> int:
        """Watch exactly the directory open as ``dir_fd`` (through its /proc/self/fd magic link)."""
        wd: int = self._libc.inotify_add_watch(self.fd, f"/proc/self/fd/{dir_fd}".encode(), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_add_watch: {os.strerror(err)}")
        return wd

    def unwatch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel already dropped it: fine

    def read(self) -> list[InotifyEvent]:
        try:
            return parse_inotify(os.read(self.fd, READ_BUFFER))
        except BlockingIOError:
            return []

    def close(self) -> None:
        os.close(self.fd)


def open_folder(path: str) -> int:
    """An ``O_PATH`` fd of the directory at ``path``, every component opened with ``O_NOFOLLOW``
    relative to the one before. Raises FolderPathError naming the component that is a symlink, not a
    directory, or missing."""
    parts = folder_components(path)
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in parts:
            walked += "/" + part
            try:
                child = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                raise FolderPathError(f"{walked[:300]} {_why_not_a_dir(fd, part, exc)}") from None
            os.close(fd)
            fd = child
        return fd
    except BaseException:
        os.close(fd)
        raise


def _why_not_a_dir(dir_fd: int, name: str, exc: OSError) -> str:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except OSError:
        return "does not exist" if exc.errno == errno.ENOENT else f"cannot be opened ({exc.strerror})"
    if stat.S_ISLNK(st.st_mode):
        return "is a symlink (not followed)"
    if not stat.S_ISDIR(st.st_mode):
        return "is not a directory"
    return f"cannot be opened ({exc.strerror})"


def identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


# --- the watcher ----------------------------------------------------------------------------------------
@dataclass
class _Folder:
    path: str
    fd: int | None = None
    wd: int | None = None
    ident: tuple[int, int] | None = None
    problem: str | None = None  # why it is not watched
    replaced: bool = False  # the folder at the path is not the one first opened


class ScreenshotFolders:
    """Watches the folders in a thread of its own; ``report`` and ``on_status`` are called from that
    thread (the owner hands them over to its loop). ``remove()`` is asked at each image: whether the
    policy in force removes screenshots."""

    def __init__(
        self,
        folders: list[str],
        *,
        remove: Callable[[], bool],
        report: Callable[[Report], None],
        on_status: Callable[[FolderStatus], None],
    ) -> None:
        self._folders = [_Folder(p) for p in dict.fromkeys(folders[:MAX_FOLDERS])]
        self._remove = remove
        self._report = report
        self._on_status = on_status
        self._inotify: Inotify | None = None
        self._by_wd: dict[int, _Folder] = {}
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._failure: str | None = None
        self._failure_at = 0.0
        self._status = FolderStatus(None, None)
        self._next_check = 0.0

    # lifecycle (owner's thread) --------------------------------------------------------------------
    def start(self) -> FolderStatus:
        """Open and watch the folders (synchronously, so the status returned is the one in force), then
        start the thread. An inotify that cannot be created leaves every folder unwatched (degraded)."""
        try:
            self._inotify = Inotify()
        except OSError as exc:
            for folder in self._folders:
                folder.problem = f"inotify unavailable: {exc.strerror or exc}"
            self._status = self._compute_status()
            return self._status
        for folder in self._folders:
            self._open(folder)
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._status = self._compute_status()
        self._next_check = time.monotonic() + RECHECK_S
        self._thread = threading.Thread(target=self._run, name="capture-screenshot-folders", daemon=True)
        self._thread.start()
        return self._status

    def stop(self) -> None:
        self._stopping = True
        if self._wake_w >= 0:
            with contextlib.suppress(OSError):
                os.write(self._wake_w, b"x")
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for folder in self._folders:
            self._close(folder)
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None

    @property
    def status(self) -> FolderStatus:
        return self._status

    # the thread ----------------------------------------------------------------------------------------
    def _run(self) -> None:
        assert self._inotify is not None
        poller = select.poll()
        poller.register(self._inotify.fd, select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        while not self._stopping:
            try:
                now = time.monotonic()
                timeout = max(0.0, self._next_check - now)
                ready = poller.poll(timeout * 1000)
                if self._stopping:
                    return
                if any(fd == self._inotify.fd for fd, _ in ready):
                    self._handle(self._inotify.read())
                if time.monotonic() >= self._next_check:
                    self._check_all()
            except Exception as exc:  # the watcher must outlive any error: reported, degraded
                self._failed(exc)
                self._next_check = time.monotonic() + RETRY_S
                if self._wait_stop(RETRY_S):  # no busy loop on a persistent error
                    return

    def _wait_stop(self, seconds: float) -> bool:
        ready, _, _ = select.select([self._wake_r], [], [], seconds)
        return bool(ready) or self._stopping

    def _failed(self, exc: BaseException) -> None:
        self._failure = f"screenshot watcher error: {type(exc).__name__}: {exc}"[:300]
        self._failure_at = time.monotonic()
        with contextlib.suppress(Exception):
            self._report(WatcherFailed(self._failure))
        with contextlib.suppress(Exception):
            self._publish()

    def _handle(self, events: list[InotifyEvent]) -> None:
        for event in events:
            if event.mask & IN_Q_OVERFLOW:
                self._failure = (
                    "screenshot watcher: inotify queue overflowed (events lost); folders rescanned"
                )
                self._failure_at = time.monotonic()
                self._report(WatcherFailed(self._failure))
                for each in self._folders:
                    self._rescan(each)
                self._publish()
                continue
            folder = self._by_wd.get(event.wd)
            if folder is None:
                continue
            if event.mask & (IN_MOVE_SELF | IN_DELETE_SELF | IN_UNMOUNT | IN_IGNORED):
                change = (
                    "moved"
                    if event.mask & IN_MOVE_SELF
                    else "unmounted"
                    if event.mask & IN_UNMOUNT
                    else "deleted"
                )
                self._folder_changed(folder, change)
                continue
            if event.mask & IN_ISDIR or not event.name or not is_image_name(event.name):
                continue
            if event.mask & IN_CLOSE_WRITE and not self._remove():
                continue  # reported at its creation; only a removal is worth a second look
            self._image(folder, event.name, created=bool(event.mask & (IN_CREATE | IN_MOVED_TO)))

    def _image(self, folder: _Folder, name: str, *, created: bool) -> None:
        fd = folder.fd
        if fd is None or "/" in name or name in (".", ".."):
            return
        shown = f"{folder.path.rstrip('/')}/{name}"[:1024]
        if not self._remove():
            self._report(ImageSeen(shown, removed=False))
            return
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            return  # already gone (removed at its creation; this is its close)
        action = judge_entry(st.st_mode)
        if action is not EntryAction.REMOVE:
            if created:
                self._report(ImageSeen(shown, removed=False, kept=action.value))
            return
        try:
            os.unlink(name, dir_fd=fd)  # unlinkat(fd, name, 0): never a directory, never follows
        except FileNotFoundError:
            return
        except OSError as exc:
            # e.g. swapped for a directory since the stat (EISDIR), or immutable (EPERM)
            self._report(ImageSeen(shown, removed=False, kept=f"{exc.strerror or exc}"))
            return
        self._report(ImageSeen(shown, removed=True))

    def _rescan(self, folder: _Folder) -> None:
        """After lost events: look at the folder's image-named entries (bounded) as if just created."""
        if folder.fd is None or not self._remove():
            return
        listing = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=folder.fd)
        try:
            names = os.listdir(listing)[:MAX_RESCAN]
        finally:
            os.close(listing)
        for name in names:
            if is_image_name(name):
                self._image(folder, name, created=True)

    def _folder_changed(self, folder: _Folder, change: str) -> None:
        if folder.fd is None:
            return  # already handled (IN_IGNORED follows IN_DELETE_SELF)
        self._close(folder)
        self._open(folder)
        folder.replaced = folder.fd is not None
        self._report(FolderChanged(folder.path, change, folder.fd is not None, folder.problem))
        self._publish()

    def _check_all(self) -> None:
        """Periodic: each watched folder's path still leads to the open directory (a renamed parent
        sends no event to the folder's watch); each unwatched one is tried again."""
        for folder in self._folders:
            if folder.fd is None:
                if self._open(folder):
                    folder.replaced = True
                    self._report(FolderChanged(folder.path, "appeared", True))
                continue
            try:
                fd = open_folder(folder.path)
            except (OSError, FolderPathError):
                self._folder_changed(folder, "replaced")
                continue
            try:
                same = identity(os.fstat(fd)) == folder.ident
            finally:
                os.close(fd)
            if not same:
                self._folder_changed(folder, "replaced")
        if self._failure and time.monotonic() - self._failure_at >= FAILURE_HOLD_S:
            self._failure = None  # full checks have passed since: the past failure no longer stands
        self._next_check = time.monotonic() + (
            RETRY_S if any(f.fd is None for f in self._folders) else RECHECK_S
        )
        self._publish()

    def _open(self, folder: _Folder) -> bool:
        assert self._inotify is not None
        try:
            fd = open_folder(folder.path)
        except FolderPathError as exc:
            folder.problem = str(exc)
            return False
        except OSError as exc:
            folder.problem = f"{folder.path[:300]} cannot be opened ({exc.strerror or exc})"
            return False
        try:
            wd = self._inotify.watch_fd(fd)
            folder.ident = identity(os.fstat(fd))
        except OSError as exc:
            os.close(fd)
            folder.problem = f"{folder.path[:300]} cannot be watched ({exc.strerror or exc})"
            return False
        folder.fd, folder.wd, folder.problem = fd, wd, None
        self._by_wd[wd] = folder
        return True

    def _close(self, folder: _Folder) -> None:
        if folder.wd is not None:
            self._by_wd.pop(folder.wd, None)
            if self._inotify is not None:
                self._inotify.unwatch(folder.wd)
        if folder.fd is not None:
            os.close(folder.fd)
        folder.fd = folder.wd = None
        folder.ident = None

    def _compute_status(self) -> FolderStatus:
        unwatched = [f.problem or f.path for f in self._folders if f.fd is None]
        degraded = []
        if unwatched:
            degraded.append("screenshot folders not watched: " + "; ".join(unwatched))
        if self._failure:
            degraded.append(self._failure)
        replaced = [f.path for f in self._folders if f.fd is not None and f.replaced]
        note = "screenshot folders replaced since start (the new ones watched): " + ", ".join(replaced)
        return FolderStatus(
            "; ".join(degraded)[:500] or None,
            note[:300] if replaced else None,
        )

    def _publish(self) -> None:
        status = self._compute_status()
        if status != self._status:
            self._status = status
            self._on_status(status)
