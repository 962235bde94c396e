"""What the Agentic Transformer would cost trained on whole chains, the paper's context.

    python benchmarks/chain_cost.py                                      # walker2d-medium-replay
    python benchmarks/chain_cost.py --dataset hopper-medium-replay
    python benchmarks/chain_cost.py --dataset-path my.hdf5 --env hopper  # any D4RL/Minari file
    python benchmarks/chain_cost.py --quick --dataset-path tiny.hdf5     # a smoke run

kinema trains AT on K-step windows cut from its chains (``kinema.policies.at`` says why).
This benchmark puts a number on the alternative. It draws chains exactly as kinema's
chain sampler does (``ChainSampler.chain_steps``: 1..max_chain_len episodes, each in
proportion to its length) and records their total length in steps. The work of one
training sample, forward + backward of kinema's AT (3 layers x 128, full attention),
is counted by ``torch.utils.flop_counter``: it is a quadratic in the context length
(linear layers grow with it, attention with its square), so three small exact counts
give it everywhere, and a fourth count at a longer context checks the fit. A chain of L
steps then costs FLOPs(L) against FLOPs(K) for a window; the ratio, averaged over the
drawn chains, is what whole chains multiply the training work by (a lower bound: a
batch of chains of unequal length is padded to its longest).

The hours column turns that work into time at the FLOP rate kinema's full-context DT
training step reached in ``benchmarks/results/train_speed.json`` (same model, K = 20; the
default DT's rate in results written before train_speed measured both); long-context
attention runs at a lower rate than those short matmuls, so it too is a lower bound.
No training step is timed here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from numpy.polynomial import polynomial
from torch.utils.flop_counter import FlopCounterMode

from kinema.benchmarks.bench_utils import RESULTS_DIR, RunRecord, output_or_error, print_table, require_positive

NAME = "chain_cost"
FIT_LENGTHS = (8, 16, 32)  # context lengths of the three exact counts that fix the quadratic


def draw_chain_lengths(dataset: Any, max_chain_len: int, chains: int, seed: int) -> np.ndarray:
    """Total steps of `chains` chains drawn by kinema's chain sampler."""
    from kinema.datasets.samplers.chains import ChainSampler

    batch_size = min(chains, 4096)
    sampler = ChainSampler(dataset, batch_size=batch_size, seed=seed, context_len=1, max_chain_len=max_chain_len)
    batches = -(-chains // batch_size)
    return np.concatenate([sampler.chain_steps()["chain_total_steps"] for _ in range(batches)])[:chains]


def sample_flops(spec: Any, stats: Any, context_len: int) -> int:
    """Forward + backward FLOPs of kinema's AT (full attention) on one chains sample of `context_len` real steps."""
    from kinema.policies import make_policy

    policy = make_policy({"name": "at", "context_len": context_len, "attention_window": 0}, spec, stats).train()
    generator = torch.Generator().manual_seed(0)
    shape = (1, context_len)
    batch = {
        "observations": torch.randn(*shape, spec.obs_dim, generator=generator),
        "actions": torch.rand(*shape, spec.act_dim, generator=generator) * 2 - 1,
        "rewards": torch.rand(shape, generator=generator),
        "returns_to_go": torch.rand(shape, generator=generator) * 1000,
        "timesteps": torch.arange(context_len).clamp(max=999).unsqueeze(0),
        "mask": torch.ones(shape, dtype=torch.bool),
        "completions": torch.zeros(shape),
    }
    with FlopCounterMode(display=False) as counter:
        loss, _ = policy.loss(batch)
        loss.backward()
    return counter.get_total_flops()


def fit_flops(spec: Any, stats: Any, check_len: int) -> tuple[np.ndarray, dict[str, float]]:
    """Coefficients (c0, c1, c2) of FLOPs(L) = c0 + c1 L + c2 L^2, and the check at `check_len`."""
    counts = [sample_flops(spec, stats, n) for n in FIT_LENGTHS]
    coefficients = polynomial.polyfit(FIT_LENGTHS, counts, 2)  # three points: the exact quadratic
    counted = sample_flops(spec, stats, check_len)
    predicted = float(polynomial.polyval(check_len, coefficients))
    return coefficients, {"context_len": check_len, "counted_gflop": counted / 1e9, "fit_gflop": predicted / 1e9,
                          "relative_error": abs(predicted - counted) / counted}


def train_speed_rates(path: Path | None) -> list[dict[str, float]]:
    """kinema's full-context DT training FLOP rate per thread count from train_speed.json ([] when absent)."""
    if path is None or not path.is_file():
        return []
    data = json.loads(path.read_text())
    variant = data.get("compared_models", {}).get("same_model", {}).get("kinema", "kinema_dt")
    gflop = data["gflop_per_step"][variant]
    return [{"threads": entry["threads"], "gflop_per_s": gflop / (entry["step_time"][variant]["median_ms"] / 1000)}
            for entry in data["results"]]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="walker2d-medium-replay", help="suite dataset name")
    parser.add_argument("--dataset-path", type=Path, default=None, help="a D4RL HDF5 file or Minari dir instead of --dataset")
    parser.add_argument("--env", default=None, help="task of --dataset-path when its metadata does not say")
    parser.add_argument("--max-chain-len", type=int, default=4, help="episodes per chain, at most (AT's default)")
    parser.add_argument("--context-len", type=int, default=20, help="K, the window AT trains on")
    parser.add_argument("--chains", type=int, default=20000, help="chains drawn to average over")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5000, help="training budget the hours column prices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-speed", type=Path, default=RESULTS_DIR / "train_speed.json" if RESULTS_DIR else None,
                        help="train_speed.json whose FLOP rate prices the hours (default: the checkout's)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 256 chains")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/chain_cost.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.chains = 256
    require_positive(parser, args, ("max_chain_len", "context_len", "chains", "batch_size", "steps"))
    out = output_or_error(parser, args.out, NAME)
    from kinema.envs import task_spaces
    from kinema.policies import NormStats, PolicySpec
    from kinema.train.data import resolve_dataset

    record = RunRecord(NAME, argv)
    data = resolve_dataset({"path": str(args.dataset_path)} if args.dataset_path else {"name": args.dataset}, args.env)
    obs_dim, act_dim, _, _ = task_spaces(data.task)
    spec = PolicySpec(obs_dim, act_dim, (-1.0,) * act_dim, (1.0,) * act_dim)
    stats = NormStats.for_observations(np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32))

    lengths = draw_chain_lengths(data.dataset, args.max_chain_len, args.chains, args.seed)
    coefficients, check = fit_flops(spec, stats, check_len=4 * FIT_LENGTHS[-1] if args.quick else 512)
    flops = polynomial.polyval(lengths.astype(np.float64), coefficients)
    window = float(polynomial.polyval(args.context_len, coefficients))
    whole_chain = float(flops.mean())
    hours = [{"threads": rate["threads"],
              "window_h": args.steps * args.batch_size * window / 1e9 / rate["gflop_per_s"] / 3600,
              "whole_chain_h": args.steps * args.batch_size * whole_chain / 1e9 / rate["gflop_per_s"] / 3600,
              "gflop_per_s": rate["gflop_per_s"]} for rate in train_speed_rates(args.train_speed)]

    episode_lengths = np.asarray(data.dataset.episode_lengths)
    summary = {"chain_steps_mean": float(lengths.mean()), "chain_steps_p50": float(np.median(lengths)),
               "chain_steps_p90": float(np.percentile(lengths, 90)), "chain_steps_max": int(lengths.max()),
               "episode_steps_median": float(np.median(episode_lengths)), "episodes": int(len(episode_lengths))}
    print(f"{data.name}: chains of 1..{args.max_chain_len} episodes, {args.chains} drawn: "
          f"{summary['chain_steps_mean']:.0f} steps on average (3 tokens each)")
    print_table(["sample", "steps", "GFLOP", "x window"],
                [["window", args.context_len, window / 1e9, 1.0], ["whole chain (mean)", summary["chain_steps_mean"], whole_chain / 1e9,
                                                                   whole_chain / window]])
    for entry in hours:
        print(f"{entry['threads']} thread(s), {args.steps} steps x batch {args.batch_size}: windows {entry['window_h']:.2f} h, "
              f"whole chains >= {entry['whole_chain_h']:.1f} h")
    return record.finish(
        {
            "config": {"dataset": data.name, "max_chain_len": args.max_chain_len, "context_len": args.context_len,
                       "chains": args.chains, "batch_size": args.batch_size, "steps": args.steps, "seed": args.seed,
                       "model": "kinema AT, 3 layers × 128, 1 head, full attention", "quick": args.quick},
            "chains": summary,
            "flops_fit": {"coefficients": coefficients.tolist(), "fit_lengths": list(FIT_LENGTHS), "check": check},
            "gflop_per_sample": {"window": window / 1e9, "whole_chain_mean": whole_chain / 1e9},
            "ratio_whole_chain_over_window": whole_chain / window,
            "training_hours": hours,
            "train_speed_source": str(args.train_speed) if hours else None,
        },
        out,
    )


if __name__ == "__main__":
    main()
