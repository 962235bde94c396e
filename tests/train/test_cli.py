"""The command lines end to end, in subprocesses with tiny budgets (cleanrl style)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

EVAL_KEYS = ("return_mean", "return_std", "normalized_score_mean", "normalized_score_std", "episodes")


def train_args(cli, data: Path, run_dir: Path, steps: int = 200, *extra: str) -> list[str]:
    return [
        cli.script("kinema-train"), "policy=bc", f"dataset.path={data}", f"train.steps={steps}", "eval.episodes=2",
        "eval.num_envs=2", "seed=0", "threads=1", f"hydra.run.dir={run_dir}", *extra,
    ]


def test_no_arguments_means_the_decision_transformer_on_the_embedded_dataset(cli, tmp_path: Path) -> None:
    proc = cli.run([cli.script("kinema-train"), "--cfg", "job", "--resolve"], cwd=tmp_path)
    config = yaml.safe_load(proc.stdout)
    assert config["policy"]["name"] == "dt" and config["policy"]["attention_window"] == 7
    assert config["dataset"]["name"] == "hopper-medium-replay-slice" and config["eval"]["target_return"] == "dataset_max"


def test_train_then_eval(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = cli.run(train_args(cli, hopper_random_hdf5, run_dir), cwd=tmp_path)
    assert "normalised score" in proc.stdout

    result = json.loads((run_dir / "eval.json").read_text())
    for key in EVAL_KEYS:
        assert key in result, key
    assert result["episodes"] == 2 and len(result["returns"]) == 2
    # A random-policy recording has no expert to measure, so the D4RL references are used.
    assert result["reference_source"] == "d4rl"
    for name in ("model.safetensors", "config.yaml", "stats.json"):
        assert (run_dir / "checkpoint" / name).is_file()
    assert (run_dir / "learning_curve.png").stat().st_size > 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 200 and any("train/loss" in row for row in rows)
    assert (run_dir / "metrics.csv").read_text().startswith("step,")
    assert any((run_dir / "tensorboard").iterdir())

    eval_dir = tmp_path / "eval"
    proc = cli.run([cli.script("kinema-eval"), f"checkpoint={run_dir / 'checkpoint'}", "eval.episodes=2",
                    f"hydra.run.dir={eval_dir}"], cwd=tmp_path)
    again = json.loads((eval_dir / "eval.json").read_text())
    # Same checkpoint, same seeds: the evaluation reproduces exactly.
    assert again["returns"] == result["returns"]
    assert again["normalized_score_mean"] == pytest.approx(result["normalized_score_mean"])


def test_killed_run_resumes_from_last_checkpoint(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    args = train_args(cli, hopper_random_hdf5, run_dir, 4000, "train.checkpoint_every=100", "train.log_every=50")
    cli.kill_when(args, tmp_path, lambda: any((run_dir / "checkpoints").glob("step_*")), settle=0.3)
    done = sorted(int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*"))
    assert done and not (run_dir / "eval.json").exists()

    resumed = cli.run(args, cwd=tmp_path)
    assert f"resuming {run_dir} from step {done[-1]}" in resumed.stderr + resumed.stdout
    result = json.loads((run_dir / "eval.json").read_text())
    assert result["step"] == 4000
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "resumed logs must not repeat or interleave steps"


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT])
def test_a_preempted_run_checkpoints_its_current_step_and_resumes_exactly(cli, hopper_random_hdf5: Path, tmp_path: Path, stop_signal) -> None:
    run_dir = tmp_path / "run"
    args = train_args(cli, hopper_random_hdf5, run_dir, 100000, "train.checkpoint_every=100000", "train.log_every=10",
                      "eval.every=0")
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.read_text().count("\n") >= 3) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(stop_signal)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + stop_signal, stderr
    stopped_at = [int(p.name.split("_")[1]) for p in (run_dir / "checkpoints").glob("step_*")]
    assert len(stopped_at) == 1 and stopped_at[0] >= 30  # the step it was at, not a periodic one
    step = stopped_at[0]
    assert f"stopped by {stop_signal.name} at step {step}" in stderr and f"hydra.run.dir={run_dir}" in stderr

    budget = [f"train.steps={step + 15}" if a.startswith("train.steps=") else a for a in args]
    cli.run(budget, cwd=tmp_path)
    straight = tmp_path / "straight"
    cli.run([f"hydra.run.dir={straight}" if a.startswith("hydra.run.dir=") else a for a in budget], cwd=tmp_path)
    a, b = (load_file(str(run / "checkpoint" / "model.safetensors")) for run in (run_dir, straight))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_eval_refuses_incomplete_checkpoint(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    cli.run(train_args(cli, hopper_random_hdf5, run_dir, 20), cwd=tmp_path)
    (run_dir / "checkpoint" / "stats.json").unlink()
    proc = cli.run([cli.script("kinema-eval"), f"checkpoint={run_dir}", f"hydra.run.dir={tmp_path / 'e'}"],
                   cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "stats.json" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.steps=-5", "train.steps"),
        ("train.steps=abc", "train.steps"),
        ("train.checkpoint_every=0", "train.checkpoint_every"),
        ("train.checkpoint_every=-1", "train.checkpoint_every"),
        ("train.log_every=0", "train.log_every"),
        ("train.keep_checkpoints=0", "train.keep_checkpoints"),
        ("eval.episodes=0", "eval.episodes"),
        ("eval.num_envs=0", "eval.num_envs"),
        ("eval.target_return=lots", "eval.target_return"),
        ("seed=-1", "seed"),
        ("policy.recipe.lr=-1", "recipe.lr"),
        ("policy.hidden_dims=[0]", "hidden_dims"),
        ("+policy.bogus=1", "bogus"),
        ("policy.name=nope", "nope"),
        ("env=NoSuchTask-v9", "NoSuchTask-v9"),
        ("policy=ppo", "kinema-rl"),  # an actor trained online: not a family kinema-train trains
    ],
)
def test_bad_config_values_are_named_before_any_work(cli, hopper_random_hdf5: Path, tmp_path: Path, override: str, expected: str) -> None:
    run = tmp_path / "run"
    proc = cli.run(train_args(cli, hopper_random_hdf5, run, 10, override), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()


def test_dataset_that_does_not_match_the_task_is_refused(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    proc = cli.run(train_args(cli, hopper_random_hdf5, tmp_path / "run", 10, "env=halfcheetah"), cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert str(hopper_random_hdf5) in proc.stderr and "Traceback" not in proc.stderr


def test_runs_started_together_get_their_own_directories(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    args = [cli.script("kinema-train"), "policy=bc", f"dataset.path={hopper_random_hdf5}", "train.steps=5",
            "eval.episodes=1", "eval.num_envs=1", "threads=1"]
    procs = [subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()
    runs = list((tmp_path / "runs" / "train").glob("*/*"))
    assert len(runs) == 2 and all((run / "eval.json").is_file() for run in runs)


@pytest.mark.parametrize("policy", ["dt", "at"])
def test_transformer_policies_train_and_evaluate(cli, hopper_random_hdf5: Path, tmp_path: Path, policy: str) -> None:
    run_dir = tmp_path / policy
    cli.run(train_args(cli, hopper_random_hdf5, run_dir, 30, f"policy={policy}", "eval.trials=2"), cwd=tmp_path)
    result = json.loads((run_dir / "eval.json").read_text())
    trials = result["trials"]
    assert trials["trials"] == 2 and len(trials["returns"]) == 2 and all(len(run) == 2 for run in trials["returns"])
    # The headline score is the single first trial, never the best of n.
    assert result["normalized_score_mean"] == pytest.approx(trials["first_trial_score_mean"])
    assert trials["best_of_n_score_mean"] >= max(trials["first_trial_score_mean"], trials["last_trial_score_mean"]) - 1e-9
    # Conditioned on the best return in the training data, recorded for kinema-eval to replay.
    from kinema.datasets.d4rl_io import read_d4rl_hdf5

    best_return = float(read_d4rl_hdf5(hopper_random_hdf5).episode_returns.max())
    assert result["target_return"] == pytest.approx(best_return)
    saved = yaml.safe_load((run_dir / "checkpoint" / "config.yaml").read_text())
    assert saved["eval"]["target_return"] == pytest.approx(best_return)


def test_target_return_modes(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "dt"
    cli.run(train_args(cli, hopper_random_hdf5, run_dir, 5, "policy=dt", "eval.target_return=task"), cwd=tmp_path)
    assert json.loads((run_dir / "eval.json").read_text())["target_return"] == 3600.0
    proc = cli.run([cli.script("kinema-eval"), f"checkpoint={run_dir}", "eval.episodes=1", "eval.num_envs=1",
                    "eval.target_return=1234", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["target_return"] == 1234.0
    proc = cli.run([cli.script("kinema-eval"), f"checkpoint={run_dir}", "eval.target_return=best",
                    f"hydra.run.dir={tmp_path / 'bad'}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "eval.target_return must be a finite number or one of" in proc.stderr


@pytest.mark.parametrize("launcher", ["basic", "submitit_local"])
def test_multirun_sweeps_seeds(cli, hopper_random_hdf5: Path, tmp_path: Path, launcher: str) -> None:
    if launcher == "submitit_local":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    cli.run([cli.script("kinema-train"), "-m", "policy=bc", f"dataset.path={hopper_random_hdf5}", "train.steps=10",
             "eval.episodes=1", "eval.num_envs=1", "threads=1", "seed=0,1", f"hydra/launcher={launcher}",
             f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    seeds = sorted(json.loads((sweep / str(job) / "eval.json").read_text())["seed"] for job in (0, 1))
    assert seeds == [0, 1]


def test_eval_writes_a_video_that_follows_the_robot(cli, hopper_random_hdf5: Path, tmp_path: Path) -> None:
    import numpy as np

    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    run_dir, eval_dir = tmp_path / "run", tmp_path / "eval"
    cli.run(train_args(cli, hopper_random_hdf5, run_dir, 20), cwd=tmp_path)
    cli.run([cli.script("kinema-eval"), f"checkpoint={run_dir}", "eval.episodes=2", "video=true",
             f"hydra.run.dir={eval_dir}"], cwd=tmp_path)
    result = json.loads((eval_dir / "eval.json").read_text())
    reader = imageio.get_reader(str(eval_dir / "episode.mp4"))
    try:
        assert reader.get_meta_data()["size"] == (848, 480)
        assert reader.count_frames() == result["lengths"][0] + 1  # episode 0: its reset frame and one per step
        last = reader.get_data(result["lengths"][0])
    finally:
        reader.close()
    # The Hopper's orange-brown body (red well above blue) is in the last frame, near the middle.
    rows, cols = np.nonzero(last[..., 0].astype(int) - last[..., 2].astype(int) > 60)
    assert len(cols) > 500 and abs(cols.mean() / 848 - 0.5) < 0.2


@pytest.mark.parametrize("command", ["kinema-train", "kinema-eval", "kinema-collect"])
def test_a_run_directory_that_is_a_file_is_refused_by_name(cli, tmp_path: Path, command: str) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    proc = cli.run([cli.script(command), f"hydra.run.dir={existing}"], cwd=tmp_path, check=False)
    assert proc.returncode == 2 and f"hydra.run.dir={existing} is an existing file" in proc.stderr
    assert "Traceback" not in proc.stderr and existing.read_text() == "mine"
