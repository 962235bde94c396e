"""Hardening of the dataset side: no silent overwrite, no stale temporaries, actions checked
against the task's box, no silently merged episodes."""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest

from kinema.datasets import DatasetError, OfflineDataset, load_dataset, read_d4rl_hdf5, read_minari, write_d4rl_hdf5
from kinema.train.data import resolve_dataset

from .conftest import make_dataset

# -- collection output: never overwritten without overwrite=true; stale temporaries removed -----


def _collect(cli, tmp_path: Path, output: Path, *extra: str):
    return cli.run([cli.script("kinema-collect"), "env=hopper", "behaviour=random", "steps=40", "num_envs=2", "seed=0",
                    f"output={output}", f"hydra.run.dir={tmp_path / 'run'}", *extra], cwd=tmp_path, check=False)


def test_collect_refuses_an_existing_output_unless_overwrite_is_set(cli, tmp_path: Path) -> None:
    output = tmp_path / "mine.hdf5"
    output.write_bytes(b"someone's data")
    refused = _collect(cli, tmp_path, output)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert str(output) in refused.stderr and "overwrite=true" in refused.stderr
    assert output.read_bytes() == b"someone's data"

    replaced = _collect(cli, tmp_path, output, "overwrite=true")
    assert replaced.returncode == 0, replaced.stderr
    assert read_d4rl_hdf5(output).num_transitions == 40


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_the_next_write_removes_stale_temporaries_of_a_killed_write(tmp_path: Path) -> None:
    path = tmp_path / "hopper.hdf5"
    stale = tmp_path / ".hopper.hdf5.k1ll3d_x.tmp"  # what tempfile.mkstemp left behind a SIGKILL
    stale.write_bytes(b"half an HDF5 file")
    _age(stale, 3600)
    live = tmp_path / ".hopper.hdf5.wr1t1ng_.tmp"  # another writer, busy right now
    live.write_bytes(b"being written")
    other = tmp_path / ".hopper.hdf5.bak.0ther_xy.tmp"  # a temporary of another target
    other.write_bytes(b"not ours")
    _age(other, 3600)
    write_d4rl_hdf5(make_dataset([4, 4]), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, other.name])
    assert read_d4rl_hdf5(path).num_transitions == 8


# -- actions against the task's action box ------------------------------------------------------


def _with_actions(actions: np.ndarray) -> OfflineDataset:
    dataset = make_dataset([len(actions)], act_dim=actions.shape[1])
    return OfflineDataset(observations=dataset.observations, actions=actions, rewards=dataset.rewards,
                          terminals=dataset.terminals, timeouts=dataset.timeouts, source="/data/mine.hdf5")


