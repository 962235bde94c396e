"""Every family that calls attention acts the same with ``inference.attention_backend=triton`` (masks described,
evaluated in the kernel) as with the default SDPA path (dense masks), and DT trains with the same gradients."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from kinema.policies import NormStats, PolicySpec, make_policy

SPEC = PolicySpec(obs_dim=5, act_dim=2, action_low=(-1.0, -0.5), action_high=(1.0, 2.0), max_episode_steps=50)
STATS = NormStats.for_observations(np.zeros(5, dtype=np.float32), np.ones(5, dtype=np.float32))
TINY_DT = {"name": "dt", "context_len": 4, "embed_dim": 16, "n_layers": 2, "n_heads": 2, "max_timestep": 50}
BODY_GRAPH = {"nodes": [{"name": "root", "parent": None, "obs_indices": [0, 1], "act_indices": []},
                        {"name": "hip", "parent": "root", "obs_indices": [2], "act_indices": [0]},
                        {"name": "knee", "parent": "hip", "obs_indices": [3, 4], "act_indices": [1]}]}


pytestmark = pytest.mark.usefixtures("one_thread")


def rollout(policy, backend: str | None, steps: int, num_envs: int = 2, **conditioning) -> torch.Tensor:
    policy.configure_inference(attention_backend=backend)
    if hasattr(policy, "seed_episodes"):
        policy.seed_episodes(np.arange(num_envs), np.arange(num_envs) + 10)
    policy.reset(num_envs, **conditioning)
    generator = np.random.default_rng(0)
    actions = []
    for step in range(steps):
        actions.append(torch.as_tensor(policy.act(generator.normal(size=(num_envs, 5)).astype(np.float32))))
        if hasattr(policy, "observe_reward"):
            policy.observe_reward(np.ones(num_envs))
        if step == 4 and hasattr(policy, "end_episode"):
            policy.end_episode([1])  # one environment restarts mid-batch
    return torch.stack(actions)


@pytest.mark.parametrize("overrides", [{"attention_window": 2}, {"attention_window": 0}, {"attention_window": 0, "use_kv_cache": False}],
                         ids=["banded", "full_cached", "full_recomputed"])
def test_dt_acts_the_same_on_the_triton_backend(overrides) -> None:
    inference = {"use_kv_cache": overrides.pop("use_kv_cache")} if "use_kv_cache" in overrides else {}
    torch.manual_seed(0)
    policy = make_policy({**TINY_DT, **overrides}, SPEC, STATS).eval()
    policy.configure_inference(**inference)
    expected = rollout(policy, None, steps=8, target_return=30.0)  # past the context: the window slides
    assert (rollout(policy, "triton", steps=8, target_return=30.0) - expected).abs().max().item() < 1e-5


def test_dt_trains_with_the_same_loss_and_gradients_on_the_triton_backend() -> None:
    torch.manual_seed(0)
    policy = make_policy({**TINY_DT, "attention_window": 2, "dropout": 0.0, "attention_dropout": 0.0}, SPEC, STATS)
    generator = torch.Generator().manual_seed(1)
    batch = {"observations": torch.randn(3, 4, 5, generator=generator), "actions": torch.rand(3, 4, 2, generator=generator) - 0.5,
             "returns_to_go": torch.rand(3, 4, generator=generator) * 10, "timesteps": torch.arange(4).repeat(3, 1),
             "mask": torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=torch.float32)}
    results = {}
    for backend in (None, "triton"):
        policy.configure_inference(attention_backend=backend)
        policy.zero_grad()
        loss, _ = policy.loss(batch)
        loss.backward()
        results[backend] = (loss.detach(), [p.grad.clone() for p in policy.parameters() if p.grad is not None])
    assert torch.allclose(results[None][0], results["triton"][0], atol=1e-6)
    assert len(results[None][1]) == len(results["triton"][1])
    for sdpa_grad, triton_grad in zip(results[None][1], results["triton"][1]):
        assert (sdpa_grad - triton_grad).abs().max().item() < 1e-5


def test_bot_and_diffusion_act_the_same_on_the_triton_backend() -> None:
    torch.manual_seed(0)
    bot = make_policy({"name": "bot", "variant": "mix", "embed_dim": 16, "n_layers": 2, "n_heads": 2},
                      dataclasses.replace(SPEC, structure={"body_graph": BODY_GRAPH}), STATS).eval()
    assert (rollout(bot, "triton", steps=3) - rollout(bot, None, steps=3)).abs().max().item() < 1e-5
    diffusion_stats = NormStats({**STATS.features, "actions": {"min": [-0.8, -0.4], "max": [0.9, 1.5]}})
    for causal in (False, True):
        diffusion = make_policy({"name": "diffusion", "embed_dim": 16, "n_layers": 1, "n_heads": 2, "horizon": 6, "n_action_steps": 3,
                                 "num_train_timesteps": 10, "causal": causal}, SPEC, diffusion_stats).eval()
        diffusion.configure_inference(num_inference_steps=3)
        assert (rollout(diffusion, "triton", steps=4) - rollout(diffusion, None, steps=4)).abs().max().item() < 1e-5
