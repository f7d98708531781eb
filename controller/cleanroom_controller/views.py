"""What the list commands and the live view show, read from the store (plain dicts: JSON lines or tables)."""

from __future__ import annotations

from typing import Any

from .models import Condition, EndpointState
from .store import Store

_NAMED_CONDITIONS = (Condition.SILENT, Condition.OFFLINE)

# The columns of the agents table (``agents list`` and ``watch``); ``--json`` has every field of the row.
AGENT_COLUMNS = [
    "id",
    "online",
    "compliant",
    "condition",
    "reasons",
    "last_seen",
    "sessions",
    "spool_full",
    "spool_refused",
    "rejects",
]


def _reasons(ep: EndpointState) -> list[str]:
    """The condition's reasons; ``silent``/``offline`` named first, so ``reasons`` alone says why an endpoint
    is not compliant (e.g. ``["offline", "will"]``, ``["silent", "no_report_for:93s"]``)."""
    reasons = list(ep.reasons)
    if ep.condition in _NAMED_CONDITIONS and ep.condition.value not in reasons:
        reasons.insert(0, ep.condition.value)
    return reasons


def _spool(posture: dict[str, Any] | None) -> tuple[bool | None, int | None]:
    """``spool_full`` and ``spool_refused`` of the endpoint's latest posture; ``None`` before its first
    posture (unknown, not "not full"). The ingest validated the posture; anything else is shown as unknown."""
    if posture is None:
        return None, None
    full, refused = posture.get("spool_full", False), posture.get("spool_refused", 0)
    return (
        full if isinstance(full, bool) else None,
        refused if isinstance(refused, int) and not isinstance(refused, bool) else None,
    )


def agent_rows(store: Store) -> list[dict[str, Any]]:
    fingerprints = store.agent_fingerprints()
    rejects = store.reject_counts()
    postures = store.latest_postures()
    sessions: dict[str, int] = {}
    for s in store.sessions():
        if s.state.value != "ended":
            sessions[s.agent] = sessions.get(s.agent, 0) + 1
    rows = []
    for ep in store.endpoints():
        spool_full, spool_refused = _spool(postures.get(ep.agent))
        rows.append(
            {
                "id": ep.agent,
                "online": ep.online,
                # Known compliant now, not "the last posture was": a silent or offline endpoint (or one
                # back online without a posture yet) is not known to be compliant.
                "compliant": ep.condition is Condition.COMPLIANT,
                "reasons": _reasons(ep),
                "last_seen": ep.last_seen,
                "condition": ep.condition.value,
                "mode": ep.mode,
                "policy": ep.policy,
                "last_seq": ep.last_seq,
                "will_seq": ep.will_seq,
                "sessions": sessions.get(ep.agent, 0),
                "rejects": rejects.get(ep.agent, {}),
                # The endpoint's spool, from its latest posture: full (it fails closed and refuses
                # launches), and the events and acks it refused ever (the gap in its record).
                "spool_full": spool_full,
                "spool_refused": spool_refused,
                "fingerprint": fingerprints.get(ep.agent),
            }
        )
    return rows


def session_rows(store: Store) -> list[dict[str, Any]]:
    return [
        {
            "id": s.id,
            "agent": s.agent,
            "state": s.state.value,
            "ended_reason": s.ended_reason,
            "client": s.client,
            "pid": s.pid,
            "user": s.user,
            "started": s.started,
            "command_id": s.command_id or None,
            "command_result": s.command_result,
        }
        for s in store.sessions()
    ]


def event_rows(
    store: Store, limit: int, *, agent: str | None = None, before_seq: int | None = None
) -> list[dict[str, Any]]:
    """The newest ``limit`` events (of ``agent``, below ``before_seq``), newest first."""
    return store.events(limit=limit, agent=agent, before_seq=before_seq)


def unenrolled_rejects(store: Store) -> dict[str, dict[str, int]]:
    enrolled = set(store.agent_fingerprints())
    return {k: v for k, v in store.reject_counts().items() if k not in enrolled}
