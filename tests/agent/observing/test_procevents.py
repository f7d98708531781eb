"""Process events that trigger an observe: the proc-connector wire format, the kernel-side filter, which
events are interesting, how bursts are coalesced, and the real source on a real netlink socket (root).

The filter test runs the real BPF program in the kernel on an AF_UNIX socket pair (a socket filter works
on any socket), fed with datagrams in the proc connector's layout.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cleanroom_agent.enforcers.procconn import (
    PROC_EVENT_EXEC,
    PROC_EVENT_EXIT,
    ProcEvent,
    attach_filter,
    parse_exec_pids,
    parse_proc_events,
    proc_event_filter,
)
from cleanroom_agent.observing.procevents import (
    Interest,
    ObserveCoalescer,
    ProcConnectorEvents,
    ProcessEventsOff,
    ProcessEventsUnavailable,
    interest_for,
    read_names,
)
from cleanroom_protocol import ProcessInfo, SessionInfo
from tests.agent.conftest import AgentProcess, FakeClients
from tests.support.mosquitto import Mosquitto
from tests.support.wait import wait_for

PROC_EVENT_FORK = 0x00000001
PROC_EVENT_UID = 0x00000004


def message(what: int, pid: int, tgid: int | None = None) -> bytes:
    """One netlink message as the kernel's cn_proc sends it (nlmsghdr, cn_msg, proc_event)."""
    event = struct.pack("=IIQ", what, 0, 123) + struct.pack("=ii", pid, pid if tgid is None else tgid)
    event += b"\0" * 16  # the rest of the union
    cn = struct.pack("=IIIIHH", 1, 1, 0, 0, len(event), 0) + event
    return struct.pack("=IHHII", 16 + len(cn), 3, 0, 0, 0) + cn


# --- wire format -------------------------------------------------------------------------------------------
def test_parse_proc_events_keeps_exec_and_exit_and_tells_thread_exits_apart() -> None:
    data = (
        message(PROC_EVENT_EXEC, 4242)
        + message(PROC_EVENT_FORK, 7)
        + message(PROC_EVENT_EXIT, 99)
        + message(PROC_EVENT_EXIT, 101, tgid=100)  # a worker thread of process 100
    )
    events = parse_proc_events(data)
    assert events == [
        ProcEvent(PROC_EVENT_EXEC, 4242, 4242),
        ProcEvent(PROC_EVENT_EXIT, 99, 99),
        ProcEvent(PROC_EVENT_EXIT, 101, 100),
    ]
    assert [e.is_process_exit for e in events] == [False, True, False]
    assert parse_exec_pids(data) == [4242]
    assert parse_proc_events(b"\x01\x00") == []
    assert parse_proc_events(message(PROC_EVENT_EXEC, 5)[:40]) == []  # truncated: nothing invented


@pytest.mark.parametrize(
    ("exec_events", "exit_events", "expected"),
    [
        (True, False, [(PROC_EVENT_EXEC, 5, 5), (PROC_EVENT_EXEC, 10, 11)]),
        (True, True, [(PROC_EVENT_EXEC, 5, 5), (PROC_EVENT_EXIT, 7, 7), (PROC_EVENT_EXEC, 10, 11)]),
        (False, True, [(PROC_EVENT_EXIT, 7, 7)]),
    ],
)
def test_kernel_filter_passes_only_exec_and_process_exits(
    exec_events: bool, exit_events: bool, expected: list[tuple[int, int, int]]
) -> None:
    sender, receiver = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with sender, receiver:
        attach_filter(receiver, proc_event_filter(exec_events=exec_events, exit_events=exit_events))
        receiver.setblocking(False)
        for what, pid, tgid in [
            (PROC_EVENT_EXEC, 5, 5),
            (PROC_EVENT_FORK, 6, 6),
            (PROC_EVENT_EXIT, 7, 7),
            (PROC_EVENT_EXIT, 8, 9),  # a thread's exit
            (PROC_EVENT_EXEC, 10, 11),
            (PROC_EVENT_UID, 12, 12),
        ]:
            sender.send(message(what, pid, tgid))
        sender.send(struct.pack("=I", PROC_EVENT_EXEC))  # too short to hold an event
        got = []
        while True:
            try:
                data = receiver.recv(65536)
            except BlockingIOError:
                break
            got += [(e.what, e.pid, e.tgid) for e in parse_proc_events(data)]
    assert got == expected


def test_kernel_filter_needs_some_event() -> None:
    with pytest.raises(ValueError, match="at least one"):
        proc_event_filter(exec_events=False, exit_events=False)


# --- interest ----------------------------------------------------------------------------------------------
INTEREST = Interest(deny=("AnyDesk", "teamviewer-daemon"), clients=("xfreerdp", "vmware-view-client"))


