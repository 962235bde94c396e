"""The one policy interface every family implements (see DESIGN.md).

Train, eval, bench and deploy only ever talk to a policy through this surface:

- ``loss(batch) -> (loss, metrics)`` for training, where ``batch`` is what the
  dataset sampler named by ``batch_spec`` produces (tensors, raw observations);
- ``reset(num_envs, **conditioning)`` then ``act(observation) -> action``: a batched,
  stateful rollout; the policy keeps its own context, target return, action queue.

Policies never see files, Hydra or environments: they are built from a config
dataclass, a ``PolicySpec`` (shapes) and the dataset's ``NormStats``. The stats are
non-persistent buffers, so the safetensors weights never duplicate them and the
checkpoint stores them once, next to the config.

Batch formats produced by ``kinema.datasets.samplers`` (float32 unless noted;
observations are raw, the policy normalises them itself so it can never be skipped):

- ``transitions``: observations (B, obs_dim), actions (B, act_dim).
- ``windows`` (context K): observations (B, K, obs_dim), actions (B, K, act_dim),
  rewards (B, K), returns_to_go (B, K) (unscaled), timesteps (B, K) int64,
  mask (B, K) bool (True = real step; padding is on the left).
- ``chains`` (context K): as ``windows`` plus the Agentic Transformer's fields (see
  ``kinema.datasets.chains``): completions (B, K) float (task-completion token) and
  final_trial (B, K) bool (step belongs to the chain's best episode); returns_to_go are
  relabelled to the chain's best return.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PolicySpec:
    """Shapes and limits of the task the policy acts in."""

    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    max_episode_steps: int = 1000


@dataclass(frozen=True)
class BatchSpec:
    """Which sampler feeds the policy: ``kind`` in transitions | windows | chains, and its options."""

    kind: str
    context_len: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of that sampler


@dataclass
class NormStats:
    """Normalisation statistics saved with every checkpoint (stats.json)."""

    obs_mean: np.ndarray
    obs_std: np.ndarray

    FIELDS: ClassVar[tuple[str, ...]] = ("obs_mean", "obs_std")

    def to_dict(self) -> dict[str, list[float]]:
        return {name: np.asarray(getattr(self, name), dtype=np.float64).tolist() for name in self.FIELDS}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stats") -> "NormStats":
        missing = [name for name in cls.FIELDS if name not in data]
        if missing:
            raise ValueError(f"{source}: missing normalisation statistics {missing}; expected keys {list(cls.FIELDS)}")
        arrays = {name: np.asarray(data[name], dtype=np.float32) for name in cls.FIELDS}
        if arrays["obs_mean"].shape != arrays["obs_std"].shape or arrays["obs_mean"].ndim != 1:
            raise ValueError(f"{source}: obs_mean and obs_std must be 1-D arrays of the same length")
        if not all(np.isfinite(a).all() for a in arrays.values()) or (arrays["obs_std"] <= 0).any():
            raise ValueError(f"{source}: normalisation statistics must be finite with obs_std > 0")
        return cls(**arrays)


class Policy(nn.Module):
    """Base class: holds the spec, the normalisation buffers and the rollout device logic."""

    config_class: ClassVar[type]
    name: ClassVar[str]

    def __init__(self, config: Any, spec: PolicySpec, stats: NormStats):
        super().__init__()
        if stats.obs_mean.shape != (spec.obs_dim,):
            raise ValueError(
                f"normalisation statistics have obs_mean of shape {stats.obs_mean.shape}, "
                f"but the policy expects observations of dimension {spec.obs_dim}"
            )
        self.config = config
        self.spec = spec
        self.register_buffer("obs_mean", torch.as_tensor(stats.obs_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("obs_std", torch.as_tensor(stats.obs_std, dtype=torch.float32), persistent=False)
        self.register_buffer("action_low", torch.tensor(spec.action_low, dtype=torch.float32), persistent=False)
        self.register_buffer("action_high", torch.tensor(spec.action_high, dtype=torch.float32), persistent=False)

    # -- helpers shared by every family -------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.obs_mean.device

    def normalize_obs(self, observations: torch.Tensor) -> torch.Tensor:
        return (observations - self.obs_mean) / self.obs_std

    def scale_action(self, unit_action: torch.Tensor) -> torch.Tensor:
        """Map an action in [-1, 1] (tanh head) to the task's action box."""
        return self.action_low + (unit_action + 1.0) * 0.5 * (self.action_high - self.action_low)

    def unscale_action(self, action: torch.Tensor) -> torch.Tensor:
        """Map a task action to [-1, 1], the space losses are computed in."""
        return 2.0 * (action - self.action_low) / (self.action_high - self.action_low) - 1.0

    def as_observation_tensor(self, observation: Any) -> torch.Tensor:
        obs = torch.as_tensor(np.asarray(observation), dtype=torch.float32, device=self.device)
        if obs.ndim != 2 or obs.shape[1] != self.spec.obs_dim:
            raise ValueError(f"act() expects observations of shape (num_envs, {self.spec.obs_dim}), got {tuple(obs.shape)}")
        if not torch.isfinite(obs).all():
            bad = (~torch.isfinite(obs)).any(dim=1).nonzero().flatten().tolist()
            raise ValueError(f"act() received a non-finite observation (NaN/inf) for environment(s) {bad}")
        return obs

    # -- the interface -----------------------------------------------------------------
    @property
    def batch_spec(self) -> BatchSpec:
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def reset(self, num_envs: int, **conditioning: Any) -> None:
        raise NotImplementedError

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        raise NotImplementedError

    def observe_reward(self, reward: Any) -> None:
        """Tell a return-conditioned policy the reward of its last action (default: ignored)."""

    def end_episode(self, env_indices: Any) -> None:
        """Those environments' episodes ended and the next starts in the same slot.

        Stateless policies ignore it; a policy that keeps context must override it, either
        clearing that context (DT) or carrying it into the next trial (AT).
        """

    def seed_episodes(self, env_indices: Any, seeds: Any) -> None:
        """Episodes seeded ``seeds`` start in environment slots ``env_indices`` (after ``reset``
        or ``end_episode``). A stochastic policy draws each environment's noise from its own
        generator (``episode_noise``), seeded here, so results never depend on how many
        environments run at once. Deterministic policies need not care.
        """
        generators = self.__dict__.setdefault("_episode_generators", {})
        for index, seed in zip(np.asarray(env_indices).reshape(-1).tolist(), np.asarray(seeds).reshape(-1).tolist()):
            generators[int(index)] = torch.Generator().manual_seed(int(seed))

    def episode_noise(self, num_envs: int, *shape: int) -> torch.Tensor:
        """Standard normal noise (num_envs, *shape) on the policy's device, one generator per environment.

        Environments never seeded through ``seed_episodes`` (a caller outside the evaluator,
        e.g. a robot) draw from torch's global generator.
        """
        generators = self.__dict__.get("_episode_generators", {})
        rows = [
            torch.randn(shape, generator=generators[index]) if index in generators else torch.randn(shape)
            for index in range(num_envs)
        ]
        return torch.stack(rows).to(self.device)


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (config fields, ``reset(num_envs)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def config_from_dict(config_class: type, values: dict[str, Any], source: str) -> Any:
    """Build a policy config dataclass, naming unknown or mistyped keys instead of ignoring them."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; {config_class.__name__} accepts {sorted(known)}")
    try:
        return config_class(**values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error
