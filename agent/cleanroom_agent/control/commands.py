"""Commands from the controller (verified by the link): ``end_session``, answered with one signed ack.

Commands are idempotent by id: a command already processed gets its remembered ack again, never a second
action.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import structlog

from cleanroom_protocol import Ack, AckResult, Command, CommandAction, Mode, SessionInfo

from ..messaging.outbox import Outbox
from ..messaging.spool import Spool
from ..sessions.ending import SessionEnder

log = structlog.get_logger("cleanroom_agent.control.commands")


class CommandHandler:
    """``observe`` reads the process table now; ``running`` lists the sessions it left running."""

    def __init__(
        self,
        *,
        mode: Mode,
        spool: Spool,
        outbox: Outbox,
        observe: Callable[[], Awaitable[object]],
        running: Callable[[], list[SessionInfo]],
        ender: SessionEnder,
    ) -> None:
        self._mode = mode
        self._spool = spool
        self._outbox = outbox
        self._observe = observe
        self._running = running
        self._ender = ender

    async def handle(self, command: Command) -> None:
        if self.resend_ack(command.id):
            return
        if command.action is not CommandAction.END_SESSION:
            ack = Ack(
                command_id=command.id, result=AckResult.REJECTED, detail=f"unknown action {command.action}"
            )
        else:
            await self._observe()  # a session started a moment ago must be found
            targets = [s for s in self._running() if command.session_id in (None, s.id)]
            if not targets:
                ack = Ack(command_id=command.id, result=AckResult.NOT_FOUND, detail="no such session running")
            elif self._mode is Mode.AUDIT:
                ack = Ack(
                    command_id=command.id,
                    result=AckResult.AUDIT_ONLY,
                    sessions=[s.id for s in targets],
                    detail="audit mode: nothing ended",
                )
            else:
                ended, failed = await self._ender.end(targets, reason=f"end_session:{command.reason}"[:200])
                ack = Ack(
                    command_id=command.id,
                    result=AckResult.FAILED if failed else AckResult.ENDED,
                    sessions=ended + failed,
                    detail=f"not ended: {','.join(failed)}" if failed else "",
                )
        self._spool.remember_command(command.id, ack.model_dump(mode="json"))
        self._outbox.ack(ack)
        log.info("command_done", command=command.id, result=ack.result.value, sessions=ack.sessions)

    def resend_ack(self, command_id: str) -> bool:
        """A command already processed gets the same ack again (commands are idempotent by id)."""
        previous = self._spool.command_ack(command_id)
        if previous is None:
            return False
        self._outbox.ack(Ack.model_validate(previous))
        return True
