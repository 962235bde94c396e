"""The trainer and checkpoints, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from safetensors.torch import load_file, save_file

from kinema.train.checkpoint import CheckpointError, load_checkpoint
from kinema.train.cli import CONFIG_DIR, to_plain
from kinema.train.trainer import run_training


def train_config(data: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"dataset.path={data}", "eval.episodes=1", "eval.num_envs=1", *overrides])
    return to_plain(cfg)


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def test_resumed_training_matches_uninterrupted(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    """Stopping at a checkpoint and resuming gives bit-identical weights: optimiser, RNG and sampler state resume."""
    straight = tmp_path / "straight"
    run_training(train_config(hopper_random_hdf5, "train.steps=60", "train.checkpoint_every=30"), straight)

    interrupted = tmp_path / "interrupted"
    run_training(train_config(hopper_random_hdf5, "train.steps=30", "train.checkpoint_every=30"), interrupted)
    shutil.rmtree(interrupted / "checkpoint")
    (interrupted / "eval.json").unlink()
    run_training(train_config(hopper_random_hdf5, "train.steps=60", "train.checkpoint_every=30"), interrupted)

    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_resume_refuses_a_different_configuration(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_training(train_config(hopper_random_hdf5, "train.steps=10", "train.checkpoint_every=5"), tmp_path)
    with pytest.raises(ValueError, match="different `seed`"):
        run_training(train_config(hopper_random_hdf5, "train.steps=20", "seed=3"), tmp_path)


def test_checkpoint_round_trip_and_refusals(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_training(train_config(hopper_random_hdf5, "train.steps=5"), tmp_path)
    checkpoint = tmp_path / "checkpoint"
    loaded = load_checkpoint(checkpoint)
    assert loaded.task == "hopper" and loaded.step == 5 and loaded.policy.name == "dt"  # the default policy
    assert json.loads((checkpoint / "stats.json").read_text()).keys() == {"obs_mean", "obs_std"}

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    tensors = load_file(str(broken / "model.safetensors"))
    tensors.pop(next(iter(tensors)))
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing keys"):
        load_checkpoint(broken)

    (broken / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_checkpoint(broken)

    for name in ("model.safetensors", "config.yaml", "stats.json"):
        partial = tmp_path / f"without-{name}"
        shutil.copytree(checkpoint, partial)
        (partial / name).unlink()
        with pytest.raises(CheckpointError, match=name):
            load_checkpoint(partial)

    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")
