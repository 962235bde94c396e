"""Diffusion policy: a transformer denoises a chunk of future actions, conditioned on recent observations.

Model (DiT-policy's conditioning, Dasari et al. 2024): the last ``n_obs_steps`` (To) normalised
observations are encoded once per chunk into one vector; each of the ``horizon`` (T) action tokens
goes through pre-LayerNorm blocks whose LayerNorms are modulated by adaLN-Zero (shift, scale and a
gate per sub-layer, produced from the observation encoding plus the denoising-time embedding,
zero-initialised so every block starts as the identity). There is no cross-attention; the
observation encoding is reused across every denoising step of a chunk. Attention over the chunk
goes through ``kinema.policies.attention`` (non-causal by default; ``causal=true`` gives
diffusion_policy's causal action attention).

Training (diffusion_policy's recipe, two values changed for a CPU budget, see the config): DDPM with
``num_train_timesteps`` (100) steps and the ``squaredcos_cap_v2`` schedule, prediction of the clean
chunk (``prediction_type=epsilon`` predicts the noise, as diffusion_policy), ``clip_sample``;
actions normalised to [-1, 1] by the dataset's per-dimension min and max (stored in the
checkpoint); AdamW with a cosine schedule and warm-up, and an EMA of the weights
that evaluation uses (``kinema.policies.Recipe``). The noise schedulers are diffusers' (the
``diffusion`` extra), as in diffusion_policy and LeRobot.

Sampling: DDIM with ``inference.num_inference_steps`` (10) steps (``eta`` 0: deterministic given
the initial noise) or DPM-Solver++ (``inference.sampler=dpmsolver``). Executed actions start at
chunk index To - 1, the step the last observation belongs to.

Rollout (``reset``/``act``): ``receding`` executes ``n_action_steps`` (Ta) actions of a chunk, then
samples the next; ``ensemble`` samples a chunk every step and executes the weighted mean of every
chunk's prediction for the current step (ACT's temporal ensembling: the k-th oldest prediction
weighs exp(-ensemble_decay * k)). An environment's noise comes from its own generator
(``Policy.seed_episodes``), so scores do not depend on how many environments run together.
:meth:`DiffusionPolicy.predict_chunk` is the chunk-level call (an observation history and,
optionally, already-committed actions that the chunk must keep, by inpainting). For the inference
runtime (CUDA graphs, ``torch.compile``, ONNX), the rollout is also a set of pure step functions
(``step_functions``: ``sample`` and ``pop``, or ``ensemble``; DDIM only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from kinema.policies import register_policy
from kinema.policies.attention import attention
from kinema.policies.base import AttentionInference, BatchSpec, NormStats, Policy, PolicySpec, Recipe, require_positive_int
from kinema.policies.transformer import init_gpt_weights

SAMPLERS = ("ddim", "dpmsolver")
EXECUTIONS = ("receding", "ensemble")
BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")
PREDICTION_TYPES = ("epsilon", "sample")
ACTION_RANGE_EPS = 1e-4  # an action dimension whose data range is below this is not rescaled (diffusion_policy's rule)


@dataclass
class DiffusionInference(AttentionInference):
    sampler: str = "ddim"  # ddim | dpmsolver (DPM-Solver++ 2M)
    num_inference_steps: int = 10  # denoising steps per chunk; at most the training steps
    eta: float = 0.0  # DDIM's noise: 0 deterministic, 1 with every training step is DDPM
    execution: str = "receding"  # receding: n_action_steps per chunk | ensemble: a chunk every step, averaged
    n_action_steps: Optional[int] = None  # receding: actions executed per chunk (null: the config's)
    ensemble_decay: float = 0.01  # ensemble: the k-th oldest prediction of a step weighs exp(-decay * k) (ACT)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sampler not in SAMPLERS:
            raise ValueError(f"inference.sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"inference.execution must be one of {', '.join(EXECUTIONS)}, got {self.execution!r}")
        require_positive_int(self.num_inference_steps, "inference.num_inference_steps")
        if self.n_action_steps is not None:
            require_positive_int(self.n_action_steps, "inference.n_action_steps")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"inference.eta must be in [0, 1], got {self.eta}")
        if not self.ensemble_decay >= 0.0:
            raise ValueError(f"inference.ensemble_decay must be >= 0, got {self.ensemble_decay}")


def diffusion_recipe() -> Recipe:
    # diffusion_policy's transformer low-dim recipe (AdamW, betas (0.9, 0.95), weight decay 1e-3 on
    # weights only, cosine schedule with warm-up, EMA, batch 256) at lr 1e-3 instead of its 1e-4:
    # with the sample prediction below it learns within a CPU budget (benchmarks/diffusion_recipe.py).
    return Recipe(batch_size=256, optimizer="adamw", lr=1.0e-3, betas=(0.9, 0.95), weight_decay=1.0e-3,
                  decay_all_parameters=False, schedule="cosine", warmup_steps=500, ema=True)


@dataclass
class DiffusionConfig:
    horizon: int = 16  # T: actions per chunk
    n_obs_steps: int = 2  # To: observations the chunk is conditioned on
    n_action_steps: int = 2  # Ta: actions executed per chunk (receding horizon); diffusion_policy's is 8, see the README
    embed_dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_ratio: int = 4
    dropout: float = 0.0
    causal: bool = False  # causal attention over the chunk (diffusion_policy's transformer) instead of full (DiT-policy)
    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    # sample: predict the clean chunk (diffusion_policy predicts the noise, epsilon); within 1,500 steps
    # its sampled actions come within 10% of an ideal sampler's error, epsilon's over 4x off (diffusion_recipe)
    prediction_type: str = "sample"  # sample | epsilon
    clip_sample: bool = True  # clip the predicted clean chunk to [-1, 1] at every sampling step
    recipe: Recipe = field(default_factory=diffusion_recipe)
    inference: DiffusionInference = field(default_factory=DiffusionInference)

    def __post_init__(self) -> None:
        for key in ("horizon", "n_obs_steps", "n_action_steps", "embed_dim", "n_layers", "n_heads", "mlp_ratio",
                    "num_train_timesteps"):
            require_positive_int(getattr(self, key), key)
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_obs_steps > self.horizon:
            raise ValueError(f"n_obs_steps ({self.n_obs_steps}) must be at most horizon ({self.horizon})")
        executable = self.horizon - self.n_obs_steps + 1
        for key, value in (("n_action_steps", self.n_action_steps), ("inference.n_action_steps", self.inference.n_action_steps)):
            if value is not None and value > executable:
                raise ValueError(
                    f"{key} ({value}) must be at most horizon - n_obs_steps + 1 ({executable}): the chunk's actions from "
                    f"index n_obs_steps - 1 on are the ones to execute"
                )
        if self.inference.num_inference_steps > self.num_train_timesteps:
            raise ValueError(
                f"inference.num_inference_steps ({self.inference.num_inference_steps}) must be at most "
                f"num_train_timesteps ({self.num_train_timesteps}), the steps the model was trained with"
            )
        if self.beta_schedule not in BETA_SCHEDULES:
            raise ValueError(f"beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {self.beta_schedule!r}")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {', '.join(PREDICTION_TYPES)}, got {self.prediction_type!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def executable_steps(self) -> int:
        """Chunk entries from index To - 1 on: the current step's action and the ones after it."""
        return self.horizon - self.n_obs_steps + 1


