"""Resumable PPO (stable-baselines3) in a work directory: behaviour policies and ``kinema-rl`` share it.

A run lives in one directory:

- ``checkpoints/step_N.zip`` + ``step_N.vecnormalize.npz``: the full learner (SB3 zip with
  optimiser state, written and read only by this module) and VecNormalize's running statistics
  (plain npz, no pickle), written at every snapshot; the last two are kept. Running again loads
  the latest and continues with ``reset_num_timesteps=False``, so at most one snapshot interval
  of work is repeated after a ``kill -9``;
- ``state.json``: what the run is (``identity``: a changed one is refused, naming the key),
  progress, and the curve: one point per snapshot, made by the caller's ``on_snapshot``.

Snapshots are taken at rollout starts, when the policy has just been updated on everything
collected so far, every ``snapshot_every`` steps from step 0.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

# PPO's hyper-parameters (the networks are the caller's: behaviour policies and kinema-rl differ).
PPO_RECIPE: dict[str, Any] = {
    "n_envs": 8,
    "n_steps": 512,
    "batch_size": 256,
    "n_epochs": 10,
    "learning_rate": 3e-4,
    "gamma": 0.99,
    "gae_lambda": 0.95,
    "clip_range": 0.2,
    "normalize_observations": True,
    "normalize_rewards": True,
}
CHECKPOINTS_KEPT = 2
STATE_FILE = "state.json"


class PPORunError(ValueError):
    """A work directory that cannot be resumed as asked (user-fixable: named path and key)."""


def rollout_size(recipe: dict[str, Any]) -> int:
    return int(recipe["n_envs"]) * int(recipe["n_steps"])


def require_whole_rollouts(snapshot_every: int, recipe: dict[str, Any], key: str = "snapshot_every") -> None:
    """Snapshots fall on rollout boundaries: the interval must be a whole number of rollouts."""
    if snapshot_every % rollout_size(recipe):
        raise PPORunError(f"{key} must be a multiple of {rollout_size(recipe)} (one PPO rollout: {recipe['n_envs']} "
                          f"environments x {recipe['n_steps']} steps), got {snapshot_every}")


def atomic_write(path: Path, write: Callable[[Path], Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(temporary)
    os.replace(temporary, path)


def read_state(work_dir: Path) -> dict[str, Any] | None:
    path = work_dir / STATE_FILE
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise PPORunError(f"{path}: training state is not valid JSON ({error}); delete {work_dir} to start over") from error


def write_state(work_dir: Path, state: dict[str, Any]) -> None:
    atomic_write(work_dir / STATE_FILE, lambda p: p.write_text(json.dumps(state, indent=1) + "\n"))


def make_training_env(spec: Any, seed: int, recipe: dict[str, Any], randomization: Any = None) -> Any:
    """``n_envs`` DummyVecEnv copies of the task under VecNormalize (observations and rewards); with a
    ``randomization`` profile (``kinema.envs.randomization``) each copy varies its dynamics every episode."""
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from kinema.envs import make_env

    vec_env = make_vec_env(lambda: make_env(spec, randomization=randomization), n_envs=recipe["n_envs"], seed=seed,
                           vec_env_cls=DummyVecEnv)
    return VecNormalize(vec_env, norm_obs=recipe["normalize_observations"], norm_reward=recipe["normalize_rewards"],
                        gamma=recipe["gamma"])


def new_ppo(vec_env: Any, seed: int, recipe: dict[str, Any], policy: Any = "MlpPolicy", policy_kwargs: dict | None = None) -> Any:
    """A PPO learner with the recipe's hyper-parameters; ``policy`` and ``policy_kwargs`` pick the networks."""
    from stable_baselines3 import PPO

    return PPO(
        policy, vec_env, n_steps=recipe["n_steps"], batch_size=recipe["batch_size"], n_epochs=recipe["n_epochs"],
        learning_rate=recipe["learning_rate"], gamma=recipe["gamma"], gae_lambda=recipe["gae_lambda"],
        clip_range=recipe["clip_range"], seed=seed, device="cpu", verbose=0, policy_kwargs=policy_kwargs or {},
    )


def save_vecnormalize(vec_normalize: Any, path: Path) -> None:
    arrays = {
        "obs_mean": vec_normalize.obs_rms.mean, "obs_var": vec_normalize.obs_rms.var,
        "obs_count": np.float64(vec_normalize.obs_rms.count),
        "ret_mean": np.asarray(vec_normalize.ret_rms.mean), "ret_var": np.asarray(vec_normalize.ret_rms.var),
        "ret_count": np.float64(vec_normalize.ret_rms.count),
    }

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as handle:
            np.savez(handle, **arrays)

    atomic_write(path, write)


def load_vecnormalize(vec_normalize: Any, path: Path) -> None:
    with np.load(path, allow_pickle=False) as stats:
        vec_normalize.obs_rms.mean = stats["obs_mean"].copy()
        vec_normalize.obs_rms.var = stats["obs_var"].copy()
        vec_normalize.obs_rms.count = float(stats["obs_count"])
        vec_normalize.ret_rms.mean = stats["ret_mean"].copy()
        vec_normalize.ret_rms.var = stats["ret_var"].copy()
        vec_normalize.ret_rms.count = float(stats["ret_count"])


