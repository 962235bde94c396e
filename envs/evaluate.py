"""Vectorised policy evaluation: episodes in parallel, one batched policy call per step.

One loop serves plain evaluation (``trials=1``) and the multi-trial protocol the Agentic
Transformer is tested with (``trials=n``: each environment slot plays n episodes in a
row in one policy context; AT should improve on its own earlier trials, and DT is
compared with it the same way). Protocol, written down because it decides the numbers:

- Run ``r`` (0-based) plays trials ``0 .. trials-1``; trial ``k`` starts from
  ``reset(seed=seed + r * trials + k)``, whatever slot and round it lands in, so
  results do not depend on ``num_envs``. With ``trials=1`` a run is an episode and
  episode ``i`` starts from ``reset(seed=seed + i)``.
- ``num_envs`` runs go in parallel (a round); further runs go in further rounds, each
  starting with ``policy.reset(round_size, **conditioning)``.
- Whenever an episode starts in a slot (the round's reset, or a slot's next trial) the
  policy hears ``policy.seed_episodes(slots, seeds)`` with that episode's reset seed, so
  a stochastic policy draws each environment's noise from a generator of its own
  (``Policy.episode_noise``) and its returns do not depend on ``num_envs`` either.
- Every vector step makes exactly one ``policy.act`` call with the whole round's batch,
  under ``torch.no_grad()`` and with an ``nn.Module`` policy in ``eval()`` mode (each
  module's previous mode is restored afterwards); actions are clipped to the action box
  before stepping; then ``policy.observe_reward(rewards)``.
- When a trial ends (terminated or truncated) and its run has trials left, the policy
  hears ``policy.end_episode(slots)`` (policies without it are not told), the slot is
  reset with the next trial's seed and the policy is told its seed; the other slots
  keep going.
- A slot whose run is over keeps its batch row (stateful policies index rows by slot):
  the policy is shown that slot's final observation again, sent a zero reward, and its
  action is replaced by zeros. The vector env runs with autoreset DISABLED and kinema
  resets finished environments itself (``reset_mask``), with the next trial's seed or,
  for a slot whose run is over, none (Gymnasium 1.x refuses to step an environment
  that finished and was not reset; what such a slot simulates is ignored).
- Scores use the dataset's reference returns when given, else D4RL's. With
  ``trials > 1`` the headline returns and scores are the FIRST trial (a single-episode
  score that compares like with like across policies); per-trial returns and scores,
  and first-trial, last-trial and best-of-n (the best of a run's trials, what the AT
  paper reports) mean ± std over runs are under ``trials``.
- Video records slot 0's first episode (run 0, trial 0), from a camera that follows
  the robot, captioned with task, policy, step and return so far.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium.vector import AutoresetMode
from tqdm.auto import tqdm

from .registry import TaskSpec, get_task, make_vector_env
from .render import VIDEO_HEIGHT, VIDEO_WIDTH, EpisodeVideo, require_video_writer
from .scores import reference_returns

DEFAULT_MAX_NUM_ENVS = 10


@dataclass
class TrialsResult:
    """Every trial of an evaluation with ``trials`` > 1 (eval.json's ``trials``); lists are indexed
    [run][trial]; standard deviations are over runs (ddof=0)."""

    task: str
    seed: int
    episodes: int  # runs, each of `trials` episodes
    trials: int
    num_envs: int
    returns: list[list[float]]
    lengths: list[list[int]]
    normalized_scores: list[list[float]] | None
    reference_source: str | None
    ref_min: float | None
    ref_max: float | None
    first_trial_return_mean: float
    last_trial_return_mean: float
    best_of_n_return_mean: float
    first_trial_score_mean: float | None
    first_trial_score_std: float | None
    last_trial_score_mean: float | None
    last_trial_score_std: float | None
    best_of_n_score_mean: float | None
    best_of_n_score_std: float | None
    env_steps: int
    wall_time_s: float
    env_steps_per_s: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalResult:
    """Outcome of ``evaluate``; standard deviations are over episodes (ddof=0).

    With ``trials`` > 1 the episode fields (returns, lengths, scores) are each run's first
    trial, ``trials`` holds every trial, and ``env_steps`` / ``wall_time_s`` /
    ``env_steps_per_s`` count all trials. ``trials`` is None (and absent from
    ``to_dict()``) for a single-trial evaluation.
    """

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
    trials: TrialsResult | None = None

    def to_dict(self) -> dict[str, Any]:
        result = dataclasses.asdict(self)
        if self.trials is None:
            del result["trials"]
        return result


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


@contextlib.contextmanager
def _eval_mode(policy: Any) -> Iterator[None]:
    """``policy.eval()`` for the duration (dropout off), then every module's own mode back."""
    if not isinstance(policy, torch.nn.Module):
        yield
        return
    modes = [(module, module.training) for module in policy.modules()]
    policy.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _mean_std(values: np.ndarray | None) -> tuple[float | None, float | None]:
    return (None, None) if values is None else (float(values.mean()), float(values.std()))


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
    trials: int = 1,
    randomization: Any = None,
) -> EvalResult:
    """Run ``episodes`` runs of ``trials`` episodes each of ``policy`` in ``task`` and score them.

    ``policy`` needs ``reset(num_envs, **conditioning)``, ``act(observations (N, obs_dim))
    -> actions (N, act_dim)`` (tensor or ndarray) and ``observe_reward(rewards (N,))``;
    ``end_episode(slots)`` and ``seed_episodes(slots, seeds)`` are called when present.
    ``dataset_refs`` is ``(ref_min, ref_max)`` or a metadata mapping (see
    ``reference_returns``). ``num_envs`` defaults to ``min(episodes, 10)`` and is capped at
    ``episodes``. ``video_path`` writes an mp4 of the first episode (environment 0, first
    round, first trial). ``randomization`` (a ``kinema.envs.randomization.RandomizationProfile``)
    varies each episode's dynamics, seeded by the episode's seed. The protocol is in this module's docstring.
    """
    spec = get_task(task)
    episodes, seed, num_envs = _checked_counts(episodes, seed, num_envs)
    trials = _positive_int(trials, "trials")
    conditioning = dict(conditioning or {})
    try:
        ref_min, ref_max, source = reference_returns(spec, dataset_refs)
    except ValueError:
        if dataset_refs is not None:
            raise  # malformed dataset references are the caller's error, found before any rollout
        ref_min, ref_max, source = None, None, None  # a task without references: returns only
    if video_path is not None:
        require_video_writer()  # fail now, not after the whole evaluation

    returns = np.zeros((episodes, trials), dtype=np.float64)
    lengths = np.zeros((episodes, trials), dtype=np.int64)
    render_kwargs = {}
    if video_path is not None:
        render_kwargs = {"render_mode": "rgb_array", "width": VIDEO_WIDTH, "height": VIDEO_HEIGHT}
    video_title = f"{spec.name}   |   {getattr(policy, 'name', None) or type(policy).__name__}"
    progress_bar = tqdm(desc=f"evaluating {spec.name}", unit="step", disable=not progress)
    vector_env = None
    start = time.perf_counter()
    try:
        with _eval_mode(policy):
            for first in range(0, episodes, num_envs):
                round_size = min(num_envs, episodes - first)
                if vector_env is None or vector_env.num_envs != round_size:
                    if vector_env is not None:
                        vector_env.close()
                    vector_env = make_vector_env(spec, round_size, autoreset_mode=AutoresetMode.DISABLED,
                                                 randomization=randomization, **render_kwargs)
                video = None
                if video_path is not None and first == 0:
                    video = EpisodeVideo(vector_env.envs[0], video_path, title=video_title)
                try:
                    _run_round(policy, vector_env, first, trials, seed, conditioning, returns, lengths, video, progress_bar)
                finally:
                    if video is not None:
                        video.close()
                runs_done = first + round_size
                progress_bar.set_postfix(episodes=f"{runs_done * trials}/{episodes * trials}")
    finally:
        progress_bar.close()
        if vector_env is not None:
            vector_env.close()
    wall_time_s = time.perf_counter() - start

    per_trial = _trials_result(spec.name, seed, num_envs, returns, lengths, (ref_min, ref_max, source), wall_time_s)
    return EvalResult(
        task=spec.name,
        seed=seed,
        episodes=episodes,
        num_envs=num_envs,
        returns=returns[:, 0].tolist(),
        lengths=lengths[:, 0].tolist(),
        return_mean=float(returns[:, 0].mean()),
        return_std=float(returns[:, 0].std()),
        normalized_scores=None if per_trial.normalized_scores is None else [run[0] for run in per_trial.normalized_scores],
        normalized_score_mean=per_trial.first_trial_score_mean,
        normalized_score_std=per_trial.first_trial_score_std,
        reference_source=source,
        ref_min=ref_min,
        ref_max=ref_max,
        env_steps=per_trial.env_steps,
        wall_time_s=wall_time_s,
        env_steps_per_s=per_trial.env_steps_per_s,
        video_path=str(video_path) if video_path is not None else None,
        trials=per_trial if trials > 1 else None,
    )


