"""The robot interface the controller drives: specs, observations with timestamps, actions, e-stop.

A robot, real or virtual, implements :class:`Robot`. The controller calls ``connect`` once, then
each tick ``get_observation`` (the newest observation, or None when nothing new arrived in time)
and ``send_action``; ``estop`` at any time; ``disconnect`` at the end. ``start_episode`` begins an
episode where the robot can (the virtual robot resets its simulation; a real arm returns home or
refuses). Used as a context manager it connects on entry and disconnects on exit, whatever happened.

Timestamps are seconds of ``time.monotonic()`` on the controller's host: a robot whose driver has
its own clock converts on receipt, so the controller can measure observation age.

To plug in a real robot, subclass :class:`Robot` and fill in the five methods; the virtual robot
(``kinema.sim2real.virtual_robot``) is the worked example. Everything safety-related (limits, rate
limits, stale or non-finite values, the watchdog) is the controller's job, not the robot's.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kinema.policies import PolicySpec


@dataclass(frozen=True)
class JointLimit:
    """A joint the safety layer keeps inside [low, high]: its position is observation ``obs_index``,
    and action ``act_index`` drives it (positive action, positive motion)."""

    name: str
    obs_index: int
    act_index: int
    low: float
    high: float


@dataclass(frozen=True)
class RobotSpec:
    """What the robot observes and accepts, checked against the policy's spec on connect."""

    obs_dim: int
    act_dim: int
    action_low: tuple[float, ...]
    action_high: tuple[float, ...]
    rate_hz: float
    task: str | None = None
    provides_reward: bool = False
    joint_limits: tuple[JointLimit, ...] = ()
    episode_steps: int | None = None  # the episode limit, where the robot has one

    def to_dict(self) -> dict[str, Any]:
        return {"obs_dim": self.obs_dim, "act_dim": self.act_dim, "action_low": list(self.action_low),
                "action_high": list(self.action_high), "rate_hz": self.rate_hz, "task": self.task,
                "provides_reward": self.provides_reward, "episode_steps": self.episode_steps,
                "joint_limits": [vars(limit) for limit in self.joint_limits]}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "RobotSpec":
        values = dict(values)
        values["action_low"], values["action_high"] = tuple(values["action_low"]), tuple(values["action_high"])
        values["joint_limits"] = tuple(JointLimit(**limit) for limit in values.get("joint_limits", ()))
        return cls(**values)


@dataclass
class RobotObservation:
    """One observation: ``values`` (obs_dim,), ``timestamp`` (controller-host monotonic seconds),
    ``sequence`` (increasing per observation), the ``reward`` for the previous action where the robot
    computes one, and whether the episode ended with it (``terminated``: the task failed or finished;
    ``truncated``: the robot's episode limit)."""

    values: np.ndarray
    timestamp: float
    sequence: int
    reward: float | None = None
    terminated: bool = False
    truncated: bool = False
    info: dict[str, Any] = field(default_factory=dict)


class SpecMismatchError(ValueError):
    """The robot and the checkpoint disagree about shapes, limits or task."""


def check_robot_spec(robot: RobotSpec, policy: PolicySpec, task: str | None, needs_reward: bool) -> None:
    """Refuse a robot the policy was not trained for, naming the first field that differs."""
    if robot.obs_dim != policy.obs_dim:
        raise SpecMismatchError(f"obs_dim: the robot observes {robot.obs_dim} values, the checkpoint's policy {policy.obs_dim}")
    if robot.act_dim != policy.act_dim:
        raise SpecMismatchError(f"act_dim: the robot takes {robot.act_dim} actions, the checkpoint's policy {policy.act_dim}")
    for name in ("action_low", "action_high"):
        ours, theirs = np.asarray(getattr(robot, name), float), np.asarray(getattr(policy, name), float)
        if ours.shape != theirs.shape:
            raise SpecMismatchError(f"{name}: the robot gives {ours.shape[0]} bounds, the checkpoint {theirs.shape[0]}")
        differs = np.flatnonzero(~np.isclose(ours, theirs, rtol=0, atol=1e-6))
        if len(differs):
            index = int(differs[0])
            raise SpecMismatchError(f"{name}[{index}]: the robot's bound is {ours[index]:g}, the checkpoint's {theirs[index]:g}")
    if robot.task is not None and task is not None and robot.task != task:
        raise SpecMismatchError(f"task: the robot runs {robot.task!r}, the checkpoint was trained for {task!r}")
    if needs_reward and not robot.provides_reward:
        raise SpecMismatchError("provides_reward: the policy conditions on rewards every step, and this robot computes none; "
                                "give the robot a reward function of its observation")
    if not np.isfinite(robot.rate_hz) or robot.rate_hz <= 0:
        raise SpecMismatchError(f"rate_hz: the robot's control rate must be a positive number, got {robot.rate_hz!r}")
    for limit in robot.joint_limits:
        if not (0 <= limit.obs_index < robot.obs_dim and 0 <= limit.act_index < robot.act_dim and limit.low < limit.high):
            raise SpecMismatchError(f"joint_limits[{limit.name!r}]: indices ({limit.obs_index}, {limit.act_index}) or range "
                                    f"[{limit.low}, {limit.high}] do not fit obs_dim {robot.obs_dim}, act_dim {robot.act_dim}")


class RobotError(RuntimeError):
    """The robot stopped answering or failed; the controller goes to its safe state."""


class Robot(abc.ABC):
    """A robot the controller can drive; see the module docstring."""

    spec: RobotSpec

    @abc.abstractmethod
    def connect(self) -> None:
        """Open the connection; afterwards ``spec`` is valid."""

    @abc.abstractmethod
    def get_observation(self, timeout_s: float) -> RobotObservation | None:
        """The newest observation not returned before, waiting at most ``timeout_s``; None when none
        arrived. Raises :class:`RobotError` when the robot is gone."""

    @abc.abstractmethod
    def send_action(self, action: np.ndarray, sequence: int) -> None:
        """Send one action computed from observation ``sequence``; never blocks longer than a tick."""

    @abc.abstractmethod
    def estop(self) -> None:
        """Stop the robot now (it holds a safe state until a new episode starts)."""

    @abc.abstractmethod
    def disconnect(self) -> None:
        """Close the connection; safe to call twice."""

    def start_episode(self, seed: int | None = None) -> None:
        """Begin an episode. A robot that cannot reset itself leaves this as it is."""

    def __enter__(self) -> "Robot":
        self.connect()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.disconnect()
