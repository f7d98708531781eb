"""The controller's private CA: ``pki init`` makes it, the broker's and the controller's certificates come
from it, devices get theirs through it (enrolment, renewal), and revocation rewrites its CRL.

Signing happens in :mod:`.certificates` (pure); this class adds the key material, the clock and the files
(:class:`~.pkifiles.PkiFiles`). Every change to the issued-certificates index or the CRL happens under the
PKI's lock with the index re-read inside it, so the daemon and an operator's command can act at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .certificates import (
    PkiError,
    Revoked,
    build_ca,
    build_client,
    build_crl,
    build_csr,
    build_server,
    cert_pem,
    check_common_name,
    check_days,
    crl_refresh_due,
    csr_public_key,
    fingerprint,
    key_pem,
    new_key,
    utc,
)
from .index import Index, IssuedCert, Role
from .pkifiles import PkiFiles

DEFAULT_BROKER_HOSTS = ("localhost", "127.0.0.1")
DEFAULT_CLIENT_DAYS = 90
CONTROLLER_DAYS = 825
CRL_VALIDITY = timedelta(days=7)


def utcnow() -> datetime:
    return datetime.now(UTC)


class Pki:
    def __init__(
        self, files: PkiFiles, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate
    ) -> None:
        self.files = files
        self._ca_key = ca_key
        self._ca_cert = ca_cert

    # -- making and opening -------------------------------------------------------------------------
    @classmethod
    def init(
        cls,
        data_dir: Path,
        *,
        broker_hosts: Sequence[str] = DEFAULT_BROKER_HOSTS,
        controller_id: str = "controller",
        now: datetime | None = None,
    ) -> Pki:
        """Create ``{data_dir}/pki/`` (0700): the CA, the broker's server certificate (SANs from
        ``broker_hosts``), the controller's client certificate (CN = ``controller_id``) and an empty
        CRL. Refuses, with :class:`PkiError`, if a PKI is already there."""
        moment = utc(now or utcnow())
        check_common_name(controller_id, "controller id")
        ca_key = new_key()
        ca_cert = build_ca(
            ca_key, name=f"cleanroom CA {x509.random_serial_number():x}"[:64], now=moment, serial=_serial()
        )
        server_key = new_key()
        server = build_server(
            ca_key, ca_cert, server_key.public_key(), hosts=broker_hosts, now=moment, serial=_serial()
        )

        def fill(files: PkiFiles) -> None:
            files.write_private(files.ca_key, key_pem(ca_key))
            files.write_public(files.ca_cert, cert_pem(ca_cert))
            files.write_private(files.server_key, key_pem(server_key))
            files.write_public(files.server_cert, cert_pem(server))
            index = Index(controller_id=controller_id).with_cert(_issued(server, Role.SERVER), moment)
            pki = cls(files, ca_key, ca_cert)
            index = pki._write_controller(index, controller_id, moment)
            pki._write_crl(index, moment)

        return cls(PkiFiles.create(data_dir, fill), ca_key, ca_cert)

    @classmethod
    def load(cls, data_dir: Path) -> Pki:
        files = PkiFiles.under(data_dir)
        if not files.exists():
            raise PkiError(
                f"no PKI at {files.root} (run `cleanroom-controller pki init --data-dir {data_dir}`)"
            )
        key = serialization.load_pem_private_key(files.read_private(files.ca_key, "CA key"), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{files.ca_key}: not an ECDSA private key")
        try:
            cert = x509.load_pem_x509_certificate(files.read_public(files.ca_cert, "CA certificate"))
        except ValueError as exc:
            raise PkiError(f"{files.ca_cert}: not a PEM certificate: {exc}") from None
        if cert.public_key() != key.public_key():
            raise PkiError(f"{files.ca_key} does not belong to {files.ca_cert}")
        files.read_index()  # unreadable now is better than at the first enrolment
        return cls(files, key, cert)

    # -- what it is ---------------------------------------------------------------------------------
    @property
    def ca_cert(self) -> x509.Certificate:
        return self._ca_cert

    @property
    def ca_pem(self) -> bytes:
        return cert_pem(self._ca_cert)

    @property
    def ca_fingerprint(self) -> str:
        return fingerprint(self._ca_cert)

    @property
    def controller_id(self) -> str:
        return self.files.read_index().controller_id

    @property
    def root(self) -> Path:
        return self.files.root

    @property
    def ca_cert_path(self) -> Path:
        return self.files.ca_cert

    @property
    def server_cert_path(self) -> Path:
        return self.files.server_cert

    @property
    def server_key_path(self) -> Path:
        return self.files.server_key

    @property
    def controller_cert_path(self) -> Path:
        return self.files.controller_cert(self.controller_id)

    @property
    def controller_key_path(self) -> Path:
        return self.files.controller_key(self.controller_id)

    @property
    def crl_path(self) -> Path:
        return self.files.crl

    def controller_paths(self, name: str) -> tuple[Path, Path]:
        """(certificate, key) of the controller certificate ``name``."""
        return self.files.controller_cert(name), self.files.controller_key(name)

    def controllers(self, now: datetime | None = None) -> list[str]:
        """CNs of the controllers with a usable certificate: the broker ACL's controller users."""
        return self.files.read_index().controllers(utc(now or utcnow()))

    def issued(self, common_name: str | None = None) -> list[IssuedCert]:
        certs = self.files.read_index().certs
        return [c for c in certs if common_name is None or c.common_name == common_name]

    def server_cert(self) -> x509.Certificate:
        return _load_cert(self.files, self.files.server_cert, "broker certificate")

    # -- issuing ------------------------------------------------------------------------------------
    def issue_client(
        self,
        csr_pem: bytes,
        *,
        common_name: str,
        days: float = DEFAULT_CLIENT_DAYS,
        now: datetime | None = None,
    ) -> x509.Certificate:
        """A client certificate for the key in ``csr_pem`` (its signature checked first), CN =
        ``common_name`` whatever the CSR asked for. Refuses a CN that belongs to a controller."""
        public = csr_public_key(csr_pem)
        moment = utc(now or utcnow())
        check_common_name(common_name)
        check_days(days)
        with self.files.locked():
            index = self.files.read_index()
            if index.role_of(common_name, moment) is Role.CONTROLLER:
                raise PkiError(f"{common_name!r} is a controller's name; a device cannot be given it")
            cert = build_client(
                self._ca_key,
                self._ca_cert,
                public,
                common_name=common_name,
                now=moment,
                days=days,
                serial=_serial(),
            )
            self.files.write_index(index.with_cert(_issued(cert, Role.AGENT), moment))
        return cert

    def issue_client_key(
        self, common_name: str, days: float = DEFAULT_CLIENT_DAYS, *, now: datetime | None = None
    ) -> tuple[bytes, bytes]:
        """(key PEM, certificate PEM) of a fresh key pair with a client certificate for ``common_name``:
        for the controller's own use (e.g. a short-lived certificate that takes a revoked device's client
        id over at the broker). The key is returned, never written; keep it off disk or write it 0600."""
        key = new_key()
        cert = self.issue_client(build_csr(key, common_name), common_name=common_name, days=days, now=now)
        return key_pem(key), cert_pem(cert)

    def issue_controller(
        self, name: str, *, days: float = CONTROLLER_DAYS, now: datetime | None = None
    ) -> tuple[Path, Path]:
        """A controller client certificate with CN ``name`` written to ``pki/controllers/{name}.crt|.key``
        (replacing an earlier one of that name). One per controller process: with
        ``use_username_as_clientid`` two processes sharing a certificate would take each other's client
        id over. Refuses a name a device holds. Re-run ``broker-config`` after: the ACL lists controllers."""
        moment = utc(now or utcnow())
        check_common_name(name, "controller name")
        with self.files.locked():
            index = self.files.read_index()
            if index.role_of(name, moment) is Role.AGENT:
                raise PkiError(f"{name!r} is a device's name; a controller cannot be given it")
            self._write_controller(index, name, moment, days=days)
        return self.controller_paths(name)

    def issue_server(self, hosts: Sequence[str], *, now: datetime | None = None) -> x509.Certificate:
        """A new broker server certificate (and key) for ``hosts``: when the SANs change or it nears its
        end. Re-run ``broker-config`` to hand it to the broker."""
        moment = utc(now or utcnow())
        key = new_key()
        cert = build_server(
            self._ca_key, self._ca_cert, key.public_key(), hosts=hosts, now=moment, serial=_serial()
        )
        with self.files.locked():
            index = self.files.read_index()
            self.files.write_private(self.files.server_key, key_pem(key))
            self.files.write_public(self.files.server_cert, cert_pem(cert))
            self.files.write_index(index.with_cert(_issued(cert, Role.SERVER), moment))
        return cert

    # -- revoking -----------------------------------------------------------------------------------
    def revoke(self, common_name: str, reason: str, *, now: datetime | None = None) -> list[int]:
        """Revoke every issued, unexpired certificate of ``common_name`` and rewrite the CRL. Returns the
        serials revoked now (empty: nothing to revoke; the CRL is rewritten anyway). The broker sees it
        only after its CRL copy is refreshed and it is reloaded (:func:`write_crl`, :func:`reload_broker`)."""
        moment = utc(now or utcnow())
        with self.files.locked():
            index, serials = self.files.read_index().with_revoked(common_name, reason, moment)
            self._write_crl(index, moment)
        return serials

    def crl(self) -> x509.CertificateRevocationList:
        try:
            return x509.load_pem_x509_crl(self.crl_pem())
        except ValueError as exc:
            raise PkiError(f"{self.files.crl}: not a PEM CRL: {exc}") from None

    def crl_pem(self) -> bytes:
        return self.files.read_public(self.files.crl, "CRL")

    def refresh_crl_if_due(self, now: datetime | None = None) -> bool:
        """Re-issue the CRL when less than half its validity remains, or when it is missing, unreadable,
        not signed by this CA or older than the index (a crash between the two writes). True if rewritten."""
        moment = utc(now or utcnow())
        with self.files.locked():
            index = self.files.read_index()
            if not self._crl_due(index, moment):
                return False
            self._write_crl(index, moment)
            return True

    # -- internals ----------------------------------------------------------------------------------
    def _crl_due(self, index: Index, now: datetime) -> bool:
        try:
            crl = self.crl()
            number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
        except (PkiError, x509.ExtensionNotFound):
            return True
        if number != index.crl_number or not self._signed_by_ca(crl):
            return True
        return crl_refresh_due(crl, now)

    def _signed_by_ca(self, crl: x509.CertificateRevocationList) -> bool:
        try:
            return crl.is_signature_valid(self._ca_key.public_key())
        except (InvalidSignature, TypeError):
            return False

    def _write_crl(self, index: Index, now: datetime) -> None:
        """The index first (with the new CRL number), then the CRL: a crash in between leaves a CRL older
        than the index, which :meth:`refresh_crl_if_due` re-issues; never a CRL that forgot a revocation."""
        index = index.next_crl()
        self.files.write_index(index)
        revoked = [Revoked(c.serial, c.revoked_at) for c in index.revoked(now) if c.revoked_at is not None]
        crl = build_crl(
            self._ca_key, self._ca_cert, revoked, number=index.crl_number, now=now, validity=CRL_VALIDITY
        )
        self.files.write_public(self.files.crl, crl.public_bytes(serialization.Encoding.PEM))

    def _write_controller(
        self, index: Index, name: str, now: datetime, *, days: float = CONTROLLER_DAYS
    ) -> Index:
        key = new_key()
        cert = build_client(
            self._ca_key,
            self._ca_cert,
            key.public_key(),
            common_name=name,
            now=now,
            days=days,
            serial=_serial(),
        )
        cert_path, key_path = self.controller_paths(name)
        self.files.write_private(key_path, key_pem(key))
        self.files.write_public(cert_path, cert_pem(cert))
        index = index.with_cert(_issued(cert, Role.CONTROLLER), now)
        self.files.write_index(index)
        return index


