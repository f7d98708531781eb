"""``cleanroom-controller``: run the daemon, enrol agents, list state, verify the audit chain, watch live."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import sys
import time
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

# Only what every command needs is imported here: the list and verify commands stay quick to start. The
# protocol (pydantic models), structlog and the daemon are imported by the commands that use them.
from .audit import verify_chain
from .settings import ControllerSettings, SettingsError, load_settings
from .store import DB_NAME, AgentExistsError, Store
from .views import agent_rows, event_rows, session_rows, unenrolled_rejects

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
agents_app = typer.Typer(no_args_is_help=True, help="Enrolled agents and their endpoints.")
sessions_app = typer.Typer(no_args_is_help=True, help="VDI sessions seen on endpoints.")
events_app = typer.Typer(no_args_is_help=True, help="Events reported by agents.")
audit_app = typer.Typer(no_args_is_help=True, help="The hash-chained audit trail.")
app.add_typer(agents_app, name="agents")
app.add_typer(sessions_app, name="sessions")
app.add_typer(events_app, name="events")
app.add_typer(audit_app, name="audit")

ConfigOpt = Annotated[Path | None, typer.Option("--config", help="TOML settings file.")]
DataDirOpt = Annotated[
    Path | None, typer.Option("--data-dir", help="Data directory (default /var/lib/cleanroom-controller).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON object per line.")]

err = Console(stderr=True)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


def _settings(config: Path | None, **flags: Any) -> ControllerSettings:
    try:
        return load_settings(config, **flags)
    except SettingsError as exc:
        fail(str(exc))


def _open_store(data_dir: Path, *, create: bool = False) -> Store:
    if not create and not (data_dir / DB_NAME).exists():
        fail(
            f"no controller database at {data_dir / DB_NAME} (wrong --data-dir, or the controller never ran)"
        )
    try:
        return Store.open(data_dir)
    except OSError as exc:
        fail(f"cannot open {data_dir / DB_NAME}: {exc}")


def _print_rows(rows: list[dict[str, Any]], as_json: bool, title: str, columns: list[str]) -> None:
    if as_json:
        for row in rows:
            sys.stdout.write(json.dumps(row, sort_keys=True) + "\n")
        return
    from .watch import table

    Console().print(table(title, columns, rows))


@app.command()
def run(
    config: ConfigOpt = None,
    broker: Annotated[
        str | None, typer.Option("--broker", help="mqtt://host:port or mqtts://host:port")
    ] = None,
    data_dir: DataDirOpt = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="Policy TOML (watched for changes).")
    ] = None,
    embedded_broker: Annotated[
        bool | None,
        typer.Option(
            "--embedded-broker/--no-embedded-broker", help="Start amqtt on 127.0.0.1 (evaluation only)."
        ),
    ] = None,
    share_group: Annotated[str | None, typer.Option("--share-group", help="$share group for ingest.")] = None,
    client_id: Annotated[
        str | None,
        typer.Option("--client-id", help="MQTT client id, unique per process (stable: persistent session)."),
    ] = None,
    id: Annotated[
        str | None, typer.Option("--id", help="Controller id (signer of commands, policy).")
    ] = None,
    command_timeout: Annotated[
        float | None, typer.Option("--command-timeout", help="First ack wait, s.")
    ] = None,
    log_level: Annotated[str | None, typer.Option("--log-level", help="debug, info, warning, error")] = None,
) -> None:
    """Run the controller daemon until SIGTERM/SIGINT."""
    from cleanroom_protocol import KeyFileError

    from .daemon import Controller
    from .logs import configure_logging
    from .policy_keeper import NoPolicyError

    settings = _settings(
        config,
        broker=broker,
        data_dir=data_dir,
        policy=policy,
        embedded_broker=embedded_broker,
        share_group=share_group,
        client_id=client_id,
        id=id,
        command_timeout=command_timeout,
        log_level=log_level,
    )
    configure_logging(settings.log_level)
    try:
        controller = Controller(settings)
        asyncio.run(controller.run())
    except (NoPolicyError, KeyFileError, SettingsError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot start: {exc}")
    except KeyboardInterrupt:
        pass


@app.command()
def identity(config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Print the controller public key (PEM); creates controller.key (0600) on first use."""
    from cleanroom_protocol import KeyFileError, fingerprint, load_or_create_private_key, public_key_pem

    settings = _settings(config, data_dir=data_dir)
    try:
        key, created = load_or_create_private_key(settings.data_dir / "controller.key")
    except (KeyFileError, OSError) as exc:
        fail(str(exc))
    if created:
        err.print(f"created {settings.data_dir / 'controller.key'} ({fingerprint(key)})")
    sys.stdout.write(public_key_pem(key))


