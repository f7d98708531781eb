"""The agent's entry point: ``cleanroom-agent`` (the console script) and ``python -m cleanroom_agent``.

It sets the process up for a small footprint (memory.lean_process: no ``rich``, two malloc arenas) before
the CLI imports structlog and typer and before any thread starts; then it is the CLI. Tests and the
controller import ``cleanroom_agent.cli`` directly and keep their libraries as installed."""

from __future__ import annotations

from .memory import lean_process


def main() -> None:
    lean_process()
    from .cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
