"""What a command signed by the controller must also be: for this agent, unexpired, valid for a bounded
time, with a nonce no other command used. A retry (same id, same nonce) passes."""

from __future__ import annotations

import secrets

from cleanroom_agent.control.commandchecks import Admitted, Refusal, check_command
from cleanroom_protocol import Command, CommandAction
from cleanroom_protocol.messages import MAX_COMMAND_LIFETIME_S

NOW = 1_700_000_000.0
NONCE = secrets.token_hex(16)


def command(**fields: object) -> Command:
    body: dict[str, object] = {
        "id": "c-1",
        "action": CommandAction.END_SESSION,
        "agent": "ep-1",
        "nonce": NONCE,
        "expires_at": NOW + 60,
    }
    body.update(fields)
    return Command.model_validate(body)


def check(c: Command, *, nonce_owner: str | None = None, now: float = NOW) -> Admitted | Refusal:
    return check_command(c, agent_id="ep-1", signed_at=NOW - 1, now=now, nonce_owner=nonce_owner)


def status(result: Admitted | Refusal) -> str:
    return result.status if isinstance(result, Refusal) else "admitted"


def test_a_fresh_command_for_us_is_admitted_with_its_nonce_and_expiry() -> None:
    assert check(command()) == Admitted(NONCE, NOW + 60)


def test_a_retry_of_the_same_command_passes_the_nonce_check() -> None:
    assert status(check(command(), nonce_owner="c-1")) == "admitted"


def test_a_nonce_used_by_another_command_is_a_replay() -> None:
    refused = check(command(id="c-2"), nonce_owner="c-1")
    assert isinstance(refused, Refusal) and refused.status == "replayed"
    assert "'c-1'" in refused.detail


def test_a_command_for_another_agent_is_refused() -> None:
    refused = check(command(agent="ep-2"))
    assert isinstance(refused, Refusal) and refused.status == "not_for_us"
    assert "'ep-2'" in str(refused)


def test_an_expired_command_is_refused() -> None:
    assert status(check(command(), now=NOW + 60)) == "admitted"  # valid up to its expiry
    assert status(check(command(), now=NOW + 61)) == "expired"


def test_a_command_valid_for_too_long_is_refused() -> None:
    assert status(check(command(expires_at=NOW - 1 + MAX_COMMAND_LIFETIME_S))) == "admitted"
    assert status(check(command(expires_at=NOW + MAX_COMMAND_LIFETIME_S))) == "malformed"


def test_a_command_without_agent_nonce_or_expiry_is_refused() -> None:
    for missing in ("agent", "nonce", "expires_at"):
        refused = check(command(**{missing: None}))
        assert isinstance(refused, Refusal) and refused.status == "malformed", missing
        assert missing in refused.detail
