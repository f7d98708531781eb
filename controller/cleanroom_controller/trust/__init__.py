"""Trust: the controller's private CA (certificates, CRL), the Mosquitto configuration that admits only
its certificates, and reloading the broker after a revocation."""

from .brokerconfig import (
    DEFAULT_BROKER_USER,
    DEFAULT_LISTEN,
    BrokerConfigError,
    BrokerFiles,
    Listen,
    describe,
    parse_listen,
    reload_broker,
    render_acl,
    render_conf,
    write_broker_config,
    write_crl,
)
from .certificates import PkiError, build_csr, csr_public_key, fingerprint
from .crlkeeper import CrlKeeper, CrlUpdate
from .index import Index, IssuedCert, Role
from .pki import CRL_VALIDITY, DEFAULT_BROKER_HOSTS, DEFAULT_CLIENT_DAYS, Pki, certificate_summary
from .pkifiles import PkiFiles

__all__ = [
    "CRL_VALIDITY",
    "DEFAULT_BROKER_HOSTS",
    "DEFAULT_BROKER_USER",
    "DEFAULT_CLIENT_DAYS",
    "DEFAULT_LISTEN",
    "BrokerConfigError",
    "BrokerFiles",
    "CrlKeeper",
    "CrlUpdate",
    "Index",
    "IssuedCert",
    "Listen",
    "Pki",
    "PkiError",
    "PkiFiles",
    "Role",
    "build_csr",
    "certificate_summary",
    "csr_public_key",
    "describe",
    "fingerprint",
    "parse_listen",
    "reload_broker",
    "render_acl",
    "render_conf",
    "write_broker_config",
    "write_crl",
]
