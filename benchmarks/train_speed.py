"""Training step time: kinema's Decision Transformer against HuggingFace's, same config.

    python benchmarks/train_speed.py            # 100 measured steps per variant, 2 and 1 threads
    python benchmarks/train_speed.py --quick    # a smoke run (2 steps)

One step = zero_grad + policy.loss (forward) + backward + grad-norm clip 0.25 + AdamW
(lr 1e-4, wd 1e-4), the trainer's step. Both models: K = 20, 3 layers, 1 head, 128 dims,
dropout 0.1, batch 64, Hopper dims (obs 11, act 3). Data are random windows built once
(loading excluded) with some left padding, as the window sampler produces. Variants run
interleaved (A B C A B C ...), warm-up rounds excluded; the table reports medians and the
HF/kinema ratios. The headline ratio compares the same model: ``kinema_dt_exact``, kinema's
DT with full context (``attention_window=0``), against ``hf_dt``. kinema's default DT
(``kinema_dt``) uses banded attention, a different model; its ratio is reported beside the
headline (when the default is the full-context model, ``kinema_dt`` is the headline).
Each variant's floating-point operations per step (forward + backward, counted by
``torch.utils.flop_counter``) are reported beside the times: the HF/kinema FLOP ratio of
the same model is what skipping work can buy at equal configuration; beyond it only faster
kernels help. The bf16 variant is kinema's default DT under ``torch.autocast("cpu",
bfloat16)``: DTConfig's own switch when it has one, otherwise applied around ``loss`` by
this harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from kinema.benchmarks.bench_utils import (
    HOPPER_ACT_DIM, HOPPER_OBS_DIM, RunRecord, compared_models, hf_over_kinema, interleave, output_or_error,
    parse_threads, print_hf_over_kinema, print_table, ratio, require_positive, summarize_ms,
)
from kinema.policies import NormStats, Policy, PolicySpec, make_policy

NAME = "train_speed"
# DTConfig field names that would mean "the config offers bf16 autocast".
AUTOCAST_FIELDS = ("autocast", "autocast_dtype", "precision", "amp", "mixed_precision")


def hopper_spec() -> tuple[PolicySpec, NormStats]:
    spec = PolicySpec(HOPPER_OBS_DIM, HOPPER_ACT_DIM, (-1.0,) * HOPPER_ACT_DIM, (1.0,) * HOPPER_ACT_DIM, 1000)
    return spec, NormStats.for_observations(np.zeros(HOPPER_OBS_DIM, np.float32), np.ones(HOPPER_OBS_DIM, np.float32))


def random_windows(batch_size: int, context_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A windows batch (policies/base.py format); a quarter of the rows are left-padded episode starts."""
    starts = torch.randint(0, 980, (batch_size, 1), generator=generator)
    timesteps = starts + torch.arange(context_len)
    real_steps = torch.full((batch_size,), context_len)
    padded = batch_size // 4
    real_steps[:padded] = torch.randint(1, context_len, (padded,), generator=generator)
    mask = torch.arange(context_len)[None, :] >= (context_len - real_steps)[:, None]
    timesteps = torch.where(mask, timesteps - (context_len - real_steps)[:, None], 0)
    shape = (batch_size, context_len)
    keep = mask.unsqueeze(-1)
    return {
        "observations": torch.randn(*shape, HOPPER_OBS_DIM, generator=generator) * keep,
        "actions": (torch.rand(*shape, HOPPER_ACT_DIM, generator=generator) * 2 - 1) * keep,
        "rewards": torch.rand(shape, generator=generator) * 3 * mask,
        "returns_to_go": torch.rand(shape, generator=generator) * 3600 * mask,
        "timesteps": timesteps.long(),
        "mask": mask,
    }


def kinema_dt(spec: PolicySpec, stats: NormStats, **overrides: Any) -> Policy:
    return make_policy({"name": "dt", **overrides}, spec, stats)


def hf_dt(spec: PolicySpec, stats: NormStats) -> Policy:
    """The HF peer, found through the policy registry like any family (its entry point in pyproject.toml)."""
    return make_policy({"name": "hf_dt"}, spec, stats)


def kinema_dt_variants(spec: PolicySpec, stats: NormStats) -> tuple[dict[str, Policy], str, str | None]:
    """kinema's default DT, plus the exact full-context DT when the default is not that model.

    Returns (variants, name of the exact model, name of the banded default or None).
    """
    variants = {"kinema_dt": kinema_dt(spec, stats)}
    if not variants["kinema_dt"].config.attention_window:
        return variants, "kinema_dt", None
    variants["kinema_dt_exact"] = kinema_dt(spec, stats, attention_window=0)
    return variants, "kinema_dt_exact", "kinema_dt"


def bf16_variant(spec: PolicySpec, stats: NormStats) -> tuple[Policy, bool, str]:
    """(policy, wrap loss in autocast here?, how bf16 is switched on)."""
    from kinema.policies.dt import DTConfig

    offered = [f.name for f in dataclasses.fields(DTConfig) if f.name in AUTOCAST_FIELDS]
    if offered:
        field = offered[0]
        value = True if field in ("autocast", "amp", "mixed_precision") else "bf16"
        return kinema_dt(spec, stats, **{field: value}), False, f"DTConfig.{field}={value!r}"
    return kinema_dt(spec, stats), True, "not offered by DTConfig; torch.autocast(cpu, bfloat16) around loss by the harness"


