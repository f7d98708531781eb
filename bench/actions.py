"""Actions benchmark: violation report → session ended on the endpoint, and → desktop clean.

    uv run python bench/actions.py [--runs 100] [--wipe-runs 100] [--only all|session|wipe]

Needs Mosquitto, qemu-img and libvirt-python. Prints p50/p99 (and max) of:
  * session (real Mosquitto, ``cleanroom-controller run --desktops`` and ``cleanroom-agent run``, enforce
    mode, enforcers off; the VDI client a renamed ``tail`` started as ``xfreerdp /v:ADDR /u:USER``): a renamed
    /bin/sleep named in ``processes.deny`` is started; from the moment the agent's report naming it reaches
    the broker (a wire tap) until (a) the client process has exited (a pidfd becomes readable), (b) the
    agent's ``ended`` ack reaches the broker, (c) the controller has the desktop ``clean`` again (libvirt's
    test driver from a node XML file, the overlay a real qcow2 file: the audit entry's time). Aim: (a) p99
    ≤ 1 s.
  * wipe (in this process: a real SQLite store and audit chain, the DesktopRunner, the libvirt driver on a
    real qcow2 overlay over a golden image, libvirt's test driver for the domain): the desktop side of a
    violation (``end_session`` on the runner, as the action runner calls it) until the desktop is ``clean``,
    every transition persisted and audited; beside it, in the same run, the driver's own work measured alone
    (``log_off`` + ``wipe``: destroy, qemu-img create beside + rename, qemu-img info + map to verify, create)
    and the bare commands (destroy, ``qemu-img create``, create). Aim: runner ≤ driver alone + 50 ms.

Simulated: the hypervisor (no KVM here): libvirt's test driver keeps the domain state in the process that
opened it, so the domain calls cost what libvirt's API costs, not what booting a desktop costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
ADDRESS = "10.20.0.11"
USER = "clerk"
NODE_XML = """<node>
<domain type='test'><name>bill-01</name><memory>65536</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><source file='{overlay}'/><target dev='vda'/></disk></devices>
</domain>
</node>
"""


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def line(what: str, values_s: Sequence[float]) -> str:
    ms = [v * 1000 for v in values_s]
    return (
        f"  {what:<58} n={len(ms):>3}  p50 {percentile(ms, 50):8.1f} ms  p99 {percentile(ms, 99):8.1f} ms"
        f"  max {max(ms) if ms else float('nan'):8.1f} ms"
    )


def need(tool: str) -> str:
    found = shutil.which(tool)
    if found is None:
        sys.exit(f"{tool} not found (apt-get install qemu-utils mosquitto)")
    return found


def images(root: Path) -> tuple[Path, Path, Path]:
    """golden (with content of its own), the desktop's overlay on it, and a libvirt test-driver node file."""
    golden, overlay = root / "billing.qcow2", root / "bill-01.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(golden), "64M"], check=True)
    subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 4M", str(golden)], check=True, capture_output=True
    )
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(overlay)],
        check=True,
    )
    node = root / "hypervisor.xml"
    node.write_text(NODE_XML.format(overlay=overlay))
    return golden, overlay, node


def desktops_toml(node: Path, overlay: Path, golden: Path) -> str:
    return f"""
[[pool]]
id = "billing"
driver = "libvirt"
uri = "test://{node}"
wipe = "overlay"
timeout_s = 30
[[pool.desktop]]
id = "bill-01"
address = "{ADDRESS}"
domain = "bill-01"
overlay = "{overlay}"
golden = "{golden}"
"""


