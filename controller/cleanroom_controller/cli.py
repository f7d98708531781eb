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
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# Only what every command needs is imported here: the list and verify commands stay quick to start. The
# protocol (pydantic models), structlog and the daemon are imported by the commands that use them.
from .settings import ControllerSettings, SettingsError, load_settings
from .store import AgentExistsError, Store
from .views import AGENT_COLUMNS, agent_rows, event_rows, session_rows, unenrolled_rejects

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .audit.checkpoints import CheckpointFile
    from .trust import Pki

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
DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database",
        help="Store: sqlite:///path, a path, or postgresql://user@host/db (default: SQLite in the data dir).",
    ),
]

err = Console(stderr=True)


def say(message: str) -> None:
    """A line on stderr, shown as it is: messages carry paths and ids, never markup."""
    err.print(message, highlight=False, markup=False)


def fail(message: str, code: int = 2) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


def _settings(config: Path | None, **flags: Any) -> ControllerSettings:
    try:
        return load_settings(config, **flags)
    except SettingsError as exc:
        fail(str(exc))


def _open_store(settings: ControllerSettings, *, create: bool = False) -> Store:
    """The store the settings name (``database``; default SQLite in the data dir). Errors name it with the
    URL's password redacted."""
    url = settings.database_url
    if url.path is not None and not create and not url.path.exists():
        fail(f"no controller database at {url.path} (wrong --data-dir, or the controller never ran)")
    try:
        return Store.open(settings.data_dir, settings.database)
    except OSError as exc:
        fail(f"cannot open {url.redacted}: {exc}")


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
    database: DatabaseOpt = None,
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
    tls_ca: Annotated[
        Path | None, typer.Option("--tls-ca", help="mqtts://: CA of the broker's certificate (pki/ca.crt).")
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="mqtts://: this controller's client certificate.")
    ] = None,
    tls_key: Annotated[Path | None, typer.Option("--tls-key", help="mqtts://: its key (0600).")] = None,
    broker_dir: Annotated[
        Path | None,
        typer.Option(
            "--broker-dir", help="broker-config --out DIR of a Mosquitto on this host: CRL kept fresh."
        ),
    ] = None,
    enroll_listen: Annotated[
        str | None,
        typer.Option(
            "--enroll-listen", help="HTTPS enrolment endpoint HOST:PORT (default 0.0.0.0:8443), or off."
        ),
    ] = None,
    agent_broker_url: Annotated[
        str | None, typer.Option("--agent-broker-url", help="mqtts://host:port told to enrolled agents.")
    ] = None,
    desktops: Annotated[
        Path | None, typer.Option("--desktops", help="Desktop pools TOML (watched; docs/desktops.md).")
    ] = None,
) -> None:
    """Run the controller daemon until SIGTERM/SIGINT."""
    from cleanroom_protocol import KeyFileError, TlsSettingsError, client_tls_context

    from .daemon import Controller
    from .desktops.config import DesktopsError
    from .logs import configure_logging
    from .policy_keeper import NoPolicyError
    from .trust import PkiError

    settings = _settings(
        config,
        broker=broker,
        data_dir=data_dir,
        database=database,
        policy=policy,
        embedded_broker=embedded_broker,
        share_group=share_group,
        client_id=client_id,
        id=id,
        command_timeout=command_timeout,
        log_level=log_level,
        tls_ca=tls_ca,
        tls_cert=tls_cert,
        tls_key=tls_key,
        broker_dir=broker_dir,
        enroll_listen=enroll_listen,
        agent_broker_url=agent_broker_url,
        desktops=desktops,
    )
    configure_logging(settings.log_level)
    try:
        client_tls_context(settings.broker_address)  # unusable TLS files: say so now, not at each reconnect
        controller = Controller(settings)
        asyncio.run(controller.run())
    except (NoPolicyError, KeyFileError, SettingsError, TlsSettingsError, PkiError, DesktopsError) as exc:
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
        say(f"created {settings.data_dir / 'controller.key'} ({fingerprint(key)})")
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
    store = _open_store(settings, create=True)
    fp = fingerprint(key)
    try:
        added = store.add_agent(agent_id, public_key_pem(key), fp, time.time())
    except AgentExistsError as exc:
        fail(str(exc))
    operator = os.environ.get("SUDO_USER") or getpass.getuser()
    if added:
        store.append_audit("operator.agents_add", f"operator:{operator}", agent_id, {"fingerprint": fp})
        say(f"enrolled {agent_id} ({fp})")
    else:
        say(f"{agent_id} is already enrolled with this key ({fp})")
    store.close()


