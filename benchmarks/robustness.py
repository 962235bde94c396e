"""Scores under domain randomisation: plain evaluation against the deployment loop on the virtual robot.

    python benchmarks/robustness.py                      # the quality grid's hopper-medium-expert DT seed-0 cell, every built-in profile
    python benchmarks/robustness.py --checkpoint <ckpt> --profiles none,mass --episodes 5 --realtime-episodes 2 --out /tmp/r.json

For each randomisation profile (``kinema.envs.randomization``), the same checkpoint and episode seeds
(0, 1, ...) three ways:

- ``plain``: ``kinema.envs.evaluate`` under the profile, what ``kinema-eval randomization=[...]`` reports;
- ``loop, simulated time``: the deployment loop with its default safety layer driving the virtual
  robot's simulation on a fake clock (``kinema.sim2real.simulated_robot``), inference taking no time.
  It differs from ``plain`` only by what the safety layer changed (its interventions are recorded);
- ``virtual robot, real time``: ``kinema-deploy``'s loop against the virtual robot in its own process at
  wall-clock rate (``--realtime-episodes`` episodes; 0 skips it), where late actions and held steps
  also count.

Normalised scores, mean over episodes; the safety layer's interventions per run.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kinema.benchmarks.bench_utils import RunRecord, output_or_error, print_table, results_dir_or_error

NAME = "robustness"


def plain_score(checkpoint: Path, profile: Any, episodes: int) -> float:
    from kinema.envs import evaluate
    from kinema.sim2real.runtime import PolicyRuntime

    runtime = PolicyRuntime(checkpoint)
    result = evaluate(runtime.policy, runtime.source["task"], episodes=episodes, seed=0, num_envs=min(episodes, 10),
                      conditioning=runtime.conditioning, randomization=profile)
    return float(result.normalized_score_mean)


def loop_score(checkpoint: Path, profile_name: str, episodes: int, simulated: bool) -> dict[str, Any]:
    from kinema.envs.scores import normalized_score
    from kinema.sim2real.chunking import ChunkInference
    from kinema.sim2real.control_loop import ControlLoop, FakeClock, InlineInference, LoopConfig, PolicyStepper, ThreadedInference
    from kinema.sim2real.runtime import PolicyRuntime
    from kinema.sim2real.safety import SafetyConfig, SafetyLayer
    from kinema.sim2real.simulated_robot import SimulatedRobot
    from kinema.sim2real.virtual_robot import VirtualRobot, VirtualRobotConfig

    runtime = PolicyRuntime(checkpoint)
    task = runtime.source["task"]
    robot_config = VirtualRobotConfig(task=task, randomization=None if profile_name == "none" else profile_name)
    clock = FakeClock() if simulated else None
    robot = SimulatedRobot(robot_config, clock) if simulated else VirtualRobot(robot_config)
    with robot:
        period = 1.0 / robot.spec.rate_hz
        if hasattr(runtime.policy, "predict_chunk"):
            inference = ChunkInference(runtime.policy, period, mode="sync" if simulated else "inpaint", clock=clock, threaded=not simulated)
        else:
            inference = InlineInference(PolicyStepper(runtime), clock) if simulated else ThreadedInference(PolicyStepper(runtime))
        config = LoopConfig(rate_hz=robot.spec.rate_hz, duration_s=episodes * 1000 * period * 1.2, episodes=episodes)
        loop = ControlLoop(robot, inference, SafetyLayer(robot.spec, SafetyConfig()), config, clock=clock)
        report = loop.run()
        held = robot.robot_counts().get("held_actions")
    scores, _ = normalized_score(np.asarray(report["episode_returns"]), task)
    return {"score": float(np.mean(scores)) if len(scores) else None, "episodes": len(scores),
            "safety_interventions": report["safety_interventions"], "held_actions": held, "final_state": report["final_state"]}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the quality grid's hopper-medium-expert DT seed-0 cell")
    parser.add_argument("--profiles", default=None, help="comma-separated profile names (default: every built-in one)")
    parser.add_argument("--randomization-file", type=Path, default=None, help="a YAML file of profiles of your own")
    parser.add_argument("--episodes", type=int, default=10, help="episodes per profile for plain and simulated runs (default 10)")
    parser.add_argument("--realtime-episodes", type=int, default=3, help="episodes per profile on the real-time virtual robot (0: skip)")
    parser.add_argument("--realtime", action="store_true", help="ask for SCHED_FIFO for the real-time runs (recorded)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <results>/{NAME}.json")
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.realtime_episodes < 0 or args.threads < 1:
        parser.error("--episodes and --threads must be >= 1, --realtime-episodes >= 0")
    from kinema.envs.randomization import get_profile, load_profiles

    checkpoint = args.checkpoint
    if checkpoint is None:
        checkpoint = results_dir_or_error(parser, args.results_dir) / "diffusion" / "quality_runs" / "hopper-medium-expert" / "dt" / "seed0" / "checkpoint"
        if not checkpoint.is_dir():
            parser.error(f"{checkpoint} does not exist; pass --checkpoint")
    names = args.profiles.split(",") if args.profiles else list(load_profiles(args.randomization_file))
    try:
        profiles = [get_profile(name.strip(), args.randomization_file) for name in names]
    except ValueError as error:
        parser.error(str(error))
    out = output_or_error(parser, args.out, NAME)

    import torch

    from kinema.sim2real.deploy_app import set_realtime

    torch.set_num_threads(args.threads)
    record = RunRecord(NAME, argv)
    scheduling = set_realtime(args.realtime, None) if args.realtime_episodes else None
    rows = []
    for profile in profiles:
        row = {"profile": profile.name, "settings": profile.to_dict(), "plain": plain_score(checkpoint, profile, args.episodes),
               "loop_simulated": loop_score(checkpoint, profile.name, args.episodes, simulated=True)}
        if args.realtime_episodes:
            row["virtual_robot_realtime"] = loop_score(checkpoint, profile.name, args.realtime_episodes, simulated=False)
        rows.append(row)
        print(f"{profile.name}: plain {row['plain']:.1f}, loop {row['loop_simulated']['score']}, "
              f"virtual robot {row.get('virtual_robot_realtime', {}).get('score')}", flush=True)
    print_table(["profile", "plain", "loop (simulated time)", "virtual robot (real time)"],
                [[row["profile"], round(row["plain"], 1), _round(row["loop_simulated"]["score"]),
                  _round(row.get("virtual_robot_realtime", {}).get("score"))] for row in rows])
    return record.finish({"config": {"checkpoint": str(checkpoint), "episodes": args.episodes,
                                     "realtime_episodes": args.realtime_episodes, "threads": args.threads, "scheduling": scheduling},
                          "profiles": rows}, out)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


if __name__ == "__main__":
    main()
