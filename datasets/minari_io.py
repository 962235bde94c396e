"""Read local Minari datasets (HDF5 storage) with h5py and json only — minari is not imported.

On disk (minari 0.5): ``<root>/<dataset id>/data/metadata.json`` and
``<root>/<dataset id>/data/main_data.hdf5``, where ``<root>`` is ``$MINARI_DATASETS_PATH``
or ``~/.minari/datasets``. The HDF5 file holds one group ``episode_<i>`` per episode with
``observations`` (T+1, obs_dim), ``actions`` (T, act_dim), ``rewards``, ``terminations``,
``truncations`` (T,) and ``infos/*`` (T+1 when recorded by minari's DataCollector, which
stores the reset info first). minari 0.4 kept the metadata as attributes of the HDF5 file
instead of metadata.json; both are read.

Conversion to kinema's flat layout: the last observation of each episode becomes the
last ``next_observations`` entry and is otherwise dropped; terminals = terminations,
timeouts = truncations; T+1-long infos lose their last entry. An episode whose last step
has neither flag is marked truncated there, so it never merges into the next one.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import DatasetError
from .store import OfflineDataset

DATA_FILE = "main_data.hdf5"
METADATA_FILE = "metadata.json"
EPISODE_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")
# Minari metadata entries copied as they are (when scalar); spaces and specs are parsed instead.
PARSED_KEYS = {"observation_space", "action_space", "env_spec", "eval_env_spec"}


def minari_root() -> Path:
    """Where minari keeps datasets: $MINARI_DATASETS_PATH, else ~/.minari/datasets."""
    configured = os.environ.get("MINARI_DATASETS_PATH")
    return Path(configured) if configured else Path.home() / ".minari" / "datasets"


def resolve_minari_path(path_or_id: str | os.PathLike) -> Path:
    """The ``data`` directory of a Minari dataset given its directory, data directory or id.

    A dataset id such as ``"mujoco/hopper/medium-v0"`` is looked up under
    :func:`minari_root`.
    """
    candidates = [Path(path_or_id)]
    if not Path(path_or_id).is_absolute():
        candidates.append(minari_root() / Path(path_or_id))
    for candidate in candidates:
        if candidate.is_file() and candidate.name == DATA_FILE:
            return candidate.parent
        for data_dir in (candidate / "data", candidate):
            if (data_dir / DATA_FILE).is_file():
                return data_dir
    for candidate in candidates:
        if candidate.is_dir():
            raise DatasetError(
                f"{candidate} is a directory but not a Minari HDF5 dataset: expected data/{DATA_FILE} "
                f"(and data/{METADATA_FILE}) inside it"
            )
    looked = " or ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"no Minari dataset at {looked} (set MINARI_DATASETS_PATH to the datasets root)")


def read_minari(path_or_id: str | os.PathLike) -> OfflineDataset:
    """Load a local Minari dataset (Box observations and actions, HDF5 storage) and validate it."""
    data_dir = resolve_minari_path(path_or_id)
    data_file = data_dir / DATA_FILE
    source = str(data_file)
    if not h5py.is_hdf5(data_file):
        raise DatasetError(f"{source} is not an HDF5 file; expected Minari's HDF5 storage")
    try:
        with h5py.File(data_file, "r") as file:
            raw_metadata = _read_raw_metadata(data_dir, file)
            _check_supported(raw_metadata, source)
            episodes = _read_episodes(file, source)
    except DatasetError:
        raise
    except (OSError, RuntimeError, KeyError) as error:
        raise DatasetError(f"{source} is not a readable HDF5 file (truncated or corrupt?): {error}") from error
    return _to_offline_dataset(episodes, _convert_metadata(raw_metadata), source).validate()


def _read_raw_metadata(data_dir: Path, file: h5py.File) -> dict[str, Any]:
    metadata_path = data_dir / METADATA_FILE
    if metadata_path.is_file():
        try:
            with open(metadata_path, encoding="utf-8") as handle:
                metadata = json.load(handle)
        except json.JSONDecodeError as error:
            raise DatasetError(f"{metadata_path} is not valid JSON: {error}") from error
        if not isinstance(metadata, dict):
            raise DatasetError(f"{metadata_path}: expected a JSON object of metadata, got {type(metadata).__name__}")
        return metadata
    # minari 0.4: metadata lived in the HDF5 file's attributes.
    return {key: (value.decode() if isinstance(value, bytes) else value) for key, value in file.attrs.items()}


def _check_supported(metadata: dict[str, Any], source: str) -> None:
    data_format = metadata.get("data_format", "hdf5")
    if data_format != "hdf5":
        raise DatasetError(f"{source}: Minari data_format is '{data_format}'; kinema reads only the 'hdf5' storage")
    for key in ("observation_space", "action_space"):
        space = metadata.get(key)
        if not isinstance(space, str):
            continue
        try:
            space_type = json.loads(space).get("type")
        except (json.JSONDecodeError, AttributeError):
            continue
        if space_type != "Box":
            raise DatasetError(
                f"{source}: metadata '{key}' is a {space_type} space; only Box observations and actions are supported"
            )


def _episode_names(file: h5py.File, source: str) -> list[str]:
    numbered = []
    for name in file.keys():
        match = re.fullmatch(r"episode_(\d+)", name)
        if match:
            numbered.append((int(match.group(1)), name))
    if not numbered:
        raise DatasetError(f"{source}: no episode_<i> groups found; the dataset is empty")
    return [name for _, name in sorted(numbered)]  # numeric order: episode_2 before episode_10


def _read_episodes(file: h5py.File, source: str) -> list[dict[str, Any]]:
    episodes = []
    for name in _episode_names(file, source):
        group = file[name]
        missing = [key for key in EPISODE_KEYS if key not in group]
        if missing:
            raise DatasetError(f"{source}: '{name}' is missing '{missing[0]}'; every episode needs {list(EPISODE_KEYS)}")
        episode: dict[str, Any] = {"name": name}
        for key in EPISODE_KEYS:
            node = group[key]
            if not isinstance(node, h5py.Dataset):
                raise DatasetError(
                    f"{source}: '{name}/{key}' is a group (a Dict or Tuple space); only Box observations and actions are supported"
                )
            episode[key] = node[()]
        steps = len(episode["actions"])
        if len(episode["observations"]) != steps + 1:
            raise DatasetError(
                f"{source}: '{name}/observations' has {len(episode['observations'])} entries; "
                f"expected {steps + 1} (one more than '{name}/actions')"
            )
        for key in ("rewards", "terminations", "truncations"):
            if len(episode[key]) != steps:
                raise DatasetError(f"{source}: '{name}/{key}' has {len(episode[key])} entries but '{name}/actions' has {steps}")
        episode["infos"] = _read_episode_infos(group, name, steps, source)
        episodes.append(episode)
    return episodes


def _read_episode_infos(group: h5py.Group, name: str, steps: int, source: str) -> dict[str, np.ndarray]:
    if "infos" not in group or not isinstance(group["infos"], h5py.Group):
        return {}
    infos: dict[str, np.ndarray] = {}

    def visit(key: str, node: Any) -> None:
        if not isinstance(node, h5py.Dataset) or node.dtype.kind not in "biuf" or node.ndim < 1:
            return  # strings and scalars are not per-step arrays
        values = node[()]
        if len(values) == steps + 1:
            values = values[:steps]  # DataCollector stores the reset info first
        elif len(values) != steps:
            raise DatasetError(
                f"{source}: '{name}/infos/{key}' has {len(values)} entries; expected {steps} or {steps + 1}"
            )
        infos[key] = values

    group["infos"].visititems(visit)
    return infos


def _to_offline_dataset(episodes: list[dict[str, Any]], metadata: dict[str, Any], source: str) -> OfflineDataset:
    observations = np.concatenate([e["observations"][:-1] for e in episodes])
    next_observations = np.concatenate([e["observations"][1:] for e in episodes])
    # Keep only info keys every episode has, and say which were dropped.
    common_infos = set.intersection(*(set(e["infos"]) for e in episodes))
    dropped = sorted(set.union(*(set(e["infos"]) for e in episodes)) - common_infos)
    if dropped:
        metadata["dropped_infos"] = dropped
    return OfflineDataset(
        observations=observations,
        actions=np.concatenate([e["actions"] for e in episodes]),
        rewards=np.concatenate([e["rewards"] for e in episodes]),
        terminals=np.concatenate([e["terminations"] for e in episodes]),
        timeouts=np.concatenate([_truncations_ending_the_episode(e, last=e is episodes[-1]) for e in episodes]),
        next_observations=next_observations,
        infos={key: np.concatenate([e["infos"][key] for e in episodes]) for key in sorted(common_infos)},
        metadata=metadata,
        source=source,
    )


def _truncations_ending_the_episode(episode: dict[str, Any], last: bool) -> np.ndarray:
    """The episode's truncations, set on its last step when neither flag ends it (an episode
    recorded mid-way), so it does not run into the next; the file's last episode stays as it
    is, an unflagged final run being an episode of its own already."""
    truncations = np.asarray(episode["truncations"]) != 0
    if last or not len(truncations) or truncations[-1] or episode["terminations"][-1]:
        return truncations
    truncations = truncations.copy()
    truncations[-1] = True
    return truncations


def _convert_metadata(raw: dict[str, Any]) -> dict[str, Any]:
    """kinema conventions (task, env_id, ref scores, algorithm) plus Minari's scalar entries."""
    metadata: dict[str, Any] = {"format": "minari"}
    for key, value in raw.items():
        if key in PARSED_KEYS:
            continue
        if isinstance(value, (bool, int, float, str)) or (isinstance(value, list) and all(isinstance(v, (bool, int, float, str)) for v in value)):
            metadata[key] = value
    for spec_key, id_key in (("env_spec", "env_id"), ("eval_env_spec", "eval_env_id")):
        spec = _parse_env_spec(raw.get(spec_key))
        if spec.get("id"):
            metadata[id_key] = spec["id"]
        if spec_key == "env_spec" and spec.get("max_episode_steps") is not None:
            metadata["max_episode_steps"] = spec["max_episode_steps"]
    env_id = metadata.get("env_id") or metadata.get("eval_env_id")
    if env_id:
        metadata["task"] = task_from_env_id(env_id)
    if "algorithm_name" in metadata:
        metadata["algorithm"] = metadata["algorithm_name"]
    return metadata


def _parse_env_spec(spec: Any) -> dict[str, Any]:
    if isinstance(spec, bytes):
        spec = spec.decode()
    if not isinstance(spec, str):
        return {}
    try:
        parsed = json.loads(spec)
    except json.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def task_from_env_id(env_id: str) -> str:
    """'Hopper-v5' -> 'hopper', 'HalfCheetah-v5' -> 'halfcheetah', 'ns/Walker2d-v4' -> 'walker2d'."""
    name = env_id.rsplit("/", 1)[-1]
    return re.sub(r"-v\d+$", "", name).lower()
