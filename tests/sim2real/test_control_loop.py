"""The control loop and safety layer under fault injection, on a fake clock: nothing here depends on timing."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from kinema.policies import PolicySpec
from kinema.sim2real.control_loop import (ControlLoop, FakeClock, InferenceJob, InlineInference, LoopConfig, PolicyStepper,
                                          ThreadedInference)
from kinema.sim2real.robot import JointLimit, Robot, RobotError, RobotObservation, RobotSpec, SpecMismatchError, check_robot_spec
from kinema.sim2real.safety import SafetyConfig, SafetyLayer

RATE = 100.0
PERIOD = 1.0 / RATE


class ScriptedRobot(Robot):
    """Publishes observation k at t0 + k * period (arriving ``latency_s`` later) on a fake clock.

    Observation values are [step in episode, sequence, 0]; every step pays reward 1 and an episode ends
    (terminated) after ``episode_steps`` steps. Faults: ``drop`` (sequences never delivered), ``nan_at``,
    ``dies_at`` (raises RobotError once the clock passes that sequence's time), ``silent_from``.
    """

    def __init__(self, clock: FakeClock, episode_steps: int = 1000, latency_s: float = 0.0, drop: set[int] = frozenset(),
                 nan_at: set[int] = frozenset(), dies_at: int | None = None, silent_from: int | None = None,
                 joint_limits: tuple[JointLimit, ...] = ()):
        self.clock, self.episode_steps, self.latency_s = clock, episode_steps, latency_s
        self.drop, self.nan_at, self.dies_at, self.silent_from = set(drop), set(nan_at), dies_at, silent_from
        self.spec = RobotSpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0), rate_hz=RATE,
                              task="scripted", provides_reward=True, joint_limits=joint_limits)
        self.t0 = clock.now()
        self.returned = -1  # the last sequence handed out
        self.episode_start = 0
        self.sent: list[tuple[int, np.ndarray]] = []
        self.estops = 0
        self.episodes = 0

    def connect(self) -> None:
        pass

    def disconnect(self) -> None:
        pass

    def _stamp(self, sequence: int) -> float:
        return self.t0 + sequence * PERIOD

    def _check_alive(self) -> None:
        if self.dies_at is not None and self.clock.now() >= self._stamp(self.dies_at):
            raise RobotError("connection reset by peer")

    def get_observation(self, timeout_s: float) -> RobotObservation | None:
        self._check_alive()
        until = self.clock.now() + timeout_s

        def newest_by(moment):
            newest, sequence = None, self.returned + 1
            while self._stamp(sequence) + self.latency_s <= moment:
                if sequence not in self.drop and (self.silent_from is None or sequence < self.silent_from):
                    newest = sequence
                sequence += 1
            return newest

        newest = newest_by(self.clock.now())
        if newest is None:  # wait for the first to arrive
            sequence = self.returned + 1
            while self._stamp(sequence) + self.latency_s <= until and newest is None:
                newest = newest_by(self._stamp(sequence) + self.latency_s)
                sequence += 1
        if newest is None:
            self.clock.sleep_until(until)
            return None
        self.clock.sleep_until(self._stamp(newest) + self.latency_s)
        self.returned = newest
        step = newest - self.episode_start
        values = np.array([step, newest, 0.0])
        if newest in self.nan_at:
            values[2] = np.nan
        return RobotObservation(values, self._stamp(newest), newest, reward=None if step == 0 else 1.0,
                                terminated=step >= self.episode_steps)

    def send_action(self, action: np.ndarray, sequence: int) -> None:
        self._check_alive()
        self.sent.append((sequence, np.array(action)))

    def estop(self) -> None:
        self.estops += 1

    def start_episode(self, seed: int | None = None) -> None:
        self.episodes += 1
        self.episode_start = self.returned + 1


def constant_policy(action):
    return lambda job: np.array(action, dtype=np.float64)


def run_loop(robot, policy, clock, compute_s=0.0, ticks=50, safety_config=SafetyConfig(max_action_change=None), **loop_options):
    safety = SafetyLayer(robot.spec, safety_config)
    loop = ControlLoop(robot, InlineInference(policy, clock, compute_s), safety,
                       LoopConfig(rate_hz=RATE, duration_s=ticks / RATE, **loop_options), clock=clock)
    return loop, loop.run()


def test_nominal_run_sends_the_policys_action_for_each_observation_on_time():
    clock = FakeClock()
    robot = ScriptedRobot(clock, episode_steps=20)
    loop, report = run_loop(robot, lambda job: np.array([job.values[1] / 1000, 0.0]), clock, compute_s=0.002, ticks=50)
    assert report["final_state"] == "ok" and report["ticks"] == 50
    assert report["deadline_misses"] == 0 and report["jitter_us_p99"] == 0.0
    assert report["latency_us_p50"] == pytest.approx(2000.0)
    assert report["safety_interventions"] == {}
    # each action answers the observation it was computed from; the last observation of an episode gets the safe action
    terminal = {20, 41}
    assert all(action[0] == pytest.approx(sequence / 1000) for sequence, action in robot.sent if sequence not in terminal)
    assert report["policy_actions"] == 48
    assert [sequence for sequence, _ in robot.sent] == list(range(50))
    # two whole episodes of 20 steps, reward 1 per step
    assert report["episode_returns"][:2] == [20.0, 20.0] and report["episode_lengths"][:2] == [20, 20]


def test_rewards_reach_the_policy_before_its_next_action_and_episodes_restart():
    calls = []

    class RecordingRuntime:
        def act(self, observations):
            calls.append(("act", int(observations[0, 0])))
            return np.zeros((1, 2))

        def observe_reward(self, rewards):
            calls.append(("reward", float(rewards[0])))

        def end_episode(self, indices):
            calls.append(("end", list(indices)))

    clock = FakeClock()
    robot = ScriptedRobot(clock, episode_steps=2)
    run_loop(robot, PolicyStepper(RecordingRuntime()), clock, ticks=6)
    assert calls == [("act", 0), ("reward", 1.0), ("act", 1),  # step 2 ends the episode: not acted on
                         ("end", [0]), ("act", 0), ("reward", 1.0), ("act", 1)]


def test_rewards_of_skipped_observations_are_summed_into_the_next_job():
    jobs = []
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    # the first step takes 1.5 periods: the policy is busy at the next tick and misses that observation
    run_loop(robot, lambda job: jobs.append(job) or np.zeros(2), clock,
             compute_s=lambda job: 1.5 * PERIOD if job.sequence == 0 else 0.0, ticks=5)
    assert [job.sequence for job in jobs][:2] == [0, 2]
    assert jobs[1].reward == 2.0  # rewards of observations 1 and 2


def test_a_policy_returning_nan_is_refused_and_the_safe_action_sent():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    policy = lambda job: np.array([0.8, 0.8]) if job.sequence < 5 else np.array([np.nan, 0.1])
    loop, report = run_loop(robot, policy, clock, ticks=10, safety_config=SafetyConfig(max_action_change=None, safe_action="damp", damping=0.5))
    # two refusals, then the watchdog: no usable action for over two periods
    assert report["safety_interventions"]["action_nonfinite"] == 5 and report["safety_interventions"]["watchdog"] == 1
    sent = np.array([action for _, action in robot.sent])
    assert np.all(np.isfinite(sent))
    np.testing.assert_allclose(sent[5], [0.4, 0.4])  # damped from the last good action
    np.testing.assert_allclose(sent[6], [0.2, 0.2])


def test_a_stalled_policy_is_replaced_by_the_safe_action_and_trips_the_watchdog_within_two_periods():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    stall_from = 10
    policy = constant_policy([0.5, 0.5])
    loop, report = run_loop(robot, policy, clock, ticks=30,
                            compute_s=lambda job: 100.0 if job.sequence >= stall_from else 0.0,
                            safety_config=SafetyConfig(max_action_change=None, safe_action="hold"))
    assert report["final_state"] == "ok"
    counts = report["safety_interventions"]
    assert counts["late_action"] >= 1 and counts["inference_busy"] >= 1 and counts["watchdog"] == 1
    watchdog_tick = next(item["tick"] for item in loop.safety.interventions if item["reason"] == "watchdog")
    assert watchdog_tick <= stall_from + 2 + 1  # the first tick past two periods without a fresh action
    # the ticks kept running: one action per tick, held at the last good one
    assert len(robot.sent) == 30
    np.testing.assert_allclose(robot.sent[-1][1], [0.5, 0.5])
    assert report["policy_actions"] == stall_from


def test_a_policy_that_raises_ends_the_run_in_policy_error_and_estops_the_robot():
    clock = FakeClock()
    robot = ScriptedRobot(clock)

    def policy(job):
        if job.sequence == 7:
            raise RuntimeError("CUDA error: an illegal memory access")
        return np.zeros(2)

    loop, report = run_loop(robot, policy, clock, ticks=30)
    assert report["final_state"] == "policy_error" and "illegal memory access" in report["final_reason"]
    assert robot.estops == 1 and report["ticks"] == 7


def test_the_robot_dying_mid_run_ends_in_robot_lost():
    clock = FakeClock()
    robot = ScriptedRobot(clock, dies_at=12)
    loop, report = run_loop(robot, constant_policy([0.1, 0.1]), clock, ticks=40)
    assert report["final_state"] == "robot_lost" and "connection reset" in report["final_reason"]
    assert robot.estops == 1 and 11 <= report["ticks"] <= 12


def test_a_silent_robot_trips_the_watchdog_then_is_declared_lost():
    clock = FakeClock()
    robot = ScriptedRobot(clock, silent_from=10)
    loop, report = run_loop(robot, constant_policy([0.1, 0.1]), clock, ticks=200, robot_lost_s=0.2)
    assert report["final_state"] == "robot_lost"
    counts = report["safety_interventions"]
    assert counts["watchdog"] == 1 and counts["observation_missing"] >= 2
    watchdog_tick = next(item["tick"] for item in loop.safety.interventions if item["reason"] == "watchdog")
    assert watchdog_tick <= 10 + 2 + 1
    assert report["ticks"] == pytest.approx(10 + 0.2 * RATE, abs=2)


def test_dropped_and_delayed_observations():
    clock = FakeClock()
    robot = ScriptedRobot(clock, drop={5, 20, 27}, latency_s=0.3 * PERIOD)
    loop, report = run_loop(robot, constant_policy([0.1, 0.1]), clock, ticks=30)
    counts = report["safety_interventions"]
    assert report["final_state"] == "ok" and counts["observation_missing"] == 3 and "watchdog" not in counts
    assert report["policy_actions"] == 27
    assert report["observation_age_us_p50"] == pytest.approx(0.3 * PERIOD * 1e6)


def test_stale_observations_never_reach_the_policy():
    clock = FakeClock()
    seen = []
    robot = ScriptedRobot(clock, latency_s=0.3 * PERIOD)
    config = SafetyConfig(max_action_change=None, max_observation_age_s=0.2 * PERIOD)
    loop, report = run_loop(robot, lambda job: seen.append(job) or np.zeros(2), clock, ticks=10, safety_config=config)
    assert seen == [] and report["safety_interventions"]["observation_stale"] == 10


def test_non_finite_observations_never_reach_the_policy():
    clock = FakeClock()
    seen = []
    robot = ScriptedRobot(clock, nan_at={3, 4})
    loop, report = run_loop(robot, lambda job: seen.append(job.sequence) or np.zeros(2), clock, ticks=8)
    assert 3 not in seen and 4 not in seen and report["safety_interventions"]["observation_nonfinite"] == 2


def test_action_limits_and_rate_limit():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    loop, report = run_loop(robot, constant_policy([5.0, -0.3]), clock, ticks=8,
                            safety_config=SafetyConfig(max_action_change=0.1))  # 0.2 per tick on a range of 2
    sent = np.array([action for _, action in robot.sent])
    np.testing.assert_allclose(sent[:6, 0], [0.2, 0.4, 0.6, 0.8, 1.0, 1.0])
    np.testing.assert_allclose(sent[:3, 1], [-0.2, -0.3, -0.3])
    assert np.all(np.abs(np.diff(sent, axis=0)) <= 0.2 + 1e-12)
    counts = report["safety_interventions"]
    assert counts["action_limit"] == 8 and counts["rate_limit"] == 4


def test_a_joint_at_its_limit_is_not_pushed_further_out():
    clock = FakeClock()
    # observation 0 is the step in the episode: treat it as joint 0's position, limited to [-1, 3]
    robot = ScriptedRobot(clock, joint_limits=(JointLimit("knee", obs_index=0, act_index=0, low=-1.0, high=3.0),))
    loop, report = run_loop(robot, constant_policy([0.5, 0.5]), clock, ticks=6,
                            safety_config=SafetyConfig(max_action_change=None, joint_limit_margin=0.0))
    sent = np.array([action for _, action in robot.sent])
    np.testing.assert_allclose(sent[:3, 0], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(sent[3:, 0], 0.0)  # positions 3, 4, 5: at or past the upper limit
    np.testing.assert_allclose(sent[:, 1], 0.5)
    assert report["safety_interventions"]["joint_limit"] == 3
    # with a margin, a joint may sit a little past its range (simulated limits are soft) before the layer steps in
    clock = FakeClock()
    robot = ScriptedRobot(clock, joint_limits=(JointLimit("knee", obs_index=0, act_index=0, low=-1.0, high=3.0),))
    run_loop(robot, constant_policy([0.5, 0.5]), clock, ticks=6, safety_config=SafetyConfig(max_action_change=None, joint_limit_margin=1.5))
    np.testing.assert_allclose([action[0] for _, action in robot.sent], [0.5, 0.5, 0.5, 0.5, 0.5, 0.0])


def test_the_estop_latches_until_reset_explicitly():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    safety = SafetyLayer(robot.spec, SafetyConfig(max_action_change=None, safe_action="hold"))
    safety.start(clock.now())
    action, from_policy = safety.command(0, [0.6, 0.6], None, clock.now())
    assert from_policy
    np.testing.assert_allclose(action, [0.6, 0.6])
    safety.trigger_estop(1, "operator")
    safety.trigger_estop(2, "again")  # latched: the first reason stays
    assert safety.estopped and safety.estop_reason == "operator" and safety.counts["estop"] == 1
    # after an e-stop the safe action decays to zero even in "hold" mode
    assert np.all(np.abs(safety.send_safe(2)) < 0.6)
    safety.reset_estop()
    assert not safety.estopped
    np.testing.assert_allclose(safety.command(3, [0.1, 0.1], None, clock.now())[0], [0.1, 0.1])


def test_soft_start_ramps_to_the_policys_command():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    loop, report = run_loop(robot, constant_policy([1.0, -1.0]), clock, ticks=8, soft_start_s=4 * PERIOD)
    sent = np.array([action for _, action in robot.sent])
    np.testing.assert_allclose(sent[:6, 0], [0.025, 0.275, 0.525, 0.775, 1.0, 1.0])  # phase offset 0.1 period
    np.testing.assert_allclose(sent[:, 1], -sent[:, 0])


def test_dry_run_sends_nothing_and_logs_every_action():
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    loop, report = run_loop(robot, constant_policy([0.3, 0.3]), clock, ticks=10, dry_run=True)
    assert robot.sent == [] and report["dry_run"] and report["policy_actions"] == 10
    np.testing.assert_allclose(loop.log.arrays()["actions"], 0.3)


def test_an_overrun_skips_the_missed_ticks_and_counts_them():
    clock = FakeClock()
    robot = ScriptedRobot(clock)

    def policy(job):
        if job.sequence == 5:
            clock.advance(3.5 * PERIOD)  # the process was descheduled
        return np.zeros(2)

    loop, report = run_loop(robot, policy, clock, ticks=20)
    # tick 5's action came 3.5 periods late (dropped); ticks 6 and 7 were missed and skipped
    assert report["deadline_misses"] == 2 and report["final_state"] == "ok"
    assert report["safety_interventions"]["late_action"] == 1
    assert [sequence for sequence, _ in robot.sent][4:7] == [4, 5, 8]


def test_spec_mismatch_is_refused_naming_the_field():
    robot = RobotSpec(obs_dim=11, act_dim=3, action_low=(-1.0,) * 3, action_high=(1.0,) * 3, rate_hz=125.0, task="hopper",
                      provides_reward=True)
    policy = PolicySpec(obs_dim=11, act_dim=3, action_low=(-1.0,) * 3, action_high=(1.0,) * 3)
    check_robot_spec(robot, policy, task="hopper", needs_reward=True)
    with pytest.raises(SpecMismatchError, match="obs_dim: the robot observes 17"):
        check_robot_spec(RobotSpec(17, 3, robot.action_low, robot.action_high, 125.0), policy, None, False)
    with pytest.raises(SpecMismatchError, match=r"action_high\[2\]: the robot's bound is 0.5"):
        check_robot_spec(RobotSpec(11, 3, robot.action_low, (1.0, 1.0, 0.5), 125.0), policy, None, False)
    with pytest.raises(SpecMismatchError, match="task: the robot runs 'walker2d'"):
        check_robot_spec(RobotSpec(11, 3, robot.action_low, robot.action_high, 125.0, task="walker2d"), policy, "hopper", False)
    with pytest.raises(SpecMismatchError, match="provides_reward"):
        check_robot_spec(RobotSpec(11, 3, robot.action_low, robot.action_high, 125.0), policy, None, needs_reward=True)


@pytest.mark.parametrize("options, message", [
    ({"rate_hz": 0}, "rate_hz must be a positive number"),
    ({"send_deadline": 1.5}, "send_deadline must be a fraction"),
    ({"observation_wait": 0.8}, "must not pass send_deadline"),
])
def test_bad_loop_config_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        LoopConfig(**{"rate_hz": 100.0, "duration_s": 1.0, **options})


@pytest.mark.parametrize("options, message", [
    ({"safe_action": "brake"}, "safety.safe_action must be one of"),
    ({"max_action_change": -1}, "safety.max_action_change must be a positive number"),
    ({"damping": 1.0}, r"safety.damping must be in \[0, 1\)"),
    ({"joint_limit_margin": -0.1}, "safety.joint_limit_margin must be a number >= 0"),
])
def test_bad_safety_config_is_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SafetyConfig(**options)


def test_threaded_inference_never_waits_past_its_deadline():
    release = threading.Event()

    def stalling(job):
        release.wait(timeout=30)
        return np.ones(2)

    worker = ThreadedInference(stalling)
    job = InferenceJob(np.zeros(3), sequence=4, reward=None, new_episode=True)
    worker.submit(job)
    assert worker.poll(until=worker.clock.now() + 0.01) is None and worker.busy
    with pytest.raises(RuntimeError, match="still busy"):
        worker.submit(job)
    release.set()
    result = worker.poll(until=worker.clock.now() + 30)
    assert result is not None and result.sequence == 4 and not worker.busy
    np.testing.assert_allclose(result.action, 1.0)
    worker.close()