@agents_app.command("add")
def agents_add(
    agent_id: Annotated[str, typer.Argument(metavar="ID", help="The agent id (its MQTT topic level).")],
    public_key: Annotated[Path, typer.Option("--public-key", help="The agent's PEM public key file.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Enrol an agent with its public key (``cleanroom-agent identity`` prints it)."""
    from cleanroom_protocol import (
        KeyFileError,
        fingerprint,
        is_valid_agent_id,
        load_public_key,
        public_key_pem,
    )

    if not is_valid_agent_id(agent_id):
        fail(f"invalid agent id {agent_id!r}: letters, digits, '.', '_', '-'; at most 64; no '/', '+', '#'")
    try:
        key = load_public_key(public_key)
    except KeyFileError as exc:
        fail(str(exc))
    settings = _settings(config, data_dir=data_dir)
    store = _open_store(settings.data_dir, create=True)
    fp = fingerprint(key)
    try:
        added = store.add_agent(agent_id, public_key_pem(key), fp, time.time())
    except AgentExistsError as exc:
        fail(str(exc))
    operator = os.environ.get("SUDO_USER") or getpass.getuser()
    if added:
        store.append_audit("operator.agents_add", f"operator:{operator}", agent_id, {"fingerprint": fp})
        err.print(f"enrolled {agent_id} ({fp})")
    else:
        err.print(f"{agent_id} is already enrolled with this key ({fp})")
    store.close()


@agents_app.command("list")
def agents_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Enrolled agents: online, compliant, reasons, last seen, rejects."""
    store = _open_store(_settings(config, data_dir=data_dir).data_dir)
    _print_rows(
        agent_rows(store),
        as_json,
        "agents",
        ["id", "online", "compliant", "condition", "reasons", "last_seen", "sessions", "rejects"],
    )
    others = unenrolled_rejects(store)
    if others and not as_json:
        print(f"rejected from unenrolled senders or foreign topics: {json.dumps(others, sort_keys=True)}")


@sessions_app.command("list")
def sessions_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Sessions: running, ending or ended (with the reason)."""
    store = _open_store(_settings(config, data_dir=data_dir).data_dir)
    _print_rows(
        session_rows(store),
        as_json,
        "sessions",
        ["id", "agent", "state", "ended_reason", "client", "command_result"],
    )


@events_app.command("list")
def events_list(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (oldest first).")] = 1000,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Events as stored (once per agent and seq)."""
    store = _open_store(_settings(config, data_dir=data_dir).data_dir)
    _print_rows(
        event_rows(store, limit), as_json, "events", ["agent", "seq", "kind", "ts", "severity", "details"]
    )


@audit_app.command("verify")
def audit_verify(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Exit 0 when the chain is intact; 1 naming the first bad entry (edited, deleted, inserted, reordered)."""
    store = _open_store(_settings(config, data_dir=data_dir).data_dir)
    entries = list(store.audit_entries())
    problem = verify_chain(entries, store.audit_head())
    if problem is None:
        last = entries[-1] if entries else None
        if as_json:
            print(json.dumps({"ok": True, "entries": len(entries), "head": last.hash if last else None}))
        else:
            print(f"audit chain intact: {len(entries)} entries" + (f", head {last.hash}" if last else ""))
        return
    if as_json:
        print(
            json.dumps(
                {
                    "ok": False,
                    "entry": problem.entry_id,
                    "tamper": problem.tamper.value,
                    "detail": problem.detail,
                }
            )
        )
    else:
        print(f"audit chain BROKEN: {problem}")
    raise typer.Exit(1)


@app.command()
def watch(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Refresh period, s.")] = 1.0,
) -> None:
    """Live view of agents, sessions and the last decisions (Ctrl-C to quit)."""
    from .watch import live

    store = _open_store(_settings(config, data_dir=data_dir).data_dir)
    with contextlib.suppress(KeyboardInterrupt):
        live(store, interval)


def main() -> None:
    app()
