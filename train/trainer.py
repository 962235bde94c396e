"""The training loop every policy family shares: sampler → policy.loss → optimiser → checkpoint.

Resumable: a periodic checkpoint carries the optimiser, scheduler, RNG and sampler state,
and running the same command with the same run directory continues from the newest one.
Runs unchanged under `torchrun` (DDP): each rank samples its own shard of episodes,
gradients are averaged, and only rank 0 logs, evaluates and writes files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from torch import nn
from tqdm import tqdm

from kinema.datasets import make_sampler
from kinema.datasets.suite import sha256_of_file
from kinema.envs import task_spaces
from kinema.envs.structure import task_structure
from kinema.policies import NormStats, Policy, PolicySpec, make_policy, policy_class, policy_config
from kinema.train.checkpoint import (
    EMA_WEIGHTS,
    WEIGHTS,
    CheckpointError,
    load_trainer_state,
    model_config,
    prune_checkpoints,
    read_run_config,
    resumable_checkpoint,
    save_checkpoint,
)
from kinema.train.recipe import make_ema, make_optimizer, make_scheduler
from kinema.train.config import TARGET_RETURN_MODES, check_run_config
from kinema.train.data import ResolvedDataset, resolve_dataset
from kinema.train.evaluation import run_evaluation
from kinema.train.metrics import RunLogger, plot_learning_curve

EVAL_JSON = "eval.json"
# Keys that must match for a run directory to be resumed (the policy's model part and its
# recipe are checked separately); anything else (e.g. train.steps) may change.
RESUME_KEYS = ("dataset", "env", "seed")


@dataclass
class Distributed:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Distributed:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Distributed()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Distributed(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def select_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} was requested but CUDA is not available on this machine; use device=cpu")
    return device


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def policy_spec(task: Any, policy_cfg: dict[str, Any] | None = None) -> PolicySpec:
    """Shapes and limits of the task, and the task structure the policy's family needs."""
    obs_dim, act_dim, low, high = task_spaces(task)
    structure: dict[str, Any] = {}
    if policy_cfg is not None:
        needs = policy_class(str(policy_cfg.get("name"))).required_structure
        if needs:
            structure = task_structure(needs, task, obs_dim, act_dim, {name: policy_cfg.get(name) for name in needs})
    return PolicySpec(obs_dim, act_dim, tuple(low), tuple(high), task.max_episode_steps, structure)


def eval_conditioning(policy: Policy, cfg: dict[str, Any], task: Any, data: ResolvedDataset | None) -> dict[str, Any]:
    """What ``policy.reset`` is handed at evaluation: only the conditioning its family declares.

    Target return (``eval.target_return``), for families that take one: ``dataset_max`` (also
    what null means) conditions on the best episode return in the training data: a target far
    above anything in the data puts the return tokens out of distribution, and the DT paper's
    per-task targets were set for D4RL's SAC data, not for every dataset. ``task`` takes the
    task's ``target_return`` (those paper values, for D4RL's own files); a number is used as
    it is. A family without a target return refuses an explicit one.
    """
    target = cfg["eval"].get("target_return")
    if "target_return" not in policy.conditioning:
        if target not in (None, "dataset_max"):
            raise ValueError(
                f"eval.target_return={target!r}, but the {policy.name!r} policy takes no target return "
                f"(its reset conditioning: {list(policy.conditioning) or 'none'}); leave eval.target_return unset"
            )
        return {}
    if target is None:
        target = "dataset_max"
    if target == "task":
        target = task.target_return
        if target is None:
            raise ValueError(f"eval.target_return=task, but task {task.name!r} has no target return; pass a number")
    if target == "dataset_max":
        if data is None:
            raise ValueError(
                "eval.target_return=dataset_max needs the training data; pass a number "
                "(a checkpoint's config.yaml records the target it was trained and evaluated with)"
            )
        target = float(np.max(data.dataset.episode_returns))
    try:
        value = float(target)
    except (TypeError, ValueError):
        raise ValueError(
            f"eval.target_return must be a finite number or one of {TARGET_RETURN_MODES}, got {target!r}"
        ) from None
    if not math.isfinite(value):
        raise ValueError(f"eval.target_return must be finite, got {target!r}")
    return {"target_return": value}


def eval_trials(policy: Policy, eval_cfg: dict[str, Any]) -> int:
    """``eval.trials``, or the family's default (the Agentic Transformer plays 4 per context)."""
    trials = eval_cfg.get("trials")
    return policy.default_trials if trials is None else int(trials)