def test_actions_inside_the_box_pass_quietly() -> None:
    dataset = _with_actions(np.linspace(-1, 1, 40, dtype=np.float32).reshape(20, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dataset.validate(act_dim=2, action_low=[-1, -1], action_high=[1, 1])


def test_actions_a_little_outside_the_box_warn_with_the_fraction_and_range() -> None:
    actions = np.zeros((40, 2), dtype=np.float32)
    actions[:4, 0] = 1.25
    actions[4, 1] = -1.1
    with pytest.warns(UserWarning) as caught:
        _with_actions(actions).validate(act_dim=2, action_low=[-1, -1], action_high=[1, 1])
    assert len(caught) == 1
    message = str(caught[0].message)
    for fragment in ("/data/mine.hdf5", "'actions'", "12.5% of steps (5 of 40)", "dimension 0: [0, 1.25] vs [-1, 1]",
                     "dimension 1: [-1.1, 0] vs [-1, 1]", "clip"):
        assert fragment in message, (fragment, message)


def test_actions_far_outside_the_box_are_refused() -> None:
    actions = np.full((10, 2), 0.5, dtype=np.float32)
    actions[3, 1] = 40.0  # e.g. torques in N·m instead of the task's [-1, 1] controls
    with pytest.raises(DatasetError) as info:
        _with_actions(actions).validate(act_dim=2, action_low=[-1, -1], action_high=[1, 1])
    message = str(info.value)
    for fragment in ("/data/mine.hdf5", "'actions'", "1.5", "dimension 1: [0.5, 40] vs [-1, 1]", "units"):
        assert fragment in message, (fragment, message)


def test_action_bounds_may_differ_per_dimension() -> None:
    actions = np.array([[0.0, 5.5], [0.1, 1.0]], dtype=np.float32)  # inside [-1, 1] x [0, 6]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _with_actions(actions).validate(action_low=[-1, 0], action_high=[1, 6])
    with pytest.raises(DatasetError, match="dimension 1"):
        _with_actions(actions * [1, 2]).validate(action_low=[-1, 0], action_high=[1, 6])


# -- episode boundaries ----------------------------------------------------------------------


def _write_hopper_v0(path: Path, terminal_steps: list[int], total: int) -> Path:
    """A D4RL v0-style hopper file: no 'timeouts' key, float terminals."""
    terminals = np.zeros(total, dtype=np.float32)
    terminals[terminal_steps] = 1.0
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as file:
        file["observations"] = rng.normal(size=(total, 11)).astype(np.float32)
        file["actions"] = rng.uniform(-1, 1, size=(total, 3)).astype(np.float32)
        file["rewards"] = np.ones(total, dtype=np.float32)
        file["terminals"] = terminals
    return path


def test_d4rl_file_without_timeouts_is_split_at_the_task_time_limit(tmp_path: Path) -> None:
    # A 300-step episode ending in a fall, then 2,500 steps with no flag: two time-limited
    # 1,000-step episodes and a final 500-step one cut off by the end of the file.
    path = _write_hopper_v0(tmp_path / "hopper-medium-v0.hdf5", [299], 2800)
    with pytest.warns(UserWarning) as caught:
        resolved = resolve_dataset({"path": str(path)}, "hopper")
    messages = [str(w.message) for w in caught if "timeouts" in str(w.message)]
    assert len(messages) == 1
    for fragment in (str(path), "'timeouts'", "1000", "2 episode boundaries"):
        assert fragment in messages[0], (fragment, messages[0])
    dataset = resolved.dataset
    assert dataset.episode_lengths.tolist() == [300, 1000, 1000, 500]
    assert dataset.timeouts.sum() == 2 and dataset.terminals.sum() == 1
    assert dataset.timesteps.max() == 999


def test_d4rl_file_without_timeouts_but_short_episodes_is_left_alone(tmp_path: Path) -> None:
    path = _write_hopper_v0(tmp_path / "short.hdf5", [99, 599], 700)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        resolved = resolve_dataset({"path": str(path)}, "hopper")
    assert resolved.dataset.episode_lengths.tolist() == [100, 500, 100]


def test_minari_episode_without_an_end_flag_stays_its_own_episode(tmp_path: Path) -> None:
    data_dir = tmp_path / "handmade" / "data"
    data_dir.mkdir(parents=True)
    with h5py.File(data_dir / "main_data.hdf5", "w") as file:
        for index, length in enumerate((3, 4)):
            file[f"episode_{index}/observations"] = np.zeros((length + 1, 2))
            file[f"episode_{index}/actions"] = np.zeros((length, 1), dtype=np.float32)
            file[f"episode_{index}/rewards"] = np.ones(length)
            file[f"episode_{index}/terminations"] = np.zeros(length, dtype=bool)  # neither flag on the last step
            file[f"episode_{index}/truncations"] = np.zeros(length, dtype=bool)
    dataset = read_minari(tmp_path / "handmade")
    assert dataset.episode_lengths.tolist() == [3, 4]
    assert dataset.timeouts.tolist() == [False, False, True, False, False, False, False]
    assert load_dataset(tmp_path / "handmade").num_episodes == 2


def test_an_unwritable_kinema_data_is_refused_before_any_collection(monkeypatch, tmp_path) -> None:
    from kinema.datasets.errors import DatasetError
    from kinema.datasets.suite import ensure_suite_dataset

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("KINEMA_DATA", str(blocker / "datasets"))  # under a file: cannot be created
    with pytest.raises(DatasetError, match=r"\$KINEMA_DATA.*cannot be written"):
        ensure_suite_dataset("hopper-random")
