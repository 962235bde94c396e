"""kinema.datasets: load, validate and sample offline trajectories (D4RL-HDF5 and Minari).

``load_dataset(path)`` accepts a D4RL-layout ``.hdf5``/``.h5`` file, a Minari dataset
directory (or its ``main_data.hdf5``), or a Minari dataset id resolved under
``$MINARI_DATASETS_PATH``; the result is validated before it is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

from .d4rl_io import read_d4rl_hdf5, write_d4rl_hdf5
from .errors import DatasetError
from .minari_io import DATA_FILE, read_minari, resolve_minari_path
from .samplers import EpisodeSampler, TransitionSampler, WindowSampler, make_sampler, register_sampler
from .store import OfflineDataset, concatenate

HDF5_SUFFIXES = (".hdf5", ".h5")

__all__ = [
    "DatasetError",
    "EpisodeSampler",
    "OfflineDataset",
    "TransitionSampler",
    "WindowSampler",
    "concatenate",
    "load_dataset",
    "make_sampler",
    "read_d4rl_hdf5",
    "read_minari",
    "register_sampler",
    "resolve_minari_path",
    "write_d4rl_hdf5",
]


def load_dataset(path: str | os.PathLike, obs_dim: int | None = None, act_dim: int | None = None) -> OfflineDataset:
    """Load a D4RL-HDF5 file or a Minari dataset and validate it against the task's dims."""
    path = Path(path)
    if path.is_file() and path.name != DATA_FILE:
        dataset = read_d4rl_hdf5(path)
    elif path.is_dir() or path.name == DATA_FILE:
        dataset = read_minari(path)
    elif path.suffix.lower() in HDF5_SUFFIXES:
        raise FileNotFoundError(f"{path}: no such dataset file")
    else:
        dataset = read_minari(path)  # a Minari id such as "mujoco/hopper/medium-v0"
    return dataset.validate(obs_dim=obs_dim, act_dim=act_dim)
