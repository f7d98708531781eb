"""The desktops file: validation errors name file, line and field; lookups by address and name."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_controller.desktops.config import DesktopsError, load_desktops, parse_desktops

GOOD = """\
[[pool]]
id = "billing"
driver = "libvirt"
uri = "test:///default"
retries = 2
[[pool.desktop]]
id = "bill-01"
address = "10.20.0.11"
domain = "bill-01"
overlay = "/d/bill-01.qcow2"
golden = "/g/billing.qcow2"

[[pool]]
id = "horizon"
driver = "command"
[pool.command]
log_off = ["/usr/local/bin/hv-logoff", "--session", "{session}", "--user", "{user}"]
wipe = ["/usr/local/bin/hv-refresh", "{name}"]
env = ["HV_TOKEN"]
[[pool.desktop]]
id = "hv-01"
address = "vdi.example.org"
name = "Billing-01"
"""


def test_good_file_loads_and_maps_addresses(tmp_path: Path) -> None:
    path = tmp_path / "desktops.toml"
    path.write_text(GOOD)
    desktops = load_desktops(path)
    assert len(desktops) == 2
    spec = desktops.match("10.20.0.11:3389")
    assert spec is not None and spec.id == "bill-01" and spec.pool.retries == 2
    assert desktops.match("10.20.0.11") is spec
    hv = desktops.match("vdi.example.org:443", "billing-01")
    assert hv is not None and hv.id == "hv-01"
    assert desktops.match("10.9.9.9") is None
    assert desktops.match(None, "Billing-01") is hv


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("goldn =", "golden ="), None),
        (
            ('golden = "/g/billing.qcow2"', 'goldn = "/g/billing.qcow2"'),
            r"desktops\.toml:11: field pool\.0\.desktop\.0\.goldn",
        ),
        (("retries = 2", "retries = 0"), r"desktops\.toml:5: field pool\.0\.retries"),
        (('"{name}"', '"{password}"'), r"desktops\.toml:16: .*unknown placeholder \{password\}"),
        (('driver = "command"', 'driver = "container"'), r"desktops\.toml:13: .*'container' needs image"),
        (('address = "vdi.example.org"', 'address = "10.20.0.11"'), r"share address"),
        (('env = ["HV_TOKEN"]', 'env = ["hv token"]'), r"desktops\.toml:19: field pool\.1\.command\.env\.0"),
    ],
)
def test_errors_name_file_line_and_field(
    tmp_path: Path, change: tuple[str, str], expected: str | None
) -> None:
    path = tmp_path / "desktops.toml"
    path.write_text(GOOD.replace(*change))
    if expected is None:
        load_desktops(path)
        return
    with pytest.raises(DesktopsError, match=expected):
        load_desktops(path)


def test_libvirt_overlay_needs_golden_and_never_the_same_file() -> None:
    with pytest.raises(DesktopsError, match="needs overlay and golden"):
        parse_desktops(GOOD.replace('golden = "/g/billing.qcow2"\n', ""))
    with pytest.raises(DesktopsError, match="same file"):
        parse_desktops(GOOD.replace('"/g/billing.qcow2"', '"/d/bill-01.qcow2"'))


def test_broken_toml_names_the_line() -> None:
    with pytest.raises(DesktopsError, match=r"<desktops>: invalid TOML: .*line 3"):
        parse_desktops('[[pool]]\nid = "x"\ndriver = \n')


CONTAINERS = """\
[[pool]]
id = "coding"
driver = "container"
image = "registry.example.org/desktops/coding:2026.11"
timeout_s = 30
[[pool.desktop]]
id = "code-01"
address = "10.20.1.11:6901"
volumes = ["code-01-home:/home", "code-01-tmp:/var/tmp"]
command = ["/usr/bin/desktop", "--kiosk"]
[[pool.desktop]]
id = "code-02"
address = "10.20.1.12:6901"
container = "coding-02"
"""


def test_container_pool_parses_with_its_own_default_uri_and_libvirt_keeps_its_own() -> None:
    desktops = parse_desktops(CONTAINERS)
    one, two = desktops.get("code-01"), desktops.get("code-02")
    assert one is not None and two is not None
    assert (
        one.pool.uri == "unix:///run/docker.sock"
        and one.pool.image == "registry.example.org/desktops/coding:2026.11"
    )
    assert one.desktop.container_name == "code-01" and two.desktop.container_name == "coding-02"
    assert one.desktop.volume_mounts == [("code-01-home", "/home"), ("code-01-tmp", "/var/tmp")]
    assert one.desktop.command == ["/usr/bin/desktop", "--kiosk"] and two.desktop.command is None
    ported = parse_desktops(
        CONTAINERS.replace(
            'container = "coding-02"', 'ports = ["6901:6901", "127.0.0.1:16902:6902/udp", "[::1]:3:4"]'
        )
    ).get("code-02")
    assert ported is not None and ported.desktop.port_bindings == {
        "6901/tcp": 6901,
        "6902/udp": ("127.0.0.1", 16902),
        "4/tcp": ("::1", 3),
    }
    libvirt = parse_desktops(GOOD).get("hv-01")
    assert (
        libvirt is not None
        and parse_desktops(GOOD.replace('uri = "test:///default"\n', "")).get("bill-01").pool.uri
        == "qemu:///system"
    )  # type: ignore[union-attr]
    assert (
        parse_desktops(CONTAINERS.replace("timeout_s = 30", 'uri = "unix:///run/podman/podman.sock"'))
        .get("code-01")
        .pool.uri
        == "unix:///run/podman/podman.sock"
    )  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ('image = "registry.example.org/desktops/coding:2026.11"\n', ""),
            r"<desktops>:1: field pool\.0: driver 'container' needs image",
        ),
        (
            ('"code-01-tmp:/var/tmp"', '"/srv/staging:/var/tmp"'),
            r"<desktops>:9: field pool\.0\.desktop\.0\.volumes: .*bind mount",
        ),
        (
            ('"code-01-tmp:/var/tmp"', '"code-01-tmp"'),
            r"<desktops>:9: field pool\.0\.desktop\.0\.volumes: .*not NAME:/path",
        ),
        (('"code-01-tmp:/var/tmp"', '"code-01-home:/var/tmp"'), r"volume 'code-01-home' appears twice"),
        (
            ('container = "coding-02"', 'container = "code-01"'),
            r"desktops code-01 and code-02 share container code-01",
        ),
        (
            ('container = "coding-02"', 'volumes = ["code-01-home:/home"]'),
            r"desktops code-01 and code-02 share volume code-01-home",
        ),
        (
            ('container = "coding-02"', 'container = "../etc"'),
            r"<desktops>:14: field pool\.0\.desktop\.1\.container",
        ),
        (
            ("timeout_s = 30", "timeout_s = 30\nstop_grace_s = 30"),
            r"stop_grace_s must be shorter than timeout_s",
        ),
        (
            ('container = "coding-02"', 'ports = ["6901"]'),
            r"<desktops>:14: field pool\.0\.desktop\.1\.ports: '6901' is not",
        ),
        (
            ('container = "coding-02"', 'ports = ["70000:6901"]'),
            r"field pool\.0\.desktop\.1\.ports: '70000:6901' is not",
        ),
        (
            ('container = "coding-02"', 'ports = ["1:6901", "2:6901/tcp"]'),
            r"container port 6901/tcp is published twice",
        ),
        (("timeout_s = 30", 'env = ["vnc pw"]'), r"<desktops>:5: field pool\.0\.env\.0"),
        (("timeout_s = 30", 'network = "a b"'), r"<desktops>:5: field pool\.0\.network"),
    ],
)
def test_container_pool_errors_name_the_field(change: tuple[str, str], expected: str) -> None:
    with pytest.raises(DesktopsError, match=expected):
        parse_desktops(CONTAINERS.replace(*change))
