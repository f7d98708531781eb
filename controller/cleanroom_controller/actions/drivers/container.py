"""The container desktop driver (the Docker SDK, over the Docker Engine API that podman's compatible API also
serves): a desktop is a container made from the pool's image, with named volumes of its own.

- log off: the container is stopped (SIGTERM, SIGKILL after ``stop_grace_s``; a non-persistent desktop keeps
  nothing a log-off would save) and confirmed not running.
- wipe: the container is removed (forced, with its anonymous volumes), then its named volumes; both confirmed
  gone; the volumes are made anew (empty) and a new container is created from the image *by id* with them, and
  started. Verified: it runs, its id is not the old one, the daemon created it after the wipe began, its image
  id is the pool's image's, and every volume it mounts is the one this wipe made (created after the wipe began,
  labelled with this wipe's random token). Each run removes whatever is there and makes everything anew, so a
  wipe interrupted anywhere (container gone, a volume left, a new container made but not started) completes when
  run again. The image is only read: never pulled, tagged or removed.

Times are the daemon's own (``SystemTime`` of ``/info`` at the start of the wipe), so a controller whose clock
differs from a remote daemon's does not misjudge what is new.

Every SDK call blocks: each step runs in a worker thread bounded by the pool's ``timeout_s`` (the client's
HTTP timeout is a second longer, so the thread ends too); a daemon that is down or slow is a failed outcome naming the
daemon's address, never an exception out of the driver.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
import secrets
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from ...desktops.config import DesktopSpec, PoolConfig
from .base import DesktopDriver, DesktopReport, Outcome, SessionRef

T = TypeVar("T")

DESKTOP_LABEL = "org.cleanroom.desktop"
POOL_LABEL = "org.cleanroom.pool"
WIPE_LABEL = "org.cleanroom.wipe"  # a random token per wipe run: what proves a container or volume is new
# The Engine's container states, as a desktop state.
STATES = {
    "running": "running",
    "created": "shut_off",
    "exited": "shut_off",
    "dead": "shut_off",
    "paused": "paused",
    "restarting": "restarting",
    "removing": "removing",
}
_ENGINE_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)$")
_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException, OSError)


class WipeFailed(Exception):
    """A step that did not do what it must (the message says which)."""


@dataclass(frozen=True, slots=True)
class FreshDesktop:
    """What a verified wipe must show (:func:`wipe_problems`)."""

    old_id: str | None
    began: datetime  # the daemon's clock when the wipe began
    image_id: str
    token: str
    volumes: tuple[tuple[str, str], ...]  # (name, mount path)


def engine_time(text: str) -> datetime:
    """An Engine API timestamp (RFC 3339, nanoseconds or none, ``Z`` or an offset) as an aware datetime."""
    m = _ENGINE_TIME.match(text.strip())
    if m is None:
        raise WipeFailed(f"the daemon gave an unreadable time {text[:64]!r}")
    fraction = (m.group(2) or "")[:6].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(f"{m.group(1)}.{fraction}{zone}").astimezone(UTC)


def wipe_problems(
    expected: FreshDesktop, container: Mapping[str, Any], volumes: Mapping[str, Mapping[str, Any]]
) -> list[str]:
    """Why the container (``inspect`` attributes) and its volumes (by name) are not a freshly wiped desktop;
    empty when they are. Volume times have whole seconds only, so a volume counts as new from the wipe's
    second on; the token is the exact proof."""
    problems: list[str] = []
    state = container.get("State") or {}
    if not state.get("Running"):
        problems.append(f"container is {state.get('Status', 'in no state')}, not running")
    if container.get("Id") == expected.old_id:
        problems.append("container is the old one")
    created = engine_time(str(container.get("Created", "")))
    if created < expected.began:
        problems.append(f"container created {created.isoformat()}, before the wipe began")
    if container.get("Image") != expected.image_id:
        problems.append(f"container runs image {container.get('Image')}, not {expected.image_id}")
    labels = (container.get("Config") or {}).get("Labels") or {}
    if labels.get(WIPE_LABEL) != expected.token:
        problems.append("container was not made by this wipe")
    mounts = {m.get("Name"): m for m in container.get("Mounts") or [] if m.get("Type") == "volume"}
    since = expected.began.replace(microsecond=0)
    for name, path in expected.volumes:
        mount = mounts.get(name)
        if mount is None or mount.get("Destination") != path:
            problems.append(f"volume {name} is not mounted at {path}")
        volume = volumes.get(name)
        if volume is None:
            problems.append(f"volume {name} is missing")
            continue
        if engine_time(str(volume.get("CreatedAt", ""))) < since:
            problems.append(f"volume {name} created {volume.get('CreatedAt')}, before the wipe began")
        if (volume.get("Labels") or {}).get(WIPE_LABEL) != expected.token:
            problems.append(f"volume {name} was not made by this wipe")
    return problems


def connect(uri: str, timeout_s: float) -> docker.DockerClient:
    """A client of the daemon at ``uri`` whose every request gives up a second after ``timeout_s``: the step's
    own bound (``asyncio.wait_for``) answers first, the worker thread ends soon after."""
    return docker.DockerClient(base_url=uri, timeout=math.ceil(timeout_s) + 1)


class ContainerDriver(DesktopDriver):
    name = "container"

    def __init__(
        self,
        environ: Mapping[str, str] | None = None,
        connect: Callable[[str, float], docker.DockerClient] = connect,
    ) -> None:
        self._environ = os.environ if environ is None else environ
        self._connect = connect
        self._clients: dict[tuple[str, float], docker.DockerClient] = {}
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()

    # -- interface ---------------------------------------------------------------------------------------
    async def log_off(self, desktop: DesktopSpec | None, session: SessionRef) -> Outcome:
        if desktop is None:
            return Outcome("", "unsupported", "the container driver logs off desktops, not endpoints")
        return await self._bounded(desktop, self._log_off, "log_off")

    async def wipe(self, desktop: DesktopSpec) -> Outcome:
        return await self._bounded(desktop, self._wipe, "wipe")

    async def report(self, desktop: DesktopSpec) -> DesktopReport:
        try:
            return await self._in_thread(desktop, self._report)
        except TimeoutError:
            return DesktopReport(
                "unknown", f"{desktop.pool.uri}: no answer within {desktop.pool.timeout_s:g} s"
            )
        except (*_ERRORS, WipeFailed) as exc:
            return DesktopReport("unknown", self._why(desktop.pool, exc))

    # -- steps (worker thread) -----------------------------------------------------------------------------
    async def _in_thread(self, desktop: DesktopSpec, step: Callable[[DesktopSpec], T]) -> T:
        return await asyncio.wait_for(asyncio.to_thread(step, desktop), desktop.pool.timeout_s)

    async def _bounded(self, desktop: DesktopSpec, step: Callable[[DesktopSpec], str], what: str) -> Outcome:
        try:
            detail = await self._in_thread(desktop, step)
        except TimeoutError:
            return Outcome(
                "", "failed", f"{what}: {desktop.pool.uri} took longer than {desktop.pool.timeout_s:g} s"
            )
        except (*_ERRORS, WipeFailed) as exc:
            return Outcome("", "failed", f"{what}: {self._why(desktop.pool, exc)}")
        return Outcome("", "clean" if what == "wipe" else "ended", detail)

    def _log_off(self, desktop: DesktopSpec) -> str:
        name = desktop.desktop.container_name
        container = self._find(desktop.pool, name)
        if container is None:
            return f"no container {name}: nothing runs"
        if STATES.get(container.status) != "shut_off":
            container.stop(timeout=math.ceil(desktop.pool.stop_grace_s))
            container.reload()
        if STATES.get(container.status) != "shut_off":
            raise WipeFailed(f"container {name} is {container.status} after stop")
        return f"container {name} stopped ({container.status})"

    def _wipe(self, desktop: DesktopSpec) -> str:
        pool, spec = desktop.pool, desktop.desktop
        assert pool.image is not None  # config validation
        client = self._client(pool)
        began = engine_time(str(client.info().get("SystemTime", "")))
        image_id = self._image_id(client, pool)
        name, volumes = spec.container_name, tuple(spec.volume_mounts)
        environment = self._environment(pool)
        token = secrets.token_hex(8)

        old = self._find(pool, name)
        if old is not None:
            old.remove(force=True, v=True)  # v: the anonymous volumes the image declares go with it
            if self._find(pool, name) is not None:
                raise WipeFailed(f"container {name} still there after removal")
        for volume, _path in volumes:
            self._remove_volume(client, volume)
        labels = {DESKTOP_LABEL: spec.id, POOL_LABEL: pool.id, WIPE_LABEL: token}
        for volume, _path in volumes:
            client.volumes.create(name=volume, labels=labels)
        fresh = client.containers.create(
            image_id,
            command=spec.command,
            name=name,
            labels=labels,
            volumes={volume: {"bind": path, "mode": "rw"} for volume, path in volumes},
            ports=spec.port_bindings,
            network=pool.network,
            environment=environment,
            detach=True,
        )
        fresh.start()
        fresh.reload()

        made = {v: client.volumes.get(v).attrs for v, _path in volumes}
        expected = FreshDesktop(old.id if old is not None else None, began, image_id, token, volumes)
        problems = wipe_problems(expected, fresh.attrs, made)
        if self._image_id(client, pool) != image_id:
            problems.append(f"image {pool.image} changed on the daemon during the wipe")
        if problems:
            raise WipeFailed(f"container {name}: " + "; ".join(problems))
        return (
            f"container {name} {fresh.short_id} new from {pool.image} ({image_id[:19]}), "
            f"{len(volumes)} new volume(s); running"
        )

    def _report(self, desktop: DesktopSpec) -> DesktopReport:
        name = desktop.desktop.container_name
        container = self._find(desktop.pool, name)
        if container is None:
            return DesktopReport("missing", f"no container {name}")
        return DesktopReport(STATES.get(container.status, "unknown"), f"container {name} {container.status}")

    def _environment(self, pool: PoolConfig) -> dict[str, str]:
        """The pool's ``env`` from the controller's environment (values never go into a detail or a log)."""
        missing = [n for n in pool.env if n not in self._environ]
        if missing:
            raise WipeFailed(f"environment variable(s) {', '.join(missing)} not set in the controller")
        return {n: self._environ[n] for n in pool.env}

    # -- the daemon ----------------------------------------------------------------------------------------
    def _find(self, pool: PoolConfig, name: str) -> Container | None:
        try:
            return self._client(pool).containers.get(name)
        except docker.errors.NotFound:
            return None

    @staticmethod
    def _image_id(client: docker.DockerClient, pool: PoolConfig) -> str:
        try:
            image_id = client.images.get(str(pool.image)).id
        except docker.errors.ImageNotFound as exc:
            raise WipeFailed(f"image {pool.image} is not on the daemon (the driver never pulls)") from exc
        if not image_id:
            raise WipeFailed(f"image {pool.image} has no id")
        return image_id

    @staticmethod
    def _remove_volume(client: docker.DockerClient, volume: str) -> None:
        try:
            client.volumes.get(volume).remove(force=True)
        except docker.errors.NotFound:
            return
        try:
            client.volumes.get(volume)
        except docker.errors.NotFound:
            return
        raise WipeFailed(f"volume {volume} still there after removal")

    def _client(self, pool: PoolConfig) -> docker.DockerClient:
        key = (pool.uri, pool.timeout_s)
        with self._lock:
            client = self._clients.get(key)
        if client is None:
            client = self._connect(pool.uri, pool.timeout_s)  # asks the daemon its API version: may block
            with self._lock:
                self._clients[key] = client
        return client

    def _why(self, pool: PoolConfig, exc: BaseException) -> str:
        """What went wrong, naming the daemon when it could not be reached."""
        if isinstance(exc, docker.errors.APIError):
            return _short(str(exc.explanation or exc))
        if isinstance(exc, WipeFailed):
            return _short(str(exc))
        with self._lock:  # a broken connection: connect anew next time (another thread may still use it)
            for key in [k for k in self._clients if k[0] == pool.uri]:
                del self._clients[key]
        return _short(f"cannot reach the container daemon at {pool.uri}: {exc}")


def _short(text: str) -> str:
    return text[:300]
