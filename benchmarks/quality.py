"""The quality grid: policies x datasets x seeds, each cell one kinema training run with a fixed budget.

    python benchmarks/quality.py                          # the whole grid (resumable; hours, see below)
    nohup python benchmarks/quality.py > benchmarks/results/quality.log 2>&1 &   # in the background
    python benchmarks/quality.py --status                 # what is done, running, pending; rebuild quality.json
    python benchmarks/quality.py --seed-list 1 &          # a second worker on other seeds (cells are locked)
    python benchmarks/quality.py --quick --dataset-path hopper-small=/tmp/h.hdf5 --results-dir /tmp/q

Grid: policies ``dt``, ``at``, ``bc`` and the HuggingFace peer ``hf_dt`` (benchmarks/hf_peer.py),
plus on request (``--policies``) ``dt_full``, the paper's full-context DT (``attention_window=0``)
beside kinema's banded default, and ``at_final``, AT with its loss on the final (best) trial of
each chain only (the default ``at`` puts it on every trial), x suite datasets hopper-medium, hopper-medium-replay, walker2d-medium-replay,
halfcheetah-medium (generated on first use by ``kinema.datasets.suite``; ``--datasets``
overrides, ``--dataset-path NAME=FILE`` points a name at any D4RL/Minari file) x seeds.

Each cell is ``kinema.train.trainer.run_training`` in its own run directory
``<results>/quality_runs/<dataset>/<policy>/seed<k>/``, so it writes the usual eval.json,
checkpoints and learning curve. Resumable at two levels: a cell whose eval.json exists
is skipped, and a killed cell continues from its last periodic checkpoint (the trainer
resumes a run directory). A cell being trained holds a lock file, so several workers
(e.g. one per seed) can share the grid. After every cell the aggregate
``<results>/quality.json`` is rebuilt from everything on disk: partial results are always
ready to commit (the run directories' .gitignore keeps only eval.json and trials.json).

Protocol (recorded in quality.json): the same budget for every policy: ``--steps`` gradient
steps of batch ``--batch-size``; transformers (dt, at, hf_dt) use the DT recipe (AdamW lr
1e-4, weight decay 1e-4, grad clip 0.25, linear warm-up over the first 10% of steps, as
100k steps with 10k warm-up scaled down); BC keeps its recipe (Adam 3e-4, no clip).
Evaluation: ``--eval-episodes`` episodes at the trainer's default target return (the best
episode return in the training data, ``eval.target_return=dataset_max``), reported from the LAST
evaluation (the final checkpoint), mean ± std over seeds (ddof=0) of each seed's mean
normalised score. Scores use the dataset's own reference returns (Minari's convention);
D4RL-reference scores are reported too. dt and at are also played ``--trials`` trials in
a row per context (``kinema.envs.trials.evaluate_trials``) and reported three ways:
first trial, last trial, best of n.

Time on this 2-core CPU with 1 thread (defaults: 5000 steps, batch 64, 10 episodes): a
transformer step takes ~0.24-0.28 s at light load and 0.38-0.43 s with the machine shared
(benchmarks/results/train_speed.json), so a transformer cell trains in ~20-35 min, a BC
cell in ~1-2 min, and evaluation (plus 4 trials for dt/at) adds ~1-3 min. The default grid
(4 x 4 x 3 = 48 cells, 36 of them transformers) takes ~15-22 h of one core; seed 0 alone
~5-7 h. Two workers on different seeds (``--seed-list``) use both cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from bench_utils import RESULTS_DIR, RunRecord, load_average, print_table, require_positive, write_json
import hf_peer  # noqa: F401  registers the "hf_dt" policy

NAME = "quality"
DEFAULT_POLICIES = ("dt", "at", "bc", "hf_dt")
DEFAULT_DATASETS = ("hopper-medium", "hopper-medium-replay", "walker2d-medium-replay", "halfcheetah-medium")
# Grid variants of a kinema policy: (config group, policy overrides).
VARIANTS = {
    "dt_full": ("dt", {"attention_window": 0}),  # the paper's full-context DT (kinema's default is banded)
    "at_final": ("at", {"loss_on": "final_trial"}),  # AT's other loss choice (the default is "all")
}
WARMUP_FRACTION = 0.1  # a recipe's warm-up, if it has one, is 10% of the budget (DT: 10k of 100k steps)
EVAL_JSON, TRIALS_JSON, DATASET_JSON, LOCK = "eval.json", "trials.json", "dataset.json", ".lock"
RUNS_GITIGNORE = "# Only the small result files of each cell are committed.\n*\n!*/\n!.gitignore\n!eval.json\n!trials.json\n!dataset.json\n"


class GridError(ValueError):
    """A quality-grid argument that cannot be used, with what was expected."""


# -- the grid -------------------------------------------------------------------------------
def parse_dataset_paths(items: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise GridError(f"--dataset-path expects NAME=FILE, got {item!r}")
        path = Path(file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--dataset-path {name}={file}: no such file or directory")
        paths[name] = path
    return paths


def csv_list(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise GridError(f"{what} expects a comma-separated list, got {text!r}")
    return items


def cell_dir(runs_dir: Path, dataset: str, policy: str, seed: int) -> Path:
    return runs_dir / dataset / policy / f"seed{seed}"


def cell_config(policy: str, dataset: str, dataset_paths: dict[str, Path], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The trainer config of one cell: kinema's Hydra config with the grid's budget applied."""
    from kinema.train.cli import compose_train_config

    family, overrides = VARIANTS.get(policy, (policy, {}))
    cfg = compose_train_config([f"policy={family}"])  # each family trains with its own recipe
    cfg["policy"].update(overrides)
    recipe = cfg["policy"]["recipe"]
    recipe["batch_size"] = args.batch_size
    if recipe["warmup_steps"] > 0:
        recipe["warmup_steps"] = int(WARMUP_FRACTION * args.steps)
    train = cfg["train"]
    train.update({"steps": args.steps, "checkpoint_every": args.checkpoint_every,
                  "log_every": min(int(train["log_every"]), args.checkpoint_every), "keep_checkpoints": 1})
    # One protocol for every policy's headline score: single episodes from the same start states.
    # Multi-trial scores of dt/at come from a separate run into trials.json (at.yaml's eval.trials is overridden).
    cfg["eval"].update({"episodes": args.eval_episodes, "num_envs": min(10, args.eval_episodes), "every": 0, "trials": 1})
    cfg["seed"], cfg["device"], cfg["threads"] = seed, "cpu", args.threads
    if dataset in dataset_paths:
        cfg["dataset"] = {"name": dataset, "path": str(dataset_paths[dataset])}
    else:
        cfg["dataset"] = {"name": dataset, "path": None}
    cfg["env"] = None
    return cfg


