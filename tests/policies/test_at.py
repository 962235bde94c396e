"""Agentic Transformer: chain batches, its loss choices, trials in one context, a hopper rollout.

Decoding and causality are shared with DT and tested for both families in test_dt.py.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import kinema.policies.at  # noqa: F401  (registers "at")
from kinema.datasets import OfflineDataset, make_sampler
from kinema.datasets.samplers.chains import ChainSampler
from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.policies.at import AgenticTransformer
from kinema.policies.dt import dt_recipe

OBS_DIM, ACT_DIM = 5, 3
SPEC = PolicySpec(obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=(-2.0, -1.0, 0.0), action_high=(2.0, 1.0, 1.0))
STATS = NormStats.for_observations(np.zeros(OBS_DIM, np.float32), np.ones(OBS_DIM, np.float32))
TINY = {"context_len": 4, "embed_dim": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0, "attention_dropout": 0.0,
        "attention_window": 0}  # exact full-context DT unless a test asks for a band


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_at(seed: int = 0, **overrides) -> AgenticTransformer:
    torch.manual_seed(seed)
    return make_policy({"name": "at", **TINY, **overrides}, SPEC, STATS).eval()


def chains_batch(batch_size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    lengths = [6, 9, 4, 12, 7]
    total = sum(lengths)
    terminals = np.zeros(total, bool)
    terminals[np.cumsum(lengths) - 1] = True
    low, high = np.array(SPEC.action_low), np.array(SPEC.action_high)
    data = OfflineDataset(
        observations=rng.normal(size=(total, OBS_DIM)),
        actions=low + (high - low) * rng.uniform(size=(total, ACT_DIM)),
        rewards=rng.uniform(0.0, 2.0, size=total),
        terminals=terminals,
    )
    return ChainSampler(data, batch_size, seed=seed, context_len=TINY["context_len"], max_chain_len=3).sample()


def test_registry_builds_at_on_chains_and_checks_its_fields() -> None:
    policy = make_policy({"name": "at"}, SPEC, STATS)
    assert isinstance(policy, AgenticTransformer)
    assert policy.batch_spec.kind == "chains" and policy.batch_spec.context_len == 20
    assert policy.config.loss_on == "all"
    # Defaults: one-episode chains, DT's recipe with an EMA of the weights (issue 19's best setting)
    assert policy.batch_spec.options == {"max_chain_len": 1, "fresh_trial_prob": 0.5, "relabel": "chain_max",
                                         "window_start": "chain"}
    assert policy.config.recipe == dataclasses.replace(dt_recipe(), ema=True)
    with pytest.raises(ValueError, match="max_chain_len"):
        make_policy({"name": "at", "max_chain_len": 0}, SPEC, STATS)
    with pytest.raises(ValueError, match="fresh_trial_prob"):
        make_policy({"name": "at", "fresh_trial_prob": -0.1}, SPEC, STATS)
    with pytest.raises(ValueError, match="fresh_trial_prob"):
        make_policy({"name": "at", "fresh_trial_prob": "half"}, SPEC, STATS)
    with pytest.raises(ValueError, match="loss_on"):
        make_policy({"name": "at", "loss_on": "best"}, SPEC, STATS)
    with pytest.raises(ValueError, match="reward_scale"):
        make_policy({"name": "at", "reward_scale": 0.0}, SPEC, STATS)
    with pytest.raises(ValueError, match="relabel must be one of"):
        make_policy({"name": "at", "relabel": "hindsight"}, SPEC, STATS)
    with pytest.raises(ValueError, match="trial_summary must be true or false"):
        make_policy({"name": "at", "trial_summary": "yes"}, SPEC, STATS)
    with pytest.raises(ValueError, match="window_start must be one of"):
        make_policy({"name": "at", "window_start": "step"}, SPEC, STATS)


def test_the_chain_length_reaches_the_sampler_through_the_batch_spec() -> None:
    spec = make_policy({"name": "at", **TINY, "max_chain_len": 2, "fresh_trial_prob": 0.25}, SPEC, STATS).batch_spec
    data = OfflineDataset(observations=np.zeros((12, OBS_DIM)), actions=np.zeros((12, ACT_DIM)), rewards=np.ones(12),
                          terminals=np.tile([False, False, True], 4))
    sampler = make_sampler(data, spec.kind, batch_size=4, context_len=spec.context_len, **spec.options)
    assert isinstance(sampler, ChainSampler) and sampler.max_chain_len == 2 and sampler.fresh_trial_prob == 0.25


def test_at_trains_on_chain_batches_and_uses_rewards_and_completions() -> None:
    policy = tiny_at().train()
    batch = chains_batch()
    loss, metrics = policy.loss(batch)
    assert torch.isfinite(loss) and metrics["action_mse"] == pytest.approx(loss.item())
    loss.backward()
    # The action token's last two input columns are the reward and the completion flag.
    reward_and_completion = policy.embed_action.weight.grad[:, ACT_DIM:]
    assert reward_and_completion.shape[1] == 2 and reward_and_completion.abs().sum() > 0
    windows = {key: batch[key] for key in ("observations", "actions", "rewards", "returns_to_go", "timesteps", "mask")}
    del windows["rewards"]
    with pytest.raises(ValueError, match="chains"):
        policy.loss(windows)


def test_final_trial_loss_averages_over_the_best_episode_only() -> None:
    policy = tiny_at(loss_on="final_trial")
    batch = chains_batch(batch_size=64, seed=1)
    keep = batch["mask"] & batch["final_trial"]
    assert keep.any() and (batch["mask"] & ~batch["final_trial"]).any()
    per_step = (policy.predict_actions(batch) - policy.unscale_action(batch["actions"])).pow(2).mean(-1)
    assert policy.loss(batch)[0].item() == pytest.approx(per_step[keep].mean().item(), rel=1e-5)
    all_steps = tiny_at(loss_on="all").loss(batch)[0].item()
    assert all_steps == pytest.approx(per_step[batch["mask"]].mean().item(), rel=1e-5)


def test_trials_continue_in_one_context_with_a_fresh_target_and_completion() -> None:
    policy = tiny_at()
    rng = np.random.default_rng(0)
    policy.reset(2, target_return=3.0)
    for rewards in ([2.0, 0.5], [2.0, 0.5], [-1.5, 0.5]):  # env 0 passes 3.0, then drops below it
        policy.act(rng.normal(size=(2, OBS_DIM)))
        policy.observe_reward(rewards)
    state = policy._rollout
    completion = state.previous_feats[:, ACT_DIM + 1]
    np.testing.assert_array_equal(completion, [1.0, 0.0])  # sticky once reached
    np.testing.assert_allclose(state.previous_feats[:, ACT_DIM], [-1.5, 0.5])  # the last reward is fed back
    policy.end_episode([0])
    np.testing.assert_allclose(state.returns_to_go, [3.0, 1.5])
    np.testing.assert_allclose(state.return_feature, np.array([3.0, 1.5]) / policy.config.rtg_scale)
    np.testing.assert_array_equal(state.times[:, 1], [0, 3])  # the trial's clock restarts
    assert state.context_steps[0] == 3  # the context is kept across trials
    obs = rng.normal(size=(2, OBS_DIM)).astype(np.float32)
    next_trial = policy.act(obs)
    assert not state.completed[0]
    policy.reset(1, target_return=3.0)
    assert (policy.act(obs[:1])[0] - next_trial[0]).abs().max() > 1e-6  # the earlier trial is still seen


def test_multi_trial_rollout_on_hopper_reports_every_trial() -> None:
    from kinema.envs import task_spaces
    from kinema.envs.trials import evaluate_trials

    obs_dim, act_dim, low, high = task_spaces("hopper")
    spec = PolicySpec(obs_dim, act_dim, low, high)
    torch.manual_seed(0)
    policy = make_policy({"name": "at", **TINY}, spec, NormStats.for_observations(np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32)))
    result = evaluate_trials(policy.eval(), "hopper", episodes=2, trials=2, seed=0, num_envs=2,
                             conditioning={"target_return": 3600.0})
    returns = np.array(result.returns)
    assert returns.shape == (2, 2) and np.isfinite(returns).all()
    assert (np.array(result.lengths) > 0).all()
    scores = np.array(result.normalized_scores)
    assert result.first_trial_score_mean == pytest.approx(scores[:, 0].mean())
    assert result.last_trial_score_mean == pytest.approx(scores[:, 1].mean())
    assert result.best_of_n_score_mean == pytest.approx(scores.max(axis=1).mean())


def test_the_trial_summary_is_learned_from_chains_and_fed_the_trial_that_ended() -> None:
    policy = tiny_at(trial_summary=True, relabel="own_return", rtg_scale=1.0).train()
    assert policy.batch_spec.options["relabel"] == "own_return"
    batch = chains_batch(batch_size=64)
    assert (batch["previous_trial_length"] > 0).any()
    loss, _ = policy.loss(batch)
    loss.backward()
    # The return token's inputs: return-to-go, the previous trial's return and its length.
    assert policy.embed_return.weight.shape[1] == 3 and policy.embed_return.weight.grad[:, 1:].abs().sum() > 0
    del batch["previous_trial_length"]
    with pytest.raises(ValueError, match="previous_trial_length"):
        policy.loss(batch)

    policy.eval()
    twin = tiny_at(trial_summary=True, relabel="own_return", rtg_scale=1.0)
    twin.load_state_dict(policy.state_dict())
    rng = np.random.default_rng(0)
    for each in (policy, twin):
        each.reset(2, target_return=3.0)
    summary = policy._rollout.trial_summary
    for rewards in ([2.0, 0.5], [1.0, 0.5], [-0.5, 0.5]):
        obs = rng.normal(size=(2, OBS_DIM))
        for each in (policy, twin):
            each.act(obs)
            each.observe_reward(rewards)
    assert not summary.any()  # a first trial: nothing before it
    for each in (policy, twin):
        each.end_episode([0])
    np.testing.assert_allclose(summary[0], [2.5 / policy.config.rtg_scale, 3 / policy.config.max_timestep], rtol=1e-6)
    assert not summary[1].any()
    twin._rollout.trial_summary.zero_()  # the same context, but blind to the trial that ended
    obs = rng.normal(size=(2, OBS_DIM)).astype(np.float32)
    assert (policy.act(obs)[0] - twin.act(obs)[0]).abs().max() > 1e-6
    policy.reset(2, target_return=3.0)
    assert not policy._rollout.trial_summary.any()  # a new context starts with no trial before it
