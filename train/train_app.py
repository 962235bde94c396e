"""`kinema-train`: train a policy on an offline dataset, evaluate it in MuJoCo, print a normalised score."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.train.cli import (
    CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, register_configs, report_user_errors, to_plain,
)

register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="train", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-train")
def _main(cfg: DictConfig) -> float | None:
    from kinema.train.trainer import TrainingInterrupted, _describe, run_training

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        result = run_training(to_plain(cfg), run_dir)
    except TrainingInterrupted as stopped:
        print(f"kinema-train: {stopped}", file=sys.stderr)
        sys.exit(128 + stopped.signal_number)  # the shell's convention for a process ended by a signal
    if result is None:  # a non-zero DDP rank
        return None
    print(f"kinema-train: {result['policy']} on {result['dataset']} ({result['task']}), step {result['step']}: {_describe(result)}")
    print(f"kinema-train: run directory {run_dir} (eval.json, checkpoint/, learning_curve.png)")
    # Returned so Hydra sweepers can optimise it.
    return result.get("normalized_score_mean")


def main() -> None:
    """The console script: checks Hydra cannot report cleanly, then the Hydra app."""
    refuse_run_dir_that_is_a_file("kinema-train")
    _main()


if __name__ == "__main__":
    main()