def plays_trials(policy: str) -> bool:
    """Several trials per context mean something only for a policy that keeps a context per environment."""
    from kinema.policies import policy_class

    return policy_class(VARIANTS.get(policy, (policy, {}))[0]).multi_trial


# -- locks: several workers may share one grid ---------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_owner(run_dir: Path) -> int | None:
    """The pid of a live worker training this cell, if any (a stale lock is ignored)."""
    try:
        pid = int((run_dir / LOCK).read_text().strip() or 0)
    except (OSError, ValueError):
        return None
    return pid if pid > 0 and _pid_alive(pid) else None


def claim(run_dir: Path) -> bool:
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = lock_owner(run_dir)
            if owner is not None and owner != os.getpid():
                return False
            lock.unlink(missing_ok=True)  # stale: its worker died
            continue
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))
        return True
    return False


def release(run_dir: Path) -> None:
    if lock_owner(run_dir) == os.getpid():
        (run_dir / LOCK).unlink(missing_ok=True)


# -- one cell ------------------------------------------------------------------------------------
def describe_dataset(cfg: dict[str, Any], out: Path) -> None:
    """Once per dataset: its size and average return, the bar a policy should clear."""
    if out.is_file():
        return
    from kinema.envs import reference_returns
    from kinema.train.data import resolve_dataset

    data = resolve_dataset(cfg["dataset"], cfg.get("env"))
    returns = np.asarray(data.dataset.episode_returns, dtype=np.float64)
    info: dict[str, Any] = {
        "name": data.name, "path": str(data.path), "task": data.task.name, "episodes": int(len(returns)),
        "transitions": int(data.dataset.num_transitions), "return_mean": float(returns.mean()),
        "return_max": float(returns.max()), "reference_returns": data.reference_returns,
    }
    ref_min, ref_max, source = reference_returns(data.task, data.reference_returns)
    info.update({"reference_source": source, "normalized_return_mean": 100 * (info["return_mean"] - ref_min) / (ref_max - ref_min)})
    write_json(out, info)


