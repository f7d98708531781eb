"""The agent driver: a signed ``end_session`` command on ``cleanroom/v1/agents/{id}/commands`` (QoS 1).

Each attempt republishes the same command (same id, same nonce, same expiry, a new seq: the agent answers a
retried id with the same ack) and waits for the ack with a doubling timeout. An offline or frozen agent
cannot answer: the broker keeps the command queued for its persistent session, the outcome here is
``expired`` and the agent's fail-closed rule ends the session on its own side. Every attempt and the
outcome are audited.

A command names its agent and carries a random 128-bit nonce and an expiry (:func:`command_lifetime`), so
a copy captured on the wire, or left queued at the broker, is refused by the agent once it has expired,
and cannot be passed off as another command; MQTT 3.1.1 has no message expiry of its own.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Protocol

import structlog

from cleanroom_protocol import DEFAULT_MAX_SKEW_S, Ack, Channel, Command, CommandAction, Kind, agent_topic
from cleanroom_protocol.messages import MAX_COMMAND_LIFETIME_S

from ...audit.recorder import Recorder
from ...decisions.decide import retry_delay
from ...models import CommandRecord, CommandState
from ...store import Store
from ...trust.signer import Signer
from .base import Outcome, SessionDriver

log = structlog.get_logger("cleanroom.controller.driver.agent")


def command_lifetime(timeout_s: float, attempts: int) -> float:
    """How long a command stays valid: every attempt's ack wait (the whole retry schedule), plus the clock
    skew the envelope check already tolerates (an agent whose clock runs that far ahead still accepts the
    last retry), at most ``MAX_COMMAND_LIFETIME_S``. Defaults (5 s, 6 attempts): 155 s + 300 s = 455 s."""
    schedule = sum(retry_delay(attempt, timeout_s) for attempt in range(1, attempts + 1))
    return min(schedule + DEFAULT_MAX_SKEW_S, MAX_COMMAND_LIFETIME_S)


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
        self._lifetime_s = command_lifetime(timeout_s, attempts)
        self._clock = clock
        self._waiters: dict[str, asyncio.Future[Ack | None]] = {}  # None: cancelled
        self._send_lock = asyncio.Lock()

    async def end_session(self, agent: str, session_id: str | None, reason: str) -> Outcome:
        now = self._clock()
        command = CommandRecord(
            id=f"c-{uuid.uuid4().hex}",
            agent=agent,
            session_id=session_id,
            action=CommandAction.END_SESSION.value,
            reason=reason[:4096],
            state=CommandState.PENDING,
            created=now,
            nonce=secrets.token_hex(16),
            expires_at=now + self._lifetime_s,
        )
        self._store.save_command(command)
        return await self.deliver(command)

    def delivering(self, command_id: str) -> bool:
        """Whether an attempt loop here is sending ``command_id`` now (a pending command nobody sends, e.g.
        one `sessions end` wrote, is picked up by the daemon)."""
        return command_id in self._waiters

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
        if not command.nonce or command.expires_at is None:  # pending since before commands carried them
            command = replace(
                command, nonce=secrets.token_hex(16), expires_at=self._clock() + self._lifetime_s
            )
            self._store.save_command(command)
        expires_at = command.expires_at
        body = Command(
            id=command.id,
            action=CommandAction(command.action),
            session_id=command.session_id,
            reason=command.reason,
            agent=command.agent,
            nonce=command.nonce,
            expires_at=expires_at,
        )
        topic = agent_topic(command.agent, Channel.COMMANDS)
        try:
            for attempt in range(command.attempts + 1, self._attempts + 1):
                current = self._store.command(command.id)
                if current is not None and current.state in (CommandState.ACKED, CommandState.CANCELLED):
                    # Acked or cancelled while nobody waited (e.g. across a restart).
                    return Outcome(command.id, current.result or "", current.detail, current.attempts)
                if expires_at is not None and self._clock() >= expires_at:
                    break  # the agent would refuse it now (e.g. resumed after a long controller outage)
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
                        "expires_at": expires_at,
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
                f"no ack after {command.attempts} attempts, valid until {expires_at}; the agent refuses it "
                "after that, and fails closed on its own when cut off"
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
