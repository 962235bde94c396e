"""The trainer and checkpoints, in-process."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kinema.train.checkpoint import CheckpointError, load_checkpoint
from kinema.train.cli import compose_train_config
from kinema.train.trainer import run_training


def train_config(data: Path, *overrides: str) -> dict:
    return compose_train_config([f"dataset.path={data}", "eval.episodes=1", "eval.num_envs=1", "eval.every=0", *overrides])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "checkpoint" / "model.safetensors"))


def test_resumed_training_matches_uninterrupted(hopper_random_hdf5: Path, tmp_path: Path, capsys) -> None:
    """Stopping at a checkpoint and resuming gives bit-identical weights: optimiser, RNG and sampler state resume."""
    small = ("policy.embed_dim=32", "policy.n_layers=1", "policy.recipe.batch_size=16", "train.checkpoint_every=10")
    straight = tmp_path / "straight"
    run_training(train_config(hopper_random_hdf5, "train.steps=20", *small), straight)

    interrupted = tmp_path / "interrupted"
    run_training(train_config(hopper_random_hdf5, "train.steps=10", *small), interrupted)
    shutil.rmtree(interrupted / "checkpoint")
    (interrupted / "eval.json").unlink()
    capsys.readouterr()
    run_training(train_config(hopper_random_hdf5, "train.steps=20", *small), interrupted)
    assert "from step 10" in capsys.readouterr().out  # resumed, not trained again from the start

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
    stats = json.loads((checkpoint / "stats.json").read_text())
    assert stats["format"] == "kinema.stats/2" and stats["features"].keys() == {"observations"}  # what DT needs
    assert stats["features"]["observations"].keys() == {"mean", "std"}

    # Hand-edited copies: without checksums.json they are accepted as unverifiable (as before checksums).
    without_std = tmp_path / "without-std"
    shutil.copytree(checkpoint, without_std)
    (without_std / "checksums.json").unlink()
    del stats["features"]["observations"]["std"]
    (without_std / "stats.json").write_text(json.dumps(stats))
    with pytest.raises(ValueError, match="observations.std, which is missing"):
        load_checkpoint(without_std)

    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    (broken / "checksums.json").unlink()
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


def test_a_changed_model_or_recipe_is_refused_on_resume_and_inference_options_are_not(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_training(train_config(hopper_random_hdf5, "train.steps=4", "train.checkpoint_every=2"), tmp_path)
    with pytest.raises(ValueError, match=r"different model \(policy.embed_dim changed\)"):
        run_training(train_config(hopper_random_hdf5, "train.steps=6", "policy.embed_dim=64"), tmp_path)
    with pytest.raises(ValueError, match=r"different recipe \(policy.recipe.lr\)"):
        run_training(train_config(hopper_random_hdf5, "train.steps=6", "policy.recipe.lr=0.01"), tmp_path)
    run_training(train_config(hopper_random_hdf5, "train.steps=6", "policy.inference.target_return=10"), tmp_path)
    assert load_checkpoint(tmp_path).step == 6


def test_ema_weights_are_saved_beside_the_model_and_evaluated(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_training(train_config(hopper_random_hdf5, "policy=bc", "train.steps=6", "policy.recipe.ema=true"), tmp_path)
    checkpoint = tmp_path / "checkpoint"
    model, ema = load_file(str(checkpoint / "model.safetensors")), load_file(str(checkpoint / "ema.safetensors"))
    assert model.keys() == ema.keys() and any(not torch.equal(model[k], ema[k]) for k in model)
    for use_ema, expected in ((True, ema), (False, model)):
        loaded = load_checkpoint(checkpoint, use_ema=use_ema).policy.state_dict()
        assert all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_resumed_training_with_ema_matches_uninterrupted(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    """The moving average resumes too: its weights from ema.safetensors, its update count from the trainer state."""
    overrides = ("policy=bc", "policy.recipe.ema=true", "policy.recipe.schedule=cosine",
                 "policy.recipe.schedule_steps=8", "train.checkpoint_every=4")
    straight = tmp_path / "straight"
    run_training(train_config(hopper_random_hdf5, "train.steps=8", *overrides), straight)
    interrupted = tmp_path / "interrupted"
    run_training(train_config(hopper_random_hdf5, "train.steps=4", *overrides), interrupted)
    shutil.rmtree(interrupted / "checkpoint")
    run_training(train_config(hopper_random_hdf5, "train.steps=8", *overrides), interrupted)
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(run / "checkpoint" / name)) for run in (straight, interrupted))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)


def test_raising_steps_on_resume_keeps_the_cosine_horizon(hopper_random_hdf5: Path, tmp_path: Path, capsys) -> None:
    from kinema.train.metrics import read_rows

    overrides = ("policy=bc", "policy.recipe.schedule=cosine", "policy.recipe.min_lr_ratio=0.1", "train.log_every=1",
                 "train.checkpoint_every=4")
    run_training(train_config(hopper_random_hdf5, "train.steps=4", *overrides), tmp_path)
    run_training(train_config(hopper_random_hdf5, "train.steps=7", *overrides), tmp_path)
    assert "keeps its horizon of 4 steps" in capsys.readouterr().out
    lrs = [row["train/lr"] for row in read_rows(tmp_path / "metrics.jsonl") if "train/lr" in row]
    assert len(lrs) == 7 and lrs[3:] == pytest.approx([3e-5] * 4)  # 0.1 x 3e-4 from the horizon on


def test_flipped_bytes_in_a_checkpoint_are_caught_by_name(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_training(train_config(hopper_random_hdf5, "train.steps=2"), tmp_path)
    weights = tmp_path / "checkpoint" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-8] ^= 0xFF  # inside the tensor data: safetensors itself still reads it
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors is corrupt"):
        load_checkpoint(tmp_path)


def test_resume_falls_back_to_the_previous_valid_checkpoint(hopper_random_hdf5: Path, tmp_path: Path, capsys) -> None:
    straight = tmp_path / "straight"
    run_training(train_config(hopper_random_hdf5, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3"), straight)
    run = tmp_path / "run"
    run_training(train_config(hopper_random_hdf5, "train.steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=3"), run)
    shutil.rmtree(run / "checkpoint")
    newest = run / "checkpoints" / "step_00000004" / "trainer_state.safetensors"
    data = bytearray(newest.read_bytes())
    data[-4] ^= 0xFF
    newest.write_bytes(bytes(data))
    run_training(train_config(hopper_random_hdf5, "train.steps=6", "train.checkpoint_every=2", "train.keep_checkpoints=3"), run)
    out = capsys.readouterr().out
    assert "step_00000004/trainer_state.safetensors is corrupt" in out and "resuming" in out and "step 2" in out
    assert (run / "checkpoints" / "unusable-step_00000004").is_dir()  # kept aside, out of the pruned series
    a, b = weights(straight), weights(run)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_a_changed_dataset_file_is_refused_on_resume(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    data = tmp_path / "data.hdf5"
    shutil.copy(hopper_random_hdf5, data)
    run = tmp_path / "run"
    run_training(train_config(data, "train.steps=2", "train.checkpoint_every=2"), run)
    from kinema.datasets import load_dataset, write_d4rl_hdf5

    dataset = load_dataset(data)
    dataset.rewards[:10] += 1.0
    write_d4rl_hdf5(dataset, data)
    with pytest.raises(ValueError, match=f"the dataset changed .*{data}"):
        run_training(train_config(data, "train.steps=4"), run)


def test_a_second_run_in_a_locked_run_directory_is_refused(hopper_random_hdf5: Path, tmp_path: Path) -> None:
    from filelock import FileLock

    from kinema.train.trainer import RUN_LOCK

    tmp_path.mkdir(exist_ok=True)
    with FileLock(str(tmp_path / RUN_LOCK)):  # another process's run, as far as this one can tell
        with pytest.raises(ValueError, match=f"run directory {tmp_path} is in use"):
            run_training(train_config(hopper_random_hdf5, "train.steps=2"), tmp_path)
    run_training(train_config(hopper_random_hdf5, "train.steps=2"), tmp_path)  # released: the run goes ahead