def make_step(policy: Policy, batches: Sequence[dict[str, torch.Tensor]], autocast: bool) -> Callable[[], float]:
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, weight_decay=1e-4)
    policy.train()
    counter = {"i": 0}

    def step() -> float:
        batch = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else nullcontext()
        with context:
            loss, _ = policy.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 0.25)
        optimizer.step()
        elapsed = time.perf_counter() - start
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{policy.name}: non-finite training loss {loss.item()}")
        return elapsed

    return step


def step_flops(policy: Policy, batch: dict[str, torch.Tensor]) -> int:
    """Floating-point operations of one forward + backward (matmuls and attention; the optimizer is not counted)."""
    policy.train()
    with FlopCounterMode(display=False) as counter:
        loss, _ = policy.loss(batch)
        loss.backward()
    policy.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=100, help="measured steps per variant and thread count")
    parser.add_argument("--warmup", type=int, default=10, help="unrecorded steps per variant first")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts")
    parser.add_argument("--no-bf16", action="store_true", help="skip the bf16 autocast variant")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 steps, 1 warm-up, batch 8, 1 thread")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/train_speed.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.warmup, args.batch_size, args.threads = 2, 1, 8, "1"
    require_positive(parser, args, ("steps", "batch_size"))
    out = output_or_error(parser, args.out, NAME)
    thread_counts = parse_threads(args.threads)
    record = RunRecord(NAME, argv)
    original_threads = torch.get_num_threads()

    torch.manual_seed(0)
    spec, stats = hopper_spec()
    generator = torch.Generator().manual_seed(0)
    batches = [random_windows(args.batch_size, 20, generator) for _ in range(8)]
    kinema_variants, exact, banded = kinema_dt_variants(spec, stats)
    policies: dict[str, tuple[Policy, bool]] = {name: (policy, False) for name, policy in kinema_variants.items()}
    policies["hf_dt"] = (hf_dt(spec, stats), False)
    models = compared_models(exact, "hf_dt", banded, kinema_variants["kinema_dt"].config.attention_window)
    bf16_how = None
    if not args.no_bf16:
        bf16_policy, wrap, bf16_how = bf16_variant(spec, stats)
        policies["kinema_dt_bf16"] = (bf16_policy, wrap)
    hf_policy = policies["hf_dt"][0]
    flops = {name: step_flops(policy, batches[0]) for name, (policy, _) in policies.items() if name != "kinema_dt_bf16"}

    per_threads = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            steps = {name: make_step(policy, batches, wrap) for name, (policy, wrap) in policies.items()}
            timings = interleave(steps, rounds=args.steps, warmup=args.warmup, label=f"{threads} thread(s):")
            summary = {name: summarize_ms(values) for name, values in timings.items()}
            entry: dict[str, Any] = {"threads": threads, "step_time": summary,
                                     "hf_over_kinema": hf_over_kinema(models, lambda name: summary[name]["median_ms"])}
            if "kinema_dt_bf16" in summary:
                entry["ratio_fp32_over_bf16"] = ratio(summary["kinema_dt"]["median_ms"], summary["kinema_dt_bf16"]["median_ms"])
            per_threads.append(entry)
    finally:
        torch.set_num_threads(original_threads)

    rows = []
    for entry in per_threads:
        for name, stat in entry["step_time"].items():
            rows.append([entry["threads"], name, stat["median_ms"], stat["p99_ms"], stat["count"],
                         ratio(stat["median_ms"], entry["step_time"]["kinema_dt"]["median_ms"])])
    print(f"training step, batch {args.batch_size}, K=20, 3x128, 1 head, hopper dims (median over interleaved steps)")
    print_table(["threads", "variant", "median ms", "p99 ms", "steps", "x kinema_dt"], rows)
    print_hf_over_kinema(per_threads, "hf_over_kinema")
    return record.finish(
        {
            "config": {
                "batch_size": args.batch_size, "context_len": 20, "n_layers": 3, "n_heads": 1, "embed_dim": 128,
                "dropout": 0.1, "obs_dim": HOPPER_OBS_DIM, "act_dim": HOPPER_ACT_DIM, "optimizer": "AdamW lr 1e-4 wd 1e-4",
                "grad_clip": 0.25, "steps": args.steps, "warmup": args.warmup, "quick": args.quick,
                "default_attention_window": kinema_variants["kinema_dt"].config.attention_window,
            },
            "parameters": {name: sum(p.numel() for p in policy.parameters()) for name, (policy, _) in policies.items()},
            "hf_attention_implementation": hf_policy.attention_implementation,
            "gflop_per_step": {name: round(count / 1e9, 3) for name, count in flops.items()},
            "compared_models": models,
            "flop_ratio_hf_over_kinema": hf_over_kinema(models, flops.__getitem__),
            "bf16": bf16_how,
            "results": per_threads,
        },
        out,
    )


if __name__ == "__main__":
    main()
