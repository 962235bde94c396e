"""Recording a deployment as a D4RL-layout dataset, so it can be evaluated and trained on like any other.

Each observation the loop used becomes one transition with the action sent for it (the policy's, or
the safety layer's when it intervened: ``infos/interventions``). Its reward and next observation
are those of the robot's next observation. When that one never arrived (a dropped message), the
reward is recorded as 0 and ``infos/reward_missing`` is set; a refused observation (non-finite) is
not recorded and marks a gap the same way. An episode's last observation (terminated or truncated)
closes the previous transition (``terminals`` / ``timeouts``); the run's last transition is a
timeout. ``infos/timestamps`` holds each observation's timestamp.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kinema.sim2real.control_loop import Transition


class DeploymentRecorder:
    """Receives the loop's transitions (``on_transition``); ``write(path)`` saves them."""

    def __init__(self, metadata: dict[str, Any] | None = None):
        self.metadata = dict(metadata or {})
        self.rows: list[dict[str, Any]] = []
        self.pending: Transition | None = None

    def __call__(self, transition: Transition) -> None:
        observation = transition.observation
        finite = bool(np.all(np.isfinite(observation.values)))
        if self.pending is not None:
            follows = finite and observation.sequence == self.pending.observation.sequence + 1 and observation.reward is not None
            self._close(reward=float(observation.reward) if follows else 0.0, missing=not follows,
                        terminal=follows and observation.terminated,
                        timeout=observation.truncated or not follows and observation.terminated)
        ended = observation.terminated or observation.truncated
        self.pending = None if ended or not finite else transition

    def _close(self, reward: float, missing: bool, terminal: bool, timeout: bool) -> None:
        pending = self.pending
        self.rows.append({"observation": np.asarray(pending.observation.values, dtype=np.float32),
                          "action": np.asarray(pending.action, dtype=np.float32), "reward": reward, "terminal": terminal,
                          "timeout": timeout, "timestamp": pending.observation.timestamp, "intervened": pending.intervened,
                          "reward_missing": missing})
        self.pending = None

    def finish(self) -> None:
        """The run ended: its last transition has no successor, and counts as a timeout."""
        if self.pending is not None:
            self._close(reward=0.0, missing=True, terminal=False, timeout=True)

    def __len__(self) -> int:
        return len(self.rows)

    def write(self, path: str | Path) -> Path | None:
        """Write ``path`` (D4RL HDF5, atomically); None when nothing was recorded."""
        from kinema.datasets.d4rl_io import write_d4rl_hdf5
        from kinema.datasets.store import OfflineDataset

        self.finish()
        if not self.rows:
            return None
        column = lambda key: np.asarray([row[key] for row in self.rows])  # noqa: E731
        dataset = OfflineDataset(
            observations=column("observation"), actions=column("action"), rewards=column("reward"),
            terminals=column("terminal"), timeouts=column("timeout"),
            infos={"timestamps": column("timestamp").astype(np.float64), "interventions": column("intervened"),
                   "reward_missing": column("reward_missing")},
            metadata=self.metadata, source=str(path))
        return write_d4rl_hdf5(dataset, path)
