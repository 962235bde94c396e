"""Online RL with the Body Transformer: PPO with BoT-Mix against PPO with stable-baselines3's default MLP.

    python benchmarks/rl_quality.py                                  # ant and hopper, 3 seeds, 500k steps each
    python benchmarks/rl_quality.py --tasks ant --seeds 1 --steps 40960
    python benchmarks/rl_quality.py --status                         # report and rebuild the JSON and PNG only
    python benchmarks/rl_quality.py --quick --results-dir /tmp/rl    # a smoke run

Each run is ``kinema-rl`` (``kinema.train.rl.run_rl``) in its own directory,
``<results>/rl_runs/<task>/<network>/seed<k>/``: the same PPO hyper-parameters (``kinema.train.ppo.PPO_RECIPE``)
for both networks (BoT-Mix at its defaults, 4x64; SB3's default MlpPolicy, 64x64), evaluation of the exported actor every ``--snapshot-every`` steps over
``--eval-episodes`` deterministic episodes. Runs resume where they stopped (kill it at any time and
run the same command again); finished runs are skipped. After every run ``<results>/rl_quality.json``
(per run: the curve and the final evaluation; per task and network: mean ± std over seeds of the last
evaluation) and ``rl_quality.png`` (mean curves with their seed range) are rebuilt from what is on disk.
The run directories' .gitignore keeps only their curve.json, eval.json and cell.json (the commit
and config that started the run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kinema.benchmarks.bench_utils import RunRecord, git_commit, print_table, require_positive, results_dir_or_error, write_json
from kinema.policies.ppo import NETWORKS

NAME = "rl_quality"
LABELS = {"bot": "PPO, BoT-Mix (4x64)", "mlp": "PPO, SB3 default MLP (64x64)"}
RUNS_GITIGNORE = "# Only the small result files of each run are committed.\n*\n!*/\n!.gitignore\n!curve.json\n!eval.json\n!cell.json\n"


def run_dir(results: Path, task: str, network: str, seed: int) -> Path:
    return results / "rl_runs" / task / network / f"seed{seed}"


def run_config(task: str, network: str, seed: int, args: argparse.Namespace) -> Any:
    from kinema.policies.bot import BoTNetwork
    from kinema.train.config import RLConfig

    config = RLConfig(env=task, seed=seed, network=network, bot=BoTNetwork(variant="mix"), total_steps=args.steps,
                      snapshot_every=args.snapshot_every, eval_episodes=args.eval_episodes)
    config.check()
    return config


def train_one(results: Path, task: str, network: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    from kinema.train.rl import run_rl

    config = run_config(task, network, seed, args)
    directory = run_dir(results, task, network, seed)
    cell = directory / "cell.json"
    if not cell.is_file():  # the commit that started the run (a resumed run keeps it)
        write_json(cell, {"git_commit": git_commit(), "config": dataclasses.asdict(config)})
    return run_rl(config, directory)


def aggregate(results: Path) -> dict[str, Any]:
    """Every finished or partial run on disk: curves, final scores, and per task and network the mean over seeds."""
    runs: list[dict[str, Any]] = []
    for curve_file in sorted((results / "rl_runs").glob("*/*/seed*/curve.json")):
        directory = curve_file.parent
        task, network, seed = directory.parent.parent.name, directory.parent.name, int(directory.name[4:])
        record = json.loads(curve_file.read_text())
        cell = json.loads((directory / "cell.json").read_text()) if (directory / "cell.json").is_file() else {}
        final = json.loads((directory / "eval.json").read_text()) if (directory / "eval.json").is_file() else None
        runs.append({"task": task, "network": network, "seed": seed, "curve": record["curve"],
                     "total_steps": record["config"]["rl"]["total_steps"], "git_commit": cell.get("git_commit"),
                     "final": None if final is None else {k: final.get(k) for k in ("return_mean", "return_std", "normalized_score_mean", "step")}})
    summary: dict[str, dict[str, Any]] = {}
    for task in sorted({r["task"] for r in runs}):
        summary[task] = {}
        for network in NETWORKS:
            done = [r for r in runs if r["task"] == task and r["network"] == network and r["final"] is not None]
            if done:
                returns = [r["final"]["return_mean"] for r in done]
                summary[task][network] = {"return_mean": float(np.mean(returns)), "return_std": float(np.std(returns)),
                                          "seeds": sorted(r["seed"] for r in done), "per_seed": returns,
                                          "steps": sorted({r["final"]["step"] for r in done})}
    return {"runs": runs, "summary": summary}


def plot(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({r["task"] for r in data["runs"]})
    if not tasks:
        return
    figure, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 3.8), dpi=110, squeeze=False)
    for axis, task in zip(axes[0], tasks):
        for network in NETWORKS:
            curves = [r["curve"] for r in data["runs"] if r["task"] == task and r["network"] == network and r["curve"]]
            if not curves:
                continue
            length = min(len(c) for c in curves)  # the steps every seed has reached
            steps = [p["steps"] for p in curves[0][:length]]
            values = np.array([[p["eval_return_mean"] for p in c[:length]] for c in curves])
            axis.plot(steps, values.mean(axis=0), label=f"{LABELS[network]} ({len(curves)} seeds)")
            axis.fill_between(steps, values.min(axis=0), values.max(axis=0), alpha=0.2)
        axis.set_title(task, fontsize=10)
        axis.set_xlabel("environment steps")
        axis.set_ylabel("evaluation return (deterministic)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="ant,hopper")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=500_000, help="environment steps per run")
    parser.add_argument("--snapshot-every", type=int, default=20480, help="evaluate every N steps (a multiple of 4096)")
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--status", action="store_true", help="only rebuild rl_quality.json and rl_quality.png from disk")
    parser.add_argument("--quick", action="store_true", help="smoke run: hopper, 1 seed, 4096 steps, 2 episodes")
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    args = parser.parse_args(argv)
    if args.quick:
        if args.results_dir is None:  # smoke runs never mix into the committed results
            parser.error("--quick needs --results-dir DIR (its runs differ from the committed ones)")
        args.tasks, args.seeds, args.steps, args.snapshot_every, args.eval_episodes = "hopper", 1, 4096, 4096, 2
    require_positive(parser, args, ("seeds", "steps", "snapshot_every", "eval_episodes"))
    results = results_dir_or_error(parser, args.results_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        for task in tasks:
            for network in NETWORKS:
                run_config(task, network, 0, args)  # every value checked before any work
    except ValueError as error:
        parser.error(str(error))
    record = RunRecord(NAME, argv)
    (results / "rl_runs").mkdir(parents=True, exist_ok=True)
    (results / "rl_runs" / ".gitignore").write_text(RUNS_GITIGNORE)
    if not args.status:
        for seed in range(args.seeds):  # seed-major: every network and task gets seed 0 before any gets seed 1
            for task in tasks:
                for network in NETWORKS:
                    print(f"{task} / {network} / seed {seed}", flush=True)
                    try:
                        train_one(results, task, network, seed, args)
                    except ValueError as error:  # e.g. a run directory started with other settings
                        parser.error(f"{task} / {network} / seed {seed}: {error}")
                    data = aggregate(results)
                    write_json(results / f"{NAME}.json", {**record.data, **data})
                    plot(data, results / f"{NAME}.png")
    data = aggregate(results)
    rows = [[task, LABELS[network], f"{s['return_mean']:.1f} ± {s['return_std']:.1f}", len(s["seeds"]), s["steps"]]
            for task, by_network in data["summary"].items() for network, s in by_network.items()]
    print_table(["task", "policy", "last evaluation return", "seeds", "steps"], rows)
    plot(data, results / f"{NAME}.png")
    return record.finish({"config": {"steps": args.steps, "snapshot_every": args.snapshot_every,
                                     "eval_episodes": args.eval_episodes, "quick": args.quick}, **data},
                         results / f"{NAME}.json")


if __name__ == "__main__":
    main()
