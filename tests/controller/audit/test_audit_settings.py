"""The audit trail's cadences are settings (TOML file, ``CLEANROOM_*`` environment): the seal policy and the
checkpoint cadence reach the controller's sealer and checkpointer; values out of range are refused naming the
setting and where it came from."""

from __future__ import annotations

from pathlib import Path

import pytest

from cleanroom_controller import SettingsError, load_settings
from cleanroom_controller.audit.checkpoints import CheckpointPolicy
from cleanroom_controller.audit.sealer import SealPolicy
from cleanroom_controller.daemon import Controller


def test_defaults_are_the_documented_cadences() -> None:
    s = load_settings()
    assert s.seal_policy == SealPolicy(max_leaves=1_000, max_age_s=1.0)
    assert s.checkpoint_policy == CheckpointPolicy(every_entries=10_000, every_s=60.0)


def test_file_and_environment_reach_the_sealer_and_the_checkpointer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'data_dir = "{tmp_path / "data"}"\naudit_seal_leaves = 250\naudit-checkpoint-s = 15\n')
    monkeypatch.setenv("CLEANROOM_AUDIT_SEAL_S", "0.25")
    monkeypatch.setenv("CLEANROOM_AUDIT_CHECKPOINT_ENTRIES", "500")
    settings = load_settings(cfg)
    controller = Controller(settings)
    try:
        assert controller.ingest.sealer.policy == SealPolicy(max_leaves=250, max_age_s=0.25)
        assert controller.checkpointer.policy == CheckpointPolicy(every_entries=500, every_s=15.0)
    finally:
        controller.store.close()


@pytest.mark.parametrize(
    ("line", "setting", "why"),
    [
        ("audit_seal_leaves = 0", "audit_seal_leaves", "greater than or equal to 1"),
        ("audit_seal_leaves = 100001", "audit_seal_leaves", "less than or equal to 100000"),
        ("audit_seal_s = -1", "audit_seal_s", "greater than or equal to 0"),
        ('audit_seal_s = "soon"', "audit_seal_s", "valid number"),
        ("audit_checkpoint_entries = 0", "audit_checkpoint_entries", "greater than or equal to 1"),
        ("audit_checkpoint_s = 0", "audit_checkpoint_s", "greater than 0"),
        ("audit_checkpoint_s = 86401", "audit_checkpoint_s", "less than or equal to 86400"),
    ],
)
def test_out_of_range_values_are_refused_naming_the_setting_and_its_source(
    tmp_path: Path, line: str, setting: str, why: str
) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(line + "\n")
    with pytest.raises(SettingsError) as caught:
        load_settings(cfg)
    message = str(caught.value)
    assert f"setting {setting} (from {cfg} or CLEANROOM_{setting.upper()})" in message, message
    assert why in message, message


def test_an_environment_value_out_of_range_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CLEANROOM_AUDIT_SEAL_S", "7200")
    with pytest.raises(SettingsError, match=r"audit_seal_s.*less than or equal to 3600"):
        load_settings()


def test_the_policies_refuse_what_the_settings_refuse() -> None:
    """Built directly (tests, bench), the policies check the same ranges."""
    with pytest.raises(ValueError, match="checkpoint cadence out of range"):
        CheckpointPolicy(every_entries=0)
    with pytest.raises(ValueError, match="checkpoint cadence out of range"):
        CheckpointPolicy(every_s=0)
    with pytest.raises(ValueError, match="seal policy out of range"):
        SealPolicy(max_leaves=100_001)
