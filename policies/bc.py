"""Behaviour cloning: an MLP from normalised state to a tanh-squashed action (CORL's BC recipe).

Loss: mean squared error in the unit action box [-1, 1], so tasks with different
action ranges train alike. Stateless at rollout: reset() only checks the batch size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from kinema.policies import register_policy
from kinema.policies.base import BatchSpec, InferenceOptions, NormStats, PolicySpec, Recipe, StatelessPolicy


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
class BCPolicy(StatelessPolicy):
    name = "bc"
    label = "BC"
    config_class = BCConfig

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

    def step(self, observations: torch.Tensor) -> torch.Tensor:
        return self.scale_action(self(observations))
