"""The agent driver: a signed ``end_session`` command on ``cleanroom/v1/agents/{id}/commands`` (QoS 1).

Each attempt republishes the same command (same id, a new seq: the agent answers a retried id with the same
ack) and waits for the ack with a doubling timeout. An offline or frozen agent cannot answer: the broker
keeps the command queued for its persistent session, the outcome here is ``expired`` and the agent's
fail-closed rule ends the session on its own side. Every attempt and the outcome are audited.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import structlog

from cleanroom_protocol import Ack, Channel, Command, CommandAction, Kind, agent_topic

from ..decide import retry_delay
from ..models import CommandRecord, CommandState
from ..recorder import Recorder
from ..signer import Signer
from ..store import Store
from .base import Outcome, SessionDriver

log = structlog.get_logger("cleanroom.controller.driver.agent")


class Publisher(Protocol):
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None: ...


class AgentDriver(SessionDriver):
    name = "agent"

    def __init__(
        self,
        *,
        store: Store,
        recorder: Recorder,
        signer: Signer,
        publisher: Publisher,
        timeout_s: float,
        attempts: int,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._recorder = recorder
        self._signer = signer
        self._publisher = publisher
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._clock = clock
        self._waiters: dict[str, asyncio.Future[Ack | None]] = {}  # None: cancelled
        self._send_lock = asyncio.Lock()

    async def end_session(self, agent: str, session_id: str | None, reason: str) -> Outcome:
        command = CommandRecord(
            id=f"c-{uuid.uuid4().hex}",
            agent=agent,
            session_id=session_id,
            action=CommandAction.END_SESSION.value,
            reason=reason[:4096],
            state=CommandState.PENDING,
            created=self._clock(),
        )
        self._store.save_command(command)
        return await self.deliver(command)

    def ack_received(self, agent: str, ack: Ack) -> None:
        """Called by ingest for every verified ack; wakes the attempt loop waiting for it."""
        waiter = self._waiters.get(ack.command_id)
        if waiter is not None and not waiter.done():
            command = self._store.command(ack.command_id)
            if command is not None and command.agent == agent:
                waiter.set_result(ack)

    def cancel_pending(self, agent: str, reason: str) -> int:
        """Stop retrying ``agent``'s unanswered commands (a copy already queued at the broker may still
        reach the agent: MQTT 3.1.1 has no message expiry; the agent's stale check bounds it)."""
        cancelled = 0
        for command in self._store.commands(CommandState.PENDING):
            if command.agent != agent:
                continue
            self._store.save_command(
                replace(command, state=CommandState.CANCELLED, result="cancelled", detail=reason)
            )
            self._recorder.record("command.cancelled", agent, {"id": command.id, "reason": reason})
            waiter = self._waiters.get(command.id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            cancelled += 1
        return cancelled

    async def deliver(self, command: CommandRecord) -> Outcome:
        """Send ``command`` until acked or out of attempts (also resumes pending commands after a restart)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Ack | None] = loop.create_future()
        self._waiters[command.id] = waiter
        body = Command(
            id=command.id,
            action=CommandAction(command.action),
            session_id=command.session_id,
            reason=command.reason,
        )
        topic = agent_topic(command.agent, Channel.COMMANDS)
        try:
            for attempt in range(command.attempts + 1, self._attempts + 1):
                current = self._store.command(command.id)
                if current is not None and current.state in (CommandState.ACKED, CommandState.CANCELLED):
                    # Acked or cancelled while nobody waited (e.g. across a restart).
                    return Outcome(command.id, current.result or "", current.detail, current.attempts)
                command = replace(command, attempts=attempt, last_sent=self._clock())
                self._store.save_command(command)
                delay = retry_delay(attempt, self._timeout_s)
                sent = True
                # Seal and publish under one lock: the agent rejects a seq below one it already accepted,
                # so concurrent commands must reach the broker in seq order.
                async with self._send_lock:
                    seq, payload = self._signer.seal(Kind.COMMAND, body)
                    try:
                        await asyncio.wait_for(self._publisher.publish(topic, payload), timeout=delay)
                    except (TimeoutError, OSError, ConnectionError) as exc:
                        sent = False
                        log.warning(
                            "command_not_sent", command=command.id, agent=command.agent, error=str(exc)
                        )
                self._recorder.record(
                    "command",
                    command.agent,
                    {
                        "id": command.id,
                        "action": command.action,
                        "session_id": command.session_id,
                        "reason": command.reason,
                        "attempt": attempt,
                        "seq": seq,
                        "published": sent,
                    },
                )
                try:
                    ack = await asyncio.wait_for(asyncio.shield(waiter), timeout=delay)
                except TimeoutError:
                    log.info("command_unanswered", command=command.id, agent=command.agent, attempt=attempt)
                    continue
                if ack is None:
                    return Outcome(command.id, "cancelled", "the endpoint is compliant again", attempt)
                return Outcome(command.id, ack.result.value, ack.detail, attempt)
            detail = (
                f"no ack after {command.attempts} attempts; stays queued for the agent's persistent session, "
                "and the agent fails closed on its own when cut off"
            )
            command = replace(command, state=CommandState.EXPIRED, result="expired", detail=detail)
            self._store.save_command(command)
            self._recorder.record(
                "command.expired",
                command.agent,
                {"id": command.id, "attempts": command.attempts, "detail": detail},
            )
            return Outcome(command.id, "expired", detail, command.attempts)
        finally:
            self._waiters.pop(command.id, None)