def run_cell(policy: str, dataset: str, seed: int, run_dir: Path, cfg: dict[str, Any], args: argparse.Namespace) -> str:
    """Train and evaluate one cell (resuming if it was interrupted); returns what was done."""
    from kinema.train.trainer import run_training

    done = []
    describe_dataset(cfg, run_dir.parent.parent / DATASET_JSON)
    if not (run_dir / EVAL_JSON).is_file():
        start = time.perf_counter()
        result = run_training(cfg, run_dir)
        elapsed = time.perf_counter() - start
        # The trainer's eval.json plus how long this session spent on the cell.
        result["quality_cell_wall_s"] = round(elapsed, 1)
        write_json(run_dir / EVAL_JSON, result)
        done.append(f"trained+evaluated in {elapsed / 60:.1f} min")
    if plays_trials(policy) and args.trials > 1 and not (run_dir / TRIALS_JSON).is_file():
        trials = run_trials(run_dir, args)
        if trials is not None:
            done.append(f"{args.trials} trials")
    # Finished: the resume checkpoints (optimiser state) are dead weight; checkpoint/ keeps the final policy.
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    return ", ".join(done) or "already done"


def run_trials(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        from kinema.envs.trials import evaluate_trials
    except ImportError:
        print("kinema.envs.trials is not available: multi-trial scores skipped", file=sys.stderr)
        return None
    from kinema.train.checkpoint import load_checkpoint

    evaluation = json.loads((run_dir / EVAL_JSON).read_text())
    loaded = load_checkpoint(run_dir / "checkpoint")
    loaded.policy.eval()
    conditioning = {"target_return": evaluation["target_return"]} if evaluation.get("target_return") is not None else {}
    result = evaluate_trials(
        loaded.policy, loaded.task, episodes=args.eval_episodes, trials=args.trials,
        seed=int(loaded.config["eval"]["seed"]), num_envs=min(10, args.eval_episodes),
        conditioning=conditioning, dataset_refs=loaded.dataset_refs,
    ).to_dict()
    result.update({"step": loaded.step, **conditioning})
    write_json(run_dir / TRIALS_JSON, result)
    return result


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return round(float(array.mean()), 2), round(float(array.std()), 2)


def d4rl_score(task: str, return_mean: float) -> float | None:
    from kinema.envs import get_task

    spec = get_task(task)
    if spec.d4rl_ref_min is None or spec.d4rl_ref_max is None:
        return None
    return 100.0 * (return_mean - spec.d4rl_ref_min) / (spec.d4rl_ref_max - spec.d4rl_ref_min)


def _train_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    path = run_dir / "checkpoint" / "config.yaml"
    try:
        return (yaml.safe_load(path.read_text()) or {}).get("train", {})
    except (OSError, yaml.YAMLError):
        return {}


def collect_cells(runs_dir: Path) -> list[dict[str, Any]]:
    """Every finished cell on disk, whatever worker or session produced it."""
    cells = []
    for evaluation_path in sorted(runs_dir.glob(f"*/*/seed*/{EVAL_JSON}")):
        run_dir = evaluation_path.parent
        evaluation = json.loads(evaluation_path.read_text())
        train = _train_config(run_dir)
        cell = {
            "dataset": run_dir.parent.parent.name,
            "policy": run_dir.parent.name,
            "seed": int(run_dir.name.removeprefix("seed")),
            "steps": evaluation.get("step"),
            "batch_size": train.get("batch_size"),
            "episodes": evaluation.get("episodes"),
            "target_return": evaluation.get("target_return"),
            "return_mean": evaluation.get("return_mean"),
            "normalized_score": evaluation.get("normalized_score_mean"),
            "reference_source": evaluation.get("reference_source"),
            "d4rl_score": d4rl_score(evaluation["task"], evaluation["return_mean"]) if evaluation.get("task") else None,
            "wall_s": evaluation.get("quality_cell_wall_s"),
        }
        trials_path = run_dir / TRIALS_JSON
        if trials_path.is_file():
            trials = json.loads(trials_path.read_text())
            cell["trials"] = {
                "n": trials["trials"],
                "first": trials.get("first_trial_score_mean"),
                "last": trials.get("last_trial_score_mean"),
                "best_of_n": trials.get("best_of_n_score_mean"),
            }
        cells.append(cell)
    return cells


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, policy, budget): mean ± std over seeds of the last evaluation."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["policy"], cell["steps"], cell["batch_size"]), []).append(cell)
    rows = []
    for (dataset, policy, steps, batch_size), members in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        scores = [c["normalized_score"] for c in members if c["normalized_score"] is not None]
        d4rl = [c["d4rl_score"] for c in members if c["d4rl_score"] is not None]
        row: dict[str, Any] = {
            "dataset": dataset, "policy": policy, "steps": steps, "batch_size": batch_size,
            "seeds": sorted(c["seed"] for c in members),
            "episodes_per_seed": members[0]["episodes"],
            "reference_source": members[0]["reference_source"],
        }
        row["score_mean"], row["score_std"] = _mean_std(scores)
        row["d4rl_score_mean"], row["d4rl_score_std"] = _mean_std(d4rl)
        row["return_mean"], _ = _mean_std([c["return_mean"] for c in members])
        with_trials = [c["trials"] for c in members if "trials" in c]
        if with_trials:
            row["trials"] = {"n": with_trials[0]["n"], "seeds": len(with_trials)}
            for key in ("first", "last", "best_of_n"):
                mean, std = _mean_std([t[key] for t in with_trials if t[key] is not None])
                row["trials"][f"{key}_mean"], row["trials"][f"{key}_std"] = mean, std
        rows.append(row)
    return rows


