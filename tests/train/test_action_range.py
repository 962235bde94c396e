"""kinema-train checks the dataset's actions against the task's action box, end to end."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import pytest

pytestmark = pytest.mark.slow


def _scaled_copy(source: Path, target: Path, rows: slice, factor: float) -> Path:
    shutil.copy(source, target)
    with h5py.File(target, "r+") as file:
        actions = file["actions"][()]
        actions[rows] *= factor
        file["actions"][...] = actions
    return target


def _train(cli, data: Path, tmp_path: Path):
    return cli.run([cli.script("kinema-train"), "policy=bc", f"dataset.path={data}", "train.steps=5", "eval.episodes=1",
                    "eval.num_envs=1", "threads=1", f"hydra.run.dir={tmp_path / data.stem}"], cwd=tmp_path, check=False)


def test_actions_outside_the_box_warn_once_and_far_outside_are_refused(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    # Random actions are uniform in [-1, 1]: scaling some by 1.2 pushes about a sixth of those out.
    warned = _train(cli, _scaled_copy(hopper_random_hdf5, tmp_path / "a-little-out.hdf5", slice(0, 300), 1.2), tmp_path)
    assert warned.returncode == 0, warned.stderr
    output = warned.stdout + warned.stderr
    assert output.count("outside the task's action box") == 1, output
    assert "a-little-out.hdf5" in output and "'actions'" in output

    refused = _train(cli, _scaled_copy(hopper_random_hdf5, tmp_path / "wrong-units.hdf5", slice(None), 57.3), tmp_path)
    assert refused.returncode == 2, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "wrong-units.hdf5" in refused.stderr and "'actions'" in refused.stderr and "1.5" in refused.stderr
