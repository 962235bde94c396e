"""`kinema-bench` from the command line: every available path timed, bench.json written, bad values refused."""

from __future__ import annotations

import json
from pathlib import Path

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


def test_kinema_bench_times_every_available_path_and_writes_json(cli, tmp_path: Path) -> None:
    out = cli.run([cli.script("kinema-bench"), f"checkpoint={GOLDEN / 'bc'}", "steps=5", "warmup=1", "cold_start_runs=1", "batch=2", "pin=[0]",
                   "paths=[act,runtime,cuda_graph,onnxruntime]",  # compiling takes a while; test_runtime covers it
                   f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    report = json.loads((tmp_path / "run" / "bench.json").read_text())
    assert report["machine"]["torch_cpu_capability"] and report["settings"]["batch"] == 2 and report["cpu_affinity"] == [0]
    paths = report["paths"]
    for path in ("act", "runtime", "onnxruntime"):
        assert paths[path]["latency_ms"]["count"] == 5 and paths[path]["cold_start_s"]["median"] > 0, path
    assert paths["runtime"]["runtime_path"] == "step_functions"
    assert paths["cuda_graph"] == {"skipped": "needs device=cuda"} and paths["compiled"] == {"skipped": "not in paths"}
    assert "p50 ms" in out.stdout and (tmp_path / "run" / "policy.onnx").is_file()


def test_kinema_bench_refuses_bad_values_naming_the_key(cli, tmp_path: Path) -> None:
    out = cli.run([cli.script("kinema-bench"), f"checkpoint={GOLDEN / 'bc'}", "batch=0", f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, check=False)
    assert out.returncode != 0 and "batch must be an integer >= 1, got 0" in out.stderr
    out = cli.run([cli.script("kinema-bench"), f"hydra.run.dir={tmp_path / 'b'}"], cwd=tmp_path, check=False)
    assert out.returncode != 0 and "needs checkpoint=" in out.stderr
