"""How both sides reach the broker: its address (parsed once, shown without secrets) and the reconnect loop
(jittered backoff, an explicit stop flag). The MQTT client itself stays in each side's link; this module
imports none, so the wire contract stays light.

Credentials in a broker URL (``mqtts://user:pass@host``) are refused, not stripped: a URL is logged and
written into the append-only audit trail, so a secret in it would be kept forever. Clients authenticate
with certificates (TLS settings beside the URL), never with a password in the URL.

The TLS client context is built here, once for both sides (:func:`tls_context`): TLS 1.2 or newer, the
broker's certificate checked against the given CA and the URL's host against its SANs, and the client
certificate loaded from key material read safely (no symlink, owned by us, mode 0600). It is built at each
connection attempt, so a renewed certificate is used from the next reconnect on.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import ssl
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import urlsplit

from .keys import KeyFileError, read_private_file

DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


class BrokerUrlError(ValueError):
    """A broker URL that cannot be used; the message shows the URL with any credentials masked."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """A client's TLS material, as paths (read at each connection): the CA that signs the broker's
    certificate (None: the system's trust store) and the client's certificate and key (None: no client
    certificate; a broker with ``require_certificate`` then refuses the connection)."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool
    tls_files: TlsFiles = TlsFiles()  # used only with ``tls`` (an ``mqtts://`` URL)

    def with_tls(self, files: TlsFiles) -> BrokerAddress:
        return replace(self, tls_files=files)

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


class TlsSettingsError(ValueError):
    """TLS files that cannot be used (names the file and why); raised when the context is built."""


MAX_CERT_FILE_BYTES = 1024 * 1024


def tls_context(ca: Path | None, cert: Path | None, key: Path | None) -> ssl.SSLContext:
    """A TLS client context: TLS 1.2 minimum, the server's certificate verified against ``ca`` (or the
    system's trust store) and its name checked against the host the client connects to; with ``cert`` and
    ``key``, a client certificate. The key is read with :func:`~.keys.read_private_file` (no symlink, owned
    by this user, mode 0600) and handed to OpenSSL through an anonymous in-memory file, so what OpenSSL
    loads is exactly what was checked."""
    if (cert is None) != (key is None):
        raise TlsSettingsError("tls_cert and tls_key go together: give both or neither")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # check_hostname and CERT_REQUIRED are its defaults
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca is None:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        try:
            ctx.load_verify_locations(cadata=_read_cert_file(ca, "CA certificate").decode("ascii", "replace"))
        except ssl.SSLError as exc:
            raise TlsSettingsError(f"{ca}: not a usable PEM CA certificate ({exc.reason})") from None
    if cert is not None and key is not None:
        chain = _read_cert_file(cert, "client certificate")
        try:
            secret = read_private_file(key, "TLS client key")
        except FileNotFoundError:
            raise TlsSettingsError(f"{key}: TLS client key: no such file") from None
        except KeyFileError as exc:
            raise TlsSettingsError(str(exc)) from None
        with _memory_file(chain, "cert") as cert_path, _memory_file(secret, "key") as key_path:
            try:
                ctx.load_cert_chain(cert_path, key_path)
            except ssl.SSLError as exc:
                raise TlsSettingsError(
                    f"{cert} / {key}: not a usable certificate and matching key ({exc.reason})"
                ) from None
    return ctx


def tls_settings_problem(broker_url: str, files: TlsFiles) -> str | None:
    """What is wrong with TLS files given beside ``broker_url`` (settings of agent and controller alike):
    files with a plain ``mqtt://`` URL, or a certificate without its key. None when they fit."""
    given = [
        name
        for name, path in (("tls_ca", files.ca), ("tls_cert", files.cert), ("tls_key", files.key))
        if path
    ]
    if given and not parse_broker_url(broker_url).tls:
        return f"{', '.join(given)} given but broker {broker_url} is plain mqtt://: use mqtts://"
    if (files.cert is None) != (files.key is None):
        return "tls_cert and tls_key go together: give both or neither"
    return None


def client_tls_context(address: BrokerAddress) -> ssl.SSLContext | None:
    """The TLS context for ``address``, or None for a plain ``mqtt://`` broker."""
    if not address.tls:
        return None
    files = address.tls_files
    return tls_context(files.ca, files.cert, files.key)


def _read_cert_file(path: Path, what: str) -> bytes:
    try:
        with path.open("rb") as f:
            data = f.read(MAX_CERT_FILE_BYTES + 1)
    except OSError as exc:
        raise TlsSettingsError(f"{path}: cannot read {what}: {exc.strerror}") from None
    if len(data) > MAX_CERT_FILE_BYTES:
        raise TlsSettingsError(f"{path}: {what} is larger than {MAX_CERT_FILE_BYTES} bytes")
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise TlsSettingsError(f"{path}: {what} is not a PEM certificate")
    return data


@contextlib.contextmanager
def _memory_file(data: bytes, name: str) -> Iterator[str]:
    """A path OpenSSL can open that holds ``data`` in memory only (a memfd), closed afterwards."""
    fd = os.memfd_create(f"cleanroom-tls-{name}", os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


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
