"""Agent settings: defaults < TOML file (``--config``, else /etc/cleanroom/agent.toml if present) <
``CLEANROOM_*`` environment < command-line flags."""

from __future__ import annotations

import json
import socket
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)
from pydantic_settings import SettingsError as PydanticSettingsError

from cleanroom_protocol import BrokerAddress as BrokerAddress  # re-exported: cleanroom_agent.BrokerAddress
from cleanroom_protocol import Mode, TlsFiles, is_valid_agent_id, tls_settings_problem
from cleanroom_protocol import parse_broker_url as parse_broker_url

from .messaging.spool import MAX_OUTBOX_ROWS

DEFAULT_CONFIG = Path("/etc/cleanroom/agent.toml")
DEFAULT_DATA_DIR = Path("/var/lib/cleanroom-agent")
DEFAULT_SOCKET = Path("/run/cleanroom/agent.sock")
# What `cleanroom-agent enroll` (enroll.py) writes into the data dir, and `run` picks up by default.
ENROLMENT_FILE = "enrolment.json"
TLS_DIR, TLS_CA, TLS_CERT, TLS_KEY = "tls", "ca.crt", "agent.crt", "agent.key"
CONTROLLER_KEY = "controller.pub"
MAX_ENROLMENT_FILE = 64 * 1024


class SettingsError(Exception):
    """Settings that cannot be used; the message names the file or key."""


def _default_id() -> str:
    return socket.gethostname().split(".")[0] or "agent"


class AgentSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CLEANROOM_", extra="forbid", enable_decoding=False)

    broker: str = "mqtt://127.0.0.1:1883"
    # mTLS with an mqtts:// broker: the CA that signed the broker's certificate (none: the system's) and
    # this device's certificate (CN = its id) and key (0600).
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    data_dir: Path = DEFAULT_DATA_DIR
    id: str = Field(default_factory=_default_id)
    mode: Mode = Mode.ENFORCE
    controller_key: Path | None = None
    controller_id: str = "controller"
    # The controller's enrolment endpoint (https://host:8443), where the running agent renews its
    # certificate; set from enrolment.json when the agent was enrolled.
    enrol_url: str | None = None
    policy: Path | None = None
    socket: Path = DEFAULT_SOCKET
    # Group (name or gid) whose members may read the posture over the local socket; none: root only.
    admin_group: str | None = Field(default=None, min_length=1, max_length=64)
    keepalive: int = Field(default=10, ge=1, le=600)
    # The posture poll is a safety net: processes, mounts and enforcer states drive posture through events
    # (procevents.py, the media enforcer, enforcer.status). What only the poll sees: logged-in users, and
    # everything when process events are unavailable. 5 s keeps the idle agent under 0.5 % of a core.
    poll_interval: float = Field(default=5.0, gt=0, le=60)
    log_level: str = "info"
    # Which enforcers run (the others report `off`). Tests and evaluation hosts switch off those that
    # touch the whole machine (usb: authorized_default on the real root hubs; media: unmounting).
    enforcers: list[Literal["clipboard", "capture", "usb", "media"]] = [
        "clipboard",
        "capture",
        "usb",
        "media",
    ]
    sysfs_root: Path = Path("/sys")
    exec_backend: Literal["fanotify", "procconn"] = "fanotify"
    # Re-observe on exec/exit events from the proc connector (procevents.py); off: only the poll does.
    process_events: bool = True
    # The outbox's bound (rows waiting for the controller's watermark). Full, the agent refuses new events
    # (counted: posture's spool_refused) and fails closed until watermarks drain it to 90 % (spool.py).
    spool_max_rows: int = Field(default=MAX_OUTBOX_ROWS, ge=10, le=10_000_000)

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @field_validator("id", "controller_id")
    @classmethod
    def _agent_id(cls, value: str) -> str:
        if not is_valid_agent_id(value):
            raise ValueError(f"{value!r} is not a valid id (letters, digits, . _ -; at most 64)")
        return value

    @field_validator("enforcers", mode="before")
    @classmethod
    def _enforcer_list(cls, value: Any) -> Any:
        # flags and environment give a comma-separated list: "clipboard,capture"; "" or "none" is none
        if isinstance(value, str):
            return [] if value.strip() in ("", "none") else [v.strip() for v in value.split(",") if v.strip()]
        return value

    @field_validator("log_level")
    @classmethod
    def _level(cls, value: str) -> str:
        if value.lower() not in ("debug", "info", "warning", "error"):
            raise ValueError("log_level must be debug, info, warning or error")
        return value.lower()

    @model_validator(mode="after")
    def _tls_needs_mqtts(self) -> AgentSettings:
        self._enrolment_defaults()
        problem = tls_settings_problem(self.broker, TlsFiles(self.tls_ca, self.tls_cert, self.tls_key))
        if problem:
            raise ValueError(problem)
        return self

    def _enrolment_defaults(self) -> None:
        """What ``cleanroom-agent enroll`` wrote into the data dir fills every setting no layer gave: the
        broker URL and controller id from ``enrolment.json``, the TLS files from ``tls/``, the controller's
        key from ``controller.pub``. An enrolled endpoint runs with no configuration at all."""
        record_path = self.data_dir / ENROLMENT_FILE
        try:
            if not record_path.is_file():
                return
        except PermissionError:  # a data dir this user may not read (an unprivileged `check`): no defaults
            return
        try:
            with record_path.open("rb") as f:
                record = json.loads(f.read(MAX_ENROLMENT_FILE + 1))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{record_path}: unreadable enrolment record ({exc})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{record_path}: not an enrolment record")
        given = self.model_fields_set
        broker_url = record.get("broker_url")
        if "broker" not in given and isinstance(broker_url, str):
            parse_broker_url(broker_url)
            self.broker = broker_url
        enrol_url = record.get("controller_url")
        if "enrol_url" not in given and isinstance(enrol_url, str):
            self.enrol_url = enrol_url
        controller_id = record.get("controller_id")
        if (
            "controller_id" not in given
            and isinstance(controller_id, str)
            and is_valid_agent_id(controller_id)
        ):
            self.controller_id = controller_id
        tls = self.data_dir / TLS_DIR
        if not given & {"tls_ca", "tls_cert", "tls_key"} and parse_broker_url(self.broker).tls:
            self.tls_ca, self.tls_cert, self.tls_key = tls / TLS_CA, tls / TLS_CERT, tls / TLS_KEY
        if self.controller_key is None and (self.data_dir / CONTROLLER_KEY).is_file():
            self.controller_key = self.data_dir / CONTROLLER_KEY

    @property
    def broker_address(self) -> BrokerAddress:
        """The broker and, for mqtts://, the TLS files to reach it with."""
        return parse_broker_url(self.broker).with_tls(TlsFiles(self.tls_ca, self.tls_cert, self.tls_key))

    @property
    def key_path(self) -> Path:
        return self.data_dir / "agent.key"

    @property
    def db_path(self) -> Path:
        return self.data_dir / "agent.db"


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise SettingsError(f"{path}: cannot read config: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{path}: invalid TOML: {exc}") from exc


def load_settings(config: Path | None = None, **flags: Any) -> AgentSettings:
    """Settings from the config file, the environment and ``flags`` (``None`` flags are not given)."""
    if config is None and DEFAULT_CONFIG.exists():
        config = DEFAULT_CONFIG
    file_values = read_config_file(config) if config is not None else {}
    given = {k: v for k, v in flags.items() if v is not None}

    class _FromFile(AgentSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return init_settings, env_settings, InitSettingsSource(settings_cls, init_kwargs=file_values)

    try:
        return _FromFile(**given)
    except ValidationError as exc:
        where = f" (config {config})" if config else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
        )
        raise SettingsError(f"invalid settings{where}: {problems}") from exc
    except PydanticSettingsError as exc:
        # an environment variable that does not parse (e.g. CLEANROOM_KEEPALIVE=soon)
        raise SettingsError(f"invalid settings from the environment: {exc}") from exc
