"""Domain randomisation and delay: each knob changes what it says, draws are seeded per episode, bad profiles are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kinema.envs import evaluate
from kinema.envs.randomization import DomainRandomization, RandomizationProfile, get_profile, load_profiles
from kinema.envs.registry import make_env


def rollout(profile: RandomizationProfile | None, seed: int = 0, steps: int = 200, actions=None):
    env = make_env("hopper", randomization=profile)
    observation, info = env.reset(seed=seed)
    observations = [observation]
    for step in range(steps):
        action = np.zeros(3) if actions is None else actions[step]
        observation, _, terminated, _, _ = env.step(action)
        observations.append(observation)
        if terminated:
            break
    env.close()
    return np.array(observations), info


def test_a_heavier_body_falls_faster():
    light, _ = rollout(RandomizationProfile(name="light", mass_scale=(0.5, 0.5)))
    nominal, _ = rollout(None)
    heavy, _ = rollout(RandomizationProfile(name="heavy", mass_scale=(3.0, 3.0)))
    assert len(heavy) < len(nominal) < len(light)


def test_draws_are_seeded_per_episode():
    profile = get_profile("all")
    first, info_first = rollout(profile, seed=5, steps=50)
    again, info_again = rollout(profile, seed=5, steps=50)
    other, info_other = rollout(profile, seed=6, steps=50)
    np.testing.assert_array_equal(first, again)
    assert info_first["randomization"] == info_again["randomization"] != info_other["randomization"]
    assert not np.array_equal(first[:10], other[:10])


def test_the_nominal_profile_leaves_the_task_untouched():
    env = make_env("hopper", randomization=get_profile("none"))
    assert not isinstance(env, DomainRandomization)
    np.testing.assert_array_equal(rollout(None, steps=30)[0], rollout(RandomizationProfile(), steps=30)[0])


def test_action_delay_applies_each_action_that_many_steps_late():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(20, 3))
    delayed, info = rollout(RandomizationProfile(name="d", action_delay_steps=(2, 2)), actions=actions, steps=20)
    shifted, _ = rollout(None, actions=np.concatenate([np.zeros((2, 3)), actions]), steps=20)
    assert info["randomization"]["action_delay_steps"] == 2
    np.testing.assert_allclose(delayed, shifted[: len(delayed)])


def test_observation_noise_changes_what_the_policy_sees_not_the_dynamics():
    noisy, _ = rollout(RandomizationProfile(name="n", observation_noise_std=0.05), steps=30)
    clean, _ = rollout(None, steps=30)
    difference = noisy - clean
    assert 0.03 < difference.std() < 0.07 and abs(difference.mean()) < 0.02


def test_pushes_move_the_robot():
    pushed, _ = rollout(RandomizationProfile(name="p", push_force=200.0, push_probability=1.0, push_steps=5), steps=10)
    still, _ = rollout(None, steps=10)
    # observation index 5 is the torso's forward velocity
    assert np.abs(pushed[1:, 5] - still[1:, 5]).max() > 0.1


def test_friction_damping_and_gain_scale_their_model_fields():
    env = make_env("hopper", randomization=RandomizationProfile(name="x", friction_scale=(2.0, 2.0), damping_scale=(3.0, 3.0),
                                                                   actuator_gain_scale=(0.5, 0.5)))
    nominal = make_env("hopper").unwrapped.model
    env.reset(seed=0)
    model = env.unwrapped.model
    np.testing.assert_allclose(model.geom_friction[:, 0], 2.0 * nominal.geom_friction[:, 0])
    np.testing.assert_allclose(model.dof_damping, 3.0 * nominal.dof_damping)
    np.testing.assert_allclose(model.actuator_gear[:, 0], 0.5 * nominal.actuator_gear[:, 0])


def test_scores_under_a_profile_do_not_depend_on_num_envs():
    class Constant:
        def reset(self, num_envs, **_):
            self.n = num_envs

        def act(self, observations):
            return np.full((len(observations), 3), 0.3)

        def observe_reward(self, rewards):
            pass

    profile = get_profile("all")
    one = evaluate(Constant(), "hopper", episodes=3, seed=1, num_envs=1, randomization=profile)
    three = evaluate(Constant(), "hopper", episodes=3, seed=1, num_envs=3, randomization=profile)
    np.testing.assert_allclose(one.returns, three.returns)
    plain = evaluate(Constant(), "hopper", episodes=3, seed=1, num_envs=3)
    assert not np.allclose(one.returns, plain.returns)


@pytest.mark.parametrize("settings, message", [
    ({"mass_scale": [1.5, 0.5]}, r"profile 'bad': mass_scale must be \[low, high\] with 0 < low <= high"),
    ({"action_delay_steps": [0, 1.5]}, "profile 'bad': action_delay_steps must be"),
    ({"push_probability": 2.0}, r"profile 'bad': push_probability must be in \[0, 1\]"),
    ({"observation_noise_std": -1.0}, "profile 'bad': observation_noise_std must be a number >= 0"),
])
def test_bad_profiles_are_refused_naming_the_profile_and_key(settings, message):
    with pytest.raises(ValueError, match=message):
        RandomizationProfile(name="bad", **settings)


def test_profiles_of_your_own_load_from_yaml_and_mistakes_are_named(tmp_path: Path):
    mine = tmp_path / "profiles.yaml"
    mine.write_text("ice:\n  friction_scale: [0.1, 0.2]\n")
    assert load_profiles(mine)["ice"].friction_scale == (0.1, 0.2) and "mass" in load_profiles(mine)
    mine.write_text("ice:\n  friction: [0.1, 0.2]\n")
    with pytest.raises(ValueError, match=r"profile 'ice' has unknown keys \['friction'\]"):
        load_profiles(mine)
    with pytest.raises(ValueError, match="randomization profile 'lava' is not defined"):
        get_profile("lava")
