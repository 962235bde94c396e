"""What every benchmark shares: machine description, timing statistics, JSON output.

Measurement rules (docs/benchmarks.md): medians over repeated runs, implementations A/B
interleaved in the same process, warm-up excluded, comparisons reported as ratios. The
machine is shared, so each result records the load average before and after the run.

Results go to the repository's ``benchmarks/results/`` when this package runs from a source
checkout (scripts, or an editable install); an installed copy has no such folder, so there
every command needs an explicit output (``--out`` / ``--results-dir``).
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


def _is_kinema_checkout(root: Path) -> bool:
    try:
        pyproject = (root / "pyproject.toml").read_text()
    except OSError:
        return False
    return 'name = "kinema"' in pyproject and (root / "benchmarks" / "quality.py").is_file()


def source_checkout() -> Path | None:
    """The kinema checkout the benchmarks work in, else None.

    This package's own folder when it is a checkout's ``benchmarks/`` (editable install, or
    ``python benchmarks/<name>.py``); otherwise, with kinema installed from a checkout
    (``pip install .``), the checkout the command runs in.
    """
    if BENCH_DIR.name == "benchmarks" and _is_kinema_checkout(BENCH_DIR.parent):
        return BENCH_DIR.parent
    cwd = Path.cwd().resolve()
    return next((root for root in (cwd, *cwd.parents) if _is_kinema_checkout(root)), None)


REPO_ROOT = source_checkout()
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results" if REPO_ROOT is not None else None

# Hopper-v5 dimensions: what the peer numbers in docs/benchmarks.md were measured with.
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


def git(*args: str) -> str | None:
    """stdout of a git command in the checkout, or None (no checkout, no git, or git failed)."""
    if REPO_ROOT is None:
        return None
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


def git_commit() -> str | None:
    """HEAD of the checkout, with ``-dirty`` when tracked files have uncommitted changes."""
    head = git("rev-parse", "HEAD")
    if head is None:
        return None
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return head.strip() + ("-dirty" if dirty and dirty.strip() else "")


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_version": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),  # e.g. AVX512 or AVX2: what matmuls run with
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


NOT_A_CHECKOUT = (
    "kinema.benchmarks is installed outside a source checkout ({where}), so there is no "
    "repository benchmarks/results/ folder to write to; pass {option}"
)


def results_dir_or_error(parser: argparse.ArgumentParser, given: Path | None, option: str = "--results-dir DIR") -> Path:
    """``given``, else the checkout's ``benchmarks/results/``; without a checkout, exit through argparse naming ``option``."""
    if given is not None:
        return given
    if RESULTS_DIR is None:
        parser.error(NOT_A_CHECKOUT.format(where=BENCH_DIR, option=option))
    return RESULTS_DIR


def output_or_error(parser: argparse.ArgumentParser, given: Path | None, name: str) -> Path:
    """Where benchmark ``name`` writes its JSON: ``--out``, else ``benchmarks/results/<name>.json`` in the checkout."""
    if given is not None:
        return given
    return results_dir_or_error(parser, None, "--out FILE") / f"{name}.json"


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


def compared_models(exact: str, hf: str, default: str | None, attention_window: int) -> dict[str, dict[str, str]]:
    """The variants each "HF / kinema" ratio compares, recorded in the JSON beside the ratios.

    ``same_model`` (the headline): kinema's exact full-context DT (``attention_window=0``), the
    model HF computes, against the HF peer. ``banded_default``: kinema's default DT when it is
    banded (``default`` is None when the default is the exact model), a different model,
    reported beside the headline and never in its place.
    """
    models = {"same_model": {"kinema": exact, "hf": hf,
                             "what": "kinema DT with full context, attention_window=0: the model HF computes"}}
    if default is not None:
        models["banded_default"] = {
            "kinema": default, "hf": hf,
            "what": f"kinema DT's default, banded attention with attention_window={attention_window}: a different model",
        }
    return models


def hf_over_kinema(models: dict[str, dict[str, str]], cost: Callable[[str], float]) -> dict[str, float]:
    """HF / kinema per comparison of ``compared_models``; ``cost(variant)`` is a time (larger = slower)."""
    return {key: ratio(cost(pair["hf"]), cost(pair["kinema"])) for key, pair in models.items()}


def print_hf_over_kinema(results: Sequence[dict[str, Any]], key: str, what: str = "") -> None:
    """One line per thread count: the HF / kinema ratios stored under ``key``, same model first."""
    for entry in results:
        if key in entry:
            ratios = ", ".join(f"{name.replace('_', ' ')} {value}x" for name, value in entry[key].items())
            print(f"{entry['threads']} thread(s): HF / kinema{what}: {ratios}")


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
    return parse_positive_ints(text, "--threads")


def parse_positive_ints(text: str, option: str) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]``; anything else is refused naming ``option``."""
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ValueError(f"{option} expects a comma-separated list of positive integers, got {text!r}")
    return values
