"""`kinema-rl`: online PPO with a Body Transformer or an MLP actor-critic, resumable, scored by kinema's evaluation."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, report_user_errors
from kinema.train.config import RLConfig

RL_CONFIG_DIR = str(Path(CONFIG_DIR) / "rl")


@hydra.main(config_path=RL_CONFIG_DIR, config_name="rl", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-rl")
def _hydra_main(cfg: DictConfig) -> None:
    from kinema.policies.bot import BoTNetwork
    from kinema.policies.base import config_from_dict
    from kinema.train.rl import run_rl

    settings = OmegaConf.to_container(cfg, resolve=True)
    settings["bot"] = config_from_dict(BoTNetwork, settings["bot"] or {}, "bot")
    config = RLConfig(**settings)
    config.check()  # before any work
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    result = run_rl(config, run_dir)
    score = result.get("normalized_score_mean")
    print(f"kinema-rl: {config.network} on {result['task']}, step {result['step']}: return {result['return_mean']:.1f} ± "
          f"{result['return_std']:.1f} over {result['episodes']} episodes"
          + (f", normalised score {score:.1f}" if score is not None else ""))
    print(f"kinema-rl: run directory {run_dir} (eval.json, checkpoint/, curve.json, learning_curve.png); "
          f"kinema-eval checkpoint={run_dir} scores the same files")


def main() -> None:
    refuse_run_dir_that_is_a_file("kinema-rl")
    ConfigStore.instance().store(name="rl_schema", node=RLConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
