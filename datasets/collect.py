"""Record D4RL-layout datasets by running a behaviour policy in a task.

Protocol (it decides what the files contain, so it is written down here):

- ``num_envs`` environments step together; every vector step makes one batched
  ``policy.act(observations, rng)`` call. Environment ``i`` is reset with its own seed
  from ``SeedSequence([seed, 0])`` once, then continues without reseeding; action noise
  comes from ``default_rng([seed, 1])``. Same seed, same code, same libraries → the same
  arrays, bit for bit.
- Fields are D4RL's: raw (never normalised) ``observations`` and ``next_observations``
  (float32), the ``actions`` actually sent to the environment (clipped to the action
  box), ``rewards``, ``terminals`` true only when the task terminated (the robot fell),
  ``timeouts`` true when the ``max_episode_steps`` time limit truncated the episode,
  and ``infos/qpos`` / ``infos/qvel``: MuJoCo's state at the observation the action was
  taken from (float64).
- Episodes are written contiguously, ordered by the vector step at which they started
  (so a medium-replay file shows the learner's progress in file order). When the
  requested number of transitions is reached, episodes still running are cut: their last
  step gets ``timeouts = True`` (a truncation, not a termination), so loaders never merge
  them with the next episode.
- A policy schedule ``[(0, policy_a), (40_000, policy_b), ...]`` switches the acting
  policy once that many transitions have been recorded, while episodes keep running
  across the switch — how an on-policy learner's rollouts look (medium-replay).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from kinema.envs import TaskSpec, get_task, make_env

from .errors import DatasetError
from .store import OfflineDataset

DEFAULT_NUM_ENVS = 10


class ActionSource(Protocol):
    """What collection needs from a behaviour policy."""

    def act(self, observations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Actions (N, act_dim) inside the action box for raw observations (N, obs_dim)."""
        ...

    def describe(self) -> dict[str, Any]:
        """JSON-able metadata describing the policy (algorithm, training steps, ...)."""
        ...