@pytest.mark.parametrize(
    ("names", "wanted"),
    [
        (("anydesk", "anydesk"), True),  # deny is case-insensitive, as find_denied
        (("renamed", "AnyDesk"), True),  # the executable's name counts, not only comm
        (("teamviewer-daem", "x"), True),  # comm is cut at 15 characters
        (("xfreerdp", None), True),  # a session client
        (("vmware-view-cli", "sh"), True),  # a long client name, truncated comm
        (("bash", "bash"), False),
        (("XFREERDP", None), False),  # client names are exact, as client_name
        (None, False),  # gone before we looked
    ],
)
def test_interest_in_an_exec_follows_the_posture_name_rules(
    names: tuple[str, str | None] | None, wanted: bool
) -> None:
    assert INTEREST.wants_exec(1234, names) is wanted


def test_interest_in_tracked_pids_for_exec_and_exit() -> None:
    sessions = [SessionInfo(id="s-10-1", client="xfreerdp", pid=10, pids=[10, 11], started=1.0)]
    denied = [ProcessInfo(name="anydesk", pid=20)]
    interest = interest_for(["anydesk"], ["xfreerdp"], sessions, denied)
    assert interest.pids == frozenset({10, 20})
    assert interest.wants_exit(10) and interest.wants_exit(20)
    assert not interest.wants_exit(11)  # a child in the tree: the session goes on
    assert interest.wants_exec(20, ("bash", "bash"))  # a denied process exec'd into something else
    assert interest.wants_exec(10, None)


# --- coalescing (pure) -------------------------------------------------------------------------------------
def test_a_burst_of_events_arms_one_observe_after_the_settle_time() -> None:
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    assert c.event(100.0) == pytest.approx(0.01)
    assert c.event(100.001) is None and c.event(100.002) is None  # rides on the armed observe
    assert c.fired() is True  # timer ran: the observe is still owed
    assert c.observed(100.011, 100.016) is None  # that observe covered the whole burst
    assert not c.owed


def test_an_isolated_event_soon_after_another_observe_is_not_held_back() -> None:
    """A session starts (one observe), a denied program follows 50 ms later: only the settle time."""
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    c.event(100.0)
    c.fired()
    c.observed(100.01, 100.02)
    assert c.event(100.06) == pytest.approx(0.01)


def test_once_the_burst_is_spent_observes_wait_for_the_rate() -> None:
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    for started in (100.0, 100.01, 100.02):  # three full observes back to back (2 refilled 0.02 s worth)
        c.observed(started, started + 0.005)
    assert c.tokens == pytest.approx(0.2)
    assert c.event(100.03) == pytest.approx(0.07)  # (1 - 0.3 tokens) / 10 per second
    c.fired()
    c.observed(100.10, 100.105)
    assert c.event(105.0) == pytest.approx(0.01)  # long after: the bucket is full again


def test_an_event_during_an_observe_stays_owed_and_rearms() -> None:
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    c.event(100.0)
    c.fired()
    # The observe's snapshot started at 100.01; an event at 100.012 came while it ran.
    assert c.event(100.012) == pytest.approx(0.01)  # no timer armed any more: armed again
    assert c.observed(100.01, 100.02) is None  # still owed, but a timer is already armed
    assert c.owed
    assert c.fired() is True


def test_an_observe_for_another_reason_covers_events_and_the_timer_then_does_nothing() -> None:
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    c.event(100.0)
    assert c.observed(100.001, 100.005) is None  # e.g. a command's observe, started after the event
    assert c.fired() is False  # the armed timer finds nothing owed: no extra observe


def test_a_storm_of_events_costs_a_bounded_number_of_observes() -> None:
    """An event every millisecond for 10 s, each observe taking 5 ms: the rate, plus the first burst."""
    c = ObserveCoalescer(settle_s=0.01, rate_per_s=10, burst=3)
    timer_at: float | None = None
    observes = 0
    now = 0.0
    while now < 10.0:
        if timer_at is not None and now >= timer_at:
            timer_at = None
            if c.fired():
                observes += 1
                delay = c.observed(now, now + 0.005)
                if delay is not None:
                    timer_at = now + 0.005 + delay
        delay = c.event(now)
        if delay is not None:
            timer_at = now + delay
        now += 0.001
    assert 90 <= observes <= 10 * 10 + 3, observes


def test_coalescer_refuses_nonsense_settings() -> None:
    with pytest.raises(ValueError, match="rate_per_s"):
        ObserveCoalescer(rate_per_s=0)


# --- the real source (root, netlink) ----------------------------------------------------------------------
@pytest.fixture
def bindir(tmp_path: Path) -> Path:
    d = tmp_path / "bin"
    d.mkdir()
    return d


def named_copy(bindir: Path, name: str, source: str = "/bin/sleep") -> str:
    path = bindir / name
    shutil.copy2(source, path)
    return str(path)


class Recorder:
    """``names_of`` for the source: the real /proc read, remembering which pids were judged."""

    def __init__(self) -> None:
        self.judged: dict[int, tuple[str, str | None] | None] = {}
        self.lock = threading.Lock()

    def __call__(self, pid: int) -> tuple[str, str | None] | None:
        names = read_names(pid)
        with self.lock:
            self.judged[pid] = names
        return names