def _serial() -> int:
    return x509.random_serial_number()


def _issued(cert: x509.Certificate, role: Role) -> IssuedCert:
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return IssuedCert(
        serial=cert.serial_number,
        common_name=str(cn),
        role=role,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


def _load_cert(files: PkiFiles, path: Path, what: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(files.read_public(path, what))
    except ValueError as exc:
        raise PkiError(f"{path}: not a PEM certificate: {exc}") from None


def certificate_summary(pki: Pki, now: datetime | None = None) -> dict[str, object]:
    """What an operator checks: the CA fingerprint, what the broker and controller certificates are good
    for and until when, the CRL's number and next update, how many device certificates are in use."""
    moment = utc(now or utcnow())
    server = pki.server_cert()
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    crl = pki.crl()
    index = pki.files.read_index()
    return {
        "ca_fingerprint": pki.ca_fingerprint,
        "ca_subject": pki.ca_cert.subject.rfc4514_string(),
        "ca_not_after": pki.ca_cert.not_valid_after_utc.isoformat(),
        "broker_hosts": [str(name.value) for name in sans],
        "broker_not_after": server.not_valid_after_utc.isoformat(),
        "controllers": {
            c.common_name: c.not_after.isoformat()
            for c in index.certs
            if c.role is Role.CONTROLLER and c.active(moment)
        },
        "devices_with_certificates": len(
            {c.common_name for c in index.certs if c.role is Role.AGENT and c.active(moment)}
        ),
        "crl_number": index.crl_number,
        "crl_next_update": crl.next_update_utc.isoformat() if crl.next_update_utc else None,
        "revoked_unexpired": len(index.revoked(moment)),
    }