@agents_app.command("revoke")
def agents_revoke(
    agent_id: Annotated[str, typer.Argument(metavar="ID", help="The agent to cut off.")],
    reason: Annotated[str, typer.Option("--reason", help="Why (audited): lost, stolen, decommissioned...")],
    broker: Annotated[
        str | None, typer.Option("--broker", help="mqtts://host:port of the broker (for the disconnect).")
    ] = None,
    broker_dir: Annotated[
        Path | None, typer.Option("--broker-dir", help="broker-config --out DIR (CRL copy, reload).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Cut a device off: its key refused at once, its certificates revoked, the broker's CRL reloaded and
    its connection closed within seconds; the policy's actions end its sessions. Every step is audited."""
    from .trust import Pki, PkiError
    from .trust.revocation import revoke_agent

    settings = _settings(config, data_dir=data_dir, broker=broker, broker_dir=broker_dir)
    store = _open_store(settings)
    if agent_id not in store.agent_fingerprints():  # an agent revoked before may be revoked again (retry)
        store.close()
        fail(f"no enrolled agent {agent_id!r}")
    try:
        pki: Pki | None = Pki.load(settings.data_dir)
    except PkiError:
        pki = None
    report = revoke_agent(
        store=store,
        pki=pki,
        agent=agent_id,
        reason=reason[:500],
        operator=_operator(),
        broker_dir=settings.broker_dir,
        broker=settings.broker_address,
    )
    store.close()
    say(
        f"{agent_id}: revoked{'' if report.newly_revoked else ' (already)'}; certificates revoked: "
        f"{len(report.serials)}; broker reloaded: {'yes' if report.broker_pid else 'no'}; "
        f"disconnected: {'yes' if report.disconnected else 'no'}"
    )
    if report.problems:
        fail("; ".join(report.problems), 1)


@agents_app.command("list")
def agents_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Enrolled agents: online, compliant, reasons, last seen, sessions, spool (full, refused), rejects."""
    store = _open_store(_settings(config, data_dir=data_dir))
    _print_rows(
        agent_rows(store),
        as_json,
        "agents",
        AGENT_COLUMNS,
    )
    others = unenrolled_rejects(store)
    if others and not as_json:
        print(f"rejected from unenrolled senders or foreign topics: {json.dumps(others, sort_keys=True)}")


@sessions_app.command("list")
def sessions_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Sessions: running, ending or ended (with the reason)."""
    store = _open_store(_settings(config, data_dir=data_dir))
    _print_rows(
        session_rows(store),
        as_json,
        "sessions",
        ["id", "agent", "state", "ended_reason", "client", "command_result"],
    )


@sessions_app.command("end")
def sessions_end(
    session_id: Annotated[str, typer.Argument(metavar="ID", help="The session (sessions list).")],
    reason: Annotated[str, typer.Option("--reason", help="Why (audited).")],
    agent: Annotated[
        str | None, typer.Option("--agent", help="Its endpoint, if the id is ambiguous.")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """End a session on its endpoint (signed end_session, sent by the running controller) and, when it holds
    a desktop, log that desktop off and wipe it. Audited with who and why."""
    from .desktops.operations import OperationError, end_session

    store = _open_store(_settings(config, data_dir=data_dir))
    try:
        done = end_session(store, session_id, operator=_operator(), reason=reason, agent=agent)
    except OperationError as exc:
        fail(str(exc))
    finally:
        store.close()
    desktop = f"; desktop {done.desktop} logged off and wiped" if done.desktop else ""
    say(f"{done.agent}/{done.session_id}: end_session {done.command_id} queued{desktop}")


desktops_app = typer.Typer(no_args_is_help=True, help="Non-persistent desktops (--desktops FILE).")
app.add_typer(desktops_app, name="desktops")
DesktopsOpt = Annotated[
    Path | None, typer.Option("--desktops", help="The desktops file (for the driver column).")
]


@desktops_app.command("list")
def desktops_list(
    as_json: JsonOpt = False,
    desktops: DesktopsOpt = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Desktops: id, pool, driver, state, session, user, last wiped."""
    from .desktops.config import DesktopsError, load_desktops
    from .desktops.operations import desktop_rows

    settings = _settings(config, data_dir=data_dir, desktops=desktops)
    try:
        pools = load_desktops(settings.desktops) if settings.desktops is not None else None
    except DesktopsError as exc:
        fail(str(exc))
    store = _open_store(settings)
    rows = desktop_rows(store, pools)
    store.close()
    _print_rows(rows, as_json, "desktops", ["id", "pool", "driver", "state", "session", "user", "last_wiped"])


@desktops_app.command("wipe")
def desktops_wipe(
    desktop_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="Why (audited).")] = "operator request",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Wipe a desktop back to its golden image (an in-use one is logged off first)."""
    from .desktops.operations import OperationError, wipe

    store = _open_store(_settings(config, data_dir=data_dir))
    try:
        moved = wipe(store, desktop_id, operator=_operator(), reason=reason)
    except OperationError as exc:
        fail(str(exc))
    finally:
        store.close()
    say(f"{desktop_id}: {moved.before.state.value} -> {moved.after.state.value}")


@desktops_app.command("release")
def desktops_release(
    desktop_id: Annotated[str, typer.Argument(metavar="ID")],
    reason: Annotated[str, typer.Option("--reason", help="What was looked at (audited).")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Take a quarantined desktop out: wiped again, handed out only once that wipe verifies clean."""
    from .desktops.operations import OperationError, release

    store = _open_store(_settings(config, data_dir=data_dir))
    try:
        moved = release(store, desktop_id, operator=_operator(), reason=reason)
    except OperationError as exc:
        fail(str(exc))
    finally:
        store.close()
    say(
        f"{desktop_id}: {moved.before.state.value} -> {moved.after.state.value} (clean once the wipe verifies)"
    )


@events_app.command("list")
def events_list(
    as_json: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many (newest first).")] = 1000,
    agent: Annotated[
        str | None, typer.Option("--agent", metavar="ID", help="Only this agent's events.")
    ] = None,
    before: Annotated[
        int | None,
        typer.Option(
            "--before",
            metavar="SEQ",
            min=0,
            help="With --agent: only events below this seq (the next page: the last seq shown).",
        ),
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Events as stored (once per agent and seq), the newest first."""
    if before is not None and agent is None:
        fail("--before SEQ needs --agent ID: seq numbers count each agent's messages, not all of them")
    store = _open_store(_settings(config, data_dir=data_dir))
    _print_rows(
        event_rows(store, limit, agent=agent, before_seq=before),
        as_json,
        "events",
        ["agent", "seq", "kind", "ts", "severity", "details"],
    )


def _controller_public_key(settings: ControllerSettings, public_key: Path | None) -> Ed25519PublicKey:
    """The key checkpoints are checked with: ``--public-key`` (a PEM kept apart from this host), else the one
    of the controller's own key in the data directory."""
    from cleanroom_protocol import KeyFileError, load_private_key, load_public_key

    try:
        if public_key is not None:
            return load_public_key(public_key)
        return load_private_key(settings.data_dir / "controller.key").public_key()
    except (KeyFileError, OSError) as exc:
        fail(f"no key to check checkpoints with: {exc} (give --public-key with the controller's public key)")


def _checkpoint_log(settings: ControllerSettings, checkpoints: Path | None) -> CheckpointFile:
    from .audit.checkpoints import CHECKPOINTS_NAME, CheckpointFile

    return CheckpointFile(checkpoints or settings.data_dir / CHECKPOINTS_NAME)


CheckpointsOpt = Annotated[
    Path | None,
    typer.Option("--checkpoints", help="Checkpoint log (default: audit-checkpoints.jsonl in the data dir)."),
]
PublicKeyOpt = Annotated[
    Path | None,
    typer.Option("--public-key", help="Controller public key (PEM) to check checkpoints and archives with."),
]


@audit_app.command("verify")
def audit_verify(
    as_json: JsonOpt = False,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    checkpoints: CheckpointsOpt = None,
    public_key: PublicKeyOpt = None,
    archive: Annotated[
        Path | None, typer.Option("--archive", help="Verify this archived segment alone (no database).")
    ] = None,
) -> None:
    """Exit 0 when the chain is intact; 1 naming the first bad entry (edited, deleted, inserted, reordered)
    or, with the signed checkpoints, the first checkpoint a rewritten chain disagrees with."""
    from .audit.checkpoints import CheckpointError, check_checkpoints
    from .audit.verify import verify_store

    settings = _settings(config, data_dir=data_dir)
    if archive is not None:
        _verify_archive(archive, _controller_public_key(settings, public_key), as_json)
        return
    store = _open_store(settings)
    log = _checkpoint_log(settings, checkpoints)
    marks, cp_problems, have_checkpoints = [], [], log.path.exists()
    if have_checkpoints:
        try:
            checked = check_checkpoints(log, _controller_public_key(settings, public_key))
        except CheckpointError as exc:
            fail(str(exc))
        marks, cp_problems = checked.marks, checked.problems
    elif checkpoints is not None:
        fail(f"no checkpoint log at {log.path}")
    report = verify_store(store, marks, cp_problems)
    rate = report.entries / report.seconds if report.seconds > 0 else 0.0
    problem = report.problem
    if as_json:
        out: dict[str, Any] = {
            "ok": report.ok,
            "entries": report.entries,
            "head": report.last.hash if report.last.id else None,
            "base": report.base.id,
            "checkpoints": report.checkpoints,
            "checkpoints_passed": report.checkpoints_passed,
            "checkpoint_problems": report.checkpoint_problems,
            "entries_per_s": round(rate),
        }
        if problem is not None:
            out |= {"entry": problem.entry_id, "tamper": problem.tamper.value, "detail": problem.detail}
        print(json.dumps(out))
    else:
        for line in report.checkpoint_problems:
            print(f"checkpoint log BROKEN: {line}")
        if problem is not None:
            print(f"audit chain BROKEN: {problem}")
        elif report.ok:
            archived = f" (entries 1..{report.base.id} archived)" if report.base.id else ""
            print(
                f"audit chain intact: {report.entries} entries{archived}"
                + (f", head {report.last.hash}" if report.last.id else "")
                + f", {report.checkpoints_passed} of {report.checkpoints} signed checkpoints passed"
                + f" ({rate:,.0f} entries/s)"
            )
            if not have_checkpoints:
                say("no checkpoint log: a rewrite that recomputes every later hash would not be caught")
    if not report.ok:
        raise typer.Exit(1)


def _verify_archive(path: Path, key: Ed25519PublicKey, as_json: bool) -> None:
    from .audit.archive import ArchiveError, verify_archive

    try:
        report = verify_archive(path, key)
    except ArchiveError as exc:
        if as_json:
            print(json.dumps({"ok": False, "archive": str(path), "detail": str(exc)}))
        else:
            print(f"audit archive BROKEN: {exc}")
        raise typer.Exit(1) from None
    if as_json:
        print(
            json.dumps(
                {
                    "ok": True,
                    "archive": str(path),
                    "first": report.first,
                    "last": report.last,
                    "leaves": report.leaves,
                    "batches_without_leaves": report.batches_without_leaves,
                }
            )
        )
    else:
        print(
            f"audit archive intact: entries {report.first}..{report.last}, both checkpoints signed, "
            f"{report.leaves} message leaves provable"
            + (
                f" ({report.batches_without_leaves} batch entries archived without leaves)"
                if report.batches_without_leaves
                else ""
            )
        )


@audit_app.command("checkpoint")
def audit_checkpoint(
    config: ConfigOpt = None, data_dir: DataDirOpt = None, checkpoints: CheckpointsOpt = None
) -> None:
    """Sign the chain's head now with the controller key and append it to the checkpoint log (the daemon
    does this at its cadence; before `audit archive`, or to anchor a head by hand)."""
    from cleanroom_protocol import KeyFileError, load_private_key

    from .audit.checkpoints import sign_checkpoint

    settings = _settings(config, data_dir=data_dir)
    store = _open_store(settings)
    head = store.audit_head()
    if head is None or head.id == 0:
        fail("the audit chain is empty: nothing to sign")
    try:
        key = load_private_key(settings.data_dir / "controller.key")
    except (KeyFileError, OSError) as exc:
        fail(str(exc))
    log = _checkpoint_log(settings, checkpoints)
    cp = sign_checkpoint(key, head, time.time())
    log.append(cp)
    print(f"signed {cp.label()} into {log.path}")


@audit_app.command("prove")
def audit_prove(
    agent: Annotated[str, typer.Option("--agent", help="The agent id.")],
    seq: Annotated[int, typer.Option("--seq", help="The message's seq.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    archive: Annotated[
        Path | None,
        typer.Option("--archive", help="From this archived segment (verified first), not the database."),
    ] = None,
    public_key: PublicKeyOpt = None,
) -> None:
    """Print (JSON) the inclusion proof that message (agent, seq) is covered by a verdict.batch entry:
    leaf, audit path, root, the entry and its chain hash. `audit check-proof FILE` checks it offline."""
    from .audit import merkle
    from .audit.proofs import build_proof, check_proof

    settings = _settings(config, data_dir=data_dir)
    if archive is not None:
        from .audit.archive import ArchiveError, prove_from_archive

        try:
            doc = prove_from_archive(archive, _controller_public_key(settings, public_key), agent, seq)
        except ArchiveError as exc:
            fail(str(exc))
        sys.stdout.write(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        return
    store = _open_store(settings)
    found = store.message_leaf(agent, seq)
    if found is None:
        fail(f"no stored message {agent} seq {seq} (never accepted, or pruned after its retention)")
    _, _, batch, index = found
    if batch is None or index is None:
        fail(f"message {agent} seq {seq} is not sealed into a batch yet (within about a second); try again")
    entry = store.audit_entry(batch)
    if entry is None:
        fail(
            f"the batch entry {batch} covering {agent} seq {seq} is archived: "
            "prove it from its archive (--archive FILE)"
        )
    leaves = [merkle.Leaf(*row) for row in store.batch_leaves(batch)]
    proof = build_proof(leaves, index, entry)
    problems = check_proof(proof)
    if problems:
        fail(f"the stored batch does not prove the message: {'; '.join(problems)}")
    sys.stdout.write(json.dumps(proof, indent=2, sort_keys=True) + "\n")


@audit_app.command("check-proof")
def audit_check_proof(
    proof_file: Annotated[Path, typer.Argument(metavar="FILE", help="A proof printed by `audit prove`.")],
    message: Annotated[
        Path | None, typer.Option("--message", help="The message's bytes as sent: its digest must match.")
    ] = None,
) -> None:
    """Check an inclusion proof without any database: exit 0 when it holds, 1 naming what does not."""
    from .audit.proofs import check_proof

    try:
        raw = proof_file.read_bytes()
        if len(raw) > 1 << 20:
            fail(f"{proof_file}: larger than 1 MiB, not a proof")
        doc = json.loads(raw)
        payload = message.read_bytes() if message is not None else None
    except (OSError, ValueError) as exc:
        fail(f"{proof_file}: {exc}")
    problems = check_proof(doc, message=payload) if isinstance(doc, dict) else ["not a JSON object"]
    if problems:
        for p in problems:
            print(f"proof does NOT hold: {p}")
        raise typer.Exit(1)
    leaf, entry = doc["leaf"], doc["entry"]
    print(
        f"proof holds: {leaf['agent']} seq {leaf['seq']} ({leaf['kind']}) is leaf {doc['index']} of "
        f"{doc['size']} under audit entry {entry['id']}, chain hash {entry['hash']}"
    )


@audit_app.command("archive")
def audit_archive(
    before: Annotated[str, typer.Option("--before", help="ISO date or time (UTC unless it says otherwise).")],
    out: Annotated[
        Path | None, typer.Option("--out", help="Directory (default: audit-archive/ in the data dir).")
    ] = None,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    checkpoints: CheckpointsOpt = None,
    public_key: PublicKeyOpt = None,
) -> None:
    """Move the entries up to the last signed checkpoint before DATE into a gzip JSON-lines file that
    verifies on its own (`audit verify --archive FILE`); the database keeps the rest."""
    from datetime import UTC, datetime

    from .audit.archive import ARCHIVE_DIR, ArchiveError, archive_before

    try:
        when = datetime.fromisoformat(before)
    except ValueError:
        fail(f"--before {before!r}: not an ISO date or time (e.g. 2026-11-01 or 2026-11-01T12:00:00Z)")
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    settings = _settings(config, data_dir=data_dir)
    store = _open_store(settings)
    key = _controller_public_key(settings, public_key)
    try:
        report = archive_before(
            store,
            _checkpoint_log(settings, checkpoints),
            key,
            when.timestamp(),
            out or settings.data_dir / ARCHIVE_DIR,
        )
    except (ArchiveError, OSError) as exc:
        fail(f"nothing archived: {exc}")
    if report is None:
        print(f"nothing to archive: no signed checkpoint before {when.isoformat()} beyond what is archived")
        return
    store.append_audit(
        "operator.audit_archive",
        f"operator:{_operator()}",
        report.path.name,
        {
            "first": report.first,
            "last": report.last,
            "entries": report.entries,
            "leaves": report.leaves,
            "batches_without_leaves": report.batches_without_leaves,
        },
    )
    without = report.batches_without_leaves
    print(
        f"archived entries {report.first}..{report.last} to {report.path} with {report.leaves} message leaves"
        + (f"; {without} batch entries without leaves (their messages were pruned first)" if without else "")
    )


@app.command()
def watch(
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
    interval: Annotated[float, typer.Option("--interval", min=0.1, help="Refresh period, s.")] = 1.0,
) -> None:
    """Live view of agents, sessions and the last decisions (Ctrl-C to quit)."""
    from .watch import live

    store = _open_store(_settings(config, data_dir=data_dir))
    with contextlib.suppress(KeyboardInterrupt):
        live(store, interval)


enroll_app = typer.Typer(no_args_is_help=True, help="One-time enrolment tokens for new endpoints.")
app.add_typer(enroll_app, name="enroll")


def _operator() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


@enroll_app.command("create")
def enroll_create(
    site: Annotated[str, typer.Option("--site", help="Where the endpoint is (recorded, audited).")] = "",
    expires: Annotated[str, typer.Option("--expires", help="Lifetime: 90s, 30m, 24h, 7d.")] = "24h",
    uses: Annotated[int, typer.Option("--uses", help="How many endpoints may enrol with it.")] = 1,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Print a new enrolment token (shown once; only its hash is kept). Needs `pki init` first: the token
    pins the CA, so the endpoint's first contact is authenticated."""
    from .trust import Pki, PkiError
    from .trust.enrolment import mint, parse_duration

    settings = _settings(config, data_dir=data_dir)
    try:
        ttl = parse_duration(expires)
        pki = Pki.load(settings.data_dir)
        token, record = mint(
            pki.ca_fingerprint, site=site[:200], now=time.time(), ttl_s=ttl, uses=uses, created_by=_operator()
        )
    except (ValueError, OSError, PkiError) as exc:
        fail(str(exc))
    store = _open_store(settings, create=True)
    with store.transaction():
        store.add_token(record)
        store.append_audit(
            "operator.enroll_create",
            f"operator:{record.created_by}",
            record.id,
            {"site": record.site, "expires_at": record.expires_at, "uses": record.uses_allowed},
        )
    store.close()
    err.print(
        f"token {record.id}: {uses} use(s), expires in {expires}; give it to the endpoint's "
        "`cleanroom-agent enroll --token-file FILE` (it is not shown again)",
        markup=False,
    )
    sys.stdout.write(str(token) + "\n")


@enroll_app.command("list")
def enroll_list(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """Tokens: id, site, uses, expiry, state (never the secret)."""
    store = _open_store(_settings(config, data_dir=data_dir))
    now = time.time()
    rows = [
        {
            "id": t.id,
            "site": t.site,
            "uses": t.uses,
            "uses_allowed": t.uses_allowed,
            "created_at": t.created_at,
            "expires_at": t.expires_at,
            "created_by": t.created_by,
            "state": "revoked"
            if t.revoked_at is not None
            else "expired"
            if now >= t.expires_at
            else "used"
            if t.uses >= t.uses_allowed
            else "usable",
        }
        for t in store.tokens()
    ]
    store.close()
    _print_rows(
        rows, as_json, "enrolment tokens", ["id", "site", "state", "uses", "uses_allowed", "expires_at"]
    )


@enroll_app.command("revoke")
def enroll_revoke(
    token_id: Annotated[str, typer.Argument(metavar="TOKEN_ID", help="The id shown by `enroll list`.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke a token: no endpoint can enrol with it any more."""
    store = _open_store(_settings(config, data_dir=data_dir))
    with store.transaction():
        revoked = store.revoke_token(token_id, time.time())
        if revoked:
            store.append_audit("operator.enroll_revoke", f"operator:{_operator()}", token_id, {})
    store.close()
    if not revoked:
        fail(f"no usable token {token_id!r} (unknown or already revoked)")
    err.print(f"token {token_id} revoked", markup=False)


pki_app = typer.Typer(
    no_args_is_help=True, help="The controller's private CA: broker, controller and device certificates."
)
app.add_typer(pki_app, name="pki")
BrokerHostOpt = Annotated[
    list[str] | None,
    typer.Option("--broker-host", help="A DNS name or IP address clients use for the broker (repeatable)."),
]


def _note(message: str) -> None:
    """One line on stderr as it is: no markup, and no wrapping inside the paths it names."""
    sys.stderr.write(message + "\n")


def _load_pki(data_dir: Path) -> Pki:
    from .trust import Pki, PkiError

    try:
        return Pki.load(data_dir)
    except (PkiError, OSError) as exc:
        fail(str(exc))


def _audit_operator(data_dir: Path, kind: str, subject: str, data: dict[str, Any]) -> None:
    store = _open_store(_settings(None, data_dir=data_dir), create=True)  # database: environment
    store.append_audit(kind, f"operator:{os.environ.get('SUDO_USER') or getpass.getuser()}", subject, data)
    store.close()


@pki_app.command("init")
def pki_init(
    broker_host: BrokerHostOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Create the CA, the broker's server certificate and the controller's client certificate in
    DATA_DIR/pki (0700; keys 0600). Refuses if a CA is already there."""
    from .trust import DEFAULT_BROKER_HOSTS, Pki, PkiError

    settings = _settings(config, data_dir=data_dir)
    hosts = broker_host or list(DEFAULT_BROKER_HOSTS)
    try:
        pki = Pki.init(settings.data_dir, broker_hosts=hosts, controller_id=settings.id)
    except (PkiError, OSError) as exc:
        fail(str(exc))
    _audit_operator(
        settings.data_dir,
        "operator.pki_init",
        pki.ca_fingerprint,
        {"broker_hosts": hosts, "controller": settings.id},
    )
    _note(f"created {pki.root} (0700):")
    _note(f"  CA                 {pki.ca_cert_path}, {pki.files.ca_key} (0600, stays here)")
    _note(f"  broker             {pki.server_cert_path}, {pki.server_key_path} (for: {', '.join(hosts)})")
    _note(f"  controller '{settings.id}'  {pki.controller_cert_path}, {pki.controller_key_path}")
    _note(f"  CRL                {pki.crl_path} (empty)")
    _note(f"next: cleanroom-controller broker-config --out DIR --data-dir {settings.data_dir}")
    sys.stdout.write(f"CA fingerprint {pki.ca_fingerprint}\n")


@pki_app.command("issue-controller")
def pki_issue_controller(
    name: Annotated[
        str, typer.Argument(metavar="NAME", help="CN of the certificate: the ACL user and client id.")
    ],
    days: Annotated[int, typer.Option("--days", min=1, max=825, help="Lifetime.")] = 825,
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """A client certificate for one more controller process (each process needs its own: the broker
    makes the CN the client id, so two processes sharing one would take each other's connection)."""
    from .trust import PkiError

    settings = _settings(config, data_dir=data_dir)
    pki = _load_pki(settings.data_dir)
    try:
        cert, key = pki.issue_controller(name, days=days)
    except PkiError as exc:
        fail(str(exc))
    _audit_operator(settings.data_dir, "operator.pki_issue_controller", name, {"days": days})
    _note(f"controller certificate {cert}, key {key} (0600)")
    _note("re-run broker-config and reload the broker: the ACL lists the controllers")


@pki_app.command("issue-server")
def pki_issue_server(
    broker_host: BrokerHostOpt = None, config: ConfigOpt = None, data_dir: DataDirOpt = None
) -> None:
    """A new broker server certificate (new SANs, or the old one nears its end)."""
    from .trust import DEFAULT_BROKER_HOSTS, PkiError

    settings = _settings(config, data_dir=data_dir)
    pki = _load_pki(settings.data_dir)
    hosts = broker_host or list(DEFAULT_BROKER_HOSTS)
    try:
        pki.issue_server(hosts)
    except PkiError as exc:
        fail(str(exc))
    _audit_operator(settings.data_dir, "operator.pki_issue_server", "broker", {"broker_hosts": hosts})
    _note(f"broker certificate {pki.server_cert_path} for {', '.join(hosts)}")
    _note("re-run broker-config and restart the broker")


@pki_app.command("show")
def pki_show(as_json: JsonOpt = False, config: ConfigOpt = None, data_dir: DataDirOpt = None) -> None:
    """The CA fingerprint, the broker and controller certificates, the CRL."""
    from .trust import certificate_summary

    pki = _load_pki(_settings(config, data_dir=data_dir).data_dir)
    summary = certificate_summary(pki)
    if as_json:
        print(json.dumps(summary, sort_keys=True))
        return
    for key, value in summary.items():
        print(f"{key}: {value}")


@app.command("broker-config")
def broker_config(
    out: Annotated[Path, typer.Option("--out", help="Directory for mosquitto.conf, acl, certificates, CRL.")],
    listen: Annotated[str, typer.Option("--listen", help="HOST:PORT to listen on.")] = "0.0.0.0:8883",
    user: Annotated[
        str, typer.Option("--user", help="User Mosquitto runs as (started as root it drops to it).")
    ] = "mosquitto",
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Write a Mosquitto 2 configuration admitting only certificates from this controller's CA (mTLS,
    TLS 1.2+, CRL, per-agent ACL, client id bound to the certificate)."""
    from .trust import BrokerConfigError, PkiError, describe, parse_listen, write_broker_config

    pki = _load_pki(_settings(config, data_dir=data_dir).data_dir)
    try:
        address = parse_listen(listen)
        files = write_broker_config(out, pki, listen=address, user=user)
    except (BrokerConfigError, PkiError, OSError) as exc:
        fail(str(exc))
    for line in describe(files, address, pki):
        _note(line)


@app.command("broker-reload")
def broker_reload(
    out: Annotated[Path, typer.Option("--out", help="The broker-config directory of the running broker.")],
    config: ConfigOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Copy the PKI's current CRL into the broker's directory and reload Mosquitto (SIGHUP via its pid
    file): for a broker the controller cannot signal itself (run as root, e.g. by a systemd path unit)."""
    from .trust import BrokerConfigError, PkiError, reload_broker, write_crl

    pki = _load_pki(_settings(config, data_dir=data_dir).data_dir)
    try:
        write_crl(out, pki)
        pid = reload_broker(out)
    except (BrokerConfigError, PkiError, OSError) as exc:
        fail(str(exc))
    _note(f"CRL ({len(pki.crl())} revoked) handed to mosquitto, pid {pid}, reloaded")


def main() -> None:
    app()
