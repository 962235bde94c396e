from __future__ import annotations

import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from kinema.datasets import DatasetError, d4rl_io, load_dataset, read_d4rl_hdf5, read_minari, write_d4rl_hdf5

from .conftest import make_dataset


def assert_same_dataset(loaded, original):
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        expected, actual = getattr(original, key), getattr(loaded, key)
        assert actual.dtype == expected.dtype, key
        np.testing.assert_array_equal(actual, expected, err_msg=key)
    assert loaded.infos.keys() == original.infos.keys()
    for key in original.infos:
        np.testing.assert_array_equal(loaded.infos[key], original.infos[key], err_msg=key)


# -- D4RL HDF5 ---------------------------------------------------------------------------


def test_round_trip_keeps_arrays_infos_and_metadata(tmp_path):
    original = make_dataset([5, 7, 4], final_unterminated=True)
    original.metadata["nested/key"] = "value"
    path = write_d4rl_hdf5(original, tmp_path / "hopper-random.hdf5")
    loaded = read_d4rl_hdf5(path)
    assert_same_dataset(loaded, original)
    assert loaded.metadata == original.metadata
    assert loaded.source == str(path)
    assert loaded.episode_lengths.tolist() == [5, 7, 4]


def test_written_file_has_d4rl_key_layout(tmp_path):
    path = write_d4rl_hdf5(make_dataset([3, 3]), tmp_path / "d.hdf5")
    with h5py.File(path, "r") as file:
        assert set(file.keys()) == {"observations", "next_observations", "actions", "rewards", "terminals", "timeouts", "infos", "metadata"}
        assert set(file["infos"].keys()) == {"qpos", "qvel"}
        assert file["observations"].dtype == np.float32 and file["actions"].dtype == np.float32
        assert file["rewards"].dtype == np.float32
        assert file["terminals"].dtype == bool and file["timeouts"].dtype == bool
        assert file["metadata/task"][()] == b"hopper"


