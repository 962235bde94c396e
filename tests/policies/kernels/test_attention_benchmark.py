"""The GPU attention benchmark's CPU dry run: every case and backend runs, and the outputs agree."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def test_attention_benchmark_dry_run_checks_every_case(tmp_path: Path) -> None:
    from kinema.benchmarks import attention as attention_benchmark

    if torch.cuda.is_available():
        import pytest

        pytest.skip("on a GPU the benchmark runs for real: python benchmarks/attention.py")
    data = attention_benchmark.main(["--quick", "--rounds", "1", "--out", str(tmp_path / "attention.json")])
    assert json.loads((tmp_path / "attention.json").read_text())["benchmark"] == "attention"
    cases = {entry["case"] for entry in data["results"]}
    assert cases == {"dt_causal", "dt_banded", "bot_graph", "diffusion", "diffusion_64", "dt_decode"}
    for entry in data["results"]:
        assert max(entry["max_abs_error"].values()) < 1e-5, entry
    assert data["config"]["interpreted"] and "not_run" in data["end_to_end_dt"]
