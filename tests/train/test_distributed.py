"""kinema-train under torchrun: 2 CPU processes (gloo) stay in lock-step and resume together."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_two_ranks_end_with_identical_parameters_and_resume(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    run_dir = tmp_path / "ddp"

    def launch(steps: int):
        return cli.run(
            [torchrun, "--standalone", "--nproc_per_node=2", cli.script("kinema-train"), "policy=bc",
             f"dataset.path={hopper_random_hdf5}", f"train.steps={steps}", "train.checkpoint_every=20",
             "eval.episodes=1", "eval.num_envs=1", "threads=1", f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
        )

    launch(40)
    first = json.loads((run_dir / "eval.json").read_text())["ddp"]
    assert first["world_size"] == 2
    assert len(set(first["parameter_sha256_per_rank"])) == 1

    # Extending the run resumes both ranks from rank 0's checkpoint.
    resumed = launch(60)
    assert f"resuming {run_dir} from step 40" in resumed.stdout + resumed.stderr
    second = json.loads((run_dir / "eval.json").read_text())
    assert second["step"] == 60
    assert len(set(second["ddp"]["parameter_sha256_per_rank"])) == 1
    assert second["ddp"]["parameter_sha256_per_rank"] != first["parameter_sha256_per_rank"]


def test_a_resumed_ddp_run_with_dropout_equals_an_uninterrupted_one(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    """Each rank restores its own RNG stream: before, every rank resumed with rank 0's, so dropout masks changed."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"

    def launch(run_dir: Path, steps: int) -> None:
        cli.run(
            [torchrun, "--standalone", "--nproc_per_node=2", cli.script("kinema-train"), "policy=dt",
             "policy.embed_dim=16", "policy.n_layers=1", "policy.context_len=6", "policy.attention_window=3",
             "policy.recipe.batch_size=8", f"dataset.path={hopper_random_hdf5}", f"train.steps={steps}",
             "train.checkpoint_every=10", "eval.every=0", "eval.episodes=1", "eval.num_envs=1", "threads=1",
             f"hydra.run.dir={run_dir}"],
            cwd=tmp_path,
        )

    launch(tmp_path / "straight", 20)
    launch(tmp_path / "resumed", 10)
    launch(tmp_path / "resumed", 20)
    checksums = [json.loads((tmp_path / run / "eval.json").read_text())["ddp"]["parameter_sha256_per_rank"]
                 for run in ("straight", "resumed")]
    assert checksums[0] == checksums[1]
