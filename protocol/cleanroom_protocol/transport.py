"""How both sides reach the broker: its address (parsed once, shown without secrets) and the reconnect loop
(jittered backoff, an explicit stop flag). The MQTT client itself stays in each side's link; this module
imports none, so the wire contract stays light.

Credentials in a broker URL (``mqtts://user:pass@host``) are refused, not stripped: a URL is logged and
written into the append-only audit trail, so a secret in it would be kept forever. Clients authenticate
with certificates (TLS settings beside the URL), never with a password in the URL.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message shows the URL with any credentials masked."""


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @property
    def url(self) -> str:
        """``mqtt[s]://host:port``: safe to log and audit (it never holds credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'mqtts' if self.tls else 'mqtt'}://{host}:{self.port}"

    def __str__(self) -> str:
        return self.url


def redact_url(url: str) -> str:
    """``url`` with the user-info part (``user:pass@``) masked, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" in authority:
        authority = "***@" + authority.rpartition("@")[2]
    return f"{scheme}{sep}{authority}{slash}{tail}"


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://host:port`` or ``mqtts://host:port`` (ports default to 1883 / 8883); anything else raises
    :class:`BrokerUrlError` naming the (redacted) URL and what is wrong."""
    shown = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise BrokerUrlError(f"broker URL {shown!r}: {str(exc).replace(url, shown)}") from None
    if parts.scheme not in DEFAULT_PORTS:
        raise BrokerUrlError(f"broker URL {shown!r}: scheme must be mqtt:// or mqtts://")
    if parts.username is not None or parts.password is not None:
        raise BrokerUrlError(
            f"broker URL {shown!r}: credentials in the URL are refused (a URL is logged and audited); "
            "authenticate with a client certificate"
        )
    if not parts.hostname:
        raise BrokerUrlError(f"broker URL {shown!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BrokerUrlError(f"broker URL {shown!r}: only mqtt[s]://host:port is supported")
    return BrokerAddress(parts.hostname, port or DEFAULT_PORTS[parts.scheme], parts.scheme == "mqtts")


def backoff_delay(attempt: int) -> float:
    """Jittered exponential backoff, the house formula: uniform(0, 1.5 ** min(10, attempt)) seconds."""
    return random.uniform(0, 1.5 ** min(10, attempt))  # noqa: S311 - jitter, not a secret


LostHook = Callable[[Exception | None, int, float], None]
"""Called after a session ended, before the backoff: (the error or None, attempt number, delay in s)."""


class Reconnector:
    """Runs a broker session again whenever it ends (lost or never opened), after a jittered backoff, until
    :meth:`request_stop`.

    The stop is an explicit flag: a cancellation inside aiomqtt's client context can surface as an
    ``MqttError``, and on Python 3.11 ``task.cancelling()`` stays raised after a TaskGroup child failed, so
    neither tells a stop from a disconnect. The session calls :meth:`connected` once it is up, which resets
    the backoff.
    """

    def __init__(self, backoff: Callable[[int], float] = backoff_delay) -> None:
        self._backoff = backoff
        self.stopping = False
        self.attempt = 0

    def request_stop(self) -> None:
        """From now on, a session that ends ends :meth:`run` instead of starting another."""
        self.stopping = True

    def connected(self) -> None:
        self.attempt = 0

    async def run(self, session: Callable[[], Awaitable[None]], on_lost: LostHook) -> None:
        while not self.stopping:
            error: Exception | None = None
            try:
                await session()
            except (
                Exception
            ) as exc:  # MqttError, OSError, TLS errors, an ExceptionGroup of the session's tasks
                error = exc
            if self.stopping:
                return
            self.attempt += 1
            delay = self._backoff(self.attempt)
            on_lost(error, self.attempt, delay)
            await asyncio.sleep(delay)
