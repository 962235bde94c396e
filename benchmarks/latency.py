"""Per-action latency at batch 1: kinema's rollout path against HuggingFace-style full-window recompute.

    python benchmarks/latency.py            # 10 episodes x 200 steps per variant, 1 and 2 threads
    python benchmarks/latency.py --quick    # a smoke run

Each variant plays whole episodes the way a controller calls a policy: ``reset(1,
target_return=3600)`` once, then per step ``act(obs)`` (timed, one sample per call) and
``observe_reward(r)`` (not timed). Episodes of 200 steps are ten times the context K = 20,
so most calls happen after the context has started to slide. Observations and rewards are
random (no simulator in the timing). Variants, interleaved episode by episode after one
unrecorded warm-up episode each:

- ``kinema_dt``: kinema's DT as configured by default (``policies/dt.py``; a banded model
  decodes every step through its KV-cache ring, with no recompute);
- ``kinema_dt_exact``: the exact full-context DT (``attention_window=0``): KV cache while
  the context fills, then one batched window recompute per step, which sliding requires;
  listed when the default is not that model;
- ``kinema_dt_recompute``: the exact model with ``inference.use_kv_cache=False`` (recompute every step);
- ``hf_dt``: HF's ``DecisionTransformerModel`` re-run on the whole left-padded window at
  every step, as HF's and kzl's evaluation loops do;
- ``kinema_dt_runtime`` and ``kinema_dt_exact_runtime``: the same two kinema models served by the
  inference runtime (``kinema.sim2real.runtime.PolicyRuntime``: the pure step functions, without
  ``act``'s per-call checks and conversions), and ``kinema_dt_compiled``: the banded default's step
  through ``torch.compile`` (compiled before timing; ``--no-compile`` skips it).

Reported: p50 and p99 over all calls, and p50 separately for calls made while the context
fills (step < K) and once it slides (step >= K). The headline HF / kinema p50 ratio compares
the same model, the exact DT (``kinema_dt_exact``, or ``kinema_dt`` when the default is
exact), with ``hf_dt``; the banded default's ratio (a different model) is reported beside it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from kinema.benchmarks.bench_utils import (
    RunRecord, compared_models, hf_over_kinema, interleave, output_or_error, parse_threads, print_hf_over_kinema,
    print_table, ratio, require_positive, summarize_ms,
)
from kinema.benchmarks.train_speed import hf_dt, hopper_spec, kinema_dt, kinema_dt_variants
from kinema.policies import Policy

NAME = "latency"
CONTEXT_LEN = 20
TARGET_RETURN = 3600.0


def build_variants() -> tuple[dict[str, Policy], dict[str, dict[str, str]]]:
    """(variants by name, the models each HF / kinema ratio compares)."""
    torch.manual_seed(0)
    spec, stats = hopper_spec()
    variants, exact, banded = kinema_dt_variants(spec, stats)
    recompute = kinema_dt(spec, stats, attention_window=0)
    recompute.load_state_dict(variants[exact].state_dict())
    recompute.configure_inference(use_kv_cache=False)
    variants.update({"kinema_dt_recompute": recompute, "hf_dt": hf_dt(spec, stats)})
    for policy in variants.values():
        policy.eval()
    return variants, compared_models(exact, "hf_dt", banded, variants["kinema_dt"].config.attention_window)


class RuntimeVariant:
    """A PolicyRuntime at batch 1 behind the reset/act/observe_reward calls the episodes make."""

    def __init__(self, policy: Policy, compile: bool = False):
        from kinema.sim2real.runtime import PolicyRuntime

        self.runtime = PolicyRuntime(policy, batch_size=1, target_return=TARGET_RETURN, compile=compile)
        self.spec = policy.spec

    def reset(self, num_envs: int, target_return: float) -> None:
        self.runtime.reset()

    def act(self, observation: np.ndarray) -> np.ndarray:
        return self.runtime.act(observation)

    def observe_reward(self, reward: np.ndarray) -> None:
        self.runtime.observe_reward(reward)


def add_runtime_variants(variants: dict[str, Any], models: dict[str, dict[str, str]]) -> None:
    """The kinema models again, served by the inference runtime (copies: a runtime owns its policy's rollout)."""
    import copy

    exact = models["same_model"]["kinema"]
    variants["kinema_dt_runtime"] = RuntimeVariant(copy.deepcopy(variants["kinema_dt"]))
    if exact != "kinema_dt":
        variants["kinema_dt_exact_runtime"] = RuntimeVariant(copy.deepcopy(variants[exact]))


def compiled_variant(variants: dict[str, Any]) -> RuntimeVariant:
    """The banded default through torch.compile, compiled at the current thread count: torch.compile guards
    on it, so another count is a recompile, which the runtime refuses after warm-up."""
    import copy

    return RuntimeVariant(copy.deepcopy(variants["kinema_dt"]), compile=True)


def make_episode(policy: Any, observations: np.ndarray, rewards: np.ndarray) -> Callable[[], np.ndarray]:
    """One episode: per-step act() durations in seconds."""

    def episode() -> np.ndarray:
        durations = np.empty(len(observations))
        policy.reset(1, target_return=TARGET_RETURN)
        for step, obs in enumerate(observations):
            start = time.perf_counter()
            policy.act(obs)  # act() runs under torch.no_grad() itself, as evaluate() calls it
            durations[step] = time.perf_counter() - start
            policy.observe_reward(rewards[step])
        return durations

    return episode


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=10, help="measured episodes per variant and thread count")
    parser.add_argument("--episode-steps", type=int, default=200)
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 episode of 25 steps, 1 thread, no compile")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant (compiling takes a minute)")
    parser.add_argument("--out", type=Path, default=None, help="JSON file (default: benchmarks/results/latency.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.episode_steps, args.threads, args.no_compile = 1, CONTEXT_LEN + 5, "1", True
    require_positive(parser, args, ("episodes", "episode_steps"))
    out = output_or_error(parser, args.out, NAME)
    thread_counts = parse_threads(args.threads)
    record = RunRecord(NAME, argv)
    original_threads = torch.get_num_threads()

    variants, models = build_variants()
    add_runtime_variants(variants, models)
    rng = np.random.default_rng(0)
    observations = rng.normal(size=(args.episode_steps, 1, variants["hf_dt"].spec.obs_dim)).astype(np.float32)
    rewards = rng.uniform(0.0, 3.0, size=(args.episode_steps, 1))
    results = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            if not args.no_compile:
                variants["kinema_dt_compiled"] = compiled_variant(variants)
            episodes = {name: make_episode(policy, observations, rewards) for name, policy in variants.items()}
            recorded = interleave(episodes, rounds=args.episodes, warmup=1, label=f"{threads} thread(s):")
            per_variant = {}
            for name, runs in recorded.items():
                durations = np.stack(runs)  # (episodes, steps)
                stats = summarize_ms(durations.ravel())
                stats["filling_median_ms"] = summarize_ms(durations[:, :CONTEXT_LEN].ravel())["median_ms"]
                if args.episode_steps > CONTEXT_LEN:
                    stats["sliding_median_ms"] = summarize_ms(durations[:, CONTEXT_LEN:].ravel())["median_ms"]
                per_variant[name] = stats
            results.append({
                "threads": threads,
                "act_latency": per_variant,
                "hf_over_kinema_p50": hf_over_kinema(models, lambda name: per_variant[name]["median_ms"]),
            })
    finally:
        torch.set_num_threads(original_threads)

    rows = []
    for entry in results:
        for name, stat in entry["act_latency"].items():
            rows.append([entry["threads"], name, stat["median_ms"], stat["p99_ms"], stat["filling_median_ms"],
                         stat.get("sliding_median_ms", "-"), stat["count"],
                         ratio(entry["act_latency"]["hf_dt"]["median_ms"], stat["median_ms"])])
    print(f"act() latency at batch 1, episodes of {args.episode_steps} steps, K={CONTEXT_LEN}, 3x128, 1 head, hopper dims")
    print_table(["threads", "variant", "p50 ms", "p99 ms", "p50 filling", "p50 sliding", "calls", "hf_dt / this"], rows)
    print_hf_over_kinema(results, "hf_over_kinema_p50", " p50")
    return record.finish(
        {
            "config": {"context_len": CONTEXT_LEN, "episode_steps": args.episode_steps, "episodes": args.episodes,
                       "target_return": TARGET_RETURN, "batch": 1, "quick": args.quick,
                       "default_attention_window": variants["kinema_dt"].config.attention_window},
            "hf_attention_implementation": variants["hf_dt"].attention_implementation,
            "compared_models": models,
            "results": results,
        },
        out,
    )


if __name__ == "__main__":
    main()