def make_noise_scheduler(config: DiffusionConfig, sampler: str = "ddpm") -> Any:
    """A diffusers scheduler for ``config``'s noise schedule: ``ddpm`` (training, and reference sampling),
    ``ddim`` or ``dpmsolver`` (DPM-Solver++ 2M)."""
    try:
        from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
    except ImportError as error:
        raise ImportError(
            "policy=diffusion needs diffusers' noise schedulers: pip install 'kinema[diffusion]' (or diffusers>=0.30)"
        ) from error
    common = {"num_train_timesteps": config.num_train_timesteps, "beta_schedule": config.beta_schedule,
              "prediction_type": config.prediction_type}
    if sampler == "ddpm":
        return DDPMScheduler(**common, clip_sample=config.clip_sample, variance_type="fixed_small")
    if sampler == "ddim":
        return DDIMScheduler(**common, clip_sample=config.clip_sample, set_alpha_to_one=True, steps_offset=0)
    if sampler == "dpmsolver":
        # DPM-Solver++ has no clip_sample; the chunk is clamped to [-1, 1] after the last step.
        return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown sampler {sampler!r}; choose one of ddpm, {', '.join(SAMPLERS)}")


def timestep_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding (B, dim) of integer diffusion timesteps (B,)."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    angles = timesteps.float()[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=-1)
    return F.pad(embedding, (0, dim % 2))


def init_weights(module: nn.Module) -> None:
    """GPT-2's initialisation (N(0, 0.02) weights, zero biases); the LayerNorms here have no parameters."""
    if not isinstance(module, nn.LayerNorm):
        init_gpt_weights(module)


