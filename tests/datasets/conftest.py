"""Hand-made datasets whose contents tests can predict exactly."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.datasets import OfflineDataset


def make_dataset(episode_lengths, obs_dim=3, act_dim=2, ends="terminal", seed=0, final_unterminated=False):
    """Episodes of the given lengths; observations[:, 0] holds the global step index, so
    a sampled observation says exactly which step it came from."""
    rng = np.random.default_rng(seed)
    total = int(sum(episode_lengths))
    observations = rng.normal(size=(total, obs_dim)).astype(np.float32)
    observations[:, 0] = np.arange(total)
    terminals = np.zeros(total, dtype=bool)
    timeouts = np.zeros(total, dtype=bool)
    last_steps = np.cumsum(episode_lengths) - 1
    flags = terminals if ends == "terminal" else timeouts
    flags[last_steps] = True
    if final_unterminated:
        terminals[-1] = timeouts[-1] = False
    return OfflineDataset(
        observations=observations,
        actions=rng.uniform(-1, 1, size=(total, act_dim)).astype(np.float32),
        rewards=rng.normal(size=total).astype(np.float32),
        terminals=terminals,
        timeouts=timeouts,
        next_observations=observations + 1,
        infos={"qpos": rng.normal(size=(total, 4)), "qvel": rng.normal(size=(total, 4))},
        metadata={"task": "hopper", "env_id": "Hopper-v5", "ref_min_score": -20.272305, "ref_max_score": 3234.3,
                  "algorithm": "random", "steps": total, "tags": ["a", "b"]},
        source="hand-made",
    )


@pytest.fixture
def two_episodes() -> OfflineDataset:
    """Episode 0: 3 steps ending in a termination; episode 1: 2 steps ending in a time-out."""
    return OfflineDataset(
        observations=np.arange(10, dtype=np.float32).reshape(5, 2),
        actions=np.zeros((5, 1), dtype=np.float32),
        rewards=np.array([1.0, 2.0, 3.0, 10.0, 20.0], dtype=np.float32),
        terminals=np.array([0, 0, 1, 0, 0], dtype=bool),
        timeouts=np.array([0, 0, 0, 0, 1], dtype=bool),
        metadata={"task": "hopper"},
        source="two-episodes",
    )
