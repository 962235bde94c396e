"""What every benchmark shares: machine description, timing statistics, JSON output.

Measurement rules (BENCHMARKS.md): medians over repeated runs, implementations A/B
interleaved in the same process, warm-up excluded, comparisons reported as ratios. The
machine is shared, so each result records the load average before and after the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Hopper-v5 dimensions: what the peer numbers in BENCHMARKS.md were measured with.
HOPPER_OBS_DIM, HOPPER_ACT_DIM = 11, 3


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_flags() -> list[str]:
    """The CPU features that decide matmul speed (AVX-512, bf16)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = line.split(":", 1)[1].split()
                return sorted(f for f in flags if f.startswith(("avx512", "amx", "avx2")))
    except OSError:
        pass
    return []


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_default_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
    }


class RunRecord:
    """Collects a benchmark's metadata: machine, command, load average before/after."""

    def __init__(self, name: str, argv: Sequence[str] | None):
        self.name = name
        self.started = time.time()
        self.data: dict[str, Any] = {
            "benchmark": name,
            "command": " ".join(["python", f"benchmarks/{name}.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine_info(),
            "load_average_before": load_average(),
        }

    def finish(self, results: dict[str, Any], out: Path) -> dict[str, Any]:
        self.data["load_average_after"] = load_average()
        self.data["wall_time_s"] = round(time.time() - self.started, 1)
        self.data.update(results)
        write_json(out, self.data)
        print(f"\nwrote {out}  (load average before {self.data['load_average_before']}, "
              f"after {self.data['load_average_after']})")
        return self.data


def write_json(path: Path, value: Any) -> None:
    """Atomic: a killed benchmark never leaves half a JSON file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(value, indent=2, default=_json_default) + "\n")
    os.replace(temporary, path)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def default_output(name: str) -> Path:
    return RESULTS_DIR / f"{name}.json"


def summarize_ms(seconds: Iterable[float]) -> dict[str, float]:
    """Median, p99, mean, min and count of durations given in seconds, in milliseconds."""
    values = np.asarray(list(seconds), dtype=np.float64) * 1e3
    if values.size == 0:
        raise ValueError("no timings to summarise")
    return {
        "median_ms": round(float(np.median(values)), 4),
        "p99_ms": round(float(np.percentile(values, 99)), 4),
        "mean_ms": round(float(values.mean()), 4),
        "min_ms": round(float(values.min()), 4),
        "count": int(values.size),
    }


def interleave(variants: dict[str, Callable[[], Any]], rounds: int, warmup: int, label: str = "") -> dict[str, list[Any]]:
    """Call every variant once per round, A B C A B C ..., after ``warmup`` unrecorded rounds.

    Progress goes to stderr (a long benchmark on a shared machine should show it is alive).
    """
    recorded: dict[str, list[Any]] = {name: [] for name in variants}
    total = warmup + rounds
    last_report = time.perf_counter()
    for round_index in range(total):
        for name, call in variants.items():
            value = call()
            if round_index >= warmup:
                recorded[name].append(value)
        if time.perf_counter() - last_report > 10 or round_index == total - 1:
            print(f"  {label} round {round_index + 1}/{total} ({warmup} warm-up)", file=sys.stderr, flush=True)
            last_report = time.perf_counter()
    return recorded


def ratio(numerator: float, denominator: float) -> float:
    return round(numerator / denominator, 3) if denominator else float("nan")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """A plain fixed-width table on stdout."""
    cells = [[str(h) for h in headers]] + [[_cell(value) for value in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    for index, row in enumerate(cells):
        print("  ".join(value.ljust(width) for value, width in zip(row, widths)))
        if index == 0:
            print("  ".join("-" * width for width in widths))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def require_positive(parser: argparse.ArgumentParser, args: argparse.Namespace, names: Iterable[str]) -> None:
    """Exit through argparse (usage and a message naming the option) when an integer option is below 1."""
    for name in names:
        value = getattr(args, name)
        if value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")


def parse_threads(text: str) -> list[int]:
    try:
        threads = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        threads = []
    if not threads or min(threads) < 1:
        raise ValueError(f"--threads expects a comma-separated list of positive integers, got {text!r}")
    return threads
