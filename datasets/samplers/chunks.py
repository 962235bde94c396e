"""Action-chunk windows for diffusion policies: ``n_obs_steps`` observations and ``horizon`` actions.

A window covers ``horizon`` consecutive steps starting at ``s``: its first ``n_obs_steps`` (To)
observations condition the policy, and all ``horizon`` (T) actions are the chunk it learns to
denoise. The step the policy acts at is ``s + To - 1``; the actions it executes are the chunk's
entries from index To - 1 on (diffusion_policy's alignment).

Windows hang over an episode's edges the way diffusion_policy's ``SequenceSampler`` pads them:
``s`` runs from ``-(To - 1)`` (the first observation repeated before the episode starts) to
``length - T + (n_action_steps - 1)`` (the last action repeated after it ends). Padding repeats
the edge step, never zeros. Every window of the rank's shard is equally likely.

Batch: observations (B, To, obs_dim), actions (B, T, act_dim), both raw float32.
"""

from __future__ import annotations

import numpy as np
import torch

from . import EpisodeSampler, register_sampler
from ..store import OfflineDataset


def chunk_windows_per_episode(lengths: np.ndarray, horizon: int, n_obs_steps: int, n_action_steps: int) -> np.ndarray:
    """How many windows start in each episode: starts -(To-1) .. length - T + Ta - 1 (none for a too-short episode)."""
    return np.maximum(lengths - horizon + n_action_steps + n_obs_steps - 1, 0)


class ChunkSampler(EpisodeSampler):
    kind = "chunks"

    def __init__(self, dataset: OfflineDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", context_len: int = 16, n_obs_steps: int = 2, n_action_steps: int = 8):
        super().__init__(dataset, batch_size, seed, rank, world_size, device, context_len)
        horizon = self.context_len
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"chunks sampler: n_obs_steps must be in 1..horizon ({horizon}), got {n_obs_steps}")
        if not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"chunks sampler: n_action_steps must be in 1..horizon - n_obs_steps + 1 ({horizon - n_obs_steps + 1}), "
                f"got {n_action_steps}"
            )
        self.n_obs_steps, self.n_action_steps = int(n_obs_steps), int(n_action_steps)
        self.episode_starts = dataset.episode_starts[self.shard_episodes]
        self.episode_lengths = dataset.episode_lengths[self.shard_episodes]
        counts = chunk_windows_per_episode(self.episode_lengths, horizon, self.n_obs_steps, self.n_action_steps)
        if counts.sum() == 0:
            raise ValueError(
                f"{dataset.source}: no episode of rank {rank}'s shard is long enough for chunks of horizon {horizon} "
                f"with n_obs_steps {n_obs_steps} and n_action_steps {n_action_steps} (longest: {self.episode_lengths.max()} steps)"
            )
        self.window_ends = np.cumsum(counts)  # window w lies in the first episode whose end exceeds w

    def window_steps(self) -> np.ndarray:
        """(B, T) global step indices of drawn windows, clamped into their episode (edge padding)."""
        windows = self.rng.integers(0, int(self.window_ends[-1]), size=self.batch_size)
        episode = np.searchsorted(self.window_ends, windows, side="right")
        first_window = self.window_ends[episode] - chunk_windows_per_episode(
            self.episode_lengths[episode], self.context_len, self.n_obs_steps, self.n_action_steps)
        start = windows - first_window - (self.n_obs_steps - 1)  # may be negative: padding before the episode
        offsets = np.clip(start[:, None] + np.arange(self.context_len)[None, :], 0, self.episode_lengths[episode, None] - 1)
        return self.episode_starts[episode, None] + offsets

    def sample(self) -> dict[str, torch.Tensor]:
        steps = self.window_steps()
        return {
            "observations": self.to_tensor(self.dataset.observations[steps[:, : self.n_obs_steps]]),
            "actions": self.to_tensor(self.dataset.actions[steps]),
        }

    def _identity(self) -> dict:
        return {**super()._identity(), "n_obs_steps": self.n_obs_steps, "n_action_steps": self.n_action_steps}


register_sampler(ChunkSampler.kind, ChunkSampler)
