"""Chain-of-hindsight windows for the Agentic Transformer (batch kind ``chains``).

One sample:

1. draw a chain length c uniformly in 1..max_chain_len and c distinct episodes from this
   rank's shard, each in proportion to its length (as DT windows weigh episodes);
2. sort the c episodes by ascending total return and lay them end to end;
3. relabel every episode's target to the chain's maximum return R_max: the
   return-to-go at step t of episode i is R_max minus what episode i collected before t
   (``relabel="chain_max"``, the default); with ``relabel="own_return"`` every episode keeps
   its own return as its target, i.e. its true returns-to-go, as DT's windows do; with
   ``relabel="later_trials"`` only the steps that follow an earlier trial (``previous_trial_*``
   below) are relabelled, and a chain's first trial and fresh-trial windows keep their own
   return, as a test context's first trial has nothing before it to learn from;
4. cut a window as DT's ``windows`` sampler does: it starts at a uniformly drawn step of
   the chain (``window_start="chain"``, the default) or of the episode drawn first
   (``window_start="episode"``: as that episode was drawn in proportion to its length, every
   step of the dataset then starts a window equally often, as in DT, whatever the chain
   length; with ``"chain"`` a step's weight grows with its episode's length in chains of
   several episodes) and runs K = context_len steps or to the chain's end, whichever comes
   first; a shorter window is padded on the left (``mask`` False);
5. with probability ``fresh_trial_prob`` (default 0 here; the Agentic Transformer's config
   sets 0.5), hide the trials before the window's last one: their steps become left padding,
   so the window opens on that trial's first step as a test context's first trial does
   (``kinema.policies.at`` gives the measurements).

Windows are start-aligned because, measured, end-aligned ones cost DT and AT most of their score
on walker2d-medium-replay (README, "Agentic Transformer: what was tried").

Besides the ``windows`` keys (observations, actions, rewards, returns_to_go — relabelled
and unscaled — timesteps restarting at 0 in each episode, mask) a batch holds:

- ``completions`` (B, K) float: 1 from the first step at which the episode's cumulative
  reward (through that step) reaches R_max, else 0 (sticky, so negative rewards later do
  not clear it); only the best episode of a chain — and ties — ever reach it;
- ``trial_index`` (B, K) int64: the episode's place in the chain (0 = lowest return);
- ``final_trial`` (B, K) bool: the step belongs to the chain's last (best) episode;
- ``previous_trial_return`` and ``previous_trial_length`` (B, K) float: the return and length of
  the episode before the step's own in the chain, what a test context knows of its last trial;
  0 on a chain's first trial and in windows whose earlier trials are hidden (a length of 0 says
  there was none).

Padded steps are zero everywhere (``final_trial`` False). All of it is vectorised numpy
over the batch; only the one-off prefix maximum at construction loops over episodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..store import OfflineDataset
from . import EpisodeSampler, register_sampler

MAX_REDRAWS = 10
RELABEL = ("chain_max", "own_return", "later_trials")
WINDOW_START = ("chain", "episode")


class ChainSampler(EpisodeSampler):
    kind = "chains"

    def __init__(
        self,
        dataset: OfflineDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        context_len: int = 20,
        max_chain_len: int = 4,
        fresh_trial_prob: float = 0.0,
        relabel: str = "chain_max",
        window_start: str = "chain",
    ):
        if isinstance(max_chain_len, bool) or not isinstance(max_chain_len, (int, np.integer)) or max_chain_len < 1:
            raise ValueError(f"chains sampler: max_chain_len must be a positive integer, got {max_chain_len!r}")
        if isinstance(fresh_trial_prob, bool) or not isinstance(fresh_trial_prob, (int, float)) or not 0 <= fresh_trial_prob <= 1:
            raise ValueError(f"chains sampler: fresh_trial_prob must be a number in [0, 1], got {fresh_trial_prob!r}")
        if relabel not in RELABEL:
            raise ValueError(f"chains sampler: relabel must be one of {RELABEL}, got {relabel!r}")
        if window_start not in WINDOW_START:
            raise ValueError(f"chains sampler: window_start must be one of {WINDOW_START}, got {window_start!r}")
        super().__init__(dataset, batch_size, seed, rank, world_size, device, context_len)
        self.max_chain_len = int(max_chain_len)
        self.fresh_trial_prob = float(fresh_trial_prob)
        self.relabel = relabel
        self.window_start = window_start
        rewards = dataset.rewards.astype(np.float64)
        total = np.cumsum(rewards)
        before_episode = (total - rewards)[dataset.episode_starts]
        # Reward collected in the episode up to and including each step (float64).
        self.cumulative = total - before_episode[dataset.episode_index]
        # Episode returns taken from the same numbers, so the best episode's last step equals R_max exactly.
        self.episode_return = self.cumulative[dataset.episode_ends - 1]
        self.prefix_max = np.empty_like(self.cumulative)
        for start, end in zip(dataset.episode_starts, dataset.episode_ends):
            np.maximum.accumulate(self.cumulative[start:end], out=self.prefix_max[start:end])

    def _identity(self) -> dict[str, Any]:
        return {**super()._identity(), "max_chain_len": self.max_chain_len, "fresh_trial_prob": self.fresh_trial_prob,
                "relabel": self.relabel, "window_start": self.window_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # States saved before the options existed.
        super().load_state_dict({"relabel": "chain_max", "window_start": "chain", **state})

    def _draw_episodes(self, shape) -> np.ndarray:
        """Episodes of this rank's shard, each drawn in proportion to its length."""
        return self.dataset.episode_index[self.shard_steps[self.rng.integers(0, len(self.shard_steps), size=shape)]]

    def chain_steps(self) -> dict[str, np.ndarray]:
        """Index arrays of one batch: steps, mask, trial, chain_len, chain_total_steps, r_max, episodes (the
        chain's, sorted; unused slots last) and fresh (rows whose earlier trials are hidden), all numpy."""
        data, rng = self.dataset, self.rng
        batch, k, m = self.batch_size, self.context_len, self.max_chain_len
        chain_len = np.minimum(rng.integers(1, m + 1, size=batch), len(self.shard_episodes))
        used = np.arange(m)[None, :] < chain_len[:, None]
        episodes = self._draw_episodes((batch, m))
        # Distinct episodes per chain: redraw repeats a few times, then drop any left (tiny datasets only).
        for _ in range(MAX_REDRAWS):
            repeated = _repeats(episodes, used)
            if not repeated.any():
                break
            episodes[repeated] = self._draw_episodes(int(repeated.sum()))
        used &= ~_repeats(episodes, used)
        chain_len = used.sum(axis=1)
        returns = np.where(used, self.episode_return[episodes], np.inf)  # unused slots sort last
        order = np.argsort(returns, axis=1, kind="stable")
        episodes = np.take_along_axis(episodes, order, axis=1)
        returns = np.take_along_axis(returns, order, axis=1)
        used = np.arange(m)[None, :] < chain_len[:, None]  # the used slots now come first
        lengths = np.where(used, data.episode_lengths[episodes], 0)
        offsets = np.cumsum(lengths, axis=1) - lengths  # unused slots start at the chain's end
        chain_steps = lengths.sum(axis=1)
        r_max = returns[np.arange(batch), chain_len - 1]

        # DT's (kzl's) windows: a uniform start, up to K steps not past the chain's end, left-padded.
        if self.window_start == "episode":
            rows = np.arange(batch)
            first_drawn = np.argmax(order == 0, axis=1)  # where the first drawn episode (never a repeat) was sorted to
            start = offsets[rows, first_drawn] + rng.integers(0, lengths[rows, first_drawn])
        else:
            start = rng.integers(0, chain_steps)
        length = np.minimum(start + k, chain_steps) - start
        position = start[:, None] + np.arange(k)[None, :] - (k - length)[:, None]
        mask = position >= start[:, None]
        position = np.maximum(position, start[:, None])
        trial = (position[:, :, None] >= offsets[:, None, :]).sum(axis=2) - 1
        local = position - np.take_along_axis(offsets, trial, axis=1)
        steps = data.episode_starts[np.take_along_axis(episodes, trial, axis=1)] + local
        fresh = np.zeros(batch, dtype=bool)
        if self.fresh_trial_prob > 0:  # no draw at 0, so the stream stays that of earlier versions
            # Hide the earlier trials (as left padding): the window then opens on its last trial's start,
            # as the first trial of a test context does.
            fresh = rng.random(batch) < self.fresh_trial_prob
            mask &= ~(fresh[:, None] & (trial < trial[:, -1:]))
        return {"steps": steps, "mask": mask, "trial": trial, "chain_len": chain_len, "chain_total_steps": chain_steps,
                "r_max": r_max, "episodes": episodes, "fresh": fresh}

    def sample(self) -> dict[str, torch.Tensor]:
        index = self.chain_steps()
        steps, mask, trial, r_max = index["steps"], index["mask"], index["trial"], index["r_max"]
        data = self.dataset
        padding = ~mask

        def padded(values: np.ndarray) -> np.ndarray:
            values[padding] = 0
            return values

        rewards = data.rewards[steps]
        collected_before = self.cumulative[steps] - rewards
        final_trial = (trial == (index["chain_len"] - 1)[:, None]) & mask
        # The trial before each step's own, as the test context saw it; none on a first or fresh trial.
        previous = np.take_along_axis(index["episodes"], np.maximum(trial - 1, 0), axis=1)
        has_previous = (trial > 0) & ~index["fresh"][:, None] & mask
        if self.relabel == "chain_max":
            target = r_max[:, None]
        else:
            target = self.episode_return[data.episode_index[steps]]
            if self.relabel == "later_trials":
                target = np.where(has_previous, r_max[:, None], target)
        returns_to_go = (target - collected_before).astype(np.float32)
        completions = (self.prefix_max[steps] >= target).astype(np.float32)
        previous_return = np.where(has_previous, self.episode_return[previous], 0.0).astype(np.float32)
        previous_length = np.where(has_previous, data.episode_lengths[previous], 0).astype(np.float32)
        return {
            "observations": self.to_tensor(padded(data.observations[steps])),
            "actions": self.to_tensor(padded(data.actions[steps])),
            "rewards": self.to_tensor(padded(rewards)),
            "returns_to_go": self.to_tensor(padded(returns_to_go)),
            "timesteps": self.to_tensor(padded(data.timesteps[steps])),
            "mask": self.to_tensor(mask),
            "completions": self.to_tensor(padded(completions)),
            "trial_index": self.to_tensor(padded(trial.astype(np.int64))),
            "final_trial": self.to_tensor(final_trial),
            "previous_trial_return": self.to_tensor(previous_return),
            "previous_trial_length": self.to_tensor(previous_length),
        }


def _repeats(episodes: np.ndarray, used: np.ndarray) -> np.ndarray:
    """(B, M) True where a used slot repeats the episode of an earlier used slot."""
    same = (episodes[:, :, None] == episodes[:, None, :]) & used[:, :, None] & used[:, None, :]
    earlier = np.tri(episodes.shape[1], k=-1, dtype=bool)  # [j, i] True for i < j
    return (same & earlier).any(axis=2)


register_sampler(ChainSampler.kind, ChainSampler)