def test_reads_real_d4rl_shaped_file_with_nested_metadata(tmp_path):
    """A file laid out like hopper-medium-v2.hdf5, written with raw h5py rather than kinema's writer."""
    path = tmp_path / "hopper_medium-v2.hdf5"
    rng = np.random.default_rng(0)
    n = 30
    terminals = np.zeros(n, dtype=bool)
    terminals[9] = True
    timeouts = np.zeros(n, dtype=bool)
    timeouts[19] = True
    with h5py.File(path, "w") as file:
        file["observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        file["next_observations"] = rng.normal(size=(n, 11)).astype(np.float32)
        file["actions"] = rng.uniform(-1, 1, size=(n, 3)).astype(np.float32)
        file["rewards"] = rng.normal(size=n).astype(np.float32)
        file["terminals"] = terminals
        file["timeouts"] = timeouts
        file["infos/qpos"] = rng.normal(size=(n, 6))
        file["infos/qvel"] = rng.normal(size=(n, 6))
        file["infos/action_log_probs"] = rng.normal(size=n)
        file["metadata/algorithm"] = np.bytes_("SAC")
        file["metadata/iteration"] = np.int64(1000)
        file["metadata/policy/fc0/weight"] = rng.normal(size=(256, 11)).astype(np.float32)
        file["metadata/policy/fc0/bias"] = rng.normal(size=256).astype(np.float32)
        file["metadata/policy/last_fc/weight"] = rng.normal(size=(3, 256)).astype(np.float32)
        file["metadata/policy/nonlinearity"] = np.bytes_("relu")
        file["metadata/policy/output_distribution"] = np.bytes_("tanh_gaussian")
    dataset = load_dataset(path, obs_dim=11, act_dim=3)
    assert dataset.num_transitions == n
    assert dataset.episode_lengths.tolist() == [10, 10, 10]
    assert dataset.metadata == {
        "algorithm": "SAC",
        "iteration": 1000,
        "policy/nonlinearity": "relu",
        "policy/output_distribution": "tanh_gaussian",
    }
    assert set(dataset.infos) == {"qpos", "qvel", "action_log_probs"}


def test_old_file_without_timeouts_splits_on_terminals_only(tmp_path):
    path = tmp_path / "hopper-medium-v0.hdf5"
    with h5py.File(path, "w") as file:
        file["observations"] = np.zeros((6, 11), dtype=np.float32)
        file["actions"] = np.zeros((6, 3), dtype=np.float32)
        file["rewards"] = np.ones(6, dtype=np.float32)
        file["terminals"] = np.array([0, 1, 0, 0, 0, 0], dtype=np.float32)  # v0 stored floats
    dataset = read_d4rl_hdf5(path)
    assert not dataset.timeouts.any()
    assert dataset.next_observations is None
    assert dataset.episode_lengths.tolist() == [2, 4]


def _write_raw(path: Path, **overrides):
    arrays = {
        "observations": np.zeros((5, 3), dtype=np.float32),
        "actions": np.zeros((5, 2), dtype=np.float32),
        "rewards": np.zeros(5, dtype=np.float32),
        "terminals": np.zeros(5, dtype=bool),
        "timeouts": np.zeros(5, dtype=bool),
    }
    arrays.update(overrides)
    with h5py.File(path, "w") as file:
        for key, value in arrays.items():
            if value is not None:
                file[key] = value
    return path


def test_missing_key_is_named_with_the_required_keys(tmp_path):
    path = _write_raw(tmp_path / "no-rewards.hdf5", rewards=None)
    with pytest.raises(DatasetError) as info:
        read_d4rl_hdf5(path)
    message = str(info.value)
    assert str(path) in message and "'rewards'" in message
    assert "observations" in message and "terminals" in message


@pytest.mark.parametrize(
    "overrides, words",
    [
        ({"actions": np.zeros((4, 2), dtype=np.float32)}, ["'actions'", "4", "5"]),
        ({"timeouts": np.zeros(6, dtype=bool)}, ["'timeouts'", "6", "5"]),
        ({"observations": np.full((5, 3), np.nan, dtype=np.float32)}, ["'observations'", "NaN", "step 0"]),
        ({"rewards": np.array([0, 0, np.inf, 0, 0], dtype=np.float32)}, ["'rewards'", "inf", "step 2"]),
        ({"observations": np.zeros((0, 3)), "actions": np.zeros((0, 2)), "rewards": np.zeros(0),
          "terminals": np.zeros(0, bool), "timeouts": np.zeros(0, bool)}, ["empty"]),
        ({"observations": np.array([b"a"] * 5)}, ["'observations'", "dtype"]),
    ],
)
def test_bad_contents_raise_on_load(tmp_path, overrides, words):
    path = _write_raw(tmp_path / "bad.hdf5", **overrides)
    with pytest.raises(DatasetError) as info:
        read_d4rl_hdf5(path)
    assert str(path) in str(info.value)
    for word in words:
        assert word in str(info.value)


def test_dims_not_matching_the_task_are_rejected(tmp_path):
    path = _write_raw(tmp_path / "walker.hdf5")
    with pytest.raises(DatasetError, match=r"walker\.hdf5.*'observations'.*dimension 3.*expects 11"):
        load_dataset(path, obs_dim=11, act_dim=2)
    with pytest.raises(DatasetError, match=r"walker\.hdf5.*'actions'.*dimension 2.*expects 6"):
        load_dataset(path, obs_dim=3, act_dim=6)


def test_text_file_renamed_hdf5(tmp_path):
    path = tmp_path / "notes.hdf5"
    path.write_text("these are not trajectories\n")
    with pytest.raises(DatasetError, match=rf"{path} is not an HDF5 file"):
        load_dataset(path)


def test_truncated_file(tmp_path):
    whole = write_d4rl_hdf5(make_dataset([50, 50]), tmp_path / "whole.hdf5")
    truncated = tmp_path / "truncated.hdf5"
    data = whole.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=rf"{truncated} is not a readable HDF5 file"):
        read_d4rl_hdf5(truncated)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.hdf5"):
        load_dataset(tmp_path / "nowhere.hdf5")
    with pytest.raises(FileNotFoundError, match="nowhere.hdf5"):
        read_d4rl_hdf5(tmp_path / "nowhere.hdf5")


