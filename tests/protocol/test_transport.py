"""The broker address and reconnect loop both sides share: URLs parsed once with clear errors that never
show a credential, and a reconnect loop that backs off, resets once connected and ends only on request."""

from __future__ import annotations

import asyncio

import pytest

from cleanroom_protocol import BrokerUrlError, Reconnector, backoff_delay, parse_broker_url, redact_url


def test_broker_urls_and_their_safe_form() -> None:
    assert parse_broker_url("mqtt://broker.example:1884").url == "mqtt://broker.example:1884"
    assert parse_broker_url("mqtts://broker.example").url == "mqtts://broker.example:8883"
    assert parse_broker_url("mqtt://[::1]").url == "mqtt://[::1]:1883"
    for bad, why in (
        ("http://x:1", "scheme"),
        ("mqtt://", "no host"),
        ("mqtt://h:99999", "out of range"),
        ("mqtt://h:1/path", "only mqtt"),
        ("mqtt://h:1?x=1", "only mqtt"),
    ):
        with pytest.raises(BrokerUrlError, match=why):
            parse_broker_url(bad)


@pytest.mark.parametrize(
    "url",
    ["mqtts://user:s3cret-pw@broker:8883", "mqtt://s3cret-pw@broker", "mqtts://u:s3cret-pw@broker:99999"],
)
def test_credentials_in_a_url_are_refused_and_never_shown(url: str) -> None:
    with pytest.raises(BrokerUrlError) as caught:
        parse_broker_url(url)
    assert "s3cret-pw" not in str(caught.value)
    assert "***@broker" in str(caught.value)


def test_redact_url_masks_only_the_user_info() -> None:
    assert redact_url("mqtts://a:b@h:1/x") == "mqtts://***@h:1/x"
    assert redact_url("mqtt://h:1") == "mqtt://h:1"
    assert redact_url("no scheme") == "no scheme"


def test_backoff_is_jittered_and_capped() -> None:
    delays = [backoff_delay(50) for _ in range(200)]
    assert all(0 <= d <= 1.5**10 for d in delays)
    assert len({round(d, 6) for d in delays}) > 150  # jitter: no two agents retry in lock step


async def test_reconnector_backs_off_resets_once_connected_and_stops_on_request() -> None:
    seen: list[tuple[str, int]] = []
    reconnector = Reconnector(backoff=lambda attempt: 0.0)
    sessions = 0

    async def session() -> None:
        nonlocal sessions
        sessions += 1
        if sessions == 3:
            reconnector.connected()  # up: the next loss starts the backoff again from attempt 1
            raise ConnectionResetError("lost")
        if sessions == 5:
            reconnector.request_stop()
            raise OSError("lost while stopping: must not reconnect")
        raise ConnectionRefusedError("refused")

    def lost(error: Exception | None, attempt: int, delay: float) -> None:
        seen.append((type(error).__name__, attempt))

    await asyncio.wait_for(reconnector.run(session, lost), 5)
    assert sessions == 5
    assert seen == [
        ("ConnectionRefusedError", 1),
        ("ConnectionRefusedError", 2),
        ("ConnectionResetError", 1),
        ("ConnectionRefusedError", 2),
    ]


async def test_a_stop_requested_during_the_backoff_starts_no_new_session() -> None:
    reconnector = Reconnector(backoff=lambda attempt: 0.05)
    sessions = 0

    async def session() -> None:
        nonlocal sessions
        sessions += 1
        raise ConnectionRefusedError

    task = asyncio.create_task(reconnector.run(session, lambda *_: reconnector.request_stop()))
    await asyncio.wait_for(task, 5)
    assert sessions == 1
