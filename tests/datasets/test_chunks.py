"""The diffusion policy's chunk sampler: windows, edge padding (repeated, never zeros), resumption."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.datasets import make_sampler
from kinema.datasets.samplers.chunks import ChunkSampler, chunk_windows_per_episode

from .conftest import make_dataset

LENGTHS = [5, 20, 9, 3]
HORIZON, TO, TA = 8, 2, 4


@pytest.fixture
def dataset():
    return make_dataset(LENGTHS, obs_dim=3, act_dim=2)


def sampler(dataset, batch_size=4096, seed=0, **options):
    options = {"n_obs_steps": TO, "n_action_steps": TA, **options}
    return make_sampler(dataset, "chunks", batch_size=batch_size, context_len=HORIZON, seed=seed, **options)


def test_windows_hang_over_episode_edges_as_diffusion_policy_pads_them(dataset):
    # starts run from -(To - 1) to length - T + Ta - 1: 5 - 8 + 4 + 2 - 1 = 2 windows in the 5-step episode
    assert chunk_windows_per_episode(np.array(LENGTHS), HORIZON, TO, TA).tolist() == [2, 17, 6, 0]
    chunks = sampler(dataset)
    steps = chunks.window_steps()
    starts = np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])
    seen = set()
    for row in steps:
        episode = int(np.searchsorted(np.cumsum(LENGTHS), row[-1], side="right"))
        first, last = starts[episode], starts[episode] + LENGTHS[episode] - 1
        assert first <= row.min() and row.max() <= last  # never leaves its episode
        assert (np.diff(row) >= 0).all() and (np.diff(row) <= 1).all()  # consecutive, edges repeated
        seen.add((episode, int(row[TO - 1] - first)))  # the step the policy acts at
    # every acting step of every window appears, including the first step and steps whose chunk runs past the end
    expected = {(0, 0), (0, 1)} | {(1, t) for t in range(17)} | {(2, t) for t in range(6)}
    assert seen == expected


def test_batches_repeat_the_edge_step_and_never_hold_zeros(dataset):
    batch = ChunkSampler(dataset, batch_size=2048, seed=1, context_len=HORIZON, n_obs_steps=TO, n_action_steps=TA).sample()
    assert batch["observations"].shape == (2048, TO, 3) and batch["actions"].shape == (2048, HORIZON, 2)
    observation_steps = batch["observations"][..., 0].long().numpy()  # observations[:, 0] is the global step
    first_step_windows = observation_steps[:, 0] == observation_steps[:, 1]
    assert first_step_windows.any()  # the episode's first observation, repeated
    assert np.isin(observation_steps[first_step_windows, 0], np.concatenate([[0], np.cumsum(LENGTHS)[:-1]])).all()
    actions = batch["actions"].numpy()
    repeated_tail = (actions[:, -1] == actions[:, -2]).all(axis=1)
    assert repeated_tail.any()  # chunks running past the episode's end repeat its last action
    assert not (actions == 0).all(axis=2).any()  # no zero padding


def test_chunk_sampling_resumes_the_same_stream(dataset):
    first = sampler(dataset, batch_size=16, seed=5)
    first.sample()
    state = first.state_dict()
    expected = first.sample()
    resumed = sampler(dataset, batch_size=16, seed=5)
    resumed.load_state_dict(state)
    for key, value in resumed.sample().items():
        assert (value == expected[key]).all()
    other = sampler(dataset, batch_size=16, seed=5, n_action_steps=2)
    with pytest.raises(ValueError, match="n_action_steps"):
        other.load_state_dict(state)


@pytest.mark.parametrize("options, message", [
    ({"n_obs_steps": 0}, "n_obs_steps must be in 1..horizon"),
    ({"n_obs_steps": 9}, "n_obs_steps must be in 1..horizon"),
    ({"n_action_steps": 8}, r"n_action_steps must be in 1..horizon - n_obs_steps \+ 1 \(7\)"),
])
def test_bad_chunk_options_are_named(dataset, options, message):
    with pytest.raises(ValueError, match=message):
        sampler(dataset, **options)


def test_episodes_too_short_for_any_chunk_are_refused_by_name():
    short = make_dataset([2, 3], obs_dim=3, act_dim=2)
    with pytest.raises(ValueError, match="no episode.*long enough for chunks of horizon 16.*longest: 3 steps"):
        make_sampler(short, "chunks", batch_size=4, context_len=16, n_obs_steps=2, n_action_steps=1)
