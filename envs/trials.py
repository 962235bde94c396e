"""Multi-trial evaluation: each environment slot plays ``trials`` episodes in a row in one policy context.

This is how the Agentic Transformer is tested (it should improve on its own earlier
trials), and the fair way to compare DT with it. Protocol:

- run ``r`` (0-based) plays trials ``0 .. trials-1``; trial ``k`` starts from
  ``reset(seed=seed + r * trials + k)``, whatever slot and round the run lands in;
- ``num_envs`` runs go in parallel (a round); each round starts with
  ``policy.reset(round_size, **conditioning)``; every vector step makes exactly one
  batched ``policy.act`` call, then ``policy.observe_reward(rewards)``;
- when a trial ends (terminated or truncated) the policy hears
  ``policy.end_episode(env_indices)`` and that environment is reset for the next trial
  while the others keep going; policies without ``end_episode`` (stateless ones) are
  simply not told;
- a slot whose run is over keeps being stepped (its actions replaced by zeros, rewards
  by 0) until the round ends, so the batch rows of the others stay in place;
- scores: per-trial normalised scores, and first-trial, last-trial and best-of-n (the
  best of a run's trials) mean ± std over runs. Best-of-n is what the AT paper
  reports; compare like with like.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from gymnasium.vector import AutoresetMode

from .evaluate import _checked_counts, _positive_int, policy_actions
from .registry import TaskSpec, get_task, make_vector_env
from .scores import reference_returns


@dataclass
class TrialsResult:
    """Outcome of ``evaluate_trials``; lists are indexed [run][trial]; stds over runs (ddof=0)."""

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


def evaluate_trials(
    policy: Any,
    task: str | TaskSpec,
    episodes: int,
    trials: int,
    seed: int,
    num_envs: int | None = None,
    conditioning: dict[str, Any] | None = None,
    dataset_refs: Any = None,
) -> TrialsResult:
    """Play ``episodes`` runs of ``trials`` consecutive episodes each and score every trial."""
    spec = get_task(task)
    episodes, seed, num_envs = _checked_counts(episodes, seed, num_envs)
    trials = _positive_int(trials, "trials")
    conditioning = dict(conditioning or {})
    if dataset_refs is not None:
        reference_returns(spec, dataset_refs)  # malformed references fail before any rollout

    returns = np.zeros((episodes, trials), dtype=np.float64)
    lengths = np.zeros((episodes, trials), dtype=np.int64)
    vector_env = None
    start = time.perf_counter()
    try:
        for first in range(0, episodes, num_envs):
            round_size = min(num_envs, episodes - first)
            if vector_env is None or vector_env.num_envs != round_size:
                if vector_env is not None:
                    vector_env.close()
                # DISABLED autoreset: kinema resets a finished environment itself, with the next trial's seed.
                vector_env = make_vector_env(spec, round_size, autoreset_mode=AutoresetMode.DISABLED)
            _run_round(policy, vector_env, first, trials, seed, conditioning, returns, lengths)
    finally:
        if vector_env is not None:
            vector_env.close()
    wall_time_s = time.perf_counter() - start

    try:
        ref_min, ref_max, source = reference_returns(spec, dataset_refs)
    except ValueError:
        ref_min, ref_max, source = None, None, None  # a task without references: returns only
    scores = None if source is None else 100.0 * (returns - ref_min) / (ref_max - ref_min)

    def mean_std(values: np.ndarray | None) -> tuple[float | None, float | None]:
        return (None, None) if values is None else (float(values.mean()), float(values.std()))

    first_mean, first_std = mean_std(None if scores is None else scores[:, 0])
    last_mean, last_std = mean_std(None if scores is None else scores[:, -1])
    best_mean, best_std = mean_std(None if scores is None else scores.max(axis=1))
    env_steps = int(lengths.sum())
    return TrialsResult(
        task=spec.name,
        seed=seed,
        episodes=episodes,
        trials=trials,
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
) -> None:
    """Play runs ``first_run .. first_run + num_envs - 1``, all their trials, to the end."""
    num_envs = vector_env.num_envs
    runs = np.arange(first_run, first_run + num_envs)
    action_space = vector_env.single_action_space
    end_episode = getattr(policy, "end_episode", None)

    observations, _ = vector_env.reset(seed=[seed + int(run) * trials for run in runs])
    policy.reset(num_envs, **conditioning)
    trial = np.zeros(num_envs, dtype=np.int64)
    active = np.ones(num_envs, dtype=bool)  # the slot's run still has trials to play
    step = 0
    while active.any():
        actions = policy_actions(
            policy, observations, active, action_space,
            lambda index: f"environment {index} (run {runs[index]}, trial {trial[index]}) at step {step}",
        )
        observations, rewards, terminations, truncations, _ = vector_env.step(actions)
        rewards = np.where(active, rewards, 0.0)
        returns[runs[active], trial[active]] += rewards[active]
        lengths[runs[active], trial[active]] += 1
        policy.observe_reward(rewards)
        step += 1

        done = terminations | truncations
        if not done.any():
            continue
        finished = done & active
        trial[finished] += 1
        active &= trial < trials
        next_trial = finished & active
        if end_episode is not None and next_trial.any():
            end_episode(np.flatnonzero(next_trial))
        # Every finished environment must be reset to be stepped again; only next trials get their seed.
        seeds = [seed + int(runs[i]) * trials + int(trial[i]) if next_trial[i] else None for i in range(num_envs)]
        observations, _ = vector_env.reset(seed=seeds, options={"reset_mask": done.copy()})
