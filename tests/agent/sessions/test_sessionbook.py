"""The session lifecycle (pure): every transition of SessionBook, what each digest reports, and its bounds.

Sessions are found with the real `find_sessions` from made-up process snapshots; no process runs here.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from cleanroom_agent.sessions.book import Digest, SessionBook, SessionState
from cleanroom_agent.sessions.clients import ProcessSnapshot, find_sessions, session_id
from cleanroom_protocol import ProcessInfo, SessionInfo

CLIENTS = ["xfreerdp"]


def proc(pid: int, name: str = "xfreerdp", ctime: float = 100.0, ppid: int = 1) -> ProcessSnapshot:
    return ProcessSnapshot(pid=pid, ppid=ppid, name=name, exe_name=None, create_time=ctime, user="alice")


def found(book: SessionBook, *procs: ProcessSnapshot) -> list[SessionInfo]:
    return find_sessions(list(procs), CLIENTS, book.launched_ids())


def digest(
    book: SessionBook, *procs: ProcessSnapshot, denied: Sequence[tuple[ProcessInfo, float]] = ()
) -> Digest:
    return book.digest(found(book, *procs), denied)


def ids(sessions: Sequence[SessionInfo]) -> list[str]:
    return [s.id for s in sessions]


S10 = session_id(10, 100.0)
S20 = session_id(20, 100.0)


def test_a_client_found_is_started_once_and_an_absent_one_exits_once() -> None:
    book = SessionBook()
    first = digest(book, proc(10), proc(20))
    assert ids(first.started) == [S10, S20] and ids(first.running) == [S10, S20] and first.exited == []
    again = digest(book, proc(10), proc(20))
    assert again.started == [] and again.exited == [] and ids(again.running) == [S10, S20]
    gone = digest(book, proc(20))
    assert ids(gone.exited) == [S10] and ids(gone.running) == [S20]
    assert book.state(S10) is SessionState.EXITED and book.state(S20) is SessionState.RUNNING
    assert digest(book, proc(20)).exited == []  # reported once


def test_an_exited_session_is_not_revived_by_an_older_snapshot() -> None:
    book = SessionBook()
    digest(book, proc(10))
    digest(book)
    late = digest(book, proc(10))
    assert late.started == [] and late.running == [] and book.state(S10) is SessionState.EXITED


def test_a_launch_is_pending_until_found_then_running_and_marked_launched() -> None:
    book = SessionBook()
    book.register_launch(S10)
    assert book.state(S10) is SessionState.PENDING_LAUNCH and book.launched_ids() == {S10}
    before_exec = digest(book, proc(10, name="cleanroom-agent"))
    assert before_exec.started == [] and before_exec.exited == []  # pending is not running: no exit
    assert book.state(S10) is SessionState.PENDING_LAUNCH
    after_exec = digest(book, proc(10))
    assert ids(after_exec.started) == [S10] and after_exec.started[0].launched
    assert book.state(S10) is SessionState.RUNNING
    assert not book.settle_launch(S10, running_client=True)
    assert book.launched_ids() == {S10} and book.running()[0].launched


def test_a_launch_registration_not_followed_by_the_client_exec_is_dropped() -> None:
    book = SessionBook()
    book.register_launch(S10)
    assert book.settle_launch(S10, running_client=False)
    assert book.state(S10) is None and book.launched_ids() == set() and book.pending_launches == 0
    late_exec = digest(book, proc(10))
    assert ids(late_exec.started) == [S10] and not late_exec.started[0].launched  # never passed the gate


def test_a_running_session_that_stopped_being_the_client_at_settle_loses_its_launch_mark() -> None:
    book = SessionBook()
    book.register_launch(S10)
    digest(book, proc(10))
    assert book.settle_launch(S10, running_client=False)
    assert book.state(S10) is SessionState.RUNNING and book.launched_ids() == set()
    assert not digest(book, proc(10)).running[0].launched


def test_a_session_being_ended_is_never_reported_exited_by_a_probe_digested_meanwhile() -> None:
    book = SessionBook()
    digest(book, proc(10), proc(20))
    session = book.running()[0]
    assert book.begin_end(session) and book.state(S10) is SessionState.ENDING
    still_there = digest(book, proc(10), proc(20))  # the snapshot was taken before the kill
    assert still_there.exited == [] and still_there.started == [] and ids(still_there.running) == [S20]
    already_gone = digest(book, proc(20))  # and one taken after
    assert already_gone.exited == [] and ids(book.running()) == [S20]
    assert book.end_done(S10, found=True) is SessionState.ENDED_BY_US
    older = digest(book, proc(10), proc(20))  # a snapshot from before the end, digested after it
    assert older.started == [] and older.exited == [] and book.state(S10) is SessionState.ENDED_BY_US


def test_an_end_that_left_survivors_returns_the_session_to_running() -> None:
    book = SessionBook()
    digest(book, proc(10))
    assert book.begin_end(book.running()[0])
    digest(book, proc(10))
    book.end_failed(S10)
    assert book.state(S10) is SessionState.RUNNING and ids(book.running()) == [S10]
    survived = digest(book, proc(10))
    assert survived.started == [] and ids(survived.running) == [S10]  # not started a second time
    assert ids(digest(book).exited) == [S10]  # and reported once it is gone


def test_a_session_gone_before_its_end_is_final_as_exited_and_cannot_be_ended_again() -> None:
    book = SessionBook()
    digest(book, proc(10))
    session = book.running()[0]
    assert book.begin_end(session)
    assert book.end_done(S10, found=False) is SessionState.EXITED
    assert not book.begin_end(session) and book.state(S10) is SessionState.EXITED


def test_ended_sessions_are_not_ended_again() -> None:
    book = SessionBook()
    digest(book, proc(10))
    session = book.running()[0]
    assert book.begin_end(session)
    book.end_done(S10, found=True)
    assert not book.begin_end(session) and book.state(S10) is SessionState.ENDED_BY_US


def test_a_launch_by_a_process_already_over_registers_nothing() -> None:
    book = SessionBook()
    digest(book, proc(10))
    digest(book)
    book.register_launch(S10)
    assert book.state(S10) is SessionState.EXITED and book.launched_ids() == set()


def test_denied_processes_are_reported_on_first_sight_only_and_forgotten_when_gone() -> None:
    book = SessionBook()
    anydesk = ProcessInfo(name="AnyDesk", pid=30, user="alice")
    assert digest(book, denied=[(anydesk, 50.0)]).denied_new == [anydesk]
    assert digest(book, denied=[(anydesk, 50.0)]).denied_new == []
    assert digest(book, denied=[(anydesk, 60.0)]).denied_new == [anydesk]  # the pid reused: a new process
    assert digest(book).denied_new == []
    assert digest(book, denied=[(anydesk, 60.0)]).denied_new == [anydesk]  # gone, then back: seen again


def test_final_ids_are_bounded_oldest_forgotten_first() -> None:
    book = SessionBook(max_final=3)
    for pid in range(1, 6):
        digest(book, proc(pid))
        digest(book)
    assert [book.state(session_id(pid, 100.0)) for pid in range(1, 6)] == [
        None,
        None,
        SessionState.EXITED,
        SessionState.EXITED,
        SessionState.EXITED,
    ]


def test_pending_launches_are_bounded_oldest_dropped_first() -> None:
    book = SessionBook(max_pending=2)
    for pid in (1, 2, 3):
        book.register_launch(session_id(pid, 100.0))
    assert book.pending_launches == 2
    assert book.launched_ids() == {session_id(2, 100.0), session_id(3, 100.0)}


def test_bounds_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_final"):
        SessionBook(max_final=0)
