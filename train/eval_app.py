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
    if settings.get("randomization"):
        evaluate_robustness(policy, loaded, trained_eval, conditioning, result, settings, run_dir)
    return result.get("normalized_score_mean")


def evaluate_robustness(policy, loaded, eval_cfg, conditioning, plain, settings, run_dir: Path) -> None:
    """The same evaluation under each named randomisation profile: robustness.json, one row per profile."""
    from kinema.envs.randomization import get_profile
    from kinema.train.evaluation import run_evaluation
    from kinema.train.trainer import write_json

    names = settings["randomization"]
    names = [names] if isinstance(names, str) else list(names)
    profiles = [get_profile(str(name), settings.get("randomization_file")) for name in names]  # all checked before any run
    rows = [{"profile": "none", "return_mean": plain["return_mean"], "normalized_score_mean": plain.get("normalized_score_mean"),
             "normalized_score_std": plain.get("normalized_score_std")}]
    for profile in profiles:
        result = run_evaluation(policy, loaded.task, eval_cfg, conditioning, loaded.dataset_refs, progress=True, randomization=profile)
        rows.append({"profile": profile.name, "settings": profile.to_dict(), "return_mean": result["return_mean"],
                     "normalized_score_mean": result.get("normalized_score_mean"), "normalized_score_std": result.get("normalized_score_std"),
                     "returns": result["returns"]})
    write_json(run_dir / "robustness.json", {"task": loaded.task, "policy": policy.name, "checkpoint": str(loaded.path),
                                             "episodes": eval_cfg["episodes"], "seed": eval_cfg["seed"], "profiles": rows})
    for row in rows:
        score = row["normalized_score_mean"]
        print(f"kinema-eval: profile {row['profile']:<10} return {row['return_mean']:9.1f}"
              + ("" if score is None else f"  score {score:6.1f} ± {row['normalized_score_std']:.1f}"))
    print(f"kinema-eval: wrote {run_dir / 'robustness.json'}")


def main() -> None:
    """The console script: checks Hydra cannot report cleanly, then the Hydra app."""
    refuse_run_dir_that_is_a_file("kinema-eval")
    _main()


if __name__ == "__main__":
    main()
