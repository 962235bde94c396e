"""Checkpoints: safetensors weights + resolved config + normalisation statistics, written atomically.

A checkpoint is a directory:

    model.safetensors        policy weights (no pickles anywhere)
    config.yaml              the resolved run config plus a `checkpoint:` block (task, spec, step)
    stats.json               normalisation statistics (NormStats)
    trainer_state.safetensors / trainer_state.json   optimiser, RNG and sampler state (resume only)

It is written into a temporary sibling directory and renamed into place, so a run killed at
any moment (even kill -9) leaves either the previous checkpoint or the new one, never half
of one. Loading refuses a directory that lacks weights, config or statistics.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kinema.policies import NormStats, Policy, PolicySpec, make_policy

WEIGHTS = "model.safetensors"
CONFIG = "config.yaml"
STATS = "stats.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
REQUIRED = (WEIGHTS, CONFIG, STATS)


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be used, with the reason."""


@dataclass
class LoadedCheckpoint:
    policy: Policy
    config: dict[str, Any]  # the run config the policy was trained with
    task: str
    step: int
    dataset_refs: tuple[float, float] | None
    path: Path


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def save_checkpoint(
    directory: Path,
    policy: Policy,
    run_config: dict[str, Any],
    task: str,
    step: int,
    dataset_refs: tuple[float, float] | None,
    trainer_state: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint to ``directory`` (replacing an older one there)."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    weights = {name: tensor.detach().cpu().contiguous() for name, tensor in policy.state_dict().items()}
    save_file(weights, str(staging / WEIGHTS), metadata={"policy": policy.name, "step": str(step)})
    with open(staging / WEIGHTS, "rb+") as handle:
        os.fsync(handle.fileno())
    config = dict(run_config)
    config["checkpoint"] = {
        "policy": policy.name,
        "task": task,
        "step": step,
        "spec": asdict(policy.spec),
        "dataset_refs": list(dataset_refs) if dataset_refs else None,
    }
    _write_file(staging / CONFIG, yaml.safe_dump(config, sort_keys=False))
    stats = NormStats(policy.obs_mean.cpu().numpy(), policy.obs_std.cpu().numpy())
    _write_file(staging / STATS, json.dumps(stats.to_dict()))
    if trainer_state is not None:
        tensors, plain = _split_tensors(trainer_state)
        save_file(tensors, str(staging / TRAINER_TENSORS))
        with open(staging / TRAINER_TENSORS, "rb+") as handle:
            os.fsync(handle.fileno())
        _write_file(staging / TRAINER_JSON, json.dumps(plain))
    _fsync_dir(staging)

    # Swap in: the old directory is moved aside first so a crash leaves one complete copy.
    retired = directory.parent / f".{directory.name}.old-{os.getpid()}"
    if directory.exists():
        os.replace(directory, retired)
    os.replace(staging, directory)
    _fsync_dir(directory.parent)
    if retired.exists():
        shutil.rmtree(retired)
    return directory


def _split_tensors(state: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Separate tensors (to safetensors) from plain values (to JSON), keeping the structure."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[walk(k, f"{path}.k{i}"), walk(v, f"{path}.{i}")] for i, (k, v) in enumerate(value.items())]}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(value)]
        return value

    return tensors, walk(state, prefix or "state")


def _join_tensors(plain: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(plain, dict):
        if "__tensor__" in plain:
            return tensors[plain["__tensor__"]]
        if "__dict__" in plain:
            return {_join_tensors(k, tensors): _join_tensors(v, tensors) for k, v in plain["__dict__"]}
        return plain
    if isinstance(plain, list):
        return [_join_tensors(v, tensors) for v in plain]
    return plain


def resolve_checkpoint_dir(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory holding `checkpoint/`."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        path = path.parent
    if not (path / WEIGHTS).exists() and (path / "checkpoint").is_dir():
        path = path / "checkpoint"
    return path


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the policy from a checkpoint directory; refuses incomplete or inconsistent ones."""
    directory = resolve_checkpoint_dir(path)
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: missing {', '.join(missing)} "
            f"(a kinema checkpoint holds {', '.join(REQUIRED)})"
        )
    try:
        config = yaml.safe_load((directory / CONFIG).read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"checkpoint {directory / CONFIG} is not valid YAML: {error}") from error
    block = config.get("checkpoint") if isinstance(config, dict) else None
    for key in ("policy", "task", "spec", "step"):
        if not isinstance(block, dict) or key not in block:
            raise CheckpointError(f"checkpoint {directory / CONFIG} lacks the key checkpoint.{key}")
    if not isinstance(config.get("policy"), dict):
        raise CheckpointError(f"checkpoint {directory / CONFIG} lacks the policy config (key `policy`)")
    try:
        stats = NormStats.from_dict(json.loads((directory / STATS).read_text()), source=str(directory / STATS))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {directory / STATS} is not valid JSON: {error}") from error
    spec_values = dict(block["spec"])
    spec_values["action_low"] = tuple(spec_values["action_low"])
    spec_values["action_high"] = tuple(spec_values["action_high"])
    spec = PolicySpec(**spec_values)
    policy = make_policy(config["policy"], spec, stats)
    try:
        weights = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint weights {directory / WEIGHTS} cannot be read: {error}") from error
    expected = set(policy.state_dict())
    absent, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if absent or unexpected:
        raise CheckpointError(
            f"checkpoint weights {directory / WEIGHTS} do not match the {block['policy']!r} policy in its config: "
            f"missing keys {absent[:5]}{'...' if len(absent) > 5 else ''}, unexpected keys {unexpected[:5]}"
        )
    try:
        policy.load_state_dict(weights)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"checkpoint weights {directory / WEIGHTS} do not fit the policy config: {error}") from error
    refs = block.get("dataset_refs")
    return LoadedCheckpoint(
        policy=policy.to(device),
        config=config,
        task=block["task"],
        step=int(block["step"]),
        dataset_refs=tuple(refs) if refs else None,
        path=directory,
    )


def load_trainer_state(directory: Path) -> dict[str, Any] | None:
    """The optimiser/RNG/sampler state saved with a periodic checkpoint, or None."""
    if not (directory / TRAINER_JSON).is_file() or not (directory / TRAINER_TENSORS).is_file():
        return None
    tensors = load_file(str(directory / TRAINER_TENSORS))
    return _join_tensors(json.loads((directory / TRAINER_JSON).read_text()), tensors)


def latest_checkpoint(checkpoints_dir: Path) -> Path | None:
    """The highest-step complete periodic checkpoint (step_XXXXXXXX) in a run, if any."""
    if not checkpoints_dir.is_dir():
        return None
    candidates = sorted(
        p for p in checkpoints_dir.glob("step_*") if p.is_dir() and all((p / n).is_file() for n in REQUIRED)
    )
    return candidates[-1] if candidates else None


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    steps = sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints_dir.glob(".step_*"):  # staging dirs of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
