"""ONNX export of the per-step policy: parity with PyTorch, a standalone example, refusals."""

from __future__ import annotations

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


def test_families_with_a_rollout_state_are_refused_by_name(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'dt' policy is not available yet"):
        export_onnx(GOLDEN / "dt", tmp_path / "dt.onnx")
