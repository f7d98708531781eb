"""Composition root of ``cleanroom-controller run``: wires store, audit, policy, ingest, tracker, driver and
the broker link into one ``asyncio.TaskGroup`` of named tasks, and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Coroutine
from typing import Any

import structlog

from cleanroom_protocol import (
    POLICY_TOPIC,
    Channel,
    Kind,
    Watermark,
    agent_topic,
    load_or_create_private_key,
    public_key_pem,
)

from .actions.drivers.agent import AgentDriver
from .actions.drivers.desktops import desktop_drivers
from .actions.runner import ActionRunner
from .audit.checkpoints import CHECKPOINTS_NAME, Checkpointer, CheckpointFile
from .audit.recorder import Recorder
from .broker import EmbeddedBroker
from .decisions.decide import SILENCE_HEARTBEATS, EndSession
from .desktops.keeper import DesktopsKeeper
from .desktops.runner import DesktopRunner
from .ingest.inbox import Entry
from .ingest.link import BrokerLink, Receipt
from .ingest.pipeline import DEDUP_WINDOW_S, Ingest, KeyCache, subscriptions
from .ingest.watermarks import WATERMARK_EVERY_S
from .models import CommandState
from .policy_keeper import PolicyKeeper
from .settings import ControllerSettings
from .store import DatabaseUnavailable, Store
from .tracker import Tracker
from .trust import CrlKeeper, Pki, PkiError, PkiFiles, parse_listen
from .trust.crlkeeper import CHECK_EVERY_S as CRL_CHECK_EVERY_S
from .trust.enrolserver import EnrolmentServer, EnrolmentService, EnrolmentSettings, build_app
from .trust.signer import Signer

log = structlog.get_logger("cleanroom.controller")

KEY_NAME = "controller.key"
INBOX_SIZE = 2_000  # messages between the broker link and ingest (acknowledged only after their commit)
# A batch (one SQLite transaction) ends at whichever comes first: the inbox is empty, this many messages,
# or this much time spent applying it. The time budget bounds how long a violation waits for its commit.
BATCH_MAX = 500
BATCH_BUDGET_S = 0.010  # collecting; applying a full batch takes about as long again
IDLE_WAIT_S = 0.0005  # one wait for more messages; the loop serves the socket meanwhile
IDLE_WAITS = 2  # consecutive waits that bring nothing end the collection
PRUNE_EVERY_S = 300.0
REVOCATION_CHECK_S = 1.0
DESKTOP_POLL_S = 1.0
# A batch whose commit fails (disk full, database locked, I/O error) is kept and tried again, first after
# this long, doubling up to the cap; it is never dropped and never acknowledged before it commits.
COMMIT_RETRY_S = 0.05
COMMIT_RETRY_MAX_S = 2.0
DRAIN_S = 10.0  # SIGTERM: at most this long to commit and acknowledge what is in hand
WATERMARK_PUBLISH_CHUNK = 100  # concurrent publishes of one round (aiomqtt allows 200 outgoing calls)


def _load_pki(settings: ControllerSettings) -> Pki | None:
    """The PKI if ``pki init`` was run in the data dir (its CRL is then kept valid and its enrolment
    endpoint served); else None."""
    if not PkiFiles.under(settings.data_dir).exists():
        if settings.broker_dir is not None:
            raise PkiError(
                f"broker_dir {settings.broker_dir} is set but there is no PKI in {settings.data_dir}"
            )
        return None
    return Pki.load(settings.data_dir)


def _enrolment_server(settings: ControllerSettings, key_pem: str, pki: Pki | None) -> EnrolmentServer | None:
    """With a PKI, the HTTPS enrolment endpoint (its own store connection: it writes between ingest
    batches); None without a PKI or with ``enroll_listen = "off"``."""
    if pki is None or settings.enroll_listen == "off":
        return None
    listen = parse_listen(settings.enroll_listen)
    broker_url = settings.agent_broker_url or (settings.broker if settings.broker_address.tls else None)
    service = EnrolmentService(
        Store.open(settings.data_dir, settings.database),
        pki,
        EnrolmentSettings(settings.id, key_pem, broker_url),
    )
    return EnrolmentServer(
        build_app(service),
        host=listen.host,
        port=listen.port,
        certfile=str(pki.server_cert_path),
        keyfile=str(pki.server_key_path),
    )


class Stop(Exception):
    """Raised inside the task group to end it on a signal."""


def _log_failure(event: str, exc: Exception) -> None:
    """A periodic task's step failed; it is tried again at the next tick. An unreachable database is said
    in one line (it repeats each tick of an outage); anything else with its traceback."""
    if isinstance(exc, DatabaseUnavailable):
        log.warning(event, error=str(exc), database_unavailable=True)
    else:
        log.error(event, exc_info=exc)


async def _contained(coro: Coroutine[Any, Any, None], name: str) -> None:
    """A task spawned into the task group (a command's delivery, a desktop's steps, an action) that fails
    must not end the group, and with it the controller: it is logged, and what it was doing is picked up
    again from the store (pending commands and desktops with a step to do are resumed every second)."""
    try:
        await coro
    except Exception as exc:
        _log_failure("task_failed", exc)
        log.warning("task_failed_resumed_later", task=name)


class Controller:
    def __init__(self, settings: ControllerSettings) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.key, _ = load_or_create_private_key(settings.data_dir / KEY_NAME)
        self.store = Store.open(settings.data_dir, settings.database)
        self.recorder = Recorder(self.store, f"controller:{settings.id}")
        # The chain's head, signed at a cadence into a log outside the database (audit/checkpoints.py).
        self.checkpointer = Checkpointer(
            CheckpointFile(settings.data_dir / CHECKPOINTS_NAME), self.key, settings.checkpoint_policy
        )
        self.signer = Signer(self.store, self.key, settings.id)
        self.policy = PolicyKeeper(
            store=self.store, recorder=self.recorder, signer=self.signer, path=settings.policy
        )
        self.address = settings.broker_address
        pki = _load_pki(settings)
        self.crl_keeper = CrlKeeper(pki, settings.broker_dir) if pki is not None else None
        self.enrolment = _enrolment_server(settings, public_key_pem(self.key), pki)
        self._revoked: set[str] = set(self.store.revoked_agents())
        self._tg: asyncio.TaskGroup | None = None
        self._deferred: list[EndSession] = []
        self._actions_retry: list[EndSession] = []  # decided and committed, not yet submitted (store failed)
        self.link = BrokerLink(
            self.address,
            client_id=settings.mqtt_client_id,
            keepalive=settings.keepalive,
            persistent=settings.persistent_session,
            subscriptions=subscriptions(settings.share_group),
            on_message=self._on_message,
            on_connect=self._publish_policy,
        )
        self.driver = AgentDriver(
            store=self.store,
            recorder=self.recorder,
            signer=self.signer,
            publisher=self.link,
            timeout_s=settings.command_timeout,
            attempts=settings.command_attempts,
        )
        # Desktops (desktops/): pools from --desktops FILE, each desktop driven by its pool's driver.
        self.desktops_keeper = DesktopsKeeper(recorder=self.recorder, path=settings.desktops)
        self.desktops = DesktopRunner(
            store=self.store,
            recorder=self.recorder,
            desktops=lambda: self.desktops_keeper.desktops,
            drivers=desktop_drivers(self.driver),
            spawn=self._spawn,
        )
        self.actions = ActionRunner(
            driver=self.driver,
            store=self.store,
            recorder=self.recorder,
            spawn=self._spawn,
            desktops=self.desktops,
        )
        self.tracker = Tracker(
            store=self.store,
            recorder=self.recorder,
            policy=lambda: self.policy.policy,
            act=self._deferred.append,  # submitted after the batch commits (see _submit_deferred)
            recovered=self._recovered,
            desktops=self.desktops,
        )
        self.keys = KeyCache(self.store)
        self.ingest = Ingest(
            store=self.store,
            recorder=self.recorder,
            tracker=self.tracker,
            keys=self.keys,
            max_skew_s=settings.max_skew_s,
            on_ack=self.driver.ack_received,
            shared=settings.share_group is not None,
            seal=settings.seal_policy,
        )
        # Per-sender queues: a device that floods is served last and its overflow dropped (counted), so
        # the others' messages are not stuck behind its junk (inbox.py).
        self._inbox = self.ingest.inbox(capacity=INBOX_SIZE)
        self._in_hand = 0  # messages taken from the inbox and not yet committed and acknowledged
        self._batch_done = asyncio.Event()  # set after each batch is committed and acknowledged
        self.commit_failures = 0
        # While ingest cannot commit (database unreachable, disk full) endpoints' reports wait unapplied, so
        # their last_seen says nothing: silence is not judged then, nor for one silence period after.
        self._commit_failing = False
        self._silence_hold_until = 0.0
        # A policy or desktops file change whose store write failed: reloaded again by the ticker.
        self._reload_due: set[str] = set()

    def _recovered(self, agent: str) -> None:
        self.driver.cancel_pending(agent, "the endpoint is compliant again")

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        if self._tg is None:
            coro.close()
            return
        self._tg.create_task(_contained(coro, name), name=name)

    async def _on_message(self, topic: str, payload: bytes, retained: bool, receipt: Receipt) -> None:
        # Bounded: when the inbox is full the link stops reading (aiomqtt's queue takes the rest up to its
        # bound; QoS 1: what is past it stays with the broker). The broker's inflight window is no bound here.
        await self._inbox.put((topic, payload, retained), lambda: self.link.ack(receipt))

    async def _ingest(self) -> None:
        while True:
            batch = await self._collect()
            try:
                await self._commit(batch)
            finally:
                self._in_hand = 0
                self._batch_done.set()
            await asyncio.sleep(0)  # a burst must not starve the link, timers and command tasks

    async def _commit(self, batch: list[Entry]) -> None:
        """Apply ``batch`` until it commits, then acknowledge each message to the broker. A failed commit
        is retried with backoff, the batch kept in hand: never dropped, never acknowledged uncommitted
        (killed meanwhile, the broker delivers it again). Bad input never raises here (it is counted)."""
        items = [item for item, _ in batch]
        attempt = 0
        while True:
            try:
                self.ingest.handle_batch(items)
                break
            except Exception as exc:  # the transaction could not commit: nothing of it is stored
                self._deferred.clear()
                self.commit_failures += 1
                self._commit_failing = True
                attempt += 1
                delay = min(COMMIT_RETRY_MAX_S, COMMIT_RETRY_S * 2 ** (attempt - 1))
                log.error(
                    "ingest_commit_failed",
                    error=str(exc),
                    messages=len(items),
                    attempt=attempt,
                    retry_in=delay,
                )
                await asyncio.sleep(delay)
        if self._commit_failing:
            self._commit_failing = False
            hold = SILENCE_HEARTBEATS * self.policy.policy.report.heartbeat_s
            self._silence_hold_until = time.time() + hold
            log.warning("ingest_resumed", failed_commits=attempt, silence_held_s=hold)
        for _, settle in batch:
            settle()
        self._submit_deferred()

    async def _collect(self) -> list[Entry]:
        """The next batch: what is queued, plus what arrives while the loop serves the socket, until the
        size or time budget is reached or a short idle wait brings nothing. The link hands over one message
        per socket read, so waiting (in select, not spinning) is how a burst becomes one batch; a lone
        message at a low rate waits at most ``IDLE_WAITS × IDLE_WAIT_S``."""
        batch = [await self._inbox.get()]
        self._in_hand = 1
        started = time.monotonic()
        idle = 0
        while len(batch) < BATCH_MAX and idle < IDLE_WAITS:
            if self._inbox.empty():
                if time.monotonic() - started >= BATCH_BUDGET_S:
                    break
                idle += 1
                await asyncio.sleep(IDLE_WAIT_S)
                continue
            idle = 0
            while len(batch) < BATCH_MAX and not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            self._in_hand = len(batch)
        return batch

    async def _publish_watermarks(self) -> None:
        while True:
            await asyncio.sleep(WATERMARK_EVERY_S)
            await self._send_watermarks()

    async def _send_watermarks(self) -> None:
        """One signed, retained watermark per agent whose messages were stored since the last round."""
        marks = self.ingest.watermarks.take()
        if not marks:
            return
        try:
            with self.store.transaction():  # their seqs in one transaction: one sync to disk per round
                sealed = [(mark, self.signer.seal(Kind.WATERMARK, mark)[1]) for mark in marks]
        except Exception as exc:
            for mark in marks:
                self.ingest.watermarks.give_back(mark)
            _log_failure("watermarks_not_signed", exc)
            return
        for i in range(0, len(sealed), WATERMARK_PUBLISH_CHUNK):
            chunk = sealed[i : i + WATERMARK_PUBLISH_CHUNK]
            await asyncio.gather(*(self._publish_watermark(mark, payload) for mark, payload in chunk))

    async def _publish_watermark(self, mark: Watermark, payload: bytes) -> None:
        try:
            await self.link.publish(agent_topic(mark.agent, Channel.WATERMARK), payload, retain=True)
        except asyncio.CancelledError:
            self.ingest.watermarks.give_back(mark)
            raise

    def _submit_deferred(self) -> None:
        """Actions decided in a batch start only once it is committed (their decision is durable)."""
        actions = self._actions_retry + self._deferred
        self._actions_retry = []
        self._deferred.clear()  # in place: the tracker holds this list's append
        for action in actions:
            try:
                self.actions.submit(action)
            except Exception as exc:  # its desktop side could not be stored: submitted again next tick
                self._actions_retry.append(action)
                _log_failure("action_not_submitted", exc)

    async def _publish_policy(self) -> None:
        try:
            payload = self.policy.signed_document()
            await self.link.publish(POLICY_TOPIC, payload, retain=True)
        except Exception:  # runs outside the task group (on connect): log, the next connect retries
            log.exception("policy_publish_failed")
            return
        try:
            self.recorder.record(
                "policy.published",
                self.policy.policy.id,
                {"version": self.policy.policy.version, "hash": self.policy.hash},
            )
        except Exception as exc:  # published; only its audit entry is missing
            _log_failure("policy_published_not_audited", exc)
        log.info("policy_published", policy=f"{self.policy.policy.id}@{self.policy.policy.version}")

    async def _silence_ticker(self) -> None:
        last_prune = 0.0
        while True:
            await asyncio.sleep(self.settings.silence_check_s)
            now = time.time()
            try:
                self._reload_files()
                if not self._commit_failing and now >= self._silence_hold_until:
                    self.tracker.tick(now)
                self.ingest.tick(now)  # reject windows due, counts of dropped messages, orphaned windows
                self.checkpointer.maybe(self.store.audit_head(), now)
                self._submit_deferred()
                if now - last_prune > PRUNE_EVERY_S:
                    last_prune = now
                    self.store.prune_messages(now - DEDUP_WINDOW_S)
            except Exception as exc:
                self._deferred.clear()
                _log_failure("silence_check_failed", exc)

    async def _keep_crl(self, keeper: CrlKeeper) -> None:
        """Re-issue the CRL before it expires and hand it to a broker on this host (``broker_dir``)."""
        while True:
            try:
                update = keeper.check()
            except Exception as exc:  # PkiError, BrokerConfigError, OSError: said, and tried again
                log.warning("crl_check_failed", error=str(exc))
            else:
                if update is not None:
                    data = {
                        "refreshed": update.refreshed,
                        "crl_number": update.crl_number,
                        "revoked": update.revoked,
                        "broker_pid": update.broker_pid,
                    }
                    log.info("crl_published", **data)
                    try:
                        self.recorder.record("trust.crl_published", "crl", data)
                    except Exception as exc:  # the CRL is out; only its audit entry is missing
                        _log_failure("crl_published_not_audited", exc)
            await asyncio.sleep(CRL_CHECK_EVERY_S)

    async def _watch_revocations(self) -> None:
        """``agents revoke`` (another process) marks agents revoked in the store: within a second their keys
        are dropped here and their endpoints judged in violation, so the policy's actions apply."""
        while True:
            await asyncio.sleep(REVOCATION_CHECK_S)
            try:
                revoked = self.store.revoked_agents()
                for agent in sorted(set(revoked) - self._revoked):
                    self.keys.forget(agent)
                    with self.store.transaction():
                        self.tracker.on_revoked(agent, now=time.time(), reason="operator")
                    self._submit_deferred()
                    log.warning("agent_revoked", agent=agent)
                self._revoked = set(revoked)
            except Exception as exc:  # the next check tries again (what is not in _revoked yet)
                self._deferred.clear()
                _log_failure("revocation_check_failed", exc)

    async def _drive_desktops(self) -> None:
        """Every second: desktops with a step to do (a restart's resume, an operator's `desktops wipe`) are
        driven, and `sessions end` commands written by the CLI are sent."""
        while True:
            # Sleep first: commands resumed at start (command_retries) register as delivering when they run.
            await asyncio.sleep(DESKTOP_POLL_S)
            try:
                self.desktops.poll()
                for command in self.store.commands(CommandState.PENDING):
                    if not self.driver.delivering(command.id):
                        self._spawn(self._resume(command.id), f"command:{command.id}")
            except Exception as exc:
                _log_failure("desktops_poll_failed", exc)

    async def _desktops_changed(self) -> None:
        try:
            self.desktops.sync()
        except Exception as exc:
            self._reload_due.add("desktops")
            _log_failure("desktops_sync_failed", exc)

    def _reload_files(self) -> None:
        """A policy or desktops file change that could not be stored when it was seen, tried again."""
        if "policy" in self._reload_due:
            if self.policy.reload() and self.link.connected and self._tg is not None:
                self._tg.create_task(self._publish_policy(), name="policy_publish")
            self._reload_due.discard("policy")
        if "desktops" in self._reload_due:
            self.desktops_keeper.reload()
            self.desktops.sync()
            self._reload_due.discard("desktops")

    async def _resume_commands(self) -> None:
        for command in self.store.commands(CommandState.PENDING):
            log.info("command_resumed", command=command.id, agent=command.agent)
            self._spawn(self._resume(command.id), f"command:{command.id}")

    async def _resume(self, command_id: str) -> None:
        command = self.store.command(command_id)
        if command is None:
            return
        outcome = await self.driver.deliver(command)
        self.actions.apply(command.agent, command.session_id, outcome)

    async def _watch_policy(self) -> None:
        async def changed() -> None:
            if self.link.connected:
                await self._publish_policy()
            # otherwise the next connect publishes it

        await self.policy.watch(changed, on_failed=lambda exc: self._reload_failed("policy", exc))

    async def _watch_desktops(self) -> None:
        await self.desktops_keeper.watch(
            self._desktops_changed, on_failed=lambda exc: self._reload_failed("desktops", exc)
        )

    def _reload_failed(self, what: str, exc: Exception) -> None:
        self._reload_due.add(what)
        _log_failure(f"{what}_reload_failed", exc)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Run until ``stop`` is set (or SIGTERM/SIGINT when not given)."""
        self.policy.load_initial()
        self.desktops_keeper.load_initial()  # DesktopsError: refused, like a broken policy at start
        self.desktops.sync()
        embedded = EmbeddedBroker(self.address.port) if self.settings.embedded_broker else None
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        self.recorder.record(
            "controller.started",
            self.settings.id,
            {"broker": self.address.url, "policy": self.policy.hash},
        )
        try:
            if embedded is not None:
                await embedded.start()
            try:
                async with asyncio.TaskGroup() as tg:
                    self._tg = tg
                    tg.create_task(self.link.run(), name="broker_link")
                    tg.create_task(self._ingest(), name="ingest")
                    tg.create_task(self._publish_watermarks(), name="watermarks")
                    tg.create_task(self._silence_ticker(), name="silence_ticker")
                    tg.create_task(self._watch_policy(), name="policy_watcher")
                    tg.create_task(self._resume_commands(), name="command_retries")
                    if self.crl_keeper is not None:
                        tg.create_task(self._keep_crl(self.crl_keeper), name="crl_keeper")
                    if self.enrolment is not None:
                        tg.create_task(self.enrolment.serve(), name="enrolment")
                    tg.create_task(self._watch_revocations(), name="revocations")
                    tg.create_task(self._drive_desktops(), name="desktops")
                    tg.create_task(self._watch_desktops(), name="desktops_watch")
                    tg.create_task(self._stop_on(stop), name="stop")
            except* Stop:
                pass
        finally:
            self._tg = None
            if embedded is not None:
                await embedded.shutdown()
            try:
                self.ingest.close()  # the open reject windows go into the audit trail now
            except Exception as exc:
                _log_failure("reject_windows_not_written", exc)
            try:
                self.recorder.record("controller.stopped", self.settings.id, {})
                self.checkpointer.maybe(self.store.audit_head(), time.time(), force=True)
            except (OSError, DatabaseUnavailable) as exc:
                _log_failure("checkpoint_not_written", exc)
            self.store.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            log.info("controller_stopped")

    async def _stop_on(self, stop: asyncio.Event) -> None:
        await stop.wait()
        await self._drain()
        self.link.request_stop()
        if self.enrolment is not None:
            # Let the endpoint close its socket and finish a request in flight before the group is cancelled.
            self.enrolment.request_stop()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.enrolment.stopped.wait(), 3.0)
        raise Stop

    async def _drain(self) -> None:
        """Stopping: read no more, commit and acknowledge what is in hand (the inbox and the batch being
        applied), then send the watermarks. Bounded by ``DRAIN_S``: a database that still refuses writes
        leaves the rest unacknowledged, and the broker delivers it to the next start."""
        self.link.stop_reading()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + DRAIN_S
        while (self._in_hand or self._inbox.qsize()) and loop.time() < deadline:
            self._batch_done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._batch_done.wait(), deadline - loop.time())
        if self._in_hand or self._inbox.qsize():
            log.warning("stopped_with_messages_in_hand", messages=self._in_hand + self._inbox.qsize())
        if self.link.connected:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._send_watermarks(), max(0.1, min(2.0, deadline - loop.time())))
        log.info("ingest_drained", acked=self.link.acked)
