"""In-memory offline dataset: D4RL-style flat arrays plus derived episode structure.

Every step ``i`` is one transition (observation, action, reward, terminal, timeout).
Episodes end after a step with ``terminals | timeouts``; a final run of steps with
neither flag (a dataset cut off mid-episode) counts as an episode too.

Derived arrays (episode boundaries, returns-to-go, timesteps, normalisation
statistics) are computed once with vectorised numpy and cached, so treat the arrays of
an ``OfflineDataset`` as read-only: build a new one instead of mutating them.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Sequence

import numpy as np

from .errors import DatasetError

# Keys checked for NaN/inf: the arrays a policy trains on.
FINITE_KEYS = ("observations", "actions", "rewards", "next_observations")
# Actions further than this many half-widths of the task's action box from its centre are
# not noise around the box but another scale (degrees, N·m, unnormalised controls): refused.
FAR_OUTSIDE_HALF_WIDTHS = 1.5
# Slack for float rounding at the box edges (e.g. float32 tanh outputs of exactly ±1).
BOX_TOLERANCE = 1e-5


def _as_array(value: Any, dtype: Any, key: str, source: str) -> np.ndarray:
    try:
        if dtype is bool and np.asarray(value).dtype != bool:
            # Older D4RL files store terminals as 0.0/1.0 floats.
            return np.asarray(value) != 0
        return np.asarray(value, dtype=dtype)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{source}: '{key}' cannot be read as a {np.dtype(dtype).name} array: {error}") from error


@dataclass(eq=False)
class OfflineDataset:
    """Flat arrays of transitions in D4RL's layout, with derived per-episode views.

    Arrays are converted to kinema's dtypes on construction: observations, actions,
    next_observations float32; rewards float32; terminals, timeouts bool. ``timeouts``
    may be omitted (no time-limit truncations recorded).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray | None = None
    next_observations: np.ndarray | None = None
    infos: dict[str, np.ndarray] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    source: str = "<in-memory dataset>"

    def __post_init__(self) -> None:
        src = self.source
        self.observations = _as_array(self.observations, np.float32, "observations", src)
        self.actions = _as_array(self.actions, np.float32, "actions", src)
        self.rewards = _as_array(self.rewards, np.float32, "rewards", src)
        self.terminals = _as_array(self.terminals, bool, "terminals", src)
        if self.timeouts is None:
            self.timeouts = np.zeros(self.terminals.shape, dtype=bool)
        self.timeouts = _as_array(self.timeouts, bool, "timeouts", src)
        if self.next_observations is not None:
            self.next_observations = _as_array(self.next_observations, np.float32, "next_observations", src)
        self.infos = {key: np.asarray(value) for key, value in self.infos.items()}
        self.metadata = dict(self.metadata)

    # -- validation ------------------------------------------------------------------
    def validate(
        self,
        obs_dim: int | None = None,
        act_dim: int | None = None,
        action_low: Sequence[float] | np.ndarray | None = None,
        action_high: Sequence[float] | np.ndarray | None = None,
    ) -> "OfflineDataset":
        """Raise DatasetError naming the source and key of the first problem; return self.

        With the task's action box (``action_low``, ``action_high``), actions outside it
        warn (policies clip them to the box, so they train on other targets than the data
        holds) and actions more than 1.5 half-widths from the box centre are refused.
        """
        src = self.source
        arrays = self._named_arrays()
        expected_ndim = {"observations": 2, "actions": 2, "rewards": 1, "terminals": 1, "timeouts": 1, "next_observations": 2}
        for key, array in arrays.items():
            wanted = expected_ndim.get(key)
            if wanted is not None and array.ndim != wanted:
                raise DatasetError(
                    f"{src}: '{key}' must have {wanted} dimension(s) (steps{', features' if wanted == 2 else ''}), "
                    f"got shape {array.shape}"
                )
            if wanted is None and array.ndim < 1:
                raise DatasetError(f"{src}: '{key}' must be an array with one entry per step, got a scalar")
        length = len(self.observations)
        if length == 0:
            raise DatasetError(f"{src}: the dataset is empty ('observations' has 0 steps)")
        for key, array in arrays.items():
            if len(array) != length:
                raise DatasetError(f"{src}: '{key}' has {len(array)} entries but 'observations' has {length}")
        if self.next_observations is not None and self.next_observations.shape != self.observations.shape:
            raise DatasetError(
                f"{src}: 'next_observations' has shape {self.next_observations.shape} "
                f"but 'observations' has shape {self.observations.shape}"
            )
        if obs_dim is not None and self.obs_dim != obs_dim:
            raise DatasetError(f"{src}: 'observations' have dimension {self.obs_dim} but the task expects {obs_dim}")
        if act_dim is not None and self.act_dim != act_dim:
            raise DatasetError(f"{src}: 'actions' have dimension {self.act_dim} but the task expects {act_dim}")
        for key in FINITE_KEYS:
            array = arrays.get(key)
            if array is None:
                continue
            finite_rows = np.isfinite(array.reshape(len(array), -1)).all(axis=1)
            if not finite_rows.all():
                first = int(np.flatnonzero(~finite_rows)[0])
                raise DatasetError(f"{src}: '{key}' contains NaN or inf, first at step {first}; expected finite values")
        if action_low is not None and action_high is not None:
            self._check_action_box(np.asarray(action_low, dtype=np.float64), np.asarray(action_high, dtype=np.float64))
        return self

    def _check_action_box(self, low: np.ndarray, high: np.ndarray) -> None:
        src = self.source
        if low.shape != (self.act_dim,) or high.shape != (self.act_dim,):
            raise ValueError(f"{src}: action bounds of shapes {low.shape} and {high.shape} given for {self.act_dim}-dim actions")
        bounded = np.isfinite(low) & np.isfinite(high)  # Gymnasium allows unbounded dimensions
        centre, half_width = (high + low) / 2, (high - low) / 2
        offset = np.abs(self.actions.astype(np.float64) - centre) - half_width  # > 0: outside the box
        outside = bounded & (offset > BOX_TOLERANCE * np.maximum(half_width, 1.0))
        if not outside.any():
            return
        found_low, found_high = self.actions.min(axis=0), self.actions.max(axis=0)

        def ranges(mask: np.ndarray) -> str:
            """Range found against the box, for the dimensions where ``mask`` holds somewhere."""
            dims = np.flatnonzero(mask.any(axis=0))
            return "; ".join(
                f"dimension {d}: [{_short(found_low[d])}, {_short(found_high[d])}] vs [{_short(low[d])}, {_short(high[d])}]"
                for d in dims[:4]
            ) + (f"; and {len(dims) - 4} more dimension(s)" if len(dims) > 4 else "")

        far = bounded & (offset > (FAR_OUTSIDE_HALF_WIDTHS - 1) * half_width)
        if far.any():
            raise DatasetError(
                f"{src}: 'actions' reach beyond {FAR_OUTSIDE_HALF_WIDTHS}x the half-width of the task's action box "
                f"from its centre ({ranges(far)}): recorded in other units or another scale? "
                f"Rescale them to the task's box (values slightly outside it are clipped with a warning)"
            )
        steps = int(outside.any(axis=1).sum())
        warnings.warn(
            f"{src}: 'actions': {steps / self.num_transitions:.1%} of steps ({steps} of {self.num_transitions}) "
            f"are outside the task's action box ({ranges(outside)}); the BC and DT losses clip them to the box",
            UserWarning,
            stacklevel=3,
        )

    def _named_arrays(self) -> dict[str, np.ndarray]:
        arrays = {
            "observations": self.observations,
            "actions": self.actions,
            "rewards": self.rewards,
            "terminals": self.terminals,
            "timeouts": self.timeouts,
        }
        if self.next_observations is not None:
            arrays["next_observations"] = self.next_observations
        arrays.update({f"infos/{key}": value for key, value in self.infos.items()})
        return arrays

    # -- sizes -------------------------------------------------------------------------
    @property
    def num_transitions(self) -> int:
        return int(len(self.rewards))

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def num_episodes(self) -> int:
        return int(len(self.episode_starts))

    # -- episode structure ---------------------------------------------------------------
    @cached_property
    def episode_ends(self) -> np.ndarray:
        """Exclusive end index of every episode, int64 (E,)."""
        ends = np.flatnonzero(self.terminals | self.timeouts) + 1
        n = self.num_transitions
        if n > 0 and (len(ends) == 0 or ends[-1] != n):
            ends = np.append(ends, n)  # the unterminated final run is an episode too
        return ends.astype(np.int64)

    @cached_property
    def episode_starts(self) -> np.ndarray:
        """Start index of every episode, int64 (E,)."""
        ends = self.episode_ends
        return np.concatenate([[0], ends[:-1]]).astype(np.int64) if len(ends) else np.zeros(0, dtype=np.int64)

    @cached_property
    def episode_lengths(self) -> np.ndarray:
        return self.episode_ends - self.episode_starts

    @cached_property
    def episode_index(self) -> np.ndarray:
        """Episode number of every step, int64 (N,)."""
        return np.repeat(np.arange(self.num_episodes, dtype=np.int64), self.episode_lengths)

    @cached_property
    def timesteps(self) -> np.ndarray:
        """Index of every step within its episode, int64 (N,)."""
        return np.arange(self.num_transitions, dtype=np.int64) - self.episode_starts[self.episode_index]

    @cached_property
    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of every episode, float64 (E,)."""
        if self.num_transitions == 0:
            return np.zeros(0, dtype=np.float64)
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)

    @cached_property
    def returns_to_go(self) -> np.ndarray:
        """Undiscounted sum of rewards from each step to the end of its episode, float32 (N,)."""
        rewards = self.rewards.astype(np.float64)
        cumulative = np.cumsum(rewards)
        # Sum over [i, end) = cumulative[end - 1] - cumulative[i] + reward[i].
        episode_total_at_end = cumulative[self.episode_ends - 1][self.episode_index]
        return (episode_total_at_end - cumulative + rewards).astype(np.float32)

    def split_at_time_limit(self, max_episode_steps: int) -> "OfflineDataset":
        """Cut unflagged runs into episodes of the task's time limit, when no timeouts are recorded.

        D4RL v0 files have no 'timeouts' key, so each episode the time limit cut runs into
        the next one. When the dataset records no timeout at all, a timeout is marked after
        every ``max_episode_steps`` steps without a terminal (never on the very last step,
        a run the file cuts off), with a warning naming the source. Returns ``self`` when
        nothing needs cutting.
        """
        if max_episode_steps < 1:
            raise ValueError(f"max_episode_steps must be a positive number of steps, got {max_episode_steps}")
        if self.timeouts.any():
            return self
        cut = ((self.timesteps + 1) % max_episode_steps == 0) & ~self.terminals
        cut[-1] = False
        added = int(cut.sum())
        if not added:
            return self
        warnings.warn(
            f"{self.source}: no 'timeouts' recorded (a D4RL v0 file?) and runs longer than the task's time limit "
            f"of {max_episode_steps} steps, so episodes cut by the limit would run into the next: marked a timeout "
            f"every {max_episode_steps} steps without a terminal ({added} episode boundaries added)",
            UserWarning,
            stacklevel=2,
        )
        return replace(self, timeouts=self.timeouts | cut)

    # -- statistics -------------------------------------------------------------------
    @cached_property
    def obs_mean(self) -> np.ndarray:
        return self.observations.mean(axis=0, dtype=np.float64).astype(np.float32)

    @cached_property
    def obs_std(self) -> np.ndarray:
        """Per-dimension std: 1.0 for a constant dimension (nothing to scale), else floored at 1e-6."""
        std = self.observations.std(axis=0, dtype=np.float64)
        constant = self.observations.max(axis=0) == self.observations.min(axis=0)
        return np.where(constant, 1.0, np.maximum(std, 1e-6)).astype(np.float32)

    def statistics(self) -> dict[str, dict[str, np.ndarray]]:
        """Normalisation statistics keyed by feature (what a checkpoint's stats.json holds)."""
        actions = self.actions.astype(np.float64)
        return {
            "observations": {"mean": self.obs_mean, "std": self.obs_std,
                             "min": self.observations.min(axis=0), "max": self.observations.max(axis=0)},
            "actions": {"mean": actions.mean(axis=0), "std": np.maximum(actions.std(axis=0), 1e-6),
                        "min": actions.min(axis=0), "max": actions.max(axis=0)},
        }

    @property
    def task(self) -> str | None:
        return self.metadata.get("task")

    @property
    def reference_returns(self) -> tuple[float, float] | None:
        """(ref_min_score, ref_max_score) from the metadata, or None when either is missing."""
        low, high = self.metadata.get("ref_min_score"), self.metadata.get("ref_max_score")
        if low is None or high is None:
            return None
        return float(low), float(high)

    def summary(self) -> dict[str, Any]:
        returns = self.episode_returns
        lengths = self.episode_lengths
        empty = len(returns) == 0
        return {
            "episodes": self.num_episodes,
            "transitions": self.num_transitions,
            "return_mean": float(returns.mean()) if not empty else float("nan"),
            "return_std": float(returns.std()) if not empty else float("nan"),
            "return_min": float(returns.min()) if not empty else float("nan"),
            "return_max": float(returns.max()) if not empty else float("nan"),
            "length_mean": float(lengths.mean()) if not empty else float("nan"),
            "terminals": int(self.terminals.sum()),
            "timeouts": int(self.timeouts.sum()),
        }

    # -- slicing and joining -----------------------------------------------------------
    def select_episodes(self, indices: Sequence[int] | np.ndarray) -> "OfflineDataset":
        """A new dataset holding the given episodes in the given order."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and (indices.min() < -self.num_episodes or indices.max() >= self.num_episodes):
            raise IndexError(f"{self.source}: episode index out of range for a dataset with {self.num_episodes} episodes")
        starts, lengths = self.episode_starts[indices], self.episode_lengths[indices]
        offsets = np.cumsum(lengths) - lengths
        steps = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)
        timeouts = self.timeouts[steps]
        # An episode cut off by the end of the file has no flag on its last step; once
        # another episode follows it, mark it truncated so the boundary survives.
        last_steps = (offsets + lengths - 1)[:-1]
        unflagged = ~(self.terminals[steps[last_steps]] | timeouts[last_steps])
        timeouts[last_steps[unflagged]] = True
        return OfflineDataset(
            observations=self.observations[steps],
            actions=self.actions[steps],
            rewards=self.rewards[steps],
            terminals=self.terminals[steps],
            timeouts=timeouts,
            next_observations=None if self.next_observations is None else self.next_observations[steps],
            infos={key: value[steps] for key, value in self.infos.items()},
            metadata=dict(self.metadata),
            source=self.source,
        )

    def __repr__(self) -> str:
        return (
            f"OfflineDataset(source={self.source!r}, transitions={self.num_transitions}, "
            f"episodes={self.num_episodes}, obs_dim={self.observations.shape[1:]}, act_dim={self.actions.shape[1:]})"
        )


def concatenate(datasets: Sequence[OfflineDataset], metadata: dict[str, Any] | None = None) -> OfflineDataset:
    """Join datasets episode-wise (e.g. medium + expert = medium-expert).

    ``metadata`` defaults to the entries every input agrees on; pass it to describe the
    result yourself. Inputs must share observation/action dims, info keys, and all have
    (or all lack) next_observations.
    """
    if not datasets:
        raise DatasetError("concatenate() needs at least one dataset, got none")
    first = datasets[0]
    for other in datasets[1:]:
        for name in ("obs_dim", "act_dim"):
            if getattr(other, name) != getattr(first, name):
                raise DatasetError(
                    f"cannot concatenate {other.source} ({name} {getattr(other, name)}) "
                    f"with {first.source} ({name} {getattr(first, name)})"
                )
        if set(other.infos) != set(first.infos):
            raise DatasetError(
                f"cannot concatenate {other.source} (infos {sorted(other.infos)}) with {first.source} (infos {sorted(first.infos)})"
            )
        if (other.next_observations is None) != (first.next_observations is None):
            raise DatasetError(f"cannot concatenate {other.source} with {first.source}: only one has 'next_observations'")
    parts = [_with_final_boundary(d) for d in datasets[:-1]] + [datasets[-1]]
    if metadata is None:
        metadata = {
            key: value
            for key, value in first.metadata.items()
            if all(key in d.metadata and _same(d.metadata[key], value) for d in datasets[1:])
        }
    return OfflineDataset(
        observations=np.concatenate([d.observations for d in parts]),
        actions=np.concatenate([d.actions for d in parts]),
        rewards=np.concatenate([d.rewards for d in parts]),
        terminals=np.concatenate([d.terminals for d in parts]),
        timeouts=np.concatenate([d.timeouts for d in parts]),
        next_observations=None if first.next_observations is None else np.concatenate([d.next_observations for d in parts]),
        infos={key: np.concatenate([d.infos[key] for d in parts]) for key in first.infos},
        metadata=dict(metadata),
        source="concatenation of [" + ", ".join(d.source for d in datasets) + "]",
    )


def _with_final_boundary(dataset: OfflineDataset) -> OfflineDataset:
    """Mark the last step truncated if no flag ends it, so a following dataset starts a new episode."""
    if dataset.num_transitions == 0 or dataset.terminals[-1] or dataset.timeouts[-1]:
        return dataset
    timeouts = dataset.timeouts.copy()
    timeouts[-1] = True
    return replace(dataset, timeouts=timeouts)


def _short(value: float) -> str:
    """A bound or action value as a user would write it: 1, -1.1, 40, 0.333."""
    return f"{float(value):.3g}"


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)
