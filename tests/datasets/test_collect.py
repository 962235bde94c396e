"""Dataset collection: D4RL fields and flag semantics, determinism, policy schedules, the CLI."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from kinema.datasets.collect import UniformRandomPolicy, collect, episode_returns
from kinema.datasets.d4rl_io import read_d4rl_hdf5
from kinema.envs import get_task


def short_task(name: str, max_episode_steps: int):
    """The task with a short time limit, so time-outs show up in a few hundred steps."""
    return dataclasses.replace(get_task(name), max_episode_steps=max_episode_steps)


def episode_flags_are_d4rl(dataset) -> None:
    """Every episode has exactly one flag, on its last step; never both flags at once."""
    assert not (dataset.terminals & dataset.timeouts).any()
    flags = dataset.terminals | dataset.timeouts
    ends = dataset.episode_ends
    assert flags[ends - 1].all()
    assert flags.sum() == len(ends)


def test_random_hopper_has_d4rl_fields_and_real_terminations() -> None:
    task = short_task("hopper", 30)
    dataset = collect(task, UniformRandomPolicy.for_task(task), 600, seed=0, num_envs=4)
    assert dataset.num_transitions == 600
    assert dataset.observations.shape == dataset.next_observations.shape == (600, 11)
    assert dataset.actions.shape == (600, 3) and dataset.observations.dtype == np.float32
    assert dataset.infos["qpos"].shape == (600, 6) and dataset.infos["qvel"].shape == (600, 6)
    episode_flags_are_d4rl(dataset)
    # A random hopper falls within ~20 steps: real terminations, and they come before the limit.
    assert dataset.terminals.sum() > 10
    assert (dataset.episode_lengths[dataset.terminals[dataset.episode_ends - 1]] <= 30).all()
    # Time-outs: episodes that reached the 30-step limit, plus at most one cut episode per environment.
    timeout_lengths = dataset.episode_lengths[dataset.timeouts[dataset.episode_ends - 1]]
    assert (timeout_lengths <= 30).all() and (timeout_lengths < 30).sum() <= 4
    # infos/qpos is the state the action was taken from: Hopper observes qpos[1:] then velocities.
    np.testing.assert_array_equal(dataset.observations[:, :5], dataset.infos["qpos"][:, 1:].astype(np.float32))
    # next_observations continue the episode: next_obs[t] == obs[t + 1] inside every episode.
    inside = np.ones(599, dtype=bool)
    inside[dataset.episode_ends[:-1] - 1] = False
    np.testing.assert_array_equal(dataset.next_observations[:-1][inside], dataset.observations[1:][inside])
    assert (np.abs(dataset.actions) <= 1).all()
    assert dataset.metadata["task"] == "hopper" and dataset.metadata["env_id"] == "Hopper-v5"


def test_halfcheetah_never_terminates_and_times_out_at_the_limit() -> None:
    task = short_task("halfcheetah", 25)
    dataset = collect(task, UniformRandomPolicy.for_task(task), 200, seed=3, num_envs=2)
    episode_flags_are_d4rl(dataset)
    assert not dataset.terminals.any()
    assert (dataset.episode_lengths == 25).all()  # 200 = 2 envs x 4 episodes x 25: no cut episodes
    assert dataset.timeouts.sum() == 8


def test_cut_episodes_are_marked_truncated() -> None:
    task = short_task("halfcheetah", 1000)
    dataset = collect(task, UniformRandomPolicy.for_task(task), 103, seed=0, num_envs=4)
    # Four environments each cut mid-episode: four episodes, each ending in a time-out flag.
    assert dataset.num_episodes == 4 and dataset.timeouts.sum() == 4
    assert sorted(dataset.episode_lengths.tolist()) == [25, 26, 26, 26]


def test_same_seed_same_data_other_seed_other_data() -> None:
    task = short_task("hopper", 50)
    policy = UniformRandomPolicy.for_task(task)
    first, again = collect(task, policy, 300, seed=7), collect(task, policy, 300, seed=7)
    other = collect(task, policy, 300, seed=8)
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        np.testing.assert_array_equal(getattr(first, key), getattr(again, key))
    np.testing.assert_array_equal(first.infos["qpos"], again.infos["qpos"])
    assert not np.array_equal(first.actions, other.actions)


class ConstantPolicy:
    def __init__(self, value: float, act_dim: int = 6):
        self.value, self.act_dim = value, act_dim

    def act(self, observations, rng):
        return np.full((len(observations), self.act_dim), self.value)

    def describe(self):
        return {"algorithm": f"constant {self.value}", "training_steps": 0}


def test_policy_schedule_switches_after_the_given_number_of_transitions() -> None:
    task = short_task("halfcheetah", 40)
    dataset = collect(task, [(0, ConstantPolicy(0.0)), (120, ConstantPolicy(0.5))], 200, seed=0, num_envs=4)
    assert (dataset.actions[:, 0] == 0.0).sum() == 120
    assert (dataset.actions[:, 0] == 0.5).sum() == 80
    with pytest.raises(ValueError, match="start with a policy acting from transition 0"):
        collect(task, [(10, ConstantPolicy(0.0))], 20)


def test_actions_outside_the_box_are_clipped_before_stepping() -> None:
    task = short_task("halfcheetah", 10)
    dataset = collect(task, ConstantPolicy(3.0), 20, seed=0, num_envs=2)
    assert (dataset.actions == 1.0).all()


def test_episode_returns_counts_whole_episodes() -> None:
    task = short_task("halfcheetah", 20)
    returns = episode_returns(task, UniformRandomPolicy.for_task(task), 7, seed=0, num_envs=3)
    assert returns.shape == (7,) and np.isfinite(returns).all()
    np.testing.assert_array_equal(returns, episode_returns(task, UniformRandomPolicy.for_task(task), 7, seed=0, num_envs=3))


def test_sb3_checkpoint_as_behaviour(tmp_path) -> None:
    from stable_baselines3 import PPO

    from kinema.datasets.behaviour import SB3CheckpointPolicy
    from kinema.envs import make_env

    model = PPO("MlpPolicy", make_env("hopper"), n_steps=64, batch_size=64, seed=0, device="cpu")
    model.save(tmp_path / "ppo.zip")
    policy = SB3CheckpointPolicy(tmp_path / "ppo.zip", "ppo", "hopper", seed=0)
    task = short_task("hopper", 30)
    dataset = collect(task, policy, 60, seed=0, num_envs=3, metadata=policy.describe())
    assert dataset.metadata["algorithm"] == "PPO" and dataset.num_transitions == 60
    again = collect(task, SB3CheckpointPolicy(tmp_path / "ppo.zip", "ppo", "hopper", seed=0), 60, seed=0, num_envs=3)
    np.testing.assert_array_equal(dataset.actions, again.actions)
    # With the VecNormalize statistics it was trained with: observations are normalised first.
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    stats = VecNormalize(DummyVecEnv([lambda: make_env("hopper")]))
    stats.obs_rms.mean[:] = 5.0
    stats.save(tmp_path / "vecnormalize.pkl")
    normalised = SB3CheckpointPolicy(tmp_path / "ppo.zip", "ppo", "hopper", vecnormalize=tmp_path / "vecnormalize.pkl",
                                     deterministic=True)
    raw = np.zeros((2, 11))
    expected, _ = model.predict(np.clip(-5.0 / np.sqrt(stats.obs_rms.var + 1e-8), -10, 10) * np.ones((2, 11)), deterministic=True)
    np.testing.assert_allclose(normalised.act(raw, np.random.default_rng(0)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="built for observations of 11"):
        SB3CheckpointPolicy(tmp_path / "ppo.zip", "ppo", "walker2d")
    with pytest.raises(ValueError, match="algo must be one of"):
        SB3CheckpointPolicy(tmp_path / "ppo.zip", "dqn", "hopper")


@pytest.mark.slow
def test_cli_records_a_random_dataset(cli, tmp_path) -> None:
    output = tmp_path / "cheetah.hdf5"
    proc = cli.run([cli.script("kinema-collect"), "env=halfcheetah", "behaviour=random", "steps=500", "seed=1",
                    f"output={output}", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert "wrote" in proc.stdout
    dataset = read_d4rl_hdf5(output)
    assert dataset.num_transitions == 500 and dataset.num_episodes == 10  # 10 environments cut at 50 steps
    assert dataset.metadata["algorithm"] == "uniform-random" and dataset.metadata["collection_seed"] == 1
    assert set(dataset.infos) == {"qpos", "qvel"}
    assert (tmp_path / "run" / "collect.json").is_file()

    missing = cli.run([cli.script("kinema-collect"), "env=hopper", f"hydra.run.dir={tmp_path / 'run2'}"], cwd=tmp_path,
                      check=False)
    assert missing.returncode == 2 and "output=<file.hdf5>" in missing.stderr
