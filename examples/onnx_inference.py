"""Run a policy exported by kinema (``kinema.sim2real.export.export_onnx``) with onnxruntime alone: no kinema, no torch.

    pip install onnxruntime numpy
    python examples/onnx_inference.py policy.onnx

Reads the file's description (``policy.onnx.json``, written beside it) for the inputs, the state and
the action box, and runs a few steps, carrying the state from one to the next. On a robot, the
observation comes from the robot's sensors in the same order and units as the training task's
observation, and ``rewards`` (DT, AT) is the reward of the previous step.
"""

import json
import os
import sys

import numpy as np
import onnxruntime

path = sys.argv[1] if len(sys.argv) > 1 else "policy.onnx"
with open(path + ".json") as file:
    description = json.load(file)
inputs = description["inputs"]
batch, obs_dim = inputs["observations"]["shape"]
session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
state_names = [entry["name"] for entry in description["state"]]
state = {}
if state_names:  # DT, AT, diffusion: the rollout state at an episode's start
    with np.load(os.path.join(os.path.dirname(path), description["initial_state"])) as saved:
        state = {name: saved[name] for name in state_names}

rng = np.random.default_rng(0)
for step in range(5):
    observations = rng.normal(size=(batch, obs_dim)).astype(np.float32)
    if not np.isfinite(observations).all():
        raise SystemExit("refusing a non-finite observation")
    feeds = {"observations": observations, **state}
    if "rewards" in inputs:
        feeds["rewards"] = np.zeros(batch)  # the previous step's reward; 0 at an episode's first step
    for name in ("chunk_noise", "step_noise"):  # the diffusion policy's sampling noise, fresh every step
        if name in inputs:
            feeds[name] = rng.standard_normal(inputs[name]["shape"], dtype=np.float32)
    actions, *new_state = session.run(None, feeds)
    state = dict(zip(state_names, new_state))
    low, high = np.asarray(description["action_low"]), np.asarray(description["action_high"])
    assert np.all(actions >= low - 1e-6) and np.all(actions <= high + 1e-6)
print(f"{description['policy']} policy for {description['task']}: actions {actions.tolist()}")
