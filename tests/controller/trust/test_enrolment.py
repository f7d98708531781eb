"""Enrolment tokens (pure): format, what is stored, and every refusal, in the order that reveals nothing
to a guesser."""

from __future__ import annotations

import dataclasses

import pytest

from cleanroom_controller.trust.enrolment import (
    Refusal,
    TokenFormatError,
    mint,
    parse_duration,
    parse_token,
    refusal,
    secret_digest,
)

CA = "sha256:" + "ab" * 32


def test_a_minted_token_round_trips_and_only_the_secret_digest_is_kept() -> None:
    token, record = mint(CA, site="manila", now=1000.0, ttl_s=3600, uses=1, created_by="ops")
    text = str(token)
    assert text.startswith("cr1.") and text.endswith("." + "ab" * 32)
    assert parse_token(text) == token
    assert token.secret not in repr(record) and record.secret_sha256 == secret_digest(token.secret)
    assert (record.site, record.expires_at, record.uses_allowed, record.uses) == ("manila", 4600.0, 1, 0)


def test_two_tokens_never_share_id_or_secret() -> None:
    tokens = [mint(CA, site="", now=0, ttl_s=60, uses=1, created_by="")[0] for _ in range(200)]
    assert len({t.id for t in tokens}) > 190 and len({t.secret for t in tokens}) == 200


@pytest.mark.parametrize(
    "text",
    ["", "cr1", "cr2.0123abcd." + "A" * 43 + "." + "ab" * 32, "cr1.0123abcd.short." + "ab" * 32,
     "cr1.0123ABCD." + "A" * 43 + "." + "ab" * 32, "cr1.0123abcd." + "A" * 43 + "." + "ab" * 31],
)  # fmt: skip
def test_malformed_tokens_are_refused_without_echoing_the_secret(text: str) -> None:
    with pytest.raises(TokenFormatError) as caught:
        parse_token(text)
    assert "A" * 20 not in str(caught.value)


def test_refusals() -> None:
    token, record = mint(CA, site="", now=1000.0, ttl_s=60, uses=2, created_by="")
    assert refusal(record, token.secret, 1000.0) is None
    assert refusal(None, token.secret, 1000.0) is Refusal.UNKNOWN
    assert refusal(record, "x" * 43, 1000.0) is Refusal.BAD_SECRET
    assert refusal(record, token.secret, 1060.0) is Refusal.EXPIRED
    assert refusal(dataclasses.replace(record, uses=2), token.secret, 1000.0) is Refusal.USED_UP
    assert refusal(dataclasses.replace(record, revoked_at=1001.0), token.secret, 1002.0) is Refusal.REVOKED
    # a wrong secret is named before anything about the token (state, expiry) is revealed
    assert refusal(dataclasses.replace(record, revoked_at=1.0), "y" * 43, 5000.0) is Refusal.BAD_SECRET


def test_durations_and_bounds() -> None:
    assert [parse_duration(d) for d in ("90s", "30m", "24h", "7d")] == [90, 1800, 86400, 604800]
    for bad in ("", "24", "1w", "-1h", "1.5h"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)
    with pytest.raises(ValueError, match="lifetime"):
        mint(CA, site="", now=0, ttl_s=40 * 86400, uses=1, created_by="")
    with pytest.raises(ValueError, match="uses"):
        mint(CA, site="", now=0, ttl_s=60, uses=0, created_by="")