# -- session: real processes -----------------------------------------------------------------------------
def exit_time(pid: int, out: list[float], ready: threading.Event) -> threading.Thread:
    """A thread that records time.monotonic() when ``pid`` exits (pidfd readable)."""

    def run() -> None:
        fd = os.pidfd_open(pid)
        ready.set()
        try:
            select.select([fd], [], [], 60)
            out.append(time.monotonic())
        finally:
            os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def bench_session(runs: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tests.support.mosquitto import Mosquitto
    from tests.support.procs import Cleanroom

    need("mosquitto")
    work = Path(tempfile.mkdtemp(prefix="cr-bench-actions-"))
    broker = Mosquitto(work / "mosquitto")
    broker.start()
    world = Cleanroom(work / "world", broker)
    world.root.mkdir(parents=True)
    report_to_exit: list[float] = []
    report_to_ack: list[float] = []
    report_to_clean: list[float] = []
    try:
        golden, overlay, node = images(world.root)
        desktops = world.root / "desktops.toml"
        desktops.write_text(desktops_toml(node, overlay, golden))
        world.write_policy(
            heartbeat_s=2, end_grace_s=1.0, clients=["xfreerdp"], actions=["end_session", "wipe_desktop"]
        )
        ctl = world.start_controller("--desktops", str(desktops))
        tap = world.tap("cleanroom/v1/agents/#")
        world.add_agent("bench-agent")
        wall = time.time() - time.monotonic()

        def wait(cond: Any, timeout: float, what: str) -> Any:
            deadline = time.monotonic() + timeout
            while not (value := cond()):
                if time.monotonic() > deadline:
                    raise SystemExit(f"timed out waiting for {what}\n{ctl.log_tail(3000)}")
                time.sleep(0.01)
            return value

        def desktop() -> dict[str, Any]:
            rows = ctl.db_rows("SELECT * FROM desktops WHERE id = 'bill-01'")
            return rows[0] if rows else {}

        def compliant() -> bool:
            rows = ctl.db_rows("SELECT compliant FROM endpoints WHERE agent = 'bench-agent'")
            return bool(rows and rows[0]["compliant"])

        wait(compliant, 60, "the agent compliant")
        print(f"session: {runs} runs (report → client exited, → ended ack, → desktop clean)", flush=True)
        for n in range(runs):
            wait(lambda: desktop().get("state") == "clean", 30, "bill-01 clean")
            client = world.spawn(
                "xfreerdp",
                program="/usr/bin/tail",
                args=["-q", "-f", "/dev/null", f"/v:{ADDRESS}", f"/u:{USER}"],
            )
            wait(
                lambda c=client: (
                    desktop().get("session_id") == c.session_id and desktop().get("state") == "in_use"
                ),
                30,
                "bill-01 in_use",
            )
            exited: list[float] = []
            ready = threading.Event()
            waiter = exit_time(client.pid, exited, ready)
            ready.wait(5)
            mark = len(tap.messages)
            denied = world.spawn_denied()
            name = world.denied_name.encode()
            report = wait(
                lambda mark=mark, name=name: next(
                    (
                        m
                        for m in tap.messages[mark:]
                        if m.topic.endswith(("/posture", "/events")) and name in m.payload
                    ),
                    None,
                ),
                20,
                "the report naming the denied process",
            )
            ack = wait(
                lambda c=client, mark=mark: next(
                    (
                        m
                        for m in tap.messages[mark:]
                        if m.topic.endswith("/acks")
                        and c.session_id.encode() in m.payload
                        and b'"ended"' in m.payload
                    ),
                    None,
                ),
                20,
                "the ended ack",
            )
            waiter.join(20)
            clean = wait(
                lambda report=report: next(
                    (
                        e
                        for e in ctl.db_rows(
                            "SELECT ts, data FROM audit WHERE kind = 'desktop.clean' ORDER BY id DESC LIMIT 3"
                        )
                        if json.loads(e["data"]).get("session_id") is None and e["ts"] > report.at + wall
                    ),
                    None,
                ),
                30,
                "desktop.clean after the report",
            )
            report_to_exit.append(exited[0] - report.at)
            report_to_ack.append(ack.at - report.at)
            report_to_clean.append(clean["ts"] - (report.at + wall))
            denied.cleanup()
            client.cleanup()
            world.fakes.clear()
            wait(compliant, 30, "the agent compliant again")
            if (n + 1) % 10 == 0:
                print(f"  {n + 1} runs", flush=True)
    finally:
        world.close()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(line("report → client exited on the endpoint (aim p99 ≤ 1000)", report_to_exit))
    print(line("report → ended ack at the broker", report_to_ack))
    print(line("report → desktop clean (controller, libvirt test driver)", report_to_clean))


# -- wipe: the runner against the driver alone -------------------------------------------------------------
def bench_wipe(runs: int) -> None:
    import libvirt  # type: ignore[import-untyped]

    from cleanroom_controller.actions.drivers.base import SessionRef
    from cleanroom_controller.actions.drivers.libvirt import LibvirtDriver
    from cleanroom_controller.audit.recorder import Recorder
    from cleanroom_controller.desktops.config import parse_desktops
    from cleanroom_controller.desktops.machine import DesktopState
    from cleanroom_controller.desktops.runner import DesktopRunner
    from cleanroom_controller.store import Store

    need("qemu-img")
    work = Path(tempfile.mkdtemp(prefix="cr-bench-wipe-"))
    golden, overlay, node = images(work)
    desktops = parse_desktops(desktops_toml(node, overlay, golden))
    spec = desktops.get("bill-01")
    assert spec is not None
    driver = LibvirtDriver()
    store = Store.open(work / "controller")
    recorder = Recorder(store, "controller:bench")

    async def main() -> tuple[list[float], list[float], list[float]]:
        tasks: list[asyncio.Task[None]] = []

        def spawn(coro: Coroutine[Any, Any, None], name: str) -> None:
            tasks.append(asyncio.get_running_loop().create_task(coro, name=name))

        runner = DesktopRunner(
            store=store,
            recorder=recorder,
            desktops=lambda: desktops,
            drivers={"libvirt": driver},
            spawn=spawn,
        )
        runner.sync()
        through_runner: list[float] = []
        driver_alone: list[float] = []
        bare: list[float] = []
        conn = libvirt.open(f"test://{node}")  # the driver's own connection is another one, same process
        for n in range(runs):
            # The runner: a session on the desktop, then the violation's desktop side until clean.
            with store.transaction():
                runner.session_started("a1", f"s-{n}", address=ADDRESS, name=None, user=USER, now=time.time())
            t0 = time.perf_counter()
            with store.transaction():
                runner.end_session("a1", f"s-{n}", reason="violation:bench")
            runner.poll()
            while True:
                await asyncio.sleep(0)
                d = store.desktop("bill-01")
                if d is not None and d.state is DesktopState.CLEAN and all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.0005)
            through_runner.append(time.perf_counter() - t0)
            tasks.clear()
            # The driver alone: the same two steps, called directly.
            t0 = time.perf_counter()
            off = await driver.log_off(spec, SessionRef("a1", f"s-{n}", USER, "bench"))
            wiped = await driver.wipe(spec)
            driver_alone.append(time.perf_counter() - t0)
            assert (off.result, wiped.result) == ("ended", "clean"), (off, wiped)
            # The bare commands: destroy, qemu-img create (beside, then rename), create.
            dom = conn.lookupByName("bill-01")
            t0 = time.perf_counter()
            if dom.isActive():
                dom.destroy()
            fresh = overlay.with_name(".bare.qcow2")
            subprocess.run(
                ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(fresh)],
                check=True,
            )
            os.replace(fresh, overlay)
            dom.create()
            bare.append(time.perf_counter() - t0)
        return through_runner, driver_alone, bare

    try:
        through_runner, driver_alone, bare = asyncio.run(main())
    finally:
        driver.close()
        store.close()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wipe: {runs} runs (libvirt driver, overlay wipe on real qcow2 files)")
    print(line("violation → desktop clean (runner: persisted, audited)", through_runner))
    print(line("driver alone (log_off + wipe, verify included)", driver_alone))
    print(line("bare commands (destroy, qemu-img create, create)", bare))
    over = [r - d for r, d in zip(through_runner, driver_alone, strict=True)]
    print(line("runner − driver alone, same run (aim p99 ≤ 50)", over))


def main() -> None:
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=100, help="violation runs with the real processes")
    ap.add_argument("--wipe-runs", type=int, default=100, help="wipes through the runner and alone")
    ap.add_argument("--only", choices=("all", "session", "wipe"), default="all")
    args = ap.parse_args()
    if args.only in ("all", "wipe"):
        bench_wipe(args.wipe_runs)
    if args.only in ("all", "session"):
        bench_session(args.runs)


if __name__ == "__main__":
    main()