class UniformRandomPolicy:
    """D4RL's random policy: every action drawn uniformly from the action box."""

    def __init__(self, action_low: np.ndarray, action_high: np.ndarray):
        self.action_low = np.asarray(action_low, dtype=np.float64)
        self.action_high = np.asarray(action_high, dtype=np.float64)

    @classmethod
    def for_task(cls, task: str | TaskSpec) -> "UniformRandomPolicy":
        env = make_env(task)
        try:
            return cls(env.action_space.low, env.action_space.high)
        finally:
            env.close()

    def act(self, observations: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(self.action_low, self.action_high, size=(len(observations), len(self.action_low)))

    def describe(self) -> dict[str, Any]:
        return {"algorithm": "uniform-random", "training_steps": 0}


PolicySchedule = Sequence[tuple[int, ActionSource]]


def _check_schedule(schedule: PolicySchedule) -> list[tuple[int, ActionSource]]:
    entries = [(int(start), policy) for start, policy in schedule]
    if not entries or entries[0][0] != 0:
        raise ValueError("a policy schedule must start with a policy acting from transition 0")
    starts = [start for start, _ in entries]
    if starts != sorted(set(starts)):
        raise ValueError(f"policy schedule start counts must be strictly increasing, got {starts}")
    return entries


def _env_seeds(seed: int, num_envs: int) -> list[int]:
    return [int(s) for s in np.random.SeedSequence([seed, 0]).generate_state(num_envs)]


def _positive(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


@contextlib.contextmanager
def _one_torch_thread() -> Any:
    """Batched actor calls are tiny: one thread is ~6x faster than two on a loaded 2-core
    machine, and a fixed thread count keeps the float results, hence the data, identical."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _EnvRecord:
    """One environment's transitions in the order it produced them (preallocated rows)."""

    def __init__(self, capacity: int, obs_dim: int, act_dim: int, nq: int, nv: int):
        self.rows = 0
        self.observations = np.empty((capacity, obs_dim), dtype=np.float64)
        self.next_observations = np.empty((capacity, obs_dim), dtype=np.float64)
        self.actions = np.empty((capacity, act_dim), dtype=np.float64)
        self.rewards = np.empty(capacity, dtype=np.float64)
        self.terminals = np.zeros(capacity, dtype=bool)
        self.timeouts = np.zeros(capacity, dtype=bool)
        self.qpos = np.empty((capacity, nq), dtype=np.float64)
        self.qvel = np.empty((capacity, nv), dtype=np.float64)
        self.episode_bounds: list[tuple[int, int, int]] = []  # (start vector step, first row, row count)


def collect(
    task: str | TaskSpec,
    policy: ActionSource | PolicySchedule,
    num_transitions: int,
    seed: int = 0,
    num_envs: int = DEFAULT_NUM_ENVS,
    metadata: dict[str, Any] | None = None,
    progress: bool = False,
    source: str | None = None,
) -> OfflineDataset:
    """Run the policy (or policy schedule) until ``num_transitions`` are recorded."""
    spec = get_task(task)
    num_transitions = _positive(num_transitions, "num_transitions")
    num_envs = min(_positive(num_envs, "num_envs"), num_transitions)
    schedule = _check_schedule(policy if isinstance(policy, (list, tuple)) else [(0, policy)])
    rng = np.random.default_rng([seed, 1])
    envs = [make_env(spec) for _ in range(num_envs)]
    capacity = -(-num_transitions // num_envs)  # every environment steps at most once per vector step
    model = envs[0].unwrapped.model
    obs_dim, act_dim = envs[0].observation_space.shape[0], envs[0].action_space.shape[0]
    records = [_EnvRecord(capacity, obs_dim, act_dim, model.nq, model.nv) for _ in range(num_envs)]
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_one_torch_thread())
        cleanup.callback(lambda: [env.close() for env in envs])
        observations = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, _env_seeds(seed, num_envs))])
        episode_first_row = [0] * num_envs
        episode_start_step = [0] * num_envs
        action_low, action_high = envs[0].action_space.low, envs[0].action_space.high
        recorded, vector_step, schedule_index = 0, 0, 0
        bar = tqdm(total=num_transitions, desc=f"collect {spec.name}", unit="step", disable=not progress, mininterval=1.0)
        while recorded < num_transitions:
            while schedule_index + 1 < len(schedule) and schedule[schedule_index + 1][0] <= recorded:
                schedule_index += 1
            acting = schedule[schedule_index][1]
            actions = np.asarray(acting.act(observations, rng), dtype=np.float64)
            if actions.shape != (num_envs, len(action_low)):
                raise ValueError(f"behaviour policy returned actions of shape {actions.shape}, expected ({num_envs}, {len(action_low)})")
            actions = np.clip(actions, action_low, action_high)
            active = min(num_envs, num_transitions - recorded)  # the last step may need only some envs
            for i in range(active):
                env, record, row = envs[i], records[i], records[i].rows
                data = env.unwrapped.data
                record.qpos[row] = data.qpos
                record.qvel[row] = data.qvel
                next_obs, reward, terminated, truncated, _ = env.step(actions[i])
                record.observations[row] = observations[i]
                record.actions[row] = actions[i]
                record.rewards[row] = reward
                record.terminals[row] = terminated
                record.timeouts[row] = truncated and not terminated
                record.next_observations[row] = next_obs
                record.rows = rows = row + 1
                if terminated or truncated:
                    record.episode_bounds.append((episode_start_step[i], episode_first_row[i], rows - episode_first_row[i]))
                    episode_first_row[i], episode_start_step[i] = rows, vector_step + 1
                    next_obs, _ = env.reset()
                observations[i] = next_obs
            recorded += active
            vector_step += 1
            bar.update(active)
        bar.close()
    for i, record in enumerate(records):
        rows = record.rows
        if rows > episode_first_row[i]:  # cut by the size limit: a truncation
            record.timeouts[rows - 1] = True
            record.episode_bounds.append((episode_start_step[i], episode_first_row[i], rows - episode_first_row[i]))
    return _assemble(spec, records, metadata or {}, source or f"<collected {spec.name}>")


