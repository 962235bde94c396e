"""Decision Transformer (Chen et al. 2021) with batched, incrementally decoded rollouts.

Recipe (kzl/decision-transformer and CORL; see BENCHMARKS.md): K = 20 steps of context,
3 pre-LN GPT blocks of 128 dims with 1 head, dropout 0.1, a learned timestep embedding
added to every token (no positional embedding), returns-to-go scaled by 1/1000,
observations normalised by the dataset's mean/std, a tanh action head. The paper's
evaluation targets live with the tasks (``kinema.envs.TaskSpec.target_return``: hopper
3600, halfcheetah 12000, walker2d 5000); the trainer passes its own (by default the best
return in the training data) with ``reset(num_envs, target_return=...)``.

Tokens. Step t contributes (return-to-go R_t, state s_t, action a_t), DT's order. They
are grouped per step as ``[a_{t-1}, R_t, s_t]`` so that one rollout step appends one
contiguous group of three tokens, all known when a_t is chosen. Attention is causal
over tokens, so every prediction sees exactly what DT's (R, s, a) sequence shows it: the
window's first group has no previous action (that slot is masked, as is any padding),
and the last action a_{t+K-1}, which nothing reads, is never fed. Actions, in the
model's input and in the loss, live in the unit box [-1, 1] (``Policy.unscale_action``).

Loss: mean squared error of the tanh head on the state tokens, averaged over real
(unpadded) steps only, not CORL's ``(mse * mask).mean()`` that also divides by padding.
Only the state tokens are computed in the last block unless an auxiliary head
(``predict_state`` / ``predict_return``, off by default, read from the action tokens as
in DT) needs the others. ``precision="bf16"`` runs the training forward under bf16
autocast (about 1.7x faster on CPUs with AVX512-BF16, slower on CPUs without it, hence
off by default); errors, means and rollouts stay fp32.

Rollouts. ``reset(N, target_return=...)`` starts N contexts; ``act(obs (N, obs_dim))``
appends one group per environment and returns N actions; ``observe_reward(rewards)``
lowers each return-to-go; ``end_episode(env_indices)`` restarts those contexts (used by
multi-trial evaluation). Call ``reset`` again after moving the policy to another device.

Decoding, and the one place kinema departs from the paper's model by default. Keys and
values live in a preallocated ring of cached step groups. Exact full-context DT
(``attention_window = 0``) can decode one group per step only while every context still
holds its whole episode (at most K steps): once a context slides, every token's hidden
state changes (deeper layers saw the dropped step), so the window is recomputed from the
cached token embeddings in one batched forward that also refills the cache.
``attention_window = W`` trains with a banded mask (each token sees only the tokens of the
last W steps) and decodes forever through a ring of W groups with no recompute; the stream
equals a banded forward over the whole episode, and equals the last steps of training
windows once K >= n_layers * (W - 1) + 2 (the receptive field, clear of the window's
first group). The default W = 7 (K = 20, 3 layers: 3 * 6 + 2 = 20) therefore acts at test
time exactly as it was trained, at one group's cost per step (benchmarks/latency.py);
benchmarks/quality.py's ``dt_full`` compares its scores with the exact model's.
``attention_window=0`` gives the paper's exact model. W = K trains exactly like DT but
lets deeper layers see up to n_layers * K steps at test time.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinema.policies import register_policy
from kinema.policies.attention import MaskSpec, takes_mask_spec
from kinema.policies.base import (
    AttentionInference, BatchSpec, NormStats, Policy, PolicySpec, Recipe, cpu_has_native_bf16, require_positive_int,
)
from kinema.policies.transformer import GPT, init_gpt_weights

TOKENS_PER_STEP = 3  # [previous action, return-to-go, state]
PRECISIONS = ("fp32", "bf16")
WINDOW_KEYS = ("observations", "actions", "returns_to_go", "timesteps", "mask")
ACTION_SLOT, RETURN_SLOT, STATE_SLOT = 0, 1, 2


@dataclass
class DTInference(AttentionInference):
    """DT's rollout options; none changes the trained weights."""

    target_return: Optional[float] = None  # used when reset() gets none (evaluation always passes one)
    use_kv_cache: bool = True  # False: recompute the window every step (exact full-context models only)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target_return is not None:
            self.target_return = float(self.target_return)


