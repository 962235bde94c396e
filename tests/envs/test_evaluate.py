from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from kinema.envs import TaskSpec, VideoExtraMissingError, evaluate, normalized_score

HOPPER_ACT_DIM = 3


class RecordingPolicy:
    """A fixed map of the observation, applied row by row (so the batch size cannot
    change its numbers), that records every call made to it."""

    def __init__(self, gain: float = 0.5, scale: float = 1.0, act_dim: int = HOPPER_ACT_DIM):
        self.gain = gain
        self.act_dim = act_dim
        self.scale = scale
        self.resets: list[tuple[int, dict]] = []
        self.observations: list[np.ndarray] = []
        self.rewards: list[np.ndarray] = []
        self.grad_enabled: list[bool] = []

    def reset(self, num_envs, **conditioning):
        self.resets.append((num_envs, conditioning))

    def act(self, observations):
        self.observations.append(np.array(observations))
        self.grad_enabled.append(torch.is_grad_enabled())
        return torch.as_tensor(self.scale * np.tanh(self.gain * observations[:, 2 : 2 + self.act_dim]))

    def observe_reward(self, rewards):
        self.rewards.append(np.array(rewards))


def test_result_fields_and_scores():
    result = evaluate(RecordingPolicy(), "hopper", episodes=3, seed=0)
    assert result.episodes == 3 and result.num_envs == 3  # default: min(episodes, 10)
    assert len(result.returns) == len(result.lengths) == 3
    assert all(0 < length <= 1000 for length in result.lengths)
    assert result.env_steps == sum(result.lengths)
    assert result.return_mean == pytest.approx(np.mean(result.returns))
    assert result.return_std == pytest.approx(np.std(result.returns))
    expected_scores, source = normalized_score(result.returns, "hopper")
    assert result.reference_source == source == "d4rl"
    assert (result.ref_min, result.ref_max) == (-20.272305, 3234.3)
    np.testing.assert_allclose(result.normalized_scores, expected_scores)
    assert result.normalized_score_mean == pytest.approx(expected_scores.mean())
    assert result.normalized_score_std == pytest.approx(expected_scores.std())
    assert result.wall_time_s > 0 and result.env_steps_per_s > 0
    assert json.loads(json.dumps(result.to_dict()))["returns"] == result.returns


def test_same_seed_same_returns_and_seeds_differ():
    first = evaluate(RecordingPolicy(), "hopper", episodes=2, seed=7)
    again = evaluate(RecordingPolicy(), "hopper", episodes=2, seed=7)
    other = evaluate(RecordingPolicy(), "hopper", episodes=2, seed=8)
    assert first.returns == again.returns and first.lengths == again.lengths
    assert first.returns != other.returns
    # Episode i is seeded with seed + i: episode 1 of seed 7 is episode 0 of seed 8.
    assert first.returns[1] == other.returns[0]


def test_returns_do_not_depend_on_num_envs():
    results = [evaluate(RecordingPolicy(), "hopper", episodes=4, seed=3, num_envs=n) for n in (1, 2, 3, 4)]
    for result in results[1:]:
        assert result.returns == results[0].returns
        assert result.lengths == results[0].lengths
    assert len(set(results[0].lengths)) > 1  # episodes end at different steps, so freezing is exercised


def test_one_batched_call_per_vector_step():
    policy = RecordingPolicy()
    result = evaluate(policy, "hopper", episodes=4, seed=0, num_envs=2, conditioning={"target_return": 3600.0})
    assert policy.resets == [(2, {"target_return": 3600.0}), (2, {"target_return": 3600.0})]
    lengths = result.lengths
    vector_steps = max(lengths[0:2]) + max(lengths[2:4])  # each round lasts until its last episode ends
    assert len(policy.observations) == len(policy.rewards) == vector_steps
    assert all(batch.shape == (2, 11) for batch in policy.observations)
    assert not any(policy.grad_enabled)
    # observe_reward gets every reward of a running episode and zeros after it ended.
    first_round = np.stack(policy.rewards[: max(lengths[0:2])])
    second_round = np.stack(policy.rewards[max(lengths[0:2]) :])
    np.testing.assert_allclose(first_round.sum(axis=0), result.returns[0:2])
    np.testing.assert_allclose(second_round.sum(axis=0), result.returns[2:4])
    for row, length in enumerate(lengths[0:2]):
        assert np.all(first_round[length:, row] == 0.0) and np.all(first_round[:length, row] != 0.0)


