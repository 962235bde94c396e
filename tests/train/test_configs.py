"""The shipped Hydra config groups stay in step with the code they configure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from kinema.policies import available_policies
from kinema.train.cli import CONFIG_DIR, to_plain

SUITE = json.loads((Path(__file__).resolve().parents[2] / "datasets" / "suite.json").read_text())["datasets"]


def test_every_suite_dataset_is_addressable() -> None:
    shipped = {p.stem for p in (Path(CONFIG_DIR) / "dataset").glob("*.yaml")}
    assert set(SUITE) <= shipped


@pytest.mark.parametrize("policy", sorted((p.stem for p in (Path(CONFIG_DIR) / "policy").glob("*.yaml"))))
def test_policy_groups_compose_to_registered_policies(policy: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_plain(compose("train", overrides=[f"policy={policy}"]))
    assert cfg["policy"]["name"] == policy and policy in available_policies()


def test_command_line_overrides_win_over_the_policy_recipe() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = to_plain(compose("train", overrides=["policy=dt", "train.lr=0.5"]))
    assert cfg["train"]["lr"] == 0.5 and cfg["train"]["batch_size"] == 64
