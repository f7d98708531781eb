#!/usr/bin/env python3
"""Put a `uv` binary at .tools/bin/uv on a machine that has only Python 3.11.

Tries, in order: `uv` already on PATH; pip (if this Python has it) into .tools/; and, with the standard
library alone, the uv wheel from PyPI (its sha256 checked against PyPI's metadata) unpacked into .tools/.
A fresh Debian has python3 without pip or venv, hence the last route.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TARGET = ROOT / ".tools" / "bin" / "uv"
INDEX = os.environ.get("CLEANROOM_PYPI_JSON", "https://pypi.org/pypi/uv/json")


def main() -> int:
    if TARGET.exists():
        print(TARGET)
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    found = shutil.which("uv")
    if found:
        TARGET.symlink_to(found)
        print(TARGET)
        return 0
    if _pip_available():
        pkg = ROOT / ".tools" / "uv-pkg"
        result = subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(pkg), "uv"], check=False
        )
        binary = pkg / "bin" / "uv"
        if result.returncode == 0 and binary.exists():
            TARGET.symlink_to(binary)
            print(TARGET)
            return 0
    _from_wheel()
    print(TARGET)
    return 0


def _pip_available() -> bool:
    return (
        subprocess.run(
            [sys.executable, "-m", "pip", "--version"], capture_output=True, check=False
        ).returncode
        == 0
    )


def _from_wheel() -> None:
    machine = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        platform.machine().lower()
    )
    if machine is None or sys.platform != "linux":
        sys.exit(f"bootstrap_uv: no uv wheel for {sys.platform}/{platform.machine()}; install uv yourself")
    with urllib.request.urlopen(INDEX, timeout=60) as resp:  # noqa: S310 - fixed https URL
        meta = json.load(resp)
    wheels = [
        f
        for f in meta["urls"]
        if f["filename"].endswith(".whl") and "manylinux" in f["filename"] and machine in f["filename"]
    ]
    if not wheels:
        sys.exit(f"bootstrap_uv: PyPI lists no manylinux {machine} wheel for uv {meta['info']['version']}")
    wheel = wheels[0]
    url = urllib.parse.urljoin(INDEX, wheel["url"])  # mirrors answer with relative links
    with urllib.request.urlopen(url, timeout=300) as resp:  # noqa: S310 - URL from PyPI metadata
        data = resp.read()
    digest = hashlib.sha256(data).hexdigest()
    if digest != wheel["digests"]["sha256"]:
        sys.exit(f"bootstrap_uv: {wheel['filename']} sha256 {digest} does not match PyPI's; refusing it")
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        name = next(n for n in zf.namelist() if n.endswith("/scripts/uv"))
        TARGET.write_bytes(zf.read(name))
    TARGET.chmod(0o755)


if __name__ == "__main__":
    raise SystemExit(main())
