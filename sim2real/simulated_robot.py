"""The virtual robot's simulation in the controller's own process, on a clock it is given.

With a :class:`kinema.sim2real.control_loop.FakeClock` this is the virtual robot in simulated time: the
simulation steps on the same grid of times (observation k at ``t0 + k * period``, each step applying the
newest action sent before it, holding the last one otherwise), but the grid advances only as the
controller's clock does, so inference costs nothing unless a test or benchmark says how long it takes.
Results are exactly reproducible and do not depend on the machine's load: benchmarks that study the
loop's logic (chunk seams under an injected delay) run here; those that study timing run against
:class:`kinema.sim2real.virtual_robot.VirtualRobot` in its own process.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kinema.sim2real.robot import Robot, RobotObservation
from kinema.sim2real.virtual_robot import VirtualRobotConfig, build_simulation


class SimulatedRobot(Robot):
    """A :class:`Robot` stepping its MuJoCo task on ``clock``'s time grid; see the module docstring."""

    def __init__(self, config: VirtualRobotConfig, clock: Any):
        if not config.task:
            raise ValueError("the simulated robot needs a task: VirtualRobotConfig(task='hopper')")
        self.config, self.clock = config, clock
        self.env = None
        self.counts = {"steps": 0, "held_actions": 0}

    def connect(self) -> None:
        self.env, self.spec = build_simulation(self.config)
        self.period = 1.0 / self.spec.rate_hz
        self.random = np.random.default_rng(self.config.seed)
        self.grid_start: float | None = None
        self.next_step = 0.0
        self.running = False
        self.reset_seed: int | None = None
        self.sequence = -1
        self.action, self.action_for = np.zeros(self.spec.act_dim), -1
        self.latest: RobotObservation | None = None

    def start_episode(self, seed: int | None = None) -> None:
        now = self.clock.now()
        if self.grid_start is None:
            self.grid_start = now
        steps = int(np.ceil((now - self.grid_start) / self.period + 1e-9))
        self.next_step = self.grid_start + steps * self.period  # the next point of the grid
        self.reset_seed = 0 if seed is None else int(seed)

    def _advance_to(self, moment: float) -> RobotObservation | None:
        """Step every grid point up to ``moment``; the newest observation published, if any."""
        newest = None
        while (self.running or self.reset_seed is not None) and self.next_step <= moment:
            stamp = self.next_step
            if self.reset_seed is not None:
                values, _ = self.env.reset(seed=self.reset_seed)
                self.reset_seed, self.running = None, True
                self.action, self.action_for = np.zeros(self.spec.act_dim), -1
                reward, terminated, truncated = None, False, False
            else:
                if self.action_for != self.sequence:
                    self.counts["held_actions"] += 1
                values, reward, terminated, truncated, _ = self.env.step(self.action)
                self.counts["steps"] += 1
                self.running = not (terminated or truncated)
            self.sequence += 1
            self.next_step += self.period
            if self.config.observation_noise_std:
                values = values + self.random.normal(0.0, self.config.observation_noise_std, size=np.shape(values))
            newest = RobotObservation(np.asarray(values, dtype=np.float64), stamp, self.sequence,
                                      None if reward is None else float(reward), bool(terminated), bool(truncated))
        return newest

    def get_observation(self, timeout_s: float) -> RobotObservation | None:
        until = self.clock.now() + timeout_s
        newest = self._advance_to(self.clock.now()) or self.latest  # or one published during a late send_action
        self.latest = None
        if newest is None and (self.running or self.reset_seed is not None) and self.next_step <= until:
            self.clock.sleep_until(self.next_step)
            newest = self._advance_to(self.next_step)
        if newest is None:
            self.clock.sleep_until(until)
        return newest

    def send_action(self, action: np.ndarray, sequence: int) -> None:
        # steps due before this moment used the previous action; what they published is read next
        self.latest = self._advance_to(self.clock.now()) or self.latest
        self.action, self.action_for = np.asarray(action, dtype=np.float64), sequence

    def estop(self) -> None:
        self.running = False

    def robot_counts(self) -> dict[str, int]:
        return dict(self.counts)

    def disconnect(self) -> None:
        if self.env is not None:
            self.env.close()
            self.env = None
