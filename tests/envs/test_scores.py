from __future__ import annotations

import numpy as np
import pytest

from kinema.envs import normalized_score, reference_returns


def test_d4rl_references_by_hand():
    scores, source = normalized_score([-20.272305, 3234.3, 1607.0138475], "hopper")
    assert source == "d4rl"
    np.testing.assert_allclose(scores, [0.0, 100.0, 50.0], atol=1e-9)
    # halfcheetah: 100 * (5000 + 280.178953) / (12135 + 280.178953)
    scores, _ = normalized_score(5000.0, "halfcheetah")
    assert scores.shape == ()
    assert float(scores) == pytest.approx(42.5300, abs=1e-4)


def test_dataset_references_win_when_both_are_given():
    scores, source = normalized_score([50.0, 250.0], "hopper", ref_min=0.0, ref_max=200.0)
    assert source == "dataset"
    np.testing.assert_allclose(scores, [25.0, 125.0])
    # Only one dataset reference: fall back to D4RL rather than mixing the two sources.
    _, source = normalized_score([50.0], "hopper", ref_min=0.0)
    assert source == "d4rl"


def test_task_without_references_needs_dataset_ones():
    with pytest.raises(ValueError, match="'Swimmer-v5' has no D4RL reference returns"):
        normalized_score([10.0], "Swimmer-v5")
    scores, source = normalized_score([10.0], "Swimmer-v5", ref_min=-10.0, ref_max=30.0)
    assert source == "dataset" and float(scores[0]) == pytest.approx(50.0)


def test_reference_returns_accepts_metadata_mappings():
    assert reference_returns("walker2d") == (1.629008, 4592.3, "d4rl")
    assert reference_returns("walker2d", {"ref_min": 1.0, "ref_max": 9.0}) == (1.0, 9.0, "dataset")
    assert reference_returns("walker2d", {"ref_min_score": -3.0, "ref_max_score": 5.0}) == (-3.0, 5.0, "dataset")
    assert reference_returns("walker2d", (2, 4)) == (2.0, 4.0, "dataset")
    with pytest.raises(ValueError, match="expected 'ref_min'/'ref_max'"):
        reference_returns("walker2d", {"min": 1.0})
    with pytest.raises(ValueError, match="ref_max > ref_min"):
        reference_returns("walker2d", (5.0, 5.0))
    with pytest.raises(ValueError, match=r"\(ref_min, ref_max\)"):
        reference_returns("walker2d", (1.0, 2.0, 3.0))
