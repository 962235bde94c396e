"""Diffusion policy speed: latency per action chunk and actions per second against the number of denoising steps.

    python benchmarks/diffusion_speed.py            # hopper's shapes; DDIM 2/5/10/20/50 steps; batch 1 and 10; 1 and 2 threads
    python benchmarks/diffusion_speed.py --quick    # a smoke run

The model is the diffusion policy at its defaults (``kinema.policies.diffusion.DiffusionConfig``) on
hopper's observation and action sizes, with random weights (the cost does not depend on them).

- ``chunk``: one chunk from an observation history, as ``predict_chunk`` computes it: the observation
  encoding once, then ``steps`` denoiser calls and scheduler steps, then unnormalisation.
- ``cycle``: ``n_action_steps`` calls of ``act`` after ``reset`` (one chunk sampled, then actions
  taken from the queue): the receding-horizon controller's real cost. Actions per second delivered
  = batch x n_action_steps / cycle time; with temporal ensembling every action needs a chunk, so it
  delivers batch / chunk time.
- ``onnx_chunk``: the policy's sampling step exported to ONNX (``kinema.sim2real.export``) and run by
  ONNX Runtime at the same thread count (when the ``onnx`` extra imports; up to ``--onnx-max-steps``
  steps): one chunk for every environment from the same observation history, plus the queue update
  around it, the fastest CPU path for this policy in ``kinema-bench``.
- ``lerobot``: when LeRobot imports in this interpreter (``benchmarks/lerobot_peer.py`` says how to make
  a benchmark-only environment, into which kinema installs with ``pip install -e .``), its
  ``DiffusionPolicy`` at the same horizon, observation steps, action steps and DDIM steps
  (``--peer-steps``, default 10), side by side, interleaved. Its network is its own default (a 1-D
  convolutional UNet, far larger), a different model: the JSON labels it so, with both parameter counts.

Variants are interleaved round by round after warm-up rounds; medians are reported.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kinema.benchmarks.bench_utils import (
    RunRecord, interleave, output_or_error, parse_positive_ints, parse_threads, print_table, require_positive, summarize_ms,
)

NAME = "diffusion_speed"
TASK = "hopper"
TARGET_MS = 15.0  # the target: a chunk with <= 10 DDIM steps at batch 1 on a 2-core machine


def build_policy(steps: int) -> Any:
    from kinema.envs import task_spaces
    from kinema.policies import NormStats, PolicySpec, make_policy

    obs_dim, act_dim, low, high = task_spaces(TASK)
    spec = PolicySpec(obs_dim, act_dim, low, high)
    stats = NormStats({"observations": {"mean": np.zeros(obs_dim), "std": np.ones(obs_dim)},
                       "actions": {"min": np.asarray(low), "max": np.asarray(high)}})
    torch.manual_seed(0)
    policy = make_policy({"name": "diffusion", "inference": {"num_inference_steps": steps}}, spec, stats).eval()
    with torch.no_grad():  # adaLN-Zero starts at zero; spread the weights so nothing is skipped
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return policy


def chunk_call(policy: Any, batch: int) -> Callable[[], float]:
    history = np.random.default_rng(0).normal(size=(batch, policy.config.n_obs_steps, policy.spec.obs_dim))
    noise = torch.randn(batch, policy.config.horizon, policy.spec.act_dim)

    def call() -> float:
        start = time.perf_counter()
        policy.predict_chunk(history, noise=noise)
        return time.perf_counter() - start

    return call


def cycle_call(policy: Any, batch: int) -> Callable[[], float]:
    observations = np.random.default_rng(1).normal(size=(batch, policy.spec.obs_dim)).astype(np.float32)
    actions_per_chunk = policy.config.n_action_steps

    def call() -> float:
        policy.reset(batch)
        start = time.perf_counter()
        for _ in range(actions_per_chunk):
            policy.act(observations)
        return time.perf_counter() - start

    return call


def onnx_export(policy: Any, batch: int, folder: Path) -> tuple[Path | None, str | None]:
    """The policy's sampling step as ONNX at ``batch`` (path, None), or (None, why not)."""
    try:
        import onnxruntime  # noqa: F401
        from kinema.sim2real.export import export_onnx
    except ImportError as error:
        return None, f"not installed: {error} (pip install '.[onnx]')"
    path = folder / f"diffusion-{policy.inference.num_inference_steps}-steps-batch-{batch}.onnx"
    export_onnx(policy, path, batch_size=batch)
    return path, None


