"""Multi-trial evaluation: seeding, per-trial scores, end_episode calls, one batched act per step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kinema.envs import evaluate, normalized_score
from kinema.envs.trials import evaluate_trials

HOPPER_ACT_DIM = 3


class StatelessPolicy:
    """A fixed map of each observation row; records the batch sizes it is called with."""

    def __init__(self):
        self.batch_sizes: list[int] = []
        self.resets: list[tuple[int, dict]] = []

    def reset(self, num_envs, **conditioning):
        self.resets.append((num_envs, conditioning))

    def act(self, observations):
        self.batch_sizes.append(len(observations))
        return torch.as_tensor(np.tanh(0.5 * observations[:, 2 : 2 + HOPPER_ACT_DIM]))

    def observe_reward(self, rewards):
        pass


class TrialAwarePolicy(StatelessPolicy):
    """Also hears about trial ends, and checks they come between an act and the next."""

    def __init__(self):
        super().__init__()
        self.ended: list[list[int]] = []
        self.rewards: list[np.ndarray] = []

    def observe_reward(self, rewards):
        self.rewards.append(np.array(rewards))

    def end_episode(self, env_indices):
        self.ended.append(sorted(int(i) for i in env_indices))


def test_every_trial_is_scored_and_summarised() -> None:
    result = evaluate_trials(StatelessPolicy(), "hopper", episodes=3, trials=2, seed=0, conditioning={"target_return": 1.0})
    returns = np.array(result.returns)
    assert returns.shape == (3, 2) and (np.array(result.lengths) > 0).all()
    scores, source = normalized_score(returns, "hopper")
    assert result.reference_source == source == "d4rl"
    np.testing.assert_allclose(result.normalized_scores, scores)
    assert result.first_trial_score_mean == pytest.approx(scores[:, 0].mean())
    assert result.first_trial_score_std == pytest.approx(scores[:, 0].std())
    assert result.last_trial_score_mean == pytest.approx(scores[:, 1].mean())
    assert result.best_of_n_score_mean == pytest.approx(scores.max(axis=1).mean())
    assert result.best_of_n_return_mean == pytest.approx(returns.max(axis=1).mean())
    assert result.env_steps == int(np.sum(result.lengths))
    assert json.loads(json.dumps(result.to_dict()))["returns"] == result.returns


def test_trial_k_of_run_r_is_the_episode_seeded_seed_plus_r_times_trials_plus_k() -> None:
    runs, trials, seed = 3, 2, 11
    in_trials = evaluate_trials(StatelessPolicy(), "hopper", episodes=runs, trials=trials, seed=seed, num_envs=2)
    single = evaluate(StatelessPolicy(), "hopper", episodes=runs * trials, seed=seed)
    np.testing.assert_allclose(np.array(in_trials.returns).reshape(-1), single.returns)
    one_env = evaluate_trials(StatelessPolicy(), "hopper", episodes=runs, trials=trials, seed=seed, num_envs=1)
    np.testing.assert_allclose(one_env.returns, in_trials.returns)


def test_the_policy_hears_each_trial_end_and_acts_once_per_step_on_the_whole_batch() -> None:
    policy = TrialAwarePolicy()
    result = evaluate_trials(policy, "hopper", episodes=2, trials=3, seed=0, num_envs=2, conditioning={"target_return": 5.0})
    assert policy.resets == [(2, {"target_return": 5.0})]
    assert set(policy.batch_sizes) == {2}
    assert len(policy.batch_sizes) == len(policy.rewards) == max(sum(run) for run in result.lengths)
    ended = [i for call in policy.ended for i in call]
    assert sorted(ended) == [0, 0, 1, 1]  # two ends per run before its last trial, none after it
    # Once a run is over its slot is fed zero rewards.
    rewards = np.array(policy.rewards)
    finished_at = min(sum(run) for run in result.lengths)
    slot = int(np.argmin([sum(run) for run in result.lengths]))
    assert (rewards[finished_at:, slot] == 0).all()
    np.testing.assert_allclose(rewards[:, slot].sum(), np.sum(result.returns[slot]))


def test_bad_arguments_are_named() -> None:
    with pytest.raises(ValueError, match="trials"):
        evaluate_trials(StatelessPolicy(), "hopper", episodes=1, trials=0, seed=0)
    with pytest.raises(ValueError, match="episodes"):
        evaluate_trials(StatelessPolicy(), "hopper", episodes=0, trials=1, seed=0)
    with pytest.raises(ValueError, match="dataset_refs"):
        evaluate_trials(StatelessPolicy(), "hopper", episodes=1, trials=1, seed=0, dataset_refs="bogus")
