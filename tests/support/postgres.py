"""A real PostgreSQL from Debian's packages, private to the tests: ``initdb`` into a temp directory and
``pg_ctl start`` on a free loopback port with its unix socket in that directory, run as the ``postgres`` user
when the tests run as root (the server refuses root). Stopped by ``stop()`` (fast, then immediate), which the
fixtures call also when a test fails. Missing binaries fail loudly: ``apt-get install postgresql``
(``.ci/run`` does it)."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.mosquitto import free_port

PG_USER = "cleanroom"  # the superuser initdb creates (trust authentication: local test server only)


def postgres_bin() -> Path:
    """The newest installed server's bin directory (Debian keeps them out of PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    if not found:
        raise RuntimeError(
            "PostgreSQL is not installed: these tests need a real server "
            "(apt-get install postgresql; .ci/run does it)"
        )
    return found[-1].parent


def _as_server_user() -> dict[str, object]:
    """Popen arguments that run a command as ``postgres`` when we are root (initdb and postgres refuse root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError as exc:
        raise RuntimeError(
            "running as root but there is no 'postgres' user (apt-get install postgresql)"
        ) from exc
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


@dataclass
class Postgres:
    """One server. ``durable=False`` (the tests' default) turns fsync off: the tests kill controllers, never
    this server, and it saves seconds; benchmarks keep it on."""

    durable: bool = False
    port: int = field(default_factory=free_port)
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cleanroom-pg-")))
    _running: bool = False

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_path(self) -> Path:
        return self.workdir / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{dbname}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _run(self, *args: str, timeout: float = 60.0) -> None:
        proc = subprocess.run(
            args,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.workdir,
            **_as_server_user(),  # type: ignore[call-overload]
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args)} exited with {proc.returncode}:\n{proc.stdout}{proc.stderr}\n{self.log_text()[-2000:]}"
            )

    def start(self) -> None:
        bindir = postgres_bin()
        if os.geteuid() == 0:
            shutil.chown(self.workdir, "postgres", "postgres")
        self._run(str(bindir / "initdb"), "-D", str(self.data_dir), "-A", "trust", "-U", PG_USER, "-E", "UTF8",
                  "--no-sync")  # fmt: skip
        self._start_server()

    def _start_server(self) -> None:
        options = [
            f"-k {self.workdir}",
            "-c listen_addresses=127.0.0.1",
            f"-p {self.port}",
            "-c max_connections=60",
            "-c shared_buffers=32MB",
        ]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(postgres_bin() / "pg_ctl"), "-D", str(self.data_dir), "-o", " ".join(options),
                  "-l", str(self.log_path), "-w", "-t", "60", "start")  # fmt: skip
        self._running = True

    def stop_server(self) -> None:
        """Stop the server as an operator's restart does (``pg_ctl stop -m fast``: every session is ended,
        FATAL 57P01), keeping its data; :meth:`start_server` brings it back on the same port."""
        self._run(
            str(postgres_bin() / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "20", "stop"
        )
        self._running = False

    def start_server(self) -> None:
        """Start the server stopped by :meth:`stop_server` again, same data, same port."""
        self._start_server()

    def create_database(self, name: str) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')  # type: ignore[arg-type]
        return self.url(name)

    def stop(self) -> None:
        if self._running:
            self._running = False
            bindir = postgres_bin()
            try:
                self._run(
                    str(bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "20", "stop"
                )
            except (RuntimeError, subprocess.TimeoutExpired):
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self._run(
                        str(bindir / "pg_ctl"), "-D", str(self.data_dir), "-m", "immediate", "-w", "stop"
                    )
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Postgres:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
