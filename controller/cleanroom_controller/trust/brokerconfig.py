"""``broker-config``: a Mosquitto 2 configuration that admits only certificates from the controller's CA.

What it enforces, and why:
- TLS 1.2 or newer, a client certificate from our CA (``require_certificate``), checked against the CRL.
- The certificate's CN is the MQTT username (``use_identity_as_username``) and the client id
  (``use_username_as_clientid``): a device cannot take another's client id, so it can neither kick the
  real device off nor receive the commands queued for it.
- The ACL: each agent publishes only under ``cleanroom/v1/agents/<its CN>/`` and reads only its own
  commands and the policy; the controllers (their CNs, from the PKI's index) read every agent topic,
  shared subscriptions included, and write the commands and the policy. Mosquitto drops an ACL-denied
  publish silently, so the controller's signature and sender checks stand on their own as well.

Rendering is pure (:func:`render_conf`, :func:`render_acl`); :func:`write_broker_config` writes the files,
:func:`write_crl` refreshes the broker's CRL copy and :func:`reload_broker` sends SIGHUP, after which
Mosquitto reads the CRL and the ACL again (for new connections only: see the revocation notes).
"""

from __future__ import annotations

import ipaddress
import os
import pwd
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cleanroom_protocol import MAX_MESSAGE_BYTES, PREFIX, Channel
from cleanroom_protocol.topics import AGENT_TO_CONTROLLER

from .pki import Pki
from .pkifiles import write_whole

DEFAULT_LISTEN = "0.0.0.0:8883"
DEFAULT_BROKER_USER = "mosquitto"  # Debian's Mosquitto started as root drops to this user
MAX_PID_FILE_BYTES = 64
PACKET_OVERHEAD = 1024  # MQTT fixed + variable header and the topic, above the payload limit


class BrokerConfigError(Exception):
    """A broker configuration that cannot be written or a broker that cannot be reloaded (says why)."""


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> Listen:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6); HOST is an address Mosquitto binds to."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise BrokerConfigError(f"--listen {text!r}: expected HOST:PORT, e.g. {DEFAULT_LISTEN}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise BrokerConfigError(f"--listen {text!r}: {host!r} is not an IP address") from None
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise BrokerConfigError(f"--listen {text!r}: port must be 1-65535")
    return Listen(host, int(port_text))


@dataclass(frozen=True, slots=True)
class BrokerFiles:
    """What ``broker-config --out DIR`` writes, and where."""

    out: Path

    @property
    def conf(self) -> Path:
        return self.out / "mosquitto.conf"

    @property
    def acl(self) -> Path:
        return self.out / "acl"

    @property
    def ca(self) -> Path:
        return self.out / "ca.crt"

    @property
    def cert(self) -> Path:
        return self.out / "server.crt"

    @property
    def key(self) -> Path:
        return self.out / "server.key"

    @property
    def crl(self) -> Path:
        return self.out / "crl.pem"

    @property
    def run(self) -> Path:
        return self.out / "run"

    @property
    def pid(self) -> Path:
        # Mosquitto writes it after dropping to its user: in a directory of that user's.
        return self.run / "mosquitto.pid"

    @property
    def data(self) -> Path:
        return self.out / "data"


