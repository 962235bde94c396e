"""The control loop against the virtual robot's simulation in simulated time: with instant inference and the
safety layer's limits not binding, it reproduces a plain evaluation episode exactly."""

from __future__ import annotations

import numpy as np
import pytest

from kinema.envs.registry import make_env
from kinema.sim2real.control_loop import ControlLoop, FakeClock, InlineInference, LoopConfig
from kinema.sim2real.safety import SafetyConfig, SafetyLayer
from kinema.sim2real.simulated_robot import SimulatedRobot
from kinema.sim2real.virtual_robot import VirtualRobotConfig

WEIGHTS = np.random.default_rng(0).normal(scale=0.3, size=(3, 11))


def linear_policy(observation: np.ndarray) -> np.ndarray:
    return np.tanh(WEIGHTS @ observation)


def plain_episode(seed: int) -> tuple[float, int]:
    env = make_env("hopper")
    observation, _ = env.reset(seed=seed)
    total, steps = 0.0, 0
    while True:
        observation, reward, terminated, truncated, _ = env.step(linear_policy(observation))
        total, steps = total + reward, steps + 1
        if terminated or truncated:
            return total, steps


def loop_episodes(episodes: int, compute_s: float = 0.0, seed: int = 0):
    clock = FakeClock()
    with SimulatedRobot(VirtualRobotConfig(task="hopper"), clock) as robot:
        safety = SafetyLayer(robot.spec, SafetyConfig(max_action_change=None))
        loop = ControlLoop(robot, InlineInference(lambda job: linear_policy(job.values.astype(np.float64)), clock, compute_s),
                           safety, LoopConfig(rate_hz=robot.spec.rate_hz, duration_s=100.0, episodes=episodes, seed=seed), clock=clock)
        return loop.run(), robot.robot_counts()


def test_the_loop_reproduces_plain_evaluation_in_simulated_time():
    report, counts = loop_episodes(2, seed=3)
    expected = [plain_episode(3), plain_episode(4)]
    assert report["final_state"] == "ok" and counts["held_actions"] == 0
    np.testing.assert_allclose(report["episode_returns"], [round(value, 3) for value, _ in expected])
    assert report["episode_lengths"] == [steps for _, steps in expected]


def test_an_action_later_than_the_send_deadline_is_never_sent():
    # 0.9 of a period: past the send deadline (0.8). Each late action is dropped, the safety layer acts instead
    report, counts = loop_episodes(1, compute_s=0.9 / 125, seed=3)
    assert report["policy_actions"] == 0 and report["safety_interventions"]["watchdog"] == 1
    assert report["safety_interventions"]["late_action"] >= report["ticks"] // 2
    assert report["episode_returns"][0] != pytest.approx(plain_episode(3)[0], abs=1.0)
