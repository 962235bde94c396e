"""The Hydra config groups are built from the code they configure: one source for every default."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from kinema.policies import available_policies, policy_class
from kinema.train.cli import CONFIG_DIR, compose_train_config

SUITE = json.loads((Path(__file__).resolve().parents[2] / "datasets" / "suite.json").read_text())["datasets"]


@pytest.mark.parametrize("name", sorted(SUITE))
def test_every_suite_dataset_is_addressable(name: str) -> None:
    assert compose_train_config([f"dataset={name}"])["dataset"] == {"name": name, "path": None}


@pytest.mark.parametrize("policy", available_policies())
def test_policy_group_is_the_family_dataclass_with_every_field(policy: str) -> None:
    cfg = compose_train_config([f"policy={policy}"])
    defaults = json.loads(json.dumps(dataclasses.asdict(policy_class(policy).config_class())))
    assert cfg["policy"] == {"name": policy, **defaults}


def test_no_yaml_restates_policy_or_dataset_defaults() -> None:
    assert not (Path(CONFIG_DIR) / "policy").exists() and not (Path(CONFIG_DIR) / "dataset").exists()


def test_command_line_overrides_win_over_the_policy_recipe() -> None:
    cfg = compose_train_config(["policy=dt", "policy.recipe.lr=0.5"])
    assert cfg["policy"]["recipe"]["lr"] == 0.5 and cfg["policy"]["recipe"]["batch_size"] == 64
