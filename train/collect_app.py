"""`kinema-collect`: record D4RL-layout datasets, regenerate the benchmark suite, train behaviour policies."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, report_user_errors, to_plain

LIST_FLAGS = ("--list", "-l")


def _print_suite() -> None:
    from kinema.datasets.suite import describe_suite

    print(describe_suite())


def _write_summary(settings: dict[str, Any], summary: dict[str, Any]) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "collect.json").write_text(json.dumps({"config": settings, **summary}, indent=1, default=str) + "\n")


def _suite(settings: dict[str, Any]) -> dict[str, Any]:
    from kinema.datasets.d4rl_io import read_d4rl_hdf5
    from kinema.datasets.suite import (
        SUITE_TASKS, build_manifest, ensure_suite_dataset, load_manifest, make_embedded_dataset, split_name,
    )

    name, size = str(settings["dataset"]), settings["size"]
    if settings["update_manifest"]:
        tasks = None if name == "all" else [name if name in SUITE_TASKS else split_name(name)[0]]
        manifest = build_manifest(tasks, settings["data_dir"], manifest_path=settings["manifest"], size=size)
        if settings["embed"]:
            record = make_embedded_dataset(manifest_path=settings["manifest"], directory=settings["data_dir"])
            print(f"kinema-collect: embedded slice {record['file']}: {record['transitions']} transitions, {record['size_bytes'] / 1e6:.1f} MB")
        return {"manifest": {k: v["sha256"] for k, v in manifest["datasets"].items()}}
    names = list(load_manifest(settings["manifest"])["datasets"]) if name == "all" else [name]
    results = {}
    for each in names:
        path = ensure_suite_dataset(each, settings["data_dir"], size=size, manifest_path=settings["manifest"])
        summary = read_d4rl_hdf5(path).summary()
        results[each] = {"path": str(path), **summary}
        print(f"kinema-collect: {each}: {path} ({summary['transitions']:,} transitions, {summary['episodes']:,} episodes, "
              f"return {summary['return_mean']:.1f}){'; verified against the manifest' if size == 'default' else ''}")
    return {"datasets": results}


def _train(settings: dict[str, Any]) -> dict[str, Any]:
    from kinema.datasets.behaviour import TrainingRequest, export_for_suite, train_behaviour

    if not settings["env"]:
        raise ValueError("behaviour.train=true needs env=<task>, e.g. env=hopper")
    options = settings["behaviour"]
    request = TrainingRequest(total_steps=int(options["total_steps"]), snapshot_every=int(options["snapshot_every"]),
                              stop_at_return=options["stop_at_return"], seed=int(settings["seed"]))
    state = train_behaviour(settings["env"], request, work_dir=options["work_dir"])
    summary: dict[str, Any] = {"training": {k: state[k] for k in ("num_timesteps", "wall_time_s", "finished")},
                               "curve": state["curve"]}
    if options["export"]:
        summary["exported"] = export_for_suite(settings["env"], work_dir=options["work_dir"])
    return summary


def _behaviour_policy(settings: dict[str, Any]) -> Any:
    from kinema.datasets.behaviour import SB3CheckpointPolicy, load_actor
    from kinema.datasets.collect import UniformRandomPolicy, require_matching_spaces

    kind = settings["behaviour"]["name"]
    if kind == "random":
        return UniformRandomPolicy.for_task(settings["env"])
    if kind == "sb3":
        if not settings["checkpoint"]:
            raise ValueError("behaviour=sb3 needs checkpoint=<path to a stable-baselines3 .zip> (and algo=ppo|sac|td3)")
        return SB3CheckpointPolicy(settings["checkpoint"], settings["algo"], settings["env"],
                                   vecnormalize=settings["vecnormalize"], deterministic=bool(settings["deterministic"]),
                                   seed=int(settings["seed"]))
    if kind == "snapshot":
        if not settings["snapshot"]:
            raise ValueError("behaviour=snapshot needs snapshot=<path of a kinema actor snapshot, without .safetensors/.json>")
        actor = load_actor(settings["snapshot"], stochastic=not settings["deterministic"])
        require_matching_spaces(settings["env"], actor.obs_dim, actor.act_dim, str(settings["snapshot"]))
        return actor
    raise ValueError(f"behaviour must be random, sb3 or snapshot, got {kind!r}")


def _record(settings: dict[str, Any]) -> dict[str, Any]:
    from kinema.datasets.collect import collect
    from kinema.datasets.d4rl_io import write_d4rl_hdf5
    from kinema.envs import get_task

    if not settings["env"]:
        raise ValueError("kinema-collect needs env=<task> (hopper, walker2d, halfcheetah, ant or a Gymnasium id), "
                         "or dataset=<suite name>; see kinema-collect --list")
    if not settings["output"]:
        raise ValueError("kinema-collect needs output=<file.hdf5> to write the dataset to")
    output = Path(str(settings["output"])).expanduser()
    if output.is_dir():
        raise ValueError(f"output={output} is a directory; expected the .hdf5 file to write")
    if output.exists() and not settings["overwrite"]:
        raise ValueError(f"output={output} already exists; set overwrite=true to replace it, or choose another output")
    spec = get_task(settings["env"])
    policy = _behaviour_policy(settings)
    # No ref_min_score / ref_max_score: a single recording has no expert of its own to measure,
    # so scores on it use the D4RL constants (suite datasets carry measured ones).
    metadata = {**policy.describe(), "collection_seed": int(settings["seed"]),
                "d4rl_ref_min": spec.d4rl_ref_min, "d4rl_ref_max": spec.d4rl_ref_max}
    dataset = collect(spec, policy, int(settings["steps"]), seed=int(settings["seed"]), num_envs=int(settings["num_envs"]),
                      metadata=metadata, progress=True, source=str(output))
    path = write_d4rl_hdf5(dataset, output, compression=settings["compression"])
    summary = dataset.summary()
    print(f"kinema-collect: wrote {path}: {summary['transitions']:,} transitions, {summary['episodes']:,} episodes, "
          f"return {summary['return_mean']:.1f} ± {summary['return_std']:.1f} ({policy.describe()['algorithm']} in {spec.gym_id})")
    return {"output": str(path), **summary}


# Its own config directory: the shared one has a `dataset` config group (kinema-train's), which
# would swallow `dataset=<suite name>` here.
COLLECT_CONFIG_DIR = str(Path(CONFIG_DIR) / "collect")


def register_collect_configs() -> None:
    """kinema-collect's schema and its ``behaviour=<name>`` group, from ``kinema.train.config``."""
    from hydra.core.config_store import ConfigStore

    from kinema.train.config import BEHAVIOURS, CollectConfig

    store = ConfigStore.instance()
    store.store(name="collect_schema", node=CollectConfig)
    for name in BEHAVIOURS:
        store.store(group="behaviour", name=name, node={"name": name})


@hydra.main(config_path=COLLECT_CONFIG_DIR, config_name="collect", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-collect")
def _hydra_main(cfg: DictConfig) -> None:
    OmegaConf.to_object(cfg).check()  # range checks, naming the key, before any work
    settings = to_plain(cfg)
    if settings["dataset"]:
        summary = _suite(settings)
    elif settings["behaviour"]["train"]:
        summary = _train(settings)
    else:
        summary = _record(settings)
    _write_summary(settings, summary)


def main() -> None:
    # --list is answered before Hydra, which would reject it as an unknown flag.
    if any(flag in sys.argv[1:] for flag in LIST_FLAGS):
        try:
            _print_suite()
        except (ValueError, FileNotFoundError) as error:
            print(f"kinema-collect: error: {error}", file=sys.stderr)
            sys.exit(2)
        return
    refuse_run_dir_that_is_a_file("kinema-collect")
    register_collect_configs()
    _hydra_main()


if __name__ == "__main__":
    main()
