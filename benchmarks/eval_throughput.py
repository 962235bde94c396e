"""Evaluation throughput: kinema's batched evaluation against one-episode-at-a-time batch-1 evaluation.

    python benchmarks/eval_throughput.py            # 10 Hopper-v5 episodes of 1000 steps, 3 repeats
    python benchmarks/eval_throughput.py --quick    # a smoke run

Randomly initialised kinema DTs (K = 20, 3x128, 1 head) play the same 10 episodes
(episode i seeded seed + i) in every variant. A random DT falls within tens of steps, so
Hopper-v5 runs with ``terminate_when_unhealthy=False``: every episode lasts exactly
``--episode-steps`` steps and the context slides for most of it, as in a real evaluation.

- ``kinema_batched``: ``kinema.envs.evaluate`` over 10 environments, one batched ``act``
  per step, DT as configured by default (``policies/dt.py``);
- ``kinema_sequential``: the same model one episode at a time at batch 1, decoding as
  ``kinema_batched`` does (what batching alone buys);
- ``kinema_batched_exact``: ``evaluate`` with an exact full-context DT
  (``attention_window=0``: KV cache while the context fills, then one batched window
  recompute per step); listed when the default is not that model;
- ``sequential_recompute``: how kzl, CORL and HF evaluate: a loop over episodes, each
  with its own environment, batch-1 ``act`` recomputing the whole window (the exact model);
  the table's ``x sequential`` ratios are over this loop;
- ``sequential_hf_dt``: the same loop with HF's ``DecisionTransformerModel`` (the peer);
- ``env_only``: the same loop with zero actions and no policy, the simulator's ceiling.

On a 2-core machine whose other core is busy, use ``--threads 1`` (docs/benchmarks.md says
what 2 threads did there).

Throughput is env-steps per second of wall time, environment creation included; variants
run interleaved per repeat after a short unrecorded warm-up run each, and the table reports
medians and ratios to the sequential loop, per torch thread count. The headline HF / kinema
ratio (time per env step) compares the same model: kinema's batched evaluation of the exact
DT (``kinema_batched_exact``, or ``kinema_batched`` when the default is exact) against HF's
sequential loop (``sequential_hf_dt``); the banded default's ratio (``kinema_batched``, a
different model) is reported beside it.
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
    print_table, ratio, require_positive,
)
from kinema.benchmarks.train_speed import hf_dt, hopper_spec, kinema_dt, kinema_dt_variants
from kinema.envs import TaskSpec, evaluate, get_task, make_env
from kinema.policies import Policy

NAME = "eval_throughput"
TARGET_RETURN = 3600.0
WARMUP_STEPS = 25  # episode length of the unrecorded warm-up run of each variant
CHECK_STEPS = 60  # episode length of the batched-vs-sequential return check (3 contexts)


def fixed_length_hopper(episode_steps: int) -> TaskSpec:
    """Hopper-v5 whose episodes always run ``episode_steps`` steps (no termination on falling)."""
    hopper = get_task("hopper")
    return TaskSpec(hopper.name, hopper.gym_id, episode_steps, hopper.d4rl_ref_min, hopper.d4rl_ref_max,
                    (("terminate_when_unhealthy", False),))


def run_batched(policy: Policy, task: TaskSpec, episodes: int, seed: int) -> tuple[int, float, list[float]]:
    start = time.perf_counter()
    result = evaluate(policy, task, episodes=episodes, seed=seed, num_envs=episodes,
                      conditioning={"target_return": TARGET_RETURN})
    return result.env_steps, time.perf_counter() - start, result.returns


def run_sequential(policy: Policy | None, task: TaskSpec, episodes: int, seed: int) -> tuple[int, float, list[float]]:
    """One episode at a time, each with its own environment and a batch-1 policy (None: zero actions)."""
    steps, returns = 0, []
    start = time.perf_counter()
    for episode in range(episodes):
        env = make_env(task)
        low, high = env.action_space.low, env.action_space.high
        observation, _ = env.reset(seed=seed + episode)
        if policy is not None:
            policy.reset(1, target_return=TARGET_RETURN)
        total, done = 0.0, False
        while not done:
            if policy is None:
                action = np.zeros_like(low)
            else:
                with torch.no_grad():
                    action = np.clip(policy.act(observation[None]).numpy()[0], low, high)
            observation, reward, terminated, truncated, _ = env.step(action)
            if policy is not None:
                policy.observe_reward([reward])
            total += float(reward)
            steps += 1
            done = terminated or truncated
        returns.append(total)
        env.close()
    return steps, time.perf_counter() - start, returns


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--episode-steps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="measured repeats per variant")
    parser.add_argument("--threads", default="2,1", help="comma-separated torch thread counts")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--no-hf", action="store_true", help="skip the sequential HF variant (the slowest)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 episodes of 30 steps, 1 repeat")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON file (default: benchmarks/results/eval_throughput.json in a checkout)")
    args = parser.parse_args(argv)
    if args.quick:
        args.episodes, args.episode_steps, args.repeats, args.threads = 2, 30, 1, "1"
    require_positive(parser, args, ("episodes", "episode_steps", "repeats"))
    out = output_or_error(parser, args.out, NAME)
    thread_counts = parse_threads(args.threads)
    record = RunRecord(NAME, argv)
    original_threads = torch.get_num_threads()

    task = fixed_length_hopper(args.episode_steps)
    warmup_task = fixed_length_hopper(WARMUP_STEPS)
    torch.manual_seed(0)
    spec, stats = hopper_spec()
    kinema_variants, exact_name, banded_name = kinema_dt_variants(spec, stats)
    model, exact = kinema_variants["kinema_dt"].eval(), kinema_variants[exact_name].eval()
    recompute = kinema_dt(spec, stats, attention_window=0).eval()
    recompute.load_state_dict(exact.state_dict())  # the same model, decoding by full recompute
    recompute.configure_inference(use_kv_cache=False)
    runners: dict[str, Callable[[TaskSpec], tuple[int, float, list[float]]]] = {
        "kinema_batched": lambda t: run_batched(model, t, args.episodes, args.seed),
        "kinema_sequential": lambda t: run_sequential(model, t, args.episodes, args.seed),
    }
    if banded_name is not None:
        runners["kinema_batched_exact"] = lambda t: run_batched(exact, t, args.episodes, args.seed)
    runners["sequential_recompute"] = lambda t: run_sequential(recompute, t, args.episodes, args.seed)
    models: dict[str, dict[str, str]] = {}
    if not args.no_hf:
        hf_model = hf_dt(spec, stats).eval()
        runners["sequential_hf_dt"] = lambda t: run_sequential(hf_model, t, args.episodes, args.seed)
        models = compared_models("kinema_batched_exact" if banded_name else "kinema_batched", "sequential_hf_dt",
                                 "kinema_batched" if banded_name else None, model.config.attention_window)
    runners["env_only"] = lambda t: run_sequential(None, t, args.episodes, args.seed)

    results = []
    try:
        for threads in thread_counts:
            torch.set_num_threads(threads)
            for run in runners.values():  # warm-up: short episodes, first-call costs excluded
                run(warmup_task)
            recorded = interleave({name: (lambda run=run: run(task)) for name, run in runners.items()},
                                  rounds=args.repeats, warmup=0, label=f"{threads} thread(s):")
            entry = summarize_throughput(threads, recorded)
            if models:
                entry["hf_over_kinema"] = hf_over_kinema(models, lambda name: 1.0 / entry["throughput"][name]["env_steps_per_s_median"])
            # Same model, same seeds: batched decoding must play the episodes batch-1 decoding plays.
            # Checked on episodes of 3K steps (the context slides): over 1000 steps the chaotic
            # dynamics of a flailing hopper amplify float rounding into different trajectories.
            check_task = fixed_length_hopper(CHECK_STEPS)
            checks = {"batched_vs_sequential": (lambda t: run_batched(model, t, args.episodes, args.seed),
                                                runners["kinema_sequential"]),
                      "exact_batched_vs_sequential_recompute": (lambda t: run_batched(exact, t, args.episodes, args.seed),
                                                                runners["sequential_recompute"])}
            for check, (batched, sequential) in checks.items():
                difference = np.abs(np.asarray(batched(check_task)[2]) - np.asarray(sequential(check_task)[2])).max()
                entry[f"max_return_difference_{check}"] = float(difference)
            entry["return_check_episode_steps"] = CHECK_STEPS
            results.append(entry)
    finally:
        torch.set_num_threads(original_threads)

    rows = [[entry["threads"], name, stat["env_steps_per_s_median"], stat["wall_s_median"], stat["env_steps"],
             stat["ratio_over_sequential"]]
            for entry in results for name, stat in entry["throughput"].items()]
    print(f"evaluation throughput, Hopper-v5, {args.episodes} episodes x {args.episode_steps} steps, "
          f"random-init DT (median of {args.repeats})")
    print_table(["threads", "variant", "env-steps/s", "wall s", "env steps", "x sequential"], rows)
    print_hf_over_kinema(results, "hf_over_kinema", " (time per env step)")
    for entry in results:
        print(f"{entry['threads']} thread(s): max |return difference| over {CHECK_STEPS}-step episodes, same model and "
              f"seeds: batched vs sequential {entry['max_return_difference_batched_vs_sequential']:.3g}, exact batched "
              f"vs sequential recompute {entry['max_return_difference_exact_batched_vs_sequential_recompute']:.3g}")
    return record.finish(
        {
            "config": {"task": "Hopper-v5 (terminate_when_unhealthy=False)", "episodes": args.episodes,
                       "episode_steps": args.episode_steps, "repeats": args.repeats, "seed": args.seed,
                       "target_return": TARGET_RETURN, "num_envs_batched": args.episodes, "quick": args.quick,
                       "default_attention_window": model.config.attention_window},
            "compared_models": models,
            "results": results,
        },
        out,
    )


def summarize_throughput(threads: int, recorded: dict[str, list[tuple[int, float, list[float]]]]) -> dict[str, Any]:
    throughput = {}
    for name, runs in recorded.items():
        rates = [steps / seconds for steps, seconds, _ in runs]
        throughput[name] = {
            "env_steps_per_s_median": round(float(np.median(rates)), 1),
            "env_steps_per_s_all": [round(rate, 1) for rate in rates],
            "env_steps": runs[0][0],
            "wall_s_median": round(float(np.median([seconds for _, seconds, _ in runs])), 3),
        }
    baseline = throughput["sequential_recompute"]["env_steps_per_s_median"]
    for entry in throughput.values():
        entry["ratio_over_sequential"] = ratio(entry["env_steps_per_s_median"], baseline)
    return {
        "threads": threads,
        "throughput": throughput,
        "ratio_batched_over_sequential": throughput["kinema_batched"]["ratio_over_sequential"],
    }


if __name__ == "__main__":
    main()
