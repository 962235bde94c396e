"""The virtual robot in its own process and `kinema-deploy` end to end. These run in real time, so they assert
what happened (states, counts, files), never how fast: timing lives in benchmarks/control_loop.py."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from kinema.sim2real.control_loop import ControlLoop, LoopConfig, ThreadedInference
from kinema.sim2real.safety import SafetyConfig, SafetyLayer
from kinema.sim2real.virtual_robot import VirtualRobot, VirtualRobotConfig

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

REPORT_KEYS = ("rate_hz", "ticks", "deadline_misses", "jitter_us_p50", "jitter_us_p99", "latency_us_p50", "latency_us_p99",
               "safety_interventions", "episode_returns", "final_state")


def zero_policy(job):
    return np.zeros(3)


def run(robot: VirtualRobot, duration_s: float, **loop_options) -> dict:
    loop = ControlLoop(robot, ThreadedInference(zero_policy), SafetyLayer(robot.spec, SafetyConfig()),
                       LoopConfig(rate_hz=robot.spec.rate_hz, duration_s=duration_s, **loop_options))
    return loop.run()


def test_the_virtual_robot_serves_its_task_at_its_control_rate_with_joint_limits():
    with VirtualRobot(VirtualRobotConfig(task="hopper")) as robot:
        assert robot.spec.rate_hz == pytest.approx(125.0) and robot.spec.obs_dim == 11 and robot.spec.provides_reward
        assert [limit.name for limit in robot.spec.joint_limits] == ["thigh_joint", "leg_joint", "foot_joint"]
        report = run(robot, 2.5)
        counts = robot.robot_counts()
    assert report["final_state"] == "ok" and report["ticks"] == 312
    # How many ticks the policy thread serves in time depends on the machine's load (233 of 312 once, beside
    # three training jobs on 2 cores), so only that it served some and never more than the ticks; speed is
    # benchmarked (benchmarks/control_loop.py).
    assert counts["steps"] >= 250 and 0 < report["policy_actions"] <= report["ticks"]
    # a zero-torque hopper falls within about 140 steps: at least one whole episode
    assert report["episode_returns"] and all(length > 5 for length in report["episode_lengths"])


def test_a_rate_the_simulation_cannot_step_at_is_refused():
    with pytest.raises(ValueError, match=r"rate_hz=300: the 'hopper' simulation's timestep is 2 ms"):
        VirtualRobot(VirtualRobotConfig(task="hopper", rate_hz=300)).connect()


def test_the_robot_process_killed_mid_run_ends_in_robot_lost():
    with VirtualRobot(VirtualRobotConfig(task="hopper")) as robot:
        killer = threading.Timer(0.5, robot.process.kill)
        killer.start()
        report = run(robot, 10.0, robot_lost_s=0.2)
        killer.join()
    assert report["final_state"] == "robot_lost" and "exited" in report["final_reason"]
    assert report["ticks"] < 10.0 * 125 / 2


def test_packet_loss_and_sensor_noise_are_injected_and_counted():
    config = VirtualRobotConfig(task="hopper", packet_loss=0.2, observation_noise_std=0.01, seed=3)
    with VirtualRobot(config) as robot:
        report = run(robot, 1.0)
        counts = robot.robot_counts()
    assert report["final_state"] == "ok"
    assert counts["lost_observations"] > 5 and counts["lost_actions"] > 5
    assert report["safety_interventions"]["observation_missing"] >= counts["lost_observations"] // 2


@pytest.fixture(scope="module")
def hopper_checkpoints(cli, hopper_random_hdf5, tmp_path_factory) -> dict[str, Path]:
    """BC, DT and diffusion trained for a few steps on hopper: not good policies, but real checkpoints of the task."""
    runs = tmp_path_factory.mktemp("deploy-checkpoints")
    for family in ("bc", "dt", "diffusion"):
        fast = ["policy.inference.num_inference_steps=2"] if family == "diffusion" else []  # quick chunks
        cli.run([cli.script("kinema-train"), f"policy={family}", f"dataset.path={hopper_random_hdf5}", "train.steps=5",
                 "eval.episodes=1", "eval.num_envs=1", "eval.every=0", "threads=1", *fast, f"hydra.run.dir={runs / family}"], cwd=runs)
    return {family: runs / family for family in ("bc", "dt", "diffusion")}


@pytest.mark.parametrize("family, serving, path", [("bc", "onnxruntime", "onnxruntime"), ("dt", "compiled", "compiled"),
                                                    ("diffusion", "runtime", "chunk_queue")])
def test_kinema_deploy_drives_the_virtual_robot_and_writes_report_plot_and_recording(cli, hopper_checkpoints, tmp_path, family,
                                                                                      serving, path):
    from kinema.datasets import load_dataset

    run_dir = tmp_path / "deploy"
    out = cli.run([cli.script("kinema-deploy"), f"checkpoint={hopper_checkpoints[family]}", "robot=virtual", "duration_s=1.5",
                   f"serving={serving}", f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    report = json.loads((run_dir / "deploy_report.json").read_text())
    assert all(key in report for key in REPORT_KEYS), sorted(report)
    assert report["final_state"] == "ok" and report["rate_hz"] == 125.0 and report["task"] == "hopper"
    assert report["serving_path"] == path and report["policy_actions"] > 0
    if family == "diffusion":  # served from its chunk queue, refilled in the background
        assert report["chunking"]["mode"] == "inpaint" and report["chunking"]["chunks"] > 1
    assert len(report["episode_normalized_scores"]) == len(report["episode_returns"])
    assert (run_dir / "deploy_ticks.png").stat().st_size > 10_000
    rows = (run_dir / "deploy_ticks.csv").read_text().splitlines()
    assert rows[0].startswith("time_s,lateness_ms,observation_age_ms,inference_ms,sequence,policy_action,action_0")
    assert len(rows) - 1 == report["ticks"] - report["deadline_misses"]  # a skipped (overrun) tick has no row
    assert "kinema-deploy: wrote" in out.stdout
    # the recording is an ordinary dataset: the loader reads it, episodes and all
    dataset = load_dataset(run_dir / "deploy.hdf5", obs_dim=11, act_dim=3)
    assert len(dataset.observations) == report["recording"]["transitions"]
    # each ended episode closes with a terminal (or a timeout where a dropped observation left a gap before its end)
    ended = dataset.terminals | dataset.timeouts
    assert ended.sum() >= len(report["episode_returns"]) and ended[-1]
    assert np.all(np.diff(dataset.infos["timestamps"]) > 0)
    assert dataset.metadata["task"] == "hopper"


def test_kinema_eval_scores_a_checkpoint_under_each_randomization_profile(cli, hopper_checkpoints, tmp_path):
    out = cli.run([cli.script("kinema-eval"), f"checkpoint={hopper_checkpoints['bc']}", "eval.episodes=2", "randomization=[mass,delay]",
                   f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    robustness = json.loads((tmp_path / "eval" / "robustness.json").read_text())
    assert [row["profile"] for row in robustness["profiles"]] == ["none", "mass", "delay"]
    assert robustness["profiles"][1]["settings"]["mass_scale"] == [0.7, 1.3]
    assert all(row["normalized_score_mean"] is not None for row in robustness["profiles"])
    assert "profile delay" in out.stdout


def test_kinema_deploy_dry_run_sends_nothing(cli, hopper_checkpoints, tmp_path):
    run_dir = tmp_path / "dry"
    cli.run([cli.script("kinema-deploy"), f"checkpoint={hopper_checkpoints['bc']}", "duration_s=0.5", "dry_run=true", "record=false",
             f"hydra.run.dir={run_dir}"], cwd=tmp_path)
    report = json.loads((run_dir / "deploy_report.json").read_text())
    assert report["dry_run"] and report["policy_actions"] > 0 and "recording" not in report
    # the robot never received an action: every step it took held the initial zero command
    assert report["robot_counts"]["held_actions"] == report["robot_counts"]["steps"]


def test_kinema_deploy_refuses_a_robot_the_checkpoint_was_not_trained_for(cli, hopper_checkpoints, tmp_path):
    out = cli.run([cli.script("kinema-deploy"), f"checkpoint={hopper_checkpoints['bc']}", "virtual.task=walker2d", "duration_s=0.5",
                   f"hydra.run.dir={tmp_path / 'a'}"], cwd=tmp_path, check=False)
    assert out.returncode == 2 and "obs_dim: the robot observes 17 values, the checkpoint's policy 11" in out.stderr


@pytest.mark.parametrize("override, message", [
    ({"safety": {"safe_action": "brake"}}, "safety.safe_action must be one of"),
    ({"duration_s": 0}, "duration_s must be a positive number"),
    ({"serving": "tensorrt"}, "serving must be one of"),
    ({"robot": "myrobot"}, "robot must be 'virtual' or '<module>:<Class>'"),
    ({"chunking": "blend"}, "chunking must be one of"),
    ({"injected_delay_ticks": -1}, "injected_delay_ticks must be a number >= 0"),
    ({"virtual": {"packet_loss": 1.0}}, r"virtual.packet_loss must be in \[0, 1\)"),
    ({"virtual": {"randomization": "lava"}}, "randomization profile 'lava' is not defined"),
])
def test_bad_deploy_settings_are_refused_naming_the_key(override, message):
    from dataclasses import asdict

    from kinema.sim2real.deploy_app import DeployConfig, check_config

    settings = asdict(DeployConfig(checkpoint="somewhere"))
    for key, value in override.items():
        settings[key] = {**settings[key], **value} if isinstance(value, dict) else value
    with pytest.raises(ValueError, match=message):
        check_config(settings)


def test_serving_options_that_do_not_fit_the_policy_are_refused_before_anything_is_built():
    from dataclasses import asdict

    from kinema.sim2real.deploy_app import DeployConfig, check_serving

    settings = asdict(DeployConfig(checkpoint="somewhere"))
    check_serving(settings, "diffusion", chunked=True)
    check_serving(settings, "bc", chunked=False)
    with pytest.raises(ValueError, match="serving=compiled: the 'diffusion' policy is served through its chunk-level call"):
        check_serving({**settings, "serving": "compiled"}, "diffusion", chunked=True)
    with pytest.raises(ValueError, match="chunking and injected_delay_ticks apply to chunked policies; the 'bc' policy"):
        check_serving({**settings, "chunking": "replace"}, "bc", chunked=False)


def test_a_robot_class_that_is_not_a_robot_is_refused():
    from kinema.sim2real.deploy_app import make_robot

    with pytest.raises(ValueError, match="robot=collections:OrderedDict is not a kinema.sim2real.robot.Robot subclass"):
        make_robot({"robot": "collections:OrderedDict", "robot_options": {}}, "hopper")
    with pytest.raises(ValueError, match="robot=no_such_module:Arm: cannot import it"):
        make_robot({"robot": "no_such_module:Arm", "robot_options": {}}, "hopper")


def test_the_chunk_seams_benchmark_runs_and_writes_json(hopper_checkpoints, tmp_path):
    from kinema.benchmarks.chunk_seams import main

    result = main(["--checkpoints", str(hopper_checkpoints["diffusion"]), "--delays", "0,1", "--modes", "replace,inpaint",
                   "--episodes", "1", "--out", str(tmp_path / "seams.json")])
    assert [(row["delay_ticks"], row["mode"]) for row in result["summary"]] == [(0, "replace"), (0, "inpaint"), (1, "replace"), (1, "inpaint")]
    assert all(case["chunks"] > 0 for case in result["runs"][0]["cases"]) and (tmp_path / "seams.json").is_file()


def test_the_control_loop_benchmark_runs_and_writes_json(hopper_checkpoints, tmp_path):
    from kinema.benchmarks.control_loop import main

    result = main(["--checkpoints", f"dt={hopper_checkpoints['dt']}", "--rates", "task", "--duration", "0.5",
                   "--out", str(tmp_path / "loop.json")])
    case = result["cases"][0]
    assert case["rate_hz"] == 125.0 and case["ticks"] > 0 and case["final_state"] == "ok" and "held_actions" in case["robot_counts"]


def test_the_robustness_benchmark_compares_plain_evaluation_with_the_loop(hopper_checkpoints, tmp_path):
    from kinema.benchmarks.robustness import main

    result = main(["--checkpoint", str(hopper_checkpoints["bc"] / "checkpoint"), "--profiles", "none,mass", "--episodes", "1",
                   "--realtime-episodes", "0", "--out", str(tmp_path / "robustness.json")])
    rows = {row["profile"]: row for row in result["profiles"]}
    assert set(rows) == {"none", "mass"} and all(row["loop_simulated"]["episodes"] == 1 for row in rows.values())
    # without randomisation the loop in simulated time replays plain evaluation, unless the safety layer stepped in
    if not rows["none"]["loop_simulated"]["safety_interventions"]:
        assert rows["none"]["loop_simulated"]["score"] == pytest.approx(rows["none"]["plain"], abs=1e-3)


ARM_MODULE = '''
from kinema.sim2real.control_loop import MonotonicClock
from kinema.sim2real.robot import RobotError
from kinema.sim2real.simulated_robot import SimulatedRobot
from kinema.sim2real.virtual_robot import VirtualRobotConfig


class FlakyArm(SimulatedRobot):
    """A robot of the user's own: hopper in this process at wall-clock rate, whose link drops after some observations."""

    def __init__(self, fail_after: int):
        super().__init__(VirtualRobotConfig(task="hopper"), MonotonicClock())
        self.fail_after, self.seen = fail_after, 0

    def get_observation(self, timeout_s):
        self.seen += 1
        if self.seen > self.fail_after:
            raise RobotError("link down")
        return super().get_observation(timeout_s)
'''


def test_a_robot_class_of_your_own_runs_and_a_lost_robot_exits_non_zero_with_its_report(hopper_checkpoints, tmp_path):
    import os
    import subprocess
    import sys

    (tmp_path / "my_arm.py").write_text(ARM_MODULE)
    run_dir = tmp_path / "run"
    command = [str(Path(sys.executable).parent / "kinema-deploy"), f"checkpoint={hopper_checkpoints['bc']}", "robot=my_arm:FlakyArm",
               "+robot_options.fail_after=40", "duration_s=5", f"hydra.run.dir={run_dir}"]
    out = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=str(tmp_path), OMP_NUM_THREADS="1"))
    assert out.returncode == 1, out.stderr
    assert "kinema-deploy: robot_lost: link down" in out.stderr
    report = json.loads((run_dir / "deploy_report.json").read_text())
    assert report["final_state"] == "robot_lost" and report["robot"] == "my_arm:FlakyArm" and 30 <= report["ticks"] <= 40
    assert report["safety_interventions"]["estop"] == 1