def onnx_chunk_call(path: Path, threads: int) -> Callable[[], float]:
    import json

    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    # ONNX Runtime's pool threads spin after a run by default; interleaved with PyTorch's variants that
    # would steal a core from them
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    description = json.loads(path.with_suffix(".onnx.json").read_text())
    rng = np.random.default_rng(0)
    with np.load(path.with_suffix(".onnx.state.npz")) as initial:  # every queue empty: the step samples
        feeds = {name: initial[name] for name in initial.files}
    for name, entry in description["inputs"].items():
        if name != "observations":  # the noise
            feeds[name] = rng.standard_normal(entry["shape"], dtype=np.float32)
    feeds["observations"] = rng.normal(size=description["inputs"]["observations"]["shape"]).astype(np.float32)

    def call() -> float:
        start = time.perf_counter()
        session.run(["actions"], feeds)
        return time.perf_counter() - start

    return call


def lerobot_peer(policy: Any, steps: int) -> tuple[Any, dict[str, Any]]:
    """LeRobot's DiffusionPolicy at the same shapes and what to record about it, or (None, why not)."""
    try:
        from kinema.benchmarks.lerobot_peer import build_lerobot_diffusion, lerobot_version
        config = policy.config
        peer = build_lerobot_diffusion(policy.spec.obs_dim, policy.spec.act_dim, horizon=config.horizon,
                                       n_obs_steps=config.n_obs_steps, n_action_steps=config.n_action_steps,
                                       num_inference_steps=steps)
        return peer, {"model": f"{peer.network} (a different model)", "version": lerobot_version(),
                      "parameters": peer.parameter_count}
    except ImportError as error:
        return None, {"skipped": str(error)}


