"""Clipboard storm benchmark: a real X client re-takes CLIPBOARD as fast as python-xlib sends while real
``xclip -o`` pastes run; the clipboard enforcer (block mode, enforce) runs in this process.

    .venv/bin/python bench/clipboard_storm.py [--seconds 3] [--runs 3]

For each way of storming (``own``: the client names its own window as owner; ``root``: it names the root
window, so no event names it; ``none``: it clears the selection; ``paste``: it floods the guard with
pastes), with RECORD and without it (Xvfb ``-extension RECORD``), prints: time until the server cut the
client off (from its first request), pastes through / pastes tried, the growth of this process's RSS
(peak over the storm), the most events python-xlib held queued, and the enforcer's state afterwards.
Needs Xvfb, xclip and python-xlib; no root.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository: tests.support
from tests.support.clipboardstorm import storm_with_pastes

CONTENT = "BENCH-STORM-CONTENT"


def start_xvfb(*extra: str) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("Xvfb")
    if binary is None:
        sys.exit("Xvfb is not installed")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [binary, "-displayfd", str(w), "-nolisten", "tcp", *extra], pass_fds=(w,), stderr=subprocess.DEVNULL
    )
    os.close(w)
    with os.fdopen(r, "rb") as f:
        return proc, ":" + f.readline().decode().strip()


async def one_storm(display: str, how: str, seconds: float) -> tuple[float, int, int, int, int, str]:
    from cleanroom_agent.enforcers.clipboard import ClipboardEnforcer
    from cleanroom_protocol import Mode, Policy

    env = {**os.environ, "DISPLAY": display}
    env.pop("WAYLAND_DISPLAY", None)
    enforcer = ClipboardEnforcer(lambda event: None, display=display, env=env)
    await enforcer.start(
        Policy.model_validate({"id": "bench", "version": 1, "clipboard": {"storm_calm_s": 1}}), Mode.ENFORCE
    )
    try:
        if how == "paste":  # the guard must own CLIPBOARD for pastes to reach it
            subprocess.run(["xclip", "-i", "-selection", "clipboard"], input=b"x", env=env, check=True)
            await asyncio.sleep(0.2)
        result = await storm_with_pastes(env, how, seconds, CONTENT)
        guard = enforcer.guard
        queue = guard.stats.max_queue if guard else -1
        state = enforcer.status().state.value
        return (
            result.disconnected_after_s,
            result.pastes,
            result.through,
            result.peak_rss_growth,
            queue,
            state,
        )
    finally:
        await enforcer.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each storm (default 3)")
    parser.add_argument("--runs", type=int, default=3, help="storms per case (default 3)")
    args = parser.parse_args()
    print(
        f"{'case':<22} {'cut off after':>14} {'pastes through':>15} {'RSS growth':>11} {'max queue':>10}  state"
    )
    for record in (True, False):
        xvfb, display = start_xvfb() if record else start_xvfb("-extension", "RECORD")
        try:
            for how in ("own", "root", "none", "paste"):
                for _ in range(args.runs):
                    cut, pastes, through, growth, queue, state = asyncio.run(
                        one_storm(display, how, args.seconds)
                    )
                    case = f"{how}, {'RECORD' if record else 'no RECORD'}"
                    cut_text = f"{cut * 1000:.0f} ms" if cut >= 0 else "never"
                    print(
                        f"{case:<22} {cut_text:>14} {f'{through}/{pastes}':>15} "
                        f"{growth / 2**20:>8.1f} MB {queue:>10}  {state}",
                        flush=True,
                    )
        finally:
            xvfb.terminate()
            try:
                xvfb.wait(5)
            except subprocess.TimeoutExpired:
                xvfb.kill()
                xvfb.wait(5)


if __name__ == "__main__":
    main()
