"""Behaviour policies: PPO training with resumable checkpoints, and pickle-free actor snapshots.

Training (``train_behaviour``) follows the recipe measured in BENCHMARKS.md: PPO with 8
DummyVecEnv environments under VecNormalize, n_steps 512, batch 256, 10 epochs, lr 3e-4,
gamma 0.99, GAE 0.95, clip 0.2, 256×256 tanh networks, log_std_init −1, one torch thread.
Its working state lives outside the repository (``$KINEMA_BEHAVIOUR``, default
``~/.cache/kinema/behaviour/<task>``):

- ``checkpoints/step_N.zip`` + ``step_N.vecnormalize.npz``: the full learner (SB3 zip with
  optimiser state) and VecNormalize's running statistics, written every snapshot; the
  last two are kept. Rerunning the same command loads the latest and continues with
  ``reset_num_timesteps=False``, so timesteps continue rather than restart.
- ``snapshots/step_N.safetensors`` + ``step_N.json``: the actor alone, every
  ``snapshot_every`` steps from step 0 — what medium-replay is rolled out from and what
  gets committed. Weights are stored as float16 (half the size; the policy's behaviour
  does not depend on the last bits) and computed in float32; the observation statistics
  (float64) sit in the JSON. No pickle anywhere in a snapshot.
- ``state.json``: progress, the recipe, and the training curve (per snapshot: steps, wall
  time, mean return of the last 100 training episodes, evaluation return of the exported
  snapshot).

Every snapshot is evaluated as it will be used for collection: loaded back from its
files, actions sampled from the Gaussian (not its mean), a few episodes on fixed seeds.
``export_for_suite`` then picks the expert (best re-evaluated snapshot), medium (the
earlier snapshot closest to a third of the expert's return) and copies those plus every
snapshot before medium into ``datasets/behaviour_policies/<task>/``.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from kinema.envs import TaskSpec, get_task

from kinema.train.ppo import (
    PPO_RECIPE, PPORunError, atomic_write, make_training_env, new_ppo, open_run, read_state, require_whole_rollouts, run_ppo,
)

from .collect import episode_returns, require_matching_spaces
from .errors import DatasetError

SNAPSHOT_FORMAT = "kinema-behaviour-actor/1"
COMMITTED_POLICIES_DIR = Path(__file__).resolve().parent / "behaviour_policies"
POLICIES_MANIFEST = "policies.json"

# The behaviour policies' networks: 256x256 tanh, log_std_init -1; with PPO_RECIPE, what policies.json records.
BEHAVIOUR_NETWORK: dict[str, Any] = {"net_arch": [256, 256], "activation": "tanh", "log_std_init": -1.0}
BEHAVIOUR_RECIPE: dict[str, Any] = {**PPO_RECIPE, **BEHAVIOUR_NETWORK}
# Snapshot spacing: 5 PPO updates (5 × 8 × 512 steps).
DEFAULT_SNAPSHOT_EVERY = 20_480
SNAPSHOT_EVAL_EPISODES = 5
SELECTION_EVAL_EPISODES = 50
EVAL_SEED = 10_000
STOP_WINDOW = 3


def behaviour_work_dir(task: str | TaskSpec) -> Path:
    """Where training state for ``task`` lives: $KINEMA_BEHAVIOUR/<task> or ~/.cache/kinema/behaviour/<task>."""
    root = os.environ.get("KINEMA_BEHAVIOUR") or Path.home() / ".cache" / "kinema" / "behaviour"
    return Path(root) / get_task(task).name


# ---------------------------------------------------------------------------------------
# The actor, rebuilt in plain torch from a snapshot
# ---------------------------------------------------------------------------------------


class GaussianActor:
    """PPO's policy: Gaussian over actions, mean from an MLP on normalised observations.

    The standard deviation is state-independent (``log_std``), as in SB3's PPO. Actions
    for a dataset are sampled (``stochastic=True``), like the behaviour data an on-policy
    learner produces and like D4RL's stochastic SAC behaviour; the noise comes from the
    collector's numpy generator, so collection is deterministic given its seed.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], info: dict[str, Any], stochastic: bool = True):
        self.info = info
        self.stochastic = stochastic
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        index = 0
        while f"hidden.{index}.weight" in tensors:
            self.layers.append((tensors[f"hidden.{index}.weight"].float(), tensors[f"hidden.{index}.bias"].float()))
            index += 1
        self.mean_weight = tensors["mean.weight"].float()
        self.mean_bias = tensors["mean.bias"].float()
        self.std = np.exp(tensors["log_std"].double().numpy())
        self.obs_mean = np.asarray(info["obs_mean"], dtype=np.float64)
        self.obs_var = np.asarray(info["obs_var"], dtype=np.float64)
        self.obs_clip = float(info["obs_clip"])
        self.obs_epsilon = float(info["obs_epsilon"])
        self.action_low = np.asarray(info["action_low"], dtype=np.float64)
        self.action_high = np.asarray(info["action_high"], dtype=np.float64)

    @property
    def obs_dim(self) -> int:
        return len(self.obs_mean)

    @property
    def act_dim(self) -> int:
        return len(self.mean_bias)

    def mean_action(self, observations: np.ndarray) -> np.ndarray:
        # VecNormalize's transform, in float64 like SB3, then the float32 network.
        normalised = np.clip((observations - self.obs_mean) / np.sqrt(self.obs_var + self.obs_epsilon), -self.obs_clip, self.obs_clip)
        hidden = torch.from_numpy(normalised.astype(np.float32))
        with torch.no_grad():
            for weight, bias in self.layers:
                hidden = torch.tanh(torch.nn.functional.linear(hidden, weight, bias))
            mean = torch.nn.functional.linear(hidden, self.mean_weight, self.mean_bias)
        return mean.numpy().astype(np.float64)

    def act(self, observations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        actions = self.mean_action(np.asarray(observations, dtype=np.float64))
        if self.stochastic:
            actions = actions + self.std * rng.standard_normal(actions.shape)
        return np.clip(actions, self.action_low, self.action_high)

    def describe(self) -> dict[str, Any]:
        return {
            "algorithm": self.info["algorithm"],
            "training_steps": int(self.info["training_steps"]),
            "training_seed": int(self.info["training_seed"]),
            "actions": "sampled" if self.stochastic else "mean",
        }


def snapshot_paths(prefix: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, info) files of the snapshot named ``prefix`` (no suffix)."""
    prefix = Path(prefix)
    return prefix.with_name(prefix.name + ".safetensors"), prefix.with_name(prefix.name + ".json")


REQUIRED_INFO_KEYS = (
    "format", "algorithm", "task", "training_steps", "training_seed", "obs_mean", "obs_var",
    "obs_clip", "obs_epsilon", "action_low", "action_high",
)


def load_actor(prefix: str | os.PathLike, stochastic: bool = True) -> GaussianActor:
    """Load a snapshot written by ``save_actor`` (``prefix`` + .safetensors / .json)."""
    weights_path, info_path = snapshot_paths(prefix)
    for path in (weights_path, info_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: behaviour-policy snapshot file not found")
    try:
        info = json.loads(info_path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{info_path}: not valid JSON ({error})") from error
    missing = [key for key in REQUIRED_INFO_KEYS if key not in info]
    if missing:
        raise DatasetError(f"{info_path}: missing key '{missing[0]}'; a behaviour snapshot needs {list(REQUIRED_INFO_KEYS)}")
    if info["format"] != SNAPSHOT_FORMAT:
        raise DatasetError(f"{info_path}: format is {info['format']!r}, expected {SNAPSHOT_FORMAT!r}")
    try:
        tensors = load_file(str(weights_path))
    except Exception as error:  # safetensors raises its own error types for corrupt headers
        raise DatasetError(f"{weights_path}: not a readable safetensors file ({error})") from error
    for key in ("hidden.0.weight", "hidden.0.bias", "mean.weight", "mean.bias", "log_std"):
        if key not in tensors:
            raise DatasetError(f"{weights_path}: missing tensor '{key}'; found {sorted(tensors)}")
    obs_dim, act_dim = len(info["obs_mean"]), tensors["mean.bias"].shape[0]
    if tensors["hidden.0.weight"].shape[1] != obs_dim or tensors["log_std"].shape != (act_dim,):
        raise DatasetError(
            f"{weights_path}: tensor shapes do not match {info_path.name} "
            f"(obs_dim {obs_dim}, first layer {tuple(tensors['hidden.0.weight'].shape)}, log_std {tuple(tensors['log_std'].shape)})"
        )
    return GaussianActor(tensors, info, stochastic=stochastic)


def save_actor(model: Any, vec_normalize: Any, prefix: Path, info: dict[str, Any]) -> None:
    """Export an SB3 PPO model's actor + VecNormalize obs statistics as a snapshot."""
    state = model.policy.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    index = 0
    while f"mlp_extractor.policy_net.{2 * index}.weight" in state:
        tensors[f"hidden.{index}.weight"] = state[f"mlp_extractor.policy_net.{2 * index}.weight"]
        tensors[f"hidden.{index}.bias"] = state[f"mlp_extractor.policy_net.{2 * index}.bias"]
        index += 1
    tensors["mean.weight"] = state["action_net.weight"]
    tensors["mean.bias"] = state["action_net.bias"]
    tensors["log_std"] = state["log_std"]
    tensors = {key: value.detach().to(torch.float16).contiguous() for key, value in tensors.items()}
    space = model.action_space
    full_info = {
        "format": SNAPSHOT_FORMAT,
        "algorithm": "PPO",
        "activation": "tanh",
        **info,
        "obs_mean": vec_normalize.obs_rms.mean.tolist(),
        "obs_var": vec_normalize.obs_rms.var.tolist(),
        "obs_clip": float(vec_normalize.clip_obs),
        "obs_epsilon": float(vec_normalize.epsilon),
        "action_low": space.low.astype(np.float64).tolist(),
        "action_high": space.high.astype(np.float64).tolist(),
    }
    weights_path, info_path = snapshot_paths(prefix)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(weights_path, lambda p: save_file(tensors, str(p)))
    atomic_write(info_path, lambda p: p.write_text(json.dumps(full_info, indent=1) + "\n"))


# ---------------------------------------------------------------------------------------
# User SB3 checkpoints
# ---------------------------------------------------------------------------------------


class SB3CheckpointPolicy:
    """A user's own stable-baselines3 checkpoint as a behaviour policy.

    Loading goes through SB3's ``load``, which unpickles parts of the zip: acceptable
    here only because it is the user's own file, named on their command line. kinema's
    committed behaviour policies never take this path (see ``load_actor``).
    """

    ALGORITHMS = ("ppo", "sac", "td3", "a2c", "ddpg")

    def __init__(self, checkpoint: str | os.PathLike, algo: str, task: str | TaskSpec,
                 vecnormalize: str | os.PathLike | None = None, deterministic: bool = False, seed: int = 0):
        import stable_baselines3

        algo = algo.lower()
        if algo not in self.ALGORITHMS:
            raise ValueError(f"algo must be one of {list(self.ALGORITHMS)}, got {algo!r}")
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: stable-baselines3 checkpoint not found")
        self.algo = algo
        self.checkpoint = checkpoint
        self.deterministic = deterministic
        self.model = getattr(stable_baselines3, algo.upper()).load(str(checkpoint), device="cpu")
        self.model.set_random_seed(seed)  # seeds torch: sampled actions repeat run to run
        self.obs_normaliser = None
        if vecnormalize is not None:
            self.obs_normaliser = _load_user_vecnormalize(Path(vecnormalize), get_task(task))
        require_matching_spaces(task, self.obs_dim, self.act_dim, str(checkpoint))

    @property
    def obs_dim(self) -> int:
        return int(self.model.observation_space.shape[0])

    @property
    def act_dim(self) -> int:
        return int(self.model.action_space.shape[0])

    def act(self, observations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if self.obs_normaliser is not None:
            observations = self.obs_normaliser.normalize_obs(observations)
        actions, _ = self.model.predict(observations, deterministic=self.deterministic)
        return np.asarray(actions, dtype=np.float64)

    def describe(self) -> dict[str, Any]:
        return {
            "algorithm": self.algo.upper(),
            "training_steps": int(self.model.num_timesteps),
            "checkpoint": str(self.checkpoint),
            "actions": "mean" if self.deterministic else "sampled",
        }


def _load_user_vecnormalize(path: Path, task: TaskSpec) -> Any:
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    from kinema.envs import make_env

    if not path.is_file():
        raise FileNotFoundError(f"{path}: VecNormalize statistics file not found")
    normaliser = VecNormalize.load(str(path), DummyVecEnv([lambda: make_env(task)]))  # the user's own pickle, as above
    normaliser.training = False
    return normaliser


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


@dataclass
class TrainingRequest:
    total_steps: int = 2_000_000
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY
    stop_at_return: float | None = None
    seed: int = 0
    eval_episodes: int = SNAPSHOT_EVAL_EPISODES


def _make_training_env(spec: TaskSpec, seed: int) -> Any:
    return make_training_env(spec, seed, PPO_RECIPE)


def _new_model(vec_env: Any, seed: int) -> Any:
    return new_ppo(vec_env, seed, PPO_RECIPE, policy_kwargs={
        "net_arch": {"pi": BEHAVIOUR_NETWORK["net_arch"], "vf": BEHAVIOUR_NETWORK["net_arch"]},
        "activation_fn": torch.nn.Tanh, "log_std_init": BEHAVIOUR_NETWORK["log_std_init"]})


def train_behaviour(
    task: str | TaskSpec,
    request: TrainingRequest | None = None,
    work_dir: str | os.PathLike | None = None,
    log: Any = print,
) -> dict[str, Any]:
    """Train (or resume training) a PPO behaviour policy; returns the final state dict.

    Stops at ``total_steps`` or once the last three snapshot evaluations average at least
    ``stop_at_return``. Interrupt it at any point: rerunning continues from the latest
    checkpoint (at most one snapshot interval of work is repeated; ``kinema.train.ppo``).
    """
    spec = get_task(task)
    request = request or TrainingRequest()
    require_whole_rollouts(request.snapshot_every, PPO_RECIPE)  # before the work directory is made
    work_dir = Path(work_dir) if work_dir is not None else behaviour_work_dir(spec)
    identity = {"task": spec.name, "gym_id": spec.gym_id, "seed": request.seed, "recipe": BEHAVIOUR_RECIPE,
                "snapshot_every": request.snapshot_every}
    try:
        state = open_run(work_dir, identity)
    except PPORunError as error:
        raise DatasetError(str(error)) from None
    state["stop_at_return"] = request.stop_at_return
    if _reached(state["curve"], request.stop_at_return):
        log(f"[{spec.name}] already reached return {request.stop_at_return} at {state['num_timesteps']} steps")
        return state
    if state["num_timesteps"] >= request.total_steps:
        log(f"[{spec.name}] already trained for {state['num_timesteps']} >= {request.total_steps} steps")
        return run_ppo(work_dir, state, request.total_steps, request.snapshot_every, lambda: None, lambda *a: {})
    if state["checkpoint"] is None:
        log(f"[{spec.name}] starting PPO from scratch in {work_dir}")

    def build() -> tuple[Any, Any]:
        vec_env = _make_training_env(spec, request.seed)
        return _new_model(vec_env, request.seed), vec_env

    def on_snapshot(model: Any, vec_env: Any, steps: int, wall: float) -> dict[str, Any]:
        """Export the actor as a snapshot and evaluate it as it will be used for collection."""
        name = f"step_{steps:09d}"
        prefix = work_dir / "snapshots" / name
        save_actor(model, vec_env, prefix, {"task": spec.name, "gym_id": spec.gym_id, "training_steps": steps,
                                            "training_seed": request.seed, "recipe": BEHAVIOUR_RECIPE})
        returns = episode_returns(spec, load_actor(prefix), request.eval_episodes, seed=EVAL_SEED, num_envs=request.eval_episodes)
        return {"eval_return_mean": round(float(returns.mean()), 1), "eval_return_std": round(float(returns.std()), 1),
                "snapshot": f"snapshots/{name}"}

    def report(point: dict[str, Any]) -> None:  # after the checkpoint: an interrupted run resumes from here
        log(f"[{spec.name}] steps {point['steps']:>9d}  wall {point['wall_time_s'] / 60:6.1f} min  train return "
            f"{point['train_return_mean']}  eval return {point['eval_return_mean']} ± {point['eval_return_std']}")

    state = run_ppo(work_dir, state, request.total_steps, request.snapshot_every, build, on_snapshot,
                    should_stop=lambda curve: _reached(curve, request.stop_at_return), log=lambda m: log(f"[{spec.name}] {m}"),
                    progress=report)
    log(f"[{spec.name}] finished ({state['finished']}) at {state['num_timesteps']} steps, {state['wall_time_s'] / 60:.1f} min")
    return state


def _reached(curve: list[dict[str, Any]], stop_at_return: float | None) -> bool:
    """Whether the last STOP_WINDOW snapshot evaluations average at least ``stop_at_return``
    (one lucky few-episode evaluation must not end training)."""
    if stop_at_return is None or len(curve) < STOP_WINDOW:
        return False
    return float(np.mean([p["eval_return_mean"] for p in curve[-STOP_WINDOW:]])) >= stop_at_return


# ---------------------------------------------------------------------------------------
# Choosing and committing medium / expert / replay snapshots
# ---------------------------------------------------------------------------------------


def _reevaluate(spec: TaskSpec, work_dir: Path, points: list[dict[str, Any]], episodes: int) -> dict[int, float]:
    return {
        p["steps"]: float(episode_returns(spec, load_actor(work_dir / p["snapshot"]), episodes, seed=EVAL_SEED + 1, num_envs=10).mean())
        for p in points
    }


def export_for_suite(
    task: str | TaskSpec,
    work_dir: str | os.PathLike | None = None,
    destination: str | os.PathLike | None = None,
    candidates: int = 6,
    episodes: int = SELECTION_EVAL_EPISODES,
    log: Any = print,
) -> dict[str, Any]:
    """Pick expert and medium snapshots and copy what the suite needs into the repository.

    Expert: among the ``candidates`` snapshots with the best training-time evaluation,
    the one with the best mean return over ``episodes`` fresh episodes. Medium: among
    earlier snapshots, the ``candidates`` whose training-time evaluation is nearest a
    third of the expert's, re-evaluated the same way; the nearest wins. Replay: every
    snapshot before medium, in training order. Writes ``policies.json`` beside them.
    """
    spec = get_task(task)
    work_dir = Path(work_dir) if work_dir is not None else behaviour_work_dir(spec)
    destination = Path(destination) if destination is not None else COMMITTED_POLICIES_DIR / spec.name
    state = read_state(work_dir)
    if state is None or not state["curve"]:
        raise FileNotFoundError(f"{work_dir / 'state.json'}: no behaviour training found for {spec.name!r}; train it first")
    curve = state["curve"]
    best = sorted(curve, key=lambda p: p["eval_return_mean"], reverse=True)[:candidates]
    expert_returns = _reevaluate(spec, work_dir, best, episodes)
    expert_steps = max(expert_returns, key=expert_returns.get)
    target = expert_returns[expert_steps] / 3.0
    earlier = [p for p in curve if 0 < p["steps"] < expert_steps]
    if not earlier:
        raise DatasetError(f"{work_dir}: the best snapshot is at step {expert_steps}; no earlier snapshot can be medium. Train longer.")
    near = sorted(earlier, key=lambda p: abs(p["eval_return_mean"] - target))[:candidates]
    medium_returns = _reevaluate(spec, work_dir, near, episodes)
    medium_steps = min(medium_returns, key=lambda s: abs(medium_returns[s] - target))
    replay = [p for p in curve if p["steps"] < medium_steps]
    log(f"[{spec.name}] expert at {expert_steps} steps ({expert_returns[expert_steps]:.1f}), medium at {medium_steps} steps "
        f"({medium_returns[medium_steps]:.1f}, target {target:.1f}), {len(replay)} replay snapshots")

    if destination.exists():
        shutil.rmtree(destination)
    destination.mkdir(parents=True)
    by_steps = {p["steps"]: p for p in curve}
    for steps in sorted({expert_steps, medium_steps, *(p["steps"] for p in replay)}):
        for source_file in snapshot_paths(work_dir / by_steps[steps]["snapshot"]):
            shutil.copyfile(source_file, destination / source_file.name)
    manifest = {
        "task": spec.name,
        "gym_id": spec.gym_id,
        "algorithm": "PPO (stable-baselines3)",
        "recipe": state["recipe"],
        "training_seed": state["seed"],
        "snapshot_every": state["snapshot_every"],
        "trained_steps": state["num_timesteps"],
        "training_wall_time_s": state["wall_time_s"],
        "finished": state["finished"],
        "selection": {"episodes": episodes, "eval_seed": EVAL_SEED + 1, "expert_candidates": expert_returns,
                      "medium_candidates": medium_returns, "medium_target": target},
        "expert": {"steps": expert_steps, "snapshot": Path(by_steps[expert_steps]["snapshot"]).name,
                   "selection_return": expert_returns[expert_steps]},
        "medium": {"steps": medium_steps, "snapshot": Path(by_steps[medium_steps]["snapshot"]).name,
                   "selection_return": medium_returns[medium_steps]},
        "replay": [{"steps": p["steps"], "snapshot": Path(p["snapshot"]).name} for p in replay],
        "training_curve": curve,
    }
    (destination / POLICIES_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def committed_policies(task: str | TaskSpec, directory: str | os.PathLike | None = None) -> dict[str, Any]:
    """The committed ``policies.json`` of a task (which snapshots are expert / medium / replay)."""
    spec = get_task(task)
    directory = Path(directory) if directory is not None else COMMITTED_POLICIES_DIR / spec.name
    path = directory / POLICIES_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no committed behaviour policies for task {spec.name!r}")
    manifest = json.loads(path.read_text())
    for key in ("expert", "medium", "replay"):
        if key not in manifest:
            raise DatasetError(f"{path}: missing key '{key}'")
    return manifest


def load_committed_actor(task: str | TaskSpec, snapshot: str, directory: str | os.PathLike | None = None) -> GaussianActor:
    spec = get_task(task)
    directory = Path(directory) if directory is not None else COMMITTED_POLICIES_DIR / spec.name
    actor = load_actor(directory / snapshot)
    require_matching_spaces(spec, actor.obs_dim, actor.act_dim, str(directory / snapshot))
    return actor
