"""Golden outputs: tiny saved models of bc, dt, at, bot and diffusion whose actions, and whose training, are pinned.

A refactor that changes what a policy does, or how the trainer trains it, fails here.
The fixtures are kinema checkpoint directories (safetensors + config + statistics, a few
KB each) under ``tests/golden/<name>/`` with ``expected_actions.json``, and
``tests/golden/training.json`` (per-step losses and learning rates of short runs).
Pin a deliberate change of behaviour, and say why in the commit, with:

    python tests/golden/test_golden.py --write [NAME ...]   (the named fixtures; none named: all)

Tolerances are loose enough for CPUs with different vector units (AVX2, AVX-512) and
tight enough that any change of computation fails.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.datasets import OfflineDataset, write_d4rl_hdf5
from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.train.checkpoint import load_checkpoint, save_checkpoint

HERE = Path(__file__).resolve().parent
SPEC = PolicySpec(obs_dim=5, act_dim=2, action_low=(-1.0, -0.5), action_high=(1.0, 2.0), max_episode_steps=50)
STATS = NormStats.for_observations(np.linspace(-1.0, 1.0, 5).astype(np.float32), np.linspace(0.5, 2.0, 5).astype(np.float32))
TINY_TRANSFORMER = {"context_len": 5, "embed_dim": 8, "n_layers": 2, "n_heads": 2, "max_timestep": 50}
SAVED_MODELS = {
    "bc": {"name": "bc", "hidden_dims": [8, 8], "dropout": 0.0},
    "dt": {"name": "dt", **TINY_TRANSFORMER, "attention_window": 3},
    "dt_full": {"name": "dt", **TINY_TRANSFORMER, "attention_window": 0},
    "at": {"name": "at", **TINY_TRANSFORMER, "attention_window": 3, "max_chain_len": 2},
    "bot": {"name": "bot", "variant": "mix", "embed_dim": 8, "n_layers": 2, "n_heads": 2},
    "diffusion": {"name": "diffusion", "embed_dim": 8, "n_layers": 2, "n_heads": 2, "horizon": 6, "n_action_steps": 3},
}
# bot needs a body graph: root (obs 0-1) - hip (obs 2, act 0) - knee (obs 3-4, act 1).
BODY_GRAPH = {"nodes": [{"name": "root", "parent": None, "obs_indices": [0, 1], "act_indices": []},
                        {"name": "hip", "parent": "root", "obs_indices": [2], "act_indices": [0]},
                        {"name": "knee", "parent": "hip", "obs_indices": [3, 4], "act_indices": [1]}]}
SPECS = {"bot": dataclasses.replace(SPEC, structure={"body_graph": BODY_GRAPH})}
# diffusion normalises actions by the data's range, narrower than the action box
STATS_WITH_ACTIONS = NormStats({**STATS.features, "actions": {"min": [-0.8, -0.4], "max": [0.9, 1.5]}})
TARGET_RETURN = 40.0
NUM_ENVS, STEPS = 2, 12
EPISODE_END_STEP, EPISODE_END_ENVS = 7, [1]

# Short training runs (trainer + sampler + optimiser + schedule) on a synthetic hopper-shaped dataset.
TRAINING_STEPS = 24
TRAINING_RUNS = {
    "bc": ["policy=bc", "policy.hidden_dims=[16,16]", "policy.recipe.warmup_steps=8"],
    "dt": ["policy=dt", "policy.embed_dim=16", "policy.n_layers=1", "policy.context_len=6",
           "policy.attention_window=3", "policy.recipe.warmup_steps=8", "policy.recipe.batch_size=8"],
    "at": ["policy=at", "policy.embed_dim=16", "policy.n_layers=1", "policy.context_len=6",
           "policy.attention_window=3", "policy.recipe.warmup_steps=8", "policy.recipe.batch_size=8", "eval.trials=1"],
    "at_chains": ["policy=at", "policy.embed_dim=16", "policy.n_layers=1", "policy.context_len=6", "policy.max_chain_len=4",
                  "policy.attention_window=3", "policy.recipe.warmup_steps=8", "policy.recipe.batch_size=8", "eval.trials=1"],
    "bot": ["policy=bot", "policy.embed_dim=16", "policy.n_layers=2", "policy.n_heads=2", "policy.recipe.batch_size=16"],
    "diffusion": ["policy=diffusion", "policy.embed_dim=16", "policy.n_layers=1", "policy.horizon=6", "policy.n_action_steps=3",
                  "policy.recipe.batch_size=16", "policy.recipe.warmup_steps=8"],
}
ACTION_TOLERANCE = {"rtol": 1e-4, "atol": 1e-5}
LOSS_TOLERANCE = {"rtol": 1e-4, "atol": 1e-6}


def rollout_inputs() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1234)
    observations = rng.normal(size=(STEPS, NUM_ENVS, SPEC.obs_dim)).astype(np.float32)
    rewards = rng.uniform(0.0, 3.0, size=(STEPS, NUM_ENVS))
    return observations, rewards


def play(policy) -> np.ndarray:
    """The fixed rollout: reset, act, observe_reward, one episode end part-way."""
    observations, rewards = rollout_inputs()
    policy.eval()
    conditioning = {"target_return": TARGET_RETURN} if "target_return" in policy.conditioning else {}
    policy.reset(NUM_ENVS, **conditioning)
    policy.seed_episodes(np.arange(NUM_ENVS), np.arange(NUM_ENVS) + 100)  # a stochastic policy's noise
    actions = []
    for step in range(STEPS):
        actions.append(np.asarray(policy.act(observations[step]), dtype=np.float64))
        policy.observe_reward(rewards[step])
        if step == EPISODE_END_STEP:
            policy.end_episode(np.array(EPISODE_END_ENVS))
    return np.stack(actions)


def synthetic_hopper_dataset(path: Path) -> Path:
    """Episodes with Hopper-v5's shapes whose contents do not depend on MuJoCo."""
    rng = np.random.default_rng(99)
    lengths = [30, 45, 12, 60, 25, 38]
    total = sum(lengths)
    terminals = np.zeros(total, dtype=bool)
    terminals[np.cumsum(lengths) - 1] = True
    dataset = OfflineDataset(
        observations=rng.normal(size=(total, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(total, 3)).astype(np.float32),
        rewards=rng.uniform(0, 3, size=total).astype(np.float32),
        terminals=terminals,
        metadata={"task": "hopper"},
        source="golden-synthetic",
    )
    return write_d4rl_hdf5(dataset, path)


def train_run(name: str, data: Path, run_dir: Path) -> dict[str, list[float]]:
    """Per-step training loss and learning rate of the pinned short run ``name``."""
    from kinema.train.cli import compose_train_config
    from kinema.train.metrics import read_rows
    from kinema.train.trainer import run_training

    overrides = [
        f"dataset.path={data}", f"train.steps={TRAINING_STEPS}", "train.log_every=1", "train.checkpoint_every=1000",
        "eval.episodes=1", "eval.num_envs=1", "seed=0", "threads=1", *TRAINING_RUNS[name],
    ]
    run_training(compose_train_config(overrides), run_dir)
    rows = [row for row in read_rows(run_dir / "metrics.jsonl") if "train/loss" in row]
    return {"loss": [row["train/loss"] for row in rows], "lr": [row["train/lr"] for row in rows]}


# -- the tests -------------------------------------------------------------------------------
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(SAVED_MODELS))
def test_saved_model_takes_its_pinned_actions(name: str) -> None:
    expected = np.array(json.loads((HERE / name / "expected_actions.json").read_text())["actions"])
    actions = play(load_checkpoint(HERE / name).policy)
    np.testing.assert_allclose(actions, expected, **ACTION_TOLERANCE)


