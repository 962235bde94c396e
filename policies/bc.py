"""Behaviour cloning: an MLP from normalised state to a tanh-squashed action (CORL's BC recipe).

Loss: mean squared error in the unit action box [-1, 1], so tasks with different
action ranges train alike. Stateless at rollout: reset() only checks the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kinema.policies import register_policy
from kinema.policies.base import BatchSpec, InferenceOptions, NormStats, Policy, PolicySpec, Recipe


@dataclass
class BCConfig:
    hidden_dims: tuple[int, ...] = (256, 256)
    dropout: float = 0.0
    # CORL's BC: Adam 3e-4 (AdamW with no weight decay), batch 256, no warm-up, no clipping.
    recipe: Recipe = field(default_factory=lambda: Recipe(batch_size=256, lr=3.0e-4))
    inference: InferenceOptions = field(default_factory=InferenceOptions)

    def __post_init__(self) -> None:
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if not self.hidden_dims or min(self.hidden_dims) <= 0:
            raise ValueError(f"hidden_dims must be positive layer widths, got {self.hidden_dims}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@register_policy
class BCPolicy(Policy):
    name = "bc"
    label = "BC"
    config_class = BCConfig
    stateless = True

    def __init__(self, config: BCConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        layers: list[nn.Module] = []
        width = spec.obs_dim
        for hidden in config.hidden_dims:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
            width = hidden
        layers += [nn.Linear(width, spec.act_dim), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self._num_envs = 0

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("transitions")

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Unit-box action for raw observations."""
        return self.net(self.normalize_obs(observations))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        predicted = self(batch["observations"])
        target = self.unscale_action(batch["actions"]).clamp(-1.0, 1.0)
        loss = torch.mean((predicted - target) ** 2)
        return loss, {"action_mse": loss.item()}

    def reset(self, num_envs: int, **conditioning: Any) -> None:
        if num_envs <= 0:
            raise ValueError(f"num_envs must be positive, got {num_envs}")
        self._num_envs = num_envs

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        obs = self.as_observation_tensor(observation)
        if self._num_envs and obs.shape[0] != self._num_envs:
            raise ValueError(f"act() got {obs.shape[0]} observations after reset(num_envs={self._num_envs})")
        return self.scale_action(self(obs))
