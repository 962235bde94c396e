"""Checkpoints: safetensors weights + resolved config + normalisation statistics, written atomically.

A checkpoint is a directory:

    model.safetensors        policy weights (no pickles anywhere)
    ema.safetensors          the exponential moving average of the weights, when the policy's
                             recipe keeps one (same keys); evaluation loads it instead of model.safetensors
    config.yaml              the resolved run config plus a `checkpoint:` block (task, spec, step)
    stats.json               normalisation statistics keyed by feature (NormStats, format kinema.stats/2)
    trainer_state.safetensors / trainer_state.json   optimiser, RNG and sampler state (resume only)
    checksums.json           sha256 of every other file, written last; verified on every load


Checkpoints written before policies declared their recipe (flat stats.json with
obs_mean/obs_std; train.lr, train.batch_size, ... and policy.target_return in config.yaml)
load unchanged: ``read_run_config`` maps their keys to today's.

It is written into a temporary sibling directory and renamed into place, so a run killed at
any moment (even kill -9) leaves either the previous checkpoint or the new one, never half
of one. Loading refuses a directory that lacks weights, config or statistics.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kinema.datasets.suite import sha256_of_file
from kinema.policies import NormStats, Policy, PolicySpec, Recipe, make_policy

WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
CONFIG = "config.yaml"
STATS = "stats.json"
TRAINER_TENSORS = "trainer_state.safetensors"
TRAINER_JSON = "trainer_state.json"
CHECKSUMS = "checksums.json"
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
    ema: Policy | None = None,
) -> Path:
    """Atomically write a checkpoint to ``directory`` (replacing an older one there); ``ema`` is the averaged policy."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = directory.parent / f".{directory.name}.tmp-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()

    for filename, module in ((WEIGHTS, policy), (EMA_WEIGHTS, ema)):
        if module is None:
            continue
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in module.state_dict().items()}
        save_file(weights, str(staging / filename), metadata={"policy": policy.name, "step": str(step)})
        with open(staging / filename, "rb+") as handle:
            os.fsync(handle.fileno())
    config = dict(run_config)
    config["checkpoint"] = {
        "policy": policy.name,
        "task": task,
        "step": step,
        "spec": policy.spec.to_dict(),
        "dataset_refs": list(dataset_refs) if dataset_refs else None,
    }
    _write_file(staging / CONFIG, yaml.safe_dump(config, sort_keys=False))
    _write_file(staging / STATS, json.dumps(policy.stats.to_dict()))
    if trainer_state is not None:
        tensors, plain = _split_tensors(trainer_state)
        save_file(tensors, str(staging / TRAINER_TENSORS))
        with open(staging / TRAINER_TENSORS, "rb+") as handle:
            os.fsync(handle.fileno())
        _write_file(staging / TRAINER_JSON, json.dumps(plain))
    checksums = {path.name: sha256_of_file(path) for path in sorted(staging.iterdir())}
    _write_file(staging / CHECKSUMS, json.dumps(checksums, indent=1))
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


# Keys of the training recipe that lived under `train:` before policies declared their recipe.
LEGACY_RECIPE_KEYS = ("batch_size", "lr", "weight_decay", "warmup_steps", "grad_clip")


def read_run_config(directory: Path) -> dict[str, Any]:
    """A checkpoint's config.yaml in today's layout (older layouts are mapped, see the module docstring)."""
    path = Path(directory) / CONFIG
    try:
        config = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise CheckpointError(f"checkpoint {path} is not valid YAML: {error}") from error
    if not isinstance(config, dict) or not isinstance(config.get("policy"), dict):
        raise CheckpointError(f"checkpoint {path} lacks the policy config (key `policy`)")
    policy = config["policy"]
    if "recipe" not in policy:  # written before policies declared their recipe
        train = config.get("train") or {}
        # The trainer of that time: AdamW with torch's betas, warm-up then constant, no EMA (Recipe's defaults).
        recipe = json.loads(json.dumps(dataclasses.asdict(Recipe())))
        recipe.update({key: train.pop(key) for key in LEGACY_RECIPE_KEYS if key in train})
        policy["recipe"] = recipe
        inference = policy.setdefault("inference", {})
        if "target_return" in policy:
            inference["target_return"] = policy.pop("target_return")
        (config.get("eval") or {}).pop("target_returns", None)
    return config


