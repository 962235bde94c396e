"""HuggingFace ``transformers.DecisionTransformerModel`` as a kinema policy, for side-by-side benchmarks.

The policy ``hf_dt`` registers the way a family from outside the repository would: through
the ``kinema.policies`` entry point ``hf_dt = "kinema.benchmarks.hf_peer"`` in pyproject.toml,
so no kinema file names it. Importing this module does not import ``transformers``; building
the model does (``pip install "kinema[test]"`` installs it). It wraps HF's model unchanged
and adds what HF leaves to its users, done the way kzl's and HF's own example scripts do it:

- the same recipe as kinema's DT: K = 20, 3 layers, 1 head, 128 dims, dropout 0.1,
  timestep embedding of 1000 rows, tanh action head, returns-to-go divided by 1000,
  observations normalised by the dataset's mean/std, actions in the unit box [-1, 1];
  the MLP activation is HF's default (ReLU, as kzl's DT), kinema's is GELU;
- ``loss``: mean squared action error over real (unpadded) steps only, on the same
  ``windows`` batches kinema's DT trains on (``kinema.policies.base`` docstring);
- ``reset``/``act``/``observe_reward``: every ``act`` re-runs the whole last-K window
  (left-padded while the episode is shorter than K), as HF's and kzl's evaluation loops do.
  Rows of a batch advance in lock-step, so they share one padding length.

Build it without Hydra: ``build_hf_dt(spec, stats, **config_overrides)`` or
``make_policy({"name": "hf_dt", ...}, spec, stats)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch

from kinema.policies import register_policy
from kinema.policies.base import (
    BatchSpec, InferenceOptions, NormStats, Policy, PolicySpec, Recipe, config_from_dict, require_positive_int,
)
from kinema.policies.dt import dt_recipe


def import_transformers() -> Any:
    """HF ``transformers``, imported on first use so that discovering the family stays cheap."""
    try:
        import transformers
        from transformers.utils import logging as hf_logging
    except ImportError as error:
        raise ImportError(
            "the hf_dt policy (HuggingFace DecisionTransformerModel) needs the transformers package: "
            'pip install "kinema[test]" (or pip install "transformers>=4.40")'
        ) from error
    hf_logging.set_verbosity_error()  # HF's config chatter (token ids of a vocabulary-free model) is noise here
    return transformers


@dataclass
class HFDTInference(InferenceOptions):
    target_return: Optional[float] = None  # used when reset() gets none (evaluation always passes one)


@dataclass
class HFDTConfig:
    context_len: int = 20
    embed_dim: int = 128
    n_layers: int = 3
    n_heads: int = 1
    dropout: float = 0.1  # HF's embd_pdrop, resid_pdrop and attn_pdrop
    max_ep_len: int = 1000  # timestep embedding rows; later steps reuse the last row
    rtg_scale: float = 1000.0
    activation: str = "relu"  # HF's default and kzl's choice
    recipe: Recipe = field(default_factory=dt_recipe)  # DT's recipe: the peer trains like kinema's DT
    inference: HFDTInference = field(default_factory=HFDTInference)

    def __post_init__(self) -> None:
        for name in ("context_len", "embed_dim", "n_layers", "n_heads", "max_ep_len"):
            require_positive_int(getattr(self, name), name)
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.rtg_scale > 0:
            raise ValueError(f"rtg_scale must be positive, got {self.rtg_scale}")


@register_policy
class HFDecisionTransformer(Policy):
    name = "hf_dt"
    label = "HF DT"
    config_class = HFDTConfig
    conditioning = ("target_return",)
    # end_episode restarts one environment's window, but the quality grid reports several trials
    # per context for kinema's own families only; the peer is compared on single episodes.
    multi_trial = False

    def __init__(self, config: HFDTConfig, spec: PolicySpec, stats: NormStats):
        transformers = import_transformers()
        super().__init__(config, spec, stats)
        hf_config = transformers.DecisionTransformerConfig(
            state_dim=spec.obs_dim,
            act_dim=spec.act_dim,
            hidden_size=config.embed_dim,
            max_ep_len=config.max_ep_len,
            action_tanh=True,
            n_layer=config.n_layers,
            n_head=config.n_heads,
            n_inner=4 * config.embed_dim,
            activation_function=config.activation,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            bos_token_id=None,
            eos_token_id=None,
        )
        self.model = transformers.DecisionTransformerModel(hf_config)
        self._num_envs = 0

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("windows", self.config.context_len)

    @property
    def attention_implementation(self) -> str:
        return str(self.model.config._attn_implementation)

    def predict_actions(self, observations, unit_actions, returns_to_go, timesteps, mask) -> torch.Tensor:
        """Unit-box actions (B, K, act_dim) predicted at every step of left-padded windows."""
        real = mask.bool()
        keep = real.unsqueeze(-1)
        states = torch.where(keep, self.normalize_obs(observations), 0.0)  # padding never reaches the model
        output = self.model(
            states=states,
            actions=torch.where(keep, unit_actions, 0.0),
            returns_to_go=torch.where(keep, returns_to_go.unsqueeze(-1) / self.config.rtg_scale, 0.0),
            timesteps=torch.where(real, timesteps.long(), 0).clamp(0, self.config.max_ep_len - 1),
            attention_mask=real.long(),
            return_dict=True,
        )
        return output.action_preds

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["mask"].bool()
        if mask.shape[1] != self.config.context_len:
            raise ValueError(
                f"hf_dt loss: batch has windows of {mask.shape[1]} steps, the model was built for "
                f"context_len={self.config.context_len}"
            )
        target = self.unscale_action(batch["actions"]).clamp(-1.0, 1.0)
        predicted = self.predict_actions(batch["observations"], target, batch["returns_to_go"], batch["timesteps"], mask)
        per_step = (predicted - target).pow(2).mean(-1)
        # Mean over real steps only (CORL's (mse * mask).mean() would also divide by padding).
        action_mse = torch.where(mask, per_step, 0.0).sum() / mask.sum().clamp_min(1)
        return action_mse, {"action_mse": action_mse.item()}

    # -- rollouts: the whole last-K window re-run at every step ---------------------------------
    def reset(self, num_envs: int, target_return: float | Sequence[float] | None = None, **conditioning: Any) -> None:
        if conditioning:
            raise ValueError(f"hf_dt.reset: unknown conditioning {sorted(conditioning)}; it accepts target_return")
        require_positive_int(num_envs, "num_envs")
        target_return = self.inference.target_return if target_return is None else target_return
        if target_return is None:
            raise ValueError("hf_dt.reset: no target return; pass reset(num_envs, target_return=...)")
        n, k, device = int(num_envs), self.config.context_len, self.device
        self._num_envs = n
        self._targets = np.broadcast_to(np.asarray(target_return, dtype=np.float64), (n,)).copy()
        self._returns_to_go = self._targets.copy()
        self._steps = np.zeros(n, dtype=np.int64)  # steps of each environment's current episode
        self._observations = torch.zeros(n, k, self.spec.obs_dim, device=device)
        self._unit_actions = torch.zeros(n, k, self.spec.act_dim, device=device)
        self._window_returns = torch.zeros(n, k, device=device)
        self._timesteps = torch.zeros(n, k, dtype=torch.long, device=device)

    def end_episode(self, env_indices: Any) -> None:
        """Those environments start a new episode: their windows empty, their return-to-go back at the target."""
        if self._num_envs == 0:
            raise RuntimeError("hf_dt.end_episode called before reset(num_envs)")
        index = np.asarray(env_indices, dtype=np.int64).reshape(-1)
        self._steps[index] = 0
        self._returns_to_go[index] = self._targets[index]
        rows = torch.as_tensor(index, device=self.device)
        for window in (self._observations, self._unit_actions, self._window_returns, self._timesteps):
            window[rows] = 0

    def observe_reward(self, reward: Any) -> None:
        if self._num_envs == 0:
            raise RuntimeError("hf_dt.observe_reward called before reset(num_envs)")
        rewards = np.asarray(reward, dtype=np.float64).reshape(-1)
        if rewards.shape != (self._num_envs,):
            raise ValueError(f"hf_dt.observe_reward expects {self._num_envs} rewards, got shape {np.shape(reward)}")
        self._returns_to_go -= rewards

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        if self._num_envs == 0:
            raise RuntimeError("hf_dt.act called before reset(num_envs)")
        obs = self.as_observation_tensor(observation)
        if obs.shape[0] != self._num_envs:
            raise ValueError(f"act() got {obs.shape[0]} observations after reset(num_envs={self._num_envs})")
        # Slide every window one step left and write the new step at the end; its action slot
        # holds zeros until the action is chosen (causal attention never lets s_t see it).
        for window in (self._observations, self._unit_actions, self._window_returns, self._timesteps):
            window[:, :-1] = window[:, 1:].clone()
        self._observations[:, -1] = obs
        self._unit_actions[:, -1] = 0.0
        self._window_returns[:, -1] = torch.as_tensor(self._returns_to_go, dtype=torch.float32, device=self.device)
        self._timesteps[:, -1] = torch.as_tensor(self._steps, device=self.device)
        self._steps += 1
        k = self.config.context_len
        filled = torch.as_tensor(np.minimum(self._steps, k), device=self.device)
        mask = torch.arange(k, device=self.device)[None, :] >= (k - filled)[:, None]
        unit_action = self.predict_actions(
            self._observations, self._unit_actions, self._window_returns, self._timesteps, mask
        )[:, -1]
        self._unit_actions[:, -1] = unit_action
        return self.scale_action(unit_action)


def build_hf_dt(spec: PolicySpec, stats: NormStats, **config: Any) -> HFDecisionTransformer:
    """The HF peer without Hydra: ``config`` overrides ``HFDTConfig`` fields by name."""
    return HFDecisionTransformer(config_from_dict(HFDTConfig, config, source="hf_dt config"), spec, stats)