def evaluate_trials(policy: Any, task: str | TaskSpec, episodes: int, trials: int, seed: int, **options: Any) -> TrialsResult:
    """Every trial of ``evaluate(policy, task, episodes, seed, trials=trials, **options)`` (also
    for ``trials=1``), as trials.json holds it."""
    result = evaluate(policy, task, episodes, seed, trials=trials, **options)
    if result.trials is not None:
        return result.trials
    references = (result.ref_min, result.ref_max, result.reference_source)
    returns, lengths = np.array(result.returns)[:, None], np.array(result.lengths)[:, None]
    return _trials_result(result.task, result.seed, result.num_envs, returns, lengths, references, result.wall_time_s)


def _trials_result(task: str, seed: int, num_envs: int, returns: np.ndarray, lengths: np.ndarray,
                   references: tuple[float | None, float | None, str | None], wall_time_s: float) -> TrialsResult:
    """Score (runs, trials) returns: per trial, and first / last / best-of-n over runs."""
    ref_min, ref_max, source = references
    scores = None if source is None else 100.0 * (returns - ref_min) / (ref_max - ref_min)
    env_steps = int(lengths.sum())
    first_mean, first_std = _mean_std(None if scores is None else scores[:, 0])
    last_mean, last_std = _mean_std(None if scores is None else scores[:, -1])
    best_mean, best_std = _mean_std(None if scores is None else scores.max(axis=1))
    return TrialsResult(
        task=task,
        seed=seed,
        episodes=returns.shape[0],
        trials=returns.shape[1],
        num_envs=num_envs,
        returns=returns.tolist(),
        lengths=lengths.tolist(),
        normalized_scores=None if scores is None else scores.tolist(),
        reference_source=source,
        ref_min=ref_min,
        ref_max=ref_max,
        first_trial_return_mean=float(returns[:, 0].mean()),
        last_trial_return_mean=float(returns[:, -1].mean()),
        best_of_n_return_mean=float(returns.max(axis=1).mean()),
        first_trial_score_mean=first_mean,
        first_trial_score_std=first_std,
        last_trial_score_mean=last_mean,
        last_trial_score_std=last_std,
        best_of_n_score_mean=best_mean,
        best_of_n_score_std=best_std,
        env_steps=env_steps,
        wall_time_s=wall_time_s,
        env_steps_per_s=env_steps / wall_time_s if wall_time_s > 0 else float("nan"),
    )


