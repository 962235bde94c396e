"""ONNX export of a policy's per-step computation, and serving the exported file with ONNX Runtime.

``export_onnx(checkpoint, path, batch_size)`` writes the policy's pure step function (observations
(batch, obs_dim) float32 -> actions (batch, act_dim) float32, in the task's units) at a fixed batch
size, with the normalisation statistics and weights inside the file, plus ``<path>.json`` naming
the inputs, outputs, shapes and the checkpoint it came from. ``examples/onnx_inference.py`` runs
such a file with onnxruntime alone.

Supported: the stateless families (BC, BoT, the PPO actor), whose step is one function of the
current observation, and the Decision and Agentic Transformers, whose step also takes the reward of
the previous step and the rollout state, and returns the new state:

    (observations, rewards, state...) -> (actions, state...)

The state tensors are listed in ``<path>.json`` (name, shape, dtype) and their values at the start of
an episode are written to ``<path>.state.npz``; ``rewards`` is zero at an episode's first step. To
restart one environment, copy its rows of the initial state (dimension 0 of every tensor but
``write_group``, a scalar, and ``cache``, whose batch dimension is 1). An exact full-context DT
(``attention_window: 0``) recomputes its whole window once its context slides: that step is a second
graph, ``<name>.recompute.onnx``, with the same inputs and outputs; ``<path>.json`` says when to run
it (``recompute``: once any environment's context holds ``context_steps`` steps), and
:class:`OnnxPolicy` follows that rule. The diffusion policy keeps its chunk queue on the host: it is
refused by name for now.

Needs the ``onnx`` extra (``pip install ".[onnx]"``: onnx, onnxscript for the exporter, onnxruntime).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

OPSET = 18


class _StepModule(torch.nn.Module):
    def __init__(self, policy: Any):
        super().__init__()
        self.policy = policy

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.policy.step(observations)


class _StatefulStepModule(torch.nn.Module):
    """(observations, rewards, *state) -> (actions, *new state): the rollout adopts copies of the inputs."""

    def __init__(self, policy: Any, function: str = "decode"):
        super().__init__()
        self.policy = policy
        self.rollout = policy._rollout
        self.step = policy.step_functions()[function]

    def forward(self, observations: torch.Tensor, rewards: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        copies = [tensor.clone() for tensor in state]
        self.rollout.adopt(copies)
        self.rollout.observe_reward(rewards)
        return (self.step(observations), *copies)


def export_onnx(checkpoint: str | Path, path: str | Path, batch_size: int = 1, target_return: float | None = None) -> dict[str, Any]:
    """Write the checkpoint's step function as ONNX at ``batch_size``; returns the description written beside it."""
    from kinema.sim2real.runtime import PolicyRuntime

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    runtime = PolicyRuntime(checkpoint, batch_size=batch_size, target_return=target_return, warmup_steps=0)
    policy = runtime.policy
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    observations = torch.zeros(batch_size, policy.spec.obs_dim)
    state_spec: list[dict[str, Any]] = []
    if policy.stateless:
        module, example, inputs, outputs = _StepModule(policy), (observations,), ["observations"], ["actions"]
    else:
        rollout = policy.__dict__.get("_rollout")
        if not set(policy.step_functions()) <= {"decode", "recompute"} or not hasattr(rollout, "adopt"):
            raise ValueError(f"ONNX export of this {policy.name!r} policy is not available: it keeps its rollout state on the host"
                             "; stateless families (bc, bot, ppo) and DT/AT export")
        initial = [tensor.clone() for tensor in rollout.tensor_state()]
        names = [*rollout.TENSOR_STATE, "cache"]
        state_spec = [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                      for name, tensor in zip(names, initial)]
        example = (observations, torch.zeros(batch_size, dtype=torch.float64), *initial)
        inputs = ["observations", "rewards", *names]
        outputs = ["actions", *(f"{name}_next" for name in names)]
        np.savez(path.with_suffix(path.suffix + ".state.npz"), **{name: tensor.numpy() for name, tensor in zip(names, initial)})
    graphs = {"decode": path}
    if state_spec and "recompute" in policy.step_functions():
        graphs["recompute"] = recompute_graph_path(path)
    try:
        for function, graph_path in graphs.items():
            if state_spec:
                module = _StatefulStepModule(policy, function)
            with torch.no_grad():
                torch.onnx.export(module, example, str(graph_path), input_names=inputs, output_names=outputs,
                                  opset_version=OPSET, dynamo=True, verbose=False)
            if state_spec:
                policy._rollout.adopt(runtime.initial_state[: len(state_spec)])  # the tracer's tensors out, the real ones back
    finally:
        if state_spec:
            policy._rollout.adopt(runtime.initial_state[: len(state_spec)])
    description = {
        "format": "kinema-onnx-policy/1", "policy": policy.name, **runtime.source, "opset": OPSET,
        "inputs": {"observations": {"shape": [batch_size, policy.spec.obs_dim], "dtype": "float32", "units": "raw observations"}},
        "outputs": {"actions": {"shape": [batch_size, policy.spec.act_dim], "dtype": "float32",
                                "units": "the task's action units, within its action box"}},
        "action_low": list(policy.spec.action_low), "action_high": list(policy.spec.action_high),
        "state": state_spec, "conditioning": runtime.conditioning,
    }
    if state_spec:
        description["inputs"]["rewards"] = {"shape": [batch_size], "dtype": "float64", "units": "reward of the previous step (0 at an episode's first)"}
        description["initial_state"] = path.name + ".state.npz"
    if "recompute" in graphs:
        rollout = policy._rollout
        # the host's rule (DT's decodes_next_step): decode while every context holds fewer than `context_steps`
        # steps (a step count per environment: +1 per step, up to context_steps; 0 after a restart), else recompute
        description["recompute"] = {"graph": graphs["recompute"].name, "context_steps": int(rollout.groups),
                                    "always": not bool(policy.inference.use_kv_cache)}
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def recompute_graph_path(path: Path) -> Path:
    """Where an exact full-context DT's window-recompute step goes, beside its decode step."""
    return path.with_name(path.stem + ".recompute" + path.suffix)