def _assemble(spec: TaskSpec, records: list[_EnvRecord], metadata: dict[str, Any], source: str) -> OfflineDataset:
    """Concatenate all environments' episodes ordered by (start step, environment)."""
    episodes = sorted(
        (start_step, env_index, first_row, length)
        for env_index, record in enumerate(records)
        for start_step, first_row, length in record.episode_bounds
    )

    def gather(name: str, dtype: Any) -> np.ndarray:
        parts = [getattr(records[env], name)[first : first + length] for _, env, first, length in episodes]
        return np.concatenate(parts).astype(dtype, copy=False)

    return OfflineDataset(
        observations=gather("observations", np.float32),
        actions=gather("actions", np.float32),
        rewards=gather("rewards", np.float32),
        terminals=gather("terminals", bool),
        timeouts=gather("timeouts", bool),
        next_observations=gather("next_observations", np.float32),
        infos={"qpos": gather("qpos", np.float64), "qvel": gather("qvel", np.float64)},
        metadata={"task": spec.name, "env_id": spec.gym_id, "max_episode_steps": spec.max_episode_steps, **metadata},
        source=source,
    ).validate()


def episode_returns(
    task: str | TaskSpec,
    policy: ActionSource,
    num_episodes: int,
    seed: int = 0,
    num_envs: int = DEFAULT_NUM_ENVS,
) -> np.ndarray:
    """Undiscounted returns of ``num_episodes`` complete episodes, float64.

    Every environment runs a fixed share of the episodes to the end, so short (fallen)
    episodes are not over-represented as they would be by taking the first N to finish.
    """
    spec = get_task(task)
    num_episodes = _positive(num_episodes, "num_episodes")
    num_envs = min(_positive(num_envs, "num_envs"), num_episodes)
    quotas = [num_episodes // num_envs + (1 if i < num_episodes % num_envs else 0) for i in range(num_envs)]
    rng = np.random.default_rng([seed, 1])
    envs = [make_env(spec) for _ in range(num_envs)]
    returns: list[list[float]] = [[] for _ in range(num_envs)]
    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(_one_torch_thread())
        cleanup.callback(lambda: [env.close() for env in envs])
        observations = np.stack([env.reset(seed=s)[0] for env, s in zip(envs, _env_seeds(seed, num_envs))])
        running = np.zeros(num_envs)
        while any(len(done) < quota for done, quota in zip(returns, quotas)):
            actions = np.clip(policy.act(observations, rng), envs[0].action_space.low, envs[0].action_space.high)
            for i, env in enumerate(envs):
                if len(returns[i]) >= quotas[i]:
                    continue  # this environment's share is done; its row is ignored
                next_obs, reward, terminated, truncated, _ = env.step(actions[i])
                running[i] += reward
                if terminated or truncated:
                    returns[i].append(float(running[i]))
                    running[i] = 0.0
                    next_obs, _ = env.reset()
                observations[i] = next_obs
    return np.array([value for env_returns in returns for value in env_returns], dtype=np.float64)


def require_matching_spaces(task: str | TaskSpec, obs_dim: int, act_dim: int, what: str) -> None:
    """Fail early when a behaviour policy was built for another task."""
    env = make_env(task)
    try:
        task_obs, task_act = env.observation_space.shape[0], env.action_space.shape[0]
    finally:
        env.close()
    if (task_obs, task_act) != (obs_dim, act_dim):
        raise DatasetError(
            f"{what}: built for observations of {obs_dim} and actions of {act_dim} values, but task "
            f"{get_task(task).name!r} has {task_obs} and {task_act}"
        )
