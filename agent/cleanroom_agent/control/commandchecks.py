"""What a command signed by the controller must also be before the agent acts on it (pure, no I/O).

The signature says who wrote a command, not that it is meant for this endpoint now: a copy captured on the
wire or queued at the broker could be delivered again hours later, or to another endpoint. So a command
names its agent, carries a nonce and an expiry, and this refuses it when it is for someone else, expired,
valid for longer than :data:`MAX_COMMAND_LIFETIME_S`, or carries a nonce another command already used.

A retry by the controller is the same command again (same id, same nonce, a new envelope seq): the nonce
belongs to that id, so it passes here, and the command handler answers it with the ack it already sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from cleanroom_protocol import Command
from cleanroom_protocol.messages import MAX_COMMAND_LIFETIME_S


@dataclass(frozen=True, slots=True)
class Refusal:
    status: str  # "malformed" | "not_for_us" | "expired" | "replayed"
    detail: str

    def __str__(self) -> str:
        return f"{self.status}: {self.detail}"


@dataclass(frozen=True, slots=True)
class Admitted:
    """The agent may act on the command; remember its nonce until it expires."""

    nonce: str
    expires_at: float


def check_command(
    command: Command, *, agent_id: str, signed_at: float, now: float, nonce_owner: str | None
) -> Admitted | Refusal:
    """:class:`Admitted` if the agent may act on ``command``; otherwise a :class:`Refusal` saying why not.

    ``signed_at``: the envelope's ``ts``; ``nonce_owner``: the id of the unexpired command that already
    used this command's nonce, if any."""
    nonce, expires_at = command.nonce, command.expires_at
    if command.agent is None or nonce is None or expires_at is None:
        missing = [name for name in ("agent", "nonce", "expires_at") if getattr(command, name) is None]
        return Refusal("malformed", f"command {command.id!r} without {', '.join(missing)}")
    if command.agent != agent_id:
        return Refusal(
            "not_for_us", f"command {command.id!r} is for agent {command.agent!r}, not {agent_id!r}"
        )
    lifetime = expires_at - signed_at
    if lifetime > MAX_COMMAND_LIFETIME_S:
        return Refusal(
            "malformed",
            f"command {command.id!r} is valid for {lifetime:.0f} s, over the {MAX_COMMAND_LIFETIME_S:.0f} s limit",
        )
    if now > expires_at:
        return Refusal("expired", f"command {command.id!r} expired {now - expires_at:.0f} s ago")
    if nonce_owner is not None and nonce_owner != command.id:
        return Refusal("replayed", f"nonce of command {command.id!r} already used by command {nonce_owner!r}")
    return Admitted(nonce, expires_at)
