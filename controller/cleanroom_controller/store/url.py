"""The ``--database`` setting (pure): ``sqlite:///path``, a plain path, nothing (the data dir's
``controller.db``) or ``postgresql://user@host:port/dbname?...`` (libpq's URL; a password is better left to
``PGPASSWORD`` or a 0600 ``PGPASSFILE`` than written in it). :func:`redact_url` is what logs and errors show.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

DB_NAME = "controller.db"
MAX_URL_LENGTH = 2048

_SECRET_QUERY_KEYS = frozenset({"password", "sslpassword"})


class DatabaseUrlError(ValueError):
    """A ``--database`` value the controller cannot use (the message names why, with the URL redacted)."""


@dataclass(frozen=True, slots=True)
class DatabaseUrl:
    dialect: Literal["sqlite", "postgresql"]
    path: Path | None = None  # sqlite: the database file
    dsn: str = ""  # postgresql: the URL as given (may hold a password: never log it, use ``redacted``)

    @property
    def redacted(self) -> str:
        return str(self.path) if self.dialect == "sqlite" else redact_url(self.dsn)


def redact_url(url: str) -> str:
    """``url`` with any password (in the user info or a ``password=`` query parameter) replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "(unparsable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, hostport = netloc.rpartition("@")
        if ":" in userinfo:
            userinfo = userinfo.split(":", 1)[0] + ":***"
        netloc = f"{userinfo}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, "***" if k in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def parse_database_url(value: str | None, data_dir: Path) -> DatabaseUrl:
    """The database ``value`` names; ``None`` or empty: SQLite in ``data_dir``."""
    if value is None or not value.strip():
        return DatabaseUrl("sqlite", path=data_dir / DB_NAME)
    value = value.strip()
    if len(value) > MAX_URL_LENGTH:
        raise DatabaseUrlError(f"database URL longer than {MAX_URL_LENGTH} characters")
    scheme_match = _SCHEME.match(value)
    scheme = scheme_match.group(1).lower() if scheme_match else ""
    if scheme in ("postgresql", "postgres"):
        parts = urlsplit(value)
        if not parts.path.strip("/") and "dbname=" not in parts.query:
            raise DatabaseUrlError(f"{redact_url(value)}: names no database (postgresql://host/DBNAME)")
        return DatabaseUrl("postgresql", dsn=value)
    if scheme == "sqlite":
        rest = value[len("sqlite:") :]
        path = rest[2:] if rest.startswith("//") else rest  # sqlite:///abs → /abs, sqlite://rel → rel
        if not path:
            raise DatabaseUrlError("sqlite: URL names no file (sqlite:///path/to/controller.db)")
        return DatabaseUrl("sqlite", path=Path(path))
    if scheme and "/" not in value.split(":", 1)[0] and len(scheme) > 1:
        raise DatabaseUrlError(
            f"{redact_url(value)}: unknown database scheme {scheme!r} (sqlite or postgresql)"
        )
    plain = Path(value)
    return DatabaseUrl("sqlite", path=plain / DB_NAME if plain.is_dir() else plain)
