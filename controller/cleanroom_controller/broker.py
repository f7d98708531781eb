"""Brokers: an embedded amqtt broker for evaluation, and a Mosquitto config for production packaging.

amqtt speaks MQTT 3.1.1 (all the protocol needs) but has no shared subscriptions and a known memory-growth
issue: it is for trying cleanroom out on one machine, bound to 127.0.0.1 only. Use Mosquitto otherwise.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("cleanroom.controller.broker")


class EmbeddedBroker:
    """amqtt in this process, loopback only."""

    def __init__(self, port: int) -> None:
        self.port = port
        self._broker: Any = None

    def config(self) -> dict[str, Any]:
        return {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

    async def start(self) -> None:
        from amqtt.broker import Broker

        self._broker = Broker(self.config())
        await self._broker.start()
        log.warning(
            "embedded_broker_started", bind=f"127.0.0.1:{self.port}", note="evaluation only; use Mosquitto"
        )

    async def shutdown(self) -> None:
        if self._broker is not None:
            await self._broker.shutdown()
            self._broker = None


def mosquitto_config(
    *,
    port: int = 1883,
    bind: str = "127.0.0.1",
    persistence_dir: Path | None = Path("/var/lib/mosquitto"),
    log_file: Path | None = None,
    cafile: Path | None = None,
    certfile: Path | None = None,
    keyfile: Path | None = None,
    allow_anonymous: bool = True,
) -> str:
    """A mosquitto.conf for cleanroom (persistence keeps queued QoS 1 commands across broker restarts)."""
    lines = [
        "# Written by cleanroom-controller. QoS 1 + persistent sessions carry commands across outages.",
        "per_listener_settings false",
        f"listener {port} {bind}",
        f"allow_anonymous {'true' if allow_anonymous else 'false'}",
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "message_size_limit 65536",
    ]
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 30"]
    else:
        lines.append("persistence false")
    if log_file is not None:
        lines.append(f"log_dest file {log_file}")
    if (certfile is None) != (keyfile is None):
        raise ValueError("certfile and keyfile go together")
    if certfile is not None and keyfile is not None:
        lines += [f"certfile {certfile}", f"keyfile {keyfile}"]
        if cafile is not None:
            lines += [f"cafile {cafile}", "require_certificate true", "use_identity_as_username true"]
            lines.append("use_username_as_clientid true")
    return "\n".join(lines) + "\n"


def write_mosquitto_config(path: Path, **options: Any) -> Path:
    """Write :func:`mosquitto_config` to ``path`` (0644: Mosquitto drops to its own user and must read it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(mosquitto_config(**options))
    path.chmod(0o644)
    return path
