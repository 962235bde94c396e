"""The safety layer between the policy and the robot: what may reach the robot, and what happens instead.

Every tick the controller asks the layer three things:

- is this observation usable? Non-finite values, the wrong shape and observations older than
  ``max_observation_age_s`` are refused (the policy never sees them);
- what may be sent? The policy's action is refused when non-finite (the safe action goes instead),
  clamped to the action limits, limited in its change per tick (``max_action_change``, a fraction of
  each action's range; ros2_control and LeRobot's ``max_relative_target`` keep such limits on by
  default), and a joint past its limit (by more than ``joint_limit_margin``) is not pushed further out;
- is the watchdog satisfied? When no fresh observation, or no fresh policy action, arrived for
  ``watchdog_periods`` periods, the layer is in its safe state: the safe action is sent every tick
  until both are fresh again.

The safe action holds the last action sent (``safe_action: hold``) or decays it geometrically to
zero (``damp``, by ``damping`` per tick). The e-stop latches: once triggered, only the safe stop is
sent until ``reset_estop()`` is called explicitly. Every intervention is logged with its tick and
reason and counted.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from kinema.sim2real.robot import RobotObservation, RobotSpec

log = logging.getLogger(__name__)

SAFE_ACTIONS = ("hold", "damp")
MAX_LOGGED_INTERVENTIONS = 10_000  # the counts stay exact beyond it; the detailed log stops growing


@dataclass
class SafetyConfig:
    """The safety layer's settings (``safety.*`` in kinema-deploy's config), checked on construction."""

    max_observation_age_s: Optional[float] = None  # None: 1.5 control periods
    max_action_change: Optional[float] = 0.5  # per tick, as a fraction of each action's range; None: off
    safe_action: str = "damp"
    damping: float = 0.5  # the safe action's decay per tick in "damp" mode
    watchdog_periods: float = 2.0
    # How far past its range (radians or metres) a joint may be before the layer stops pushing it further out.
    # Simulated limits are soft: an expert hopper presses its foot up to 0.12 rad past its range in normal gait.
    joint_limit_margin: float = 0.15

    def __post_init__(self) -> None:
        if self.safe_action not in SAFE_ACTIONS:
            raise ValueError(f"safety.safe_action must be one of {SAFE_ACTIONS}, got {self.safe_action!r}")
        for name in ("max_observation_age_s", "max_action_change"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"safety.{name} must be a positive number or null, got {value!r}")
        if not (isinstance(self.damping, (int, float)) and 0 <= self.damping < 1):
            raise ValueError(f"safety.damping must be in [0, 1), got {self.damping!r}")
        if not (isinstance(self.joint_limit_margin, (int, float)) and np.isfinite(self.joint_limit_margin) and self.joint_limit_margin >= 0):
            raise ValueError(f"safety.joint_limit_margin must be a number >= 0, got {self.joint_limit_margin!r}")
        if not (isinstance(self.watchdog_periods, (int, float)) and 1 <= self.watchdog_periods <= 100):
            raise ValueError(f"safety.watchdog_periods must be in [1, 100], got {self.watchdog_periods!r}")


class SafetyLayer:
    """Filters observations and actions for one robot; counts and logs each intervention."""

    def __init__(self, spec: RobotSpec, config: SafetyConfig | None = None):
        self.spec, self.config = spec, config or SafetyConfig()
        self.period_s = 1.0 / spec.rate_hz
        self.max_age_s = self.config.max_observation_age_s or 1.5 * self.period_s
        self.low = np.asarray(spec.action_low, dtype=np.float64)
        self.high = np.asarray(spec.action_high, dtype=np.float64)
        self.max_change = None if self.config.max_action_change is None else self.config.max_action_change * (self.high - self.low)
        self.watchdog_s = self.config.watchdog_periods * self.period_s
        self.counts: Counter[str] = Counter()
        self.interventions: list[dict[str, Any]] = []
        self.last_sent = np.zeros(spec.act_dim)
        self.estop_reason: str | None = None
        self.last_fresh_observation: float | None = None
        self.last_fresh_action: float | None = None
        self.in_safe_state = False

    # -- bookkeeping ----------------------------------------------------------------------------------
    def record(self, tick: int, reason: str, detail: str = "") -> None:
        self.counts[reason] += 1
        if len(self.interventions) < MAX_LOGGED_INTERVENTIONS:
            self.interventions.append({"tick": tick, "reason": reason, "detail": detail})
        if self.counts[reason] == 1:  # the first of each kind is worth a line; all are in the report
            log.warning("safety: %s at tick %d%s", reason, tick, f" ({detail})" if detail else "")

    def start(self, now: float, observation: RobotObservation | None = None) -> None:
        """Arm the watchdog from ``now``; the held action starts at zero, or at the robot's own command."""
        self.last_fresh_observation = self.last_fresh_action = now
        self.in_safe_state = False

    # -- observations ---------------------------------------------------------------------------------
    def check_observation(self, tick: int, observation: RobotObservation, now: float) -> bool:
        """True when the observation may reach the policy; otherwise the refusal is recorded."""
        values = np.asarray(observation.values)
        if values.shape != (self.spec.obs_dim,):
            self.record(tick, "observation_shape", f"expected ({self.spec.obs_dim},), got {values.shape}")
            return False
        bad = np.flatnonzero(~np.isfinite(values))
        if len(bad):
            self.record(tick, "observation_nonfinite", f"index {int(bad[0])} is {values[bad[0]]}")
            return False
        age = now - observation.timestamp
        if age > self.max_age_s:
            self.record(tick, "observation_stale", f"{age * 1e3:.1f} ms old, limit {self.max_age_s * 1e3:.1f} ms")
            return False
        self.last_fresh_observation = now
        return True

    # -- actions --------------------------------------------------------------------------------------
    def safe_action(self) -> np.ndarray:
        if self.config.safe_action == "hold" and self.estop_reason is None:
            return self.last_sent.copy()
        return self.last_sent * self.config.damping  # damping, and always after an e-stop: towards zero

    def command(self, tick: int, proposed: Any, observation: np.ndarray | None, now: float) -> tuple[np.ndarray, bool]:
        """(what is sent this tick, whether it is the policy's action, within limits) given the policy's
        ``proposed`` action (None: it has none in time)."""
        if proposed is not None:
            proposed = np.asarray(proposed, dtype=np.float64).reshape(-1)
            if proposed.shape != (self.spec.act_dim,):
                self.record(tick, "action_shape", f"expected ({self.spec.act_dim},), got {proposed.shape}")
                proposed = None
            elif not np.all(np.isfinite(proposed)):
                index = int(np.flatnonzero(~np.isfinite(proposed))[0])
                self.record(tick, "action_nonfinite", f"index {index} is {proposed[index]}")
                proposed = None
            else:
                self.last_fresh_action = now
        if self.watchdog(tick, now) or proposed is None or self.estopped:
            return self.send_safe(tick), False
        clamped = np.clip(proposed, self.low, self.high)
        if not np.array_equal(clamped, proposed):
            index = int(np.flatnonzero(clamped != proposed)[0])
            self.record(tick, "action_limit", f"index {index}: {proposed[index]:.4g} clamped to {clamped[index]:.4g}")
        if self.max_change is not None:
            limited = np.clip(clamped, self.last_sent - self.max_change, self.last_sent + self.max_change)
            if not np.array_equal(limited, clamped):
                index = int(np.flatnonzero(limited != clamped)[0])
                self.record(tick, "rate_limit", f"index {index}: change {clamped[index] - self.last_sent[index]:.4g} limited")
            clamped = limited
        if observation is not None:
            clamped = self._keep_joints_inside(tick, clamped, observation)
        return self._sent(clamped), True

    def _keep_joints_inside(self, tick: int, action: np.ndarray, observation: np.ndarray) -> np.ndarray:
        margin = self.config.joint_limit_margin
        for limit in self.spec.joint_limits:
            position, command = observation[limit.obs_index], action[limit.act_index]
            if (position >= limit.high + margin and command > 0) or (position <= limit.low - margin and command < 0):
                action = action.copy()
                action[limit.act_index] = 0.0
                self.record(tick, "joint_limit", f"{limit.name} at {position:.4g}, outside [{limit.low:.4g}, {limit.high:.4g}]")
        return action

    def send_safe(self, tick: int) -> np.ndarray:
        return self._sent(self.safe_action())

    def _sent(self, action: np.ndarray) -> np.ndarray:
        self.last_sent = np.asarray(action, dtype=np.float64)
        return self.last_sent.copy()

    # -- watchdog and e-stop --------------------------------------------------------------------------
    def watchdog(self, tick: int, now: float) -> bool:
        """True while the layer is in its safe state because observations or the policy stalled."""
        stalled = [what for what, last in (("observations", self.last_fresh_observation), ("policy", self.last_fresh_action))
                   if last is not None and now - last > self.watchdog_s]
        if stalled and not self.in_safe_state:
            self.record(tick, "watchdog", f"no fresh {' or '.join(stalled)} for over {self.watchdog_s * 1e3:.1f} ms")
        self.in_safe_state = bool(stalled)
        return self.in_safe_state

    def trigger_estop(self, tick: int, reason: str) -> None:
        if self.estop_reason is None:
            self.estop_reason = reason
            self.record(tick, "estop", reason)

    @property
    def estopped(self) -> bool:
        return self.estop_reason is not None

    def reset_estop(self) -> None:
        """Release a latched e-stop: an explicit operator decision, never automatic."""
        if self.estop_reason is not None:
            log.warning("safety: e-stop (%s) reset", self.estop_reason)
        self.estop_reason = None

    def report(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))
