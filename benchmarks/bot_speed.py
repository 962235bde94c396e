"""Body Transformer compute: training step time and per-action latency against a vanilla transformer and an MLP.

    python benchmarks/bot_speed.py             # ant, batch 1 and 64, 1 thread, 200 interleaved rounds
    python benchmarks/bot_speed.py --quick     # a smoke run

Models (ant's body graph, 9 nodes; parameter counts are recorded beside every figure):

- ``bot_hard``, ``bot_mix``: kinema's Body Transformer at its defaults (4 layers x 64, 2 heads);
- ``bot_vanilla``: the same model without the body mask (the ablation: same parameters, same work);
- ``mlp_matched``: BC's MLP widened to about BoT's parameter count (2 x 360, as the quality
  grid's ``bc_matched``), and ``mlp``: BC's default 2 x 256.

Training step: ``loss`` + ``backward`` + one Adam step on a random batch. Action latency:
``act`` on one batch of observations (what a controller or a batched evaluation calls).
Variants are interleaved round by round (A B C D A B C D ...), after warm-up rounds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kinema.benchmarks.bench_utils import (
    RunRecord, interleave, output_or_error, parse_positive_ints, parse_threads, print_table, ratio, require_positive, summarize_ms,
)
from kinema.benchmarks.quality import VARIANTS

NAME = "bot_speed"
TASK = "ant"
MODELS = {
    "bot_hard": {"name": "bot", "variant": "hard"},
    "bot_mix": {"name": "bot", "variant": "mix"},
    "bot_vanilla": {"name": "bot", "variant": "vanilla"},
    "mlp_matched": {"name": "bc", **VARIANTS["bc_matched"].overrides},  # one place for the matched width
    "mlp": {"name": "bc"},
}


def build_models(task: str = TASK) -> dict[str, Any]:
    from kinema.envs import task_spaces
    from kinema.envs.bodygraph import derive_body_graph
    from kinema.policies import NormStats, PolicySpec, make_policy

    obs_dim, act_dim, low, high = task_spaces(task)
    spec = PolicySpec(obs_dim, act_dim, low, high, 1000, {"body_graph": derive_body_graph(task).to_dict()})
    stats = NormStats.for_observations(np.zeros(obs_dim, np.float32), np.ones(obs_dim, np.float32))
    torch.manual_seed(0)
    return {name: make_policy(config, spec, stats) for name, config in MODELS.items()}


def parameter_count(policy: Any) -> int:
    """Parameters that take part (BoT's batched per-node maps have padding, which is not counted)."""
    return getattr(policy, "trained_parameter_count", None) or sum(p.numel() for p in policy.parameters())


def train_step(policy: Any, batch_size: int) -> Callable[[], float]:
    optimiser = torch.optim.Adam(policy.parameters(), lr=1e-4)
    rng = np.random.default_rng(0)
    batch = {"observations": torch.as_tensor(rng.normal(size=(batch_size, policy.spec.obs_dim)), dtype=torch.float32),
             "actions": torch.as_tensor(rng.uniform(-1, 1, size=(batch_size, policy.spec.act_dim)), dtype=torch.float32)}

    def step() -> float:
        start = time.perf_counter()
        loss, _ = policy.loss(batch)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        return time.perf_counter() - start

    return step


def act_call(policy: Any, batch_size: int) -> Callable[[], float]:
    observations = np.random.default_rng(1).normal(size=(batch_size, policy.spec.obs_dim)).astype(np.float32)

    def call() -> float:
        policy.reset(batch_size)
        start = time.perf_counter()
        policy.act(observations)
        return time.perf_counter() - start

    return call


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="measured rounds per variant, batch size and thread count")
    parser.add_argument("--batches", default="1,64", help="comma-separated batch sizes")
    parser.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 3 rounds, batch 1 and 4, 1 thread")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/bot_speed.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.batches, args.threads = 3, "1,4", "1"
    require_positive(parser, args, ("rounds",))
    out = output_or_error(parser, args.out, NAME)
    batches, thread_counts = parse_positive_ints(args.batches, "--batches"), parse_threads(args.threads)
    record = RunRecord(NAME, argv)
    models = build_models()
    counts = {name: parameter_count(policy) for name, policy in models.items()}
    original_threads = torch.get_num_threads()
    results = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for batch in batches:
                for policy in models.values():
                    policy.train()
                steps = interleave({n: train_step(p, batch) for n, p in models.items()}, args.rounds, warmup=5,
                                   label=f"train step, batch {batch}, {threads} thread(s):")
                for policy in models.values():
                    policy.eval()
                acts = interleave({n: act_call(p, batch) for n, p in models.items()}, args.rounds, warmup=5,
                                  label=f"act, batch {batch}, {threads} thread(s):")
                entry = {"threads": threads, "batch": batch,
                         "train_step": {n: summarize_ms(v) for n, v in steps.items()},
                         "act": {n: summarize_ms(v) for n, v in acts.items()}}
                entry["bot_mix_over"] = {
                    what: {other: ratio(entry[what]["bot_mix"]["median_ms"], entry[what][other]["median_ms"])
                           for other in ("bot_vanilla", "mlp_matched", "mlp")}
                    for what in ("train_step", "act")}
                results.append(entry)
    finally:
        torch.set_num_threads(original_threads)

    rows = [[e["threads"], e["batch"], name, counts[name], e["train_step"][name]["median_ms"], e["act"][name]["median_ms"]]
            for e in results for name in models]
    print(f"Body Transformer compute on {TASK} ({models['bot_mix'].encoder.num_nodes} body nodes), medians")
    print_table(["threads", "batch", "model", "parameters", "train step ms", "act ms"], rows)
    return record.finish(
        {"config": {"task": TASK, "models": MODELS, "rounds": args.rounds, "batches": batches, "quick": args.quick},
         "parameters": counts, "results": results},
        out,
    )


if __name__ == "__main__":
    main()