@pytest.fixture
def source() -> Iterator[tuple[ProcConnectorEvents, Recorder, threading.Event]]:
    if os.geteuid() != 0:
        raise AssertionError("the proc connector needs root: run the tests as root")
    recorder = Recorder()
    woken = threading.Event()
    src = ProcConnectorEvents(names_of=recorder)
    src.start(woken.set)
    yield src, recorder, woken
    src.stop()


def test_real_source_wakes_for_a_denied_name_not_for_other_execs_and_for_a_tracked_exit(
    source: tuple[ProcConnectorEvents, Recorder, threading.Event], bindir: Path
) -> None:
    src, recorder, woken = source
    denied_name = f"denied-{os.getpid()}"
    src.set_interest(Interest(deny=(denied_name,), clients=("no-such-client",)))

    other = subprocess.Popen([named_copy(bindir, f"other-{os.getpid()}"), "0"])
    other.wait()
    wait_for(lambda: other.pid in recorder.judged, timeout=5, what="the other exec judged")
    assert not woken.is_set() and src.wakes == 0, "an exec of no interest woke the agent"

    denied = subprocess.Popen([named_copy(bindir, denied_name), "30"])
    try:
        wait_for(woken.is_set, timeout=5, what="a wake for the denied exec")
        assert recorder.judged[denied.pid] == (denied_name, denied_name)
        assert src.wakes == 1
        # The agent takes the wake, observes, and now tracks the denied pid: its exit wakes it again.
        woken.clear()
        src.set_interest(Interest(deny=(denied_name,), pids=frozenset({denied.pid})))
        src.rearm()
    finally:
        denied.kill()
        denied.wait()
    wait_for(woken.is_set, timeout=5, what="a wake for the tracked process's exit")
    assert src.wakes == 2 and src.failure is None


def test_real_source_wakes_once_per_rearm_however_many_events(
    source: tuple[ProcConnectorEvents, Recorder, threading.Event], bindir: Path
) -> None:
    src, recorder, woken = source
    name = f"burst-{os.getpid()}"
    src.set_interest(Interest(deny=(name,)))
    exe = named_copy(bindir, name)
    procs = [subprocess.Popen([exe, "0"]) for _ in range(20)]
    for p in procs:
        p.wait()
    wait_for(woken.is_set, timeout=5, what="a wake for the burst")
    wait_for(lambda: src.execs >= 20, timeout=5, what="the burst's execs read")
    assert src.wakes == 1, "a burst must give one wake until the agent re-arms"
    assert sum(1 for p in procs if p.pid in recorder.judged) == 1, "names read while already woken"


def test_lost_notifications_wake_the_agent_for_a_full_observe(bindir: Path) -> None:
    """ENOBUFS: the reader is held while execs overflow a tiny receive buffer; it must count the loss
    and wake, since anything may have happened in what was dropped."""
    release = threading.Event()

    def slow_names(pid: int) -> tuple[str, str | None] | None:
        release.wait(10)
        return None

    woken = threading.Event()
    src = ProcConnectorEvents(names_of=slow_names, rcvbuf=2048)
    src.start(woken.set)
    try:
        true = named_copy(bindir, "quick-true", "/bin/true")
        for _ in range(60):
            subprocess.run([true], check=True)
        release.set()
        wait_for(lambda: src.lost >= 1, timeout=5, what="ENOBUFS counted")
        wait_for(woken.is_set, timeout=5, what="a wake after lost notifications")
        assert src.failure is None, "a lost notification is not a failure of the source"
    finally:
        release.set()
        src.stop()


def test_events_switched_off_say_why() -> None:
    with pytest.raises(ProcessEventsUnavailable, match="process_events = false"):
        ProcessEventsOff().start(lambda: None)


def test_read_names_of_a_live_and_a_gone_process(bindir: Path) -> None:
    proc = subprocess.Popen([named_copy(bindir, "named-for-test"), "30"])
    try:
        wait_for(
            lambda: read_names(proc.pid) == ("named-for-test", "named-for-test"), timeout=5, what="names"
        )
    finally:
        proc.kill()
        proc.wait()
    assert read_names(proc.pid) is None


# --- the agent without process events ---------------------------------------------------------------------
def test_agent_without_process_events_says_so_and_still_finds_sessions_by_polling(
    agent_factory: Callable[..., AgentProcess],
    mosquitto: Mosquitto,
    clients: FakeClients,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("CLEANROOM_PROCESS_EVENTS", "false")  # the agent process inherits it
    agent = agent_factory(mosquitto.url)
    agent.start()

    def kinds() -> list[str]:
        return [e["kind"] for e in agent.outbox_events()]

    wait_for(lambda: "agent.process_events_off" in kinds(), timeout=10, what="agent.process_events_off")
    off = next(e for e in agent.outbox_events() if e["kind"] == "agent.process_events_off")
    assert "process_events = false" in off["details"]["reason"]
    assert '"process_events_off"' in agent.log.read_text()
    client = clients.start()
    wait_for(
        lambda: any(
            e["kind"] == "session.started" and e["details"]["pid"] == client.pid
            for e in agent.outbox_events()
        ),
        timeout=10,
        what="the poll (0.2 s) finding the session without process events",
    )
    assert agent.stop() == 0