def verify_checksums(directory: Path) -> None:
    """Every file listed in checksums.json has the sha256 recorded when it was written.

    A checkpoint written before checksums were recorded (no checksums.json) cannot be verified
    and is accepted as it is.
    """
    listing = Path(directory) / CHECKSUMS
    if not listing.is_file():
        return
    try:
        expected = json.loads(listing.read_text())
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {listing} is not valid JSON: {error}") from error
    for name, digest in expected.items():
        path = Path(directory) / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {CHECKSUMS})")
        if sha256_of_file(path) != digest:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its sha256 differs from the one recorded when it was written"
            )


def model_config(policy_config: dict[str, Any]) -> dict[str, Any]:
    """The part of a policy config that defines the model (what resuming must not change)."""
    return {key: value for key, value in policy_config.items() if key not in ("recipe", "inference")}


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu", use_ema: bool = True) -> LoadedCheckpoint:
    """Rebuild the policy from a checkpoint directory; refuses incomplete or inconsistent ones.

    The EMA weights (``ema.safetensors``) are loaded when present, unless ``use_ema=False``.
    """
    directory = resolve_checkpoint_dir(path)
    missing = [name for name in REQUIRED if not (directory / name).is_file()]
    if missing:
        raise CheckpointError(
            f"checkpoint {directory} is incomplete: missing {', '.join(missing)} "
            f"(a kinema checkpoint holds {', '.join(REQUIRED)})"
        )
    verify_checksums(directory)
    config = read_run_config(directory)
    block = config.get("checkpoint")
    for key in ("policy", "task", "spec", "step"):
        if not isinstance(block, dict) or key not in block:
            raise CheckpointError(f"checkpoint {directory / CONFIG} lacks the key checkpoint.{key}")
    try:
        stats = NormStats.from_dict(json.loads((directory / STATS).read_text()), source=str(directory / STATS))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"checkpoint {directory / STATS} is not valid JSON: {error}") from error
    spec = PolicySpec.from_dict(dict(block["spec"]), source=f"{directory / CONFIG} checkpoint.spec")
    policy = make_policy(config["policy"], spec, stats)
    weights_file = directory / (EMA_WEIGHTS if use_ema and (directory / EMA_WEIGHTS).is_file() else WEIGHTS)
    try:
        weights = load_file(str(weights_file))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"checkpoint weights {weights_file} cannot be read: {error}") from error
    expected = set(policy.state_dict())
    absent, unexpected = sorted(expected - set(weights)), sorted(set(weights) - expected)
    if absent or unexpected:
        raise CheckpointError(
            f"checkpoint weights {weights_file} do not match the {block['policy']!r} policy in its config: "
            f"missing keys {absent[:5]}{'...' if len(absent) > 5 else ''}, unexpected keys {unexpected[:5]}"
        )
    try:
        policy.load_state_dict(weights)
    except RuntimeError as error:  # shape mismatches
        raise CheckpointError(f"checkpoint weights {weights_file} do not fit the policy config: {error}") from error
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


def resumable_checkpoint(checkpoints_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest periodic checkpoint (step_XXXXXXXX) that is complete and verifies, and the newer ones
    that do not, each with the reason."""
    if not checkpoints_dir.is_dir():
        return None, []
    skipped = []
    for candidate in sorted((p for p in checkpoints_dir.glob("step_*") if p.is_dir()), reverse=True):
        missing = [name for name in (*REQUIRED, TRAINER_JSON, TRAINER_TENSORS) if not (candidate / name).is_file()]
        try:
            if missing:
                raise CheckpointError(f"checkpoint {candidate} is incomplete: missing {', '.join(missing)}")
            verify_checksums(candidate)
        except CheckpointError as error:
            skipped.append((candidate, str(error)))
            continue
        return candidate, skipped
    return None, skipped


def prune_checkpoints(checkpoints_dir: Path, keep: int) -> None:
    steps = sorted(p for p in checkpoints_dir.glob("step_*") if p.is_dir())
    for old in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(old, ignore_errors=True)
    for leftover in checkpoints_dir.glob(".step_*"):  # staging dirs of a killed run
        shutil.rmtree(leftover, ignore_errors=True)
