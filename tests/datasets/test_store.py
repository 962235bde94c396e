from __future__ import annotations

import numpy as np
import pytest

from kinema.datasets import DatasetError, OfflineDataset, concatenate

from .conftest import make_dataset


def test_episodes_split_on_terminals_or_timeouts(two_episodes):
    assert two_episodes.num_episodes == 2
    assert two_episodes.episode_starts.tolist() == [0, 3]
    assert two_episodes.episode_ends.tolist() == [3, 5]
    assert two_episodes.episode_lengths.tolist() == [3, 2]
    assert two_episodes.timesteps.tolist() == [0, 1, 2, 0, 1]
    assert two_episodes.timesteps.dtype == np.int64


def test_returns_to_go_and_episode_returns(two_episodes):
    assert two_episodes.episode_returns.tolist() == [6.0, 30.0]
    assert two_episodes.returns_to_go.tolist() == [6.0, 5.0, 3.0, 30.0, 20.0]
    assert two_episodes.returns_to_go.dtype == np.float32


def test_final_unterminated_run_is_an_episode():
    dataset = make_dataset([4, 3, 5], final_unterminated=True)
    assert dataset.episode_lengths.tolist() == [4, 3, 5]
    assert dataset.returns_to_go[-1] == pytest.approx(dataset.rewards[-1])
    assert dataset.returns_to_go[7] == pytest.approx(dataset.rewards[7:].sum(), rel=1e-5)


def test_constructor_converts_to_kinema_dtypes():
    dataset = OfflineDataset(
        observations=np.zeros((3, 2), dtype=np.float64),
        actions=np.zeros((3, 1), dtype=np.float64),
        rewards=[1, 2, 3],
        terminals=np.array([0.0, 0.0, 1.0]),  # old D4RL files store floats
    )
    assert dataset.observations.dtype == np.float32 and dataset.rewards.dtype == np.float32
    assert dataset.terminals.dtype == bool and dataset.terminals.tolist() == [False, False, True]
    assert dataset.timeouts.tolist() == [False, False, False]


def test_normalisation_statistics():
    dataset = make_dataset([5, 7], obs_dim=4)
    dataset.observations[:, 3] = 2.5  # a constant dimension
    dataset = OfflineDataset(dataset.observations, dataset.actions, dataset.rewards, dataset.terminals)
    np.testing.assert_allclose(dataset.obs_mean[:3], dataset.observations[:, :3].astype(np.float64).mean(0), rtol=1e-6)
    np.testing.assert_allclose(dataset.obs_std[:3], dataset.observations[:, :3].astype(np.float64).std(0), rtol=1e-6)
    assert dataset.obs_std[3] == 1.0
    assert dataset.obs_mean.dtype == np.float32 and dataset.obs_std.dtype == np.float32


def test_task_reference_returns_and_summary():
    dataset = make_dataset([2, 3])
    assert dataset.task == "hopper"
    assert dataset.reference_returns == (-20.272305, 3234.3)
    assert OfflineDataset(dataset.observations, dataset.actions, dataset.rewards, dataset.terminals).reference_returns is None
    summary = dataset.summary()
    assert summary["episodes"] == 2 and summary["transitions"] == 5
    assert summary["return_max"] == pytest.approx(dataset.episode_returns.max())
    assert summary["return_mean"] == pytest.approx(dataset.episode_returns.mean())


def _broken(dataset: OfflineDataset, **changes) -> OfflineDataset:
    fields = dict(
        observations=dataset.observations, actions=dataset.actions, rewards=dataset.rewards,
        terminals=dataset.terminals, timeouts=dataset.timeouts, next_observations=dataset.next_observations,
        infos=dataset.infos, metadata=dataset.metadata, source="broken.hdf5",
    )
    fields.update(changes)
    return OfflineDataset(**fields)


