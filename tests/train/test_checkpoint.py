"""Checkpoints carry what evaluation and deployment need to rebuild the same model."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.train.checkpoint import load_checkpoint, save_checkpoint

BODY_GRAPH = {"nodes": {"torso": {"obs": [0, 1], "act": [], "parent": None}, "leg": {"obs": [2], "act": [0, 1], "parent": "torso"}}}


def test_task_structure_and_statistics_round_trip(tmp_path) -> None:
    spec = PolicySpec(3, 2, (-1.0, -1.0), (1.0, 1.0), structure={"body_graph": BODY_GRAPH})
    stats = NormStats({"observations": {"mean": [0.0, 1.0, 2.0], "std": [1.0, 2.0, 3.0]}, "actions": {"min": [-1, -1], "max": [1, 1]}})
    policy = make_policy({"name": "bc", "hidden_dims": [4]}, spec, stats)
    save_checkpoint(tmp_path / "ckpt", policy, {"policy": {"name": "bc", "hidden_dims": [4]}}, "hopper", 3, None)
    loaded = load_checkpoint(tmp_path / "ckpt")
    assert loaded.policy.spec == spec and loaded.policy.spec.structure["body_graph"] == BODY_GRAPH
    saved_stats = json.loads((tmp_path / "ckpt" / "stats.json").read_text())["features"]
    assert saved_stats == {"observations": {"mean": [0.0, 1.0, 2.0], "std": [1.0, 2.0, 3.0]}}  # only what bc needs


@pytest.mark.parametrize(
    "stats, message",
    [({"observations": {"mean": [0.0], "median": [1.0]}}, "unknown statistics"),
     ({"observations": {"mean": [0.0, np.nan]}}, "finite"),
     ({"observations": {"mean": [0.0], "std": [0.0]}}, "std must be positive"),
     ({"observations": {"mean": [0.0, 1.0], "std": [1.0]}}, "different lengths")],
)
def test_malformed_statistics_are_named(stats: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        NormStats(stats)


def test_stats_in_neither_format_are_refused() -> None:
    with pytest.raises(ValueError, match="kinema.stats/2"):
        NormStats.from_dict({"means": [1.0]}, source="x/stats.json")
