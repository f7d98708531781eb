"""Fixtures shared by all tests: a real Mosquitto per test that wants one; one real PostgreSQL per session
(started only when a test asks for it) with a fresh database per test; ``open_store``, run once per backend."""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.support.mosquitto import Mosquitto
from tests.support.postgres import Postgres

if TYPE_CHECKING:  # the agent's tests do not import the controller
    from cleanroom_controller.store import Store


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One private PostgreSQL server for the session (stopped at its end, also after failures)."""
    with Postgres() as server:
        yield server


_database_numbers = itertools.count(1)


@pytest.fixture
def postgres_url(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's server (named after the test, for the server's log)."""
    name = re.sub(r"[^a-z0-9_]", "_", request.node.name.lower())[:40]
    return postgres.create_database(f"t{next(_database_numbers)}_{name}")


StoreOpener = Callable[[], "Store"]


@pytest.fixture(params=["sqlite", "postgresql"])
def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StoreOpener]:
    """Opens (again: each call is a new connection) the test's store, once on SQLite in ``tmp_path`` and once
    on a fresh PostgreSQL database; the server starts only for tests that use this."""
    from cleanroom_controller.store import Store

    database = None if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    opened: list[Store] = []

    def open_() -> Store:
        store = Store.open(tmp_path, database)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
