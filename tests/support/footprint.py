"""Memory of a group of processes, measured the ways that can be compared with an aim (used by
bench/enforce.py and tests/agent/test_footprint.py).

* RSS, PSS and USS of each process, from ``/proc/PID/smaps_rollup``. Summing RSS counts a page two
  processes share (libpython, libc, libcrypto) twice; PSS splits a shared page between everyone mapping
  it, including processes that are not ours (on a test machine the controller maps the same cryptography
  and pydantic libraries, which flatters the agent's PSS; on a thin client nobody else does).
* The group's *combined* resident memory: every physical page mapped by any of the processes, counted
  once (page frame numbers from ``/proc/PID/pagemap``, readable by root only). That is the honest "RSS of
  the whole agent": what its processes keep in memory together, independent of who else runs."""

from __future__ import annotations

import array
import os
from collections.abc import Iterable
from dataclasses import dataclass

PAGE = os.sysconf("SC_PAGE_SIZE")
MB = 2**20
_PRESENT = 1 << 63
_PFN_MASK = (1 << 55) - 1


@dataclass(frozen=True)
class ProcessMemory:
    pid: int
    rss_mb: float
    pss_mb: float
    uss_mb: float


def process_memory(pid: int) -> ProcessMemory:
    """RSS, PSS and USS (private clean + dirty) of one process, MB."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for row in f:
            name, _, rest = row.partition(":")
            if name in ("Rss", "Pss", "Private_Clean", "Private_Dirty"):
                fields[name] = int(rest.split()[0])
    return ProcessMemory(
        pid,
        fields["Rss"] / 1024,
        fields["Pss"] / 1024,
        (fields["Private_Clean"] + fields["Private_Dirty"]) / 1024,
    )


def resident_frames(pid: int) -> set[int]:
    """The physical page frames a process has resident (root: others see every PFN as 0)."""
    frames: set[int] = set()
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for row in maps:
            span = row.split(maxsplit=1)[0]
            start, end = (int(x, 16) for x in span.split("-"))
            if row.rstrip().endswith("[vsyscall]"):
                continue  # not readable through pagemap
            pagemap.seek(start // PAGE * 8)
            entries = array.array("Q")
            entries.frombytes(pagemap.read((end - start) // PAGE * 8))
            frames.update(e & _PFN_MASK for e in entries if e & _PRESENT)
    frames.discard(0)
    return frames


def combined_rss_mb(pids: Iterable[int]) -> float:
    """Resident memory of a group of processes with each shared page counted once, MB."""
    if os.geteuid() != 0:
        raise PermissionError("combined RSS reads page frame numbers from /proc/PID/pagemap: run as root")
    union: set[int] = set()
    for pid in pids:
        union |= resident_frames(pid)
    return len(union) * PAGE / MB
