"""Run logs: JSONL (source of truth), CSV, TensorBoard, and the learning-curve PNG."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

METRICS_JSONL = "metrics.jsonl"
METRICS_CSV = "metrics.csv"
CURVE_PNG = "learning_curve.png"


class RunLogger:
    """Appends metric rows; on resume, rows past the resumed step are dropped so logs stay consistent."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool = True):
        self.run_dir = run_dir
        self.path = run_dir / METRICS_JSONL
        if resume_step is None:
            self.path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides events the killed run logged after its last checkpoint.
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=resume_step)

    def _truncate_after(self, step: int) -> None:
        rows = [row for row in read_rows(self.path) if row.get("step", 0) <= step]
        temporary = self.path.with_suffix(".tmp")
        temporary.write_text("".join(json.dumps(row) + "\n" for row in rows))
        os.replace(temporary, self.path)

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **values}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(row) + "\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        write_csv(self.path, self.run_dir / METRICS_CSV)


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line cut short by a kill; everything after it is from the same moment
    return rows


def write_csv(jsonl_path: Path, csv_path: Path) -> None:
    rows = read_rows(jsonl_path)
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def plot_learning_curve(run_dir: Path, title: str) -> Path:
    """Training loss and evaluation score against training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(run_dir / METRICS_JSONL)
    train_rows = [r for r in rows if "train/loss" in r]
    eval_rows = [r for r in rows if r.get("eval/normalized_score_mean") is not None or "eval/return_mean" in r]
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    loss_axis.plot([r["step"] for r in train_rows], [r["train/loss"] for r in train_rows])
    loss_axis.set(xlabel="training step", ylabel="training loss", yscale="log", title="loss")
    score_key = "eval/normalized_score_mean" if any(r.get("eval/normalized_score_mean") is not None for r in eval_rows) else "eval/return_mean"
    score_axis.errorbar(
        [r["step"] for r in eval_rows],
        [r[score_key] for r in eval_rows],
        yerr=[r.get(score_key.replace("_mean", "_std"), 0) or 0 for r in eval_rows],
        marker="o",
        capsize=3,
    )
    score_axis.set(xlabel="training step", ylabel=score_key.split("/")[1].replace("_", " "), title="evaluation")
    figure.suptitle(title)
    figure.tight_layout()
    path = run_dir / CURVE_PNG
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
