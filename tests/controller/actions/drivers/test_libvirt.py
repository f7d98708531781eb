"""The libvirt driver: domain calls against libvirt's ``test:///default`` hypervisor (no KVM here: that is
what is simulated, the driver's state lives in this test process), the wipe on real qcow2 files made and
written with qemu-img / qemu-io."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import libvirt  # type: ignore[import-untyped]
import pytest

from cleanroom_controller.actions.drivers.base import SessionRef
from cleanroom_controller.actions.drivers.libvirt import LibvirtDriver
from cleanroom_controller.desktops.config import DesktopSpec, parse_desktops

DOMAIN_XML = """<domain type='test'><name>{name}</name><memory>65536</memory><os><type>hvm</type></os>
<devices><disk type='file' device='disk'><source file='{overlay}'/><target dev='vda'/></disk></devices></domain>"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def qemu_io(image: Path, command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["qemu-io", "-f", "qcow2", "-c", command, str(image)], capture_output=True, text=True
    )


@pytest.fixture
def domain_name(request: pytest.FixtureRequest) -> object:
    name = f"desk-{request.node.name[:40]}"
    conn = libvirt.open("test:///default")
    yield name
    try:
        dom = conn.lookupByName(name)
        if dom.isActive():
            dom.destroy()
        dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA)
    except libvirt.libvirtError:
        pass
    conn.close()


def make_desktop(tmp_path: Path, name: str, *, wipe: str = "overlay") -> tuple[DesktopSpec, Path, Path]:
    golden = tmp_path / "golden.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(golden), "16M"], check=True)
    assert qemu_io(golden, "write -P 0x11 0 1M").returncode == 0  # the golden image's own content
    overlay = tmp_path / "desk.qcow2"
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(golden), "-F", "qcow2", str(overlay)],
        check=True,
    )
    conn = libvirt.open("test:///default")
    dom = conn.defineXML(DOMAIN_XML.format(name=name, overlay=overlay))
    dom.create()
    if wipe == "snapshot":
        dom.snapshotCreateXML("<domainsnapshot><name>golden</name></domainsnapshot>", 0)
    conn.close()
    text = f"""
[[pool]]
id = "p"
driver = "libvirt"
uri = "test:///default"
wipe = "{wipe}"
{'snapshot = "golden"' if wipe == "snapshot" else ""}
timeout_s = 20
[[pool.desktop]]
id = "d1"
address = "10.0.0.1"
domain = "{name}"
overlay = "{overlay}"
golden = "{golden}"
"""
    spec = parse_desktops(text).get("d1")
    assert spec is not None
    return spec, overlay, golden


def test_overlay_wipe_drops_what_the_session_wrote_and_never_touches_golden(
    tmp_path: Path, domain_name: str
) -> None:
    spec, overlay, golden = make_desktop(tmp_path, domain_name)
    golden_before = sha256(golden)
    assert qemu_io(overlay, "write -P 0x5e 1M 1M").returncode == 0  # the user stages data on the desktop
    assert "Pattern verification failed" not in qemu_io(overlay, "read -P 0x5e 1M 1M").stdout
    driver = LibvirtDriver()

    off = asyncio.run(driver.log_off(spec, SessionRef("a1", "s1", "u1", "violation")))
    assert off.result == "ended", off.detail
    assert asyncio.run(driver.report(spec)).state == "shut_off"
    outcome = asyncio.run(driver.wipe(spec))

    assert outcome.result == "clean", outcome.detail
    assert "Pattern verification failed" in qemu_io(overlay, "read -P 0x5e 1M 1M").stdout  # gone
    assert "Pattern verification failed" not in qemu_io(overlay, "read -P 0 1M 1M").stdout
    assert "Pattern verification failed" not in qemu_io(overlay, "read -P 0x11 0 1M").stdout  # golden shows
    assert sha256(golden) == golden_before
    assert asyncio.run(driver.report(spec)).state == "running"
    assert not list(tmp_path.glob(".desk.qcow2.new-*"))  # nothing left beside it
    driver.close()


def test_overlay_wipe_fails_when_golden_is_missing(tmp_path: Path, domain_name: str) -> None:
    spec, overlay, golden = make_desktop(tmp_path, domain_name)
    golden.rename(tmp_path / "elsewhere.qcow2")
    before = overlay.read_bytes()
    outcome = asyncio.run(LibvirtDriver().wipe(spec))
    assert outcome.result == "failed" and "golden image" in outcome.detail
    assert overlay.read_bytes() == before  # the old overlay is left as it was, not half-replaced


def test_verify_refuses_an_overlay_that_holds_data(tmp_path: Path, domain_name: str) -> None:
    _spec, overlay, golden = make_desktop(tmp_path, domain_name)
    assert qemu_io(overlay, "write -P 0x5e 1M 64k").returncode == 0
    with pytest.raises(Exception, match="bytes of its own"):
        LibvirtDriver().verify_fresh(overlay, golden, 10)


def test_snapshot_wipe_reverts_and_starts(tmp_path: Path, domain_name: str) -> None:
    spec, _overlay, _golden = make_desktop(tmp_path, domain_name, wipe="snapshot")
    driver = LibvirtDriver()
    assert asyncio.run(driver.log_off(spec, SessionRef(None, None, None, "op"))).result == "ended"
    outcome = asyncio.run(driver.wipe(spec))
    assert outcome.result == "clean", outcome.detail
    assert "snapshot golden" in outcome.detail
    assert asyncio.run(driver.report(spec)).state == "running"


def test_missing_domain_fails_the_wipe(tmp_path: Path, domain_name: str) -> None:
    spec, _overlay, _golden = make_desktop(tmp_path, domain_name)
    text_spec = DesktopSpec(spec.pool, spec.desktop.model_copy(update={"domain": "no-such-domain"}))
    assert asyncio.run(LibvirtDriver().wipe(text_spec)).result == "failed"
    assert asyncio.run(LibvirtDriver().report(text_spec)).state == "missing"
