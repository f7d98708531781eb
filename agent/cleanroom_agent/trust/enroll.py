"""``cleanroom-agent enroll``: one-time enrolment with a token, and certificate renewal.

Enrolment (see the controller's enrolserver.py for the other side):

1. The token (``cr1.<id>.<secret>.<ca sha256>``) pins the controller's CA. The CA is fetched from
   ``GET /v1/ca`` over TLS without verification (nothing is sent but the request) and accepted only if its
   SHA-256 matches the pin; from then on every connection verifies the controller against that CA. No trust on
   first use: a man in the middle cannot present another CA.
2. The device's TLS key (ECDSA P-256, for the broker's mTLS) and its Ed25519 signing key (for every message
   it signs) are created here, 0600, and never leave the device; the controller gets a CSR and the public key.
3. ``POST /v1/enroll`` answers with the certificate (CN = agent id), the CA, the controller's id and signing
   key, and the broker URL; all are written into the data directory (``tls/``, ``controller.pub``,
   ``enrolment.json``), where ``cleanroom-agent run`` finds them. No user copies a key by hand.

Renewal (``renew_certificate``): at two thirds of the certificate's lifetime the running agent sends a new CSR
signed with its enrolled Ed25519 key (no token) and swaps the certificate in place.

The token is secret: it is read from a file or stdin (``--token-file``, ``--token -``); ``--token VALUE`` works
too but shows it to every local user in the process list, so the CLI warns.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID

from cleanroom_protocol import load_or_create_private_key, parse_public_key, public_key_pem, renew_message
from cleanroom_protocol.datafiles import write_whole

from ..settings import CONTROLLER_KEY, ENROLMENT_FILE, TLS_CA, TLS_CERT, TLS_DIR, TLS_KEY

TIMEOUT_S = 15.0
MAX_ANSWER = 256 * 1024
_TOKEN_PARTS = 4


class EnrolmentError(Exception):
    """Enrolment or renewal failed; the message says where and why (never the token's secret)."""


@dataclass(frozen=True)
class Enrolled:
    agent_id: str
    controller_id: str
    broker_url: str | None
    certificate_not_after: float
    files: tuple[Path, ...]


def token_ca_pin(token: str) -> str:
    """The CA fingerprint (hex SHA-256 of its DER) the token carries; its format is checked by the controller."""
    parts = token.strip().split(".")
    if len(parts) != _TOKEN_PARTS or parts[0] != "cr1" or len(parts[3]) != 64:
        raise EnrolmentError("not an enrolment token (expected cr1.<id>.<secret>.<ca sha256>)")
    return parts[3].lower()


def _https_target(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.scheme != "https" or not parts.hostname:
        raise EnrolmentError(f"controller URL {url!r}: expected https://host[:port]")
    if parts.username or parts.password or parts.path not in ("", "/"):
        raise EnrolmentError(f"controller URL {url!r}: only https://host[:port] is accepted")
    return parts.hostname, parts.port or 8443


def _request(
    host: str, port: int, context: ssl.SSLContext, method: str, path: str, body: dict[str, Any] | None
) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=TIMEOUT_S)
    try:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        conn.request(method, path, body=payload, headers=headers)
        response = conn.getresponse()
        data = response.read(MAX_ANSWER + 1)
        if len(data) > MAX_ANSWER:
            raise EnrolmentError(f"https://{host}:{port}{path}: answer larger than {MAX_ANSWER} bytes")
        return response.status, data
    except (OSError, http.client.HTTPException) as exc:
        raise EnrolmentError(f"https://{host}:{port}{path}: {exc}") from exc
    finally:
        conn.close()


def fetch_pinned_ca(controller_url: str, pin: str) -> bytes:
    """The controller's CA certificate (PEM), accepted only if its DER hashes to ``pin``."""
    host, port = _https_target(controller_url)
    unverified = ssl.create_default_context()
    unverified.check_hostname = False
    unverified.verify_mode = ssl.CERT_NONE  # nothing secret is sent on this request; the answer is pinned
    status, data = _request(host, port, unverified, "GET", "/v1/ca", None)
    if status != 200:
        raise EnrolmentError(f"{controller_url}/v1/ca answered {status}")
    try:
        ca = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise EnrolmentError(f"{controller_url}/v1/ca did not answer a PEM certificate") from exc
    got = hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).hexdigest()
    if got != pin:
        raise EnrolmentError(
            f"the controller at {controller_url} presents CA sha256:{got}, not the sha256:{pin} the token "
            "pins: wrong controller, or someone in between. Nothing was sent."
        )
    return data


