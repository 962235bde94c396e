"""ONNX export of a policy's per-step computation, and serving the exported file with ONNX Runtime.

``export_onnx(checkpoint, path, batch_size)`` writes the policy's pure step function (observations
(batch, obs_dim) float32 -> actions (batch, act_dim) float32, in the task's units) at a fixed batch
size, with the normalisation statistics and weights inside the file, plus ``<path>.json`` naming
the inputs, outputs, shapes and the checkpoint it came from. ``examples/onnx_inference.py`` runs
such a file with onnxruntime alone.

Supported now: the stateless families (BC, BoT, the PPO actor), whose step is one function of the
current observation. Families that keep a rollout state (DT, AT: the KV-cache ring; the diffusion
policy: its chunk queue) are refused by name; their export, with the state as explicit inputs and
outputs, comes with the runtime's next part.

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


def export_onnx(checkpoint: str | Path, path: str | Path, batch_size: int = 1) -> dict[str, Any]:
    """Write the checkpoint's step function as ONNX at ``batch_size``; returns the description written beside it."""
    from kinema.train.checkpoint import load_checkpoint

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    loaded = load_checkpoint(checkpoint, device="cpu", use_ema=True)
    policy = loaded.policy.eval()
    if not policy.stateless:
        raise ValueError(f"ONNX export of the {policy.name!r} policy is not available yet: it keeps a rollout state "
                         "(exported with the state as explicit inputs and outputs in a later version); "
                         "stateless families (bc, bot, ppo) export now")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(batch_size, policy.spec.obs_dim)
    with torch.no_grad():
        torch.onnx.export(_StepModule(policy), (example,), str(path), input_names=["observations"], output_names=["actions"],
                          opset_version=OPSET, dynamo=True, verbose=False)
    description = {
        "format": "kinema-onnx-policy/1", "policy": policy.name, "task": loaded.task, "checkpoint": str(loaded.path),
        "step": loaded.step, "opset": OPSET,
        "inputs": {"observations": {"shape": [batch_size, policy.spec.obs_dim], "dtype": "float32", "units": "raw observations"}},
        "outputs": {"actions": {"shape": [batch_size, policy.spec.act_dim], "dtype": "float32",
                                "units": "the task's action units, within its action box"}},
        "action_low": list(policy.spec.action_low), "action_high": list(policy.spec.action_high),
    }
    path.with_suffix(path.suffix + ".json").write_text(json.dumps(description, indent=1) + "\n")
    return description


class OnnxPolicy:
    """An exported step function served by ONNX Runtime (CPU), with the runtime's input checks."""

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        shape = self.session.get_inputs()[0].shape
        self.batch_size, self.obs_dim = int(shape[0]), int(shape[1])

    def act(self, observations: Any) -> np.ndarray:
        array = np.asarray(observations, dtype=np.float32)
        if array.shape != (self.batch_size, self.obs_dim):
            raise ValueError(f"observations must have shape ({self.batch_size}, {self.obs_dim}), got {array.shape}")
        if not np.isfinite(array).all():
            raise ValueError("observations hold a non-finite value; refused")
        return self.session.run(None, {"observations": array})[0]
