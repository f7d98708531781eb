"""``cleanroom-agent``: run, enroll, identity, check, launch, usb devices."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import structlog
import typer

from cleanroom_protocol import KeyFileError, Mode, load_or_create_private_key, load_public_key
from cleanroom_protocol import public_key_pem as pem_of

from .messaging.spool import Spool
from .sessions.localsock import AgentUnreachable, LocalSocketClient
from .settings import DEFAULT_SOCKET, AgentSettings, SettingsError, load_settings

# daemon (and with it the enforcers, X11, MQTT) is imported by the commands that need it: `launch` sits in
# front of every VDI client start and should not pay for it.

app = typer.Typer(add_completion=False, no_args_is_help=True, help="cleanroom endpoint agent")

EXIT_USAGE = 2
EXIT_UNAVAILABLE = 69  # no agent answers on the socket
EXIT_SOFTWARE = 70
EXIT_DENIED = 77  # the launch gate said no (EX_NOPERM)

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file")]
DataDirOpt = Annotated[Path | None, typer.Option("--data-dir", help="agent.key and agent.db live here")]


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    typer.echo(f"cleanroom-agent: error: {message}", err=True)
    raise typer.Exit(code)


def configure_logging(level: str) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )


def settings_or_fail(config: Path | None, **flags: Any) -> AgentSettings:
    try:
        return load_settings(config, **flags)
    except SettingsError as exc:
        fail(str(exc))


@app.command()
def run(
    config: ConfigOpt = None,
    broker: Annotated[str | None, typer.Option(help="mqtt://host:port or mqtts://host:port")] = None,
    data_dir: DataDirOpt = None,
    agent_id: Annotated[str | None, typer.Option("--id", help="agent id (default: hostname)")] = None,
    mode: Annotated[Mode | None, typer.Option(help="enforce or audit")] = None,
    controller_key: Annotated[Path | None, typer.Option(help="controller public key (PEM)")] = None,
    controller_id: Annotated[str | None, typer.Option(help="sender id of the controller")] = None,
    policy: Annotated[
        Path | None, typer.Option(help="bootstrap policy used until a signed one arrives")
    ] = None,
    socket: Annotated[
        Path | None, typer.Option(help=f"local launch socket (default {DEFAULT_SOCKET})")
    ] = None,
    keepalive: Annotated[int | None, typer.Option(help="MQTT keepalive in seconds (default 10)")] = None,
    poll_interval: Annotated[
        float | None, typer.Option(help="posture probe interval in s (default 1)")
    ] = None,
    log_level: Annotated[str | None, typer.Option(help="debug, info, warning, error")] = None,
    enforcers: Annotated[
        str | None,
        typer.Option(
            help="comma-separated enforcers to run (default all: clipboard,capture,usb,media; '' none)"
        ),
    ] = None,
    sysfs_root: Annotated[Path | None, typer.Option(help="where sysfs is mounted (default /sys)")] = None,
    exec_backend: Annotated[
        str | None, typer.Option(help="fanotify (blocks, default) or procconn (kills after the fact)")
    ] = None,
    tls_ca: Annotated[Path | None, typer.Option(help="mqtts://: CA of the broker's certificate")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="mqtts://: this device's certificate")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="mqtts://: this device's TLS key (0600)")] = None,
) -> None:
    """Run the agent: report posture, track and end sessions, serve the launch gate."""
    from cleanroom_protocol import TlsSettingsError, client_tls_context

    from .daemon import Agent, StartupError

    settings = settings_or_fail(
        config,
        broker=broker,
        data_dir=data_dir,
        id=agent_id,
        mode=mode,
        controller_key=controller_key,
        controller_id=controller_id,
        policy=policy,
        socket=socket,
        keepalive=keepalive,
        poll_interval=poll_interval,
        log_level=log_level,
        enforcers=enforcers,
        sysfs_root=sysfs_root,
        exec_backend=exec_backend,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    configure_logging(settings.log_level)
    try:
        client_tls_context(settings.broker_address)  # unusable TLS files: say so now, not at each reconnect
    except TlsSettingsError as exc:
        fail(str(exc))
    if settings.controller_key is None:
        fail(
            "--controller-key FILE is required: the controller's public key "
            "(cleanroom-controller identity > controller.pub)"
        )
    try:
        ctl_key = load_public_key(settings.controller_key)
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        key, _ = load_or_create_private_key(settings.key_path)
        spool = Spool(settings.db_path, max_rows=settings.spool_max_rows)
    except KeyFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{settings.data_dir}: {exc.strerror or exc}")
    try:
        agent = Agent(settings, key=key, controller_key=ctl_key, spool=spool)
        asyncio.run(agent.run())
    except StartupError as exc:
        fail(str(exc))
    finally:
        spool.close()


def read_token(token: str | None, token_file: Path | None) -> str:
    """The enrolment token from a file, stdin (``-``) or the environment; from argv only with a warning
    (every local user can read a process's arguments)."""
    if token_file is not None:
        try:
            return token_file.read_text().strip()
        except OSError as exc:
            fail(f"{token_file}: cannot read the token: {exc.strerror or exc}")
    if token == "-":  # noqa: S105 - the stdin marker, not a password
        return sys.stdin.readline().strip()
    if token is not None:
        typer.echo(
            "cleanroom-agent: warning: a token on the command line is visible to every local user while this "
            "runs; prefer --token-file FILE or --token - (stdin)",
            err=True,
        )
        return token.strip()
    if env := os.environ.get("CLEANROOM_ENROLL_TOKEN"):
        return env.strip()
    fail("no token: give --token-file FILE, --token - (stdin) or CLEANROOM_ENROLL_TOKEN")


@app.command()
def enroll(
    controller: Annotated[str, typer.Option("--controller", help="the controller's https://host[:8443]")],
    token: Annotated[
        str | None, typer.Option("--token", help="the enrolment token; '-' reads it from stdin")
    ] = None,
    token_file: Annotated[Path | None, typer.Option("--token-file", help="read the token from FILE")] = None,
    agent_id: Annotated[str | None, typer.Option("--id", help="agent id (default: hostname)")] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Enrol this endpoint once with a token from `cleanroom-controller enroll create`: creates its keys,
    gets its certificate, the CA and the controller's key, and writes them (0600) into the data directory."""
    from .trust.enroll import EnrolmentError
    from .trust.enroll import enroll as enroll_device

    settings = settings_or_fail(config, data_dir=data_dir, id=agent_id)
    secret = read_token(token, token_file)
    try:
        done = enroll_device(controller, secret, settings.id, settings.data_dir, settings.key_path)
    except (EnrolmentError, KeyFileError) as exc:
        fail(str(exc), EXIT_SOFTWARE)
    from datetime import UTC, datetime

    until = datetime.fromtimestamp(done.certificate_not_after, UTC).strftime("%Y-%m-%d %H:%M UTC")
    typer.echo(
        f"enrolled {done.agent_id} with controller {done.controller_id}; certificate valid until {until}"
    )
    for path in done.files:
        typer.echo(f"  wrote {path}")
    if done.broker_url:
        typer.echo(f"broker: {done.broker_url} (cleanroom-agent run uses it and these files by default)")


@app.command()
def identity(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print this agent's public key (PEM); creates the key (mode 0600) on first use."""
    settings = settings_or_fail(config, data_dir=data_dir)
    try:
        key, created = load_or_create_private_key(settings.key_path)
    except KeyFileError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{settings.key_path}: {exc.strerror or exc}")
    if created:
        typer.echo(f"created {settings.key_path}", err=True)
    typer.echo(pem_of(key), nl=False)


@app.command()
def check(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the posture as one JSON object")] = False,
    policy: Annotated[Path | None, typer.Option(help="judge against this policy file")] = None,
    mode: Annotated[Mode | None, typer.Option(help="enforce or audit")] = None,
    agent_id: Annotated[str | None, typer.Option("--id")] = None,
    controller_key: Annotated[Path | None, typer.Option(help="verify the persisted signed policy")] = None,
) -> None:
    """Print this endpoint's posture once and exit."""
    from .daemon import StartupError, initial_policy, snapshot_posture
    from .enforcers import build_configured_enforcers

    settings = settings_or_fail(
        config, data_dir=data_dir, policy=policy, mode=mode, id=agent_id, controller_key=controller_key
    )
    try:
        ctl_key = load_public_key(settings.controller_key) if settings.controller_key else None
    except KeyFileError as exc:
        fail(str(exc))
    spool = Spool(settings.db_path) if settings.db_path.exists() and policy is None else None
    try:
        in_force = initial_policy(settings, spool, ctl_key)
    except StartupError as exc:
        fail(str(exc))
    finally:
        if spool is not None:
            spool.close()
    posture, reasons = snapshot_posture(
        settings, in_force, build_configured_enforcers(lambda _event: None, settings.enforcers)
    )
    if as_json:
        typer.echo(json.dumps(posture.model_dump(mode="json"), sort_keys=True))
        return
    ref = posture.policy
    lines = [
        f"agent      {posture.agent_id} {posture.agent_version} ({posture.mode.value} mode)",
        f"policy     {f'{ref.id}@{ref.version} ({in_force.source.value})' if ref else 'none'}",
        f"host       {posture.hostname}: {posture.os}, kernel {posture.kernel}, display {posture.display_server}",
        f"users      {', '.join(posture.users) or '-'}",
        "mounts     "
        + (
            "; ".join(
                f"{m.mountpoint} ({m.fstype}{', removable' if m.removable else ''}{', rw' if m.writable else ''})"
                for m in posture.mounts
            )
            or "-"
        ),
        "denied     " + (", ".join(f"{p.name}[{p.pid}]" for p in posture.denied_processes) or "-"),
        "sessions   " + (", ".join(f"{s.id} {s.client} user={s.user}" for s in posture.sessions) or "-"),
        "enforcers  " + (", ".join(f"{e.name}={e.state.value}" for e in posture.enforcers) or "-"),
        "compliant  " + ("yes" if not reasons else "no: " + ", ".join(reasons)),
    ]
    typer.echo("\n".join(lines))


@app.command(context_settings={"ignore_unknown_options": True})
def launch(
    command: Annotated[list[str], typer.Argument(help="the VDI client and its arguments (after --)")],
    socket: Annotated[
        Path | None, typer.Option(help=f"agent socket (default $CLEANROOM_SOCKET or {DEFAULT_SOCKET})")
    ] = None,
) -> None:
    """Start a VDI client only if the agent says this endpoint is compliant now; exit with its exit code.

    One step: the agent judges and registers this very process as the session, then this process execs
    the client (same pid), so the agent tracks the session before the client runs."""
    path = socket or Path(os.environ.get("CLEANROOM_SOCKET") or DEFAULT_SOCKET)
    name = os.path.basename(command[0])
    try:
        # The agent gets the client's name only: argv may carry secrets (FreeRDP's /p:password).
        answer = LocalSocketClient(path).request({"op": "launch", "client": name})
    except AgentUnreachable as exc:
        fail(f"{exc}; is cleanroom-agent running?", EXIT_UNAVAILABLE)
    if not answer.get("ok"):
        fail(f"agent refused the request: {answer.get('error', 'no reason given')}", EXIT_SOFTWARE)
    reasons = [str(r) for r in answer.get("reasons", [])]
    if not answer.get("allowed"):
        typer.echo(f"cleanroom-agent: launch of {name} denied:", err=True)
        for reason in reasons:
            typer.echo(f"  - {reason}", err=True)
        raise typer.Exit(EXIT_DENIED)
    if reasons:
        typer.echo(f"cleanroom-agent: audit mode, would deny: {', '.join(reasons)}", err=True)
    extra = [str(a) for a in answer.get("client_args", []) if isinstance(a, str)]
    if extra:  # e.g. FreeRDP's -clipboard: the client's own redirection off, under the agent's X11 guard
        command = [command[0], *extra, *command[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        # The client's exit code is this process's from here on.
        os.execvp(command[0], command)  # noqa: S606 - the user's own command, as they typed it
    except OSError as exc:
        fail(
            f"cannot start {command[0]}: {exc.strerror or exc}",
            127 if isinstance(exc, FileNotFoundError) else 126,
        )


usb_app = typer.Typer(no_args_is_help=True, help="USB devices as the agent's USB rules see them")
app.add_typer(usb_app, name="usb")


@usb_app.command("devices")
def usb_devices(
    rules: Annotated[
        bool, typer.Option("--rules", help="print allow rules, as `usbguard generate-policy` writes them")
    ] = False,
    with_ports: Annotated[
        bool,
        typer.Option("--with-ports", help="with --rules: via-port for every device, not only serial-less"),
    ] = False,
    no_hashes: Annotated[bool, typer.Option("--no-hashes", help="with --rules: no hash/parent-hash")] = False,
    sysfs_root: Annotated[Path, typer.Option(help="where sysfs is mounted")] = Path("/sys"),
) -> None:
    """List present USB devices as USBGuard rule lines.

    --rules: allow rules as `usbguard generate-policy` writes them, a start for the site's allow-list.

    Without: each device's port and state (allow = authorized, block = not)."""
    from cleanroom_protocol.usbrules import Target, device_rule

    from .enforcers.sysfs import SysfsError, UsbSysfs

    sysfs = UsbSysfs(sysfs_root)
    if not sysfs.available():
        fail(f"no USB bus: {sysfs.devices_dir} missing", EXIT_SOFTWARE)
    skipped = 0
    for name in sysfs.all_devices():
        try:
            device = sysfs.read_device(name)
        except SysfsError as exc:
            typer.echo(f"cleanroom-agent: skipped {name}: {exc}", err=True)
            skipped += 1
            continue
        if rules:  # generate-policy: via-port only for devices without a serial number unless asked
            typer.echo(
                device_rule(device, with_port=with_ports or not device.serial, with_hash=not no_hashes)
            )
        else:
            target = Target.ALLOW if sysfs.authorized(name) == "1" else Target.BLOCK
            typer.echo(f"{name}: {device_rule(device, target=target, with_port=True)}")
    if skipped:
        raise typer.Exit(EXIT_SOFTWARE)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
