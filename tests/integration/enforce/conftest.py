"""Fixtures for enforcement integration tests: a real Xvfb on a free display (picked by Xvfb itself via
-displayfd), and an event recorder. A missing Xvfb fails loudly."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest


@pytest.fixture
def xvfb() -> Iterator[str]:
    """One Xvfb per test (~50 ms). Shared by a module, it reset itself when a test's last client left, and
    the next test's first connection could land in the reset and be closed by the server (seen under load:
    ConnectionClosedError in the connection setup); a fresh server is also a clean slate (root properties,
    selections)."""
    with running_xvfb("-screen", "0", "640x480x24") as display:
        yield display


@contextlib.contextmanager
def running_xvfb(*extra: str) -> Iterator[str]:
    """An Xvfb on a display it picks itself (-displayfd), accepting connections when this yields it."""
    binary = shutil.which("Xvfb")
    if binary is None:
        pytest.fail("Xvfb is not installed (apt-get install xvfb): the X11 enforcement tests need it")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [binary, "-displayfd", str(write_end), "-nolisten", "tcp", *extra],
        pass_fds=(write_end,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        number = reader.readline().strip().decode()  # Xvfb writes it once it accepts connections
    if not number:
        pytest.fail(f"Xvfb {' '.join(extra)} exited with {proc.wait(5)} before announcing a display")
    try:
        yield f":{number}"
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()  # still writing out what a storm queued for clients that are gone
            proc.wait(5)


def x_env(display: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("WAYLAND_DISPLAY", "XDG_SESSION_TYPE")}
    env["DISPLAY"] = display
    return env
