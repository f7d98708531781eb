"""A real Docker daemon from Debian's ``docker.io``, private to the tests: ``dockerd`` with its data root, exec
root and socket in a short temporary directory (a unix socket path has ~108 bytes), no bridge and no iptables
(nothing on the host's network changes). It starts its own containerd, and stops it when it stops (a
containerd the host already runs is used instead, with namespaces of this daemon's own).

No registry is reachable here: :meth:`Dockerd.import_busybox` builds a test image by importing a tar of a root
filesystem holding Debian's static busybox and its applet links.

:meth:`Dockerd.stop` removes every container (their shims exit), stops the daemon (SIGTERM, then SIGKILL),
kills any process still running from this daemon's directories (found by that path, so only ours), unmounts
what is left there and deletes the directory. Missing binaries or a non-root user fail loudly: ``apt-get
install docker.io busybox-static`` (``.ci/run`` does it).
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import docker
import psutil

from tests.support.wait import wait_for

BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "cat", "ls", "touch", "echo", "test", "rm")


def _needs() -> str:
    """``dockerd``'s path, or an error naming what is missing."""
    if os.geteuid() != 0:
        raise RuntimeError("the container driver's tests start a private dockerd: they need root")
    dockerd = shutil.which("dockerd") or ("/usr/sbin/dockerd" if Path("/usr/sbin/dockerd").exists() else None)
    if dockerd is None:
        raise RuntimeError("dockerd is not installed (apt-get install docker.io; .ci/run does it)")
    if not BUSYBOX.is_file():
        raise RuntimeError(f"{BUSYBOX} is missing (apt-get install busybox-static; .ci/run does it)")
    return dockerd


@dataclass
class Dockerd:
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="crd-", dir="/tmp")))
    namespace: str = field(default_factory=lambda: f"cleanroom-test-{secrets.token_hex(4)}")  # containerd's
    _proc: subprocess.Popen[bytes] | None = None
    _client: docker.DockerClient | None = None

    @property
    def socket(self) -> Path:
        return self.workdir / "d.sock"

    @property
    def uri(self) -> str:
        return f"unix://{self.socket}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "dockerd.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    @property
    def client(self) -> docker.DockerClient:
        assert self._client is not None, "dockerd not started"
        return self._client

    def start(self) -> None:
        dockerd = _needs()
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                [
                    dockerd,
                    "--data-root", str(self.workdir / "root"),
                    "--exec-root", str(self.workdir / "x"),
                    "--host", self.uri,
                    "--pidfile", str(self.workdir / "d.pid"),
                    "--bridge", "none", "--iptables=false", "--ip6tables=false",
                    # dockerd uses a containerd already running at /run/containerd (a host's docker.io)
                    # instead of its own: our own namespaces keep its containers apart from the host's.
                    "--containerd-namespace", self.namespace,
                    "--containerd-plugins-namespace", f"{self.namespace}-plugins",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        client = docker.DockerClient(base_url=self.uri, timeout=30, version="1.41")

        def answers() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"dockerd exited {self._proc.returncode}:\n{self.log_text()[-3000:]}")
            try:
                return bool(self.socket.exists() and client.ping())
            except Exception:
                return False

        try:
            wait_for(answers, timeout=30, what=f"dockerd answering at {self.uri}", interval=0.05)
        except BaseException:
            self.stop()
            raise
        self._client = client

    def import_busybox(self, repository: str = "cleanroom-test/busybox", tag: str = "1") -> str:
        """Import a root filesystem of static busybox as ``repository:tag``; its image id."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for directory in ("bin", "data", "tmp"):
                info = tarfile.TarInfo(directory)
                info.type, info.mode = tarfile.DIRTYPE, 0o1777 if directory == "tmp" else 0o755
                tar.addfile(info)
            tar.add(BUSYBOX, arcname="bin/busybox")
            for applet in APPLETS:
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        self.client.api.import_image_from_data(buf.getvalue(), repository=repository, tag=tag)
        image_id = self.client.images.get(f"{repository}:{tag}").id
        assert image_id is not None
        return image_id

    def stop(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                for container in self._client.containers.list(all=True):
                    container.remove(force=True)
            self._client.close()
            self._client = None
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.send_signal(signal.SIGTERM)
                try:
                    self._proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait(timeout=10)
            self._proc = None
        self._kill_leftovers()
        self._unmount_leftovers()
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _kill_leftovers(self) -> None:
        """containerd and shims that outlived a killed dockerd: they name this daemon's directory."""
        mine = str(self.workdir)
        left = []
        for proc in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                if any(mine in arg for arg in proc.info["cmdline"] or ()):
                    proc.kill()
                    left.append(proc)
        psutil.wait_procs(left, timeout=5)

    def _unmount_leftovers(self) -> None:
        mine = f"{self.workdir}/"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with open("/proc/self/mounts") as f:
                points = [line.split()[1] for line in f if line.split()[1].startswith(mine)]
            if not points:
                return
            for point in sorted(points, key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