class OnnxPolicy:
    """An exported step served by ONNX Runtime (CPU), with the runtime's input checks; for a stateful
    export it keeps the state between calls and restarts single environments from the initial state."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        path = Path(path)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        self.batch_size, self.obs_dim = int(shape[0]), int(shape[1])
        self.state_names = [value.name for value in self.session.get_inputs()[2:]]
        self.initial: dict[str, np.ndarray] = {}
        if self.state_names:
            with np.load(path.with_suffix(path.suffix + ".state.npz")) as saved:
                self.initial = {name: saved[name] for name in self.state_names}
        self.state = {name: value.copy() for name, value in self.initial.items()}
        self.rewards = np.zeros(self.batch_size)
        description = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        recompute = description.get("recompute")
        self.recompute_session = None
        if recompute:  # an exact full-context DT: the window is recomputed once a context is full
            self.recompute_session = onnxruntime.InferenceSession(str(path.with_name(recompute["graph"])), options,
                                                                  providers=["CPUExecutionProvider"])
            self.context_steps, self.always_recompute = int(recompute["context_steps"]), bool(recompute["always"])
        self.steps = np.zeros(self.batch_size, dtype=np.int64)

    def act(self, observations: Any) -> np.ndarray:
        array = np.asarray(observations, dtype=np.float32)
        if array.shape != (self.batch_size, self.obs_dim):
            raise ValueError(f"observations must have shape ({self.batch_size}, {self.obs_dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("observations hold a non-finite value; refused")
        if not self.state_names:
            return self.session.run(None, {"observations": array})[0]
        session = self.session
        if self.recompute_session is not None and (self.always_recompute or self.steps.max() >= self.context_steps):
            session = self.recompute_session
        outputs = session.run(None, {"observations": array, "rewards": self.rewards, **self.state})
        self.state = dict(zip(self.state_names, outputs[1:]))
        self.rewards = np.zeros(self.batch_size)
        if self.recompute_session is not None:
            np.minimum(self.steps + 1, self.context_steps, out=self.steps)
        return outputs[0]

    def observe_reward(self, rewards: Any) -> None:
        self.rewards = self.rewards + np.asarray(rewards, dtype=np.float64).reshape(self.batch_size)

    def end_episode(self, env_indices: Any) -> None:
        """These environments start afresh: their rows of the initial state (the ring position and the
        cache are shared; the cleared context makes their old cache entries invisible)."""
        index = np.asarray(env_indices, dtype=np.int64).reshape(-1)
        for name in self.state_names:
            if name not in ("write_group", "cache"):
                self.state[name][index] = self.initial[name][index]
        self.rewards[index] = 0.0
        self.steps[index] = 0

    def seed_episodes(self, env_indices: Any, seeds: Any) -> None:
        """Deterministic policies: nothing to seed."""
