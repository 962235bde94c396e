"""`kinema-bench`: how fast a checkpoint acts on this machine, on every serving path available here.

    kinema-bench checkpoint=<dir> [batch=1] [threads=1] [backend=<attention backend>] [device=cpu|cuda]

Paths (``paths=[...]`` picks some): ``act`` (the policy's own ``act``, what ``kinema-eval`` runs),
``runtime`` (:class:`kinema.sim2real.runtime.PolicyRuntime`: the pure step functions, eagerly),
``compiled`` (the same through ``torch.compile``; its cold start includes compiling), ``cuda_graph``
(the runtime replaying CUDA graphs; with ``device=cuda``) and ``onnxruntime`` (the exported step,
served by ONNX Runtime; with the ``onnx`` extra, for the families ``kinema.sim2real.export`` exports). For each: per-action latency
(p50, p99, max, in ms) over ``steps`` actions after ``warmup``, from handing over the observations to
holding the actions as a numpy array, with random observations and rewards; and the cold start, the
wall time of a fresh process from its start to its first action (``cold_start_runs`` processes;
imports and loading included). ``pin=[0]`` pins the process to those cores. Writes ``bench.json`` in
the run directory with the machine (CPU model, torch's CPU capability, threads, the cores used)
beside the figures.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, report_user_errors, to_plain
from kinema.train.config import BenchConfig

BENCH_CONFIG_DIR = str(Path(CONFIG_DIR) / "bench")
PATHS = ("act", "runtime", "compiled", "cuda_graph", "onnxruntime")


def pin_process(cores: list[int] | None) -> list[int]:
    """Pin this process to ``cores`` where the OS allows it; the cores it may run on afterwards."""
    import os

    if cores:
        try:
            os.sched_setaffinity(0, set(cores))
        except (OSError, ValueError) as error:
            raise ValueError(f"pin={cores}: cannot pin to those cores ({error}); this process may use {sorted(os.sched_getaffinity(0))}") from None
    return sorted(os.sched_getaffinity(0))


def make_actor(path: str, settings: dict[str, Any], onnx_file: Path | None = None) -> tuple[Any, int]:
    """(an object with act/observe_reward, obs_dim) serving the checkpoint on ``path``."""
    import torch

    pin_process(settings.get("pin"))
    torch.set_num_threads(int(settings["threads"]))
    if path == "onnxruntime":
        from kinema.sim2real.export import OnnxPolicy

        served = OnnxPolicy(onnx_file, threads=int(settings["threads"]))
        return served, served.obs_dim
    from kinema.sim2real.runtime import PolicyRuntime

    runtime = PolicyRuntime(settings["checkpoint"], batch_size=int(settings["batch"]), device=settings["device"],
                            attention_backend=settings["backend"], cuda_graphs=path == "cuda_graph",
                            target_return=settings["target_return"], compile=path == "compiled")
    if path == "act":  # the policy's own act, freshly reset
        policy = runtime.policy
        policy.reset(runtime.batch_size, **runtime.conditioning)
        return _PolicyActor(policy), runtime.obs_dim
    return runtime, runtime.obs_dim


class _PolicyActor:
    def __init__(self, policy: Any):
        self.policy = policy

    def act(self, observations: np.ndarray) -> np.ndarray:
        return self.policy.act(observations).cpu().numpy()

    def observe_reward(self, rewards: np.ndarray) -> None:
        self.policy.observe_reward(rewards)


def time_actions(actor: Any, obs_dim: int, batch: int, warmup: int, steps: int) -> list[float]:
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(warmup + steps, batch, obs_dim)).astype(np.float32)
    rewards = rng.uniform(0.0, 1.0, size=(warmup + steps, batch))
    seconds = []
    for index in range(warmup + steps):
        start = time.perf_counter()
        actions = actor.act(observations[index])
        elapsed = time.perf_counter() - start
        if not np.isfinite(actions).all():
            raise RuntimeError(f"the {type(actor).__name__} path returned a non-finite action")
        if hasattr(actor, "observe_reward"):
            actor.observe_reward(rewards[index])
        if index >= warmup:
            seconds.append(elapsed)
    return seconds


def first_action(settings_json: str, path: str, onnx_file: str | None) -> None:
    """Run in a fresh process by the cold-start measurement: build the path, act once, exit."""
    settings = json.loads(settings_json)
    actor, obs_dim = make_actor(path, settings, Path(onnx_file) if onnx_file else None)
    actor.act(np.zeros((int(settings["batch"]), obs_dim), dtype=np.float32))


def cold_start_seconds(settings: dict[str, Any], path: str, onnx_file: Path | None, runs: int) -> list[float]:
    code = ("import sys; from kinema.sim2real.bench_app import first_action; "
            "first_action(sys.argv[1], sys.argv[2], sys.argv[3] or None)")
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", code, json.dumps(settings), path, str(onnx_file or "")],
                              capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"cold start of the {path} path failed:\n{done.stderr[-2000:]}")
        times.append(time.perf_counter() - start)
    return times


def available_paths(settings: dict[str, Any]) -> dict[str, str | None]:
    """Each path -> None when it runs here, else why not."""
    import importlib.util

    cuda = str(settings["device"]).startswith("cuda")
    onnx_missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    wanted = set(settings["paths"] or PATHS)
    unknown = sorted(wanted - set(PATHS))
    if unknown:
        raise ValueError(f"paths: unknown {unknown}; choose from {list(PATHS)}")
    available = {
        "act": None,
        "runtime": None,
        "compiled": None,  # a policy without pure step functions is refused when its path is built (run_bench)
        "cuda_graph": None if cuda else "needs device=cuda",
        "onnxruntime": f"not installed: {', '.join(onnx_missing)} (pip install \".[onnx]\")" if onnx_missing else None,
    }
    return {path: why if path in wanted else "not in paths" for path, why in available.items()}


def run_bench(settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import torch

    from kinema.benchmarks.bench_utils import machine_info, summarize_ms

    if not settings.get("checkpoint"):
        raise ValueError("kinema-bench needs checkpoint=<checkpoint directory or run directory>")
    for key in ("batch", "threads", "steps"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 1:
            raise ValueError(f"{key} must be an integer >= 1, got {settings[key]!r}")
    for key in ("warmup", "cold_start_runs"):
        if isinstance(settings[key], bool) or not isinstance(settings[key], int) or settings[key] < 0:
            raise ValueError(f"{key} must be an integer >= 0, got {settings[key]!r}")
    paths = available_paths(settings)
    onnx_file = run_dir / "policy.onnx"
    if paths["onnxruntime"] is None:
        from kinema.sim2real.export import export_onnx

        try:
            export_onnx(settings["checkpoint"], onnx_file, batch_size=int(settings["batch"]), target_return=settings["target_return"])
        except ValueError as error:  # a family whose step cannot be exported yet
            paths["onnxruntime"] = str(error)
    results: dict[str, Any] = {}
    for path, unavailable in paths.items():
        if unavailable:
            results[path] = {"skipped": unavailable}
            continue
        try:
            actor, obs_dim = make_actor(path, settings, onnx_file)
        except ValueError as error:  # e.g. no pure step functions with this checkpoint's inference options
            if path in ("act", "runtime"):
                raise
            results[path] = {"skipped": str(error)}
            continue
        seconds = time_actions(actor, obs_dim, int(settings["batch"]), int(settings["warmup"]), int(settings["steps"]))
        entry: dict[str, Any] = {"latency_ms": summarize_ms(seconds), "max_ms": round(max(seconds) * 1e3, 4)}
        if path in ("runtime", "compiled", "cuda_graph"):
            entry["runtime_path"] = actor.path
        if settings["cold_start_runs"]:
            cold = cold_start_seconds(settings, path, onnx_file if path == "onnxruntime" else None, int(settings["cold_start_runs"]))
            entry["cold_start_s"] = {"median": round(statistics.median(cold), 3), "runs": [round(c, 3) for c in cold]}
        results[path] = entry
        print(f"kinema-bench: {path}: p50 {entry['latency_ms']['median_ms']:.3f} ms, mean {entry['latency_ms']['mean_ms']:.3f} ms", flush=True)
    report = {"checkpoint": str(settings["checkpoint"]), "settings": settings, "machine": machine_info(),
              "torch_threads": torch.get_num_threads(), "cpu_affinity": pin_process(None), "paths": results}
    (run_dir / "bench.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


def print_report(report: dict[str, Any]) -> None:
    from kinema.benchmarks.bench_utils import print_table

    rows = []
    for path, entry in report["paths"].items():
        if "skipped" in entry:
            rows.append([path, "-", "-", "-", "-", "-", entry["skipped"]])
            continue
        latency = entry["latency_ms"]
        rows.append([path, f"{latency['median_ms']:.3f}", f"{latency['mean_ms']:.3f}", f"{latency['p99_ms']:.3f}", f"{entry['max_ms']:.3f}",
                     f"{entry['cold_start_s']['median']:.2f}" if "cold_start_s" in entry else "-", entry.get("runtime_path", "")])
    machine = report["machine"]
    print(f"kinema-bench: {report['checkpoint']}, batch {report['settings']['batch']}, {report['settings']['threads']} thread(s), "
          f"cores {report['cpu_affinity']}, {machine['cpu_model']} ({machine['torch_cpu_capability']})")
    print_table(["path", "p50 ms", "mean ms", "p99 ms", "max ms", "cold start s", "note"], rows)


@hydra.main(config_path=BENCH_CONFIG_DIR, config_name="bench", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-bench")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_bench(to_plain(cfg), run_dir)
    print_report(report)
    print(f"kinema-bench: wrote {run_dir / 'bench.json'}")


def main() -> None:
    refuse_run_dir_that_is_a_file("kinema-bench")
    ConfigStore.instance().store(name="bench_schema", node=BenchConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
