from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kinema.datasets import EpisodeSampler, TransitionSampler, WindowSampler, make_sampler, register_sampler
from kinema.datasets import samplers as samplers_module

from .conftest import make_dataset

LENGTHS = [3, 25, 8, 40, 1, 12, 30]
K = 10


@pytest.fixture
def dataset():
    return make_dataset(LENGTHS, obs_dim=4, act_dim=2, final_unterminated=True)


def steps_of(batch):
    """Global step index of every sampled step (observations[..., 0] holds it)."""
    return batch["observations"][..., 0].long().numpy()


def test_transition_batch_matches_dataset_rows(dataset):
    sampler = make_sampler(dataset, "transitions", batch_size=64, seed=3)
    assert isinstance(sampler, TransitionSampler)
    batch = sampler.sample()
    assert batch["observations"].shape == (64, 4) and batch["observations"].dtype == torch.float32
    assert batch["actions"].shape == (64, 2) and batch["actions"].dtype == torch.float32
    steps = steps_of(batch)
    np.testing.assert_array_equal(batch["actions"].numpy(), dataset.actions[steps])
    np.testing.assert_array_equal(batch["rewards"].numpy(), dataset.rewards[steps])
    np.testing.assert_array_equal(batch["next_observations"].numpy(), dataset.next_observations[steps])


def test_window_shapes_and_dtypes(dataset):
    batch = make_sampler(dataset, "windows", batch_size=32, context_len=K, seed=0).sample()
    assert batch["observations"].shape == (32, K, 4)
    assert batch["actions"].shape == (32, K, 2)
    for key in ("rewards", "returns_to_go", "timesteps", "mask"):
        assert batch[key].shape == (32, K), key
    assert batch["timesteps"].dtype == torch.int64 and batch["mask"].dtype == torch.bool
    assert batch["returns_to_go"].dtype == torch.float32


def test_windows_are_left_padded_consecutive_steps_of_one_episode(dataset):
    batch = make_sampler(dataset, "windows", batch_size=512, context_len=K, seed=1).sample()
    mask = batch["mask"].numpy()
    steps = steps_of(batch)
    assert mask[:, -1].all()  # the newest step is always real
    assert (np.diff(mask.astype(int), axis=1) >= 0).all()  # padding only on the left
    assert not mask.all()  # short episodes and episode ends force some padding
    for key in ("observations", "actions", "rewards", "returns_to_go", "timesteps"):
        padded = batch[key].numpy()[~mask]
        assert (padded == 0).all(), key
    for row in range(len(steps)):
        real = steps[row][mask[row]]
        assert (np.diff(real) == 1).all()
        assert len(set(dataset.episode_index[real])) == 1
        np.testing.assert_array_equal(batch["timesteps"][row][mask[row]].numpy(), dataset.timesteps[real])
        np.testing.assert_array_equal(batch["returns_to_go"][row][mask[row]].numpy(), dataset.returns_to_go[real])
        np.testing.assert_array_equal(batch["actions"][row][mask[row]].numpy(), dataset.actions[real])
        np.testing.assert_array_equal(batch["rewards"][row][mask[row]].numpy(), dataset.rewards[real])
        # A window is cut short only by the end of its episode.
        if not mask[row].all():
            assert real[-1] + 1 == dataset.episode_ends[dataset.episode_index[real[-1]]]


def test_windows_sample_episodes_in_proportion_to_length(dataset):
    sampler = make_sampler(dataset, "windows", batch_size=4000, context_len=K, seed=2)
    batch = sampler.sample()
    newest = steps_of(batch)[:, -1]
    shares = np.bincount(dataset.episode_index[newest], minlength=len(LENGTHS)) / len(newest)
    np.testing.assert_allclose(shares, np.array(LENGTHS) / sum(LENGTHS), atol=0.03)


@pytest.mark.parametrize("kind, context_len", [("transitions", 1), ("windows", K)])
def test_sampling_is_deterministic_and_resumes_identically(dataset, kind, context_len):
    def make(seed):
        return make_sampler(dataset, kind, batch_size=16, context_len=context_len, seed=seed)

    first, second = make(7), make(7)
    for _ in range(3):
        a, b = first.sample(), second.sample()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    assert not torch.equal(make(8).sample()["observations"], make(7).sample()["observations"])

    saved = json.loads(json.dumps(first.state_dict()))  # must survive a JSON checkpoint
    expected = [first.sample() for _ in range(2)]
    resumed = make(7)
    resumed.load_state_dict(saved)
    for batch in expected:
        again = resumed.sample()
        for key in batch:
            assert torch.equal(batch[key], again[key]), key


def test_state_from_another_sampler_is_refused(dataset):
    state = make_sampler(dataset, "windows", batch_size=16, context_len=K, seed=0).state_dict()
    other = make_sampler(dataset, "windows", batch_size=32, context_len=K, seed=0)
    with pytest.raises(ValueError, match="batch_size: saved 16, now 32"):
        other.load_state_dict(state)


@pytest.mark.parametrize("kind, context_len", [("transitions", 1), ("windows", K)])
def test_ddp_ranks_sample_disjoint_episode_shards(dataset, kind, context_len):
    world_size = 3
    seen = []
    for rank in range(world_size):
        sampler = make_sampler(dataset, kind, batch_size=2000, context_len=context_len, seed=0, rank=rank, world_size=world_size)
        batch = sampler.sample()
        steps = steps_of(batch)
        if kind == "windows":
            steps = steps[batch["mask"].numpy()]
        episodes = set(dataset.episode_index[steps.ravel()].tolist())
        assert episodes == set(range(rank, len(LENGTHS), world_size))
        seen.append(episodes)
    assert set.union(*seen) == set(range(len(LENGTHS)))
    assert sum(len(s) for s in seen) == len(LENGTHS)


def test_rank_without_episodes_is_an_error():
    with pytest.raises(ValueError, match="rank 2 of 3 gets no episodes"):
        make_sampler(make_dataset([4, 4]), "windows", batch_size=4, context_len=2, rank=2, world_size=3)


def test_bad_arguments():
    dataset = make_dataset([4, 4])
    with pytest.raises(ValueError, match="unknown sampler kind 'trajectories'.*chunks.*transitions.*windows"):
        make_sampler(dataset, "trajectories", batch_size=4)
    with pytest.raises(ValueError, match="context_len must be 1"):
        make_sampler(dataset, "transitions", batch_size=4, context_len=20)
    with pytest.raises(ValueError, match="batch_size"):
        make_sampler(dataset, "windows", batch_size=0, context_len=4)
    with pytest.raises(ValueError, match="rank"):
        make_sampler(dataset, "windows", batch_size=4, context_len=4, rank=1, world_size=1)


def test_register_sampler(monkeypatch):
    monkeypatch.setattr(samplers_module, "SAMPLERS", dict(samplers_module.SAMPLERS))

    class NewestStepSampler(EpisodeSampler):
        kind = "newest"

        def sample(self):
            return {"steps": self.to_tensor(self.sample_steps())}

    register_sampler("newest", NewestStepSampler)
    batch = make_sampler(make_dataset([4, 4]), "newest", batch_size=5).sample()
    assert batch["steps"].shape == (5,)
    with pytest.raises(ValueError, match="already registered"):
        register_sampler("newest", WindowSampler)
