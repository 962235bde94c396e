"""`kinema-eval`: evaluate a checkpoint in its MuJoCo task, optionally writing a video."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, report_user_errors, to_plain


@hydra.main(config_path=CONFIG_DIR, config_name="eval", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-eval")
def main(cfg: DictConfig) -> float | None:
    from kinema.train.checkpoint import load_checkpoint
    from kinema.train.evaluation import run_evaluation
    from kinema.train.trainer import _describe, eval_conditioning, select_device, write_json

    settings = to_plain(cfg)
    if not settings.get("checkpoint"):
        raise ValueError("kinema-eval needs checkpoint=<checkpoint directory or run directory>")
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    loaded = load_checkpoint(settings["checkpoint"], device=select_device(str(settings["device"])))
    trained_eval = dict(loaded.config.get("eval", {}))
    trained_eval.update({k: v for k, v in settings["eval"].items() if v is not None})
    conditioning = eval_conditioning({"eval": trained_eval}, loaded.task, None)
    video = run_dir / "episode.mp4" if settings.get("video") else None
    loaded.policy.eval()
    result = run_evaluation(
        loaded.policy, loaded.task, trained_eval, conditioning, loaded.dataset_refs, video_path=video, progress=True
    )
    result.update(
        {"task": loaded.task, "policy": loaded.policy.name, "step": loaded.step, "checkpoint": str(loaded.path),
         **conditioning, **({"video": str(video)} if video else {})}
    )
    write_json(run_dir / "eval.json", result)
    print(f"kinema-eval: {loaded.policy.name} from {loaded.path} on {loaded.task}: {_describe(result)}")
    print(f"kinema-eval: wrote {run_dir / 'eval.json'}" + (f" and {video}" if video else ""))
    return result.get("normalized_score_mean")


if __name__ == "__main__":
    main()
