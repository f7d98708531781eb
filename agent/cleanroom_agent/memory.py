"""What the agent's process does about its own memory (issue 7: the whole agent idle under 50 MB).

Measured here (``bench/enforce.py --only agent``), the idle daemon's memory is mostly imports: the Python
objects of pydantic and the protocol models, asyncio/ssl, paho, cryptography, structlog. Three things pay:

* :func:`lean_process`, first thing in the ``cleanroom-agent`` entry point (``__main__.py``), before the
  CLI, structlog or any thread exists: it makes ``rich`` unimportable (structlog and typer import it when
  it is installed, for pretty tracebacks and help, ~3 MB the agent never uses: it logs JSON lines; typer
  is told so and prints plain help), and
  caps glibc's malloc arenas at two (each thread that allocates would get a 64 MB arena of its own; the
  X11 watchers, the asyncio executor and the reader threads each touch one). Only the agent's own entry
  point calls it: test processes and the controller, which import the same libraries, are unaffected.
* :func:`release_free_memory` once the enforcers are up: importing allocates and frees a lot; glibc keeps
  the freed heap pages mapped, so the daemon would carry them for its whole life. One ``malloc_trim(0)``
  returns them: measured here, the daemon's resident memory fell from 64 to 59 MB and its private dirty
  memory from 44 to 38 MB.
* The fanotify listener is a separate, stdlib-only program (``enforcers/fanotify.py``), not a fork of the
  daemon: a fork would share the daemon's pages in PSS but count all of them again in its RSS.

libc is reached as ``ctypes.CDLL(None)`` (the symbols already linked into this process), never through
``ctypes.util.find_library``, which runs ``ldconfig -p`` in a subprocess and imports ``subprocess``,
``tempfile`` and ``shutil`` to do it."""

from __future__ import annotations

import ctypes
import gc
import os
import sys
from typing import Any

M_ARENA_MAX = -8  # mallopt parameter (glibc malloc.h)
MALLOC_ARENAS = 2  # the main arena and one for every other thread: what MALLOC_ARENA_MAX=2 would set

# Modules the agent never uses but its libraries import when they are installed (see lean_process).
UNUSED_IMPORTS = ("rich",)


def _libc_function(name: str) -> Any:  # a ctypes foreign function, or None
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None  # not glibc (musl has neither mallopt arenas nor malloc_trim): harmless


def lean_process() -> None:
    """Set up this process for a small footprint, before the agent's heavy imports and its first thread.
    Neither step is needed for correctness: where libc has no mallopt the arenas stay as they are."""
    for name in UNUSED_IMPORTS:
        if name not in sys.modules:
            sys.modules[name] = None  # type: ignore[assignment]  # `import rich` raises ImportError
    _import_typer_without_rich()
    mallopt = _libc_function("mallopt")
    if mallopt is not None:
        mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        mallopt.restype = ctypes.c_int
        mallopt(M_ARENA_MAX, MALLOC_ARENAS)


def _import_typer_without_rich() -> None:
    """typer decides once, when ``typer.core`` is imported, whether it formats help and errors with rich
    (``TYPER_USE_RICH``, default yes; with rich unimportable its help would fail). Import it with the switch
    off, then restore the environment: children (the VDI client `launch` execs) get it as it was."""
    if "typer.core" in sys.modules:
        return
    previous = os.environ.get("TYPER_USE_RICH")
    os.environ["TYPER_USE_RICH"] = "0"
    try:
        import typer.core  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TYPER_USE_RICH"]
        else:
            os.environ["TYPER_USE_RICH"] = previous


def release_free_memory() -> bool:
    """Collect garbage and return free heap pages to the kernel; False where libc has no malloc_trim
    (musl), which is harmless."""
    gc.collect()
    trim = _libc_function("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
