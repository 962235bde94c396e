from __future__ import annotations

import numpy as np
import pytest
from gymnasium.vector import AutoresetMode

from kinema.envs import TaskSpec, get_task, list_tasks, make_env, make_vector_env, task_spaces


def test_builtin_tasks_carry_d4rl_references():
    assert list_tasks() == ["hopper", "halfcheetah", "walker2d", "ant", "humanoid"]
    hopper = get_task("hopper")
    assert (hopper.gym_id, hopper.max_episode_steps) == ("Hopper-v5", 1000)
    assert (hopper.d4rl_ref_min, hopper.d4rl_ref_max) == (-20.272305, 3234.3)
    assert (get_task("walker2d").d4rl_ref_min, get_task("walker2d").d4rl_ref_max) == (1.629008, 4592.3)
    assert (get_task("halfcheetah").d4rl_ref_min, get_task("halfcheetah").d4rl_ref_max) == (-280.178953, 12135.0)
    assert (get_task("ant").d4rl_ref_min, get_task("ant").d4rl_ref_max) == (-325.6, 3879.7)
    humanoid = get_task("humanoid")  # D4RL has no humanoid: no references
    assert (humanoid.gym_id, humanoid.d4rl_ref_min, humanoid.d4rl_ref_max) == ("Humanoid-v5", None, None)


def test_gymnasium_ids_resolve():
    assert get_task("Hopper-v5") is get_task("hopper")
    assert get_task("Ant-v5") is get_task("ant")
    swimmer = get_task("Swimmer-v5")
    assert (swimmer.name, swimmer.gym_id, swimmer.max_episode_steps) == ("Swimmer-v5", "Swimmer-v5", 1000)
    assert swimmer.d4rl_ref_min is None and swimmer.d4rl_ref_max is None
    assert get_task("Reacher-v5").max_episode_steps == 50  # the registered limit is kept
    custom = TaskSpec("short", "Hopper-v5", 7)
    assert get_task(custom) is custom


def test_unknown_task_error_lists_names():
    with pytest.raises(ValueError, match="unknown task 'hoper'") as error:
        get_task("hoper")
    assert "hopper" in str(error.value) and "walker2d" in str(error.value) and "Gymnasium id" in str(error.value)
    with pytest.raises(ValueError, match="task name or a TaskSpec"):
        get_task(3)


def test_task_spaces():
    assert task_spaces("hopper") == (11, 3, (-1.0, -1.0, -1.0), (1.0, 1.0, 1.0))
    obs_dim, act_dim, low, high = task_spaces("halfcheetah")
    assert (obs_dim, act_dim, len(low), len(high)) == (17, 6, 6, 6)
    # D4RL layout for ant: qpos[2:] + qvel without contact forces; Gymnasium's default is 105.
    assert task_spaces("ant")[:2] == (27, 8)
    assert task_spaces("ant", include_cfrc_ext_in_observation=True)[:2] == (105, 8)


def test_make_env_applies_the_time_limit():
    env = make_env(TaskSpec("swimmer-5", "Swimmer-v5", 5))
    env.reset(seed=0)
    truncated_at = None
    for step in range(1, 10):
        _, _, terminated, truncated, _ = env.step(np.zeros(env.action_space.shape, dtype=np.float32))
        assert not terminated
        if truncated:
            truncated_at = step
            break
    env.close()
    assert truncated_at == 5


def test_make_vector_env():
    vector_env = make_vector_env("hopper", 3)
    assert vector_env.num_envs == 3
    assert vector_env.autoreset_mode == AutoresetMode.NEXT_STEP
    assert vector_env.single_observation_space.shape == (11,)
    observations, _ = vector_env.reset(seed=[0, 1, 2])
    assert observations.shape == (3, 11)
    vector_env.close()
    with pytest.raises(ValueError, match="num_envs must be >= 1"):
        make_vector_env("hopper", 0)
