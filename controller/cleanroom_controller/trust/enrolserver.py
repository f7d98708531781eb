"""The HTTPS enrolment endpoint that ``cleanroom-controller run`` serves (default port 8443).

Why HTTPS beside MQTT, not an MQTT enrolment listener: a device that is not enrolled yet has no certificate,
and the broker admits only devices with one (mTLS, ``require_certificate``); an anonymous MQTT listener for
enrolment would be a second, weaker door into the broker. HTTPS on its own port keeps the broker closed to
everything unenrolled, and its server certificate comes from the same private CA the token pins. 8443 is the
customary unprivileged HTTPS alternative (the controller runs as an unprivileged user), distinct from MQTT's
8883.

Routes (JSON; bodies at most ``MAX_BODY`` bytes; each client address has a small request budget):

* ``GET /v1/ca``: the CA certificate (PEM). Public; the agent checks it against the token's fingerprint
  before it sends anything.
* ``POST /v1/enroll`` ``{token, agent_id, csr, signing_key}``: token checked (hash, expiry, uses, revoked),
  the agent's Ed25519 signing key registered, its CSR signed (CN = agent id, set by the CA), answered with
  ``{certificate, ca, controller_id, controller_key, broker_url}``.
* ``POST /v1/renew`` ``{agent_id, csr, ts, sig}``: the agent proves itself with its enrolled Ed25519 key
  (``sig`` over the canonical JSON of ``{agent_id, csr, ts, purpose: "renew"}``, ``ts`` within the
  controller's freshness window and newer than its last renewal) and gets a new certificate without a token.
  A revoked agent is refused.

Every enrolment, renewal and refusal is audited (token id, agent, reason, client address; never the secret).
The decisions are in :mod:`enrolment` (pure); this module is the transport.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
import uvicorn
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cleanroom_protocol import (
    KeyFileError,
    fingerprint,
    is_valid_agent_id,
    parse_public_key,
    public_key_pem,
    renew_message,
)

from ..store import AgentExistsError, Store
from .enrolment import Refusal, TokenFormatError, parse_token, refusal

log = structlog.get_logger("cleanroom.controller.enrol")

MAX_BODY = 64 * 1024
RENEW_SKEW_S = 300.0
CLIENT_RATE = 2.0  # requests/s per client address, on average
CLIENT_BURST = 10
MAX_CLIENTS_TRACKED = 10_000


class IssuingCa(Protocol):
    """What the endpoint needs of the PKI (trust.pki.Pki)."""

    @property
    def ca_pem(self) -> bytes: ...

    def issue_client(self, csr_pem: bytes, *, common_name: str, days: int = 90) -> x509.Certificate: ...


@dataclass(frozen=True)
class EnrolmentSettings:
    controller_id: str
    controller_key_pem: str
    broker_url: str | None  # what agents connect to (mqtts://host:8883), told to them at enrolment
    cert_days: int = 90


class _Budget:
    """Per client address: at most CLIENT_RATE requests/s, bursts of CLIENT_BURST; bounded memory."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str) -> bool:
        now = self._clock()
        tokens, last = self._buckets.get(client, (float(CLIENT_BURST), now))
        tokens = min(CLIENT_BURST, tokens + (now - last) * CLIENT_RATE)
        if len(self._buckets) >= MAX_CLIENTS_TRACKED and client not in self._buckets:
            self._buckets.clear()  # a spray of addresses: start over rather than grow
        if tokens < 1:
            self._buckets[client] = (tokens, now)
            return False
        self._buckets[client] = (tokens - 1, now)
        return True