def test_unserialisable_metadata_is_named(tmp_path):
    dataset = make_dataset([3])
    dataset.metadata["policy"] = object()
    with pytest.raises(DatasetError, match=r"metadata\['policy'\]"):
        write_d4rl_hdf5(dataset, tmp_path / "d.hdf5")
    assert list(tmp_path.iterdir()) == []


# -- atomic writes -------------------------------------------------------------------------


def _interrupt_after_observations(monkeypatch, exception):
    def partial_write(file, dataset, compression, destination):
        file.create_dataset("observations", data=dataset.observations)
        raise exception

    monkeypatch.setattr(d4rl_io, "_write_contents", partial_write)


@pytest.mark.parametrize("exception", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch, exception):
    path = tmp_path / "hopper.hdf5"
    old = make_dataset([4, 4], seed=1)
    write_d4rl_hdf5(old, path)
    _interrupt_after_observations(monkeypatch, exception)
    with pytest.raises(type(exception)):
        write_d4rl_hdf5(make_dataset([9, 9], seed=2), path)
    assert [p.name for p in tmp_path.iterdir()] == ["hopper.hdf5"]  # no temporary file left
    assert_same_dataset(read_d4rl_hdf5(path), old)


def test_interrupted_first_write_leaves_nothing(tmp_path, monkeypatch):
    _interrupt_after_observations(monkeypatch, RuntimeError("killed"))
    with pytest.raises(RuntimeError):
        write_d4rl_hdf5(make_dataset([4]), tmp_path / "new.hdf5")
    assert list(tmp_path.iterdir()) == []


# -- Minari ----------------------------------------------------------------------------------