def _prune_checkpoints(directory: Path) -> None:
    zips = sorted(directory.glob("step_*.zip"))
    for old in zips[:-CHECKPOINTS_KEPT]:
        old.unlink(missing_ok=True)
        Path(str(old)[: -len(".zip")] + ".vecnormalize.npz").unlink(missing_ok=True)


def open_run(work_dir: Path, identity: dict[str, Any]) -> dict[str, Any]:
    """The run's state: new, or the saved one when ``identity`` matches it (else refused, naming the key)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    state = read_state(work_dir)
    if state is None:
        return {**identity, "num_timesteps": 0, "wall_time_s": 0.0, "checkpoint": None, "curve": [], "finished": None}
    for key, value in identity.items():
        if state.get(key) != json.loads(json.dumps(value)):
            raise PPORunError(
                f"{work_dir / STATE_FILE}: existing training has {key}={state.get(key)!r}, this request has {value!r}; "
                f"use another work directory or delete {work_dir} to start over"
            )
    return state


def run_ppo(
    work_dir: Path,
    state: dict[str, Any],
    total_steps: int,
    snapshot_every: int,
    build: Callable[[], tuple[Any, Any]],
    on_snapshot: Callable[[Any, Any, int, float], dict[str, Any]],
    should_stop: Callable[[list[dict[str, Any]]], bool] = lambda curve: False,
    log: Callable[[str], Any] = print,
    progress: Any = None,
) -> dict[str, Any]:
    """Train (or resume) until ``total_steps`` or ``should_stop(curve)``; returns the final state.

    ``build()`` returns a new ``(model, vec_env)``; on resume the model is replaced by the saved
    learner and the VecNormalize statistics are restored. ``on_snapshot(model, vec_env, steps,
    wall_time_s)`` exports and evaluates the current policy and returns its curve point (steps,
    wall time and the mean return of the last 100 training episodes are added here).
    ``progress``, when given, is called with each curve point once its checkpoint is written.
    """
    from stable_baselines3 import PPO
    from stable_baselines3.common.callbacks import BaseCallback

    require_whole_rollouts(snapshot_every, state["recipe"])
    state["total_steps"] = total_steps
    if should_stop(state["curve"]) or state["num_timesteps"] >= total_steps:
        state["finished"] = state.get("finished") or "total_steps"
        write_state(work_dir, state)
        return state
    state["finished"] = None
    model, vec_env = build()
    if state["checkpoint"] is not None:
        checkpoint = work_dir / state["checkpoint"]
        # Our own file, written below into this run's directory (SB3's zip holds pickled parts).
        # custom_objects: the policy class of this code, not a copy pickled into the zip.
        model = PPO.load(str(checkpoint) + ".zip", env=vec_env, device="cpu", custom_objects={"policy_class": model.policy_class})
        load_vecnormalize(vec_env, Path(str(checkpoint) + ".vecnormalize.npz"))
        log(f"resuming from {checkpoint.name} at {model.num_timesteps} steps")
    session_start, wall_before = time.perf_counter(), float(state["wall_time_s"])

    def snapshot(current: Any) -> bool:
        steps = int(current.num_timesteps)
        wall = wall_before + time.perf_counter() - session_start
        train_returns = [info["r"] for info in current.ep_info_buffer] if current.ep_info_buffer else []
        point = {"steps": steps, "wall_time_s": round(wall, 1),
                 "train_return_mean": round(float(np.mean(train_returns)), 1) if train_returns else None,
                 **on_snapshot(current, vec_env, steps, wall)}
        name = f"checkpoints/step_{steps:09d}"
        (work_dir / "checkpoints").mkdir(exist_ok=True)
        atomic_write(Path(str(work_dir / name) + ".zip"), lambda p: current.save(str(p)))
        save_vecnormalize(vec_env, work_dir / (name + ".vecnormalize.npz"))
        state["curve"] = [p for p in state["curve"] if p["steps"] < steps] + [point]
        state.update(num_timesteps=steps, wall_time_s=round(wall, 1), checkpoint=name)
        write_state(work_dir, state)
        _prune_checkpoints(work_dir / "checkpoints")
        if progress is not None:
            progress(point)
        return should_stop(state["curve"])

    class SnapshotCallback(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.stop = False
            done = [p["steps"] for p in state["curve"]]
            self.next_snapshot = (max(done) // snapshot_every + 1) * snapshot_every if done else 0

        def _on_rollout_start(self) -> None:
            if self.num_timesteps >= self.next_snapshot:
                self.stop = snapshot(self.model)
                self.next_snapshot = (self.num_timesteps // snapshot_every + 1) * snapshot_every

        def _on_step(self) -> bool:
            return not self.stop

    callback = SnapshotCallback()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # PPO's small networks: one thread is faster on a shared 2-core machine
    try:
        model.learn(total_timesteps=total_steps - int(model.num_timesteps), callback=callback, reset_num_timesteps=False)
        if callback.stop:
            state["finished"] = "stop_at_return"
        else:
            if not state["curve"] or state["curve"][-1]["steps"] < model.num_timesteps:
                snapshot(model)
            state["finished"] = "total_steps"
    finally:
        torch.set_num_threads(threads_before)
        vec_env.close()
    write_state(work_dir, state)
    return state
