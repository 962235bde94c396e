"""Vectorised batch samplers: numpy fancy indexing on precomputed index arrays, no per-sample loop.

Batch formats are the ones documented in ``kinema/policies/base.py`` (float32 unless
noted, observations raw). Every sampler:

- takes ``(dataset, batch_size, seed, rank=0, world_size=1, device="cpu", context_len)``;
- with ``world_size > 1`` samples only from its shard of episodes (``rank::world_size``),
  so DDP ranks see different data;
- exposes ``sample() -> dict[str, torch.Tensor]`` and ``state_dict()`` /
  ``load_state_dict()`` holding the numpy Generator state as plain JSON, so a resumed
  run continues the very same sample stream.

New kinds subclass :class:`EpisodeSampler` and register with :func:`register_sampler`;
they are found without a list of names: every module of this package (``chains.py``, ...)
is imported on first use, and so is every module named by an installed package's
``kinema.samplers`` entry point.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any, ClassVar

import numpy as np
import torch

from ..store import OfflineDataset


class EpisodeSampler:
    """Shared machinery: the rank's shard of episodes, its transitions, the random stream."""

    kind: ClassVar[str]

    def __init__(
        self,
        dataset: OfflineDataset,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
        context_len: int = 1,
    ):
        if batch_size < 1:
            raise ValueError(f"{self.kind} sampler: batch_size must be >= 1, got {batch_size}")
        if context_len < 1:
            raise ValueError(f"{self.kind} sampler: context_len must be >= 1, got {context_len}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"{self.kind} sampler: need 0 <= rank < world_size, got rank {rank}, world_size {world_size}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.context_len = int(context_len)
        self.seed = int(seed)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.device = torch.device(device)
        self.shard_episodes = np.arange(rank, dataset.num_episodes, world_size, dtype=np.int64)
        if len(self.shard_episodes) == 0:
            raise ValueError(
                f"{dataset.source}: rank {rank} of {world_size} gets no episodes; the dataset has only "
                f"{dataset.num_episodes} episode(s)"
            )
        starts = dataset.episode_starts[self.shard_episodes]
        lengths = dataset.episode_lengths[self.shard_episodes]
        offsets = np.cumsum(lengths) - lengths
        # Global step indices of every transition in this rank's episodes.
        self.shard_steps = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths) + np.repeat(starts, lengths)
        # Different ranks get different streams even with the same seed.
        self.rng = np.random.default_rng([self.seed, self.rank])

    def sample_steps(self) -> np.ndarray:
        """batch_size global step indices drawn uniformly from this rank's transitions."""
        return self.shard_steps[self.rng.integers(0, len(self.shard_steps), size=self.batch_size)]

    def to_tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def sample(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # -- resumption -------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "batch_size": self.batch_size,
            "context_len": self.context_len,
            "seed": self.seed,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_transitions": self.dataset.num_transitions,
            "num_episodes": self.dataset.num_episodes,
        }

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable: the sampler's identity and the generator state."""
        return {**self._identity(), "rng_state": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        identity = self._identity()
        mismatched = [f"{key}: saved {state.get(key)!r}, now {value!r}" for key, value in identity.items() if state.get(key) != value]
        if mismatched:
            raise ValueError(f"{self.kind} sampler state does not match this sampler ({'; '.join(mismatched)})")
        if "rng_state" not in state:
            raise ValueError(f"{self.kind} sampler state has no 'rng_state'; expected the output of state_dict()")
        self.rng.bit_generator.state = state["rng_state"]


class TransitionSampler(EpisodeSampler):
    """Uniform single transitions: observations (B, obs_dim), actions (B, act_dim).

    Also returns rewards (B,), terminals (B,) bool and, when the dataset has them,
    next_observations (B, obs_dim) for value-based methods.
    """

    kind = "transitions"

    def __init__(self, dataset: OfflineDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", context_len: int = 1):
        if context_len != 1:
            raise ValueError(f"transitions sampler draws single steps; context_len must be 1, got {context_len}")
        super().__init__(dataset, batch_size, seed, rank, world_size, device, context_len)

    def sample(self) -> dict[str, torch.Tensor]:
        steps = self.sample_steps()
        data = self.dataset
        batch = {
            "observations": self.to_tensor(data.observations[steps]),
            "actions": self.to_tensor(data.actions[steps]),
            "rewards": self.to_tensor(data.rewards[steps]),
            "terminals": self.to_tensor(data.terminals[steps]),
        }
        if data.next_observations is not None:
            batch["next_observations"] = self.to_tensor(data.next_observations[steps])
        return batch


class WindowSampler(EpisodeSampler):
    """Decision Transformer windows of K = context_len steps, as in kzl's DT.

    A window starts at a uniformly drawn transition (so episodes are drawn in proportion
    to their length) and runs up to K steps without leaving the episode; short windows
    are padded on the LEFT with zeros and ``mask`` is True on real steps. returns_to_go
    are unscaled (the policy scales), timesteps are the index within the episode.
    """

    kind = "windows"

    def __init__(self, dataset: OfflineDataset, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 device: str | torch.device = "cpu", context_len: int = 20):
        super().__init__(dataset, batch_size, seed, rank, world_size, device, context_len)
        self.episode_end_of_step = dataset.episode_ends[dataset.episode_index]

    def window_steps(self) -> tuple[np.ndarray, np.ndarray]:
        """(steps (B, K) global indices, mask (B, K)); padded slots point at the window's first step."""
        starts = self.sample_steps()
        k = self.context_len
        lengths = np.minimum(starts + k, self.episode_end_of_step[starts]) - starts
        offsets = np.arange(k)[None, :] - (k - lengths)[:, None]
        mask = offsets >= 0
        steps = starts[:, None] + np.maximum(offsets, 0)
        return steps, mask

    def sample(self) -> dict[str, torch.Tensor]:
        steps, mask = self.window_steps()
        data = self.dataset
        padding = ~mask

        def gather(array: np.ndarray) -> torch.Tensor:
            values = array[steps]
            values[padding] = 0
            return self.to_tensor(values)

        return {
            "observations": gather(data.observations),
            "actions": gather(data.actions),
            "rewards": gather(data.rewards),
            "returns_to_go": gather(data.returns_to_go),
            "timesteps": gather(data.timesteps),
            "mask": self.to_tensor(mask),
        }


SAMPLERS: dict[str, type[EpisodeSampler]] = {}
ENTRY_POINT_GROUP = "kinema.samplers"
_discovered = False


def register_sampler(kind: str, cls: type[EpisodeSampler]) -> type[EpisodeSampler]:
    """Make ``make_sampler(..., kind=kind)`` build ``cls``; the same kind cannot name two classes."""
    existing = SAMPLERS.get(kind)
    if existing is not None and existing is not cls:
        raise ValueError(f"sampler kind '{kind}' is already registered to {existing.__qualname__}")
    SAMPLERS[kind] = cls
    return cls


register_sampler(TransitionSampler.kind, TransitionSampler)
register_sampler(WindowSampler.kind, WindowSampler)


def make_sampler(
    dataset: OfflineDataset,
    kind: str,
    batch_size: int,
    context_len: int = 1,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    **options: Any,
) -> EpisodeSampler:
    """The sampler a policy's ``batch_spec`` (kind, context_len, options) asks for."""
    discover_samplers()
    if kind not in SAMPLERS:
        raise ValueError(f"unknown sampler kind '{kind}'; known kinds: {sorted(SAMPLERS)}")
    return SAMPLERS[kind](
        dataset, batch_size, seed=seed, rank=rank, world_size=world_size, device=device, context_len=context_len, **options
    )


def discover_samplers() -> None:
    """Import the sampler modules of this package and of the ``kinema.samplers`` entry points (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:
            raise ImportError(f"the {ENTRY_POINT_GROUP} entry point {entry_point.name!r} ({entry_point.value}) failed to load: {error}") from error
