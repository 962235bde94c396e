"""Seams between action chunks: the diffusion policy's score and action jerk under an injected inference
delay, for synchronous chunks, asynchronous replacement, temporal ensembling and inpainting.

    python benchmarks/chunk_seams.py                   # the diffusion study's hopper-medium-expert cells
    python benchmarks/chunk_seams.py --checkpoints <ckpt> --delays 0,2 --modes replace,inpaint --episodes 2 --out /tmp/s.json

Each run drives the simulated robot (the virtual robot's simulation on a fake clock:
``kinema.sim2real.simulated_robot``) through the control loop and its chunk queue
(``kinema.sim2real.chunking``) with every chunk taking ``delay`` ticks of simulated time, so the
result is the loop's logic alone, reproducible and independent of this machine's speed and load. The
safety layer runs with its rate limit off (it would smooth the very seams measured). Per run: the
normalised score of ``--episodes`` episodes (seeded 0, 1, ...), the mean squared second difference of
the actions sent at seams (a step served by another chunk than the step before) and inside chunks, the
ticks the safety layer had to fill (no action in time), and the inference delay the queue measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kinema.benchmarks.bench_utils import (
    RunRecord, output_or_error, print_table, require_positive, results_dir_or_error,
)
from kinema.benchmarks.diffusion_inference import study_checkpoints

NAME = "chunk_seams"
DEFAULT_MODES = "sync,replace,ensemble,inpaint"


def jerk_at_seams(actions: np.ndarray, sequences: np.ndarray, served: dict[int, int]) -> tuple[float | None, float | None, int]:
    """Mean squared second difference of the actions at seams and inside chunks, and the number of seams.

    Only steps whose neighbours are the adjacent observations of the same run count; a step is a seam
    when the chunk that served it differs from the previous step's."""
    seams, inside = [], []
    for index in range(1, len(actions) - 1):
        before, step, after = sequences[index - 1: index + 2]
        if step < 0 or before != step - 1 or after != step + 1 or step not in served or before not in served:
            continue
        jerk = float(np.sum((actions[index + 1] - 2 * actions[index] + actions[index - 1]) ** 2))
        (seams if served[step] != served[before] else inside).append(jerk)
    mean = lambda values: float(np.mean(values)) if values else None  # noqa: E731
    return mean(seams), mean(inside), len(seams)


def run_case(checkpoint: Path, mode: str, delay_ticks: int, episodes: int) -> dict[str, Any]:
    import torch

    from kinema.envs.scores import normalized_score
    from kinema.sim2real.chunking import ChunkInference
    from kinema.sim2real.control_loop import ControlLoop, FakeClock, LoopConfig
    from kinema.sim2real.runtime import PolicyRuntime
    from kinema.sim2real.safety import SafetyConfig, SafetyLayer
    from kinema.sim2real.simulated_robot import SimulatedRobot
    from kinema.sim2real.virtual_robot import VirtualRobotConfig

    runtime = PolicyRuntime(checkpoint)
    task = runtime.source["task"]
    torch.manual_seed(0)
    clock = FakeClock()
    with SimulatedRobot(VirtualRobotConfig(task=task), clock) as robot:
        period = 1.0 / robot.spec.rate_hz
        inference = ChunkInference(runtime.policy, period, mode=mode, clock=clock, threaded=False, delay_s=delay_ticks * period)
        loop = ControlLoop(robot, inference, SafetyLayer(robot.spec, SafetyConfig(max_action_change=None)),
                           LoopConfig(rate_hz=robot.spec.rate_hz, duration_s=episodes * 1000 * period * 1.1, episodes=episodes), clock=clock)
        report = loop.run()
    arrays = loop.log.arrays()
    seam, inside, seams = jerk_at_seams(arrays["actions"], arrays["sequence"], dict(inference.served))
    scores, _ = normalized_score(np.asarray(report["episode_returns"]), task)
    return {"mode": mode, "delay_ticks": delay_ticks, "score_mean": float(np.mean(scores)), "score_std": float(np.std(scores)),
            "episode_returns": report["episode_returns"], "jerk_at_seams": seam, "jerk_inside_chunks": inside, "seams": seams,
            "safety_filled_ticks": report["safety_interventions"].get("late_action", 0), "ticks": report["ticks"],
            "chunks": inference.chunks, "measured_delay_ticks": inference.delay_ticks if inference.chunks else None}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hopper-medium-expert", help="the diffusion study dataset whose seed cells are read")
    parser.add_argument("--checkpoints", type=Path, nargs="+", default=None, help="use these instead of the study's cells")
    parser.add_argument("--delays", default="0,2,4", help="injected inference delays, in ticks (default 0,2,4)")
    parser.add_argument("--modes", default=DEFAULT_MODES, help=f"chunk modes (default {DEFAULT_MODES})")
    parser.add_argument("--episodes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <results>/{NAME}.json")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("episodes", "threads"))
    from kinema.sim2real.chunking import MODES

    modes = [mode.strip() for mode in args.modes.split(",") if mode.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown or not modes:
        parser.error(f"--modes: unknown {unknown}; choose from {list(MODES)}")
    try:
        delays = [int(text) for text in args.delays.split(",")]
    except ValueError:
        delays = [-1]
    if not delays or min(delays) < 0:
        parser.error(f"--delays must be comma-separated whole numbers of ticks >= 0, got {args.delays!r}")
    checkpoints = args.checkpoints or study_checkpoints(results_dir_or_error(parser, args.results_dir), args.dataset)
    if not checkpoints:
        parser.error(f"no finished diffusion cells of {args.dataset} here; pass --checkpoints")
    out = output_or_error(parser, args.out, NAME)

    import torch

    torch.set_num_threads(args.threads)
    record = RunRecord(NAME, argv)
    runs = []
    for checkpoint in checkpoints:
        cases = []
        for delay in delays:
            for mode in modes:
                case = run_case(checkpoint, mode, delay, args.episodes)
                cases.append(case)
                print(f"{checkpoint}: {mode} delay {delay}: score {case['score_mean']:.1f}, jerk at seams {case['jerk_at_seams']}, "
                      f"inside {case['jerk_inside_chunks']}", flush=True)
        runs.append({"checkpoint": str(checkpoint), "cases": cases})
    summary = []
    for delay in delays:
        for mode in modes:
            picked = [case for run in runs for case in run["cases"] if case["mode"] == mode and case["delay_ticks"] == delay]
            mean = lambda key: None if any(c[key] is None for c in picked) else float(np.mean([c[key] for c in picked]))  # noqa: E731
            summary.append({"mode": mode, "delay_ticks": delay, "score_mean": mean("score_mean"),
                            "score_std_over_checkpoints": float(np.std([c["score_mean"] for c in picked])),
                            "jerk_at_seams": mean("jerk_at_seams"), "jerk_inside_chunks": mean("jerk_inside_chunks"),
                            "safety_filled_ticks": mean("safety_filled_ticks"), "checkpoints": len(picked)})
    print_table(["delay", "mode", "score", "jerk at seams", "jerk inside", "filled ticks"],
                [[row["delay_ticks"], row["mode"], _round(row["score_mean"], 1), _round(row["jerk_at_seams"], 4),
                  _round(row["jerk_inside_chunks"], 4), _round(row["safety_filled_ticks"], 1)] for row in summary])
    return record.finish({"config": {"dataset": None if args.checkpoints else args.dataset, "delays": delays, "modes": modes,
                                     "episodes": args.episodes, "threads": args.threads, "rate_limit": None},
                          "runs": runs, "summary": summary}, out)


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


if __name__ == "__main__":
    main()
