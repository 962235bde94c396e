"""`kinema-eval`: evaluate a checkpoint in its MuJoCo task, optionally writing a video."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.train.cli import (
    CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, register_configs, report_user_errors, to_plain,
)

register_configs()


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-eval")
def _main(cfg: DictConfig) -> float | None:
    from kinema.envs import get_task
    from kinema.train.checkpoint import load_checkpoint
    from kinema.train.config import check_eval_settings
    from kinema.train.evaluation import run_evaluation
    from kinema.train.trainer import _describe, eval_conditioning, eval_trials, select_device, write_json

    settings = to_plain(cfg)
    if not settings.get("checkpoint"):
        raise ValueError("kinema-eval needs checkpoint=<checkpoint directory or run directory>")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    loaded = load_checkpoint(settings["checkpoint"], device=select_device(str(settings["device"])), use_ema=bool(settings["use_ema"]))
    policy = loaded.policy
    inference = settings.get("inference") or {}
    policy.configure_inference(**inference)
    trained_eval = dict(loaded.config.get("eval", {}))
    if "target_return" not in policy.conditioning:
        trained_eval["target_return"] = None  # older checkpoints recorded one for every family
    elif "target_return" in inference:  # +inference.target_return=R: evaluate at R
        trained_eval["target_return"] = inference["target_return"]
    trained_eval.update({k: v for k, v in settings["eval"].items() if v is not None})
    trained_eval["trials"] = eval_trials(policy, trained_eval)
    check_eval_settings(trained_eval)
    conditioning = eval_conditioning(policy, {"eval": trained_eval}, get_task(loaded.task), None)
    video = run_dir / "episode.mp4" if settings.get("video") else None
    result = run_evaluation(
        policy, loaded.task, trained_eval, conditioning, loaded.dataset_refs, video_path=video, progress=True
    )
    result.update(
        {"task": loaded.task, "policy": policy.name, "step": loaded.step, "checkpoint": str(loaded.path),
         "inference": dataclasses.asdict(policy.inference), **conditioning, **({"video": str(video)} if video else {})}
    )
    write_json(run_dir / "eval.json", result)
    print(f"kinema-eval: {policy.name} from {loaded.path} on {loaded.task}: {_describe(result)}")
    print(f"kinema-eval: wrote {run_dir / 'eval.json'}" + (f" and {video}" if video else ""))
    return result.get("normalized_score_mean")


def main() -> None:
    """The console script: checks Hydra cannot report cleanly, then the Hydra app."""
    refuse_run_dir_that_is_a_file("kinema-eval")
    _main()


if __name__ == "__main__":
    main()
