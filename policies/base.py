"""The one policy interface every family implements (see DESIGN.md).

Train, eval, bench and deploy only ever talk to a policy through this surface:

- ``loss(batch) -> (loss, metrics)`` for training, where ``batch`` is what the
  dataset sampler named by ``batch_spec`` produces (tensors, raw observations);
- ``reset(num_envs, **conditioning)`` then ``act(observation) -> action``: a batched,
  stateful rollout; the policy keeps its own context, target return, action queue.

Policies never see files, Hydra or environments: they are built from a config
dataclass (model fields, a ``Recipe`` for training and ``InferenceOptions``), a
``PolicySpec`` (shapes, limits, task structure) and the dataset's ``NormStats`` (keyed by
feature; each family declares what it needs in ``required_stats``). The statistics are
non-persistent buffers, so the safetensors weights never duplicate them and the
checkpoint stores them once, next to the config.

Batch formats produced by ``kinema.datasets.samplers`` (float32 unless noted;
observations are raw, the policy normalises them itself so it can never be skipped):

- ``transitions``: observations (B, obs_dim), actions (B, act_dim).
- ``windows`` (context K): observations (B, K, obs_dim), actions (B, K, act_dim),
  rewards (B, K), returns_to_go (B, K) (unscaled), timesteps (B, K) int64,
  mask (B, K) bool (True = real step; padding is on the left).
- ``chains`` (context K): as ``windows`` plus the Agentic Transformer's fields (see
  ``kinema.datasets.samplers.chains``): completions (B, K) float (task-completion token) and
  final_trial (B, K) bool (step belongs to the chain's best episode); returns_to_go are
  relabelled to the chain's best return.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Optional

import numpy as np
import torch
from torch import nn


@dataclass(frozen=True)
class PolicySpec:
    """Shapes, limits and structure of the task the policy acts in.

    ``structure`` carries task structure the trainer derives from the environment and a
    family may need (e.g. a body graph: node -> observation indices, action indices,
    parent), as plain JSON-serialisable values: the checkpoint stores it, so evaluation and
    deployment rebuild the same model without importing ``kinema.envs``.
    """

    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    max_episode_steps: int = 1000
    structure: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "spec") -> "PolicySpec":
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted({"obs_dim", "act_dim", "action_low", "action_high"} - set(values))
        unknown = sorted(set(values) - known)
        if missing or unknown:
            raise ValueError(f"{source}: policy spec lacks {missing} or has unknown keys {unknown}; expected {sorted(known)}")
        values = dict(values, action_low=tuple(values["action_low"]), action_high=tuple(values["action_high"]))
        values["structure"] = dict(values.get("structure") or {})
        return cls(**values)


@dataclass(frozen=True)
class BatchSpec:
    """Which sampler feeds the policy: ``kind`` (a registered sampler kind) and its options."""

    kind: str
    context_len: int = 1
    options: dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of that sampler


STAT_NAMES = ("mean", "std", "min", "max")
STATS_FORMAT = "kinema.stats/2"


class NormStats:
    """Normalisation statistics keyed by feature, saved with every checkpoint (stats.json).

    ``NormStats({"observations": {"mean": ..., "std": ...}, "actions": {"min": ..., "max": ...}})``:
    each feature maps statistic names (``mean``, ``std``, ``min``, ``max``) to 1-D arrays.
    A policy declares what it needs in ``Policy.required_stats``; building it from
    statistics that lack one is an error naming the feature and statistic, never a silent skip.
    """

    def __init__(self, features: dict[str, dict[str, Any]], source: str = "stats"):
        self.source = source
        self.features: dict[str, dict[str, np.ndarray]] = {}
        for feature, values in features.items():
            if not isinstance(values, dict):
                raise ValueError(f"{source}: feature {feature!r} must map statistic names to arrays, got {type(values).__name__}")
            unknown = sorted(set(values) - set(STAT_NAMES))
            if unknown:
                raise ValueError(f"{source}: feature {feature!r} has unknown statistics {unknown}; known: {list(STAT_NAMES)}")
            arrays = {name: np.asarray(value, dtype=np.float32) for name, value in values.items()}
            for name, array in arrays.items():
                if array.ndim != 1 or not np.isfinite(array).all():
                    raise ValueError(f"{source}: {feature}.{name} must be a finite 1-D array, got shape {array.shape}")
            if len({array.shape for array in arrays.values()}) > 1:
                raise ValueError(f"{source}: the statistics of {feature!r} have different lengths")
            if "std" in arrays and (arrays["std"] <= 0).any():
                raise ValueError(f"{source}: {feature}.std must be positive")
            self.features[feature] = arrays

    @classmethod
    def for_observations(cls, mean: Any, std: Any) -> "NormStats":
        return cls({"observations": {"mean": mean, "std": std}})

    def get(self, feature: str, stat: str, needed_by: str = "the policy") -> np.ndarray:
        """One statistic, or a ValueError naming what is missing and what is there."""
        if stat not in self.features.get(feature, {}):
            present = {name: sorted(values) for name, values in self.features.items()}
            raise ValueError(f"{self.source}: {needed_by} needs the statistic {feature}.{stat}, which is missing (present: {present})")
        return self.features[feature][stat]

    def require(self, needs: dict[str, tuple[str, ...]], needed_by: str) -> None:
        for feature, stats in needs.items():
            for stat in stats:
                self.get(feature, stat, needed_by)

    def subset(self, needs: dict[str, tuple[str, ...]]) -> "NormStats":
        return NormStats({feature: {stat: self.features[feature][stat] for stat in stats} for feature, stats in needs.items()})

    def to_dict(self) -> dict[str, Any]:
        features = {f: {n: np.asarray(a, dtype=np.float64).tolist() for n, a in v.items()} for f, v in self.features.items()}
        return {"format": STATS_FORMAT, "features": features}

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "stats") -> "NormStats":
        """Read stats.json; the flat format of checkpoints before 2026-12 ({obs_mean, obs_std}) reads as observations."""
        if not isinstance(data, dict):
            raise ValueError(f"{source}: expected a JSON object of normalisation statistics")
        if "format" not in data and {"obs_mean", "obs_std"} <= set(data):
            return cls({"observations": {"mean": data["obs_mean"], "std": data["obs_std"]}}, source=source)
        if data.get("format") != STATS_FORMAT or not isinstance(data.get("features"), dict):
            raise ValueError(
                f"{source}: not kinema normalisation statistics; expected {{'format': '{STATS_FORMAT}', 'features': "
                "{feature: {statistic: [...]}}}"
            )
        return cls(data["features"], source=source)


OPTIMIZERS = ("adamw", "adam")
SCHEDULES = ("constant", "cosine")


@dataclass
class Recipe:
    """How a family trains: declared by its config (``policy.recipe.*``), applied by the trainer.

    Both schedules start with a linear warm-up over ``warmup_steps`` (factor (step+1)/warmup).
    ``cosine`` then decays to ``min_lr_ratio * lr`` at the horizon: ``schedule_steps``, or
    ``train.steps`` of the run's first start. The horizon is saved with the run: raising
    ``train.steps`` on resume keeps it, and steps past it stay at the floor.
    ``decay_all_parameters=False`` puts biases, norm and embedding weights in a parameter
    group without weight decay (minGPT's and diffusion_policy's split).
    ``ema=True`` keeps an exponential moving average of the weights with decay
    ``min(ema_max_decay, 1 - (1 + step) ** -ema_power)`` (diffusion_policy's warm-up), used
    for evaluation and saved as ``ema.safetensors`` beside ``model.safetensors``.
    """

    batch_size: int = 256
    optimizer: str = "adamw"
    lr: float = 3.0e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    decay_all_parameters: bool = True
    schedule: str = "constant"
    warmup_steps: int = 0
    schedule_steps: Optional[int] = None
    min_lr_ratio: float = 0.0
    grad_clip: Optional[float] = None
    ema: bool = False
    ema_power: float = 0.75
    ema_max_decay: float = 0.9999

    def __post_init__(self) -> None:
        require_positive_int(self.batch_size, "recipe.batch_size")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"recipe.optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"recipe.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not self.lr > 0:
            raise ValueError(f"recipe.lr must be positive, got {self.lr}")
        self.betas = tuple(float(b) for b in self.betas)
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"recipe.betas must be two numbers in [0, 1), got {self.betas}")
        if self.weight_decay < 0:
            raise ValueError(f"recipe.weight_decay must be >= 0, got {self.weight_decay}")
        if isinstance(self.warmup_steps, bool) or not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"recipe.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if self.schedule_steps is not None:
            require_positive_int(self.schedule_steps, "recipe.schedule_steps")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"recipe.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"recipe.grad_clip must be positive or null, got {self.grad_clip}")
        if not (self.ema_power > 0 and 0.0 <= self.ema_max_decay < 1.0):
            raise ValueError(f"recipe.ema_power must be > 0 and ema_max_decay in [0, 1), got {self.ema_power}, {self.ema_max_decay}")


@dataclass
class InferenceOptions:
    """What may change without retraining: ``kinema-eval inference.<key>=<value>`` overrides it.

    Families extend it (DT: the target return, the KV cache); the checkpoint records the
    values the run was evaluated with.
    """


@dataclass
class AttentionInference(InferenceOptions):
    """Inference options of a family that calls the attention entry point: which backend it uses."""

    attention_backend: Optional[str] = None  # sdpa, math, flex, triton, or auto (triton on CUDA, else sdpa); null: sdpa

    def __post_init__(self) -> None:
        # imported here so that families without attention do not depend on the attention module
        from kinema.policies.attention import available_attention_backends

        if self.attention_backend is not None and self.attention_backend not in available_attention_backends():
            raise ValueError(
                f"inference.attention_backend must be one of {available_attention_backends()} or null, got {self.attention_backend!r}"
            )


class Policy(nn.Module):
    """Base class: holds the spec, the normalisation buffers and the rollout device logic."""

    config_class: ClassVar[type]
    name: ClassVar[str]
    label: ClassVar[str] = ""  # how tables and plots name the family (default: its name)
    # Statistics the family needs besides the observations' mean and std, which every policy
    # normalises with (normalize_obs): feature -> statistics, e.g. {"actions": ("min", "max")}.
    required_stats: ClassVar[dict[str, tuple[str, ...]]] = {}
    # Task structure the family needs in ``spec.structure`` (e.g. "body_graph"): the trainer derives
    # each from the task (kinema.envs.structure.task_structure), or reads the file the family's config field
    # of the same name gives.
    required_structure: ClassVar[tuple[str, ...]] = ()
    # False for a family whose weights come from elsewhere (``ppo``: kinema-rl); kinema-train refuses it.
    trains_offline: ClassVar[bool] = True
    offline_hint: ClassVar[str] = ""  # what to run instead, for that refusal
    # Keyword arguments reset() takes (e.g. DT's target_return); evaluation hands over only these.
    conditioning: ClassVar[tuple[str, ...]] = ()
    # True when act() depends on the current observation only (BC): episode ends need nothing.
    stateless: ClassVar[bool] = False
    # True when end_episode restarts or carries one environment's context while the others go on,
    # so several trials in a row per context mean something (a stateless policy's trials are plain episodes).
    multi_trial: ClassVar[bool] = False
    default_trials: ClassVar[int] = 1  # episodes per context when eval.trials is not set

    def __init__(self, config: Any, spec: PolicySpec, stats: NormStats):
        super().__init__()
        needs = self.needed_stats()
        stats.require(needs, f"the {self.name!r} policy")
        obs_mean, obs_std = stats.get("observations", "mean"), stats.get("observations", "std")
        if obs_mean.shape != (spec.obs_dim,):
            raise ValueError(
                f"{stats.source}: observations.mean has shape {obs_mean.shape}, "
                f"but the policy expects observations of dimension {spec.obs_dim}"
            )
        self.config = config
        self.spec = spec
        self.stats = stats.subset(needs)  # what the checkpoint saves
        self.inference = config.inference
        self.register_buffer("obs_mean", torch.as_tensor(obs_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("obs_std", torch.as_tensor(obs_std, dtype=torch.float32), persistent=False)
        self.register_buffer("action_low", torch.tensor(spec.action_low, dtype=torch.float32), persistent=False)
        self.register_buffer("action_high", torch.tensor(spec.action_high, dtype=torch.float32), persistent=False)

    @classmethod
    def needed_stats(cls) -> dict[str, tuple[str, ...]]:
        """Every statistic the family's checkpoints hold: the observations' mean and std, and ``required_stats``."""
        needs = {"observations": ("mean", "std")}
        for feature, stats in cls.required_stats.items():
            needs[feature] = tuple(dict.fromkeys((*needs.get(feature, ()), *stats)))
        return needs

    def configure_inference(self, **overrides: Any) -> None:
        """Change inference options (``kinema-eval inference.<key>=<value>``); unknown keys are refused by name."""
        if overrides:
            options = config_from_dict(type(self.inference), overrides, f"{self.name} inference options", defaults=self.inference)
            self.inference = self.config.inference = options

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

        A policy that keeps context must override it, either clearing that context (DT) or
        carrying it into the next trial (AT); one whose ``act`` depends on the current
        observation only declares ``stateless = True`` and ignores it.
        """
        if not self.stateless:
            raise NotImplementedError(
                f"{type(self).__name__} ({self.name!r}) keeps a context per environment, so it must implement "
                "end_episode(env_indices) to restart or carry it; a policy whose act() depends on the current "
                "observation only declares stateless = True"
            )

    # -- the per-step computation as pure tensor functions (the inference runtime's) -----------
    def step_functions(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        """This rollout's per-step computation: raw observations (N, obs_dim) on the policy's device ->
        actions (N, act_dim), updating the rollout's state in place with tensor operations only (no host
        synchronisation, numpy or branch on device values), so a runtime can capture it in a CUDA graph.
        Valid from ``reset`` to the next ``reset``. Several when the family switches paths on host-side
        counts (DT: decode or recompute): :meth:`next_step_function`, called once before each step, names
        the one to run and fills its host-drawn inputs (the diffusion policy's noise), and :meth:`count_step`
        records a step taken outside ``act``. Empty: served through ``act`` only.
        """
        return {}

    def next_step_function(self) -> str:
        return next(iter(self.step_functions()))

    def count_step(self) -> None:
        """Host-side bookkeeping of a step a runtime took through :meth:`step_functions`."""

    def rollout_buffers(self) -> list[Any]:
        """The rollout's mutable state (tensors and host arrays), so a runtime can snapshot and restore
        it around warm-up and capture without reallocating it."""
        return []

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



class StatelessPolicy(Policy):
    """A policy whose action depends on the current observation only (BC, BoT, a PPO actor): it keeps no
    context, and its per-step computation is one pure function, :meth:`step`."""

    stateless = True
    _num_envs = 0

    def step(self, observations: torch.Tensor) -> torch.Tensor:
        """Actions (N, act_dim) in the task's units for raw observations (N, obs_dim) on the policy's device."""
        raise NotImplementedError

    def reset(self, num_envs: int, **conditioning: Any) -> None:
        if isinstance(num_envs, bool) or not isinstance(num_envs, int) or num_envs <= 0:
            raise ValueError(f"num_envs must be a positive integer, got {num_envs!r}")
        self._num_envs = num_envs

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        obs = self.as_observation_tensor(observation)
        if self._num_envs and obs.shape[0] != self._num_envs:
            raise ValueError(f"act() got {obs.shape[0]} observations after reset(num_envs={self._num_envs})")
        return self.step(obs)

    def step_functions(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"step": self.step}

def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: where bf16 autocast speeds training up; without either it is far slower than fp32."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def require_positive_int(value: Any, name: str) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (config fields, ``reset(num_envs)``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def config_from_dict(config_class: type, values: dict[str, Any], source: str, defaults: Any = None) -> Any:
    """Build a config dataclass, naming unknown or mistyped keys instead of ignoring them.

    Nested config dataclasses (``recipe``, ``inference``) are built from nested mappings on
    top of the enclosing class's defaults for them, so ``{"recipe": {"lr": 1e-3}}`` keeps
    the family's other recipe values.
    """
    if not isinstance(values, dict):
        raise ValueError(f"{source}: expected a mapping of {config_class.__name__} fields, got {values!r}")
    base = defaults if defaults is not None else _default_instance(config_class, source)
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {unknown}; {config_class.__name__} accepts {sorted(known)}")
    resolved = {}
    for name, value in values.items():
        default = getattr(base, name) if base is not None else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = config_from_dict(type(default), value, f"{source}.{name}", defaults=default)
        resolved[name] = value
    try:
        if base is None:
            return config_class(**resolved)
        return dataclasses.replace(base, **resolved)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: {error}") from error


def _default_instance(config_class: type, source: str) -> Any:
    try:
        return config_class()
    except TypeError:  # a config class with required fields has no defaults to start from
        return None
    except ValueError as error:
        raise ValueError(f"{source}: the defaults of {config_class.__name__} are invalid: {error}") from error
