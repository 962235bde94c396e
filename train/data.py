"""From the `dataset` and `env` config entries to a validated dataset and its task."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kinema.datasets import OfflineDataset, load_dataset
from kinema.envs import TaskSpec, get_task, task_spaces


@dataclass
class ResolvedDataset:
    dataset: OfflineDataset
    task: TaskSpec
    name: str
    path: Path

    @property
    def reference_returns(self) -> tuple[float, float] | None:
        return self.dataset.reference_returns


def dataset_path(dataset_cfg: dict[str, Any]) -> Path:
    """Where the configured dataset lives: an explicit path, the embedded file, or the suite cache."""
    if dataset_cfg.get("path"):
        return Path(str(dataset_cfg["path"])).expanduser()
    name = dataset_cfg.get("name")
    if not name:
        raise ValueError("dataset: set dataset=<suite name> or dataset.path=<file.hdf5 or Minari dataset dir>")
    from kinema.datasets.suite import EMBEDDED_NAME, embedded_dataset_path, ensure_suite_dataset

    if name == EMBEDDED_NAME:
        return embedded_dataset_path()
    return ensure_suite_dataset(str(name))  # regenerated on first use, checksum-verified


def resolve_dataset(dataset_cfg: dict[str, Any], env: str | None) -> ResolvedDataset:
    path = dataset_path(dataset_cfg)
    dataset = load_dataset(path)
    task_name = env or dataset.metadata.get("task") or dataset.metadata.get("env_id")
    if not task_name:
        raise ValueError(
            f"dataset {path} does not say which task it was recorded in (no metadata/task or metadata/env_id); "
            "name it with env=<task>, e.g. env=hopper"
        )
    task = get_task(str(task_name))
    obs_dim, act_dim, action_low, action_high = task_spaces(task)
    with warnings.catch_warnings():
        if not _is_main_process():
            warnings.simplefilter("ignore")  # every DDP rank loads the data; rank 0 says what it found
        dataset = dataset.validate(obs_dim=obs_dim, act_dim=act_dim, action_low=action_low, action_high=action_high)
        dataset = dataset.split_at_time_limit(task.max_episode_steps)
    return ResolvedDataset(dataset=dataset, task=task, name=path.stem if dataset_cfg.get("path") else str(dataset_cfg["name"]), path=path)


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
