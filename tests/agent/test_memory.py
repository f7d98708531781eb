"""release_free_memory gives freed heap pages back to the kernel (glibc's malloc_trim), in a real child
process so this test's own heap does not blur the figure."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
from cleanroom_agent.memory import release_free_memory

def rss_kb():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1])

chunks = [bytearray(64 * 1024) for _ in range(1000)]  # 64 MB below the mmap threshold: the brk heap
pin = bytearray(64 * 1024)  # allocated last, kept: the heap top stays, so plain free() returns nothing
del chunks
before = rss_kb()
ok = release_free_memory()
print(ok, before - rss_kb())
"""


def test_freed_heap_pages_go_back_to_the_kernel() -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60, check=True
    )
    ok, released_kb = done.stdout.split()
    assert ok == "True"
    assert int(released_kb) > 32 * 1024, f"only {released_kb} kB released"
