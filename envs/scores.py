"""Normalised score: ``100 * (return - ref_min) / (ref_max - ref_min)``.

Two sources of reference returns exist. A kinema (or Minari) dataset carries its own,
measured the Minari way (mean return of a random policy and of the dataset's expert
policy, 100 episodes each); those are preferred when both are given. Otherwise the
task's D4RL constants are used. The source is always returned so reports can say which.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .registry import TaskSpec, get_task

DATASET_SOURCE = "dataset"
D4RL_SOURCE = "d4rl"

# Key pairs a dataset's metadata may use: kinema's own names and Minari's.
_DATASET_REF_KEYS = (("ref_min", "ref_max"), ("ref_min_score", "ref_max_score"))


def _dataset_pair(dataset_refs: Any) -> tuple[float | None, float | None]:
    if dataset_refs is None:
        return None, None
    if isinstance(dataset_refs, Mapping):
        for min_key, max_key in _DATASET_REF_KEYS:
            if min_key in dataset_refs or max_key in dataset_refs:
                return dataset_refs.get(min_key), dataset_refs.get(max_key)
        raise ValueError(
            f"dataset_refs has keys {sorted(dataset_refs)}; expected 'ref_min'/'ref_max' "
            f"or Minari's 'ref_min_score'/'ref_max_score'"
        )
    if isinstance(dataset_refs, Sequence) and not isinstance(dataset_refs, str) and len(dataset_refs) == 2:
        return dataset_refs[0], dataset_refs[1]
    raise ValueError(f"dataset_refs must be (ref_min, ref_max) or a mapping, got {dataset_refs!r}")


def reference_returns(task: str | TaskSpec, dataset_refs: Any = None) -> tuple[float, float, str]:
    """(ref_min, ref_max, source) for the task; source is "dataset" or "d4rl".

    ``dataset_refs`` is ``(ref_min, ref_max)`` or a mapping with ``ref_min``/``ref_max``
    (or Minari's ``ref_min_score``/``ref_max_score``); used only when both are set.
    """
    spec = get_task(task)
    ref_min, ref_max = _dataset_pair(dataset_refs)
    if ref_min is not None and ref_max is not None:
        source = DATASET_SOURCE
    elif spec.d4rl_ref_min is not None and spec.d4rl_ref_max is not None:
        ref_min, ref_max, source = spec.d4rl_ref_min, spec.d4rl_ref_max, D4RL_SOURCE
    else:
        raise ValueError(
            f"task {spec.name!r} has no D4RL reference returns and no dataset reference returns "
            f"were given: pass ref_min and ref_max (e.g. from the dataset's metadata)"
        )
    ref_min, ref_max = float(ref_min), float(ref_max)
    if not (math.isfinite(ref_min) and math.isfinite(ref_max)) or ref_max <= ref_min:
        raise ValueError(
            f"task {spec.name!r}: {source} reference returns must be finite with ref_max > ref_min, "
            f"got ref_min={ref_min}, ref_max={ref_max}"
        )
    return ref_min, ref_max, source


def normalized_score(
    returns: Any, task: str | TaskSpec, ref_min: float | None = None, ref_max: float | None = None
) -> tuple[np.ndarray, str]:
    """Normalised scores of ``returns`` (scalar or array) and the reference source used."""
    low, high, source = reference_returns(task, (ref_min, ref_max))
    scores = 100.0 * (np.asarray(returns, dtype=np.float64) - low) / (high - low)
    return scores, source
