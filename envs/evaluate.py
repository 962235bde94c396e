"""Vectorised policy evaluation: episodes in parallel, one batched policy call per step.

Protocol, written down because it decides the numbers:

- Episode ``i`` (0-based) starts from ``reset(seed=seed + i)``, whichever environment
  and round it lands in, so returns do not depend on ``num_envs``.
- ``num_envs`` environments run a round of episodes together; more episodes run in
  further rounds, each starting with ``policy.reset(round_size, **conditioning)``.
- Every vector step makes exactly one ``policy.act`` call with the whole round's batch,
  under ``torch.no_grad()``; actions are clipped to the action box before stepping.
- A finished episode's return and length are frozen. The vector env keeps Gymnasium's
  default NEXT_STEP autoreset, so a finished environment restarts on the next step and
  keeps simulating until the round ends; kinema ignores everything it produces: the
  policy is shown that environment's final observation again (its batch row must stay
  in place for stateful policies), is sent a zero reward, and its action is replaced by
  zeros. Stepping a finished env costs ~0.2 ms against a batched policy call of ~1 ms,
  and keeping SyncVectorEnv's ordinary mode avoids relying on its DISABLED-mode
  internals (which refuse to step a finished environment at all).
- The normalised score uses the dataset's reference returns when given, else D4RL's.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .registry import TaskSpec, get_task, make_vector_env
from .render import VIDEO_HEIGHT, VIDEO_WIDTH, EpisodeVideo, require_video_writer
from .scores import reference_returns

DEFAULT_MAX_NUM_ENVS = 10


@dataclass
class EvalResult:
    """Outcome of ``evaluate``; standard deviations are over episodes (ddof=0)."""

    task: str
    seed: int
    episodes: int
    num_envs: int
    returns: list[float]
    lengths: list[int]
    return_mean: float
    return_std: float
    normalized_scores: list[float] | None
    normalized_score_mean: float | None
    normalized_score_std: float | None
    reference_source: str | None
    ref_min: float | None
    ref_max: float | None
    env_steps: int
    wall_time_s: float
    env_steps_per_s: float
    video_path: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def policy_actions(policy: Any, observations: np.ndarray, active: np.ndarray, action_space: Any,
                   where: Any) -> np.ndarray:
    """One batched act() call, checked and clipped to the action box; inactive rows get zeros.

    ``where(index)`` names environment ``index`` (episode, trial, step) in the error for a NaN/inf action.
    """
    num_envs, act_dim = observations.shape[0], action_space.shape[0]
    with torch.no_grad():
        raw_actions = policy.act(observations)
    if isinstance(raw_actions, torch.Tensor):
        raw_actions = raw_actions.detach().to("cpu", torch.float64).numpy()
    actions = np.array(raw_actions, dtype=np.float64)  # a copy: the policy keeps its own
    if actions.shape != (num_envs, act_dim):
        raise ValueError(f"policy.act returned actions of shape {actions.shape}, expected ({num_envs}, {act_dim})")
    non_finite = active & ~np.isfinite(actions).all(axis=1)
    if non_finite.any():
        index = int(np.flatnonzero(non_finite)[0])
        raise ValueError(f"policy returned a non-finite action for {where(index)}: {actions[index].tolist()}")
    actions[~active] = 0.0
    return np.clip(actions, action_space.low, action_space.high).astype(action_space.dtype)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _checked_counts(episodes: Any, seed: Any, num_envs: Any) -> tuple[int, int, int]:
    """Validated (episodes, seed, num_envs); num_envs defaults to min(episodes, 10), capped at episodes."""
    episodes = _positive_int(episodes, "episodes")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    num_envs = min(episodes, DEFAULT_MAX_NUM_ENVS) if num_envs is None else _positive_int(num_envs, "num_envs")
    return episodes, int(seed), min(num_envs, episodes)


def evaluate(
    policy: Any,
    task: str | TaskSpec,
    episodes: int,
    seed: int,
    num_envs: int | None = None,
    conditioning: dict[str, Any] | None = None,
    dataset_refs: Any = None,
    video_path: str | Path | None = None,
    progress: bool = False,
) -> EvalResult:
    """Run ``episodes`` episodes of ``policy`` in ``task`` and score them.

    ``policy`` needs ``reset(num_envs, **conditioning)``, ``act(observations (N, obs_dim))
    -> actions (N, act_dim)`` (tensor or ndarray) and ``observe_reward(rewards (N,))``.
    ``dataset_refs`` is ``(ref_min, ref_max)`` or a metadata mapping (see
    ``reference_returns``). ``num_envs`` defaults to ``min(episodes, 10)`` and is capped at
    ``episodes``. ``video_path`` writes an mp4 of episode 0 (environment 0, first round).
    """
    spec = get_task(task)
    episodes, seed, num_envs = _checked_counts(episodes, seed, num_envs)
    conditioning = dict(conditioning or {})
    if video_path is not None:
        require_video_writer()  # fail now, not after the whole evaluation

    returns = np.zeros(episodes, dtype=np.float64)
    lengths = np.zeros(episodes, dtype=np.int64)
    render_kwargs = {}
    if video_path is not None:
        render_kwargs = {"render_mode": "rgb_array", "width": VIDEO_WIDTH, "height": VIDEO_HEIGHT}
    progress_bar = tqdm(desc=f"evaluating {spec.name}", unit="step", disable=not progress)
    vector_env = None
    start = time.perf_counter()
    try:
        for first in range(0, episodes, num_envs):
            round_size = min(num_envs, episodes - first)
            if vector_env is None or vector_env.num_envs != round_size:
                if vector_env is not None:
                    vector_env.close()
                vector_env = make_vector_env(spec, round_size, **render_kwargs)
            video = None
            if video_path is not None and first == 0:
                video = EpisodeVideo(vector_env.envs[0], video_path)
            try:
                _run_round(policy, vector_env, first, seed, conditioning, returns, lengths, video, progress_bar)
            finally:
                if video is not None:
                    video.close()
            progress_bar.set_postfix(episodes=f"{first + round_size}/{episodes}")
    finally:
        progress_bar.close()
        if vector_env is not None:
            vector_env.close()
    wall_time_s = time.perf_counter() - start

    env_steps = int(lengths.sum())
    scores, score_mean, score_std = None, None, None
    try:
        ref_min, ref_max, source = reference_returns(spec, dataset_refs)
    except ValueError:
        if dataset_refs is not None:
            raise  # malformed dataset references are the caller's error; missing ones are not
        ref_min, ref_max, source = None, None, None
    if source is not None:
        score_array = 100.0 * (returns - ref_min) / (ref_max - ref_min)
        scores, score_mean, score_std = score_array.tolist(), float(score_array.mean()), float(score_array.std())
    return EvalResult(
        task=spec.name,
        seed=seed,
        episodes=episodes,
        num_envs=num_envs,
        returns=returns.tolist(),
        lengths=lengths.tolist(),
        return_mean=float(returns.mean()),
        return_std=float(returns.std()),
        normalized_scores=scores,
        normalized_score_mean=score_mean,
        normalized_score_std=score_std,
        reference_source=source,
        ref_min=ref_min,
        ref_max=ref_max,
        env_steps=env_steps,
        wall_time_s=wall_time_s,
        env_steps_per_s=env_steps / wall_time_s if wall_time_s > 0 else float("nan"),
        video_path=str(video_path) if video_path is not None else None,
    )


def _run_round(
    policy: Any,
    vector_env: Any,
    first_episode: int,
    seed: int,
    conditioning: dict[str, Any],
    returns: np.ndarray,
    lengths: np.ndarray,
    video: EpisodeVideo | None,
    progress_bar: Any,
) -> None:
    """Play episodes ``first_episode .. first_episode + num_envs - 1`` to their ends."""
    num_envs = vector_env.num_envs
    episode_slice = slice(first_episode, first_episode + num_envs)
    action_space = vector_env.single_action_space

    observations, _ = vector_env.reset(seed=[seed + first_episode + index for index in range(num_envs)])
    policy.reset(num_envs, **conditioning)
    if video is not None:
        video.capture()
    active = np.ones(num_envs, dtype=bool)
    step = 0
    while active.any():
        actions = policy_actions(
            policy, observations, active, action_space,
            lambda index: f"environment {index} (episode {first_episode + index}) at step {step}",
        )
        next_observations, rewards, terminations, truncations, _ = vector_env.step(actions)
        rewards = np.where(active, rewards, 0.0)
        returns[episode_slice] += rewards
        lengths[episode_slice] += active
        policy.observe_reward(rewards)
        if video is not None and active[0]:
            video.capture()
        progress_bar.update(int(active.sum()))

        # A new array each step: the policy may keep references to earlier observations.
        observations = np.where(active[:, None], next_observations, observations)
        active &= ~(terminations | truncations)
        step += 1
