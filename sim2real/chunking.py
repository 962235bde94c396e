"""Action chunks in a real-time loop: an action queue served every tick, refilled by a worker in the background.

A chunked policy (the diffusion policy: ``predict_chunk(history, committed_actions)``) samples a chunk of
future actions at once, and sampling takes longer than a tick. :class:`ChunkInference` gives the control
loop the same ``submit``/``poll`` contract as per-step inference: each tick it records the observation
and serves the queued action for that step at once; a new chunk is requested every ``n_action_steps``
steps (the receding horizon) from the newest observations, computed by the worker while the queue keeps
serving, and merged when it arrives. How the arriving chunk meets the queue is the ``mode``:

- ``sync``: no background work. Every ``n_action_steps`` steps the queue is dropped and the tick waits for
  the new chunk (until its send deadline; a late chunk leaves that tick to the safety layer). The reference.
- ``replace``: the new chunk replaces the queue from the step it arrives at; the steps that passed while
  it was computed are dropped from it. Seams jump where the two chunks disagree.
- ``ensemble``: every chunk's prediction for a step is kept, and the action is their exponentially
  weighted mean (ACT's temporal ensembling: weight ``exp(-decay * i)`` for the i-th prediction, older first).
- ``inpaint``: the chunk is sampled conditioned on the actions already committed for the steps its
  computation will take (``d`` = the inference delay in ticks, measured over the last chunks, not
  guessed), which are inpainted; it takes over after them. Real-Time Chunking (Black et al. 2025) does
  this for flow policies; here it is the diffusion policy's inpainting.

``delay_s`` adds an artificial inference delay to every chunk (benchmarks inject 0, 2, 4 ticks).
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Any

import numpy as np

from kinema.sim2real.control_loop import InferenceJob, InferenceResult, InlineInference, ThreadedInference

MODES = ("sync", "replace", "ensemble", "inpaint")
DELAY_WINDOW = 10  # chunks over which the inference delay is measured (its maximum, in ticks)


def serves_chunks(policy: Any) -> bool:
    """Whether a policy is served through the chunk queue below: it has a chunk-level call."""
    return hasattr(policy, "predict_chunk")


class ChunkInference:
    """Serves a chunked policy tick by tick for one robot; see the module docstring."""

    def __init__(self, policy: Any, period_s: float, mode: str = "inpaint", clock: Any = None, threaded: bool = True,
                 delay_s: float = 0.0, ensemble_decay: float = 0.01, n_action_steps: int | None = None):
        if mode not in MODES:
            raise ValueError(f"chunking must be one of {MODES}, got {mode!r}")
        if not hasattr(policy, "predict_chunk"):
            raise ValueError(f"the {getattr(policy, 'name', type(policy).__name__)!r} policy has no chunk-level call (predict_chunk)")
        config = policy.config
        self.policy, self.mode, self.period_s = policy, mode, float(period_s)
        self.n_obs_steps, self.executable = config.n_obs_steps, config.executable_steps
        self.n_action_steps = int(n_action_steps or getattr(policy.inference, "n_action_steps", None) or config.n_action_steps)
        self.ensemble_decay, self.delay_s = float(ensemble_decay), float(delay_s)
        if threaded:
            self.worker: Any = ThreadedInference(self._sample, clock)
        else:  # deterministic, on a fake clock: the chunk is ready delay_s after it was asked for
            self.worker = InlineInference(self._sample, clock, compute_s=self.delay_s)
        self.clock = self.worker.clock
        self.history: deque[np.ndarray] = deque(maxlen=self.n_obs_steps)
        self.queue: dict[int, tuple[int, np.ndarray]] = {}  # step -> (chunk number, action)
        self.predictions: dict[int, list[tuple[int, np.ndarray]]] = {}
        self.served: list[tuple[int, int]] = []  # (step, the newest chunk that served it): seams are where it changes
        self.requested_at: dict[int, float] = {}
        self.committed_lengths: dict[int, int] = {}
        self.error: BaseException | None = None
        self.last_request: int | None = None
        self.current: int | None = None
        self.episode_start = 0  # the first step of the current episode: chunks asked for before it are dropped
        self.delays: deque[int] = deque(maxlen=DELAY_WINDOW)
        self.compute_seconds: list[float] = []
        self.chunks = 0
        self.busy = False  # the loop may hand over every observation: this never refuses one

    # -- the worker's side -------------------------------------------------------------------------
    def _sample(self, job: InferenceJob) -> np.ndarray:
        import torch

        started = time.monotonic()
        with torch.no_grad():
            committed = None if job.committed is None else job.committed[None]
            chunk = self.policy.predict_chunk(job.values[None], committed_actions=committed)[0]
        if self.delay_s and isinstance(self.worker, ThreadedInference):
            time.sleep(max(0.0, self.delay_s - (time.monotonic() - started)))
        return np.asarray(chunk.cpu(), dtype=np.float64)

    # -- the loop's side -------------------------------------------------------------------------------
    @property
    def delay_ticks(self) -> int:
        """The inference delay d in ticks: the most of the last chunks' (1 before any was measured)."""
        return max(self.delays, default=1)

    def _reset_episode(self) -> None:
        self.history.clear()
        self.queue.clear()
        self.predictions.clear()
        self.last_request = None

    def submit(self, job: InferenceJob) -> None:
        if job.new_episode:
            self._reset_episode()
            self.episode_start = job.sequence
            self.history.extend([job.values] * self.n_obs_steps)  # padded the way the policy was trained
        else:
            self.history.append(job.values)
        self.current = step = job.sequence
        self._merge(self.worker.poll(until=self.clock.now()))
        if self.worker.busy:
            return
        due = self.last_request is None or step - self.last_request >= self.n_action_steps
        if self.mode == "sync" and (due or step not in self.queue):  # resample now, and wait for it
            self.queue.clear()
            due = True
        elif self.mode == "ensemble":  # ACT queries every step: as often as the worker allows
            due = True
        if due or not self._has_action(step):
            self._request(step)

    def _has_action(self, step: int) -> bool:
        return step in (self.predictions if self.mode == "ensemble" else self.queue)

    def _request(self, step: int) -> None:
        committed = None
        if self.mode == "inpaint":
            ahead = [self.queue[s][1] for s in range(step, step + min(self.delay_ticks, self.executable)) if s in self.queue]
            committed = np.stack(ahead) if ahead and len(ahead) == min(self.delay_ticks, self.executable) else None
            # only a complete prefix is inpainted: a gap means the queue cannot say what will run
        self.requested_at[step] = self.clock.now()
        self.committed_lengths[step] = 0 if committed is None else len(committed)
        self.last_request = step
        self.worker.submit(InferenceJob(np.stack(self.history), step, None, False, committed=committed))

    def _merge(self, result: InferenceResult | None) -> None:
        if result is None:
            return
        if result.error is not None:  # reported to the loop by poll(), which ends the run in policy_error
            self.error = result.error
            return
        start = result.sequence
        asked = self.requested_at.pop(start, result.started)
        committed_length = self.committed_lengths.pop(start, 0)
        if start < self.episode_start:  # computed from the previous episode's observations
            return
        self.delays.append(max(1, math.ceil((self.clock.now() - asked) / self.period_s - 1e-9)))
        self.compute_seconds.append(result.finished - result.started)
        number = self.chunks
        self.chunks += 1
        chunk = result.action[self.n_obs_steps - 1:]  # entry i is the action for step start + i
        now_step = self.current if self.current is not None else start
        if self.mode == "ensemble":
            for offset, action in enumerate(chunk):
                if start + offset >= now_step:
                    self.predictions.setdefault(start + offset, []).append((number, action))
            return
        keep_until = start + committed_length  # inpaint: the committed actions stay; replace / sync: from its start
        for step in [s for s in self.queue if s >= keep_until]:
            del self.queue[step]
        for offset, action in enumerate(chunk):
            step = start + offset
            if step >= max(now_step, keep_until):
                self.queue[step] = (number, action)

    def _take(self, step: int) -> np.ndarray | None:
        stale = self.predictions if self.mode == "ensemble" else self.queue
        for old in [s for s in stale if s < step]:
            del stale[old]
        if self.mode == "ensemble":
            entries = self.predictions.pop(step, None)
            if not entries:
                return None
            weights = np.exp(-self.ensemble_decay * np.arange(len(entries)))
            number, action = max(number for number, _ in entries), np.tensordot(weights / weights.sum(), np.stack([a for _, a in entries]), axes=1)
        else:
            if step not in self.queue:
                return None
            number, action = self.queue.pop(step)
        self.served.append((step, number))
        return action

    def poll(self, until: float) -> InferenceResult | None:
        step = self.current
        if step is None:
            return None
        self._merge(self.worker.poll(until=self.clock.now()))  # a chunk that is ready now serves this very step
        if not self._has_action(step) and self.worker.busy:  # the queue ran dry: wait for the chunk, at most until the deadline
            self._merge(self.worker.poll(until=until))
        now = self.clock.now()
        if self.error is not None:
            return InferenceResult(None, step, now, now, error=self.error)
        action = self._take(step)
        self.current = None
        return None if action is None else InferenceResult(action, step, now, now)

    def report(self) -> dict[str, Any]:
        """For deploy_report.json: chunks sampled, the measured delay, and the chunks' compute time (with any injected delay)."""
        seconds = np.asarray(self.compute_seconds)
        percentile = lambda q: None if not len(seconds) else round(float(np.percentile(seconds, q)) * 1e6, 1)  # noqa: E731
        return {"mode": self.mode, "chunks": self.chunks, "delay_ticks": self.delay_ticks, "n_action_steps": self.n_action_steps,
                "injected_delay_s": self.delay_s, "chunk_latency_us_p50": percentile(50), "chunk_latency_us_p99": percentile(99)}

    def close(self) -> None:
        self.worker.close()
