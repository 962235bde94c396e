"""The inference runtime: a checkpoint loaded for serving at a fixed batch size, warmed up, acting step by step.

:class:`PolicyRuntime` loads a checkpoint (EMA weights where saved), starts ``batch_size`` rollouts
and preallocates the observation buffer. On a CUDA device it captures each of the policy's pure
per-step functions (``Policy.step_functions``: DT's decode and, for exact full-context models,
recompute; the diffusion policy's chunk sampling and queue pop; BC's, BoT's and PPO's forward) in a CUDA graph with static input, output and state
buffers, and replays them; nothing is captured again after warm-up, and an input of another shape is
refused rather than silently re-captured. On a CPU it calls the same step functions eagerly, or
compiled by ``torch.compile`` (``compile=True``: compiled during warm-up, tens of seconds; a recompile
afterwards raises, and changing torch's thread count after warm-up is one: set it first). A policy
without step functions (the diffusion policy with DPM-Solver++, whose multistep history lives in
diffusers' scheduler) is served through ``act``.

Warm-up and capture run the steps on zero observations; the rollout's state is snapshotted before
and restored after (``Policy.rollout_buffers``), in place, so the first served action is exactly what
a freshly reset policy would return. Single environments restart through ``end_episode`` without
touching the graphs.

Observations are checked before they reach the policy: the wrong shape, or a non-finite value, is
refused naming the environment and the index.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kinema.policies import Policy

WARMUP_STEPS = 3


class PolicyRuntime:
    """A checkpoint (or a policy in memory) served at ``batch_size``: ``act``, ``observe_reward``,
    ``end_episode``, ``reset``; ``path`` says how it computes (see the module docstring)."""

    def __init__(self, checkpoint: Any, batch_size: int = 1, device: str | torch.device = "cpu",
                 attention_backend: str | None = None, cuda_graphs: bool | None = None,
                 target_return: float | None = None, warmup_steps: int = WARMUP_STEPS, compile: bool = False,
                 step_functions: bool = True, inference: dict[str, Any] | None = None):
        from kinema.train.checkpoint import LoadedCheckpoint, load_checkpoint

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.device = torch.device(device)
        if isinstance(checkpoint, Policy):  # a policy in memory (benchmarks, tests); its evaluation target is not known
            self.policy, self.recorded_eval = checkpoint.to(self.device).eval(), {}
            self.source: dict[str, Any] = {"task": None, "checkpoint": None, "step": None}
        else:  # a checkpoint directory, or one already loaded
            loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint, device=self.device, use_ema=True)
            self.policy, self.recorded_eval = loaded.policy.to(self.device).eval(), loaded.config.get("eval") or {}
            self.source = {"task": loaded.task, "checkpoint": str(loaded.path), "step": loaded.step}
        overrides = dict(inference or {}, **({"attention_backend": attention_backend} if attention_backend is not None else {}))
        if overrides:  # inference options (e.g. the diffusion policy's num_inference_steps), before warm-up
            self.policy.configure_inference(**overrides)
        self.batch_size = batch_size
        self.obs_dim, self.act_dim = self.policy.spec.obs_dim, self.policy.spec.act_dim
        self.conditioning = self._conditioning(target_return)
        self.policy.reset(batch_size, **self.conditioning)
        functions = self.policy.step_functions() if step_functions else {}  # False: serve through the policy's act
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and bool(functions)
        if cuda_graphs and self.device.type != "cuda":
            raise ValueError(f"cuda_graphs=True needs a CUDA device, got {self.device}")
        if cuda_graphs and not functions:
            raise ValueError(f"the {self.policy.name!r} policy has no pure step functions to capture; serve it with cuda_graphs=False")
        if compile and cuda_graphs:
            raise ValueError("compile=True and cuda_graphs=True are two different paths; choose one")
        if compile and not functions:
            raise ValueError(f"the {self.policy.name!r} policy has no pure step functions to compile")
        if compile:  # compiled during the warm-up below, whose effect on the state is undone
            functions = {name: torch.compile(function, dynamic=False) for name, function in functions.items()}
        self.compiled = bool(compile)
        self.initial_state = self._snapshot()  # the freshly reset rollout, restored after warm-up and by reset()
        self.observations = torch.zeros(batch_size, self.obs_dim, device=self.device)
        self.functions = functions
        self.graphs: dict[str, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        with torch.no_grad():
            if cuda_graphs:
                self._capture(functions, warmup_steps)
            elif functions:
                for name, function in functions.items():
                    for _ in range(warmup_steps):
                        function(self.observations)
                self._restore(self.initial_state)
            else:
                self._warm_up(warmup_steps)

    @property
    def path(self) -> str:
        """``cuda_graph`` (replayed graphs), ``compiled`` (the pure steps through torch.compile), ``step_functions``
        (the pure steps, eagerly) or ``act`` (the policy's act)."""
        if self.graphs:
            return "cuda_graph"
        return ("compiled" if self.compiled else "step_functions") if self.functions else "act"

    def _conditioning(self, target_return: float | None) -> dict[str, Any]:
        if "target_return" not in self.policy.conditioning:
            if target_return is not None:
                raise ValueError(f"the {self.policy.name!r} policy takes no target return; leave target_return unset")
            return {}
        if target_return is None:
            recorded = self.recorded_eval.get("target_return")
            target_return = getattr(self.policy.inference, "target_return", None) or recorded
        try:
            value = float(target_return)
        except (TypeError, ValueError):
            raise ValueError(f"the {self.policy.name!r} policy needs a target return: pass target_return=<number> "
                             f"(the checkpoint records {target_return!r})") from None
        if not np.isfinite(value):
            raise ValueError(f"target_return must be finite, got {target_return!r}")
        return {"target_return": value}

    def _snapshot(self) -> list[Any]:
        return [buffer.clone() if isinstance(buffer, torch.Tensor) else buffer.copy() for buffer in self.policy.rollout_buffers()]

    def _restore(self, snapshot: list[Any]) -> None:
        for buffer, saved in zip(self.policy.rollout_buffers(), snapshot):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(saved)
            else:
                np.copyto(buffer, saved)

    def _warm_up(self, steps: int) -> None:
        zeros = np.zeros((self.batch_size, self.obs_dim), dtype=np.float32)
        for _ in range(steps):
            self.policy.act(zeros)
        self.policy.reset(self.batch_size, **self.conditioning)  # eager: a fresh rollout is free

    def _capture(self, functions: dict[str, Any], steps: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up on a side stream, as CUDA graph capture requires
            for function in functions.values():
                for _ in range(max(steps, 1)):
                    function(self.observations)
        torch.cuda.current_stream().wait_stream(side)
        for name, function in functions.items():
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                output = function(self.observations)
            self.graphs[name] = (graph, output)
        self._restore(self.initial_state)
        torch.cuda.synchronize()

    def check_observations(self, observations: Any) -> np.ndarray:
        array = np.asarray(observations, dtype=np.float32)
        if array.shape != (self.batch_size, self.obs_dim):
            raise ValueError(f"observations must have shape ({self.batch_size}, {self.obs_dim}) (batch_size, obs_dim), "
                             f"got {array.shape}")
        bad = np.argwhere(~np.isfinite(array))
        if len(bad):
            env, index = bad[0].tolist()
            raise ValueError(f"observation of environment {env} has a non-finite value at index {index} "
                             f"({array[env, index]}); {len(bad)} non-finite value(s) in all; refused")
        return array

    @torch.no_grad()
    def act(self, observations: Any) -> np.ndarray:
        """Actions (batch_size, act_dim) for observations (batch_size, obs_dim)."""
        array = self.check_observations(observations)
        if not self.functions:
            return np.asarray(self.policy.act(array).cpu())
        self.observations.copy_(torch.from_numpy(array))
        name = self.policy.next_step_function()
        if self.graphs:
            graph, output = self.graphs[name]
            graph.replay()
        elif self.compiled:  # a recompile after warm-up is an error, not a silent slowdown
            with torch.compiler.set_stance("fail_on_recompile"):
                output = self.functions[name](self.observations)
        else:
            output = self.functions[name](self.observations)
        self.policy.count_step()
        return output.cpu().numpy()

    def reset(self) -> None:
        """Every environment starts afresh: the rollout state as right after loading, restored in place
        (graphs stay valid); a family served through ``act`` is reset."""
        if self.functions:
            self._restore(self.initial_state)
        else:
            self.policy.reset(self.batch_size, **self.conditioning)

    def observe_reward(self, rewards: Any) -> None:
        self.policy.observe_reward(rewards)

    def end_episode(self, env_indices: Any) -> None:
        """These environments start a new episode (or trial); the others and the graphs are untouched."""
        self.policy.end_episode(env_indices)

    def seed_episodes(self, env_indices: Any, seeds: Any) -> None:
        self.policy.seed_episodes(env_indices, seeds)
