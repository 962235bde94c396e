"""Read and write D4RL-layout HDF5 files.

Layout (exactly D4RL's): ``observations`` (N, obs_dim) float32, ``next_observations``
(N, obs_dim) float32, ``actions`` (N, act_dim) float32, ``rewards`` (N,) float32,
``terminals`` (N,) bool (true only on a real termination), ``timeouts`` (N,) bool
(time-limit truncation), ``infos/*`` (N, ...) e.g. ``infos/qpos``, ``infos/qvel``, and
``metadata/*``. Real D4RL files store metadata as datasets, including nested groups of
policy weights (``metadata/policy/fc0/weight``); the reader keeps scalars and strings
(flattened to ``"policy/nonlinearity"``-style keys) and skips arrays.

kinema writes metadata values as scalar datasets; lists and dicts are stored as a JSON
string dataset with the attribute ``json = True`` so they read back unchanged.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import DatasetError
from .store import OfflineDataset

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")
OPTIONAL_KEYS = ("timeouts", "next_observations")
JSON_ATTRIBUTE = "json"
# A temporary file beside the target not written to for this long belongs to a killed write
# (a live write touches its file continuously), so the next write to that path removes it.
STALE_TEMPORARY_S = 60.0


def read_d4rl_hdf5(path: str | os.PathLike) -> OfflineDataset:
    """Load a D4RL-layout HDF5 file and validate it (lengths, dims, finite values)."""
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise FileNotFoundError(f"{source}: no such dataset file")
    if path.is_dir():
        raise DatasetError(f"{source} is a directory; expected a D4RL-layout .hdf5 file")
    if not h5py.is_hdf5(path):
        raise DatasetError(f"{source} is not an HDF5 file; expected a D4RL-layout .hdf5 file")
    try:
        with h5py.File(path, "r") as file:
            missing = [key for key in REQUIRED_KEYS if key not in file]
            if missing:
                raise DatasetError(
                    f"{source}: missing required key '{missing[0]}'; a D4RL file needs {list(REQUIRED_KEYS)} "
                    f"(optional: {list(OPTIONAL_KEYS)}, infos/*, metadata/*); found {sorted(file.keys())}"
                )
            arrays = {key: _read_array(file, key, source) for key in REQUIRED_KEYS + OPTIONAL_KEYS if key in file}
            infos = _read_infos(file["infos"], source) if "infos" in file else {}
            metadata = _read_metadata(file["metadata"]) if "metadata" in file else {}
    except DatasetError:
        raise
    except (OSError, RuntimeError, KeyError, ValueError) as error:
        # h5py reports truncated or corrupt files as OSError/RuntimeError/KeyError.
        raise DatasetError(f"{source} is not a readable HDF5 file (truncated or corrupt?): {error}") from error
    # Older D4RL files (v0) have no 'timeouts': their episodes are still split on
    # terminals, and D4RL's MuJoCo tasks cut episodes at 1000 steps, but we do not invent
    # timeout flags we were not given — a missing key simply means "no truncations recorded".
    dataset = OfflineDataset(
        observations=arrays["observations"],
        actions=arrays["actions"],
        rewards=arrays["rewards"],
        terminals=arrays["terminals"],
        timeouts=arrays.get("timeouts"),
        next_observations=arrays.get("next_observations"),
        infos=infos,
        metadata=metadata,
        source=source,
    )
    return dataset.validate()


def _read_array(file: h5py.File, key: str, source: str) -> np.ndarray:
    node = file[key]
    if not isinstance(node, h5py.Dataset):
        raise DatasetError(f"{source}: '{key}' is a group; expected a dataset of one entry per step")
    if node.dtype.kind not in "biuf":
        raise DatasetError(f"{source}: '{key}' has dtype {node.dtype}; expected numbers (float32 or bool)")
    return node[()]


def _read_infos(group: h5py.Group, source: str) -> dict[str, np.ndarray]:
    """Numeric per-step arrays under infos/, nested groups flattened to 'a/b' keys."""
    infos: dict[str, np.ndarray] = {}

    def visit(name: str, node: Any) -> None:
        if isinstance(node, h5py.Dataset) and node.dtype.kind in "biuf" and node.ndim >= 1:
            infos[name] = node[()]

    if not isinstance(group, h5py.Group):
        raise DatasetError(f"{source}: 'infos' is a dataset; expected a group of per-step arrays")
    group.visititems(visit)
    return infos


def _read_metadata(node: Any) -> dict[str, Any]:
    """Scalars and strings under metadata/ (datasets or attributes); arrays are skipped."""
    metadata: dict[str, Any] = {}
    if isinstance(node, h5py.Dataset):
        return metadata
    for name, value in node.attrs.items():
        scalar = _plain_scalar(value)
        if scalar is not None:
            metadata[name] = scalar

    def visit(name: str, item: Any) -> None:
        if not isinstance(item, h5py.Dataset) or item.shape != ():
            return  # groups are walked into; arrays (e.g. policy weights) are not metadata
        value = _plain_scalar(item[()])
        if value is None:
            return
        if item.attrs.get(JSON_ATTRIBUTE, False) and isinstance(value, str):
            value = json.loads(value)
        metadata[name] = value

    node.visititems(visit)
    return metadata


def _plain_scalar(value: Any) -> Any:
    """A Python bool/int/float/str for a scalar HDF5 value, else None."""
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, str):
        return value
    if isinstance(value, np.ndarray):
        if value.shape != ():
            return None
        value = value[()]
    if isinstance(value, (np.generic, bool, int, float)):
        value = value.item() if isinstance(value, np.generic) else value
        return value if isinstance(value, (bool, int, float, str)) else None
    return None


def write_d4rl_hdf5(dataset: OfflineDataset, path: str | os.PathLike, compression: str | None = None) -> Path:
    """Write ``dataset`` in D4RL's layout, atomically.

    The file is written to a temporary name in the same directory, flushed to disk, and
    renamed over ``path``: an interrupted write leaves either the old file or nothing,
    never a half-written file under the real name; temporary files a killed write left
    (``.<name>.<random>.tmp``, idle for a minute) are removed. ``compression`` is passed to h5py
    (e.g. "gzip", "lzf"); D4RL's own files are uncompressed.
    """
    path = Path(path)
    dataset.validate()
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    _remove_stale_temporaries(path, Path(temp_name))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp_name, 0o666 & ~umask)  # mkstemp creates 0600; a dataset is an ordinary file
    try:
        with h5py.File(temp_name, "w") as file:
            _write_contents(file, dataset, compression, str(path))
        with open(temp_name, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temp_name, path)
    except BaseException:
        # Also on KeyboardInterrupt: never leave the temporary file behind.
        Path(temp_name).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)
    return path


def _remove_stale_temporaries(path: Path, own: Path) -> None:
    """Delete the temporaries of earlier writes to ``path`` that are idle long enough to be dead.

    Ages are compared with our own fresh temporary's mtime, so the file system's clock
    is used on both sides (no skew on network file systems).
    """
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[^.]+\.tmp")
    now = own.stat().st_mtime
    for candidate in path.parent.iterdir():
        if candidate == own or not pattern.fullmatch(candidate.name):
            continue
        try:
            if now - candidate.stat().st_mtime > STALE_TEMPORARY_S:
                candidate.unlink()
        except FileNotFoundError:
            pass  # another writer finished or cleaned up first


def _write_contents(file: h5py.File, dataset: OfflineDataset, compression: str | None, destination: str) -> None:
    arrays = {
        "observations": dataset.observations,
        "actions": dataset.actions,
        "rewards": dataset.rewards,
        "terminals": dataset.terminals,
        "timeouts": dataset.timeouts,
    }
    if dataset.next_observations is not None:
        arrays["next_observations"] = dataset.next_observations
    for key, value in dataset.infos.items():
        arrays[f"infos/{key}"] = value
    for key, value in arrays.items():
        # No timestamps in the file, so identical data always gives identical bytes (suite checksums).
        file.create_dataset(key, data=value, compression=compression, track_times=False)
    metadata_group = file.create_group("metadata")
    for key, value in dataset.metadata.items():
        _write_metadata_value(metadata_group, key, value, destination)


def _write_metadata_value(group: h5py.Group, key: str, value: Any, destination: str) -> None:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, (bool, int, float, str)):
        group.create_dataset(key, data=value)
        return
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        encoded = json.dumps(value)
    except TypeError as error:
        raise DatasetError(
            f"{destination}: metadata['{key}'] is a {type(value).__name__}; expected a JSON-able "
            f"scalar, string, list or dict"
        ) from error
    group.create_dataset(key, data=encoded)
    group[key].attrs[JSON_ATTRIBUTE] = True


def _fsync_directory(directory: Path) -> None:
    """Persist the rename itself (POSIX); a no-op where directories cannot be opened."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)