def _run_round(
    policy: Any,
    vector_env: Any,
    first_run: int,
    trials: int,
    seed: int,
    conditioning: dict[str, Any],
    returns: np.ndarray,
    lengths: np.ndarray,
    video: EpisodeVideo | None,
    progress_bar: Any,
) -> None:
    """Play runs ``first_run .. first_run + num_envs - 1``, all their trials, to the end."""
    num_envs = vector_env.num_envs
    runs = np.arange(first_run, first_run + num_envs)
    action_space = vector_env.single_action_space
    end_episode = getattr(policy, "end_episode", None)
    seed_episodes = getattr(policy, "seed_episodes", None)

    def where(index: int) -> str:
        episode = f"episode {runs[index]}" if trials == 1 else f"run {runs[index]}, trial {trial[index]}"
        return f"environment {index} ({episode}) at step {step}"

    seeds = [seed + int(run) * trials for run in runs]
    observations, _ = vector_env.reset(seed=seeds)
    policy.reset(num_envs, **conditioning)
    if seed_episodes is not None:
        seed_episodes(np.arange(num_envs), seeds)
    if video is not None:
        video.capture(step=0, episode_return=0.0)
    trial = np.zeros(num_envs, dtype=np.int64)
    active = np.ones(num_envs, dtype=bool)  # the slot's run still has trials to play
    step = 0
    while active.any():
        actions = policy_actions(policy, observations, active, action_space, where)
        next_observations, rewards, terminations, truncations, _ = vector_env.step(actions)
        rewards = np.where(active, rewards, 0.0)
        returns[runs[active], trial[active]] += rewards[active]
        lengths[runs[active], trial[active]] += 1
        policy.observe_reward(rewards)
        if video is not None and active[0] and trial[0] == 0:
            video.capture(step=int(lengths[runs[0], 0]), episode_return=float(returns[runs[0], 0]))
        progress_bar.update(int(active.sum()))
        step += 1

        # A new array each step: the policy may keep references to earlier observations.
        observations = np.where(active[:, None], next_observations, observations)
        done = terminations | truncations
        if not done.any():
            continue
        finished = done & active
        trial[finished] += 1
        active &= trial < trials
        next_trial = finished & active
        if end_episode is not None and next_trial.any():
            end_episode(np.flatnonzero(next_trial))
        # Every finished environment must be reset to be stepped again; only next trials get a seed.
        seeds = [seed + int(runs[i]) * trials + int(trial[i]) if next_trial[i] else None for i in range(num_envs)]
        reset_observations, _ = vector_env.reset(seed=seeds, options={"reset_mask": done.copy()})
        if next_trial.any():
            observations = np.where(next_trial[:, None], reset_observations, observations)
            if seed_episodes is not None:
                slots = np.flatnonzero(next_trial)
                seed_episodes(slots, [seeds[i] for i in slots])
