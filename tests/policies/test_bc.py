"""BC policy: interface behaviour and that it actually learns."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kinema.policies import NormStats, PolicySpec, available_policies, make_policy

SPEC = PolicySpec(obs_dim=4, act_dim=2, action_low=(-2.0, -1.0), action_high=(2.0, 1.0))
STATS = NormStats.for_observations(np.array([0.0, 1.0, 2.0, 3.0], np.float32), np.array([1.0, 2.0, 0.5, 1.0], np.float32))


def test_registry_knows_bc_and_rejects_unknown_fields() -> None:
    assert "bc" in available_policies()
    with pytest.raises(ValueError, match="bogus"):
        make_policy({"name": "bc", "bogus": 1}, SPEC, STATS)
    with pytest.raises(ValueError, match="not a known policy"):
        make_policy({"name": "nope"}, SPEC, STATS)
    with pytest.raises(ValueError, match="hidden_dims"):
        make_policy({"name": "bc", "hidden_dims": [0]}, SPEC, STATS)


def test_act_is_batched_in_the_action_box_and_rejects_nan() -> None:
    policy = make_policy({"name": "bc"}, SPEC, STATS)
    policy.reset(3)
    action = policy.act(np.random.default_rng(0).normal(size=(3, 4)) * 100)
    assert action.shape == (3, 2)
    assert (action[:, 0].abs() <= 2.0).all() and (action[:, 1].abs() <= 1.0).all()
    with pytest.raises(ValueError, match="environment"):
        policy.act(np.array([[0, 0, 0, 0], [np.nan, 0, 0, 0], [0, 0, 0, 0]], np.float32))
    with pytest.raises(ValueError, match="shape"):
        policy.act(np.zeros((3, 5)))


def test_bc_fits_a_linear_expert() -> None:
    torch.manual_seed(0)
    policy = make_policy({"name": "bc", "hidden_dims": [64, 64]}, SPEC, STATS)
    weights = torch.randn(4, 2) * 0.3
    obs = torch.randn(512, 4) * torch.from_numpy(STATS.get("observations", "std")) + torch.from_numpy(STATS.get("observations", "mean"))
    actions = policy.scale_action(torch.tanh(policy.normalize_obs(obs) @ weights))
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss, metrics = policy.loss({"observations": obs, "actions": actions})
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        first = first if first is not None else loss.item()
    assert loss.item() < 0.05 * first
    assert metrics["action_mse"] == pytest.approx(loss.item())


def test_a_policy_that_keeps_context_must_implement_end_episode() -> None:
    from kinema.policies import Policy, register_policy

    class Forgetful(Policy):  # keeps a context (not stateless) but has no end_episode
        name = "forgetful"

    with pytest.raises(TypeError, match="must implement end_episode"):
        register_policy(Forgetful)
    with pytest.raises(NotImplementedError, match="must implement end_episode"):
        Forgetful.__new__(Forgetful).end_episode([0])
    make_policy({"name": "bc"}, SPEC, STATS).end_episode([0])  # stateless: nothing to do