class AdaLNBlock(nn.Module):
    """Pre-LN transformer block whose LayerNorms are modulated by the condition (adaLN-Zero).

    Its shift, scale and gate of the attention and of the MLP come precomputed (``ChunkDenoiser.condition``).
    """

    def __init__(self, embed_dim: int, n_heads: int, mlp_ratio: int, dropout: float):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, embed_dim // n_heads
        self.norm1 = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.norm2 = nn.LayerNorm(embed_dim, elementwise_affine=False)
        self.fc = nn.Linear(embed_dim, mlp_ratio * embed_dim)
        self.fc_out = nn.Linear(mlp_ratio * embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, modulation: torch.Tensor, causal: bool, backend: Optional[str]) -> torch.Tensor:
        """``x`` (B, T, D); ``modulation`` (B, 6D): shift, scale, gate of the attention, then of the MLP."""
        shift1, scale1, gate1, shift2, scale2, gate2 = modulation.unsqueeze(1).chunk(6, dim=-1)
        batch, tokens, dim = x.shape
        qkv = self.qkv(torch.addcmul(shift1, self.norm1(x), 1.0 + scale1))
        q, k, v = qkv.view(batch, tokens, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(q, k, v, causal=causal, backend=backend).transpose(1, 2).reshape(batch, tokens, dim)
        x = x + gate1 * self.dropout(self.proj(out))
        hidden = F.gelu(self.fc(torch.addcmul(shift2, self.norm2(x), 1.0 + scale2)), approximate="tanh")
        return x + gate2 * self.dropout(self.fc_out(hidden))


class ChunkDenoiser(nn.Module):
    """(noisy chunk, timestep, observation encoding) -> predicted noise (or clean chunk).

    The adaLN parameters of every block and of the output layer depend on the condition only, so one
    matmul (``condition``) produces them all; sampling computes them for every denoising step of a
    chunk at once, and each step then runs the action tokens alone (``denoise``).
    """

    def __init__(self, config: DiffusionConfig, obs_dim: int, act_dim: int):
        super().__init__()
        dim = config.embed_dim
        self.causal = config.causal
        self.obs_encoder = nn.Sequential(nn.Linear(config.n_obs_steps * obs_dim, dim), nn.Mish(), nn.Linear(dim, dim))
        self.time_mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.Mish(), nn.Linear(4 * dim, dim))
        # 6 per block (shift, scale, gate of attention and MLP), 2 for the output layer (shift, scale)
        self.modulation = nn.Linear(dim, (6 * config.n_layers + 2) * dim)
        self.action_in = nn.Linear(act_dim, dim)
        self.position = nn.Embedding(config.horizon, dim)  # learned, one per chunk index
        self.blocks = nn.ModuleList(AdaLNBlock(dim, config.n_heads, config.mlp_ratio, config.dropout) for _ in range(config.n_layers))
        self.final_norm = nn.LayerNorm(dim, elementwise_affine=False)
        self.action_out = nn.Linear(dim, act_dim)
        self.apply(init_weights)
        # adaLN-Zero: every block starts as the identity and the output at zero (DiT).
        for layer in (self.modulation, self.action_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def encode_observations(self, observations: torch.Tensor) -> torch.Tensor:
        """Normalised observations (B, To, obs_dim) -> (B, D), computed once per chunk."""
        return self.obs_encoder(observations.flatten(1))

    def condition(self, obs_encoding: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """adaLN parameters (..., (6 L + 2) D) for encodings (..., D) at integer timesteps broadcast against them."""
        time = self.time_mlp(timestep_embedding(timesteps.reshape(-1), obs_encoding.shape[-1]))
        time = time.reshape(*timesteps.shape, -1)
        return self.modulation(F.silu(obs_encoding + time))

    def denoise(self, noisy: torch.Tensor, modulation: torch.Tensor, backend: Optional[str] = None) -> torch.Tensor:
        """Noisy chunks (B, T, A) under adaLN parameters (B, (6 L + 2) D) from ``condition``."""
        dim = self.action_in.out_features
        x = self.action_in(noisy) + self.position.weight[: noisy.shape[1]]
        for index, block in enumerate(self.blocks):
            x = block(x, modulation[:, 6 * dim * index : 6 * dim * (index + 1)], self.causal, backend)
        shift, scale = modulation[:, -2 * dim :].unsqueeze(1).chunk(2, dim=-1)
        return self.action_out(torch.addcmul(shift, self.final_norm(x), 1.0 + scale))

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, obs_encoding: torch.Tensor,
                backend: Optional[str] = None) -> torch.Tensor:
        return self.denoise(noisy, self.condition(obs_encoding, timesteps), backend)


@register_policy
class DiffusionPolicy(Policy):
    name = "diffusion"
    label = "Diffusion"
    config_class = DiffusionConfig
    required_stats = {"actions": ("min", "max")}

    def __init__(self, config: DiffusionConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        low, high = stats.get("actions", "min"), stats.get("actions", "max")
        if low.shape != (spec.act_dim,) or (high < low).any():
            raise ValueError(
                f"{stats.source}: actions.min/max must be {spec.act_dim} values with min <= max, got {low.tolist()} / {high.tolist()}"
            )
        half_range = (high - low) / 2.0
        self.register_buffer("action_center", torch.as_tensor((high + low) / 2.0, dtype=torch.float32), persistent=False)
        self.register_buffer(
            "action_half_range", torch.as_tensor(np.where(half_range < ACTION_RANGE_EPS, 1.0, half_range), dtype=torch.float32),
            persistent=False,
        )
        self.denoiser = ChunkDenoiser(config, spec.obs_dim, spec.act_dim)
        self.train_scheduler = make_noise_scheduler(config, "ddpm")
        self._sampling = None  # (sampler name, its scheduler), rebuilt when inference.sampler changes

    # -- normalisation ----------------------------------------------------------------------
    def normalize_actions(self, actions: torch.Tensor) -> torch.Tensor:
        return (actions - self.action_center) / self.action_half_range

    def unnormalize_actions(self, normalized: torch.Tensor) -> torch.Tensor:
        """Normalised actions back to task units, clipped to the action box."""
        actions = normalized * self.action_half_range + self.action_center
        return torch.maximum(torch.minimum(actions, self.action_high), self.action_low)

    # -- training ---------------------------------------------------------------------------
    @property
    def batch_spec(self) -> BatchSpec:
        config = self.config
        return BatchSpec("chunks", context_len=config.horizon,
                         options={"n_obs_steps": config.n_obs_steps, "n_action_steps": config.n_action_steps})

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        clean = self.normalize_actions(batch["actions"]).clamp(-1.0, 1.0)
        obs_encoding = self.denoiser.encode_observations(self.normalize_obs(batch["observations"]))
        noise = torch.randn_like(clean)
        timesteps = torch.randint(0, self.config.num_train_timesteps, (clean.shape[0],), device=clean.device)
        noisy = self.train_scheduler.add_noise(clean, noise, timesteps)
        predicted = self.denoiser(noisy, timesteps, obs_encoding)
        target = noise if self.config.prediction_type == "epsilon" else clean
        loss = F.mse_loss(predicted, target)
        return loss, {"denoising_mse": loss.item()}

    # -- sampling ---------------------------------------------------------------------------
    def configure_inference(self, **overrides: Any) -> None:
        previous = self.inference
        super().configure_inference(**overrides)
        try:  # the config's checks (steps against training steps, n_action_steps against the chunk) apply to overrides too
            self.config.__post_init__()
        except ValueError:
            self.inference = self.config.inference = previous
            raise

    def _sampling_scheduler(self) -> Any:
        sampler = self.inference.sampler
        if self._sampling is None or self._sampling[0] != sampler:
            self._sampling = (sampler, make_noise_scheduler(self.config, sampler))
        return self._sampling[1]

    def sample_chunks(self, obs_normalized: torch.Tensor, noise: torch.Tensor, committed: Optional[torch.Tensor] = None,
                      step_noise: Optional[Any] = None) -> torch.Tensor:
        """Denoise ``noise`` (B, T, A) into normalised chunks conditioned on (B, To, obs_dim) normalised observations.

        ``committed`` (B, P, A) normalised actions are inpainted at chunk indices To - 1 .. To + P - 2: before
        every denoising step they are written in noised to that step's level (with the initial noise of
        those entries), so the denoiser sees an input like those it was trained on, and after the last
        step they are written in exactly. (diffusion_policy writes them in clean at every step; the model
        never saw clean entries among noisy ones, and in ``benchmarks/chunk_seams.py`` that cost score.)
        ``step_noise(shape)`` draws DDIM's per-step noise when ``eta`` > 0.
        """
        options = self.inference
        scheduler = self._sampling_scheduler()
        scheduler.set_timesteps(options.num_inference_steps, device=noise.device)
        obs_encoding = self.denoiser.encode_observations(obs_normalized)
        # every step's adaLN parameters in one call: (steps, B, ...)
        modulations = self.denoiser.condition(obs_encoding, scheduler.timesteps[:, None].to(noise.device))
        first = self.config.n_obs_steps - 1
        chunk = noise
        if committed is not None:
            span = slice(first, first + committed.shape[1])
            committed_noise = noise[:, span].clone()
        step_kwargs: dict[str, Any] = {}
        for modulation, timestep in zip(modulations, scheduler.timesteps):
            if committed is not None:
                chunk[:, span] = scheduler.add_noise(committed, committed_noise, timestep.reshape(1))
            predicted = self.denoiser.denoise(chunk, modulation, options.attention_backend)
            if options.sampler == "ddim":
                step_kwargs = {"eta": options.eta}
                if options.eta > 0 and step_noise is not None:
                    step_kwargs["variance_noise"] = step_noise(chunk.shape)
            chunk = scheduler.step(predicted, timestep, chunk, **step_kwargs).prev_sample
        if committed is not None:
            chunk[:, span] = committed
        return chunk.clamp(-1.0, 1.0)

    @torch.no_grad()
    def predict_chunk(self, observation_history: Any, committed_actions: Any = None,
                      noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The chunk-level call: (N, To, obs_dim) raw observations, oldest first -> (N, T, act_dim) actions.

        Entry To - 1 is the action for the newest observation's step. ``committed_actions`` (N, P,
        act_dim), P <= T - To + 1, are actions already sent for that step and the next P - 1: the
        chunk keeps them (inpainting). ``noise`` (N, T, act_dim) fixes the initial noise.
        """
        config = self.config
        history = torch.as_tensor(np.asarray(observation_history), dtype=torch.float32, device=self.device)
        expected = (config.n_obs_steps, self.spec.obs_dim)
        if history.ndim != 3 or tuple(history.shape[1:]) != expected:
            raise ValueError(f"predict_chunk: observation_history must have shape (N, {expected[0]}, {expected[1]}), got {tuple(history.shape)}")
        if not torch.isfinite(history).all():
            raise ValueError("predict_chunk: observation_history holds a non-finite value (NaN/inf)")
        batch = history.shape[0]
        committed = None
        if committed_actions is not None:
            committed = torch.as_tensor(np.asarray(committed_actions), dtype=torch.float32, device=self.device)
            if committed.ndim != 3 or committed.shape[0] != batch or committed.shape[2] != self.spec.act_dim \
                    or not 1 <= committed.shape[1] <= config.executable_steps:
                raise ValueError(
                    f"predict_chunk: committed_actions must have shape (N={batch}, P, {self.spec.act_dim}) with "
                    f"1 <= P <= {config.executable_steps}, got {tuple(committed.shape)}"
                )
            if not torch.isfinite(committed).all():
                raise ValueError("predict_chunk: committed_actions holds a non-finite value (NaN/inf)")
            committed = self.normalize_actions(committed).clamp(-1.0, 1.0)
        shape = (batch, config.horizon, self.spec.act_dim)
        if noise is None:
            noise = torch.randn(shape, device=self.device)
        elif tuple(noise.shape) != shape:
            raise ValueError(f"predict_chunk: noise must have shape {shape}, got {tuple(noise.shape)}")
        chunk = self.sample_chunks(self.normalize_obs(history), noise.to(self.device).clone(), committed,
                                   step_noise=lambda s: torch.randn(s, device=self.device))
        return self.unnormalize_actions(chunk)

    # -- rollouts ---------------------------------------------------------------------------
    def reset(self, num_envs: int, **conditioning: Any) -> None:
        if conditioning:
            raise ValueError(f"{self.name}.reset: unknown conditioning {sorted(conditioning)}; it takes none")
        self._rollout = _ChunkRollout(self, require_positive_int(num_envs, "num_envs"))

    def end_episode(self, env_indices: Any) -> None:
        """Those environments start a new episode: their observation history and queued actions are dropped."""
        state = self._state("end_episode")
        index = np.asarray(env_indices, dtype=np.int64).reshape(-1)
        if len(index) and (index.min() < 0 or index.max() >= state.num_envs):
            raise ValueError(f"{self.name}.end_episode: environment indices {index.tolist()} out of range 0..{state.num_envs - 1}")
        state.clear(index)

    def _state(self, caller: str) -> "_ChunkRollout":
        state = self.__dict__.get("_rollout")
        if state is None:
            raise RuntimeError(f"{self.name}.{caller} called before reset(num_envs)")
        return state

    @torch.no_grad()
    def act(self, observation: Any) -> torch.Tensor:
        state = self._state("act")
        obs = self.as_observation_tensor(observation)
        if obs.shape[0] != state.num_envs:
            raise ValueError(f"act() got {obs.shape[0]} observations after reset(num_envs={state.num_envs})")
        state.push_observations(self.normalize_obs(obs))
        if self.inference.execution == "receding":
            unit = state.next_receding_actions()
        else:
            unit = state.next_ensembled_actions()
        return self.unnormalize_actions(unit)

    # -- the per-step computation as pure tensor functions (Policy.step_functions) -------------------
    def step_functions(self) -> dict[str, Any]:
        """``sample`` and ``pop`` (receding) or ``ensemble``, DDIM only: DPM-Solver++ is multistep, its
        history kept by diffusers' scheduler on the host, so it is served through ``act``."""
        state = self._state("step_functions")
        if self.inference.sampler != "ddim":
            return {}
        state.build_fixed_sampler()

        def wrap(step: Any) -> Any:
            return lambda observations: self.unnormalize_actions(step(self.normalize_obs(observations)))

        if self.inference.execution == "ensemble":
            return {"ensemble": wrap(state.ensemble_step)}
        return {"sample": wrap(state.sample_step), "pop": wrap(state.pop_step)}

    def next_step_function(self) -> str:
        """The step to run next; its noise is drawn now, from the sampling environments' generators."""
        state = self._state("next_step_function")
        name = state.next_step_name()
        state.fill_noise(name)
        return name

    def count_step(self) -> None:
        self._state("count_step").count_step()

    def rollout_buffers(self) -> list[Any]:
        return self._state("rollout_buffers").buffers()


class FixedDDIM:
    """DDIM's update at a fixed number of steps as tensor arithmetic only, for the step functions.

    diffusers' ``DDIMScheduler.step`` reads the timestep on the host (``prev_timestep >= 0``), which a
    CUDA graph, ``torch.compile`` without graph breaks or an ONNX export cannot hold; this table takes
    the schedule from that scheduler once (timesteps, cumulative alphas) and repeats its arithmetic in
    its order, so the chunks are bit-identical to ``sample_chunks`` (tests/policies/test_diffusion.py).
    """

    def __init__(self, scheduler: Any, num_steps: int, eta: float, prediction_type: str, clip_sample: bool,
                 device: torch.device):
        scheduler.set_timesteps(num_steps, device=device)
        self.timesteps = scheduler.timesteps.clone()
        self.eta, self.prediction_type, self.clip_sample = float(eta), prediction_type, clip_sample
        jump = scheduler.config.num_train_timesteps // num_steps
        alphas = scheduler.alphas_cumprod.cpu()
        self.coefficients = []  # per step: 0-d tensors computed as diffusers computes them
        for timestep in self.timesteps.tolist():
            alpha = alphas[timestep]
            previous = timestep - jump
            alpha_previous = alphas[previous] if previous >= 0 else scheduler.final_alpha_cumprod.cpu()
            beta = 1 - alpha
            variance = ((1 - alpha_previous) / beta) * (1 - alpha / alpha_previous)
            std_dev = self.eta * variance ** 0.5
            values = {"sqrt_alpha": alpha ** 0.5, "sqrt_beta": beta ** 0.5, "sqrt_alpha_previous": alpha_previous ** 0.5,
                      "direction": (1 - alpha_previous - std_dev ** 2) ** 0.5, "std_dev": std_dev}
            self.coefficients.append({name: value.to(device) for name, value in values.items()})

    @property
    def num_steps(self) -> int:
        return len(self.coefficients)

    def step(self, index: int, model_output: torch.Tensor, sample: torch.Tensor, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """The chunk after denoising step ``index`` (DDIM's formula 12, with diffusers' clipping of the clean chunk)."""
        c = self.coefficients[index]
        if self.prediction_type == "epsilon":
            clean = (sample - c["sqrt_beta"] * model_output) / c["sqrt_alpha"]
            epsilon = model_output
        else:
            clean = model_output
            epsilon = (sample - c["sqrt_alpha"] * clean) / c["sqrt_beta"]
        if self.clip_sample:
            clean = clean.clamp(-1.0, 1.0)
        previous = c["sqrt_alpha_previous"] * clean + c["direction"] * epsilon
        if self.eta > 0:
            previous = previous + c["std_dev"] * noise
        return previous


class _ChunkRollout:
    """Per-environment observation history, queued chunk (receding) or ensemble sums (ensemble).

    The device state (:attr:`TENSOR_STATE`) changes in place through tensor operations only, so the
    step functions can be captured or exported. The queue positions have a host copy: ``act`` samples
    only the environments whose queue is empty, and a runtime chooses between the ``sample`` and
    ``pop`` steps without reading the device. The step functions sample every environment at a fixed
    shape and keep the chunks of those whose queue is empty; their noise is drawn on the host into
    ``chunk_noise`` (and ``step_noise`` when eta > 0) by :meth:`fill_noise`, from each environment's
    own generator, as ``act`` draws it.
    """

    TENSOR_STATE = ("history", "started", "queue", "queue_position", "ensemble_sum", "ensemble_weight", "ensemble_count")

    def __init__(self, policy: DiffusionPolicy, num_envs: int):
        config, device = policy.config, policy.device
        self.policy, self.num_envs = policy, num_envs
        act_dim = policy.spec.act_dim
        self.history = torch.zeros(num_envs, config.n_obs_steps, policy.spec.obs_dim, device=device)
        self.started = torch.zeros(num_envs, dtype=torch.bool, device=device)  # an observation arrived since reset / end_episode
        self.n_action_steps = policy.inference.n_action_steps or config.n_action_steps
        self.queue = torch.zeros(num_envs, self.n_action_steps, act_dim, device=device)
        self.queue_position = torch.full((num_envs,), self.n_action_steps, dtype=torch.int64, device=device)  # == n_action_steps: empty
        self.host_queue_position = np.full(num_envs, self.n_action_steps)
        self.rows = torch.arange(num_envs, device=device)
        steps = config.executable_steps
        self.ensemble_sum = torch.zeros(num_envs, steps, act_dim, device=device)
        self.ensemble_weight = torch.zeros(num_envs, steps, device=device)
        self.ensemble_count = torch.zeros(num_envs, steps, device=device)
        self.chunk_noise = torch.zeros(num_envs, config.horizon, act_dim, device=device)
        self.step_noise = torch.zeros(0, num_envs, config.horizon, act_dim, device=device)
        self.ddim: Optional[FixedDDIM] = None  # built by step_functions

    def clear(self, index: np.ndarray) -> None:
        rows = torch.as_tensor(index, device=self.history.device)
        self.started[rows] = False
        self.queue_position[rows] = self.n_action_steps
        self.host_queue_position[index] = self.n_action_steps
        self.ensemble_sum[rows] = 0.0
        self.ensemble_weight[rows] = 0.0
        self.ensemble_count[rows] = 0.0

    def buffers(self) -> list[Any]:
        """Everything a step, a noise draw or an episode end changes (see ``Policy.rollout_buffers``)."""
        return [*self.tensor_state(), self.chunk_noise, self.step_noise, self.host_queue_position]

    def tensor_state(self) -> list[torch.Tensor]:
        return [getattr(self, name) for name in self.TENSOR_STATE]

    def adopt(self, tensors: list[torch.Tensor]) -> None:
        """Use ``tensors`` (as :meth:`tensor_state` lists them) as the state from now on (the ONNX exporter)."""
        for name, tensor in zip(self.TENSOR_STATE, tensors):
            setattr(self, name, tensor)

    def push_observations(self, normalized: torch.Tensor) -> None:
        """Slide each history by one; an environment's first observation fills its whole history (training's padding)."""
        slid = torch.cat([self.history[:, 1:], normalized[:, None]], dim=1)
        self.history.copy_(torch.where(self.started[:, None, None], slid, normalized[:, None].expand_as(slid)))
        self.started.fill_(True)

    def draw_noise(self, index: np.ndarray) -> torch.Tensor:
        """Standard normal (len(index), T, A) drawn from those environments' own generators only.

        ``Policy.episode_noise`` draws for every slot; here only the environments that sample a chunk
        may advance their streams, or one environment's noise would depend on when the others resample.
        """
        policy = self.policy
        shape = (policy.config.horizon, policy.spec.act_dim)
        generators = policy.__dict__.get("_episode_generators", {})  # filled by Policy.seed_episodes
        rows = [torch.randn(shape, generator=generators[i]) if i in generators else torch.randn(shape) for i in index.tolist()]
        return torch.stack(rows).to(policy.device)

    def sample(self, index: np.ndarray) -> torch.Tensor:
        """Normalised chunks (len(index), T, A) for those environments, from their own noise generators."""
        rows = torch.as_tensor(index, device=self.history.device)
        return self.policy.sample_chunks(self.history[rows], self.draw_noise(index), step_noise=lambda _: self.draw_noise(index))

    def pop_actions(self) -> torch.Tensor:
        """Each environment's next queued action; an empty queue (just refilled) starts from its first."""
        self.queue_position.masked_fill_(self.queue_position >= self.n_action_steps, 0)
        actions = self.queue[self.rows, self.queue_position]
        self.queue_position.add_(1)
        return actions

    def count_step(self) -> None:
        """The host copy of :meth:`pop_actions`' position update."""
        positions = self.host_queue_position
        positions[positions >= self.n_action_steps] = 0
        positions += 1

    def next_receding_actions(self) -> torch.Tensor:
        empty = np.flatnonzero(self.host_queue_position >= self.n_action_steps)
        if len(empty):
            first = self.policy.config.n_obs_steps - 1
            chunks = self.sample(empty)
            self.queue[torch.as_tensor(empty, device=self.queue.device)] = chunks[:, first : first + self.n_action_steps]
        actions = self.pop_actions()
        self.count_step()
        return actions

    def next_ensembled_actions(self) -> torch.Tensor:
        first = self.policy.config.n_obs_steps - 1
        return self.ensemble(self.sample(np.arange(self.num_envs))[:, first:])

    def ensemble(self, predictions: torch.Tensor) -> torch.Tensor:
        """Add this step's predictions (N, steps, A; entry 0 is for this step) and return the weighted means for this step."""
        weights = torch.exp(-self.policy.inference.ensemble_decay * self.ensemble_count)
        self.ensemble_sum += weights.unsqueeze(-1) * predictions
        self.ensemble_weight += weights
        self.ensemble_count += 1.0
        actions = self.ensemble_sum[:, 0] / self.ensemble_weight[:, :1]
        # the next step's predictions move to the front
        for buffer in (self.ensemble_sum, self.ensemble_weight, self.ensemble_count):
            buffer[:] = torch.roll(buffer, -1, dims=1)
            buffer[:, -1] = 0.0
        return actions

    # -- the step functions: fixed shapes, every environment sampled, noise filled beforehand -----------
    def build_fixed_sampler(self) -> None:
        policy, options = self.policy, self.policy.inference
        self.ddim = FixedDDIM(policy._sampling_scheduler(), options.num_inference_steps, options.eta,
                              policy.config.prediction_type, policy.config.clip_sample, policy.device)
        steps = self.ddim.num_steps if options.eta > 0 else 0
        if self.step_noise.shape[0] != steps:
            self.step_noise = torch.zeros(steps, *self.chunk_noise.shape, device=self.chunk_noise.device)

    def sampled_chunks(self) -> torch.Tensor:
        """Normalised chunks (N, T, A) for every environment from the filled noise: ``sample_chunks``' arithmetic."""
        policy, ddim = self.policy, self.ddim
        denoiser = policy.denoiser
        modulations = denoiser.condition(denoiser.encode_observations(self.history), ddim.timesteps[:, None])
        chunk = self.chunk_noise
        for index in range(ddim.num_steps):
            predicted = denoiser.denoise(chunk, modulations[index], policy.inference.attention_backend)
            chunk = ddim.step(index, predicted, chunk, self.step_noise[index] if ddim.eta > 0 else None)
        return chunk.clamp(-1.0, 1.0)

    def sample_step(self, normalized: torch.Tensor) -> torch.Tensor:
        """Receding horizon, some queue empty: every environment samples; those with an empty queue keep the chunk."""
        self.push_observations(normalized)
        first = self.policy.config.n_obs_steps - 1
        chunks = self.sampled_chunks()[:, first : first + self.n_action_steps]
        empty = (self.queue_position >= self.n_action_steps)[:, None, None]
        self.queue.copy_(torch.where(empty, chunks, self.queue))
        return self.pop_actions()

    def pop_step(self, normalized: torch.Tensor) -> torch.Tensor:
        """Receding horizon, no queue empty: the next queued actions."""
        self.push_observations(normalized)
        return self.pop_actions()

    def ensemble_step(self, normalized: torch.Tensor) -> torch.Tensor:
        self.push_observations(normalized)
        first = self.policy.config.n_obs_steps - 1
        return self.ensemble(self.sampled_chunks()[:, first:])

    def next_step_name(self) -> str:
        if self.policy.inference.execution == "ensemble":
            return "ensemble"
        return "sample" if (self.host_queue_position >= self.n_action_steps).any() else "pop"

    def fill_noise(self, name: str) -> None:
        """Draw the noise the step ``name`` consumes, for the environments that sample, in ``act``'s order
        (each environment's initial noise, then per denoising step)."""
        if name == "pop":
            return
        index = np.arange(self.num_envs) if name == "ensemble" else np.flatnonzero(self.host_queue_position >= self.n_action_steps)
        rows = torch.as_tensor(index, device=self.chunk_noise.device)
        self.chunk_noise[rows] = self.draw_noise(index)
        for step_noise in self.step_noise:
            step_noise[rows] = self.draw_noise(index)