def grid_status(runs_dir: Path, policies, datasets, seeds, trials: int) -> list[dict[str, Any]]:
    status = []
    for seed in seeds:
        for dataset in datasets:
            for policy in policies:
                run_dir = cell_dir(runs_dir, dataset, policy, seed)
                if cell_done(run_dir, policy, trials):
                    state = "done"
                elif lock_owner(run_dir) is not None:
                    state = f"running (pid {lock_owner(run_dir)})"
                elif (run_dir / "error.txt").is_file():
                    state = "failed (see error.txt); retried on the next run"
                elif (run_dir / "checkpoints").is_dir():
                    state = "interrupted (resumes from its checkpoint)"
                else:
                    state = "pending"
                status.append({"dataset": dataset, "policy": policy, "seed": seed, "state": state})
    return status


def write_aggregate(record: RunRecord, results_dir: Path, runs_dir: Path, args: argparse.Namespace, status) -> dict[str, Any]:
    cells = collect_cells(runs_dir)
    datasets = {}
    for path in sorted(runs_dir.glob(f"*/{DATASET_JSON}")):
        datasets[path.parent.name] = json.loads(path.read_text())
    data = dict(record.data)
    data.update({
        "protocol": {
            "steps": args.steps, "batch_size": args.batch_size, "eval_episodes": args.eval_episodes,
            "trials": args.trials, "threads": args.threads, "quick": args.quick,
            "recipes": "each family's own (policy.recipe), warm-up scaled to " + f"{WARMUP_FRACTION:.0%} of steps",
            "bc_recipe": "kinema's bc config group (Adam 3e-4, no clip)",
            "target_return": "best episode return in the training data (eval.target_return=dataset_max)",
            "reported": "last evaluation (final checkpoint); mean ± std (ddof=0) over seeds of per-seed mean normalised score",
            "score_reference": "dataset reference returns (Minari convention); d4rl_score uses D4RL's",
            "trials_protocol": "dt and at: first trial, last trial and best of n trials played in one context (kinema.envs.trials)",
        },
        "table": aggregate(cells),
        "datasets": datasets,
        "cells": cells,
        "grid_status": status,
    })
    data["load_average_after"] = load_average()
    write_json(results_dir / f"{NAME}.json", data)
    return data