def test_finished_environments_show_their_final_observation():
    policy = RecordingPolicy()
    result = evaluate(policy, "hopper", episodes=2, seed=0, num_envs=2)
    seen = np.stack(policy.observations)  # (steps, 2, obs_dim); call k sees the state after k steps
    short = int(np.argmin(result.lengths))
    length = result.lengths[short]
    assert length < len(seen)
    # After the episode ended the policy keeps seeing its terminal state, not autoreset states.
    assert np.all(seen[length:, short] == seen[length, short])
    assert not np.all(seen[length, short] == seen[length - 1, short])


def test_actions_are_clipped_to_the_action_box():
    inside = evaluate(RecordingPolicy(gain=50.0, scale=1.0), "hopper", episodes=2, seed=0)
    outside = evaluate(RecordingPolicy(gain=50.0, scale=10.0), "hopper", episodes=2, seed=0)
    clipped_by_hand = evaluate(_ClippedByHand(gain=50.0, scale=10.0), "hopper", episodes=2, seed=0)
    assert outside.returns == clipped_by_hand.returns
    assert outside.returns != inside.returns


class _ClippedByHand(RecordingPolicy):
    def act(self, observations):
        return torch.clamp(super().act(observations), -1.0, 1.0)


def test_time_limit_truncates_episodes():
    short_hopper = TaskSpec("hopper-10", "Hopper-v5", 10, -20.272305, 3234.3)
    result = evaluate(RecordingPolicy(), short_hopper, episodes=3, seed=0, num_envs=2, progress=True)
    assert result.lengths == [10, 10, 10]
    assert result.env_steps == 30


def test_dataset_references_and_tasks_without_references():
    with_refs = evaluate(RecordingPolicy(), "hopper", episodes=1, seed=0, dataset_refs=(0.0, 1000.0))
    assert with_refs.reference_source == "dataset"
    assert with_refs.normalized_scores == pytest.approx([with_refs.returns[0] / 10.0])

    swimmer = TaskSpec("swimmer-20", "Swimmer-v5", 20)  # no D4RL references
    result = evaluate(RecordingPolicy(gain=0.1, act_dim=2), swimmer, episodes=2, seed=0)
    assert result.normalized_scores is None and result.normalized_score_mean is None
    assert result.reference_source is None and result.ref_min is None
    assert result.lengths == [20, 20]


class NaNPolicy(RecordingPolicy):
    def act(self, observations):
        actions = super().act(observations)
        if len(self.observations) == 4:  # the fourth call is made at step 3
            actions[1, 0] = float("nan")
        return actions


def test_nan_action_names_environment_and_step():
    with pytest.raises(ValueError, match=r"non-finite action for environment 1 \(episode 1\) at step 3"):
        evaluate(NaNPolicy(), "hopper", episodes=2, seed=0)


def test_bad_arguments_and_action_shapes():
    with pytest.raises(ValueError, match="episodes must be a positive integer"):
        evaluate(RecordingPolicy(), "hopper", episodes=0, seed=0)
    with pytest.raises(ValueError, match="num_envs must be a positive integer"):
        evaluate(RecordingPolicy(), "hopper", episodes=2, seed=0, num_envs=0)

    class WrongShape(RecordingPolicy):
        def act(self, observations):
            return np.zeros((observations.shape[0], 2))

    with pytest.raises(ValueError, match=r"shape \(2, 2\), expected \(2, 3\)"):
        evaluate(WrongShape(), "hopper", episodes=2, seed=0)


def test_video_of_the_first_episode(tmp_path):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    short_hopper = TaskSpec("hopper-30", "Hopper-v5", 30, -20.272305, 3234.3)
    path = tmp_path / "videos" / "episode0.mp4"
    result = evaluate(RecordingPolicy(), short_hopper, episodes=2, seed=0, video_path=path)
    assert result.video_path == str(path)
    assert path.stat().st_size > 0
    reader = imageio.get_reader(str(path))
    try:
        assert reader.count_frames() == result.lengths[0] + 1  # the reset frame and one per step
        assert reader.get_meta_data()["size"] == (320, 240)
    finally:
        reader.close()
    # Rendering changes nothing in the rollout.
    assert evaluate(RecordingPolicy(), short_hopper, episodes=2, seed=0).returns == result.returns


def test_video_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` fail
    with pytest.raises(VideoExtraMissingError, match=r"pip install kinema\[video\]"):
        evaluate(RecordingPolicy(), "hopper", episodes=1, seed=0, video_path=tmp_path / "v.mp4")
    assert issubclass(VideoExtraMissingError, ImportError)