@pytest.mark.parametrize(
    "changes, words",
    [
        (lambda d: {"actions": d.actions[:-1]}, ["broken.hdf5", "'actions'", "9", "10"]),
        (lambda d: {"rewards": d.rewards[:-2]}, ["broken.hdf5", "'rewards'", "8", "10"]),
        (lambda d: {"infos": {"qpos": d.infos["qpos"][:3]}}, ["broken.hdf5", "'infos/qpos'", "3", "10"]),
        (lambda d: {"next_observations": d.next_observations[:, :2]}, ["broken.hdf5", "'next_observations'", "(10, 2)"]),
        (lambda d: {"observations": d.observations[:, 0]}, ["broken.hdf5", "'observations'", "2 dimension"]),
        (lambda d: {"rewards": d.rewards[:, None]}, ["broken.hdf5", "'rewards'", "1 dimension"]),
    ],
)
def test_validate_rejects_bad_shapes(changes, words):
    dataset = make_dataset([4, 6])
    with pytest.raises(DatasetError) as info:
        _broken(dataset, **changes(dataset)).validate()
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize("key", ["observations", "actions", "rewards", "next_observations"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_validate_rejects_non_finite_values(key, bad):
    dataset = make_dataset([4, 6])
    array = getattr(dataset, key).copy()
    array[7] = bad
    with pytest.raises(DatasetError, match=rf"broken\.hdf5.*'{key}'.*NaN or inf.*step 7"):
        _broken(dataset, **{key: array}).validate()


def test_validate_checks_task_dims():
    dataset = make_dataset([4, 6], obs_dim=3, act_dim=2)
    dataset.validate(obs_dim=3, act_dim=2)
    with pytest.raises(DatasetError, match=r"hand-made.*'observations'.*dimension 3.*expects 11"):
        dataset.validate(obs_dim=11)
    with pytest.raises(DatasetError, match=r"hand-made.*'actions'.*dimension 2.*expects 3"):
        dataset.validate(act_dim=3)


def test_validate_rejects_empty_dataset():
    empty = OfflineDataset(np.zeros((0, 3)), np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=bool), source="empty.hdf5")
    assert empty.num_episodes == 0
    with pytest.raises(DatasetError, match=r"empty\.hdf5.*empty"):
        empty.validate()


def test_select_episodes_keeps_order_and_boundaries():
    dataset = make_dataset([4, 3, 5], ends="timeout", final_unterminated=True)
    picked = dataset.select_episodes([2, 0])
    # The unterminated last episode now comes first: it must still end where it did.
    assert picked.episode_lengths.tolist() == [5, 4]
    np.testing.assert_array_equal(picked.observations[:, 0], np.r_[7:12, 0:4])
    np.testing.assert_array_equal(picked.infos["qpos"], dataset.infos["qpos"][np.r_[7:12, 0:4]])
    np.testing.assert_array_equal(picked.returns_to_go, dataset.returns_to_go[np.r_[7:12, 0:4]])
    assert picked.metadata == dataset.metadata
    whole = dataset.select_episodes(np.arange(3))
    np.testing.assert_array_equal(whole.timeouts, dataset.timeouts)
    np.testing.assert_array_equal(whole.terminals, dataset.terminals)


def test_concatenate_medium_expert():
    medium = make_dataset([3, 4], final_unterminated=True, seed=1)
    expert = make_dataset([5], seed=2)
    medium.metadata["algorithm"] = "ppo-medium"
    joined = concatenate([medium, expert])
    assert joined.episode_lengths.tolist() == [3, 4, 5]
    np.testing.assert_array_equal(joined.observations, np.concatenate([medium.observations, expert.observations]))
    np.testing.assert_allclose(joined.episode_returns, np.r_[medium.episode_returns, expert.episode_returns], rtol=1e-6)
    assert joined.metadata["task"] == "hopper" and "algorithm" not in joined.metadata
    assert concatenate([medium, expert], metadata={"dataset": "medium-expert"}).metadata == {"dataset": "medium-expert"}


def test_concatenate_rejects_mismatched_dims():
    with pytest.raises(DatasetError, match="obs_dim"):
        concatenate([make_dataset([3], obs_dim=3), make_dataset([3], obs_dim=4)])
