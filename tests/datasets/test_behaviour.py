"""Behaviour policies: pickle-free actor snapshots and resumable PPO training."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from kinema.datasets.behaviour import (
    GaussianActor, TrainingRequest, _make_training_env, _new_model, load_actor, save_actor, train_behaviour,
)
from kinema.datasets.errors import DatasetError
from kinema.envs import get_task


def tiny_model(seed: int = 0):
    """An untrained PPO learner with VecNormalize statistics from a few random steps."""
    vec_env = _make_training_env(get_task("hopper"), seed)
    vec_env.reset()
    for _ in range(20):
        vec_env.step(np.stack([vec_env.action_space.sample() for _ in range(vec_env.num_envs)]))
    return _new_model(vec_env, seed), vec_env


def test_snapshot_reproduces_the_sb3_actor(tmp_path) -> None:
    model, vec_env = tiny_model()
    prefix = tmp_path / "step_000000000"
    save_actor(model, vec_env, prefix, {"task": "hopper", "training_steps": 0, "training_seed": 0})
    actor = load_actor(prefix, stochastic=False)
    assert isinstance(actor, GaussianActor) and (actor.obs_dim, actor.act_dim) == (11, 3)
    raw = np.random.default_rng(0).normal(size=(16, 11)) * 2.0
    expected, _ = model.predict(vec_env.normalize_obs(raw), deterministic=True)
    # Weights are stored as float16: the actions agree to the float16 rounding.
    np.testing.assert_allclose(actor.act(raw, np.random.default_rng(0)), expected, atol=2e-2)
    info = json.loads(prefix.with_suffix(".json").read_text())
    assert info["obs_mean"] == vec_env.obs_rms.mean.tolist() and info["algorithm"] == "PPO"

    sampled = load_actor(prefix, stochastic=True)
    first = sampled.act(raw, np.random.default_rng(5))
    np.testing.assert_array_equal(first, sampled.act(raw, np.random.default_rng(5)))
    assert not np.allclose(first, expected)  # sampled around the mean, not the mean
    assert (np.abs(first) <= 1).all()


def test_broken_snapshots_are_refused_with_the_file_named(tmp_path) -> None:
    model, vec_env = tiny_model()
    prefix = tmp_path / "snap"
    save_actor(model, vec_env, prefix, {"task": "hopper", "training_steps": 0, "training_seed": 0})
    weights = tmp_path / "snap.safetensors"
    tensors = load_file(weights)
    del tensors["log_std"]
    save_file(tensors, weights)
    with pytest.raises(DatasetError, match=r"snap\.safetensors: missing tensor 'log_std'"):
        load_actor(prefix)

    info_path = tmp_path / "snap.json"
    info = json.loads(info_path.read_text())
    del info["obs_var"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(DatasetError, match=r"snap\.json: missing key 'obs_var'"):
        load_actor(prefix)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_actor(tmp_path / "nothing")


class Interrupted(Exception):
    pass


def test_training_resumes_from_the_checkpoint_after_an_interruption(tmp_path) -> None:
    from stable_baselines3 import PPO

    request = TrainingRequest(total_steps=12_288, snapshot_every=4096, eval_episodes=1)

    def interrupt_after_second_snapshot(line: str) -> None:
        if "steps      4096" in line:
            raise Interrupted(line)  # like Ctrl-C right after the checkpoint at 4096 steps

    with pytest.raises(Interrupted):
        train_behaviour("hopper", request, work_dir=tmp_path, log=interrupt_after_second_snapshot)
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["num_timesteps"] == 4096 and state["finished"] is None
    assert [p["steps"] for p in state["curve"]] == [0, 4096]

    lines: list[str] = []
    state = train_behaviour("hopper", request, work_dir=tmp_path, log=lines.append)
    assert any("resuming from step_000004096 at 4096 steps" in line for line in lines)
    assert [p["steps"] for p in state["curve"]] == [0, 4096, 8192, 12288]  # continued, not restarted
    assert state["finished"] == "total_steps" and state["num_timesteps"] == 12_288
    assert PPO.load(tmp_path / "checkpoints" / "step_000012288.zip", device="cpu").num_timesteps == 12_288
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("*.zip")) == ["step_000008192.zip", "step_000012288.zip"]
    for steps in (0, 4096, 8192, 12288):
        assert load_actor(tmp_path / "snapshots" / f"step_{steps:09d}").info["training_steps"] == steps
    # Done: rerunning does no more work; a different seed is refused rather than mixed in.
    lines.clear()
    train_behaviour("hopper", request, work_dir=tmp_path, log=lines.append)
    assert lines == ["[hopper] already trained for 12288 >= 12288 steps"]
    with pytest.raises(DatasetError, match="existing training has seed=0"):
        train_behaviour("hopper", TrainingRequest(total_steps=12_288, snapshot_every=4096, seed=1), work_dir=tmp_path)