def print_summary(data: dict[str, Any]) -> None:
    rows = []
    for row in data["table"]:
        score = "-" if row["score_mean"] is None else f"{row['score_mean']:.1f} ± {row['score_std']:.1f}"
        trials = row.get("trials")
        trial_text = "-" if not trials else (f"{trials['first_mean']} / {trials['last_mean']} / {trials['best_of_n_mean']}")
        rows.append([row["dataset"], row["policy"], row["steps"], len(row["seeds"]), score, trial_text])
    print_table(["dataset", "policy", "steps", "seeds", "score (last eval)", "trials first/last/best"], rows)
    counts: dict[str, int] = {}
    for cell in data["grid_status"]:
        state = cell["state"].split(" ")[0]
        counts[state] = counts.get(state, 0) + 1
    print("grid:", ", ".join(f"{count} {state}" for state, count in sorted(counts.items())))


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES))
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="suite dataset names (or names given by --dataset-path)")
    parser.add_argument("--dataset-path", action="append", default=[], metavar="NAME=FILE",
                        help="train on FILE (D4RL HDF5 or Minari dir) under the grid name NAME; repeatable")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    parser.add_argument("--steps", type=int, default=5000, help="gradient steps per cell")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--trials", type=int, default=4, help="trials per context for dt/at (1 = skip)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core to others)")
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--status", action="store_true", help="only report the grid and rebuild quality.json")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, batch 8, 2 episodes, 2 trials, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_episodes, args.trials, args.seeds, args.checkpoint_every = 4, 8, 2, 2, 1, 2
    require_positive(parser, args, ("steps", "batch_size", "eval_episodes", "trials", "seeds", "checkpoint_every", "threads"))
    return args


def run_grid(record: RunRecord, results_dir: Path, runs_dir: Path, policies: list[str], datasets: list[str],
             dataset_paths: dict[str, Path], seeds: list[int], args: argparse.Namespace) -> None:
    """Every unfinished cell in turn (seed-major: a whole seed's grid is ready first)."""
    cells = [(seed, dataset, policy) for seed in seeds for dataset in datasets for policy in policies]
    for index, (seed, dataset, policy) in enumerate(cells, start=1):
        run_dir = cell_dir(runs_dir, dataset, policy, seed)
        label = f"[{index}/{len(cells)}] {dataset} / {policy} / seed {seed}"
        if cell_done(run_dir, policy, args.trials):
            continue
        if not claim(run_dir):
            print(f"{label}: being trained by pid {lock_owner(run_dir)}, skipped", flush=True)
            continue
        try:
            print(f"{label}: starting", flush=True)
            cfg = cell_config(policy, dataset, dataset_paths, seed, args)
            outcome = run_cell(policy, dataset, seed, run_dir, cfg, args)
            (run_dir / "error.txt").unlink(missing_ok=True)
            print(f"{label}: {outcome}", flush=True)
        except Exception as error:  # one broken cell must not stop the grid; it is retried next time
            (run_dir / "error.txt").write_text(traceback.format_exc())
            print(f"{label}: FAILED: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        finally:
            release(run_dir)
        write_aggregate(record, results_dir, runs_dir, args, grid_status(runs_dir, policies, datasets, seeds, args.trials))


def cell_done(run_dir: Path, policy: str, trials: int) -> bool:
    needs_trials = plays_trials(policy) and trials > 1
    return (run_dir / EVAL_JSON).is_file() and not (needs_trials and not (run_dir / TRIALS_JSON).is_file())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    policies = csv_list(args.policies, "--policies")
    datasets = csv_list(args.datasets, "--datasets")
    dataset_paths = parse_dataset_paths(args.dataset_path)
    if args.dataset_path and args.datasets == ",".join(DEFAULT_DATASETS):
        datasets = list(dataset_paths)  # only the given files, unless --datasets says otherwise
    seeds = [int(s) for s in csv_list(args.seed_list, "--seed-list")] if args.seed_list else list(range(args.seeds))
    from kinema.policies import available_policies

    unknown = sorted({p for p in policies if VARIANTS.get(p, (p,))[0] not in available_policies()})
    if unknown:
        raise GridError(f"--policies: unknown policy {unknown}; available: {available_policies() + sorted(VARIANTS)}")

    results_dir = args.results_dir
    runs_dir = results_dir / "quality_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    if not (runs_dir / ".gitignore").is_file():
        (runs_dir / ".gitignore").write_text(RUNS_GITIGNORE)
    record = RunRecord(NAME, argv)

    if not args.status:
        import torch

        original_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            run_grid(record, results_dir, runs_dir, policies, datasets, dataset_paths, seeds, args)
        finally:
            torch.set_num_threads(original_threads)

    data = write_aggregate(record, results_dir, runs_dir, args, grid_status(runs_dir, policies, datasets, seeds, args.trials))
    print_summary(data)
    print(f"wrote {results_dir / (NAME + '.json')}")
    return data


if __name__ == "__main__":
    main()
