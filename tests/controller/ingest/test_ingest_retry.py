"""A batch whose commit fails is handed again (the daemon's ingest loop does): everything the ingest tallies
in memory for it goes back with the transaction, so the retry counts each message once.

The failing commit is a real one: the SQLite write-ahead log made immutable (``chattr +i``, needs root, as CI
runs; see test_audit_sealer.py)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cleanroom_controller import Store
from cleanroom_controller.audit.sealer import SealPolicy
from cleanroom_controller.ingest.pipeline import Outcome
from cleanroom_protocol import Event, Kind
from tests.controller.audit.test_audit_sealer import EVENTS, HOUR, commits_failing, make
from tests.controller.helpers import Sender


def test_a_failed_commit_retried_counts_its_messages_once(tmp_path: Path) -> None:
    """Without the roll-back the retried batch's accepted, late and rejected messages count twice: in
    ``counts`` and ``late`` (tests, bench, the daemon's figures), in the reject windows, i.e. in the
    ``rejects`` table ``agents list`` shows and in the ``verdict.summary`` audit entry, and in the sender's
    junk budget (it would turn noisy twice as fast). The clock given to the budget is 0: no refill."""
    store = Store.open(tmp_path)
    ingest, a1 = make(store, SealPolicy(max_leaves=1000, max_age_s=3600))
    ingest.handle_batch([(EVENTS, a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time())), False)])
    forger = Sender("a1")  # a1's name, another key
    batch = [
        (EVENTS, a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time())), False),
        (
            EVENTS,
            a1.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time() - HOUR), ts=time.time() - HOUR),
            False,
        ),
        (EVENTS, forger.seal(Kind.EVENT, Event(kind="usb.blocked", at=time.time()), seq=99), False),
    ]
    junk_before = ingest.budgets.junk_left("a1", 0.0)
    with commits_failing(store), pytest.raises(Exception, match="I/O"):
        ingest.handle_batch(batch)
    assert (dict(ingest.counts), ingest.late) == ({"accepted": 1}, 0), "the failed batch left its tallies"
    assert ingest.budgets.junk_left("a1", 0.0) == junk_before, "the failed batch spent a1's junk budget"
    assert ingest.handle_batch(batch) == [Outcome.ACCEPTED, Outcome.ACCEPTED, Outcome.REJECTED]
    assert (dict(ingest.counts), ingest.late) == ({"accepted": 3, "bad_signature": 1}, 1)
    assert ingest.budgets.junk_left("a1", 0.0) == junk_before - 1, "the forgery is junk once"
    assert store.reject_counts() == {"a1": {"bad_signature": 1}}
    ingest.close()
    (summary,) = [e.data for e in store.audit_entries() if e.kind == "verdict.summary"]
    assert summary["counts"] == {"bad_signature": 1}
    assert len(store.events()) == 3
