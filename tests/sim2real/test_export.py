"""ONNX export of the per-step policy: parity with PyTorch, a standalone example, refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from kinema.sim2real.export import OnnxPolicy, export_onnx  # noqa: E402
from kinema.train.checkpoint import load_checkpoint  # noqa: E402

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["bc", "bot"])
def test_the_exported_step_matches_pytorch_within_1e_5(name: str, tmp_path: Path) -> None:
    description = export_onnx(GOLDEN / name, tmp_path / "policy.onnx", batch_size=4)
    assert description["inputs"]["observations"]["shape"] == [4, 5] and (tmp_path / "policy.onnx.json").is_file()
    policy = load_checkpoint(GOLDEN / name).policy.eval()
    served = OnnxPolicy(tmp_path / "policy.onnx", threads=1)
    observations = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32) * 3
    with torch.no_grad():
        expected = policy.step(torch.from_numpy(observations)).numpy()
    assert np.abs(served.act(observations) - expected).max() <= 1e-5
    with pytest.raises(ValueError, match="non-finite"):
        served.act(np.full((4, 5), np.nan, dtype=np.float32))


def test_the_example_runs_the_file_without_kinema(tmp_path: Path) -> None:
    export_onnx(GOLDEN / "bc", tmp_path / "policy.onnx", batch_size=1)
    # -I: isolated mode, so neither the checkout nor the working directory is importable; -S would drop site-packages
    code = ("import sys; sys.modules['kinema'] = None; sys.modules['torch'] = None; sys.argv = ['x', sys.argv[1]]; "
            f"exec(open({str(REPO / 'examples' / 'onnx_inference.py')!r}).read())")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path / "policy.onnx")], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "bc policy for" in out.stdout


@pytest.mark.parametrize("name", ["dt", "at", "dt_full"])
def test_a_dt_exports_with_its_state_and_matches_act_through_episode_ends(name: str, tmp_path: Path) -> None:
    """The KV-cache ring, returns-to-go and timesteps as explicit inputs and outputs, step by step; the exact
    full-context DT switches to its recompute graph once a context slides."""
    description = export_onnx(GOLDEN / name, tmp_path / "policy.onnx", batch_size=3, target_return=40.0)
    assert [entry["name"] for entry in description["state"]][-1] == "cache" and (tmp_path / "policy.onnx.state.npz").is_file()
    served = OnnxPolicy(tmp_path / "policy.onnx", threads=1)
    policy = load_checkpoint(GOLDEN / name).policy.eval()
    policy.reset(3, target_return=40.0)
    rng = np.random.default_rng(0)
    worst = 0.0
    for step in range(16):  # past the ring of 3 steps, with restarts
        observations = rng.normal(size=(3, 5)).astype(np.float32)
        with torch.no_grad():
            expected = policy.act(observations).numpy()
        worst = max(worst, float(np.abs(served.act(observations) - expected).max()))
        rewards = rng.uniform(-1.0, 2.0, size=3)
        policy.observe_reward(rewards)
        served.observe_reward(rewards)
        if step in (5, 11) and name != "at":  # AT carries its context into the next trial: no restart here
            policy.end_episode([step % 3])
            served.end_episode([step % 3])
    assert worst <= 1e-5
    if name == "dt_full":
        assert description["recompute"]["graph"] == "policy.recompute.onnx" and (tmp_path / "policy.recompute.onnx").is_file()
        assert served.steps.max() == description["recompute"]["context_steps"]  # the recompute graph ran


@pytest.fixture(scope="module")
def diffusion_export(tmp_path_factory) -> Path:
    """The golden diffusion policy at 2 DDIM steps (a quick export), batch 3."""
    path = tmp_path_factory.mktemp("diffusion-onnx") / "policy.onnx"
    export_onnx(GOLDEN / "diffusion", path, batch_size=3, inference={"num_inference_steps": 2})
    return path


def test_the_diffusion_policy_exports_with_its_queue_and_matches_act_through_episode_ends(diffusion_export: Path) -> None:
    """Sample and pop graphs, the chunk queue and history as state, the noise as an input: with PyTorch's
    noise fed in, act's actions within 1e-5 step by step through single-environment restarts."""
    description = json.loads(diffusion_export.with_name("policy.onnx.json").read_text())
    assert description["pop"] == {"graph": "policy.pop.onnx", "n_action_steps": 3}
    assert description["inputs"]["chunk_noise"]["shape"] == [3, 6, 2] and "step_noise" not in description["inputs"]
    assert [entry["name"] for entry in description["state"]][:4] == ["history", "started", "queue", "queue_position"]
    served = OnnxPolicy(diffusion_export, threads=1)
    policy, noise_source = (load_checkpoint(GOLDEN / "diffusion").policy.eval() for _ in range(2))
    for model in (policy, noise_source):
        model.configure_inference(num_inference_steps=2)
        model.reset(3)
        model.seed_episodes(np.arange(3), np.arange(3) + 100)
    served.draw_noise = lambda index: noise_source._rollout.draw_noise(index).numpy()  # act's noise, drawn in act's order
    rng = np.random.default_rng(0)
    worst, pops = 0.0, 0
    for step in range(14):
        observations = rng.normal(size=(3, 5)).astype(np.float32)
        pops += not (served.queue_positions >= 3).any()
        with torch.no_grad():
            expected = policy.act(observations).numpy()
        worst = max(worst, float(np.abs(served.act(observations) - expected).max()))
        if step in (4, 9):
            for model in (policy, served, noise_source):
                model.end_episode([step % 3])
            for model in (policy, noise_source):
                model.seed_episodes([step % 3], [1000 + step])
    assert worst <= 1e-5 and pops >= 3  # the pop graph ran on the steps where no queue was empty


def test_the_example_runs_a_stateful_export_without_kinema(diffusion_export: Path) -> None:
    code = ("import sys; sys.modules['kinema'] = None; sys.modules['torch'] = None; sys.argv = ['x', sys.argv[1]]; "
            f"exec(open({str(REPO / 'examples' / 'onnx_inference.py')!r}).read())")
    out = subprocess.run([sys.executable, "-I", "-c", code, str(diffusion_export)], capture_output=True, text=True,
                         timeout=120, cwd=diffusion_export.parent)
    assert out.returncode == 0, out.stderr
    assert "diffusion policy for" in out.stdout


def test_families_that_cannot_export_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="exports with inference.sampler=ddim"):
        export_onnx(GOLDEN / "diffusion", tmp_path / "diffusion.onnx", inference={"sampler": "dpmsolver"})
