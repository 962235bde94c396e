"""`kinema-deploy`: run a checkpoint as a fixed-rate controller on a robot, with the safety layer on.

    kinema-deploy checkpoint=<dir> robot=virtual [rate_hz=<Hz>] duration_s=<s> hydra.run.dir=<dir>

``robot=virtual`` drives a MuJoCo simulation of the checkpoint's task in its own process
(:mod:`kinema.sim2real.virtual_robot`; ``virtual.*`` injects sensor noise, latency and packet loss, and
``virtual.randomization=<profile>`` varies its dynamics per episode);
``robot=<module>:<Class>`` drives your own :class:`kinema.sim2real.robot.Robot` subclass, built with
``robot_options``. ``serving`` says how the policy computes: ``runtime`` (the pure step functions,
eagerly), ``compiled`` (through torch.compile), ``onnxruntime`` (its ONNX export) or ``act``. A chunked
policy (diffusion) is served from an action queue refilled in the background
(``chunking=sync|replace|ensemble|inpaint``, :mod:`kinema.sim2real.chunking`). The loop runs at the
robot's rate (the task's control rate, ``1/env.dt``) unless ``rate_hz`` says otherwise (the virtual
robot's frame skip then matches it). ``safety.*`` sets the safety layer, ``soft_start_s`` ramps the first commands in, ``dry_run=true`` computes and logs actions
without sending them. ``realtime=true`` asks for SCHED_FIFO and ``pin=[k]`` pins the process, each
with a warning where the OS refuses.

Writes, in the run directory: ``deploy_report.json`` (rate, ticks, deadline misses, jitter, latency,
observation age, safety interventions by reason, episode returns and scores, final state, the robot's
own counts, the machine), ``deploy_ticks.csv`` (per tick: lateness, observation age, inference time, the
action sent), ``deploy_ticks.png`` (latency and jitter over time) and, unless
``record=false``, ``deploy.hdf5`` (the run as a D4RL-layout dataset). A run that ends in anything but
``ok`` exits 1 with a one-line reason, after writing its report.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import hydra
import numpy as np
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from kinema.sim2real.safety import SafetyConfig
from kinema.sim2real.virtual_robot import VirtualRobotConfig
from kinema.train.cli import CONFIG_DIR, HYDRA_VERSION_BASE, refuse_run_dir_that_is_a_file, report_user_errors, to_plain

log = logging.getLogger("kinema.deploy")
DEPLOY_CONFIG_DIR = str(Path(CONFIG_DIR) / "deploy")
SERVING = ("runtime", "compiled", "onnxruntime", "act")


@dataclass
class DeployConfig:
    checkpoint: Optional[str] = None  # checkpoint directory (or a run directory holding checkpoint/)
    robot: str = "virtual"  # virtual | <module>:<Class> (a kinema.sim2real.robot.Robot subclass)
    robot_options: dict = field(default_factory=dict)  # keyword arguments for a robot class of your own
    virtual: VirtualRobotConfig = field(default_factory=VirtualRobotConfig)  # robot=virtual: task (null: the checkpoint's), faults
    rate_hz: Optional[float] = None  # null: the robot's control rate
    duration_s: float = 10.0
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    soft_start_s: float = 0.0  # ramp from zero to the policy's command over this time
    dry_run: bool = False  # compute and log actions, send nothing
    # runtime: kinema.sim2real.runtime.PolicyRuntime's pure steps, eagerly | compiled: the same through torch.compile
    # | onnxruntime: the step exported to ONNX (the onnx extra) | act: the policy's own act. Fastest measured on a
    # 2-core AVX2 CPU (README, "Serving paths"): onnxruntime for BC, compiled for DT
    serving: str = "runtime"
    chunking: Optional[str] = None  # chunked policies (diffusion): sync | replace | ensemble | inpaint; null: inpaint
    injected_delay_ticks: float = 0.0  # chunked policies: an artificial inference delay per chunk, in ticks (benchmarks)
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads of the policy
    backend: Optional[str] = None  # attention backend; null: the policy's
    inference: dict = field(default_factory=dict)  # the policy's inference options, e.g. +inference.num_inference_steps=2
    target_return: Optional[float] = None  # for return-conditioned families; null: the checkpoint's evaluation target
    realtime: bool = False  # SCHED_FIFO for the controller, where the OS allows it
    pin: Optional[list[int]] = None  # CPU cores for the controller; null: as started
    record: bool = True  # write deploy.hdf5
    seed: int = 0  # episode i is seeded seed + i


def check_config(settings: dict[str, Any]) -> tuple[SafetyConfig, VirtualRobotConfig]:
    if not settings.get("checkpoint"):
        raise ValueError("kinema-deploy needs checkpoint=<checkpoint directory or run directory>")
    if settings["serving"] not in SERVING:
        raise ValueError(f"serving must be one of {list(SERVING)}, got {settings['serving']!r}")
    for key in ("duration_s",):
        value = settings[key]
        if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
            raise ValueError(f"{key} must be a positive number, got {value!r}")
    if settings["rate_hz"] is not None and not (isinstance(settings["rate_hz"], (int, float)) and settings["rate_hz"] > 0):
        raise ValueError(f"rate_hz must be a positive number or null, got {settings['rate_hz']!r}")
    if isinstance(settings["threads"], bool) or not isinstance(settings["threads"], int) or settings["threads"] < 1:
        raise ValueError(f"threads must be an integer >= 1, got {settings['threads']!r}")
    if settings["chunking"] is not None:
        from kinema.sim2real.chunking import MODES

        if settings["chunking"] not in MODES:
            raise ValueError(f"chunking must be one of {list(MODES)} or null, got {settings['chunking']!r}")
    delay = settings["injected_delay_ticks"]
    if not (isinstance(delay, (int, float)) and np.isfinite(delay) and delay >= 0):
        raise ValueError(f"injected_delay_ticks must be a number >= 0, got {delay!r}")
    if settings["robot"] != "virtual" and ":" not in settings["robot"]:
        raise ValueError(f"robot must be 'virtual' or '<module>:<Class>' naming a kinema.sim2real.robot.Robot subclass, got {settings['robot']!r}")
    virtual = VirtualRobotConfig(**settings["virtual"])
    if virtual.randomization:
        from kinema.envs.randomization import get_profile

        get_profile(virtual.randomization, virtual.randomization_file)
    return SafetyConfig(**settings["safety"]), virtual


def make_robot(settings: dict[str, Any], task: str) -> Any:
    from kinema.sim2real.robot import Robot

    if settings["robot"] == "virtual":
        from kinema.sim2real.virtual_robot import VirtualRobot

        options = dict(settings["virtual"])
        options["task"] = options["task"] or task
        if settings["rate_hz"] is not None:
            options["rate_hz"] = float(settings["rate_hz"])
        return VirtualRobot(VirtualRobotConfig(**options))
    module_name, _, class_name = settings["robot"].partition(":")
    try:
        robot_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"robot={settings['robot']}: cannot import it ({error})") from None
    if not (isinstance(robot_class, type) and issubclass(robot_class, Robot)):
        raise ValueError(f"robot={settings['robot']} is not a kinema.sim2real.robot.Robot subclass")
    return robot_class(**settings["robot_options"])


def check_serving(settings: dict[str, Any], policy_name: str, chunked: bool) -> None:
    """Refuse serving options that do not apply to the policy, before anything is built."""
    if not chunked and (settings["chunking"] is not None or settings["injected_delay_ticks"]):
        raise ValueError(f"chunking and injected_delay_ticks apply to chunked policies; the {policy_name!r} policy acts step by step")
    if chunked and settings["serving"] not in ("runtime", "act"):
        raise ValueError(f"serving={settings['serving']}: the {policy_name!r} policy is served through its chunk-level call; "
                         "use serving=runtime")


def make_inference(settings: dict[str, Any], runtime: Any, served: Any, period_s: float) -> Any:
    """Per-step inference of ``served`` (the runtime, or its ONNX export) in a worker thread, or, for a chunked
    policy, the chunk queue (kinema.sim2real.chunking)."""
    import torch

    from kinema.sim2real.chunking import ChunkInference, serves_chunks
    from kinema.sim2real.control_loop import PolicyStepper, ThreadedInference

    if not serves_chunks(runtime.policy):
        return ThreadedInference(PolicyStepper(served))
    torch.manual_seed(int(settings["seed"]))  # the chunks' sampling noise
    return ChunkInference(runtime.policy, period_s, mode=settings["chunking"] or "inpaint",
                          delay_s=float(settings["injected_delay_ticks"]) * period_s)


def serving_path(serving: str, runtime: Any) -> str:
    """What computed the actions: a chunked policy's chunk-level call (``chunk_queue``), ONNX Runtime, or the runtime's path."""
    from kinema.sim2real.chunking import serves_chunks

    if serves_chunks(runtime.policy):
        return "chunk_queue"
    return "onnxruntime" if serving == "onnxruntime" else runtime.path


def set_realtime(wanted: bool, cores: list[int] | None) -> dict[str, Any]:
    """Ask for SCHED_FIFO and pinning; what was granted, with a warning for each refusal."""
    granted: dict[str, Any] = {"realtime": False, "cpu_affinity": None}
    if cores:
        try:
            os.sched_setaffinity(0, set(cores))
        except (OSError, ValueError) as error:
            log.warning("kinema-deploy: cannot pin to cores %s (%s); running unpinned", cores, error)
    if wanted:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(50))
            granted["realtime"] = True
        except (OSError, AttributeError) as error:
            log.warning("kinema-deploy: real-time priority (SCHED_FIFO) refused (%s); the loop runs at normal priority, "
                        "so expect more jitter (grant it with `ulimit -r 99`, CAP_SYS_NICE or a real-time kernel)", error)
            print(f"kinema-deploy: warning: real-time priority refused ({error}); running at normal priority", file=sys.stderr)
    granted["cpu_affinity"] = sorted(os.sched_getaffinity(0))
    return granted


def run_deploy(settings: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    import torch

    from kinema.benchmarks.bench_utils import machine_info
    from kinema.sim2real.chunking import serves_chunks
    from kinema.sim2real.control_loop import ControlLoop, LoopConfig
    from kinema.sim2real.recording import DeploymentRecorder
    from kinema.sim2real.robot import check_robot_spec
    from kinema.sim2real.runtime import PolicyRuntime
    from kinema.sim2real.safety import SafetyLayer
    from kinema.train.checkpoint import load_checkpoint

    safety_config, _ = check_config(settings)
    torch.set_num_threads(int(settings["threads"]))
    scheduling = set_realtime(bool(settings["realtime"]), settings["pin"])
    serving = settings["serving"]
    loaded = load_checkpoint(settings["checkpoint"], device=settings["device"])
    chunked = serves_chunks(loaded.policy)
    check_serving(settings, loaded.policy.name, chunked)
    # A chunked policy is served by the chunk queue, so the runtime builds no step functions for it.
    runtime = PolicyRuntime(loaded, batch_size=1, device=settings["device"], attention_backend=settings["backend"],
                            target_return=settings["target_return"], step_functions=serving in ("runtime", "compiled") and not chunked,
                            compile=serving == "compiled", inference=settings["inference"])
    served = runtime
    if serving == "onnxruntime":
        from kinema.sim2real.export import OnnxPolicy, export_onnx

        export_onnx(settings["checkpoint"], run_dir / "policy.onnx", batch_size=1, target_return=runtime.conditioning.get("target_return"))
        served = OnnxPolicy(run_dir / "policy.onnx", threads=int(settings["threads"]))
    task = runtime.source["task"]
    robot = make_robot(settings, task)
    report: dict[str, Any] = {}
    with robot:
        check_robot_spec(robot.spec, runtime.policy.spec, task, needs_reward="target_return" in runtime.policy.conditioning)
        rate_hz = float(settings["rate_hz"] or robot.spec.rate_hz)
        loop_config = LoopConfig(rate_hz=rate_hz, duration_s=float(settings["duration_s"]), soft_start_s=float(settings["soft_start_s"]),
                                 dry_run=bool(settings["dry_run"]), seed=int(settings["seed"]))
        recorder = DeploymentRecorder({"task": task, "checkpoint": str(settings["checkpoint"]), "rate_hz": rate_hz,
                                       "source": "kinema-deploy"}) if settings["record"] else None
        inference = make_inference(settings, runtime, served, 1.0 / rate_hz)
        loop = ControlLoop(robot, inference, SafetyLayer(robot.spec, safety_config), loop_config, on_transition=recorder)
        report = loop.run()
        if hasattr(inference, "report"):
            report["chunking"] = inference.report()
        try:
            report["robot_counts"] = robot.robot_counts() if hasattr(robot, "robot_counts") else {}
        except Exception as error:  # the robot may be gone (robot_lost): the report says so already
            report["robot_counts"] = {"unavailable": str(error)}
    report["episode_normalized_scores"] = _scores(report["episode_returns"], task)
    report.update({"checkpoint": str(settings["checkpoint"]), "task": task, "robot": settings["robot"],
                   "serving_path": serving_path(serving, runtime), "scheduling": scheduling,
                   "settings": settings, "machine": machine_info(), "torch_threads": torch.get_num_threads()})
    if recorder is not None:
        written = recorder.write(run_dir / "deploy.hdf5")
        report["recording"] = None if written is None else {"path": str(written), "transitions": len(recorder)}
    (run_dir / "deploy_report.json").write_text(json.dumps(report, indent=1, default=_plain) + "\n")
    ticks = loop.log.arrays()
    write_tick_log(ticks, run_dir / "deploy_ticks.csv")
    plot_ticks(ticks, loop.period, run_dir / "deploy_ticks.png", f"{task}, {rate_hz:g} Hz, {report['final_state']}")
    return report


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _scores(returns: list[float], task: str | None) -> list[float] | None:
    from kinema.envs.scores import normalized_score

    if not returns or task is None:
        return [] if task is not None else None
    try:
        scores, _ = normalized_score(np.asarray(returns), task)
    except (KeyError, ValueError):  # a task without D4RL reference returns
        return None
    return [round(float(score), 2) for score in scores]


def write_tick_log(arrays: dict[str, np.ndarray], path: Path) -> None:
    """One row per tick: time since the first tick, lateness, observation age and inference time (ms; empty where
    the tick had none), the observation's sequence (-1: none), whether the policy's action went out, the action sent."""
    act_dim = arrays["actions"].shape[1] if arrays["actions"].ndim == 2 else 0
    header = ["time_s", "lateness_ms", "observation_age_ms", "inference_ms", "sequence", "policy_action",
              *(f"action_{i}" for i in range(act_dim))]
    start = arrays["time"][0] if len(arrays["time"]) else 0.0
    ms = lambda value: "" if not np.isfinite(value) else f"{value * 1e3:.4f}"  # noqa: E731
    with open(path, "w") as file:
        file.write(",".join(header) + "\n")
        for i in range(len(arrays["time"])):
            row = [f"{arrays['time'][i] - start:.6f}", ms(arrays["lateness"][i]), ms(arrays["observation_age"][i]),
                   ms(arrays["inference"][i]), str(int(arrays["sequence"][i])), str(int(arrays["policy_action"][i])),
                   *(f"{value:.6g}" for value in arrays["actions"][i])]
            file.write(",".join(row) + "\n")


def plot_ticks(arrays: dict[str, np.ndarray], period: float, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    if len(arrays["time"]):
        seconds = arrays["time"] - arrays["time"][0]
        top.plot(seconds, arrays["inference"] * 1e3, ".", markersize=2, label="inference (ms)")
        top.plot(seconds, arrays["observation_age"] * 1e3, ".", markersize=2, label="observation age (ms)")
        top.axhline(period * 1e3, color="gray", linewidth=0.8, linestyle="--", label="period")
        bottom.plot(seconds, np.abs(arrays["lateness"]) * 1e6, ".", markersize=2, color="tab:red")
    top.set_ylabel("ms")
    top.legend(loc="upper right", fontsize=8)
    bottom.set_ylabel("tick jitter (µs)")
    bottom.set_xlabel("time (s)")
    bottom.set_yscale("symlog", linthresh=10)
    top.set_title(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


@hydra.main(config_path=DEPLOY_CONFIG_DIR, config_name="deploy", version_base=HYDRA_VERSION_BASE)
@report_user_errors("kinema-deploy")
def _hydra_main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    report = run_deploy(to_plain(cfg), run_dir)
    interventions = ", ".join(f"{reason} {count}" for reason, count in report["safety_interventions"].items()) or "none"
    print(f"kinema-deploy: {report['ticks']} ticks at {report['rate_hz']:g} Hz, {report['deadline_misses']} deadline misses, "
          f"jitter p99 {report['jitter_us_p99']} us, latency p99 {report['latency_us_p99']} us; interventions: {interventions}")
    if report["episode_returns"]:
        print(f"kinema-deploy: episode returns {report['episode_returns']}")
    print(f"kinema-deploy: wrote {run_dir / 'deploy_report.json'}")
    if report["final_state"] != "ok":
        print(f"kinema-deploy: {report['final_state']}: {report['final_reason']}", file=sys.stderr)
        sys.exit(1)


def main() -> None:
    refuse_run_dir_that_is_a_file("kinema-deploy")
    ConfigStore.instance().store(name="deploy_schema", node=DeployConfig)
    _hydra_main()


if __name__ == "__main__":
    main()
