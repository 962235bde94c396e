"""One evaluation entry for kinema-train and kinema-eval: eval.json's content from the eval config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kinema.envs import evaluate


def run_evaluation(
    policy: Any,
    task: str,
    eval_cfg: dict[str, Any],
    conditioning: dict[str, Any],
    dataset_refs: tuple[float, float] | None,
    video_path: Path | None = None,
    progress: bool = False,
    randomization: Any = None,
) -> dict[str, Any]:
    """Evaluate with ``eval.episodes``, ``eval.seed``, ``eval.num_envs`` and ``eval.trials``.

    With ``eval.trials`` > 1 every environment plays that many episodes in one policy
    context (the Agentic Transformer's protocol); the headline fields are then the FIRST
    trial and last-trial and best-of-n live under ``trials`` (see ``kinema.envs.evaluate``).
    """
    return evaluate(
        policy, task, episodes=int(eval_cfg["episodes"]), seed=int(eval_cfg["seed"]),
        num_envs=eval_cfg.get("num_envs"), conditioning=conditioning, dataset_refs=dataset_refs,
        video_path=video_path, progress=progress, trials=int(eval_cfg.get("trials") or 1), randomization=randomization,
    ).to_dict()
