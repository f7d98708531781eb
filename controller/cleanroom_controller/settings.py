"""Controller settings: defaults < TOML file (``--config``) < ``CLEANROOM_*`` environment < command-line flags."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from cleanroom_protocol import (
    BrokerAddress as BrokerAddress,
)  # re-exported: cleanroom_controller.BrokerAddress
from cleanroom_protocol import TlsFiles, tls_settings_problem
from cleanroom_protocol import parse_broker_url as parse_broker_url

from .audit.checkpoints import CheckpointPolicy
from .audit.sealer import SealPolicy
from .store.url import DatabaseUrl, parse_database_url

DEFAULT_DATA_DIR = Path("/var/lib/cleanroom-controller")


class SettingsError(Exception):
    """A settings file or value the controller cannot start with (the message names which)."""


class ControllerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLEANROOM_", extra="forbid")

    broker: str = "mqtt://127.0.0.1:1883"  # mqtt[s]://host:port; credentials in it are refused
    # mTLS with an mqtts:// broker: the CA of the broker's certificate (none: the system's) and this
    # process's client certificate and key (pki/controllers/NAME.crt|.key; its CN is the ACL user).
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    # The `broker-config --out DIR` of a Mosquitto on this host: the controller keeps its CRL copy fresh
    # there and reloads it (SIGHUP via its pid file). None: the broker's CRL is refreshed some other way.
    broker_dir: Path | None = None
    # The HTTPS enrolment endpoint (enrolserver.py), served once `pki init` made a PKI in the data dir;
    # "off" disables it. 8443: the customary unprivileged HTTPS port, apart from MQTT's 8883.
    enroll_listen: str = "0.0.0.0:8443"
    # The broker URL enrolled agents are told (mqtts://host:8883); default: this controller's, if mqtts://.
    agent_broker_url: str | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    # Where the store lives: none = SQLite in data_dir; sqlite:///path or a path; postgresql://user@host/db for
    # N controllers sharing one database (a password: PGPASSWORD or a 0600 PGPASSFILE rather than in the URL).
    database: str | None = None
    policy: Path | None = None
    desktops: Path | None = None  # pools of non-persistent desktops (TOML, watched; docs/desktops.md)
    embedded_broker: bool = False
    share_group: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    id: str = Field(default="controller", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    client_id: str | None = Field(default=None, pattern=r"^[A-Za-z0-9._-]{1,128}$")  # unique per process
    command_timeout: float = Field(default=5.0, gt=0, le=3600)
    command_attempts: int = Field(default=6, ge=1, le=100)
    keepalive: int = Field(default=10, ge=1, le=3600)
    max_skew_s: float = Field(default=300.0, gt=0)
    silence_check_s: float = Field(default=1.0, gt=0, le=60)
    # The audit trail (docs/audit.md). Accepted messages are sealed into one verdict.batch entry once this many
    # wait or the oldest has waited this long (a message is uncovered at most audit_seal_s plus a tick); the
    # chain's head is signed into audit-checkpoints.jsonl every audit_checkpoint_entries entries or
    # audit_checkpoint_s seconds, whichever comes first.
    audit_seal_leaves: int = Field(default=1_000, ge=1, le=100_000)
    audit_seal_s: float = Field(default=1.0, ge=0, le=3600)
    audit_checkpoint_entries: int = Field(default=10_000, ge=1, le=1_000_000_000)
    audit_checkpoint_s: float = Field(default=60.0, gt=0, le=86_400)
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)  # BrokerUrlError is a ValueError: reported naming the field, URL redacted
        return value

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> ControllerSettings:
        problem = tls_settings_problem(self.broker, TlsFiles(self.tls_ca, self.tls_cert, self.tls_key))
        if problem:
            raise ValueError(problem)
        return self

    @field_validator("database")
    @classmethod
    def _database_url(cls, value: str | None) -> str | None:
        # A DatabaseUrlError is a ValueError naming why, the URL's password redacted.
        parse_database_url(value, DEFAULT_DATA_DIR)
        return value

    @property
    def seal_policy(self) -> SealPolicy:
        return SealPolicy(max_leaves=self.audit_seal_leaves, max_age_s=self.audit_seal_s)

    @property
    def checkpoint_policy(self) -> CheckpointPolicy:
        return CheckpointPolicy(every_entries=self.audit_checkpoint_entries, every_s=self.audit_checkpoint_s)

    @property
    def database_url(self) -> DatabaseUrl:
        return parse_database_url(self.database, self.data_dir)

    @property
    def broker_address(self) -> BrokerAddress:
        """The broker and, for mqtts://, the TLS files to reach it with."""
        return parse_broker_url(self.broker).with_tls(TlsFiles(self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def mqtt_client_id(self) -> str:
        """``client_id`` if given; with a share group ``cleanroom-{id}-{group}-{pid}`` (two processes with one
        id would take each other's connection over); else ``cleanroom-{id}``."""
        if self.client_id:
            return self.client_id
        if self.share_group:
            return f"cleanroom-{self.id}-{self.share_group}-{os.getpid()}"
        return f"cleanroom-{self.id}"

    @property
    def persistent_session(self) -> bool:
        """A persistent MQTT session needs a client id that survives restarts: given, or the fixed default.
        A pid-derived id (share group, no ``client_id``) uses a clean session, so that a dead process does not
        leave a session behind at the broker that keeps taking its share of the group's messages."""
        return bool(self.client_id) or not self.share_group


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from exc
    # Accept both a flat file and a [controller] table.
    section = data.get("controller", data)
    if not isinstance(section, dict):
        raise SettingsError(f"{path}: [controller] must be a table")
    return {k.replace("-", "_"): v for k, v in section.items()}


def load_settings(config: Path | None = None, **flags: Any) -> ControllerSettings:
    """Settings from the layers; ``None`` flags are "not given". Raises :class:`SettingsError` naming the field."""
    file_values = _read_toml(config) if config is not None else {}

    class _Layered(ControllerSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, _FileSource(settings_cls, file_values))

    try:
        layered = _Layered(**{k: v for k, v in flags.items() if v is not None})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "(settings)"
        where = f" (from {config} or CLEANROOM_{field.upper()})" if config else ""
        raise SettingsError(f"setting {field}{where}: {err['msg']}") from exc
    return ControllerSettings.model_construct(**layered.model_dump())


class _FileSource(PydanticBaseSettingsSource):
    def __init__(self, settings_cls: type[BaseSettings], values: dict[str, Any]) -> None:
        super().__init__(settings_cls)
        self._values = values

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:
        return self._values.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return dict(self._values)
