"""A separate process appending audit entries to a store, for the tests of concurrent writers:
``python -m tests.support.audit_appender DATA_DIR DATABASE ACTOR COUNT GO_FILE``. Connects, prints ``ready``,
waits for ``GO_FILE`` to exist (so that all writers start together), then appends ``COUNT`` entries, each in
its own transaction, and prints ``done``."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from cleanroom_controller.store import Store


def main(data_dir: str, database: str, actor: str, count: str, go_file: str) -> None:
    store = Store.open(Path(data_dir), database or None)
    print("ready", flush=True)
    deadline = time.monotonic() + 30
    while not Path(go_file).exists():
        if time.monotonic() > deadline:
            raise SystemExit("no go signal within 30 s")
        time.sleep(0.005)
    for i in range(int(count)):
        store.append_audit("test.append", actor, f"n{i}", {"i": i})
        time.sleep(
            0.001
        )  # like real writers, not back to back: SQLite's busy wait would otherwise starve one
    store.close()
    print("done", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
