"""ONNX export of a policy's per-step computation, and serving the exported file with ONNX Runtime.

``export_onnx(checkpoint, path, batch_size)`` writes the policy's pure step function (observations
(batch, obs_dim) float32 -> actions (batch, act_dim) float32, in the task's units) at a fixed batch
size, with the normalisation statistics and weights inside the file, plus ``<path>.json`` naming
the inputs, outputs, shapes and the checkpoint it came from. ``examples/onnx_inference.py`` runs
such a file with onnxruntime alone.

Supported: the stateless families (BC, BoT, the PPO actor), whose step is one function of the
current observation; the Decision and Agentic Transformers, whose step also takes the reward of the
previous step and the rollout state, and returns the new state; and the diffusion policy (DDIM),
whose step takes the sampling noise instead of a reward:

    (observations, rewards, state...) -> (actions, state...)               DT, AT
    (observations, chunk_noise[, step_noise], state...) -> (actions, state...)   diffusion

The state tensors are listed in ``<path>.json`` (name, shape, dtype) and their values at the start of
an episode are written to ``<path>.state.npz``; ``rewards`` is zero at an episode's first step. To
restart one environment, copy its rows of the initial state (dimension 0 of every tensor but
``write_group``, a scalar, and ``cache``, whose batch dimension is 1). An exact full-context DT
(``attention_window: 0``) recomputes its whole window once its context slides: that step is a second
graph, ``<name>.recompute.onnx``, with the same inputs and outputs; ``<path>.json`` says when to run
it (``recompute``: once any environment's context holds ``context_steps`` steps), and
:class:`OnnxPolicy` follows that rule.

The diffusion graph samples a chunk for every environment (``chunk_noise``: standard normal, and
``step_noise`` per denoising step when eta > 0) and keeps it where that environment's queue of
``n_action_steps`` actions is empty; it is right at every step. On a step where no queue is empty,
``<name>.pop.onnx`` gives the same actions without sampling (``pop`` in ``<path>.json``: an
environment's queue is empty at its episode's first step and every ``n_action_steps`` steps after).

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
    """(observations, *host inputs, *state) -> (actions, *new state): the rollout adopts copies of the state.

    Host inputs: ``rewards`` (DT, AT: the previous step's reward) or the diffusion policy's noise buffers."""

    def __init__(self, policy: Any, function: str, host_inputs: list[str]):
        super().__init__()
        self.policy = policy
        self.rollout = policy._rollout
        self.step = policy.step_functions()[function]
        self.host_inputs = host_inputs

    def forward(self, observations: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        host, state = inputs[: len(self.host_inputs)], inputs[len(self.host_inputs) :]
        copies = [tensor.clone() for tensor in state]
        self.rollout.adopt(copies)
        for name, tensor in zip(self.host_inputs, host):
            if name == "rewards":
                self.rollout.observe_reward(tensor)
            else:  # noise, read by the step from the rollout
                setattr(self.rollout, name, tensor)
        return (self.step(observations), *copies)


def export_onnx(checkpoint: str | Path, path: str | Path, batch_size: int = 1, target_return: float | None = None,
                inference: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the checkpoint's step function as ONNX at ``batch_size`` (with ``inference`` overrides, e.g. the
    diffusion policy's ``num_inference_steps``); returns the description written beside it."""
    from kinema.sim2real.runtime import PolicyRuntime

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    runtime = PolicyRuntime(checkpoint, batch_size=batch_size, target_return=target_return, warmup_steps=0, inference=inference)
    policy = runtime.policy
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    observations = torch.zeros(batch_size, policy.spec.obs_dim)
    state_spec: list[dict[str, Any]] = []
    host_inputs: dict[str, torch.Tensor] = {}
    functions = runtime.functions
    if policy.stateless:
        module, example, inputs, outputs = _StepModule(policy).eval(), (observations,), ["observations"], ["actions"]
    else:
        rollout = policy.__dict__.get("_rollout")
        if not functions or not hasattr(rollout, "adopt"):
            raise ValueError(f"ONNX export of this {policy.name!r} policy is not available: it keeps its rollout state on the host"
                             " (the diffusion policy exports with inference.sampler=ddim)")
        initial = [tensor.clone() for tensor in rollout.tensor_state()]
        names = [*rollout.TENSOR_STATE, *(["cache"] if len(initial) > len(rollout.TENSOR_STATE) else [])]
        state_spec = [{"name": name, "shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch.")}
                      for name, tensor in zip(names, initial)]
        if hasattr(rollout, "fill_noise"):  # the diffusion policy: its sampling noise comes in from the host
            host_inputs = {"chunk_noise": rollout.chunk_noise.clone()}
            if rollout.step_noise.shape[0]:
                host_inputs["step_noise"] = rollout.step_noise.clone()
        else:
            host_inputs = {"rewards": torch.zeros(batch_size, dtype=torch.float64)}
        example = (observations, *host_inputs.values(), *initial)
        inputs = ["observations", *host_inputs, *names]
        outputs = ["actions", *(f"{name}_next" for name in names)]
        np.savez(path.with_suffix(path.suffix + ".state.npz"), **{name: tensor.numpy() for name, tensor in zip(names, initial)})
    # the graph that is right at every step first, then the one a host-side rule may choose instead
    graphs = {next(iter(functions)) if functions else "step": path}
    if state_spec and "recompute" in functions:
        graphs["recompute"] = recompute_graph_path(path)
    if state_spec and "pop" in functions:
        graphs["pop"] = pop_graph_path(path)
    try:
        for function, graph_path in graphs.items():
            if state_spec:
                module = _StatefulStepModule(policy, function, list(host_inputs)).eval()
            with torch.no_grad():
                torch.onnx.export(module, example, str(graph_path), input_names=inputs, output_names=outputs,
                                  opset_version=OPSET, dynamo=True, verbose=False)
            if state_spec:
                policy._rollout.adopt(runtime.initial_state[: len(state_spec)])  # the tracer's tensors out, the real ones back
    finally:
        if state_spec:
            policy._rollout.adopt(runtime.initial_state[: len(state_spec)])
            for name, tensor in host_inputs.items():
                if name != "rewards":
                    setattr(policy._rollout, name, tensor)
    description = {
        "format": "kinema-onnx-policy/1", "policy": policy.name, **runtime.source, "opset": OPSET,
        "inputs": {"observations": {"shape": [batch_size, policy.spec.obs_dim], "dtype": "float32", "units": "raw observations"}},
        "outputs": {"actions": {"shape": [batch_size, policy.spec.act_dim], "dtype": "float32",
                                "units": "the task's action units, within its action box"}},
        "action_low": list(policy.spec.action_low), "action_high": list(policy.spec.action_high),
        "state": state_spec, "conditioning": runtime.conditioning,
    }
    units = {"rewards": "reward of the previous step (0 at an episode's first)",
             "chunk_noise": "standard normal: a chunk's initial noise, fresh for each environment that samples",
             "step_noise": "standard normal: DDIM's noise per denoising step (eta > 0), fresh like chunk_noise"}
    for name, tensor in host_inputs.items():
        description["inputs"][name] = {"shape": list(tensor.shape), "dtype": str(tensor.dtype).removeprefix("torch."),
                                       "units": units[name]}
    if state_spec:
        description["initial_state"] = path.name + ".state.npz"
    if "recompute" in graphs:
        rollout = policy._rollout
        # the host's rule (DT's decodes_next_step): decode while every context holds fewer than `context_steps`
        # steps (a step count per environment: +1 per step, up to context_steps; 0 after a restart), else recompute
        description["recompute"] = {"graph": graphs["recompute"].name, "context_steps": int(rollout.groups),
                                    "always": not bool(policy.inference.use_kv_cache)}
    if "pop" in graphs:
        # the host's rule (the diffusion rollout's next_step_name): sample when any queue is empty; a queue
        # position per environment, n_action_steps (empty) at an episode's start, 0 after a sample, +1 per step
        description["pop"] = {"graph": graphs["pop"].name, "n_action_steps": int(policy._rollout.n_action_steps)}
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(description, indent=1) + "\n")
    return description