def render_conf(files: BrokerFiles, listen: Listen, *, user: str) -> str:
    lines = [
        "# Written by `cleanroom-controller broker-config`; re-run it rather than editing this file.",
        "# Reload (CRL, ACL) with: kill -HUP $(cat " + str(files.pid) + ")",
        f"user {user}",
        f"pid_file {files.pid}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"acl_file {files.acl}",
        "",
        "# Persistence: QoS 1 commands and queued agent messages survive a broker restart.",
        "persistence true",
        f"persistence_location {files.data}/",
        "autosave_interval 30",
        "",
        "# Bounds: a message is at most 64 KiB (the protocol's limit) plus its topic and header; a dead",
        "# client cannot fill memory.",
        f"max_packet_size {MAX_MESSAGE_BYTES + PACKET_OVERHEAD}",
        "max_inflight_messages 100",
        "max_queued_messages 100000",
        "",
        "# Small messages go out at once: without it a command on an idle connection waits ~40 ms (Nagle",
        "# and delayed ACK) before the agent sees it.",
        "set_tcp_nodelay true",
        "",
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "connection_messages true",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "",
        f"listener {listen.port} {listen.host}",
        "protocol mqtt",
        "tls_version tlsv1.2",  # the minimum in Mosquitto 2.0: 1.3 is negotiated when both sides have it
        f"cafile {files.ca}",
        f"certfile {files.cert}",
        f"keyfile {files.key}",
        f"crlfile {files.crl}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ]
    return "\n".join(lines) + "\n"


def render_acl(controllers: Sequence[str]) -> str:
    """The ACL: ``user`` blocks for the controllers, ``pattern`` lines (``%u`` = the certificate CN) for
    every client. Pattern lines apply to the controllers too; they only add their own agent subtree."""
    lines = [
        "# Written by `cleanroom-controller broker-config`. The username is the client certificate's CN.",
        "",
    ]
    for name in controllers:
        lines.append(
            f"# controller {name}: reads every agent topic (plain and $share), writes commands, watermarks"
            " and the policy"
        )
        lines.append(f"user {name}")
        for channel in AGENT_TO_CONTROLLER:
            lines.append(f"topic read {PREFIX}/agents/+/{channel.value}")
            lines.append(f"topic read $share/+/{PREFIX}/agents/+/{channel.value}")
        lines.append(f"topic write {PREFIX}/agents/+/{Channel.COMMANDS.value}")
        lines.append(f"topic write {PREFIX}/agents/+/{Channel.WATERMARK.value}")
        lines.append(f"topic write {PREFIX}/policy")
        lines.append("")
    lines.append("# every client (an agent: CN = its id) speaks only for itself")
    for channel in AGENT_TO_CONTROLLER:
        lines.append(f"pattern write {PREFIX}/agents/%u/{channel.value}")
    lines.append("pattern read " + f"{PREFIX}/agents/%u/{Channel.COMMANDS.value}")
    lines.append("pattern read " + f"{PREFIX}/agents/%u/{Channel.WATERMARK.value}")
    lines.append(f"pattern read {PREFIX}/policy")
    return "\n".join(lines) + "\n"


def write_broker_config(
    out_dir: Path, pki: Pki, *, listen: Listen, user: str = DEFAULT_BROKER_USER
) -> BrokerFiles:
    """Write the configuration, the ACL and the broker's copies of the CA, its certificate and key and
    the CRL into ``out_dir``. Run as root, the files Mosquitto reads after dropping to ``user`` are made
    readable by that user's group (the key 0640) and the persistence directory is given to it."""
    out_dir = out_dir.absolute()  # Mosquitto resolves relative paths against its own working directory
    files = BrokerFiles(out_dir)
    owner = _owner(user)
    out_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if owner is None:
        os.chmod(out_dir, 0o700)
    else:  # the broker's user reaches the files through its group; nobody else does
        os.chown(out_dir, 0, owner[1])
        os.chmod(out_dir, 0o750)  # noqa: S103 - group = the broker user, which must read the files
    server_key = pki.files.read_private(pki.server_key_path, "broker key")
    write_whole(files.conf, render_conf(files, listen, user=user).encode(), 0o644)
    write_whole(files.acl, render_acl(pki.controllers()).encode(), 0o644)
    write_whole(files.ca, pki.ca_pem, 0o644)
    write_whole(files.cert, pki.files.read_public(pki.server_cert_path, "broker certificate"), 0o644)
    _write_readable(files.key, server_key, owner, secret=True)
    write_crl(out_dir, pki)
    for directory in (files.data, files.run):  # written by the broker after it dropped privileges
        directory.mkdir(mode=0o700, exist_ok=True)
        if owner is not None:
            os.chown(directory, owner[0], owner[1])
    return files


def write_crl(out_dir: Path, pki: Pki) -> Path:
    """Refresh the broker's CRL copy from the PKI (whole file, readable by the broker's user). Mosquitto
    reads it at start and on SIGHUP: follow with :func:`reload_broker`."""
    files = BrokerFiles(out_dir)
    if not files.conf.exists():
        raise BrokerConfigError(
            f"{out_dir}: no broker configuration here (run broker-config --out {out_dir})"
        )
    owner = _owner(_configured_user(files))
    _write_readable(files.crl, pki.crl_pem(), owner, secret=False)
    return files.crl


def reload_broker(out_dir: Path) -> int:
    """SIGHUP to the Mosquitto whose pid is in ``out_dir``'s pid file: it re-reads the CRL and the ACL.
    Checks first that the pid is a running mosquitto (a stale pid file must not make us hang up some
    other process). Returns the pid signalled."""
    files = BrokerFiles(out_dir)
    try:
        raw = files.pid.read_bytes()[: MAX_PID_FILE_BYTES + 1]
    except FileNotFoundError:
        raise BrokerConfigError(
            f"{files.pid}: no pid file (is Mosquitto running from {files.conf}?)"
        ) from None
    except OSError as exc:
        raise BrokerConfigError(f"{files.pid}: cannot read: {exc.strerror}") from None
    text = raw.decode("ascii", "replace").strip()
    if len(raw) > MAX_PID_FILE_BYTES or not text.isdigit() or int(text) <= 1:
        raise BrokerConfigError(f"{files.pid}: does not hold a process id")
    pid = int(text)
    try:
        comm = Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        raise BrokerConfigError(f"{files.pid}: process {pid} is not running (stale pid file)") from None
    if comm != "mosquitto":
        raise BrokerConfigError(f"{files.pid}: process {pid} is {comm!r}, not mosquitto; not signalled")
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise BrokerConfigError(f"{files.pid}: process {pid} exited") from None
    except PermissionError:
        raise BrokerConfigError(
            f"not allowed to signal mosquitto (pid {pid}); run as root or its user, "
            "or reload it another way (systemctl reload mosquitto)"
        ) from None
    return pid


def _owner(user: str) -> tuple[int, int] | None:
    """(uid, gid) the broker's files must be readable by, or None when that is us (no root, or root)."""
    if os.geteuid() != 0 or user == "root":
        return None
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise BrokerConfigError(
            f"user {user!r} does not exist: Mosquitto started as root drops to it (--user NAME)"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _configured_user(files: BrokerFiles) -> str:
    for line in files.conf.read_text().splitlines():
        if line.startswith("user "):
            return line.split(None, 1)[1].strip()
    return DEFAULT_BROKER_USER


def _write_readable(path: Path, data: bytes, owner: tuple[int, int] | None, *, secret: bool) -> None:
    """Whole-file write; a secret is 0600 (ours) or, for the broker's user, 0640 root:its-group."""
    if owner is None:
        write_whole(path, data, 0o600 if secret else 0o644)
        return
    write_whole(path, data, 0o640 if secret else 0o644)
    os.chown(path, 0, owner[1])


def describe(files: BrokerFiles, listen: Listen, pki: Pki) -> list[str]:
    """What was written, for the operator (no secret in it)."""
    return [
        f"wrote {files.conf} (listener {listen}, TLS 1.2+, client certificates required)",
        f"wrote {files.acl} (controllers: {', '.join(pki.controllers()) or 'none'})",
        f"wrote {files.ca}, {files.cert}, {files.key}, {files.crl}",
        f"start:  mosquitto -c {files.conf}",
        f"reload: kill -HUP $(cat {files.pid})   (re-reads the CRL and the ACL)",
        f"CA fingerprint {pki.ca_fingerprint}",
    ]
