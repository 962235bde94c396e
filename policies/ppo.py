"""An actor trained online by ``kinema-rl`` (PPO, stable-baselines3), as a kinema policy.

``kinema-rl`` exports the PPO actor's mean-action network here, with the VecNormalize
observation statistics it trained under (mean, and std = sqrt(var + epsilon); the clip is
``obs_clip``), so ``kinema-eval`` scores the same deterministic policy that SB3's
``predict(deterministic=True)`` runs: normalise, clip, network, clip to the action box.
The critic and the exploration noise are not part of the product checkpoint.

Networks (``network``):

- ``mlp``: SB3's default ``MlpPolicy`` actor: ``hidden_dims`` tanh layers, then a linear mean;
- ``bot``: a Body Transformer (``kinema.policies.bot``: the encoder and per-node detokenizer,
  settings in ``bot``), its output the mean action.

It is not trained offline: ``kinema-train policy=ppo`` is refused with a pointer to ``kinema-rl``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from kinema.policies import register_policy
from kinema.policies.base import BatchSpec, InferenceOptions, NormStats, PolicySpec, Recipe, StatelessPolicy
from kinema.policies.bot import BodyTransformerEncoder, BoTNetwork, NodeDetokenizer, body_graph_from_spec

NETWORKS = ("bot", "mlp")  # also kinema-rl's choices


@dataclass
class PPOActorConfig:
    network: str = "mlp"  # mlp | bot
    hidden_dims: tuple[int, ...] = (64, 64)  # mlp: SB3's default MlpPolicy
    bot: BoTNetwork = field(default_factory=BoTNetwork)  # network=bot
    obs_clip: float = 10.0  # VecNormalize's clip_obs
    recipe: Recipe = field(default_factory=Recipe)  # unused: PPO's hyper-parameters are kinema-rl's
    inference: InferenceOptions = field(default_factory=InferenceOptions)

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        self.hidden_dims = tuple(int(h) for h in self.hidden_dims)
        if not self.hidden_dims or min(self.hidden_dims) <= 0:
            raise ValueError(f"hidden_dims must be positive layer widths, got {self.hidden_dims}")
        if not self.obs_clip > 0:
            raise ValueError(f"obs_clip must be positive, got {self.obs_clip}")


class MlpMean(nn.Module):
    """SB3's MlpPolicy actor path: tanh hidden layers (``policy_net``), then the linear ``action_net``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden_dims: tuple[int, ...]):
        super().__init__()
        layers: list[nn.Module] = []
        width = obs_dim
        for hidden in hidden_dims:
            layers += [nn.Linear(width, hidden), nn.Tanh()]
            width = hidden
        self.policy_net = nn.Sequential(*layers)
        self.action_net = nn.Linear(width, act_dim)

    def forward(self, normalized_obs: torch.Tensor) -> torch.Tensor:
        return self.action_net(self.policy_net(normalized_obs))


class BoTMean(nn.Module):
    """The Body Transformer actor: tokens per body node, each node's detokenizer gives its actions' means."""

    def __init__(self, graph: Any, config: BoTNetwork):
        super().__init__()
        self.encoder = BodyTransformerEncoder(graph, config)
        self.detokenizer = NodeDetokenizer(graph, config.embed_dim)

    def forward(self, normalized_obs: torch.Tensor) -> torch.Tensor:
        return self.detokenizer(self.encoder(normalized_obs))


@register_policy
class PPOActorPolicy(StatelessPolicy):
    name = "ppo"
    label = "PPO actor"
    config_class = PPOActorConfig
    trains_offline = False
    offline_hint = "train one online with kinema-rl env=<task> network=mlp|bot"

    def __init__(self, config: PPOActorConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        if config.network == "bot":
            self.mean = BoTMean(body_graph_from_spec(spec), config.bot)
        else:
            self.mean = MlpMean(spec.obs_dim, spec.act_dim, config.hidden_dims)

    @property
    def batch_spec(self) -> BatchSpec:
        raise ValueError(f"policy=ppo holds an actor trained online; {self.offline_hint}")

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise ValueError(f"policy=ppo holds an actor trained online; {self.offline_hint}")

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """The mean action for raw observations, in the task's units (not yet clipped)."""
        normalized = self.normalize_obs(observations).clamp(-self.config.obs_clip, self.config.obs_clip)
        return self.mean(normalized)

    def step(self, observations: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(self(observations), self.action_high), self.action_low)
