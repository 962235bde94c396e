"""One evaluation entry for kinema-train and kinema-eval: single episodes or multi-trial runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kinema.envs import evaluate
from kinema.envs.trials import evaluate_trials


def run_evaluation(
    policy: Any,
    task: str,
    eval_cfg: dict[str, Any],
    conditioning: dict[str, Any],
    dataset_refs: tuple[float, float] | None,
    video_path: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate and return eval.json's content.

    With ``eval.trials`` > 1 every environment plays that many episodes in one policy
    context (the Agentic Transformer's protocol). The headline fields (``return_mean``,
    ``normalized_score_mean``, ...) are then the FIRST trial: a single-trial score that
    compares like with like across policies; last-trial and best-of-n live under ``trials``.
    """
    trials = int(eval_cfg.get("trials") or 1)
    episodes, seed, num_envs = int(eval_cfg["episodes"]), int(eval_cfg["seed"]), eval_cfg.get("num_envs")
    if trials == 1:
        return evaluate(
            policy, task, episodes=episodes, seed=seed, num_envs=num_envs, conditioning=conditioning,
            dataset_refs=dataset_refs, video_path=video_path, progress=progress,
        ).to_dict()
    if video_path is not None:
        raise ValueError("video=true records single-episode evaluations; set eval.trials=1 to record one")
    result = evaluate_trials(
        policy, task, episodes=episodes, trials=trials, seed=seed, num_envs=num_envs,
        conditioning=conditioning, dataset_refs=dataset_refs,
    ).to_dict()
    first_returns = np.array([run[0] for run in result["returns"]], dtype=np.float64)
    first_scores = [run[0] for run in result["normalized_scores"]] if result["normalized_scores"] else None
    return {
        "return_mean": float(first_returns.mean()),
        "return_std": float(first_returns.std()),
        "normalized_score_mean": result["first_trial_score_mean"],
        "normalized_score_std": result["first_trial_score_std"],
        "episodes": episodes,
        "returns": first_returns.tolist(),
        "lengths": [run[0] for run in result["lengths"]],
        "normalized_scores": first_scores,
        "reference_source": result["reference_source"],
        "ref_min": result["ref_min"],
        "ref_max": result["ref_max"],
        "trials": result,
    }
