"""`kinema-bodygraph`: the body graph of a task (derived from its MuJoCo model), printed, saved and drawn."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, report_user_errors, to_plain
from kinema.train.config import BodyGraphConfig

BODYGRAPH_CONFIG_DIR = str(Path(CONFIG_DIR) / "bodygraph")


@hydra.main(config_path=BODYGRAPH_CONFIG_DIR, config_name="bodygraph", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-bodygraph")
def _hydra_main(cfg: DictConfig) -> None:
    from kinema.envs import get_task, task_spaces
    from kinema.envs.bodygraph import derive_body_graph, draw_body_graph, resolve_body_graph

    settings = to_plain(cfg)
    if not settings["env"]:
        raise ValueError("kinema-bodygraph needs env=<task> (hopper, walker2d, halfcheetah, ant, humanoid or a Gymnasium MuJoCo id)")
    spec = get_task(settings["env"])
    if settings["body_graph"]:
        obs_dim, act_dim, _, _ = task_spaces(spec)
        graph = resolve_body_graph(spec, obs_dim, act_dim, explicit=settings["body_graph"])
        origin = f"explicit layout {settings['body_graph']}"
    else:
        graph = derive_body_graph(spec)
        origin = f"derived from the MuJoCo model of {spec.gym_id}, verified on its observation"
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "bodygraph.json").write_text(json.dumps({"task": spec.name, **graph.to_dict()}, indent=1) + "\n")
    title = f"{spec.name}: {len(graph.nodes)} nodes, {graph.obs_dim} observations, {graph.act_dim} actions"
    draw_body_graph(graph, run_dir / "bodygraph.png", title=title)
    print(f"kinema-bodygraph: {title} ({origin})")
    print(graph.describe())
    print(f"kinema-bodygraph: wrote {run_dir / 'bodygraph.json'} and {run_dir / 'bodygraph.png'}")


def main() -> None:
    refuse_run_dir_that_is_a_file("kinema-bodygraph")
    ConfigStore.instance().store(name="bodygraph_schema", node=BodyGraphConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