def peer_call(peer: Any, batch: int) -> Callable[[], float]:
    def call() -> float:
        start = time.perf_counter()
        peer.sample_chunk(batch)
        return time.perf_counter() - start

    return call


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="2,5,10,20,50", help="comma-separated numbers of DDIM steps")
    parser.add_argument("--batches", default="1,10", help="comma-separated batch sizes")
    parser.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    parser.add_argument("--rounds", type=int, default=50, help="measured rounds per variant and setting")
    parser.add_argument("--peer-steps", default="10", help="DDIM step counts at which LeRobot is measured too")
    parser.add_argument("--no-peer", action="store_true", help="skip LeRobot even where it imports")
    parser.add_argument("--onnx-max-steps", type=int, default=10,
                        help="measure the ONNX Runtime path up to this many DDIM steps (0: never; each export takes ~30 s)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 and 10 steps, batch 1, 1 thread, 3 rounds")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/diffusion_speed.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batches, args.threads, args.rounds = "2,10", "1", "1", 3
    require_positive(parser, args, ("rounds",))
    out = output_or_error(parser, args.out, NAME)
    step_counts, batches, thread_counts = (parse_positive_ints(args.steps, "--steps"), parse_positive_ints(args.batches, "--batches"),
                                           parse_threads(args.threads))
    peer_steps = set() if args.no_peer else set(parse_positive_ints(args.peer_steps, "--peer-steps"))
    record = RunRecord(NAME, argv)
    original_threads = torch.get_num_threads()
    results, peer_info = [], {"skipped": "--no-peer" if args.no_peer else f"no step count of --steps in --peer-steps {args.peer_steps}"}
    onnx_info: dict[str, Any] = {"skipped": f"no step count of --steps up to --onnx-max-steps {args.onnx_max_steps}"}
    exports = tempfile.TemporaryDirectory(prefix="kinema-diffusion-speed-")
    try:
        for steps in step_counts:
            policy = build_policy(steps)
            peer = None
            if steps in peer_steps:
                peer, peer_info = lerobot_peer(policy, steps)
            onnx_files: dict[int, Path] = {}
            if steps <= args.onnx_max_steps:
                for batch in batches:
                    path, why_not = onnx_export(policy, batch, Path(exports.name))
                    onnx_info = {"skipped": why_not} if why_not else {"path": "kinema.sim2real.export (DDIM sampling step), onnxruntime CPU",
                                                                      "max_steps": args.onnx_max_steps}
                    if path is not None:
                        onnx_files[batch] = path
            for threads in thread_counts:
                torch.set_num_threads(threads)
                for batch in batches:
                    variants = {"chunk": chunk_call(policy, batch), "cycle": cycle_call(policy, batch)}
                    if batch in onnx_files:
                        variants["onnx_chunk"] = onnx_chunk_call(onnx_files[batch], threads)
                    if peer is not None:
                        variants["lerobot_chunk"] = peer_call(peer, batch)
                    timings = interleave(variants, args.rounds, warmup=3,
                                         label=f"{steps} steps, batch {batch}, {threads} thread(s):")
                    entry = {"steps": steps, "threads": threads, "batch": batch,
                             **{name: summarize_ms(values) for name, values in timings.items()}}
                    chunk_s, cycle_s = entry["chunk"]["median_ms"] / 1e3, entry["cycle"]["median_ms"] / 1e3
                    entry["actions_per_s_receding"] = round(batch * policy.config.n_action_steps / cycle_s, 1)
                    entry["actions_per_s_ensemble"] = round(batch / chunk_s, 1)
                    if peer is not None:
                        entry["lerobot_over_kinema_chunk"] = round(entry["lerobot_chunk"]["median_ms"] / entry["chunk"]["median_ms"], 3)
                    results.append(entry)
    finally:
        torch.set_num_threads(original_threads)
        exports.cleanup()

    config = policy.config  # the last model built: every step count shares the architecture
    parameters = sum(p.numel() for p in policy.parameters())
    default_10 = [e for e in results if e["steps"] == 10 and e["batch"] == 1]
    target = {"target_ms": TARGET_MS, "setting": "10 DDIM steps, batch 1",
              "measured_ms": {f"{e['threads']}_threads": e["chunk"]["median_ms"] for e in default_10},
              "measured_onnxruntime_ms": {f"{e['threads']}_threads": e["onnx_chunk"]["median_ms"] for e in default_10 if "onnx_chunk" in e},
              "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    headers = ["steps", "threads", "batch", "chunk ms", "cycle ms", "actions/s receding", "actions/s ensemble"]
    rows = [[e["steps"], e["threads"], e["batch"], e["chunk"]["median_ms"], e["cycle"]["median_ms"],
             e["actions_per_s_receding"], e["actions_per_s_ensemble"]] for e in results]
    if any("onnx_chunk" in e for e in results):
        headers += ["ONNX Runtime chunk ms"]
        for row, e in zip(rows, results):
            row += [e.get("onnx_chunk", {}).get("median_ms")]
    if any("lerobot_chunk" in e for e in results):
        headers += ["LeRobot chunk ms", "LeRobot / kinema"]
        for row, e in zip(rows, results):
            row += [e.get("lerobot_chunk", {}).get("median_ms"), e.get("lerobot_over_kinema_chunk")]
    print(f"Diffusion policy speed on {TASK}'s shapes ({parameters:,} parameters; horizon {config.horizon}, "
          f"{config.n_action_steps} actions per chunk), medians; CPU {target['cpu_capability']}")
    print_table(headers, rows)
    if peer_info.get("skipped"):
        print(f"LeRobot peer not measured: {peer_info['skipped']}")
    return record.finish(
        {"config": {"task": TASK, "policy": "diffusion (defaults)", "horizon": config.horizon,
                    "n_obs_steps": config.n_obs_steps, "n_action_steps": config.n_action_steps, "sampler": "ddim",
                    "steps": step_counts, "batches": batches, "rounds": args.rounds, "quick": args.quick},
         "parameters": parameters, "peer": peer_info, "onnxruntime": onnx_info, "target": target, "results": results},
        out,
    )


if __name__ == "__main__":
    main()
