"""Give back what start-up freed. Importing the agent (pydantic schemas, the protocol models, X11, MQTT)
allocates and frees a lot; glibc keeps the freed heap pages mapped, so the daemon would carry them for
its whole life. One ``malloc_trim(0)`` once the enforcers are up returns them: measured here, the daemon's
resident memory fell from 64 to 59 MB and its private dirty memory from 44 to 38 MB."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc


def release_free_memory() -> bool:
    """Collect garbage and return free heap pages to the kernel; False where libc has no malloc_trim
    (musl), which is harmless."""
    gc.collect()
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        trim = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
