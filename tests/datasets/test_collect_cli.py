"""`kinema-collect` end to end in subprocesses: --list, training a behaviour policy (killed and
resumed), recording with a user's stable-baselines3 checkpoint, and refused bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kinema.datasets import load_dataset
from kinema.datasets.behaviour import PPO_RECIPE
from kinema.datasets.suite import SUITE_MANIFEST

ONE_ROLLOUT = PPO_RECIPE["n_envs"] * PPO_RECIPE["n_steps"]  # the smallest snapshot interval: 4096 steps


def collect_args(cli, run_dir: Path, *overrides: str) -> list[str]:
    return [cli.script("kinema-collect"), *overrides, f"hydra.run.dir={run_dir}"]


# -- kinema-collect --list -----------------------------------------------------------------------


def test_list_names_every_suite_dataset_and_which_are_cached(cli, tmp_path: Path, monkeypatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    monkeypatch.setenv("KINEMA_DATA", str(data))
    (data / "hopper-medium.hdf5").write_bytes(b"")  # --list only looks whether the file is there
    names = list(json.loads(SUITE_MANIFEST.read_text())["datasets"])
    proc = cli.run([cli.script("kinema-collect"), "--list"], cwd=tmp_path)
    lines = proc.stdout.strip().splitlines()
    assert lines[0].split()[0] == "dataset" and lines[0].split()[-1] == "cached"
    rows = [line.split() for line in lines[1:-1]]
    assert [row[0] for row in rows] == names  # every suite dataset, in manifest order, nothing else
    assert {row[0]: row[-1] for row in rows} == {name: "yes" if name == "hopper-medium" else "no" for name in names}
    assert lines[-1].startswith(f"cache: {data} ")


# -- kinema-collect env=... behaviour.train=true --------------------------------------------------


def read_state(work: Path) -> dict | None:
    try:
        return json.loads((work / "state.json").read_text())  # written atomically: complete or absent
    except FileNotFoundError:
        return None


def training_files(work: Path) -> dict[str, object]:
    """Modification times of checkpoints and snapshots, and the contents of state.json
    (which a finished training rewrites unchanged, recording the request)."""
    files = {str(p.relative_to(work)): p.stat().st_mtime_ns for p in sorted(work.rglob("*")) if p.is_file()}
    return {**files, "state.json": read_state(work)}


@pytest.mark.slow
def test_behaviour_training_killed_then_rerun_resumes_from_its_checkpoint(cli, tmp_path: Path) -> None:
    from stable_baselines3 import PPO

    work, run_dir = tmp_path / "work", tmp_path / "run"
    args = collect_args(cli, run_dir, "env=hopper", "behaviour.train=true", f"behaviour.total_steps={2 * ONE_ROLLOUT}",
                        f"behaviour.snapshot_every={ONE_ROLLOUT}", f"behaviour.work_dir={work}")
    # Kill the first run (SIGKILL: no clean-up) as soon as it has written a checkpoint.
    cli.kill_when(args, tmp_path, lambda: bool((read_state(work) or {}).get("checkpoint")))
    killed = read_state(work)
    assert killed["finished"] is None and killed["num_timesteps"] < 2 * ONE_ROLLOUT
    assert not (run_dir / "collect.json").exists()

    resumed = cli.run(args, cwd=tmp_path)  # the same command again
    checkpoint_name = Path(killed["checkpoint"]).name
    assert f"resuming from {checkpoint_name} at {killed['num_timesteps']} steps" in resumed.stdout
    assert "from scratch" not in resumed.stdout
    state = read_state(work)
    assert state["finished"] == "total_steps" and state["num_timesteps"] == 2 * ONE_ROLLOUT
    assert [p["steps"] for p in state["curve"]] == [0, ONE_ROLLOUT, 2 * ONE_ROLLOUT]  # continued, none repeated twice
    assert sorted(p.name for p in (work / "checkpoints").iterdir()) == [
        f"step_{steps:09d}{suffix}" for steps in (ONE_ROLLOUT, 2 * ONE_ROLLOUT) for suffix in (".vecnormalize.npz", ".zip")
    ]
    final_checkpoint = work / (state["checkpoint"] + ".zip")
    assert PPO.load(final_checkpoint, device="cpu").num_timesteps == 2 * ONE_ROLLOUT
    for point in state["curve"]:
        assert (work / (point["snapshot"] + ".safetensors")).is_file() and (work / (point["snapshot"] + ".json")).is_file()
    summary = json.loads((run_dir / "collect.json").read_text())
    assert summary["training"] == {"num_timesteps": 2 * ONE_ROLLOUT, "wall_time_s": state["wall_time_s"], "finished": "total_steps"}
    assert summary["config"]["behaviour"]["total_steps"] == 2 * ONE_ROLLOUT

    # Finished: the same command again does no more work and changes nothing.
    before = training_files(work)
    again = cli.run(args, cwd=tmp_path)
    assert f"already trained for {2 * ONE_ROLLOUT} >= {2 * ONE_ROLLOUT} steps" in again.stdout
    assert training_files(work) == before

    # Another seed in the same work directory is refused, not mixed into this training.
    other_seed = cli.run([*args, "seed=1"], cwd=tmp_path, check=False)
    assert other_seed.returncode == 2
    assert f"{work / 'state.json'}: existing training has seed=0, this request has 1" in other_seed.stderr
    assert training_files(work) == before


# -- kinema-collect env=... behaviour=sb3 checkpoint=<file.zip> -----------------------------------


@pytest.fixture(scope="module")
def user_ppo_zip(tmp_path_factory) -> Path:
    """A user's own stable-baselines3 PPO checkpoint for Hopper-v5 (256 steps of training)."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    path = tmp_path_factory.mktemp("sb3") / "my_ppo.zip"
    model = PPO("MlpPolicy", gym.make("Hopper-v5"), n_steps=128, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(256)
    model.save(path)
    return path


def mean_actions(checkpoint: Path, observations: np.ndarray) -> np.ndarray:
    from stable_baselines3 import PPO

    actions, _ = PPO.load(checkpoint, device="cpu").predict(observations, deterministic=True)
    return actions


@pytest.mark.parametrize("deterministic", [False, True], ids=["sampled", "mean"])
def test_records_a_dataset_with_a_users_sb3_checkpoint(cli, user_ppo_zip: Path, tmp_path: Path, deterministic: bool) -> None:
    import gymnasium as gym

    output = tmp_path / "mine.hdf5"
    proc = cli.run(collect_args(cli, tmp_path / "run", "env=hopper", "behaviour=sb3", f"checkpoint={user_ppo_zip}", "algo=ppo",
                                "steps=155", "num_envs=4", f"deterministic={str(deterministic).lower()}", f"output={output}"),
                   cwd=tmp_path)
    assert f"wrote {output}: 155 transitions" in proc.stdout and "(PPO in Hopper-v5)" in proc.stdout
    dataset = load_dataset(output, obs_dim=11, act_dim=3)
    assert dataset.num_transitions == 155  # 4 environments, the last vector step only partly used
    box = gym.make("Hopper-v5").action_space
    assert (dataset.actions >= box.low).all() and (dataset.actions <= box.high).all()
    assert {key: dataset.metadata[key] for key in ("algorithm", "training_steps", "checkpoint", "actions", "task", "env_id")} == {
        "algorithm": "PPO", "training_steps": 256, "checkpoint": str(user_ppo_zip),
        "actions": "mean" if deterministic else "sampled", "task": "hopper", "env_id": "Hopper-v5",
    }
    # The checkpoint drove the data: its mean action, or samples around it (std 1 at this point of training).
    gap = np.abs(dataset.actions - mean_actions(user_ppo_zip, dataset.observations))
    if deterministic:
        assert gap.max() < 1e-5
    else:
        assert gap.mean() > 0.2


# -- bad input: refused with exit status 2 and an error naming what is wrong --------------------


BAD_INPUT = {
    "suite-name": (["dataset=hopper-bogus"], ["'hopper-bogus' is not in the suite manifest", "suite.json"]),
    "train-without-env": (["behaviour.train=true"], ["behaviour.train=true needs env=<task>"]),
    "train-snapshot-interval": (["env=hopper", "behaviour.train=true", "behaviour.snapshot_every=1000"],
                                [f"snapshot_every must be a multiple of {ONE_ROLLOUT}", "got 1000"]),
    "sb3-missing-zip": (["env=hopper", "behaviour=sb3", "checkpoint={tmp}/missing.zip", "output={tmp}/out.hdf5"],
                        ["{tmp}/missing.zip: stable-baselines3 checkpoint not found"]),
    "sb3-without-checkpoint": (["env=hopper", "behaviour=sb3", "output={tmp}/out.hdf5"], ["behaviour=sb3 needs checkpoint="]),
    "zero-steps": (["env=hopper", "steps=0", "output={tmp}/out.hdf5"], ["steps must be an integer >= 1, got 0"]),
    "zero-envs": (["env=hopper", "num_envs=0", "output={tmp}/out.hdf5"], ["num_envs must be an integer >= 1, got 0"]),
    "compression": (["env=hopper", "compression=zip", "output={tmp}/out.hdf5"], ["compression must be one of null, gzip, lzf, got 'zip'"]),
    "suite-size": (["dataset=hopper-medium", "size=huge"], ["size must be one of default, full, got 'huge'"]),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_refused_with_an_error_naming_it(cli, tmp_path: Path, case: str) -> None:
    overrides, expected = BAD_INPUT[case]
    work = tmp_path / "work"
    proc = cli.run(collect_args(cli, tmp_path / "run", *(o.format(tmp=tmp_path) for o in overrides),
                                f"behaviour.work_dir={work}", f"data_dir={tmp_path / 'data'}"),
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in expected:
        assert fragment.format(tmp=tmp_path) in proc.stderr
    assert not (tmp_path / "out.hdf5").exists() and not (work / "state.json").exists() and not (tmp_path / "data").exists()
