"""A policy family defined outside kinema, for tests: no kinema file knows its name.

It registers through the ``kinema.policies`` and ``kinema.samplers`` entry points of a
distribution that tests/plugin/test_plugin_family.py installs into a temporary directory,
the way a user's own package would. The family is a linear Gaussian policy: it needs the
observation and action statistics, trains with AdamW + cosine + EMA, takes no target
return, and draws its exploration noise per environment (``episode_noise``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kinema.datasets.samplers import TransitionSampler, register_sampler
from kinema.policies import register_policy
from kinema.policies.base import BatchSpec, InferenceOptions, NormStats, Policy, PolicySpec, Recipe


class ShuffledTransitionSampler(TransitionSampler):
    """Transitions, under a kind name of the plug-in's own."""

    kind = "plugin_transitions"


register_sampler(ShuffledTransitionSampler.kind, ShuffledTransitionSampler)


@dataclass
class LinearInference(InferenceOptions):
    noise_scale: float = 0.1  # std of the action noise, in normalised action units

    def __post_init__(self) -> None:
        if self.noise_scale < 0:
            raise ValueError(f"noise_scale must be >= 0, got {self.noise_scale}")


@dataclass
class LinearConfig:
    recipe: Recipe = field(default_factory=lambda: Recipe(batch_size=32, lr=1e-2, schedule="cosine", warmup_steps=2, ema=True))
    inference: LinearInference = field(default_factory=LinearInference)


@register_policy
class PluginLinearPolicy(Policy):
    name = "plugin_linear"
    label = "plug-in linear"
    config_class = LinearConfig
    stateless = True
    required_stats = {"actions": ("mean", "std"), "observations": ("min",)}

    def __init__(self, config: LinearConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        self.linear = nn.Linear(spec.obs_dim, spec.act_dim)
        self.register_buffer("action_mean", torch.as_tensor(stats.get("actions", "mean")), persistent=False)
        self.register_buffer("action_std", torch.as_tensor(stats.get("actions", "std")), persistent=False)
        self._num_envs = 0

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("plugin_transitions")

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        target = (batch["actions"] - self.action_mean) / self.action_std
        loss = (self.linear(self.normalize_obs(batch["observations"])) - target).pow(2).mean()
        return loss, {"action_mse": loss.item()}

    def reset(self, num_envs: int, **conditioning: Any) -> None:
        if conditioning:
            raise ValueError(f"plugin_linear.reset takes no conditioning, got {sorted(conditioning)}")
        self._num_envs = num_envs

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        obs = self.as_observation_tensor(observation)
        mean = self.linear(self.normalize_obs(obs))
        noise = self.episode_noise(obs.shape[0], self.spec.act_dim) * self.inference.noise_scale
        return (mean + noise) * self.action_std + self.action_mean
