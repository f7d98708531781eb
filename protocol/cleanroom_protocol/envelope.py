"""The signed envelope ``{v, kind, sender, seq, ts, body, sig}``: sealing and verification.

Verification is pure: it takes the raw bytes, a key lookup and the receiver's replay state, and returns a
typed :class:`Verdict`. Checks run cheapest-first and the signature is checked before anything in the
body is trusted.
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Annotated, Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .canonical import canonical_json
from .messages import BODY_MODELS, AgentState, Kind, Status
from .topics import AGENT_ID_PATTERN

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024
DEFAULT_MAX_SKEW_S = 300.0


class Envelope(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    v: int
    kind: Kind
    sender: Annotated[str, Field(pattern=AGENT_ID_PATTERN)]
    seq: Annotated[int, Field(ge=0, lt=2**63)]
    ts: float
    body: dict[str, Any]
    sig: Annotated[str, Field(min_length=1, max_length=200)]


class VerdictStatus(StrEnum):
    OK = "ok"
    MALFORMED = "malformed"
    TOO_LARGE = "too_large"
    UNKNOWN_SENDER = "unknown_sender"
    BAD_SIGNATURE = "bad_signature"
    REPLAYED = "replayed"
    STALE = "stale"


@dataclass(frozen=True, slots=True)
class Verdict:
    status: VerdictStatus
    detail: str = ""
    envelope: Envelope | None = None
    body: BaseModel | None = None
    is_will: bool = False  # a Last Will recognised by its reserved seq

    @property
    def ok(self) -> bool:
        return self.status is VerdictStatus.OK

    @property
    def sender(self) -> str | None:
        return self.envelope.sender if self.envelope else None

    @property
    def seq(self) -> int | None:
        return self.envelope.seq if self.envelope else None


def seal(
    kind: Kind,
    body: BaseModel,
    *,
    sender: str,
    seq: int,
    key: Ed25519PrivateKey,
    ts: float | None = None,
) -> bytes:
    """Sign ``body`` into wire bytes. The caller owns ``seq`` (strictly increasing, durable)."""
    unsigned: dict[str, Any] = {
        "v": PROTOCOL_VERSION,
        "kind": kind.value,
        "sender": sender,
        "seq": seq,
        "ts": time.time() if ts is None else ts,
        "body": body.model_dump(mode="json"),
    }
    sig = key.sign(canonical_json(unsigned))
    unsigned["sig"] = base64.b64encode(sig).decode("ascii")
    data = canonical_json(unsigned)
    if len(data) > MAX_MESSAGE_BYTES:
        raise ValueError(f"{kind.value} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


PublicKeyLookup = Callable[[str], Ed25519PublicKey | None]


def verify(
    raw: bytes,
    *,
    public_key_for: PublicKeyLookup,
    last_seq: int | None = None,
    now: float | None = None,
    max_skew_s: float | None = DEFAULT_MAX_SKEW_S,
    will_seq: int | None = None,
    expected_sender: str | None = None,
    expected_kind: Kind | None = None,
) -> Verdict:
    """Check ``raw`` and return a :class:`Verdict`.

    ``last_seq``: highest seq accepted from this sender (``None``: replay not checked, e.g. a retained
    policy, which the receiver orders by policy version instead). ``max_skew_s``: ``ts`` must be within
    this many seconds of ``now`` (``None``: not checked). ``will_seq``: the seq the sender reserved for its
    Last Will on its current connection; an offline status carrying it is accepted although it is older
    than later messages (it was signed at connect time). ``expected_sender``/``expected_kind``: what the
    topic says; a mismatch is malformed (a valid message replayed onto another topic).
    """
    if len(raw) > MAX_MESSAGE_BYTES:
        return Verdict(VerdictStatus.TOO_LARGE, f"{len(raw)} bytes > {MAX_MESSAGE_BYTES}")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Verdict(VerdictStatus.MALFORMED, f"not JSON: {exc}")
    if not isinstance(data, dict):
        return Verdict(VerdictStatus.MALFORMED, "not a JSON object")
    try:
        env = Envelope.model_validate(data)
    except ValidationError as exc:
        return Verdict(VerdictStatus.MALFORMED, _first_error(exc, "envelope"))
    if env.v != PROTOCOL_VERSION:
        return Verdict(VerdictStatus.MALFORMED, f"unsupported protocol version {env.v}", env)
    if expected_sender is not None and env.sender != expected_sender:
        return Verdict(
            VerdictStatus.MALFORMED, f"sender {env.sender!r} on the topic of {expected_sender!r}", env
        )
    if expected_kind is not None and env.kind is not expected_kind:
        return Verdict(
            VerdictStatus.MALFORMED, f"kind {env.kind.value!r} on a {expected_kind.value} topic", env
        )
    key = public_key_for(env.sender)
    if key is None:
        return Verdict(VerdictStatus.UNKNOWN_SENDER, f"no enrolled key for {env.sender!r}", env)
    try:
        sig = base64.b64decode(env.sig, validate=True)
    except (binascii.Error, ValueError):
        return Verdict(VerdictStatus.BAD_SIGNATURE, "signature is not base64", env)
    if not _signature_verifies(key, sig, raw, data):
        return Verdict(VerdictStatus.BAD_SIGNATURE, "signature does not verify", env)

    # Signed from here on: the body can be parsed and trusted to be what the sender said.
    try:
        body = BODY_MODELS[env.kind].model_validate(env.body)
    except ValidationError as exc:
        return Verdict(VerdictStatus.MALFORMED, _first_error(exc, f"{env.kind.value} body"), env)

    return check_sequence(
        Verdict(VerdictStatus.OK, "", env, body),
        last_seq=last_seq,
        will_seq=will_seq,
        now=time.time() if now is None else now,
        max_skew_s=max_skew_s,
    )


# The top-level signature member as :func:`seal` writes it: in canonical JSON it sits between ``seq`` and
# ``ts`` (keys sorted), and it is the last ``,"sig":"`` of the document since only numbers follow it.
_SIG_MEMBER = b',"sig":"'
_BASE64 = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


def signed_bytes_as_sent(raw: bytes) -> bytes | None:
    """``raw`` without its top-level ``"sig"`` member: the signed bytes, when ``raw`` is canonical JSON (what
    :func:`seal` sends). ``None`` when no base64 signature member is found where one would be.

    Why this is as strict as re-encoding: a signature that verifies over these bytes was made by the key's
    holder, whose :func:`seal` signs canonical JSON of the envelope without ``sig``, i.e. exactly the bytes
    :func:`verify` would re-encode from ``raw``. Adding the member ``,"sig":"<base64>"`` to such bytes leaves
    a JSON document only where it adds a member (inside a string or after a key it is not JSON); a member of
    a nested object leaves the envelope without its ``sig`` (malformed). So a document that parses, has a
    top-level ``sig`` and passes with these bytes is, field for field, the one that was signed. A holder of
    the key gains nothing either: whatever else it signs it could sign canonically.
    """
    start = raw.rfind(_SIG_MEMBER)
    if start < 0:
        return None
    value = start + len(_SIG_MEMBER)
    end = raw.find(b'"', value)
    if end < 0 or not _BASE64.issuperset(raw[value:end]):
        return None
    return raw[:start] + raw[end + 1 :]


def _signature_verifies(key: Ed25519PublicKey, sig: bytes, raw: bytes, data: dict[str, Any]) -> bool:
    """The signature over the canonical JSON of ``data`` without ``sig``. Wire bytes that are canonical (all
    that :func:`seal` sends) are checked as they came, without re-encoding (:func:`signed_bytes_as_sent`);
    any other form of the same JSON value is re-encoded, as the protocol allows a peer to send it. One
    Ed25519 verification a message, except for a non-canonical message whose signature is wrong (two)."""
    as_sent = signed_bytes_as_sent(raw)
    if as_sent is not None and _verifies(key, sig, as_sent):
        return True
    unsigned = {k: v for k, v in data.items() if k != "sig"}
    try:
        canonical = canonical_json(unsigned)
    except ValueError:  # NaN, or a lone surrogate (UnicodeEncodeError): no canonical form, nothing signed it
        return False
    return canonical != as_sent and _verifies(key, sig, canonical)


def _verifies(key: Ed25519PublicKey, sig: bytes, message: bytes) -> bool:
    try:
        key.verify(sig, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def check_sequence(
    signed: Verdict, *, last_seq: int | None, will_seq: int | None, now: float, max_skew_s: float | None
) -> Verdict:
    """The checks after signature and body: Last Will recognition, staleness, replay.

    :func:`verify` ends with this. A receiver that verifies signatures in parallel (before it holds the
    state that ``last_seq`` and ``will_seq`` come from) calls :func:`verify` with ``last_seq=None,
    max_skew_s=None, will_seq=None`` and this afterwards, under its lock. A verdict that is not ok is
    returned as it is.
    """
    env, body = signed.envelope, signed.body
    if not signed.ok or env is None:
        return signed
    if (
        will_seq is not None
        and env.seq == will_seq
        and isinstance(body, Status)
        and body.state is AgentState.OFFLINE
    ):
        return Verdict(VerdictStatus.OK, "last will", env, body, is_will=True)
    if max_skew_s is not None:
        skew = now - env.ts
        if abs(skew) > max_skew_s:
            return Verdict(
                VerdictStatus.STALE, f"ts is {skew:+.0f} s from now (window ±{max_skew_s:.0f} s)", env
            )
    if last_seq is not None and env.seq <= last_seq:
        return Verdict(VerdictStatus.REPLAYED, f"seq {env.seq} not above last accepted {last_seq}", env)
    return Verdict(VerdictStatus.OK, "", env, body)


def _first_error(exc: ValidationError, what: str) -> str:
    errors = exc.errors()
    err = errors[0]
    field = ".".join(str(p) for p in err["loc"]) or "(top)"
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{what}: field {field}: {err['msg']}{more}"
