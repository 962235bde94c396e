"""Task registry: kinema task names over Gymnasium MuJoCo v5 environments.

A task is a Gymnasium id plus what kinema needs around it: the episode limit of the
D4RL protocol and the D4RL reference returns used by the normalised score. Any other
registered Gymnasium id also works as a task; it simply has no D4RL references.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import gymnasium
from gymnasium.vector import AutoresetMode, SyncVectorEnv


@dataclass(frozen=True)
class TaskSpec:
    """One evaluation task.

    ``env_kwargs`` are passed to ``gymnasium.make`` (as ``(key, value)`` pairs so the spec
    stays hashable); keyword arguments given to ``make_env`` override them.
    """

    name: str
    gym_id: str
    max_episode_steps: int
    d4rl_ref_min: float | None = None
    d4rl_ref_max: float | None = None
    env_kwargs: tuple[tuple[str, Any], ...] = ()
    # The Decision Transformer paper's evaluation target for D4RL's own files (eval.target_return=task).
    target_return: float | None = None


# D4RL reference returns (d4rl/infos.py, identical for v0-v2): random and expert policy.
# Target returns: the DT paper's higher targets (hopper 3600, halfcheetah 12000, walker2d 5000;
# their lower ones are half of these); ant 6000 (DT's ant experiments).
_BUILTIN_TASKS = (
    TaskSpec("hopper", "Hopper-v5", 1000, -20.272305, 3234.3, target_return=3600.0),
    TaskSpec("halfcheetah", "HalfCheetah-v5", 1000, -280.178953, 12135.0, target_return=12000.0),
    TaskSpec("walker2d", "Walker2d-v5", 1000, 1.629008, 4592.3, target_return=5000.0),
    # Ant-v5 observes 105 values by default: qpos[2:] (13) + qvel (14) + cfrc_ext of 13
    # bodies (78). D4RL's ant files hold 111 columns: the same 27 first, then 84 contact
    # forces that mujoco-py 2.x left at zero. kinema's ant therefore drops the contact
    # forces: its 27-dim observation equals the first 27 columns of a D4RL ant file.
    # (The reward still pays the contact cost; v5 computes it either way.) Minari's
    # mujoco/ant datasets use the 105-dim default: make_env("ant",
    # include_cfrc_ext_in_observation=True) reproduces that environment.
    TaskSpec("ant", "Ant-v5", 1000, -325.6, 3879.7, (("include_cfrc_ext_in_observation", False),), target_return=6000.0),
    # Humanoid-v5 with Gymnasium's default 348-dim observation (qpos[2:], qvel, and per-body
    # cinert, cvel, cfrc_ext and per-DoF qfrc_actuator): D4RL has no humanoid, so no references.
    TaskSpec("humanoid", "Humanoid-v5", 1000),
)
TASKS: dict[str, TaskSpec] = {task.name: task for task in _BUILTIN_TASKS}


def list_tasks() -> list[str]:
    """The kinema task names (any registered Gymnasium id is accepted too)."""
    return list(TASKS)


def get_task(task: str | TaskSpec) -> TaskSpec:
    """Resolve a kinema task name, or a Gymnasium id, to a TaskSpec.

    A Gymnasium id of a built-in task ("Hopper-v5") maps to that task, so it keeps its
    D4RL references and environment settings.
    """
    if isinstance(task, TaskSpec):
        return task
    if not isinstance(task, str):
        raise ValueError(f"task must be a task name or a TaskSpec, got {type(task).__name__}")
    if task in TASKS:
        return TASKS[task]
    for spec in _BUILTIN_TASKS:
        if spec.gym_id == task:
            return spec
    if task in gymnasium.registry:
        registered = gymnasium.registry[task]
        # Gymnasium ids without a registered limit get the D4RL protocol's 1000 steps.
        max_steps = registered.max_episode_steps or 1000
        return TaskSpec(name=task, gym_id=task, max_episode_steps=max_steps)
    raise ValueError(
        f"unknown task {task!r}: expected one of the kinema tasks {list_tasks()} "
        f"or any registered Gymnasium id (e.g. 'Swimmer-v5')"
    )


def make_env(task: str | TaskSpec, render_mode: str | None = None, randomization: Any = None, **kwargs: Any) -> gymnasium.Env:
    """One environment of the task, wrapped in a TimeLimit of ``max_episode_steps``, and in
    ``kinema.envs.randomization.DomainRandomization`` when a non-nominal ``randomization`` profile is given."""
    spec = get_task(task)
    env_kwargs = {**dict(spec.env_kwargs), **kwargs}
    env = gymnasium.make(
        spec.gym_id, max_episode_steps=spec.max_episode_steps, render_mode=render_mode, **env_kwargs
    )
    if randomization is not None and not randomization.is_nominal:
        from kinema.envs.randomization import DomainRandomization

        env = DomainRandomization(env, randomization)
    return env


def make_vector_env(
    task: str | TaskSpec,
    num_envs: int,
    render_mode: str | None = None,
    autoreset_mode: AutoresetMode = AutoresetMode.NEXT_STEP,
    **env_kwargs: Any,
) -> SyncVectorEnv:
    """``num_envs`` copies of the task stepped in one process; ``env_kwargs`` go to ``make_env``.

    Sync, not async: a MuJoCo locomotion step costs ~0.2 ms, far less than the
    inter-process round trip of AsyncVectorEnv, and the target machines have two cores
    that the policy's forward pass already uses. A render mode costs nothing until
    ``render()`` is called (MuJoCo's viewer is created lazily).
    """
    if num_envs < 1:
        raise ValueError(f"num_envs must be >= 1, got {num_envs}")
    spec = get_task(task)
    return SyncVectorEnv(
        [lambda: make_env(spec, render_mode=render_mode, **env_kwargs) for _ in range(num_envs)],
        autoreset_mode=autoreset_mode,
    )


def task_spaces(task: str | TaskSpec, **env_kwargs: Any) -> tuple[int, int, tuple[float, ...], tuple[float, ...]]:
    """(obs_dim, act_dim, action_low, action_high) of the task, to build a PolicySpec."""
    env = make_env(task, **env_kwargs)
    try:
        obs_space, act_space = env.observation_space, env.action_space
        if len(obs_space.shape) != 1 or len(act_space.shape) != 1:
            raise ValueError(
                f"task {get_task(task).name!r}: kinema needs flat Box observations and actions, "
                f"got observation shape {obs_space.shape} and action shape {act_space.shape}"
            )
        low = tuple(float(x) for x in act_space.low)
        high = tuple(float(x) for x in act_space.high)
        return int(obs_space.shape[0]), int(act_space.shape[0]), low, high
    finally:
        env.close()