def pinned_context(ca_pem: bytes) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca_pem.decode("ascii"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _write_private(path: Path, data: bytes) -> None:
    """Whole or not at all, 0600, never through a symlink (datafiles.write_whole)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_whole(path, data, 0o600)


def _new_tls_key_and_csr(agent_id: str) -> tuple[bytes, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, agent_id)]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _answer(status: int, data: bytes, what: str) -> dict[str, Any]:
    try:
        answer = json.loads(data)
    except ValueError:
        answer = None
    if not isinstance(answer, dict):
        raise EnrolmentError(f"{what}: the controller answered {status} without JSON")
    if status != 200:
        raise EnrolmentError(f"{what}: {answer.get('error', status)}")
    for field in ("certificate", "ca", "controller_id", "controller_key"):
        if not isinstance(answer.get(field), str):
            raise EnrolmentError(f"{what}: the answer lacks {field}")
    return answer


def _store_answer(
    data_dir: Path, controller_url: str, agent_id: str, answer: dict[str, Any], tls_key: bytes, ca_pem: bytes
) -> Enrolled:
    cert = x509.load_pem_x509_certificate(answer["certificate"].encode("ascii"))
    if cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value != agent_id:
        raise EnrolmentError("the controller issued a certificate for another identity")
    if answer["ca"].encode("ascii").strip() != ca_pem.strip():
        raise EnrolmentError("the controller answered with another CA than the pinned one")
    parse_public_key(answer["controller_key"].encode("ascii"), source="controller_key")
    tls = data_dir / TLS_DIR
    files = (
        tls / TLS_KEY,
        tls / TLS_CERT,
        tls / TLS_CA,
        data_dir / CONTROLLER_KEY,
        data_dir / ENROLMENT_FILE,
    )
    _write_private(files[0], tls_key)
    _write_private(files[1], answer["certificate"].encode("ascii"))
    _write_private(files[2], ca_pem)
    _write_private(files[3], answer["controller_key"].encode("ascii"))
    record = {
        "agent_id": agent_id,
        "controller_id": answer["controller_id"],
        "broker_url": answer.get("broker_url"),
        "controller_url": controller_url,  # where the running agent renews its certificate
        "enrolled_at": time.time(),
    }
    _write_private(files[4], json.dumps(record, indent=2).encode() + b"\n")
    return Enrolled(
        agent_id,
        str(answer["controller_id"]),
        answer.get("broker_url") if isinstance(answer.get("broker_url"), str) else None,
        cert.not_valid_after_utc.timestamp(),
        files,
    )


def enroll(
    controller_url: str, token: str, agent_id: str, data_dir: Path, signing_key_path: Path
) -> Enrolled:
    """Enrol this device; see the module docstring."""
    ca_pem = fetch_pinned_ca(controller_url, token_ca_pin(token))
    signing_key, _ = load_or_create_private_key(signing_key_path)
    tls_key, csr = _new_tls_key_and_csr(agent_id)
    host, port = _https_target(controller_url)
    body = {
        "token": token.strip(),
        "agent_id": agent_id,
        "csr": csr,
        "signing_key": public_key_pem(signing_key),
    }
    status, data = _request(host, port, pinned_context(ca_pem), "POST", "/v1/enroll", body)
    return _store_answer(
        data_dir, controller_url, agent_id, _answer(status, data, "enrolment"), tls_key, ca_pem
    )


def renew_certificate(controller_url: str, agent_id: str, data_dir: Path, key: Ed25519PrivateKey) -> Enrolled:
    """A new certificate for the enrolled device, proven by its Ed25519 key; replaces the files in place."""
    ca_pem = (data_dir / TLS_DIR / TLS_CA).read_bytes()
    tls_key, csr = _new_tls_key_and_csr(agent_id)
    ts = time.time()
    sig = base64.b64encode(key.sign(renew_message(agent_id, csr, ts))).decode("ascii")
    host, port = _https_target(controller_url)
    body = {"agent_id": agent_id, "csr": csr, "ts": ts, "sig": sig}
    status, data = _request(host, port, pinned_context(ca_pem), "POST", "/v1/renew", body)
    return _store_answer(
        data_dir, controller_url, agent_id, _answer(status, data, "renewal"), tls_key, ca_pem
    )


def renewal_due(not_before: float, not_after: float, now: float) -> bool:
    """Renew at two thirds of the certificate's lifetime (pure)."""
    return now >= not_before + (not_after - not_before) * 2 / 3


def certificate_window(cert_path: Path) -> tuple[float, float]:
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
