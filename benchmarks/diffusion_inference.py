"""Score against inference options, without retraining: the diffusion study's checkpoints of one dataset
evaluated with 2, 5, 10, 50 and 100 DDIM steps, and with 1, 2, 4 and 8 actions executed per chunk.

    python benchmarks/diffusion_inference.py                   # hopper-medium-expert, every seed cell present here
    python benchmarks/diffusion_inference.py --checkpoints <ckpt> [<ckpt> ...] --steps 2,10 --action-steps 1 --episodes 4 --out /tmp/s.json

Each checkpoint is evaluated with its EMA weights as ``kinema-eval`` does (its recorded evaluation
protocol: episodes, environment seed, number of environments). Two sweeps, each changing one option
from the checkpoint's inference defaults: ``inference.num_inference_steps`` (DDIM) and
``inference.n_action_steps`` (receding-horizon execution). A value the policy refuses (more steps
than it was trained with, more actions than its chunk holds) stops the run naming the key. Written:
normalised score per checkpoint and value, and the mean over checkpoints.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kinema.benchmarks.bench_utils import (
    RunRecord, output_or_error, parse_positive_ints, print_table, require_positive, results_dir_or_error,
)

NAME = "diffusion_inference"
DEFAULT_STEPS = "2,5,10,50,100"
DEFAULT_ACTION_STEPS = "1,2,4,8"


def study_checkpoints(results: Path, dataset: str) -> list[Path]:
    """The diffusion study's finished seed cells of ``dataset`` (a cell is finished when it wrote eval.json)."""
    cells = sorted((results / "diffusion" / "quality_runs" / dataset / "diffusion").glob("seed*"))
    return [cell / "checkpoint" for cell in cells if (cell / "eval.json").is_file() and (cell / "checkpoint").is_dir()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hopper-medium-expert", help="the study dataset whose seed cells are read")
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, help="evaluate these instead of the study's cells")
    parser.add_argument("--steps", default=DEFAULT_STEPS, help=f"comma-separated step counts (default {DEFAULT_STEPS})")
    parser.add_argument("--action-steps", default=DEFAULT_ACTION_STEPS,
                        help=f"comma-separated actions executed per chunk (default {DEFAULT_ACTION_STEPS}; 0: skip this sweep)")
    parser.add_argument("--episodes", type=int, default=None, help="override the checkpoints' evaluation episodes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    parser.add_argument("--out", type=Path, default=None, help="default: <results>/diffusion_steps.json")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("threads", *(("episodes",) if args.episodes is not None else ())))
    try:
        sweeps = {"num_inference_steps": parse_positive_ints(args.steps, "--steps")}
        if args.action_steps != "0":
            sweeps["n_action_steps"] = parse_positive_ints(args.action_steps, "--action-steps")
    except ValueError as error:
        parser.error(str(error))
    checkpoints = args.checkpoints
    if checkpoints is None:
        checkpoints = study_checkpoints(results_dir_or_error(parser, args.results_dir), args.dataset)
        if not checkpoints:
            parser.error(f"no finished diffusion cells of {args.dataset} here; run benchmarks/quality.py --policies diffusion "
                         f"--datasets {args.dataset} --results-dir benchmarks/results/diffusion first, or pass --checkpoints")
    out = output_or_error(parser, args.out, NAME)

    import torch

    from kinema.envs import get_task
    from kinema.train.checkpoint import load_checkpoint
    from kinema.train.evaluation import run_evaluation
    from kinema.train.trainer import eval_conditioning

    torch.set_num_threads(args.threads)
    record = RunRecord(NAME, argv)
    runs = []
    for checkpoint in checkpoints:
        loaded = load_checkpoint(checkpoint, device=torch.device("cpu"), use_ema=True)
        if loaded.policy.name != "diffusion":
            parser.error(f"{checkpoint} is a {loaded.policy.name} checkpoint, not a diffusion one")
        eval_cfg = dict(loaded.config.get("eval", {}), trials=1)
        if args.episodes is not None:
            eval_cfg["episodes"] = args.episodes
        conditioning = eval_conditioning(loaded.policy, {"eval": eval_cfg}, get_task(loaded.task), None)
        defaults = dataclasses.asdict(loaded.policy.inference)
        scores: dict[str, dict[str, Any]] = {}
        for option, values in sweeps.items():
            scores[option] = {}
            for value in values:
                loaded.policy.configure_inference(**{**defaults, option: value})
                result = run_evaluation(loaded.policy, loaded.task, eval_cfg, conditioning, loaded.dataset_refs)
                scores[option][str(value)] = {"normalized_score_mean": result.get("normalized_score_mean"),
                                              "normalized_score_std": result.get("normalized_score_std"),
                                              "return_mean": result["return_mean"]}
                print(f"{checkpoint}: {option}={value} -> {result.get('normalized_score_mean')}", flush=True)
        runs.append({"checkpoint": str(checkpoint), "task": loaded.task, "step": loaded.step, "seed": loaded.config.get("seed"),
                     "inference_defaults": defaults, "eval": {k: eval_cfg.get(k) for k in ("episodes", "seed", "num_envs")},
                     "scores": scores})

    summary: dict[str, dict[str, Any]] = {}
    for option, values in sweeps.items():
        summary[option] = {}
        for value in map(str, values):
            means = [run["scores"][option][value]["normalized_score_mean"] for run in runs]
            means = [m for m in means if m is not None]
            summary[option][value] = {"mean": float(np.mean(means)) if means else None,
                                      "std_over_checkpoints": float(np.std(means)) if means else None, "checkpoints": len(means)}
        print_table([option, *(f"seed {run['seed']}" for run in runs), "mean"],
                    [[value, *(_rounded(run["scores"][option][value]["normalized_score_mean"]) for run in runs),
                      _rounded(entry["mean"])] for value, entry in summary[option].items()])
    return record.finish(
        {"config": {"dataset": args.dataset if args.checkpoints is None else None, "sweeps": sweeps,
                    "episodes": args.episodes, "threads": args.threads},
         "runs": runs, "summary": summary},
        out,
    )


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    main()