class _LossModule(nn.Module):
    """DDP hooks gradients through forward(); this routes forward to policy.loss."""

    def __init__(self, policy: Policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        return self.policy.loss(batch)


EVALUATIONS_DURING_TRAINING = 4  # eval.every=null: the learning curve gets this many points besides the final one


def evaluation_interval(every: Any, total_steps: int) -> int:
    """Steps between evaluations during training: ``eval.every``, or with null a few spread over the run."""
    if every is None:
        return max(1, total_steps // (EVALUATIONS_DURING_TRAINING + 1)) if total_steps > 0 else 0
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        raise ValueError(f"eval.every must be an integer >= 0 (0 = only at the end) or null, got {every!r}")
    return every


def _check_resumable(saved: dict[str, Any], current: dict[str, Any], path: Path, spec: PolicySpec) -> None:
    # The task structure (a body graph) decides which input feeds which weight: derived or given, it must not change.
    saved_structure = ((saved.get("checkpoint") or {}).get("spec") or {}).get("structure") or {}
    current_structure = json.loads(json.dumps(spec.structure))
    if saved_structure != current_structure:
        changed = sorted(k for k in set(saved_structure) | set(current_structure) if saved_structure.get(k) != current_structure.get(k))
        raise ValueError(
            f"the run directory's checkpoint {path} was trained with another task structure ({', '.join(changed)}: "
            "a changed layout file or task model); resume with the same one or choose a new hydra.run.dir"
        )
    for key in RESUME_KEYS:
        if saved.get(key) != current.get(key):
            raise ValueError(
                f"the run directory's checkpoint {path} was trained with a different `{key}` "
                f"({saved.get(key)!r}, now {current.get(key)!r}); resume with the same configuration "
                "or choose a new hydra.run.dir"
            )
    saved_model, current_model = model_config(saved["policy"]), model_config(current["policy"])
    if saved_model != current_model:
        changed = sorted(k for k in set(saved_model) | set(current_model) if saved_model.get(k) != current_model.get(k))
        raise ValueError(
            f"the run directory's checkpoint {path} holds a different model (policy.{', policy.'.join(changed)} changed); "
            "resume with the same model or choose a new hydra.run.dir"
        )
    saved_data, current_data = saved.get("dataset_sha256"), current.get("dataset_sha256")
    if saved_data is not None and saved_data != current_data:
        raise ValueError(
            f"the dataset changed since the run in {path.parent.parent} started: {current['dataset_file']} has sha256 "
            f"{current_data[:12]}..., the run trained on {saved_data[:12]}...; restore that file or choose a new hydra.run.dir"
        )
    # A changed recipe would silently mix two optimisers' states: refused, naming the fields.
    saved_recipe, current_recipe = saved["policy"].get("recipe", {}), current["policy"].get("recipe", {})
    changed = sorted(k for k in set(saved_recipe) | set(current_recipe) if saved_recipe.get(k) != current_recipe.get(k))
    if changed:
        raise ValueError(
            f"the run directory's checkpoint {path} was trained with a different recipe "
            f"(policy.recipe.{', policy.recipe.'.join(changed)}); resume with the same recipe or choose a new hydra.run.dir"
        )


def run_training(cfg: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """Train (or resume) and evaluate; returns the final evaluation on rank 0."""
    check_run_config(cfg)  # every value, before any work
    policy_config(cfg["policy"])
    train_cfg, eval_cfg = cfg["train"], cfg["eval"]
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg["threads"]))
    world = setup_distributed(torch.device("cuda" if torch.cuda.is_available() and cfg["device"] != "cpu" else "cpu"))
    device = select_device(str(cfg["device"]), world.local_rank)
    if world.world_size > 1:
        # Each rank's Hydra picked its own run directory; all must use rank 0's to resume together.
        shared = [str(run_dir)]
        dist.broadcast_object_list(shared, src=0)
        run_dir = Path(shared[0])
    lock = _lock_run_directory(run_dir, world)
    try:
        return _train(cfg, run_dir, world, device)
    finally:
        if lock is not None:
            lock.release()


RUN_LOCK = ".kinema-train.lock"


def _lock_run_directory(run_dir: Path, world: Distributed) -> FileLock | None:
    """One run per run directory: rank 0 holds an exclusive lock for the life of the run.

    The lock is an OS file lock (filelock), released by the kernel when its process dies, so
    a run killed with -9 never blocks its own resume.
    """
    lock, error = None, None
    if world.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(run_dir / RUN_LOCK))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            lock, error = None, (
                f"run directory {run_dir} is in use by another kinema-train (it holds {run_dir / RUN_LOCK}); "
                "wait for that run to finish or choose another hydra.run.dir"
            )
    if world.world_size > 1:
        shared = [error]
        dist.broadcast_object_list(shared, src=0)
        error = shared[0]
    if error:
        raise ValueError(error)
    return lock


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT arrived; the current step was checkpointed before stopping."""

    def __init__(self, signal_number: int, step: int, run_dir: Path):
        self.signal_number, self.step, self.run_dir = signal_number, step, run_dir
        name = signal.Signals(signal_number).name
        super().__init__(
            f"stopped by {name} at step {step}; a checkpoint of that step is in {run_dir / 'checkpoints'}. "
            f"Resume with the same command and hydra.run.dir={run_dir}"
        )


class _StopSignals:
    """Turns SIGTERM (SLURM preemption) and SIGINT (Ctrl-C) into a request the loop honours between steps."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, world: Distributed):
        self.world = world
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handle(self, number: int, frame: Any) -> None:
        if self.received is not None:  # asked twice (a second Ctrl-C): stop now, without the checkpoint
            self.__exit__()
            raise KeyboardInterrupt
        self.received = number

    def requested(self) -> int | None:
        """The signal to stop for, agreed by every rank (they must checkpoint the same step)."""
        if self.world.world_size == 1:
            return self.received
        # NCCL reduces device tensors only; gloo, CPU ones. One int per step, against a training step.
        device = f"cuda:{self.world.local_rank}" if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([self.received or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None


def dataset_fingerprint(path: Path) -> str:
    """sha256 of a dataset file, or of the HDF5 files of a Minari dataset directory."""
    if path.is_file():
        return sha256_of_file(path)
    digest = hashlib.sha256()
    for file in sorted(path.rglob("*.hdf5")):
        digest.update(f"{file.relative_to(path)}:{sha256_of_file(file)}".encode())
    return digest.hexdigest()


def _train(cfg: dict[str, Any], run_dir: Path, world: Distributed, device: torch.device) -> dict[str, Any] | None:
    train_cfg, eval_cfg = cfg["train"], cfg["eval"]
    seed_everything(int(cfg["seed"]) + world.rank)

    data = resolve_dataset(cfg["dataset"], cfg.get("env"))
    fingerprint = [dataset_fingerprint(data.path) if world.is_main else None]
    if world.world_size > 1:
        dist.broadcast_object_list(fingerprint, src=0)  # read once, not once per rank
    cfg = {**cfg, "dataset_file": str(data.path), "dataset_sha256": fingerprint[0]}
    task = data.task
    family = policy_class(str(cfg["policy"].get("name")))
    if not family.trains_offline:
        raise ValueError(f"policy={family.name} is not trained by kinema-train; {family.offline_hint}")
    spec = policy_spec(task, cfg["policy"])
    stats = NormStats(data.dataset.statistics(), source=f"statistics of {data.path}")
    policy = make_policy(cfg["policy"], spec, stats).to(device)
    # The resolved config (every recipe and inference field) is what checkpoints record.
    cfg = {**cfg, "policy": {"name": policy.name, **json.loads(json.dumps(dataclasses.asdict(policy.config)))}}
    recipe = policy.config.recipe
    batch_spec = policy.batch_spec
    sampler = make_sampler(
        data.dataset,
        batch_spec.kind,
        batch_size=recipe.batch_size,
        context_len=batch_spec.context_len,
        seed=int(cfg["seed"]),
        rank=world.rank,
        world_size=world.world_size,
        device=str(device),
        **batch_spec.options,
    )
    optimizer = make_optimizer(policy, recipe)
    ema = make_ema(policy, recipe)

    checkpoints_dir = run_dir / "checkpoints"
    step = 0
    # The cosine schedule's horizon is fixed at the first start; resuming with more steps keeps it.
    schedule_horizon = recipe.schedule_steps or int(train_cfg["steps"])
    resume_from, skipped = resumable_checkpoint(checkpoints_dir)
    if skipped and world.is_main:
        for path, reason in skipped:
            # Renamed out of the step_* series, so pruning never keeps it in place of a good one.
            kept = path.with_name(f"unusable-{path.name}")
            os.replace(path, kept)
            tqdm.write(f"kinema-train: skipping a periodic checkpoint: {reason}; moved to {kept}")
    if skipped and world.world_size > 1:
        dist.barrier()  # rank 0 has moved them before anyone reads the directory again
    if skipped and resume_from is None:
        raise CheckpointError(
            f"no periodic checkpoint in {checkpoints_dir} can be resumed (see above); "
            f"move {checkpoints_dir} away to start the run over"
        )
    state = None
    if resume_from is not None:
        _check_resumable(read_run_config(resume_from), cfg, resume_from, spec)
        state = load_trainer_state(resume_from)
        if state is None:
            raise ValueError(f"checkpoint {resume_from} has no trainer state to resume from")
        schedule_horizon = int(state.get("schedule_horizon", schedule_horizon))
    scheduler = make_scheduler(optimizer, recipe, schedule_horizon)
    if state is not None:
        from safetensors.torch import load_file

        policy.load_state_dict(load_file(str(resume_from / WEIGHTS)))
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if ema is not None:
            ema.module.load_state_dict(load_file(str(resume_from / EMA_WEIGHTS)))
            ema.n_averaged.fill_(int(state["ema_updates"]))
        if len(state["samplers"]) != world.world_size:
            raise ValueError(
                f"checkpoint {resume_from} was written by {len(state['samplers'])} training process(es); "
                f"resume it with the same number (now {world.world_size}) so every rank keeps its data shard"
            )
        sampler.load_state_dict(state["samplers"][world.rank])
        if "rng_per_rank" in state:
            _set_rng_state(state["rng_per_rank"][world.rank], device)
        else:  # written before each rank's RNG was saved: rank 0's CPU stream for every rank
            torch.set_rng_state(state["torch_rng"])
        step = int(state["step"])
        if world.is_main:
            tqdm.write(f"kinema-train: resuming {run_dir} from step {step} ({resume_from.name})")
            if recipe.schedule == "cosine" and schedule_horizon != int(train_cfg["steps"]):
                tqdm.write(
                    f"kinema-train: the cosine schedule keeps its horizon of {schedule_horizon} steps from the first start; "
                    f"steps past it stay at the floor learning rate (set policy.recipe.schedule_steps in a new run to change it)"
                )

    model: nn.Module = _LossModule(policy)
    if world.world_size > 1:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    conditioning = eval_conditioning(policy, cfg, task, data)
    # Checkpoints record the resolved target and trials, so kinema-eval replays them without the data.
    eval_cfg = {**eval_cfg, "target_return": conditioning.get("target_return"), "trials": eval_trials(policy, eval_cfg)}
    cfg = {**cfg, "eval": eval_cfg}
    logger = RunLogger(run_dir, resume_step=step if resume_from else None) if world.is_main else None
    total_steps = int(train_cfg["steps"])
    grad_clip = recipe.grad_clip
    log_every, checkpoint_every = int(train_cfg["log_every"]), int(train_cfg["checkpoint_every"])
    eval_every = evaluation_interval(eval_cfg.get("every"), total_steps)
    evaluated = ema.module if ema is not None else policy  # the EMA weights, when the recipe keeps them

    def trainer_state() -> dict[str, Any]:
        # Every rank's own sampler and RNG streams (dropout masks differ per rank), gathered for rank 0 to save.
        per_rank = [{"sampler": sampler.state_dict(), "rng": _rng_state(device)}]
        if world.world_size > 1:
            per_rank = [None] * world.world_size
            dist.all_gather_object(per_rank, {"sampler": sampler.state_dict(), "rng": _rng_state(device)})
        return {
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "samplers": [entry["sampler"] for entry in per_rank],
            "rng_per_rank": [entry["rng"] for entry in per_rank],
            "schedule_horizon": schedule_horizon,
            **({"ema_updates": int(ema.n_averaged)} if ema is not None else {}),  # its weights: ema.safetensors
        }

    def checkpoint() -> None:
        state = trainer_state()  # collective under DDP: every rank takes part
        if world.is_main:
            save_checkpoint(
                checkpoints_dir / f"step_{step:08d}", policy, cfg, task.name, step, data.reference_returns, state,
                ema=evaluated if ema is not None else None,
            )
            prune_checkpoints(checkpoints_dir, int(train_cfg["keep_checkpoints"]))

    def run_eval(episodes: int) -> dict[str, Any]:
        evaluated.eval()
        result = run_evaluation(evaluated, task.name, {**eval_cfg, "episodes": episodes}, conditioning, data.reference_returns)
        policy.train()
        return result

    policy.train()
    progress = tqdm(
        total=total_steps, initial=step, desc=f"train {policy.name} on {data.name}", disable=not world.is_main,
        mininterval=1.0, dynamic_ncols=True,
    )
    window_start, window_steps, running = time.perf_counter(), 0, {}
    with _StopSignals(world) as stop:
        while step < total_steps:
            batch = sampler.sample()
            loss, metrics = model(batch)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"training loss became {loss.item()} at step {step}; lower train.lr or check the dataset")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), float(grad_clip) if grad_clip else math.inf)
            optimizer.step()
            scheduler.step()
            if ema is not None:
                ema.update_parameters(policy)
            step += 1
            window_steps += 1
            for key, value in {"loss": loss.item(), "grad_norm": grad_norm.item(), **metrics}.items():
                running[key] = running.get(key, 0.0) + float(value)
            progress.update(1)

            if logger and (step % log_every == 0 or step == total_steps):
                elapsed = time.perf_counter() - window_start
                row = {f"train/{k}": v / window_steps for k, v in running.items()}
                row["train/lr"] = scheduler.get_last_lr()[0]
                row["train/steps_per_s"] = window_steps / max(elapsed, 1e-9)
                logger.log(step, row)
                progress.set_postfix(loss=f"{row['train/loss']:.4f}")
                window_start, window_steps, running = time.perf_counter(), 0, {}
            if eval_every and step % eval_every == 0 and step < total_steps and world.is_main:
                result = run_eval(int(eval_cfg.get("episodes_during_training") or eval_cfg["episodes"]))
                logger.log(step, _eval_row(result))
                tqdm.write(f"step {step}: {_describe(result)}")
            if step % checkpoint_every == 0 and step < total_steps:
                checkpoint()
            received = stop.requested()
            if received:
                checkpoint()  # this very step: nothing since the last periodic checkpoint is lost
                progress.close()
                if logger:
                    logger.close()
                raise TrainingInterrupted(received, step, run_dir)
    progress.close()

    checkpoint()
    rank_checksums = _gather_parameter_checksums(policy, world)
    if not world.is_main:
        dist.barrier()
        dist.destroy_process_group()
        return None
    final_dir = save_checkpoint(
        run_dir / "checkpoint", policy, cfg, task.name, step, data.reference_returns, ema=evaluated if ema is not None else None
    )
    result = run_eval(int(eval_cfg["episodes"]))
    result.update(
        {"task": task.name, "dataset": data.name, "dataset_path": str(data.path), "policy": policy.name,
         "step": step, "seed": int(cfg["seed"]), "checkpoint": str(final_dir), **conditioning}
    )
    if world.world_size > 1:
        result["ddp"] = {"world_size": world.world_size, "parameter_sha256_per_rank": rank_checksums}
    logger.log(step, _eval_row(result))
    logger.close()
    write_json(run_dir / EVAL_JSON, result)
    plot_learning_curve(run_dir, f"{policy.name} on {data.name} (seed {cfg['seed']})")
    if world.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
        if len(set(rank_checksums)) != 1:
            raise RuntimeError(f"DDP ranks ended with different parameters: {rank_checksums}")
    return result


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def _gather_parameter_checksums(policy: Policy, world: Distributed) -> list[str]:
    """sha256 of every rank's parameters: DDP must leave them bit-identical."""
    digest = hashlib.sha256()
    for tensor in policy.state_dict().values():
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    if world.world_size == 1:
        return [digest.hexdigest()]
    gathered: list[Any] = [None] * world.world_size
    dist.all_gather_object(gathered, digest.hexdigest())
    return gathered


def _eval_row(result: dict[str, Any]) -> dict[str, Any]:
    keys = ("return_mean", "return_std", "normalized_score_mean", "normalized_score_std")
    return {f"eval/{k}": result.get(k) for k in keys}


def _describe(result: dict[str, Any]) -> str:
    text = f"return {result['return_mean']:.1f} ± {result['return_std']:.1f} over {result['episodes']} episodes"
    if result.get("normalized_score_mean") is not None:
        text += (
            f", normalised score {result['normalized_score_mean']:.1f} ± {result['normalized_score_std']:.1f}"
            f" ({result.get('reference_source')} references)"
        )
    trials = result.get("trials")
    if trials and trials.get("last_trial_score_mean") is not None:
        text += (
            f"; over {trials['trials']} trials per context: first {trials['first_trial_score_mean']:.1f}, "
            f"last {trials['last_trial_score_mean']:.1f}, best-of-{trials['trials']} {trials['best_of_n_score_mean']:.1f}"
        )
    return text


def write_json(path: Path, value: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(value, indent=2))
    os.replace(temporary, path)
