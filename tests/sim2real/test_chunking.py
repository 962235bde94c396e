"""Chunked policies in the control loop, on a fake clock: receding horizon, async replacement, temporal
ensembling and inpainting of committed actions, with scripted chunks whose every action names its step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kinema.sim2real.chunking import ChunkInference
from kinema.sim2real.control_loop import ControlLoop, FakeClock, LoopConfig
from kinema.sim2real.safety import SafetyConfig, SafetyLayer

from .test_control_loop import PERIOD, RATE, ScriptedRobot

HORIZON, TO, TA = 8, 2, 2
EXECUTABLE = HORIZON - TO + 1


class ScriptedChunkPolicy:
    """Chunk entry To-1+i is [(step + i) / 1000, chunk number / 100]: the action for step + i, from this chunk.
    Committed actions come back unchanged (perfect inpainting)."""

    name = "scripted_chunks"

    def __init__(self, fail_at: int | None = None):
        self.config = SimpleNamespace(n_obs_steps=TO, horizon=HORIZON, n_action_steps=TA, executable_steps=EXECUTABLE)
        self.inference = SimpleNamespace(n_action_steps=None)
        self.calls: list[tuple[int, np.ndarray | None]] = []
        self.fail_at = fail_at

    def predict_chunk(self, history, committed_actions=None):
        step = int(history[0, -1, 1])  # the robot's observation [step in episode, sequence, 0]
        if step == self.fail_at:
            raise RuntimeError("sampling diverged")
        number = len(self.calls)
        self.calls.append((step, None if committed_actions is None else np.array(committed_actions[0])))
        chunk = np.zeros((1, HORIZON, 2))
        for i in range(EXECUTABLE):
            chunk[0, TO - 1 + i] = [(step + i) / 1000, number / 100]
        if committed_actions is not None:
            chunk[0, TO - 1: TO - 1 + committed_actions.shape[1]] = committed_actions[0]
        return torch.as_tensor(chunk)


def run_chunks(mode: str, delay_ticks: float, ticks: int = 40, policy=None, **options):
    clock = FakeClock()
    robot = ScriptedRobot(clock)
    policy = policy or ScriptedChunkPolicy()
    inference = ChunkInference(policy, PERIOD, mode=mode, clock=clock, threaded=False, delay_s=delay_ticks * PERIOD, **options)
    loop = ControlLoop(robot, inference, SafetyLayer(robot.spec, SafetyConfig(max_action_change=None)),
                       LoopConfig(rate_hz=RATE, duration_s=ticks / RATE), clock=clock)
    report = loop.run()
    sent = {sequence: action for sequence, action in robot.sent}
    return report, sent, policy, inference


def served_chunks(sent, steps):
    return [int(round(sent[s][1] * 100)) for s in steps]


def test_sync_resamples_every_n_action_steps_and_each_action_is_for_its_step():
    report, sent, policy, _ = run_chunks("sync", delay_ticks=0.0)
    assert report["final_state"] == "ok" and report["safety_interventions"] == {}
    assert all(sent[s][0] == pytest.approx(s / 1000) for s in range(40))
    assert [step for step, _ in policy.calls] == list(range(0, 40, TA))


def test_sync_with_a_slow_chunk_stalls_those_ticks():
    report, sent, policy, _ = run_chunks("sync", delay_ticks=1.5)
    # every chunk arrives after its tick's send deadline: that tick gets the safe action, the next one the chunk's
    assert report["safety_interventions"]["late_action"] == len(policy.calls)


@pytest.mark.parametrize("mode", ["replace", "inpaint"])
def test_async_chunks_never_stall_a_tick_and_take_over_after_the_delay(mode):
    report, sent, policy, inference = run_chunks(mode, delay_ticks=2.0)
    # only the episode's first chunk is waited for (its d = 2 ticks); afterwards every tick is served from the queue
    assert report["safety_interventions"] == {"late_action": 2}
    assert all(sent[s][0] == pytest.approx(s / 1000) for s in range(3, 40))
    assert inference.delay_ticks == 2
    assert inference.report()["chunk_latency_us_p50"] == pytest.approx(2 * PERIOD * 1e6)
    # a chunk asked for at step s serves from s + d on (d = 2 measured ticks)
    starts = [step for step, _ in policy.calls]
    chunk_of_step = served_chunks(sent, range(10, 30))
    for step, number in zip(range(10, 30), chunk_of_step):
        assert starts[number] <= step - 2 or number == 0


def test_inpainting_commits_the_actions_that_run_while_the_chunk_is_computed():
    report, sent, policy, inference = run_chunks("inpaint", delay_ticks=2.0)
    committed = [(step, actions) for step, actions in policy.calls if actions is not None]
    assert committed, "no chunk was conditioned on committed actions"
    for step, actions in committed:
        assert actions.shape == (2, 2)  # d = 2 steps ahead
        np.testing.assert_allclose(actions[:, 0], [step / 1000, (step + 1) / 1000])  # the queue's actions for those steps
        # and exactly those were sent
        np.testing.assert_allclose([sent[step][0], sent[step + 1][0]], actions[:, 0])


def test_temporal_ensembling_averages_every_chunks_prediction_for_a_step():
    report, sent, policy, _ = run_chunks("ensemble", delay_ticks=1.0, ensemble_decay=0.5)
    assert report["final_state"] == "ok"
    # all predictions for a step agree on its first component, so the mean does too
    assert all(sent[s][0] == pytest.approx(s / 1000) for s in range(3, 40))
    # the second component mixes chunk numbers: weighted towards the older chunks
    step = 20
    numbers = [number for number, (start, _) in enumerate(policy.calls) if start <= step < start + EXECUTABLE]
    served = sent[step][1] * 100
    assert min(numbers) < served < max(numbers)
    assert served < np.mean(numbers)


def test_a_chunk_policy_that_raises_ends_the_run_in_policy_error():
    report, _, _, _ = run_chunks("replace", delay_ticks=1.0, policy=ScriptedChunkPolicy(fail_at=10))
    assert report["final_state"] == "policy_error" and "sampling diverged" in report["final_reason"]


def test_a_stalled_chunk_worker_trips_the_watchdog():
    report, sent, policy, _ = run_chunks("replace", delay_ticks=1000.0, ticks=60)
    counts = report["safety_interventions"]
    assert counts["watchdog"] == 1 and len(policy.calls) == 1 and report["final_state"] == "ok"


def test_bad_chunking_settings_are_refused():
    with pytest.raises(ValueError, match="chunking must be one of"):
        ChunkInference(ScriptedChunkPolicy(), PERIOD, mode="blend", clock=FakeClock(), threaded=False)
    with pytest.raises(ValueError, match="has no chunk-level call"):
        ChunkInference(SimpleNamespace(name="bc"), PERIOD, clock=FakeClock(), threaded=False)


def test_a_chunk_from_the_previous_episode_is_dropped():
    clock = FakeClock()
    robot = ScriptedRobot(clock, episode_steps=5)
    policy = ScriptedChunkPolicy()
    inference = ChunkInference(policy, PERIOD, mode="replace", clock=clock, threaded=False, delay_s=2 * PERIOD)
    loop = ControlLoop(robot, inference, SafetyLayer(robot.spec, SafetyConfig(max_action_change=None)),
                       LoopConfig(rate_hz=RATE, duration_s=20 / RATE), clock=clock)
    loop.run()
    starts = [start for start, _ in policy.calls]
    episode_of = lambda step: step // 6  # 5 steps and the terminal observation per episode  # noqa: E731
    served = {step for step, _ in inference.served}
    sent = {sequence: action for sequence, action in robot.sent if sequence in served}
    # a chunk asked for in one episode and arriving in the next (every 2-tick chunk crossing an episode end) never serves it
    assert any(episode_of(start) != episode_of(start + 2) for start in starts)
    assert all(episode_of(starts[int(round(action[1] * 100))]) == episode_of(step) for step, action in sent.items())