class EnrolmentService:
    """The endpoint's logic over the store and the CA; the Starlette app below only moves JSON."""

    def __init__(
        self,
        store: Store,
        ca: IssuingCa,
        settings: EnrolmentSettings,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._ca = ca
        self._settings = settings
        self._clock = clock

    @property
    def ca_pem(self) -> bytes:
        return self._ca.ca_pem

    @contextlib.contextmanager
    def _tx(self) -> Iterator[None]:
        with self._store.transaction():
            yield

    def _audit(self, kind: str, subject: str, data: dict[str, Any]) -> None:
        self._store.append_audit(kind, "enrolment", subject, data)

    def enroll(self, body: dict[str, Any], client: str) -> tuple[int, dict[str, Any]]:
        now = self._clock()
        agent_id = body.get("agent_id")
        raw_token, csr, signing_key = body.get("token"), body.get("csr"), body.get("signing_key")
        if not all(isinstance(v, str) for v in (agent_id, raw_token, csr, signing_key)):
            return 400, {"error": "token, agent_id, csr and signing_key are required strings"}
        assert isinstance(agent_id, str) and isinstance(raw_token, str)
        assert isinstance(csr, str) and isinstance(signing_key, str)
        try:
            token = parse_token(raw_token)
        except TokenFormatError as exc:
            with self._tx():
                self._audit("enrol.refused", agent_id[:64], {"reason": "malformed_token", "client": client})
            return 400, {"error": str(exc)}
        subject = agent_id[:64]
        with self._tx():
            why = refusal(self._store.token(token.id), token.secret, now)
            problem = None if why is not None else self._request_problem(agent_id, csr, signing_key)
            if why is None and problem is None and not self._store.use_token(token.id, now):
                why = Refusal.USED_UP  # another enrolment used it meanwhile
            if why is not None or problem is not None:
                reason = why.value if why is not None else problem
                self._audit("enrol.refused", subject, {"token": token.id, "reason": reason, "client": client})
                log.warning("enrolment_refused", token=token.id, agent=subject, reason=reason, client=client)
                status = 403 if why is not None else 400
                return status, {"error": f"enrolment refused: {reason}"}
            key = parse_public_key(signing_key.encode("ascii"), source="signing_key")
            try:
                self._store.add_agent(agent_id, public_key_pem(key), fingerprint(key), now)
            except AgentExistsError as exc:
                self._audit(
                    "enrol.refused", subject, {"token": token.id, "reason": "agent_exists", "client": client}
                )
                return 409, {"error": str(exc)}
            cert = self._ca.issue_client(
                csr.encode("ascii"), common_name=agent_id, days=self._settings.cert_days
            )
            self._audit(
                "enrol.accepted",
                agent_id,
                {
                    "token": token.id,
                    "fingerprint": fingerprint(key),
                    "certificate_serial": format(cert.serial_number, "x"),
                    "not_after": cert.not_valid_after_utc.timestamp(),
                    "client": client,
                },
            )
        log.info("agent_enrolled", agent=agent_id, token=token.id, client=client)
        return 200, self._answer(cert)

    def renew(self, body: dict[str, Any], client: str) -> tuple[int, dict[str, Any]]:
        now = self._clock()
        agent_id, csr, ts, sig = body.get("agent_id"), body.get("csr"), body.get("ts"), body.get("sig")
        if not (isinstance(agent_id, str) and isinstance(csr, str) and isinstance(sig, str)):
            return 400, {"error": "agent_id, csr, ts and sig are required"}
        if not isinstance(ts, int | float) or isinstance(ts, bool):
            return 400, {"error": "ts must be a number"}
        subject = agent_id[:64]
        with self._tx():
            reason = self._renew_problem(agent_id, csr, float(ts), sig, now)
            if reason is not None:
                self._audit("renew.refused", subject, {"reason": reason, "client": client})
                log.warning("renewal_refused", agent=subject, reason=reason, client=client)
                return 403, {"error": f"renewal refused: {reason}"}
            self._store.set_meta(f"renewed_ts:{agent_id}", repr(float(ts)))
            cert = self._ca.issue_client(
                csr.encode("ascii"), common_name=agent_id, days=self._settings.cert_days
            )
            self._audit(
                "renew.accepted",
                agent_id,
                {
                    "certificate_serial": format(cert.serial_number, "x"),
                    "not_after": cert.not_valid_after_utc.timestamp(),
                    "client": client,
                },
            )
        log.info("agent_renewed", agent=agent_id, client=client)
        return 200, self._answer(cert)

    def _request_problem(self, agent_id: str, csr: str, signing_key: str) -> str | None:
        if not is_valid_agent_id(agent_id):
            return "invalid agent_id (letters, digits, '.', '_', '-'; at most 64)"
        if agent_id in self._store.revoked_agents():
            return "agent id is revoked"
        try:
            parse_public_key(signing_key.encode("ascii"), source="signing_key")
        except (KeyFileError, UnicodeEncodeError):
            return "signing_key is not a PEM Ed25519 public key"
        return _csr_problem(csr)

    def _renew_problem(self, agent_id: str, csr: str, ts: float, sig: str, now: float) -> str | None:
        if agent_id in self._store.revoked_agents():
            return "agent is revoked"
        pem = self._store.public_key_pem(agent_id) if is_valid_agent_id(agent_id) else None
        if pem is None:
            return "unknown agent"
        if abs(now - ts) > RENEW_SKEW_S:
            return "stale request"
        last = self._store.get_meta(f"renewed_ts:{agent_id}")
        if last is not None and ts <= float(last):
            return "replayed request"
        key = parse_public_key(pem.encode("ascii"), source=f"enrolled key of {agent_id}")
        try:
            key.verify(base64.b64decode(sig, validate=True), renew_message(agent_id, csr, ts))
        except (InvalidSignature, ValueError):
            return "bad signature"
        return _csr_problem(csr)

    def _answer(self, cert: x509.Certificate) -> dict[str, Any]:
        return {
            "certificate": cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            "ca": self._ca.ca_pem.decode("ascii"),
            "controller_id": self._settings.controller_id,
            "controller_key": self._settings.controller_key_pem,
            "broker_url": self._settings.broker_url,
        }


def _csr_problem(csr: str) -> str | None:
    try:
        request = x509.load_pem_x509_csr(csr.encode("ascii"))
    except (ValueError, UnicodeEncodeError):
        return "csr is not a PEM certificate signing request"
    if not request.is_signature_valid:
        return "csr signature does not verify"
    return None


def build_app(service: EnrolmentService) -> Starlette:
    budget = _Budget()

    async def read_json(request: Request) -> dict[str, Any] | Response:
        client = request.client.host if request.client else "?"
        if not budget.take(client):
            return JSONResponse({"error": "too many requests"}, status_code=429)
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_BODY:
                return JSONResponse({"error": f"body larger than {MAX_BODY} bytes"}, status_code=413)
        try:
            data = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return JSONResponse({"error": "body is not JSON"}, status_code=400)
        if not isinstance(data, dict):
            return JSONResponse({"error": "body must be a JSON object"}, status_code=400)
        return data

    def json_route(handle: Callable[[dict[str, Any], str], tuple[int, dict[str, Any]]]) -> Callable[..., Any]:
        """A POST route: the budgeted, bounded JSON body to ``handle(body, client)``, its answer as JSON."""

        async def route(request: Request) -> Response:
            data = await read_json(request)
            if isinstance(data, Response):
                return data
            status, answer = handle(data, request.client.host if request.client else "?")
            return JSONResponse(answer, status_code=status)

        return route

    async def ca(request: Request) -> Response:
        return Response(service.ca_pem, media_type="application/x-pem-file")

    return Starlette(
        routes=[
            Route("/v1/ca", ca, methods=["GET"]),
            Route("/v1/enroll", json_route(service.enroll), methods=["POST"]),
            Route("/v1/renew", json_route(service.renew), methods=["POST"]),
        ]
    )


class _EmbeddedServer(uvicorn.Server):
    """uvicorn inside the controller's event loop: the controller owns SIGTERM/SIGINT, not uvicorn."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class EnrolmentServer:
    def __init__(self, app: Starlette, *, host: str, port: int, certfile: str, keyfile: str) -> None:
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            ssl_certfile=certfile,
            ssl_keyfile=keyfile,
            log_level="warning",
            lifespan="off",
            access_log=False,
            server_header=False,
        )
        self._server = _EmbeddedServer(config)
        self._listen = f"{host}:{port}"
        self.stopped = asyncio.Event()

    async def serve(self) -> None:
        """Serve until :meth:`request_stop`. A listener that cannot start (the port taken: a second
        controller process on this host) is logged and leaves the controller running without it: uvicorn
        reports that with SystemExit, which must not end the controller."""
        try:
            await self._server.serve()
        except SystemExit:
            log.error("enrolment_endpoint_not_started", listen=f"{self._listen}", hint="port in use?")
        finally:
            self.stopped.set()

    def request_stop(self) -> None:
        self._server.should_exit = True

    @property
    def started(self) -> bool:
        return bool(self._server.started)
