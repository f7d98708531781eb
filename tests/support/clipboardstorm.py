"""A clipboard storm with a user pasting meanwhile, shared by the storm tests and bench/clipboard_storm.py:
the storming X client (tests/integration/enforce/xclient.py) runs for ``seconds`` while ``xclip -o`` pastes
in a loop; what gets through is counted and this process's RSS (the enforcer runs in it) sampled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

XCLIENT = str(Path(__file__).resolve().parent.parent / "integration" / "enforce" / "xclient.py")


@dataclass
class StormResult:
    takes: int
    disconnected_after_s: float  # -1: never cut off
    pastes: int
    through: int
    peak_rss_growth: int


async def storm_with_pastes(env: dict[str, str], how: str, seconds: float, content: str) -> StormResult:
    """``how``: own (the client names its own window), root (the root window), none (clears it), paste
    (floods the guard with pastes)."""
    me = psutil.Process()
    rss0 = peak = me.memory_info().rss
    client = await asyncio.create_subprocess_exec(
        sys.executable, XCLIENT, "storm", "CLIPBOARD", str(seconds), content, how,
        env=env, stdout=subprocess.PIPE,
    )  # fmt: skip
    pastes = through = 0
    while client.returncode is None:
        paster = await asyncio.create_subprocess_exec(
            "xclip", "-o", "-selection", "clipboard",
            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            out, _ = await asyncio.wait_for(paster.communicate(), 2.0)
        except TimeoutError:
            # A paste sent to a client that is then disconnected is never answered: not through.
            paster.kill()
            out, _ = await paster.communicate()
        pastes += 1
        through += content.encode() in out
        peak = max(peak, me.memory_info().rss)
        await asyncio.sleep(0.01)
    assert client.stdout is not None
    words = (await client.stdout.read()).decode().split()
    return StormResult(int(words[1]), float(words[3]), pastes, through, peak - rss0)