def recompute_graph_path(path: Path) -> Path:
    """Where an exact full-context DT's window-recompute step goes, beside its decode step."""
    return path.with_name(path.stem + ".recompute" + path.suffix)


def pop_graph_path(path: Path) -> Path:
    """Where the diffusion policy's queue-pop step goes, beside its sampling step."""
    return path.with_name(path.stem + ".pop" + path.suffix)


class OnnxPolicy:
    """An exported step served by ONNX Runtime (CPU), with the runtime's input checks; for a stateful
    export it keeps the state between calls and restarts single environments from the initial state.
    The diffusion policy's noise is drawn here with numpy, from a generator per environment seeded by
    :meth:`seed_episodes` (others share one), so its samples differ from PyTorch's but not in law."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        path = Path(path)
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.options = options
        self.session = self._session(path)
        description = json.loads(path.with_suffix(path.suffix + ".json").read_text())
        self.batch_size, self.obs_dim = description["inputs"]["observations"]["shape"]
        self.host_inputs = {name: entry["shape"] for name, entry in description["inputs"].items() if name != "observations"}
        self.state_names = [entry["name"] for entry in description["state"]]
        self.initial: dict[str, np.ndarray] = {}
        if self.state_names:
            with np.load(path.with_suffix(path.suffix + ".state.npz")) as saved:
                self.initial = {name: saved[name] for name in self.state_names}
        self.state = {name: value.copy() for name, value in self.initial.items()}
        self.rewards = np.zeros(self.batch_size)
        recompute, pop = description.get("recompute"), description.get("pop")
        self.recompute_session = self.pop_session = None
        if recompute:  # an exact full-context DT: the window is recomputed once a context is full
            self.recompute_session = self._session(path.with_name(recompute["graph"]))
            self.context_steps, self.always_recompute = int(recompute["context_steps"]), bool(recompute["always"])
        self.steps = np.zeros(self.batch_size, dtype=np.int64)
        self.samples = "chunk_noise" in self.host_inputs  # the diffusion policy
        if pop:  # receding horizon: the pop graph wherever no queue is empty
            self.pop_session = self._session(path.with_name(pop["graph"]))
            self.n_action_steps = int(pop["n_action_steps"])
            self.queue_positions = np.full(self.batch_size, self.n_action_steps)
        self.generators: dict[int, np.random.Generator] = {}
        self.shared_generator = np.random.default_rng()

    def _session(self, path: Path) -> Any:
        import onnxruntime

        return onnxruntime.InferenceSession(str(path), self.options, providers=["CPUExecutionProvider"])

    def act(self, observations: Any) -> np.ndarray:
        array = np.asarray(observations, dtype=np.float32)
        if array.shape != (self.batch_size, self.obs_dim):
            raise ValueError(f"observations must have shape ({self.batch_size}, {self.obs_dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("observations hold a non-finite value; refused")
        if not self.state_names:
            return self.session.run(None, {"observations": array})[0]
        session, feeds = self.session, {"observations": array}
        if self.recompute_session is not None and (self.always_recompute or self.steps.max() >= self.context_steps):
            session = self.recompute_session
        if self.samples:
            session = self._fill_noise(feeds)
        else:
            feeds["rewards"] = self.rewards
        outputs = session.run(None, {**feeds, **self.state})
        self.state = dict(zip(self.state_names, outputs[1:]))
        self.rewards = np.zeros(self.batch_size)
        if self.recompute_session is not None:
            np.minimum(self.steps + 1, self.context_steps, out=self.steps)
        return outputs[0]

    def _fill_noise(self, feeds: dict[str, np.ndarray]) -> Any:
        """The diffusion graphs: noise for the environments that sample this step; the session to run."""
        if self.pop_session is None:  # temporal ensembling: every environment samples every step
            sampling = np.arange(self.batch_size)
        else:
            empty = self.queue_positions >= self.n_action_steps
            sampling = np.flatnonzero(empty)
            self.queue_positions[empty] = 0
            self.queue_positions += 1
            if not len(sampling):
                feeds.update({name: np.zeros(shape, dtype=np.float32) for name, shape in self.host_inputs.items()})
                return self.pop_session
        for name, shape in self.host_inputs.items():
            noise = np.zeros(shape, dtype=np.float32)
            if name == "chunk_noise":
                noise[sampling] = self.draw_noise(sampling)
            else:  # step_noise (steps, N, T, A)
                for step in noise:
                    step[sampling] = self.draw_noise(sampling)
            feeds[name] = noise
        return self.session

    def draw_noise(self, env_indices: np.ndarray) -> np.ndarray:
        """Standard normal (len(env_indices), T, A), each row from that environment's generator."""
        shape = self.host_inputs["chunk_noise"][1:]
        return np.stack([self.generators.get(int(i), self.shared_generator).standard_normal(shape, dtype=np.float32)
                         for i in env_indices])

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
        if self.pop_session is not None:
            self.queue_positions[index] = self.n_action_steps

    def seed_episodes(self, env_indices: Any, seeds: Any) -> None:
        """The diffusion policy: these environments draw their noise from generators seeded ``seeds``;
        deterministic policies: nothing to seed."""
        for index, seed in zip(np.asarray(env_indices).reshape(-1).tolist(), np.asarray(seeds).reshape(-1).tolist()):
            self.generators[int(index)] = np.random.default_rng(int(seed))