def dt_recipe() -> Recipe:
    """kzl / CORL: AdamW 1e-4, weight decay 1e-4 on every parameter, grad clip 0.25, batch 64.

    The paper warms up over 10k of 100k steps (~4.5 h on a 2-core CPU); kinema's budgets are
    shorter, so warm-up is 1k (the quick start's 1k steps are all warm-up; the quality grid
    sets 10% of its budget): ``policy.recipe.warmup_steps=10000 train.steps=100000`` for the paper's.
    """
    return Recipe(batch_size=64, lr=1.0e-4, weight_decay=1.0e-4, warmup_steps=1000, grad_clip=0.25)


@dataclass
class DTConfig:
    context_len: int = 20
    embed_dim: int = 128
    n_layers: int = 3
    n_heads: int = 1
    dropout: float = 0.1  # embeddings and residual branches
    attention_dropout: float = 0.1
    max_timestep: int = 1000  # timestep embedding rows; later steps reuse the last row
    rtg_scale: float = 1000.0  # returns-to-go are divided by this before embedding
    attention_window: int = 7  # steps each token sees (banded, streams with no recompute); 0 = the whole context (DT)
    predict_state: bool = False
    predict_return: bool = False
    precision: str = "fp32"  # "bf16": the training forward runs under bf16 autocast (rollouts stay fp32)
    recipe: Recipe = field(default_factory=dt_recipe)
    inference: DTInference = field(default_factory=DTInference)

    def __post_init__(self) -> None:
        for name in ("context_len", "embed_dim", "n_layers", "n_heads", "max_timestep"):
            require_positive_int(getattr(self, name), name)
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        for name in ("dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.rtg_scale > 0:
            raise ValueError(f"rtg_scale must be positive, got {self.rtg_scale}")
        if not 0 <= self.attention_window <= self.context_len:
            raise ValueError(f"attention_window must be in [0, context_len={self.context_len}], got {self.attention_window}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")


def step_attention_mask(steps: int, window: int, device=None) -> torch.Tensor:
    """(3*steps, 3*steps) bool: causal over tokens, and within ``window`` steps when window > 0."""
    token = torch.arange(TOKENS_PER_STEP * steps, device=device)
    step = token // TOKENS_PER_STEP
    allowed = token[None, :] <= token[:, None]
    if window > 0:
        allowed &= (step[:, None] - step[None, :]) < window
    return allowed


@register_policy
class DecisionTransformer(Policy):
    name = "dt"
    label = "kinema DT"
    config_class = DTConfig
    conditioning = ("target_return",)
    multi_trial = True

    def __init__(self, config: DTConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        dim = config.embed_dim
        self.embed_action = nn.Linear(self.action_features, dim)
        self.embed_return = nn.Linear(self.return_features, dim)
        self.embed_state = nn.Linear(spec.obs_dim, dim)
        self.embed_timestep = nn.Embedding(config.max_timestep, dim)
        self.embed_norm = nn.LayerNorm(dim)
        self.embed_dropout = nn.Dropout(config.dropout)
        self.transformer = GPT(dim, config.n_layers, config.n_heads, config.dropout, config.attention_dropout)
        self.action_head = nn.Linear(dim, spec.act_dim)
        self.state_head = nn.Linear(dim, spec.obs_dim) if config.predict_state else None
        self.return_head = nn.Linear(dim, 1) if config.predict_return else None
        for module in (self.embed_action, self.embed_return, self.embed_state, self.embed_timestep, self.embed_norm,
                       self.action_head, self.state_head, self.return_head):
            if module is not None:
                init_gpt_weights(module)
        window = config.attention_window
        self.register_buffer("train_mask", step_attention_mask(config.context_len, window), persistent=False)

    # -- what the tokens carry (the Agentic Transformer extends these) ---------------------
    @property
    def action_features(self) -> int:
        return self.spec.act_dim

    @property
    def return_features(self) -> int:
        """Inputs of the return token: the return-to-go (the Agentic Transformer may add a trial summary)."""
        return 1

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("windows", self.config.context_len)

    def _window_features(self, batch: dict[str, torch.Tensor], unit_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(features of each step's action token (B, K, F), of its return token (B, K, R), the first R's the return-to-go)."""
        return unit_actions, (batch["returns_to_go"] / self.config.rtg_scale).unsqueeze(-1)

    def _loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch["mask"]

    # -- training ----------------------------------------------------------------------
    def _embed(self, action_feats, return_feats, states, action_times, times) -> torch.Tensor:
        """Token embeddings (..., 3, D) for groups [a_{t-1}, R_t, s_t]; inputs (..., F) per group."""
        tokens = torch.stack(
            (self.embed_action(action_feats), self.embed_return(return_feats), self.embed_state(states)), dim=-2
        )
        limit = self.config.max_timestep - 1
        time_index = torch.stack((action_times, times, times), dim=-1).clamp(0, limit)
        return self.embed_norm(tokens + self.embed_timestep(time_index))

    def _forward(self, batch: dict[str, torch.Tensor], all_tokens: bool) -> dict[str, torch.Tensor]:
        """Hidden states of a batch of windows (any length; padding on the left)."""
        missing = [key for key in WINDOW_KEYS if key not in batch]
        if missing:
            raise ValueError(
                f"{self.name}: the batch lacks {missing}; expected a '{self.batch_spec.kind}' batch with {list(WINDOW_KEYS)}"
            )
        mask = batch["mask"].bool()
        batch_size, steps = mask.shape
        unit_actions = self.unscale_action(batch["actions"]).clamp(-1.0, 1.0)
        action_feats, return_feats = self._window_features(batch, unit_actions)
        # Group t holds the previous step's action token; the first group has none.
        previous = torch.cat((torch.zeros_like(action_feats[:, :1]), action_feats[:, :-1]), dim=1)
        times = batch["timesteps"].long()
        previous_times = torch.cat((times[:, :1], times[:, :-1]), dim=1)
        states = self.normalize_obs(batch["observations"])
        tokens = self._embed(previous, return_feats, states, previous_times, times)
        # Padding is on the left, so the previous action exists where both steps are real.
        has_previous = torch.cat((torch.zeros_like(mask[:, :1]), mask[:, :-1]), dim=1) & mask
        valid = torch.stack((has_previous, mask, mask), dim=-1).reshape(batch_size, TOKENS_PER_STEP * steps)
        # Zero padded tokens so no value there (even NaN) can reach the attention sums.
        tokens = tokens.reshape(batch_size, TOKENS_PER_STEP * steps, -1) * valid.unsqueeze(-1)
        query = None if all_tokens else slice(STATE_SLOT, None, TOKENS_PER_STEP)
        hidden = self.transformer(
            self.embed_dropout(tokens), self._attention_mask(valid), query_index=query, backend=self.inference.attention_backend
        )
        out = {"unit_actions": unit_actions, "states": states, "return_feats": return_feats, "has_previous": has_previous}
        if all_tokens:
            hidden = hidden.view(batch_size, steps, TOKENS_PER_STEP, -1)
            out["state_hidden"], out["action_hidden"] = hidden[:, :, STATE_SLOT], hidden[:, :, ACTION_SLOT]
        else:
            out["state_hidden"] = hidden
        return out

    def predict_actions(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Unit-box actions (B, K, act_dim) the model predicts at every step of a batch of windows."""
        return torch.tanh(self.action_head(self._forward(batch, all_tokens=False)["state_hidden"]))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        steps = batch["mask"].shape[1] if "mask" in batch else self.config.context_len
        if steps != self.config.context_len:
            raise ValueError(
                f"{self.name} loss: batch has windows of {steps} steps, "
                f"the model was built for context_len={self.config.context_len}"
            )
        need_all = self.state_head is not None or self.return_head is not None
        # fp32 enters no autocast context at all, so a caller's own autocast still applies.
        bf16 = self.config.precision == "bf16"
        if bf16 and self.device.type == "cpu" and not self.__dict__.get("_warned_bf16") and not cpu_has_native_bf16():
            self._warned_bf16 = True
            warnings.warn(
                "policy.precision=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): bf16 autocast runs "
                "far slower than fp32 here (12x measured on an AVX2 machine); use policy.precision=fp32",
                stacklevel=2,
            )
        with torch.autocast(self.device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext():
            out = self._forward(batch, all_tokens=need_all)
            predicted = torch.tanh(self.action_head(out["state_hidden"]))
            predicted_states = self.state_head(out["action_hidden"]) if self.state_head is not None else None
            predicted_returns = self.return_head(out["action_hidden"]) if self.return_head is not None else None
        # Errors and means in fp32 whatever the forward's precision.
        unit_actions = out["unit_actions"]
        loss_mask = self._loss_mask(batch).to(unit_actions.dtype)
        action_mse = _masked_mean((predicted.float() - unit_actions).pow(2).mean(-1), loss_mask)
        total, metrics = action_mse, {"action_mse": action_mse.item()}
        # Auxiliary heads read a_{t-1}'s token (group t) and predict s_t and R_t, as DT does from a's token.
        aux_mask = out["has_previous"].to(unit_actions.dtype)
        if predicted_states is not None:
            state_mse = _masked_mean((predicted_states.float() - out["states"]).pow(2).mean(-1), aux_mask)
            total = total + state_mse
            metrics["state_mse"] = state_mse.item()
        if predicted_returns is not None:
            return_error = (predicted_returns.float() - out["return_feats"][..., :1]).pow(2).squeeze(-1)
            return_mse = _masked_mean(return_error, aux_mask)
            total = total + return_mse
            metrics["return_mse"] = return_mse.item()
        return total, metrics

    def _attention_mask(self, valid: torch.Tensor) -> torch.Tensor | MaskSpec:
        """(B, 1, T, T): causal/banded and real keys only; the diagonal stays open so no row is empty.
        Described instead (a MaskSpec) for a backend that evaluates descriptions."""
        if takes_mask_spec(self.inference.attention_backend, valid.device):
            return MaskSpec(causal=True, window=self.config.attention_window, group=TOKENS_PER_STEP, key_valid=valid,
                            keep_diagonal=True)
        tokens = valid.shape[1]
        allowed = self.train_mask
        if tokens > allowed.shape[0]:  # longer than training windows (reference computations)
            allowed = step_attention_mask(tokens // TOKENS_PER_STEP, self.config.attention_window, valid.device)
        mask = allowed[:tokens, :tokens] & valid[:, None, None, :]
        return mask | torch.eye(tokens, dtype=torch.bool, device=valid.device)

    # -- rollouts ------------------------------------------------------------------------
    def reset(self, num_envs: int, target_return: float | Sequence[float] | None = None, **conditioning: Any) -> None:
        """Start ``num_envs`` empty contexts, each aiming at its target return (a number or one per environment)."""
        if conditioning:
            raise ValueError(f"{self.name}.reset: unknown conditioning {sorted(conditioning)}; it accepts target_return")
        require_positive_int(num_envs, "num_envs")
        if target_return is None:
            target_return = self.inference.target_return
        if target_return is None:
            raise ValueError(
                f"{self.name}.reset: no target return; pass reset(num_envs, target_return=...) or set the "
                "inference option target_return"
            )
        try:
            targets = np.broadcast_to(np.asarray(target_return, dtype=np.float64), (int(num_envs),)).copy()
        except ValueError as error:
            raise ValueError(
                f"{self.name}.reset: target_return must be a number or {num_envs} numbers, got {target_return}"
            ) from error
        if not np.isfinite(targets).all():
            raise ValueError(f"{self.name}.reset: target_return must be finite, got {target_return}")
        if self.config.attention_window and not self.inference.use_kv_cache:
            raise ValueError(
                f"{self.name}: a policy trained with attention_window decodes with its KV cache only "
                "(a recomputed window is not what it was trained to see); set inference.use_kv_cache=true"
            )
        self._rollout = self._make_rollout(int(num_envs), targets)

    def _make_rollout(self, num_envs: int, targets: np.ndarray) -> "_Rollout":
        return _Rollout(self, num_envs, targets)

    @property
    def _num_envs(self) -> int:
        rollout = self.__dict__.get("_rollout")
        return 0 if rollout is None else rollout.num_envs

    def observe_reward(self, reward: Any) -> None:
        rewards = self._check_per_env(reward, "observe_reward")
        self._rollout.observe_reward(torch.as_tensor(rewards, device=self.device))

    def end_episode(self, env_indices: Any) -> None:
        """The episode of these environments ended: start their contexts afresh (DT plays one trial per context)."""
        index = self._check_env_indices(env_indices)
        state = self._rollout
        state.restart_trial(torch.as_tensor(index, device=self.device))
        state.clear_context(index)

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        """Actions (N, act_dim) in the action box for observations (N, obs_dim), one group appended per context.

        Wraps the rollout's pure tensor steps: ``decode_step`` (the new group against the KV cache)
        or, once an exact full-context model's context slides, ``recompute_step`` (the whole window).
        Which one runs follows from host-side counts only, so choosing never reads the device.
        """
        state = self._rollout_or_error("act")
        obs = self.as_observation_tensor(observation)
        if obs.shape[0] != state.num_envs:
            raise ValueError(f"act() got {obs.shape[0]} observations after reset(num_envs={state.num_envs})")
        state.refresh_fused_weights()
        if state.decodes_next_step():
            unit_action = state.decode_step(self.normalize_obs(obs))
        else:
            unit_action = state.recompute_step(self.normalize_obs(obs))
        state.count_step()
        return self._unit_to_action(unit_action)

    def step_functions(self) -> dict[str, Any]:
        state = self._rollout_or_error("step_functions")
        state.refresh_fused_weights()  # the steps use the fused weights as they are now (a runtime's weights are fixed)
        functions = {"decode": lambda observations: self._unit_to_action(state.decode_step(self.normalize_obs(observations)))}
        if state.exact_full_context:
            functions["recompute"] = lambda observations: self._unit_to_action(state.recompute_step(self.normalize_obs(observations)))
        return functions

    def next_step_function(self) -> str:
        return "decode" if self._rollout_or_error("next_step_function").decodes_next_step() else "recompute"

    def count_step(self) -> None:
        self._rollout_or_error("count_step").count_step()

    def rollout_buffers(self) -> list[Any]:
        return self._rollout_or_error("rollout_buffers").buffers()

    def _unit_to_action(self, unit_action: torch.Tensor) -> torch.Tensor:
        state = self._rollout
        return torch.addcmul(state.action_mid, unit_action, state.action_half)

    def _rollout_or_error(self, what: str) -> "_Rollout":
        state = self.__dict__.get("_rollout")
        if state is None:
            raise RuntimeError(f"{self.name}.{what} called before reset(num_envs)")
        return state

    def _check_per_env(self, values: Any, what: str) -> np.ndarray:
        n = self._num_envs
        if n == 0:
            raise RuntimeError(f"{self.name}.{what} called before reset(num_envs)")
        array = np.asarray(values, dtype=np.float64).reshape(-1)
        if array.shape != (n,):
            raise ValueError(f"{self.name}.{what} expects {n} values (one per environment), got shape {np.shape(values)}")
        if not np.isfinite(array).all():
            raise ValueError(f"{self.name}.{what} received a non-finite value: {array.tolist()}")
        return array

    def _check_env_indices(self, env_indices: Any) -> np.ndarray:
        n = self._num_envs
        if n == 0:
            raise RuntimeError(f"{self.name}.end_episode called before reset(num_envs)")
        index = np.asarray(env_indices, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= n):
            raise ValueError(f"{self.name}.end_episode: environment indices {index.tolist()} out of range 0..{n - 1}")
        return index


class _Rollout:
    """One batched rollout of DT: its state as tensors on the policy's device, and the pure per-step functions.

    ``decode_step`` and ``recompute_step`` map (normalised observations, this state) to unit-box actions
    and update the state in place with tensor operations only: no host synchronisation, no numpy,
    no branch on device values, so a runtime can capture them in a CUDA graph or export them. The
    contexts' lengths also live on the host (``host_context_steps``, advanced by :meth:`count_step`),
    so that :meth:`decodes_next_step` chooses between the two without reading the device.

    Device state: the next group's input features (previous action features, then return-to-go /
    scale), targets and returns-to-go (float64, as rewards are summed), timesteps ``[t - 1, t, t]``,
    the ring of token embeddings with their key validity, the KV cache, and masks per ring position.
    """

    def __init__(self, policy: DecisionTransformer, num_envs: int, targets: np.ndarray):
        config, device, dim = policy.config, policy.device, policy.config.embed_dim
        n = self.num_envs = num_envs
        groups = self.groups = config.attention_window or config.context_len  # ring of cached step groups
        slots = TOKENS_PER_STEP * groups
        self.config, self.act_dim = config, policy.spec.act_dim
        self.exact_full_context = not config.attention_window
        self._policy = policy  # its inference options are read at every step: configure_inference applies at once
        self.transformer = policy.transformer
        self.targets = torch.as_tensor(targets, dtype=torch.float64, device=device)
        self.returns_to_go = self.targets.clone()
        # Next group's inputs, one row per env: [previous action features..., return-to-go / scale, ...].
        self.action_features = policy.action_features
        self.step_input = torch.zeros(n, self.action_features + policy.return_features, device=device)
        self._bind_input_views()
        self.return_feature.copy_(self.targets / config.rtg_scale)
        self.times = torch.zeros(n, TOKENS_PER_STEP, dtype=torch.long, device=device)  # [t - 1, t, t] per env
        self.context_steps = torch.zeros(n, dtype=torch.long, device=device)  # groups in each context, at most `groups`
        self.write_group = torch.zeros((), dtype=torch.long, device=device)  # ring position of the next group
        self.host_context_steps = np.zeros(n, dtype=np.int64)  # the same counts, host-side (see decodes_next_step)

        self.tokens = torch.zeros(n, slots, dim, device=device)  # token embeddings, for recomputes
        self.key_valid = torch.zeros(n, slots, dtype=torch.bool, device=device)
        self.cache = policy.transformer.new_cache(n, slots, device)
        self.group_offsets = torch.arange(TOKENS_PER_STEP, device=device)
        # Per ring position j: what the new group's tokens may see besides valid keys.
        slot = torch.arange(slots, device=device)
        query = self.group_offsets[:, None]
        own = (slot // TOKENS_PER_STEP)[None, :] == torch.arange(groups, device=device)[:, None, None]  # (groups, 1, slots)
        self.decode_allowed = ~(own & (slot % TOKENS_PER_STEP > query))  # (groups, 3, slots): no later token of the group
        self.decode_self = own & (slot % TOKENS_PER_STEP == query)  # a masked token still sees itself
        self.weights = policy.transformer.decode_weights()
        self.head = (policy.action_head.weight, policy.action_head.bias)
        self.action_mid = (policy.action_high + policy.action_low) / 2
        self.action_half = (policy.action_high - policy.action_low) / 2
        self.device = device
        self._attention_mask = policy._attention_mask
        self._embedders = (policy.embed_action, policy.embed_return, policy.embed_state)
        self._time_table = policy.embed_timestep.weight
        self._norm = (policy.embed_norm.weight, policy.embed_norm.bias)
        self._fused_versions: tuple[int, ...] = ()

    @property
    def inference(self) -> DTInference:
        return self._policy.inference

    # -- host-side bookkeeping (the wrapper's) ----------------------------------------------
    def decodes_next_step(self) -> bool:
        """Decode against the cache, unless an exact full-context model's context is about to slide."""
        return not self.exact_full_context or (self.inference.use_kv_cache and self.host_context_steps.max() < self.groups)

    TENSOR_STATE = ("step_input", "returns_to_go", "times", "context_steps", "write_group", "tokens", "key_valid")

    def buffers(self) -> list[Any]:
        """Everything a step or an episode end changes (see ``Policy.rollout_buffers``)."""
        return [*self.tensor_state(), self.host_context_steps]

    def tensor_state(self) -> list[torch.Tensor]:
        """The device state, in :attr:`TENSOR_STATE` order with the KV cache last."""
        return [*(getattr(self, name) for name in self.TENSOR_STATE), self.cache.data]

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        """Use ``tensors`` (as :meth:`tensor_state` lists them) as the state from now on: an exporter passes
        the state in as inputs and reads it back as outputs."""
        for name, tensor in zip(self.TENSOR_STATE, tensors):
            setattr(self, name, tensor)
        self._bind_input_views()
        self.cache.rebind(tensors[len(self.TENSOR_STATE)])

    def _bind_input_views(self) -> None:
        """Named views of ``step_input``'s columns (written in place by the steps)."""
        features = self.action_features
        self.previous_feats, self.return_feature = self.step_input[:, :features], self.step_input[:, features]

    def count_step(self) -> None:
        """The host-side count of a step just taken (a replayed CUDA graph runs no Python: the caller counts)."""
        np.minimum(self.host_context_steps + 1, self.groups, out=self.host_context_steps)

    def clear_context(self, index: np.ndarray) -> None:
        """Empty these environments' contexts (their cached keys become invalid)."""
        self.host_context_steps[index] = 0
        device_index = torch.as_tensor(index, device=self.device)
        self.context_steps[device_index] = 0
        self.key_valid[device_index] = False

    def observe_reward(self, rewards: torch.Tensor) -> None:
        self.returns_to_go -= rewards
        self.return_feature.copy_(self.returns_to_go / self.config.rtg_scale)

    def restart_trial(self, index: torch.Tensor) -> None:
        """These environments start a new trial: their target again, their clock from 0."""
        self.returns_to_go[index] = self.targets[index]
        self.return_feature[index] = (self.targets[index] / self.config.rtg_scale).float()
        self.times[index, 1:] = 0

    # -- the pure per-step functions ----------------------------------------------------------
    def decode_step(self, states: torch.Tensor) -> torch.Tensor:
        """Append one group to every context and decode it against the cache; unit-box actions (N, act_dim)."""
        j = self.write_group
        slots = j * TOKENS_PER_STEP + self.group_offsets
        group = self._append_group(states, slots)
        backend = self.inference.attention_backend
        if takes_mask_spec(backend, self.device):
            start = j * TOKENS_PER_STEP
            mask = MaskSpec(key_valid=self.key_valid, keep_diagonal=True, ring_start=start)
            last_mask = MaskSpec(key_valid=self.key_valid, keep_diagonal=True, ring_start=start + TOKENS_PER_STEP - 1)
        else:
            at_j = j.view(1)
            allowed, own = self.decode_allowed.index_select(0, at_j)[0], self.decode_self.index_select(0, at_j)[0]
            mask = ((self.key_valid.unsqueeze(1) & allowed) | own).unsqueeze(1)
            last_mask = self.key_valid.view(self.num_envs, 1, 1, -1)
        hidden = self.transformer.decode(group, self.cache, slots, mask, last_mask, self.weights, backend)
        self.write_group.copy_((j + 1) % self.groups)
        return self._finish_step(hidden)

    def recompute_step(self, states: torch.Tensor) -> torch.Tensor:
        """Append one group, then run the whole window (oldest group first) and rebuild the cache from it."""
        newest = self.write_group
        self._append_group(states, newest * TOKENS_PER_STEP + self.group_offsets)
        groups = self.groups
        oldest = (newest + 1) % groups
        # A full context drops its oldest step now: that step's group loses its previous-action token.
        full = self.context_steps + 1 >= groups
        action_slot = (TOKENS_PER_STEP * oldest + ACTION_SLOT).view(1)
        self.key_valid.index_copy_(1, action_slot, self.key_valid.index_select(1, action_slot) & ~full[:, None])
        order = (torch.arange(groups, device=self.device) + oldest) % groups
        slots = (order[:, None] * TOKENS_PER_STEP + self.group_offsets).reshape(-1)
        tokens = self.tokens[:, slots]
        valid = self.key_valid[:, slots]
        hidden = self.transformer(tokens, self._attention_mask(valid), query_index=slice(-1, None), cache=self.cache,
                                  backend=self.inference.attention_backend)
        # The ring now starts at the oldest group.
        self.tokens.copy_(tokens)
        self.key_valid.copy_(valid)
        self.write_group.zero_()
        return self._finish_step(hidden[:, 0])

    def _append_group(self, states: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The new group's tokens (N, 3, D), written with their key validity at ring ``slots``."""
        group = self.embed_group(states, self.times.clamp_max(self.config.max_timestep - 1))
        self.tokens.index_copy_(1, slots, group)
        has_previous = self.context_steps > 0  # the first group of a context has no previous action
        present = torch.ones_like(has_previous)
        self.key_valid.index_copy_(1, slots, torch.stack((has_previous, present, present), dim=1))
        return group

    def _finish_step(self, hidden: torch.Tensor) -> torch.Tensor:
        torch.clamp_max(self.context_steps + 1, self.groups, out=self.context_steps)
        unit_action = torch.tanh(F.linear(hidden, *self.head))
        self.record_action(unit_action)
        self.times[:, 0] = self.times[:, 1]
        self.times[:, 1:] += 1
        return unit_action

    def record_action(self, unit_action: torch.Tensor) -> None:
        self.previous_feats[:, : self.act_dim] = unit_action

    def refresh_fused_weights(self) -> None:
        """Host-side, before steps run: rebuild the fused embedding weights when the weights changed in place
        (training between evaluations). Kept out of the pure steps, where reading tensor versions is a
        data-dependent guard that breaks torch.compile's graph."""
        versions = tuple(p._version for layer in self._embedders for p in (layer.weight, layer.bias))
        if versions != self._fused_versions:
            (wa, ba), (wr, br), (ws, bs) = ((layer.weight, layer.bias) for layer in self._embedders)
            self._fused_weight = torch.block_diag(wa, wr, ws).t().contiguous()
            self._fused_bias = torch.cat((ba, br, bs))
            self._fused_versions = versions

    def embed_group(self, states: torch.Tensor, clamped_times: torch.Tensor) -> torch.Tensor:
        """The new group's tokens (N, 3, D): the three input embeddings in one matmul."""
        inputs = torch.cat((self.step_input, states), dim=1)
        tokens = torch.addmm(self._fused_bias, inputs, self._fused_weight).view(self.num_envs, TOKENS_PER_STEP, -1)
        times = F.embedding(clamped_times, self._time_table)
        return F.layer_norm(tokens + times, (tokens.shape[-1],), *self._norm)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` over positions where ``mask`` is 1 (not over padding)."""
    return (values * mask).sum() / mask.sum().clamp_min(1.0)
