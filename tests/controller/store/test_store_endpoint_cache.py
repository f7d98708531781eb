"""The store's endpoint cache (one write transaction's reads and writes of ``endpoints``, filled for a whole
ingest batch by ``prefetch_endpoints``) never answers with what the database no longer holds: a unit rolled
back takes its saved endpoints with it, and outside a transaction every read goes to the database. On SQLite
and on a real PostgreSQL (``open_store``)."""

from __future__ import annotations

import dataclasses

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import Store
from cleanroom_controller.models import Condition, EndpointState
from tests.conftest import StoreOpener
from tests.controller.helpers import enrol


class Boom(Exception):
    pass


def save_then_fail(store: Store, ep: EndpointState) -> None:
    with store.savepoint():
        store.save_endpoint(ep)
        raise Boom


def test_prefetched_endpoints_are_the_stored_ones_and_follow_saves(open_store: StoreOpener) -> None:
    store = open_store()
    for agent in ("a1", "a2"):
        enrol(store, agent, Ed25519PrivateKey.generate())
    saved = dataclasses.replace(
        EndpointState("a1"), condition=Condition.VIOLATION, reasons=("denied_process:x",), last_seq=7
    )
    store.save_endpoint(saved)
    with store.transaction():
        store.prefetch_endpoints(["a1", "a2", "never-enrolled"])
        assert store.endpoint("a1") == saved
        assert store.endpoint("a2") == EndpointState("a2", online=None)
        assert store.endpoint("never-enrolled") == EndpointState("never-enrolled")
        later = dataclasses.replace(saved, last_seq=8)
        store.save_endpoint(later)
        assert store.endpoint("a1") == later
    assert open_store().endpoint("a1") == later  # what the cache said is what was committed


def test_a_rolled_back_unit_takes_its_saved_endpoints_with_it(open_store: StoreOpener) -> None:
    store = open_store()
    enrol(store, "a1", Ed25519PrivateKey.generate())
    before = store.endpoint("a1")
    with store.transaction():
        store.prefetch_endpoints(["a1"])
        with pytest.raises(Boom):
            save_then_fail(store, dataclasses.replace(before, last_seq=99))
        # The database rolled the unit back; so must the cache (else ingest's replay rule would read 99).
        assert store.endpoint("a1").last_seq is None


def test_outside_a_transaction_every_read_goes_to_the_database(open_store: StoreOpener) -> None:
    store, other = open_store(), open_store()
    enrol(store, "a1", Ed25519PrivateKey.generate())
    with store.transaction():
        assert store.endpoint("a1").last_seq is None
    other.save_endpoint(dataclasses.replace(EndpointState("a1"), last_seq=5))  # another controller
    assert store.endpoint("a1").last_seq == 5
    with store.transaction():
        store.prefetch_endpoints(["a1"])
        assert store.endpoint("a1").last_seq == 5
