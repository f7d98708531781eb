"""The PostgreSQL store across a server restart: a lost connection is ``DatabaseUnavailable`` (not a psycopg
error), the next statement connects again, a transaction lost with its connection is never continued on the
new one, and reconnects wait their backoff.

A private server of its own (tests/support/postgres.py), not the session's: it is stopped and started
(``pg_ctl stop -m fast``, as an operator's restart) under the store. The backoff's clock is the only thing
simulated (a fake monotonic clock, so the test need not wait out a real backoff)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from cleanroom_controller.store import DatabaseUnavailable, Store
from cleanroom_controller.store.postgres import PostgresBackend
from tests.support.postgres import Postgres


@pytest.fixture(scope="module")
def server() -> Iterator[Postgres]:
    with Postgres() as pg:
        yield pg


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def open_store(url: str, clock: Clock, backoff_s: float = 0.0) -> tuple[Store, PostgresBackend]:
    backend = PostgresBackend(url, backoff=lambda attempt: backoff_s, clock=clock)
    return Store(backend), backend


def test_a_statement_after_a_server_restart_reconnects(server: Postgres) -> None:
    store, backend = open_store(server.create_database("reconnect"), Clock())
    store.set_meta("before", "1")
    server.stop_server()
    try:
        with pytest.raises(DatabaseUnavailable, match="connection lost"):
            store.get_meta("before")
        with pytest.raises(DatabaseUnavailable):
            store.get_meta("before")  # still down: refused again, no psycopg error escapes
    finally:
        server.start_server()
    assert store.get_meta("before") == "1"
    assert backend.reconnects == 1
    store.close()


def test_a_transaction_lost_with_its_connection_is_not_continued_on_a_new_one(server: Postgres) -> None:
    """Without the rule, the rest of the transaction (a nested ``store.transaction()`` joins it) would run
    on the new connection in autocommit, without the writer lock, half of it committed."""
    store, _ = open_store(server.create_database("lost_tx"), Clock())
    lost: list[str] = []

    def lost_transaction() -> None:
        with store.transaction():
            store.set_meta("first", "1")
            server.stop_server()
            server.start_server()
            for key in ("second", "third"):
                try:
                    with store.transaction():  # the second joins the lost one, as a nested user would
                        store.set_meta(key, key)
                except DatabaseUnavailable:
                    lost.append(key)  # the server is back, the transaction is not

    with pytest.raises(DatabaseUnavailable):
        lost_transaction()
    assert lost == ["second", "third"]
    # Ended (rolled back): the next transaction runs on a new connection, and nothing of the lost one is there.
    with store.transaction():
        store.set_meta("after", "4")
    assert [store.get_meta(k) for k in ("first", "second", "third", "after")] == [None, None, None, "4"]
    store.close()


def test_reconnects_wait_their_backoff(server: Postgres) -> None:
    clock = Clock()
    store, backend = open_store(server.create_database("backoff"), clock, backoff_s=3.0)
    server.stop_server()
    try:
        with pytest.raises(DatabaseUnavailable, match="connection lost"):
            store.get_meta("x")  # the loss; the first reconnect is tried at the next statement
        with pytest.raises(DatabaseUnavailable, match="cannot connect"):
            store.get_meta("x")  # tried, failed: the next one waits 3 s
    finally:
        server.start_server()
    clock.now += 2.9
    with pytest.raises(DatabaseUnavailable, match=r"next attempt in 0\.1 s"):
        store.get_meta("x")  # the server is back, but the backoff is not over: not even tried
    assert backend.reconnects == 0
    clock.now += 0.2
    assert store.get_meta("x") is None
    assert backend.reconnects == 1
    store.close()


def test_the_connection_gives_up_on_a_vanished_server_in_seconds_unless_the_url_says_otherwise(
    server: Postgres,
) -> None:
    """libpq's keepalives and tcp_user_timeout are on by default (a dead host is noticed in ~30 s, not the
    kernel's ~15 min); a URL that sets one keeps its own value. Read back from the live connection."""
    url = server.create_database("tcp")
    _, backend = open_store(url, Clock())
    used = backend._db.info.get_parameters()
    assert used["tcp_user_timeout"] == "30000" and used["keepalives_idle"] == "10", used
    sep = "&" if "?" in url else "?"
    _, own = open_store(f"{url}{sep}tcp_user_timeout=5000", Clock())
    assert own._db.info.get_parameters()["tcp_user_timeout"] == "5000"
    backend.close()
    own.close()
