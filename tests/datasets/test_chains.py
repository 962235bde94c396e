"""Chain-of-hindsight sampler: sorted chains, relabelled targets, completion tokens, padding."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kinema.datasets import OfflineDataset, make_sampler
from kinema.datasets.samplers.chains import ChainSampler

# Constant reward per episode, so every return (length * reward) is distinct and predictable.
LENGTHS = [3, 5, 7, 4, 6, 8, 2]
REWARDS = [1.0, 2.0, 0.5, 3.0, 1.5, 0.25, 4.0]
K = 6


def dataset_of(lengths, rewards_per_step) -> OfflineDataset:
    """observations[:, 0] holds the global step index, so a sample says where it came from."""
    rewards = np.concatenate([np.full(n, r, np.float32) if np.isscalar(r) else np.asarray(r, np.float32)
                              for n, r in zip(lengths, rewards_per_step)])
    total = len(rewards)
    observations = np.zeros((total, 2), np.float32)
    observations[:, 0] = np.arange(total)
    terminals = np.zeros(total, bool)
    terminals[np.cumsum(lengths) - 1] = True
    actions = np.random.default_rng(0).uniform(-1, 1, size=(total, 2)).astype(np.float32)
    return OfflineDataset(observations=observations, actions=actions, rewards=rewards, terminals=terminals)


@pytest.fixture
def dataset() -> OfflineDataset:
    return dataset_of(LENGTHS, REWARDS)


def test_make_sampler_builds_chains_with_the_documented_keys(dataset) -> None:
    sampler = make_sampler(dataset, "chains", batch_size=8, context_len=K, seed=0)
    assert isinstance(sampler, ChainSampler)
    batch = sampler.sample()
    for key in ("rewards", "returns_to_go", "timesteps", "mask", "completions", "trial_index", "final_trial"):
        assert batch[key].shape == (8, K), key
    assert batch["observations"].shape == (8, K, 2) and batch["actions"].shape == (8, K, 2)
    assert batch["completions"].dtype == torch.float32 and batch["returns_to_go"].dtype == torch.float32
    assert batch["trial_index"].dtype == torch.int64 and batch["timesteps"].dtype == torch.int64
    assert batch["mask"].dtype == torch.bool and batch["final_trial"].dtype == torch.bool
    with pytest.raises(ValueError, match="max_chain_len"):
        ChainSampler(dataset, batch_size=8, context_len=K, max_chain_len=0)


def test_chains_are_sorted_relabelled_to_their_best_return_and_left_padded(dataset) -> None:
    sampler = ChainSampler(dataset, 512, seed=1, context_len=K, max_chain_len=3)
    batch = {key: value.numpy() for key, value in sampler.sample().items()}
    mask = batch["mask"]
    steps = batch["observations"][..., 0].astype(np.int64)
    episode = dataset.episode_index[steps]
    returns = dataset.episode_returns[episode]
    assert mask[:, -1].all() and (np.diff(mask.astype(int), axis=1) >= 0).all()  # padding on the left only
    assert not mask.all()
    for key in ("observations", "actions", "rewards", "returns_to_go", "timesteps", "completions", "trial_index", "final_trial"):
        assert not batch[key][~mask].any(), key
    crossings = relabelled = 0
    for row in range(len(mask)):
        real = mask[row]
        trial, timestep, rtg, reward = (batch[key][row][real] for key in ("trial_index", "timesteps", "returns_to_go", "rewards"))
        ep, ret = episode[row][real], returns[row][real]
        assert trial.max() <= 2 and (np.diff(trial) >= 0).all()
        new_trial = np.diff(trial) > 0
        crossings += new_trial.sum()
        assert (timestep[1:][new_trial] == 0).all()  # timesteps restart in every episode
        assert (np.diff(ret)[new_trial] >= 0).all()  # ascending returns along the chain
        same = ~new_trial
        assert (np.diff(timestep)[same] == 1).all() and (np.diff(ep)[same] == 0).all()
        np.testing.assert_allclose(rtg[1:][same], (rtg - reward)[:-1][same], atol=1e-4)  # rewards are subtracted
        # Every step of a chain has the same target: the chain's best return, no smaller than its own.
        collected_before = timestep * np.asarray(REWARDS)[ep]
        target = rtg + collected_before
        np.testing.assert_allclose(target, target[0], atol=1e-4)
        assert (target >= ret - 1e-4).all()
        relabelled += (target > ret + 1e-4).sum()
        # The final trial is the best episode: its relabelled return-to-go is its true one.
        final = batch["final_trial"][row][real]
        np.testing.assert_allclose(target[final], ret[final], atol=1e-4)
        assert (final == (trial == trial.max())).all() or not final.any()
        # Positive rewards: only the best episode's last step reaches the target.
        last_step = timestep == dataset.episode_lengths[ep] - 1
        np.testing.assert_array_equal(batch["completions"][row][real], (final & last_step).astype(np.float32))
    assert crossings > 20 and relabelled > 100  # windows do cross episode boundaries, targets are raised


def test_windows_start_anywhere_and_stop_at_the_chain_end_as_dt_windows_do(dataset) -> None:
    # One-episode chains are DT's windows: a uniform start, K steps or up to the episode's end.
    batch = ChainSampler(dataset, 2048, seed=2, context_len=K, max_chain_len=1).sample()
    mask, steps = batch["mask"].numpy(), batch["observations"][..., 0].long().numpy()
    last_step = dataset.episode_ends[dataset.episode_index[steps[:, -1]]] - 1
    short = ~mask.all(axis=1)
    assert short.any() and (steps[short, -1] == last_step[short]).all()  # short windows end at the episode's end
    first_real = steps[np.arange(len(mask)), mask.argmax(axis=1)]
    # Every step of an episode starts windows (the first K-1 steps are not only seen after padding).
    assert set(first_real.tolist()) == set(range(dataset.num_transitions))


def test_fresh_trial_windows_hide_the_earlier_trials_as_a_first_trial_sees_none(dataset) -> None:
    def chains(fresh_trial_prob: float) -> ChainSampler:
        return ChainSampler(dataset, 4096, seed=3, context_len=K, max_chain_len=3, fresh_trial_prob=fresh_trial_prob)

    # The hiding draw comes after the window's: the same seed cuts the same windows.
    kept, hidden, half = (chains(p).chain_steps() for p in (0.0, 1.0, 0.5))
    np.testing.assert_array_equal(kept["steps"], hidden["steps"])
    np.testing.assert_array_equal(kept["trial"], hidden["trial"])
    last_trial = kept["trial"] == kept["trial"][:, -1:]
    np.testing.assert_array_equal(hidden["mask"], kept["mask"] & last_trial)
    crossing = (kept["mask"] & ~last_trial).any(axis=1)
    assert crossing.mean() > 0.2
    # With probability 1/2 a crossing window loses its earlier trials; the others are kept whole.
    half_hidden = (half["mask"] == hidden["mask"]).all(axis=1) & crossing
    assert ((half["mask"] == kept["mask"]).all(axis=1) | half_hidden).all()
    assert 0.4 < half_hidden.sum() / crossing.sum() < 0.6
    # A hidden window opens, after its padding, on its trial's first step, with no previous action.
    batch = chains(1.0).sample()
    first_real = batch["mask"].numpy().argmax(axis=1)
    assert (batch["timesteps"].numpy()[np.arange(4096), first_real][crossing] == 0).all()
    assert not batch["observations"].numpy()[~batch["mask"].numpy()].any()
    with pytest.raises(ValueError, match="fresh_trial_prob"):
        ChainSampler(dataset, 8, context_len=K, fresh_trial_prob=1.5)


def test_chains_hold_distinct_episodes_even_when_repeats_are_likely() -> None:
    # Two one-step episodes and a long one: drawn by length, chains of 3 mostly repeat the long one.
    data = dataset_of([1, 1, 60], [5.0, 7.0, 0.01])
    sampler = ChainSampler(data, 256, seed=0, context_len=4, max_chain_len=3)
    index = sampler.chain_steps()
    episode = data.episode_index[index["steps"]]
    assert (index["chain_len"] < 3).any()  # repeats that survived the redraws were dropped
    for row in range(256):
        real = index["mask"][row]
        trials, episodes = index["trial"][row][real], episode[row][real]
        pairs = {(int(t), int(e)) for t, e in zip(trials, episodes)}
        assert len(pairs) == len({t for t, _ in pairs}) == len({e for _, e in pairs})  # one episode per trial
        assert (trials < index["chain_len"][row]).all()
        assert (np.diff(data.episode_returns[episodes]) >= 0).all()


def test_chain_total_steps_is_the_length_of_the_whole_chain() -> None:
    # Equal-length episodes: a chain of c of them is exactly c * 4 steps, whatever the window shows.
    data = dataset_of([4] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    index = ChainSampler(data, 256, seed=0, context_len=3, max_chain_len=3).chain_steps()
    assert set(index["chain_len"].tolist()) == {1, 2, 3}
    np.testing.assert_array_equal(index["chain_total_steps"], 4 * index["chain_len"])


def test_completion_is_sticky_once_the_target_is_reached() -> None:
    # One episode: cumulative reward 1, 3, 2, 1, 1.5 ends at its return 1.5 but passes it at step 1.
    data = dataset_of([5], [[1.0, 2.0, -1.0, -1.0, 0.5]])
    batch = ChainSampler(data, 64, seed=0, context_len=5, max_chain_len=1).sample()
    mask, timesteps = batch["mask"].numpy(), batch["timesteps"].numpy()
    expected = np.array([0.0, 1.0, 1.0, 1.0, 1.0], np.float32)
    np.testing.assert_array_equal(batch["completions"].numpy()[mask], expected[timesteps[mask]])
    assert batch["final_trial"].numpy()[mask].all()
    np.testing.assert_allclose(batch["returns_to_go"].numpy()[mask], (1.5 - np.array([0, 1, 3, 2, 1]))[timesteps[mask]])


def test_resuming_from_a_state_dict_continues_the_same_stream(dataset) -> None:
    sampler = ChainSampler(dataset, 16, seed=4, context_len=K, max_chain_len=3)
    sampler.sample()
    state = json.loads(json.dumps(sampler.state_dict()))
    expected = sampler.sample()
    resumed = ChainSampler(dataset, 16, seed=4, context_len=K, max_chain_len=3)
    resumed.load_state_dict(state)
    for key, value in resumed.sample().items():
        torch.testing.assert_close(value, expected[key])
    with pytest.raises(ValueError, match="max_chain_len"):
        ChainSampler(dataset, 16, seed=4, context_len=K, max_chain_len=2).load_state_dict(state)


def test_ranks_sample_only_their_shard(dataset) -> None:
    batch = ChainSampler(dataset, 256, seed=0, rank=1, world_size=2, context_len=K).sample()
    steps = batch["observations"][..., 0].long().numpy()[batch["mask"].numpy()]
    assert set(dataset.episode_index[steps].tolist()) == {1, 3, 5}


def test_each_step_knows_the_trial_before_its_own_unless_it_is_a_first_or_fresh_trial(dataset) -> None:
    index = ChainSampler(dataset, 512, seed=5, context_len=K, max_chain_len=3).chain_steps()
    batch = {key: value.numpy() for key, value in ChainSampler(dataset, 512, seed=5, context_len=K, max_chain_len=3).sample().items()}
    mask, trial = batch["mask"], batch["trial_index"]
    previous = np.take_along_axis(index["episodes"], np.maximum(index["trial"] - 1, 0), axis=1)
    later = mask & (trial > 0)
    assert later.any() and (mask & (trial == 0)).any()
    np.testing.assert_allclose(batch["previous_trial_return"][later], dataset.episode_returns[previous][later], rtol=1e-6)
    np.testing.assert_array_equal(batch["previous_trial_length"][later], dataset.episode_lengths[previous][later])
    own = dataset.episode_returns[dataset.episode_index[batch["observations"][..., 0].astype(np.int64)]]
    assert (batch["previous_trial_return"][later] <= own[later] + 1e-4).all()  # the chain's worse trial comes first
    # Where the window shows the previous trial, its steps are that episode's.
    steps = batch["observations"][..., 0].astype(np.int64)
    crossing = later[:, 1:] & (trial[:, 1:] > trial[:, :-1]) & mask[:, :-1]
    rows, cols = np.nonzero(crossing)
    assert len(rows) > 10
    np.testing.assert_array_equal(dataset.episode_index[steps[rows, cols]], previous[rows, cols + 1])
    for key in ("previous_trial_return", "previous_trial_length"):
        assert not batch[key][mask & (trial == 0)].any() and not batch[key][~mask].any()
    # A fresh window plays a first trial: nothing before it.
    fresh = ChainSampler(dataset, 512, seed=5, context_len=K, max_chain_len=3, fresh_trial_prob=1.0).sample()
    assert not fresh["previous_trial_return"].any() and not fresh["previous_trial_length"].any()


def test_own_return_relabelling_keeps_every_trial_s_true_returns_to_go(dataset) -> None:
    relabelled = ChainSampler(dataset, 512, seed=6, context_len=K, max_chain_len=3)
    own = ChainSampler(dataset, 512, seed=6, context_len=K, max_chain_len=3, relabel="own_return")
    chain_max, batch = relabelled.sample(), own.sample()
    torch.testing.assert_close(batch["observations"], chain_max["observations"])  # the same windows, other targets
    batch = {key: value.numpy() for key, value in batch.items()}
    mask = batch["mask"]
    episode = dataset.episode_index[batch["observations"][..., 0].astype(np.int64)]
    collected_before = batch["timesteps"] * np.asarray(REWARDS)[episode]
    np.testing.assert_allclose((batch["returns_to_go"] + collected_before)[mask], dataset.episode_returns[episode][mask], atol=1e-4)
    # Positive rewards: every episode completes (reaches its own return) on its last step only.
    last_step = batch["timesteps"] == dataset.episode_lengths[episode] - 1
    np.testing.assert_array_equal(batch["completions"][mask], last_step[mask].astype(np.float32))
    assert (chain_max["returns_to_go"].numpy() > batch["returns_to_go"] + 1e-4).any()
    with pytest.raises(ValueError, match="relabel must be one of"):
        ChainSampler(dataset, 8, context_len=K, relabel="best")
    state = json.loads(json.dumps(own.state_dict()))
    with pytest.raises(ValueError, match="relabel"):
        relabelled.load_state_dict(state)


def test_later_trials_relabelling_raises_only_the_trials_that_follow_another(dataset) -> None:
    def sample(relabel: str) -> dict[str, np.ndarray]:
        sampler = ChainSampler(dataset, 512, seed=7, context_len=K, max_chain_len=3, fresh_trial_prob=0.5, relabel=relabel)
        return {key: value.numpy() for key, value in sampler.sample().items()}

    later, chain_max, own = sample("later_trials"), sample("chain_max"), sample("own_return")
    mask, follows = later["mask"], later["previous_trial_length"] > 0
    assert (mask & follows).any() and (mask & ~follows & (later["trial_index"] > 0)).any()  # fresh windows too
    for key in ("returns_to_go", "completions"):
        np.testing.assert_array_equal(later[key][follows], chain_max[key][follows])
        np.testing.assert_array_equal(later[key][mask & ~follows], own[key][mask & ~follows])


def test_episode_window_starts_weigh_every_dataset_step_equally_as_dt_windows_do() -> None:
    # Two short episodes and a long one. Chain-wide starts favour the long episode's steps in chains of two;
    # starts in the first drawn episode give every step the same weight, 50 / 60 for the long one.
    data = dataset_of([5, 5, 50], [1.0, 2.0, 0.1])

    def share_of_long_episode(window_start: str) -> float:
        index = ChainSampler(data, 40_000, seed=3, context_len=4, max_chain_len=2, window_start=window_start).chain_steps()
        first = index["steps"][np.arange(40_000), index["mask"].argmax(axis=1)]  # the window's first real step
        return float((data.episode_index[first] == 2).mean())

    assert abs(share_of_long_episode("episode") - 50 / 60) < 0.01
    assert share_of_long_episode("chain") > 0.85  # about 0.864 by the same count
    with pytest.raises(ValueError, match="window_start must be one of"):
        ChainSampler(data, 4, window_start="trial")
