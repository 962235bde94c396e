"""The fixed-rate control loop: observation in, safe action out, on absolute deadlines.

Tick k starts at ``anchor + k * period``, where the anchor is the first observation's timestamp plus
a small phase offset, so each tick reads the observation the robot has just published (both sides
keep the same monotonic clock; a robot with its own clock converts its timestamps on receipt). The
loop sleeps until the tick, then spins for the last stretch (``Clock.sleep_until``), and each tick:

1. collects a result the policy finished late (it is dropped: its observation is gone) and reads the
   newest observation, waiting at most until ``observation_wait`` of the period;
2. checks it (the safety layer refuses non-finite, misshapen or stale ones) and hands it to the
   inference worker when the worker is idle; rewards of observations the policy did not see are
   summed into the next one it sees, so a return-conditioned policy keeps its return-to-go right;
3. waits for the action until ``send_deadline`` of the period, never longer. A missing or late action
   is replaced by the safety layer's safe action and counted (``late_action``), so the loop never
   blocks on inference;
4. filters the action (limits, rate limit, joint limits, watchdog, e-stop), applies the soft start,
   and sends it, unless ``dry_run``.

A tick that starts more than a period late is an overrun: it is counted as a deadline miss and the
schedule skips the missed ticks instead of bursting to catch up (ros2_control does the same). The
robot failing (``RobotError``) or sending nothing for ``robot_lost_s`` ends the run in ``robot_lost``;
a policy that raises ends it in ``policy_error``; both e-stop the robot first.

Time comes from a :class:`Clock`; tests pass a :class:`FakeClock` and an :class:`InlineInference`
with scripted compute times, so nothing in them depends on the machine's timing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from kinema.sim2real.robot import Robot, RobotError, RobotObservation
from kinema.sim2real.safety import SafetyLayer

log = logging.getLogger(__name__)

FINAL_STATES = ("ok", "estop", "robot_lost", "policy_error", "interrupted")


# -- clocks -------------------------------------------------------------------------------------------
class MonotonicClock:
    """``time.monotonic``; ``sleep_until`` sleeps, then spins the last ``spin_s`` (sleep overshoots by
    tens of microseconds to milliseconds, depending on the OS)."""

    def __init__(self, spin_s: float = 0.0005):
        self.spin_s = spin_s

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining > self.spin_s:
            time.sleep(remaining - self.spin_s)
        while time.monotonic() < deadline:
            pass


class FakeClock:
    """A clock that moves only when told to: ``sleep_until`` and ``advance`` jump it forward."""

    def __init__(self, start: float = 1000.0):
        self.time = float(start)

    def now(self) -> float:
        return self.time

    def sleep_until(self, deadline: float) -> None:
        self.time = max(self.time, float(deadline))

    def advance(self, seconds: float) -> None:
        self.time += float(seconds)


# -- inference ------------------------------------------------------------------------------------------
@dataclass
class InferenceJob:
    """One observation for the policy: ``reward`` is the summed reward since the last observation it
    saw (None at an episode's start), ``new_episode`` restarts its context first."""

    values: np.ndarray
    sequence: int
    reward: float | None
    new_episode: bool
    committed: np.ndarray | None = None  # chunked policies: actions already committed for the steps ahead


@dataclass
class InferenceResult:
    action: np.ndarray | None
    sequence: int
    started: float
    finished: float
    error: BaseException | None = None


class InlineInference:
    """Computes each job at once and makes the result available ``compute_s(job)`` seconds of the clock
    later: deterministic, for tests and for a synchronous loop."""

    def __init__(self, compute: Callable[[InferenceJob], np.ndarray], clock: Any,
                 compute_s: Callable[[InferenceJob], float] | float = 0.0):
        self.compute, self.clock = compute, clock
        self.compute_s = compute_s if callable(compute_s) else (lambda job, s=float(compute_s): s)
        self.pending: InferenceResult | None = None

    @property
    def busy(self) -> bool:
        return self.pending is not None

    def submit(self, job: InferenceJob) -> None:
        started = self.clock.now()
        try:
            action, error = self.compute(job), None
        except Exception as exc:  # reported by the loop as policy_error
            action, error = None, exc
        finished = max(started + float(self.compute_s(job)), self.clock.now())  # a compute that moved the clock took that long
        self.pending = InferenceResult(action, job.sequence, started, finished, error)

    def poll(self, until: float) -> InferenceResult | None:
        """The finished result if it is ready by ``until`` (the clock then stands at its finish)."""
        if self.pending is None or self.pending.finished > until:
            return None
        result, self.pending = self.pending, None
        self.clock.sleep_until(result.finished)
        return result

    def close(self) -> None:
        pass


class ThreadedInference:
    """Runs the policy in a worker thread, so a slow step never holds up a tick; ``poll`` waits for the
    result at most until ``until``."""

    def __init__(self, compute: Callable[[InferenceJob], np.ndarray], clock: Any = None):
        self.compute, self.clock = compute, clock or MonotonicClock()
        self.jobs: queue.Queue[InferenceJob | None] = queue.Queue(maxsize=1)
        self.results: queue.Queue[InferenceResult] = queue.Queue(maxsize=1)
        self.busy = False
        self.thread = threading.Thread(target=self._serve, name="kinema-inference", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            started = self.clock.now()
            try:
                action, error = self.compute(job), None
            except Exception as exc:
                action, error = None, exc
            self.results.put(InferenceResult(action, job.sequence, started, self.clock.now(), error))

    def submit(self, job: InferenceJob) -> None:
        if self.busy:
            raise RuntimeError("the inference worker is still busy; poll() its result first")
        self.busy = True
        self.jobs.put(job)

    def poll(self, until: float) -> InferenceResult | None:
        if not self.busy:
            return None
        try:
            result = self.results.get(timeout=max(0.0, until - self.clock.now()))
        except queue.Empty:
            return None
        self.busy = False
        return result

    def close(self) -> None:
        try:
            self.jobs.put_nowait(None)
        except queue.Full:  # a job is still queued: the daemon thread ends with the process
            pass


# -- the policy side ------------------------------------------------------------------------------------
class PolicyStepper:
    """Turns inference jobs into one environment's actions on a runtime (or anything with the runtime's
    ``act``/``observe_reward``/``end_episode``): rewards go to the policy before its next action."""

    def __init__(self, runtime: Any):
        self.runtime = runtime
        self.acted = False  # the policy acted in this episode and waits for that action's reward

    def __call__(self, job: InferenceJob) -> np.ndarray:
        if job.new_episode:
            if self.acted:
                self.runtime.end_episode(np.array([0]))
            self.acted = False
        elif self.acted and job.reward is not None:
            self.runtime.observe_reward(np.array([job.reward], dtype=np.float32))
        action = np.asarray(self.runtime.act(np.asarray(job.values, dtype=np.float32)[None]))[0]
        self.acted = True
        return action


# -- the loop ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoopConfig:
    rate_hz: float
    duration_s: float
    phase_offset: float = 0.1  # of a period, after the observation's timestamp: transport time
    observation_wait: float = 0.5  # of a period: how long a tick waits for a new observation
    send_deadline: float = 0.8  # of a period: the latest a tick waits for the policy's action
    soft_start_s: float = 0.0
    dry_run: bool = False
    robot_lost_s: float = 0.5
    first_observation_timeout_s: float = 10.0
    episodes: int | None = None  # stop once this many episodes have ended (None: run for duration_s)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("rate_hz", "duration_s", "robot_lost_s", "first_observation_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and np.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("phase_offset", "observation_wait", "send_deadline"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and 0 <= value < 1):
                raise ValueError(f"{name} must be a fraction of the period in [0, 1), got {value!r}")
        if self.phase_offset + self.observation_wait > self.send_deadline:
            raise ValueError(f"phase_offset + observation_wait ({self.phase_offset} + {self.observation_wait}) must not pass "
                             f"send_deadline ({self.send_deadline}): the action must be computable before it is due")
        if self.episodes is not None and (isinstance(self.episodes, bool) or not isinstance(self.episodes, int) or self.episodes < 1):
            raise ValueError(f"episodes must be a positive integer or None, got {self.episodes!r}")
        if not (isinstance(self.soft_start_s, (int, float)) and self.soft_start_s >= 0):
            raise ValueError(f"soft_start_s must be >= 0, got {self.soft_start_s!r}")


@dataclass
class TickLog:
    """Per-tick arrays (NaN where a tick had no such value)."""

    time: list[float] = field(default_factory=list)
    lateness: list[float] = field(default_factory=list)  # tick start minus its deadline
    observation_age: list[float] = field(default_factory=list)
    inference: list[float] = field(default_factory=list)  # compute time of the action sent this tick
    policy_action: list[bool] = field(default_factory=list)  # the policy's (filtered) action, not a safe one
    actions: list[np.ndarray] = field(default_factory=list)
    sequence: list[int] = field(default_factory=list)  # the observation's sequence (-1: none this tick)

    def add(self, time: float, lateness: float, age: float, inference: float, from_policy: bool, action: np.ndarray,
            sequence: int = -1) -> None:
        self.sequence.append(sequence)
        self.time.append(time)
        self.lateness.append(lateness)
        self.observation_age.append(age)
        self.inference.append(inference)
        self.policy_action.append(from_policy)
        self.actions.append(action)

    def arrays(self) -> dict[str, np.ndarray]:
        return {"time": np.asarray(self.time), "lateness": np.asarray(self.lateness),
                "observation_age": np.asarray(self.observation_age), "inference": np.asarray(self.inference),
                "policy_action": np.asarray(self.policy_action), "actions": np.asarray(self.actions),
                "sequence": np.asarray(self.sequence, dtype=np.int64)}


@dataclass
class Transition:
    """What a recorder receives for each observation the loop used, with the action sent for it."""

    observation: RobotObservation
    action: np.ndarray
    intervened: bool


class ControlLoop:
    """Drives ``robot`` with ``inference`` at ``config.rate_hz`` through ``safety``; ``run()`` returns the
    report (see :meth:`report`). ``on_transition`` receives each used observation with its sent action."""

    def __init__(self, robot: Robot, inference: Any, safety: SafetyLayer, config: LoopConfig, clock: Any = None,
                 on_transition: Callable[[Transition], None] | None = None):
        self.robot, self.inference, self.safety, self.config = robot, inference, safety, config
        self.clock = clock or MonotonicClock()
        self.on_transition = on_transition
        self.period = 1.0 / config.rate_hz
        self.log = TickLog()
        self.deadline_misses = 0
        self.ticks = 0
        self.episode_returns: list[float] = []
        self.episode_lengths: list[int] = []
        self.final_state = "ok"
        self.final_reason = ""
        self._episode_return = 0.0
        self._episode_length = 0
        self._unseen_reward: float | None = None
        self._new_episode = True
        self._last_observation_at: float | None = None
        self._episodes_started = 0

    # -- helpers ----------------------------------------------------------------------------------------
    def _stop(self, state: str, reason: str, tick: int) -> None:
        if self.final_state == "ok":
            self.final_state, self.final_reason = state, reason
            log.error("control loop: %s at tick %d: %s", state, tick, reason)
        self.safety.trigger_estop(tick, state)
        try:
            self.robot.estop()
        except Exception as exc:  # the robot may already be gone; the state says so
            log.error("control loop: e-stop could not reach the robot: %s", exc)

    def _start_episode(self) -> None:
        self.robot.start_episode(seed=self.config.seed + self._episodes_started)
        self._episodes_started += 1
        self._new_episode, self._unseen_reward = True, None
        self._episode_return, self._episode_length = 0.0, 0

    def _soft_start(self, action: np.ndarray, now: float) -> np.ndarray:
        if self.config.soft_start_s <= 0:
            return action
        fraction = min(1.0, max(0.0, (now - self.started_at) / self.config.soft_start_s))
        return self.start_command + fraction * (action - self.start_command)

    # -- the run ----------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        first = None
        try:
            self._start_episode()
            first = self.robot.get_observation(timeout_s=self.config.first_observation_timeout_s)
        except RobotError as exc:
            self._stop("robot_lost", f"the robot failed before the first observation: {exc}", 0)
        if first is None and self.final_state == "ok":
            self._stop("robot_lost", f"no observation within {self.config.first_observation_timeout_s} s of starting", 0)
        if first is not None:
            self._loop(first)
        self.inference.close()
        return self.report()

    def _loop(self, first: RobotObservation) -> None:
        config, clock = self.config, self.clock
        anchor = first.timestamp + config.phase_offset * self.period
        total_ticks = max(1, int(round(config.duration_s * config.rate_hz)))
        self.started_at = clock.now()
        self.start_command = np.zeros(self.robot.spec.act_dim)
        self.safety.start(self.started_at)
        self._last_observation_at = self.started_at
        pending_first: RobotObservation | None = first
        tick = 0
        try:
            while tick < total_ticks:
                deadline = anchor + tick * self.period
                clock.sleep_until(deadline)
                now = clock.now()
                lateness = now - deadline
                if lateness > self.period:  # an overrun: skip the missed ticks rather than burst
                    skipped = int(lateness // self.period)
                    self.deadline_misses += skipped
                    tick += skipped
                    continue
                observation = pending_first or self.robot.get_observation(
                    timeout_s=max(0.0, deadline + config.observation_wait * self.period - clock.now()))
                pending_first = None
                self._tick(tick, deadline, lateness, observation)
                if self.final_state != "ok":
                    break
                tick += 1
                if config.episodes is not None and len(self.episode_returns) >= config.episodes:
                    break
        except RobotError as exc:
            self._stop("robot_lost", str(exc), tick)
        except KeyboardInterrupt:
            self._stop("interrupted", "interrupted by the operator", tick)
        self.ticks = tick

    def _tick(self, tick: int, deadline: float, lateness: float, observation: RobotObservation | None) -> None:
        config, clock, safety = self.config, self.clock, self.safety
        late = self.inference.poll(until=clock.now())  # already counted as late_action: its moment has passed
        if late is not None and late.error is not None:
            self._stop("policy_error", f"the policy raised {type(late.error).__name__}: {late.error}", tick)
            return
        now = clock.now()
        usable = False
        if observation is not None:
            self._last_observation_at = now
            self._account_reward(observation)
            usable = safety.check_observation(tick, observation, now)
        elif now - self._last_observation_at > config.robot_lost_s:
            self._stop("robot_lost", f"no observation for {(now - self._last_observation_at) * 1e3:.0f} ms", tick)
            return
        else:
            safety.record(tick, "observation_missing", "no new observation by the tick's wait limit")
        episode_over = observation is not None and (observation.terminated or observation.truncated)
        result = None
        if usable and not episode_over and not safety.estopped:
            if self.inference.busy:
                safety.record(tick, "inference_busy", f"observation {observation.sequence} skipped")
            else:
                self.inference.submit(InferenceJob(np.asarray(observation.values, dtype=np.float32), observation.sequence,
                                                   self._unseen_reward, self._new_episode))
                self._new_episode, self._unseen_reward = False, None
                result = self.inference.poll(until=deadline + config.send_deadline * self.period)
                if result is None:
                    safety.record(tick, "late_action", f"no action for observation {observation.sequence} by the send deadline")
                elif result.error is not None:
                    self._stop("policy_error", f"the policy raised {type(result.error).__name__}: {result.error}", tick)
                    return
        now = clock.now()
        proposed = None if result is None else self._soft_start(np.asarray(result.action, dtype=np.float64), now)
        values = None if observation is None else np.asarray(observation.values, dtype=np.float64)
        action, from_policy = safety.command(tick, proposed, values, now)
        if not config.dry_run:
            self.robot.send_action(action, -1 if observation is None else observation.sequence)
        age = np.nan if observation is None else now - observation.timestamp
        inference = np.nan if result is None else result.finished - result.started
        self.log.add(now, lateness, age, inference, from_policy, action, -1 if observation is None else observation.sequence)
        if observation is not None and self.on_transition is not None:
            self.on_transition(Transition(observation, action, not from_policy))
        if episode_over:
            self.episode_returns.append(self._episode_return)
            self.episode_lengths.append(self._episode_length)
            self._start_episode()

    def _account_reward(self, observation: RobotObservation) -> None:
        """An observation's reward is that of the previous action (None at an episode's first)."""
        if observation.reward is None:
            return
        reward = float(observation.reward)
        self._episode_return += reward
        self._episode_length += 1
        self._unseen_reward = reward + (self._unseen_reward or 0.0)

    # -- the report -------------------------------------------------------------------------------------------
    def report(self) -> dict[str, Any]:
        arrays = self.log.arrays()

        def percentile_us(values: np.ndarray, q: float) -> float | None:
            values = values[np.isfinite(values)] if len(values) else values
            return None if not len(values) else round(float(np.percentile(values, q)) * 1e6, 1)

        jitter = np.abs(arrays["lateness"])
        return {
            "rate_hz": self.config.rate_hz,
            "duration_s": self.config.duration_s,
            "ticks": self.ticks,
            "deadline_misses": self.deadline_misses,
            "jitter_us_p50": percentile_us(jitter, 50),
            "jitter_us_p99": percentile_us(jitter, 99),
            "latency_us_p50": percentile_us(arrays["inference"], 50),
            "latency_us_p99": percentile_us(arrays["inference"], 99),
            "observation_age_us_p50": percentile_us(arrays["observation_age"], 50),
            "observation_age_us_p99": percentile_us(arrays["observation_age"], 99),
            "policy_actions": int(arrays["policy_action"].sum()) if len(arrays["policy_action"]) else 0,
            "safety_interventions": self.safety.report(),
            "episode_returns": [round(value, 3) for value in self.episode_returns],
            "episode_lengths": self.episode_lengths,
            "final_state": self.final_state,
            "final_reason": self.final_reason,
            "dry_run": self.config.dry_run,
        }
