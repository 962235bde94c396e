"""Multi-trial evaluation: now ``evaluate(..., trials=n)`` (protocol in ``kinema.envs.evaluate``).

``evaluate_trials`` stays importable from here for callers that want the per-trial
result alone (benchmarks/quality.py writes it as trials.json).
"""

from __future__ import annotations

from .evaluate import TrialsResult, evaluate_trials

__all__ = ["TrialsResult", "evaluate_trials"]
