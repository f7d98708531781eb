"""The policy in force: a broken file is refused (file, line, field named; logged and audited) and the
policy in force stays; a valid change is picked up by watchdog; start refuses without any valid policy."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cleanroom_controller import NoPolicyError, PolicyKeeper, Store
from cleanroom_controller.audit.recorder import Recorder
from cleanroom_controller.trust.signer import Signer
from cleanroom_protocol import Kind, PolicyDocument, verify

from .harness import until
from .helpers import POLICY_FILE


def keeper(tmp_path: Path, path: Path | None) -> tuple[PolicyKeeper, Store, Ed25519PrivateKey]:
    store = Store.open(tmp_path / "data")
    key = Ed25519PrivateKey.generate()
    k = PolicyKeeper(store=store, recorder=Recorder(store, "controller:test"), signer=Signer(store, key, "controller"),
                     path=path)  # fmt: skip
    return k, store, key


def rejections(store: Store) -> list[str]:
    return [e.data["error"] for e in store.audit_entries() if e.kind == "policy.rejected"]


def test_broken_edit_is_refused_and_the_policy_in_force_stays(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    shutil.copy(POLICY_FILE, path)
    k, store, _ = keeper(tmp_path, path)
    assert k.load_initial().version == 3
    path.write_text(POLICY_FILE.read_text().replace("heartbeat_s = 30", 'heartbeat_s = "often"'))
    assert not k.reload()
    assert k.policy.version == 3
    (error,) = rejections(store)
    line = next(
        n for n, text in enumerate(path.read_text().splitlines(), 1) if text.startswith("heartbeat_s")
    )
    assert f"{path}:{line}" in error
    assert "report.heartbeat_s" in error


def test_older_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    shutil.copy(POLICY_FILE, path)
    k, store, _ = keeper(tmp_path, path)
    k.load_initial()
    path.write_text(POLICY_FILE.read_text().replace("version = 3", "version = 2"))
    assert not k.reload()
    assert "older" in rejections(store)[0]


def test_start_refuses_a_broken_file_without_a_policy_in_force(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    path.write_text('id = "x"\nversion = 1\n[report]\nheartbat_s = 3\n')
    k, _, _ = keeper(tmp_path, path)
    with pytest.raises(NoPolicyError, match=r"p.toml:4: field report.heartbat_s"):
        k.load_initial()
    with pytest.raises(NoPolicyError, match="--policy"):
        keeper(tmp_path / "other", None)[0].load_initial()


def test_start_with_a_broken_file_keeps_the_stored_policy(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    shutil.copy(POLICY_FILE, path)
    k, store, _ = keeper(tmp_path, path)
    k.load_initial()
    store.close()
    path.write_text("id = [")
    k2, store2, _ = keeper(tmp_path, path)
    assert k2.load_initial().id == "offshore-billing"
    assert "invalid TOML" in rejections(store2)[-1]


def test_signed_document_verifies_with_the_controller_key(tmp_path: Path) -> None:
    k, _, key = keeper(tmp_path, POLICY_FILE)
    k.load_initial()
    raw = k.signed_document()
    assert raw is k.signed_document()  # sealed once per policy
    verdict = verify(
        raw, public_key_for=lambda _: key.public_key(), max_skew_s=None, expected_kind=Kind.POLICY
    )
    assert verdict.ok
    assert isinstance(verdict.body, PolicyDocument)
    assert verdict.body.hash == k.hash


async def test_watchdog_picks_up_a_valid_change(tmp_path: Path) -> None:
    path = tmp_path / "p.toml"
    shutil.copy(POLICY_FILE, path)
    k, store, _ = keeper(tmp_path, path)
    k.load_initial()
    published: list[int] = []

    async def on_change() -> None:
        published.append(k.policy.version)

    started = asyncio.Event()
    task = asyncio.create_task(k.watch(on_change, started))
    try:
        await asyncio.wait_for(started.wait(), timeout=5)
        new = tmp_path / "p.toml.tmp"
        new.write_text(POLICY_FILE.read_text().replace("version = 3", "version = 4"))
        new.replace(path)  # how editors save
        await until(lambda: published == [4], timeout=5, what="version 4 published")
        path.write_text("broken = ")
        await until(lambda: rejections(store), timeout=5, what="broken edit refused")
        assert k.policy.version == 4
        assert published == [4]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