def test_a_checkpoint_in_the_layout_before_recipes_loads_and_acts_the_same() -> None:
    """tests/golden/legacy/dt: the dt fixture as written before statistics were keyed by feature
    (flat stats.json) and before the policy config held its recipe and inference options."""
    from kinema.train.checkpoint import read_run_config

    legacy = HERE / "legacy" / "dt"
    assert set(json.loads((legacy / "stats.json").read_text())) == {"obs_mean", "obs_std"}
    config = read_run_config(legacy)  # the old keys in today's places
    assert config["policy"]["recipe"]["lr"] == 1e-4 and config["policy"]["recipe"]["warmup_steps"] == 1000
    assert config["policy"]["recipe"]["schedule"] == "constant" and "lr" not in config["train"]
    assert config["policy"]["inference"] == {"target_return": None} and "target_returns" not in config["eval"]
    expected = np.array(json.loads((HERE / "dt" / "expected_actions.json").read_text())["actions"])
    np.testing.assert_allclose(play(load_checkpoint(legacy).policy), expected, **ACTION_TOLERANCE)


@pytest.mark.parametrize("name", sorted(TRAINING_RUNS))
def test_training_follows_its_pinned_losses(name: str, tmp_path: Path) -> None:
    expected = json.loads((HERE / "training.json").read_text())[name]
    measured = train_run(name, synthetic_hopper_dataset(tmp_path / "data.hdf5"), tmp_path / "run")
    np.testing.assert_allclose(measured["lr"], expected["lr"], rtol=1e-12)
    np.testing.assert_allclose(measured["loss"], expected["loss"], **LOSS_TOLERANCE)


# -- writing the fixtures ----------------------------------------------------------------------
def write_fixtures(names: list[str]) -> None:
    import tempfile

    torch.set_num_threads(1)
    for name, family_config in SAVED_MODELS.items():
        if names and name not in names:
            continue
        torch.manual_seed(7)
        policy = make_policy(family_config, SPECS.get(name, SPEC), STATS_WITH_ACTIONS if name == "diffusion" else STATS)
        with torch.no_grad():  # spread the weights so a changed computation moves the actions visibly
            for parameter in policy.parameters():
                parameter.add_(torch.randn_like(parameter) * 0.2)
        resolved = json.loads(json.dumps(dataclasses.asdict(policy.config)))  # every field, as the trainer saves it
        run_config = {"policy": {"name": policy.name, **resolved}, "seed": 0, "eval": {"target_return": TARGET_RETURN}}
        directory = save_checkpoint(HERE / name, policy, run_config, "golden", 0, None)
        actions = play(load_checkpoint(directory).policy)
        (directory / "expected_actions.json").write_text(json.dumps({"actions": actions.tolist()}, indent=1))
        print(f"wrote {directory}", file=sys.stderr)
    training = json.loads((HERE / "training.json").read_text()) if names else {}
    with tempfile.TemporaryDirectory() as scratch:
        data = synthetic_hopper_dataset(Path(scratch) / "data.hdf5")
        for name in TRAINING_RUNS:
            if not names or name in names:
                training[name] = train_run(name, data, Path(scratch) / name)
    (HERE / "training.json").write_text(json.dumps(training, indent=1))
    print(f"wrote {HERE / 'training.json'}", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:2] != ["--write"] or not set(sys.argv[2:]) <= set(SAVED_MODELS) | set(TRAINING_RUNS):
        sys.exit(f"usage: python tests/golden/test_golden.py --write [NAME ...]   (re-pins those golden outputs, "
                 f"or all; names: {sorted(set(SAVED_MODELS) | set(TRAINING_RUNS))})")
    write_fixtures(sys.argv[2:])
