"""The control loop on this machine: tick jitter, deadline misses and latency of `kinema-deploy` driving the
virtual robot (its own process, wall-clock rate) with a Decision Transformer and the diffusion policy.

    python benchmarks/control_loop.py                       # the quality grid's hopper-medium-expert DT and diffusion seed-0 cells
    python benchmarks/control_loop.py --checkpoints dt=<ckpt> diffusion=<ckpt> --rates task,500 --duration 60 --out /tmp/c.json

Each case is one ``kinema-deploy`` run (``kinema.sim2real.deploy_app.run_deploy``, the same code as the
command) for ``--duration`` seconds: at the task's control rate (``1/env.dt``: hopper 125 Hz) and at
500 Hz, where the virtual robot's MuJoCo frame skip is set to match (hopper: 1 frame of 2 ms; the policy
then acts 4x as often as it was trained to, so its score there says nothing, only the timing does).
With ``--realtime``, each case runs again asking for SCHED_FIFO (reported as refused where the OS
says no). Recorded per case: jitter p50/p99 (tick start against its deadline), deadline misses,
inference latency p50/p99 (per step; per chunk for the diffusion policy), observation age, the safety
layer's interventions, the virtual robot's held actions (steps without a fresh action), episode scores.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any, Sequence

from kinema.benchmarks.bench_utils import RunRecord, output_or_error, print_table, require_positive, results_dir_or_error

NAME = "control_loop"


def default_checkpoints(results: Path) -> dict[str, Path]:
    cells = results / "diffusion" / "quality_runs" / "hopper-medium-expert"
    found = {family: cells / family / "seed0" / "checkpoint" for family in ("dt", "diffusion")}
    return {family: path for family, path in found.items() if path.is_dir()}


def run_case(family: str, checkpoint: Path, rate: str, duration: float, realtime: bool, threads: int) -> dict[str, Any]:
    from dataclasses import asdict

    from kinema.sim2real.deploy_app import DeployConfig, run_deploy

    settings = asdict(DeployConfig(checkpoint=str(checkpoint), duration_s=duration, rate_hz=None if rate == "task" else float(rate),
                                   realtime=realtime, threads=threads, record=False))
    with tempfile.TemporaryDirectory() as run_dir:
        report = run_deploy(settings, Path(run_dir))
    keep = ("rate_hz", "ticks", "deadline_misses", "jitter_us_p50", "jitter_us_p99", "latency_us_p50", "latency_us_p99",
            "observation_age_us_p50", "observation_age_us_p99", "policy_actions", "safety_interventions", "episode_returns",
            "episode_normalized_scores", "final_state", "robot_counts", "chunking", "scheduling", "serving_path")
    return {"family": family, "checkpoint": str(checkpoint), "rate": rate, "realtime_requested": realtime,
            **{key: report.get(key) for key in keep}}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoints", nargs="+", default=None, help="family=checkpoint pairs (default: the quality grid's cells)")
    parser.add_argument("--rates", default="task,500", help="'task' and/or rates in Hz (default task,500)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds per case (default 60)")
    parser.add_argument("--realtime", action="store_true", help="also run every case asking for SCHED_FIFO")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    parser.add_argument("--out", type=Path, default=None, help=f"default: <results>/{NAME}.json")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("threads",))
    if not args.duration > 0:
        parser.error(f"--duration must be a positive number of seconds, got {args.duration}")
    if args.checkpoints:
        try:
            checkpoints = {family: Path(path) for family, path in (item.split("=", 1) for item in args.checkpoints)}
        except ValueError:
            parser.error("--checkpoints takes family=path pairs, e.g. dt=runs/dt/checkpoint")
    else:
        checkpoints = default_checkpoints(results_dir_or_error(parser, args.results_dir))
        if not checkpoints:
            parser.error("no quality-grid checkpoints here; pass --checkpoints dt=<ckpt> diffusion=<ckpt>")
    rates = [rate.strip() for rate in args.rates.split(",") if rate.strip()]
    for rate in rates:
        if rate != "task" and not rate.replace(".", "", 1).isdigit():
            parser.error(f"--rates: {rate!r} is neither 'task' nor a number of Hz")
    out = output_or_error(parser, args.out, NAME)
    record = RunRecord(NAME, argv)
    cases = []
    for family, checkpoint in checkpoints.items():
        for rate in rates:
            for realtime in ([False, True] if args.realtime else [False]):
                case = run_case(family, checkpoint, rate, args.duration, realtime, args.threads)
                cases.append(case)
                print(f"{family} at {case['rate_hz']:g} Hz (realtime {case['scheduling']['realtime']}): jitter p99 {case['jitter_us_p99']} us, "
                      f"misses {case['deadline_misses']}, latency p99 {case['latency_us_p99']} us", flush=True)
    print_table(["policy", "Hz", "RT", "ticks", "misses", "jitter p50 us", "jitter p99 us", "latency p99 us", "held actions", "state"],
                [[c["family"], c["rate_hz"], c["scheduling"]["realtime"], c["ticks"], c["deadline_misses"], c["jitter_us_p50"],
                  c["jitter_us_p99"], (c["chunking"] or {}).get("chunk_latency_us_p99", c["latency_us_p99"]),
                  (c["robot_counts"] or {}).get("held_actions"), c["final_state"]] for c in cases])
    return record.finish({"config": {"rates": rates, "duration_s": args.duration, "realtime": args.realtime, "threads": args.threads},
                          "cases": cases}, out)


if __name__ == "__main__":
    main()
