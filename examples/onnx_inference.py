"""Run a policy exported by kinema (``kinema.sim2real.export.export_onnx``) with onnxruntime alone: no kinema, no torch.

    pip install onnxruntime numpy
    python examples/onnx_inference.py policy.onnx

Reads the file's description (``policy.onnx.json``, written beside it) for the shapes and the
action box, feeds observations, and prints the actions. On a robot, the observation comes from the
robot's sensors in the same order and units as the training task's observation.
"""

import json
import sys

import numpy as np
import onnxruntime

path = sys.argv[1] if len(sys.argv) > 1 else "policy.onnx"
with open(path + ".json") as file:
    description = json.load(file)
batch, obs_dim = description["inputs"]["observations"]["shape"]
session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])

observations = np.random.default_rng(0).normal(size=(batch, obs_dim)).astype(np.float32)
if not np.isfinite(observations).all():
    raise SystemExit("refusing a non-finite observation")
actions = session.run(["actions"], {"observations": observations})[0]
assert np.all(actions >= np.asarray(description["action_low"]) - 1e-6) and np.all(actions <= np.asarray(description["action_high"]) + 1e-6)
print(f"{description['policy']} policy for {description['task']}: actions {actions.tolist()}")
