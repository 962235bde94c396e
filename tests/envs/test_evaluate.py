from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch

from kinema.envs import VIDEO_HEIGHT, VIDEO_WIDTH, TaskSpec, VideoExtraMissingError, evaluate, normalized_score
from kinema.envs.render import CAPTION_HEIGHT
from kinema.policies.base import Policy

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
        assert reader.get_meta_data()["size"] == (VIDEO_WIDTH, VIDEO_HEIGHT) == (848, 480)
        caption = reader.get_data(0)[:CAPTION_HEIGHT]
        assert (caption < 60).mean() > 0.7 and (caption > 200).any()  # the caption strip: light text on dark
    finally:
        reader.close()
    # Rendering changes nothing in the rollout.
    assert evaluate(RecordingPolicy(), short_hopper, episodes=2, seed=0).returns == result.returns


def test_video_without_the_extra_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # makes `import imageio_ffmpeg` fail
    with pytest.raises(VideoExtraMissingError, match=r"pip install kinema\[video\]"):
        evaluate(RecordingPolicy(), "hopper", episodes=1, seed=0, video_path=tmp_path / "v.mp4")
    assert issubclass(VideoExtraMissingError, ImportError)


class ModeDependentPolicy(torch.nn.Module):
    """Acts differently in train mode (as dropout would); records the mode act() ran in."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Dropout(p=0.0)  # a submodule whose own mode must be restored too
        self.modes: list[bool] = []

    def reset(self, num_envs, **conditioning):
        pass

    def act(self, observations):
        self.modes.append(self.training)
        gain = 5.0 if self.training else 0.5
        return torch.as_tensor(np.tanh(gain * observations[:, 2 : 2 + HOPPER_ACT_DIM]))

    def observe_reward(self, rewards):
        pass


def test_the_policy_acts_in_eval_mode_and_gets_its_modes_back():
    in_eval = evaluate(ModeDependentPolicy().eval(), "hopper", episodes=2, seed=0)
    policy = ModeDependentPolicy().train()
    policy.head.eval()  # mixed modes: each module gets its own back
    result = evaluate(policy, "hopper", episodes=2, seed=0)
    assert policy.modes and not any(policy.modes)
    assert result.returns == in_eval.returns
    assert policy.training and not policy.head.training


class NoisyPolicy:
    """A stochastic policy whose noise comes from the Policy interface's own ``episode_noise``
    (one generator per slot, seeded by ``seed_episodes``); borrowed rather than subclassed so
    the test does not depend on how policies are constructed."""

    name = "noisy"
    device = torch.device("cpu")
    episode_noise = Policy.episode_noise

    def __init__(self):
        self.seeded: list[tuple[list[int], list[int]]] = []
        self.ended: list[list[int]] = []

    def reset(self, num_envs, **conditioning):
        pass

    def seed_episodes(self, env_indices, seeds):
        self.seeded.append(([int(i) for i in env_indices], [int(s) for s in seeds]))
        Policy.seed_episodes(self, env_indices, seeds)

    def end_episode(self, env_indices):
        self.ended.append([int(i) for i in env_indices])

    def observe_reward(self, rewards):
        pass

    def act(self, observations):
        observations = torch.as_tensor(observations, dtype=torch.float32)
        noise = self.episode_noise(observations.shape[0], HOPPER_ACT_DIM)
        return torch.tanh(0.5 * observations[:, 2 : 2 + HOPPER_ACT_DIM]) + 0.5 * noise


@pytest.mark.parametrize("trials", [1, 2])
def test_a_stochastic_policy_scores_the_same_whatever_num_envs(trials):
    results = [evaluate(NoisyPolicy(), "hopper", episodes=5, seed=4, num_envs=n, trials=trials) for n in (1, 2, 5)]
    for result in results[1:]:
        assert result.returns == results[0].returns and result.lengths == results[0].lengths
        assert result.to_dict().get("trials", {}).get("returns") == results[0].to_dict().get("trials", {}).get("returns")
    # The noise matters (the policy is not secretly deterministic) and follows the seed.
    torch.manual_seed(0)
    unseeded = NoisyPolicy()
    unseeded.seed_episodes = None  # what a caller that never seeds episodes gets: torch's global generator
    assert evaluate(unseeded, "hopper", episodes=5, seed=4, trials=trials).returns != results[0].returns


def test_every_episode_start_is_seeded_with_its_reset_seed():
    policy = NoisyPolicy()
    evaluate(policy, "hopper", episodes=3, seed=10, num_envs=2, trials=2)
    # Run r trial k is reset with seed 10 + 2r + k; each episode's seed is heard once, for its slot.
    assert policy.seeded[0] == ([0, 1], [10, 12])  # round 1 (runs 0 and 1) starts
    heard = [(slot, seed) for slots, seeds in policy.seeded for slot, seed in zip(slots, seeds)]
    assert sorted(heard) == [(0, 10), (0, 11), (0, 14), (0, 15), (1, 12), (1, 13)]
    assert policy.seeded[-2:] == [([0], [14]), ([0], [15])]  # round 2: run 2 alone, trials 0 and 1
    assert sorted(i for call in policy.ended for i in call) == [0, 0, 1]  # one trial end per run before its last


def test_multi_trial_result_has_first_trial_headline_and_every_trial_under_trials(tmp_path):
    result = evaluate(RecordingPolicy(), "hopper", episodes=3, seed=2, num_envs=2, trials=2, progress=True)
    single = evaluate(RecordingPolicy(), "hopper", episodes=6, seed=2)
    data = json.loads(json.dumps(result.to_dict()))
    per_trial = np.array(data["trials"]["returns"])
    np.testing.assert_allclose(per_trial.reshape(-1), single.returns)  # run r trial k is seeded seed + 2r + k
    assert data["returns"] == per_trial[:, 0].tolist() and data["episodes"] == 3
    assert data["normalized_score_mean"] == pytest.approx(data["trials"]["first_trial_score_mean"])
    assert data["trials"]["trials"] == 2 and data["env_steps"] == sum(single.lengths)
    for key in ("last_trial_score_mean", "best_of_n_score_mean", "best_of_n_score_std", "first_trial_return_mean"):
        assert key in data["trials"]
    assert "trials" not in evaluate(RecordingPolicy(), "hopper", episodes=1, seed=0).to_dict()


def test_video_of_a_multi_trial_evaluation_records_the_first_trial(tmp_path):
    imageio = pytest.importorskip("imageio")
    pytest.importorskip("imageio_ffmpeg")
    short_hopper = TaskSpec("hopper-20", "Hopper-v5", 20, -20.272305, 3234.3)
    path = tmp_path / "trials.mp4"
    result = evaluate(RecordingPolicy(), short_hopper, episodes=1, seed=0, trials=2, video_path=path)
    reader = imageio.get_reader(str(path))
    try:
        assert reader.count_frames() == result.trials.lengths[0][0] + 1
    finally:
        reader.close()