def _record_minari_hopper(root: Path, monkeypatch, dataset_id="kinema-test/hopper/random-v0"):
    """Record 3 short random Hopper-v5 episodes and save them with minari itself.

    minari.DataCollector needs jax (minari[create]); create_dataset_from_buffers is
    minari's own writer without it, so the files on disk are the same.
    """
    minari = pytest.importorskip("minari")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(root))
    env = gym.make("Hopper-v5", max_episode_steps=12)
    env.action_space.seed(0)
    buffers = []
    for episode in range(3):
        observation, info = env.reset(seed=episode)
        observations, actions, rewards, terminations, truncations = [observation], [], [], [], []
        x_positions = [info["x_position"]]
        while True:
            action = env.action_space.sample()
            observation, reward, terminated, truncated, info = env.step(action)
            observations.append(observation)
            actions.append(action)
            rewards.append(reward)
            terminations.append(terminated)
            truncations.append(truncated)
            x_positions.append(info["x_position"])
            if terminated or truncated:
                break
        buffers.append(EpisodeBuffer(id=episode, seed=episode, observations=observations, actions=actions,
                                     rewards=rewards, terminations=terminations, truncations=truncations,
                                     infos={"x_position": x_positions}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # minari warns about missing author/description
        minari.create_dataset_from_buffers(dataset_id, buffers, env=env, algorithm_name="random",
                                           ref_min_score=-20.0, ref_max_score=3000.0)
    env.close()
    return buffers


def test_minari_dataset_loads_unchanged(tmp_path, monkeypatch):
    buffers = _record_minari_hopper(tmp_path, monkeypatch)
    dataset = load_dataset("kinema-test/hopper/random-v0", obs_dim=11, act_dim=3)
    assert dataset.episode_lengths.tolist() == [len(b.rewards) for b in buffers]
    np.testing.assert_array_equal(dataset.observations, np.concatenate([np.array(b.observations[:-1], np.float32) for b in buffers]))
    np.testing.assert_array_equal(dataset.next_observations, np.concatenate([np.array(b.observations[1:], np.float32) for b in buffers]))
    np.testing.assert_array_equal(dataset.actions, np.concatenate([b.actions for b in buffers]))
    np.testing.assert_array_equal(dataset.rewards, np.concatenate([b.rewards for b in buffers]).astype(np.float32))
    np.testing.assert_array_equal(dataset.terminals, np.concatenate([b.terminations for b in buffers]))
    np.testing.assert_array_equal(dataset.timeouts, np.concatenate([b.truncations for b in buffers]))
    np.testing.assert_array_equal(dataset.infos["x_position"], np.concatenate([b.infos["x_position"][:-1] for b in buffers]))
    assert dataset.timeouts.any()  # 12-step limit: at least one episode was truncated
    assert dataset.metadata["env_id"] == "Hopper-v5"
    assert dataset.task == "hopper"
    assert dataset.reference_returns == (-20.0, 3000.0)
    assert dataset.metadata["algorithm"] == "random"
    # The same data through a directory path and through main_data.hdf5 itself.
    directory = tmp_path / "kinema-test" / "hopper" / "random-v0"
    np.testing.assert_array_equal(read_minari(directory).observations, dataset.observations)
    np.testing.assert_array_equal(load_dataset(directory / "data" / "main_data.hdf5").actions, dataset.actions)


def test_minari_dict_observations_are_rejected(tmp_path, monkeypatch):
    minari = pytest.importorskip("minari")
    import gymnasium as gym
    from minari.data_collector import EpisodeBuffer

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    buffer = EpisodeBuffer(observations={"joint": [np.zeros(2)] * 3}, actions=[np.zeros(1, np.float32)] * 2,
                           rewards=[0.0, 0.0], terminations=[False, True], truncations=[False, False])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        minari.create_dataset_from_buffers(
            "kinema-test/dict-v0", [buffer],
            observation_space=gym.spaces.Dict({"joint": gym.spaces.Box(-1, 1, (2,))}),
            action_space=gym.spaces.Box(-1, 1, (1,), dtype=np.float32),
        )
    with pytest.raises(DatasetError, match="main_data.hdf5.*'observation_space'.*Dict.*only Box"):
        load_dataset("kinema-test/dict-v0")


def test_minari_group_observations_without_metadata_are_rejected(tmp_path):
    data_dir = tmp_path / "handmade" / "data"
    data_dir.mkdir(parents=True)
    with h5py.File(data_dir / "main_data.hdf5", "w") as file:
        file["episode_0/observations/joint"] = np.zeros((3, 2))
        file["episode_0/actions"] = np.zeros((2, 1), dtype=np.float32)
        for key in ("rewards", "terminations", "truncations"):
            file[f"episode_0/{key}"] = np.zeros(2)
    with pytest.raises(DatasetError, match="'episode_0/observations' is a group.*only Box"):
        read_minari(tmp_path / "handmade")


def test_minari_episode_lengths_are_checked(tmp_path):
    data_dir = tmp_path / "handmade" / "data"
    data_dir.mkdir(parents=True)
    with h5py.File(data_dir / "main_data.hdf5", "w") as file:
        file["episode_0/observations"] = np.zeros((2, 3))  # should be 3 = T + 1
        file["episode_0/actions"] = np.zeros((2, 1), dtype=np.float32)
        for key in ("rewards", "terminations", "truncations"):
            file[f"episode_0/{key}"] = np.zeros(2)
    with pytest.raises(DatasetError, match=r"main_data\.hdf5.*'episode_0/observations' has 2 entries; expected 3"):
        read_minari(tmp_path / "handmade")


def test_minari_id_not_found(tmp_path, monkeypatch):
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="mujoco/hopper/medium-v0"):
        load_dataset("mujoco/hopper/medium-v0")
    (tmp_path / "empty-dir").mkdir()
    with pytest.raises(DatasetError, match="empty-dir.*not a Minari"):
        load_dataset(tmp_path / "empty-dir")
