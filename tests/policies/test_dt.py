"""Decision Transformer: loss masking, causality, and rollouts that match the training forward pass.

The rollout tests also cover the Agentic Transformer, which shares DT's decoding machinery.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kinema.policies.at  # noqa: F401  (registers "at")
import kinema.policies.dt  # noqa: F401  (registers "dt")
from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.policies.at import AgenticTransformer
from kinema.policies.dt import DecisionTransformer

OBS_DIM, ACT_DIM = 5, 3
SPEC = PolicySpec(obs_dim=OBS_DIM, act_dim=ACT_DIM, action_low=(-2.0, -1.0, 0.0), action_high=(2.0, 1.0, 1.0))
STATS = NormStats.for_observations(np.linspace(-1, 1, OBS_DIM).astype(np.float32), np.linspace(0.5, 2, OBS_DIM).astype(np.float32))
TINY = {"context_len": 4, "embed_dim": 32, "n_layers": 2, "n_heads": 2, "dropout": 0.0, "attention_dropout": 0.0,
        "attention_window": 0}  # exact full-context DT unless a test asks for a band


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: more threads only add contention on a shared machine
    yield
    torch.set_num_threads(threads)


def tiny_policy(name: str = "dt", seed: int = 0, **overrides) -> DecisionTransformer:
    torch.manual_seed(seed)
    return make_policy({"name": name, **TINY, **overrides}, SPEC, STATS).eval()


def random_windows(batch: int = 4, steps: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    low, high = torch.tensor(SPEC.action_low), torch.tensor(SPEC.action_high)
    mask = torch.ones(batch, steps, dtype=torch.bool)
    mask[0, :2] = False  # left padding
    mask[1, :1] = False
    return {
        "observations": torch.randn(batch, steps, OBS_DIM, generator=g),
        "actions": low + (high - low) * torch.rand(batch, steps, ACT_DIM, generator=g),
        "rewards": torch.randn(batch, steps, generator=g),
        "returns_to_go": 100 * torch.rand(batch, steps, generator=g),
        "timesteps": torch.arange(steps).repeat(batch, 1) + 7,
        "mask": mask,
        "completions": (torch.rand(batch, steps, generator=g) > 0.5).float(),
        "trial_index": torch.zeros(batch, steps, dtype=torch.long),
        "final_trial": mask.clone(),
    }


# -- training ----------------------------------------------------------------------------
def test_registry_builds_dt_with_its_defaults_and_names_bad_fields() -> None:
    policy = make_policy({"name": "dt"}, SPEC, STATS)
    assert isinstance(policy, DecisionTransformer)
    config = policy.config
    assert (config.context_len, config.embed_dim, config.n_layers, config.n_heads) == (20, 128, 3, 1)
    assert (config.dropout, config.max_timestep, config.rtg_scale) == (0.1, 1000, 1000.0)
    # Banded by default, with a receptive field that fits a training window: rollouts stream
    # with no recompute and still act exactly as the model was trained.
    assert config.attention_window == 7
    assert config.context_len >= config.n_layers * (config.attention_window - 1) + 2
    assert policy.batch_spec.kind == "windows" and policy.batch_spec.context_len == 20
    with pytest.raises(ValueError, match="bogus"):
        make_policy({"name": "dt", "bogus": 1}, SPEC, STATS)
    with pytest.raises(ValueError, match="divisible"):
        make_policy({"name": "dt", "embed_dim": 10, "n_heads": 3}, SPEC, STATS)
    with pytest.raises(ValueError, match="attention_window"):
        make_policy({"name": "dt", "attention_window": 30}, SPEC, STATS)


def test_loss_is_the_mean_over_real_steps_and_ignores_padding() -> None:
    policy = tiny_policy()
    batch = random_windows()
    loss, metrics = policy.loss(batch)
    assert loss.shape == () and metrics["action_mse"] == pytest.approx(loss.item())

    predicted = policy.predict_actions(batch)
    assert predicted.shape == (4, 4, ACT_DIM)
    target = policy.unscale_action(batch["actions"])
    per_step = (predicted - target).pow(2).mean(-1)
    assert loss.item() == pytest.approx(per_step[batch["mask"]].mean().item(), rel=1e-5)

    changed = {key: value.clone() for key, value in batch.items()}
    padding = ~batch["mask"]
    g = torch.Generator().manual_seed(5)
    for key in ("observations", "actions", "returns_to_go", "rewards"):
        noise = 1000 * torch.randn(changed[key].shape, generator=g)
        changed[key][padding] = noise[padding]
    changed["timesteps"][padding] = 999
    assert policy.loss(changed)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_loss_names_missing_batch_keys_and_wrong_window_lengths() -> None:
    policy = tiny_policy()
    batch = random_windows()
    with pytest.raises(ValueError, match="returns_to_go"):
        policy.loss({key: value for key, value in batch.items() if key != "returns_to_go"})
    with pytest.raises(ValueError, match="context_len=4"):
        policy.loss(random_windows(steps=5))


@pytest.mark.filterwarnings("ignore:policy.precision=bf16 on a CPU without native bf16")
def test_bf16_precision_trains_under_autocast_with_nearly_the_same_loss() -> None:
    fp32, bf16 = tiny_policy(), tiny_policy(precision="bf16")
    batch = random_windows(batch=8, seed=2)
    loss = bf16.loss(batch)[0]
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(fp32.loss(batch)[0].item(), rel=0.05)
    loss.backward()
    assert bf16.transformer.blocks[0].qkv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="precision"):
        tiny_policy(precision="fp16")
    # The fp32 default leaves a caller's autocast alone: same numbers as precision="bf16".
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outer = fp32.loss(batch)[0].item()
    assert outer == loss.item() != fp32.loss(batch)[0].item()


def test_bf16_warns_on_a_cpu_without_native_bf16(monkeypatch) -> None:
    import kinema.policies.dt as dt_module

    policy = tiny_policy(precision="bf16")
    monkeypatch.setattr(dt_module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="without native bf16"):
        policy.loss(random_windows())
    monkeypatch.setattr(dt_module, "cpu_has_native_bf16", lambda: True)
    fresh = tiny_policy(precision="bf16")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh.loss(random_windows())


def test_auxiliary_heads_add_their_losses() -> None:
    policy = tiny_policy(predict_state=True, predict_return=True)
    loss, metrics = policy.loss(random_windows())
    assert set(metrics) == {"action_mse", "state_mse", "return_mse"}
    assert loss.item() == pytest.approx(sum(metrics.values()), rel=1e-5)
    loss.backward()
    assert policy.state_head.weight.grad.abs().sum() > 0 and policy.return_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["dt", "at"])
def test_predictions_never_see_the_future(name: str) -> None:
    policy = tiny_policy(name)
    batch = random_windows()
    base = policy.predict_actions(batch)
    step = 2
    # A later state/return changes nothing before it.
    changed = {key: value.clone() for key, value in batch.items()}
    changed["observations"][:, step] += 3.0
    changed["returns_to_go"][:, step] += 50.0
    after = policy.predict_actions(changed)
    torch.testing.assert_close(after[:, :step], base[:, :step])
    assert (after[2:, step] - base[2:, step]).abs().max() > 1e-4
    # The action (and for AT its reward and completion) at `step` is seen only from step + 1 on.
    changed = {key: value.clone() for key, value in batch.items()}
    changed["actions"][:, step] = torch.tensor(SPEC.action_high) - changed["actions"][:, step]
    changed["rewards"][:, step] += 5.0
    after = policy.predict_actions(changed)
    torch.testing.assert_close(after[:, : step + 1], base[:, : step + 1])
    assert (after[2:, step + 1] - base[2:, step + 1]).abs().max() > 1e-4


def test_a_tiny_model_overfits_a_fixed_batch() -> None:
    torch.manual_seed(0)
    policy = make_policy({"name": "dt", **TINY, "embed_dim": 32, "n_layers": 1}, SPEC, STATS).train()
    batch = random_windows(batch=16, seed=3)
    # Actions a fixed function of the state, so there is something to learn.
    unit = torch.tanh(batch["observations"][..., :ACT_DIM] * 1.5)
    batch["actions"] = policy.scale_action(unit)
    optimizer = torch.optim.Adam(policy.parameters(), lr=3e-3)
    first = policy.loss(batch)[0].item()
    for _ in range(150):
        loss = policy.loss(batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first


# -- rollouts ------------------------------------------------------------------------------
def _window_batch(histories: list[list[dict]], steps: int) -> dict[str, torch.Tensor]:
    """Left-padded windows of the last `steps` entries of every history."""
    n = len(histories)
    arrays = {
        "observations": np.zeros((n, steps, OBS_DIM), np.float32),
        "actions": np.zeros((n, steps, ACT_DIM), np.float32),
        "rewards": np.zeros((n, steps), np.float32),
        "returns_to_go": np.zeros((n, steps), np.float32),
        "timesteps": np.zeros((n, steps), np.int64),
        "completions": np.zeros((n, steps), np.float32),
        "mask": np.zeros((n, steps), bool),
    }
    keys = {"observations": "obs", "actions": "action", "rewards": "reward", "returns_to_go": "rtg",
            "timesteps": "timestep", "completions": "completion"}
    for i, history in enumerate(histories):
        window = history[-steps:]
        offset = steps - len(window)
        for j, entry in enumerate(window):
            for key, name in keys.items():
                arrays[key][i, offset + j] = entry[name]
            arrays["mask"][i, offset + j] = True
    return {key: torch.from_numpy(value) for key, value in arrays.items()}


def rollout_error(policy: DecisionTransformer, steps: int, num_envs: int, end_at: dict[int, list[int]],
                  full_history: bool = False, seed: int = 0) -> float:
    """Largest gap between act() and the training forward pass run on the same context.

    The reference context is the last K steps since the context began (DT: since the
    episode began; AT: since reset, across trials), or everything with ``full_history``.
    """
    rng = np.random.default_rng(seed)
    targets = 4.0 + np.arange(num_envs)
    policy.reset(num_envs, target_return=targets)
    keeps_context = isinstance(policy, AgenticTransformer)
    histories: list[list[dict]] = [[] for _ in range(num_envs)]
    rtg, timestep = targets.copy(), np.zeros(num_envs, np.int64)
    trial_return, completed = np.zeros(num_envs), np.zeros(num_envs, bool)
    worst = 0.0
    for step in range(steps):
        obs = rng.normal(size=(num_envs, OBS_DIM)).astype(np.float32)
        for i in range(num_envs):
            histories[i].append({"obs": obs[i], "rtg": rtg[i], "timestep": timestep[i], "action": 0.0, "reward": 0.0,
                                 "completion": 0.0})
        action = policy.act(obs)
        length = max(len(h) for h in histories) if full_history else policy.config.context_len
        with torch.no_grad():
            expected = policy.predict_actions(_window_batch(histories, length))[:, -1]
        worst = max(worst, (policy.unscale_action(action) - expected).abs().max().item())
        rewards = rng.uniform(-0.5, 2.0, size=num_envs)
        policy.observe_reward(rewards)
        trial_return += rewards
        completed |= trial_return >= targets
        for i in range(num_envs):
            histories[i][-1].update(action=action[i].numpy(), reward=rewards[i], completion=float(completed[i]))
        rtg -= rewards
        timestep += 1
        if step in end_at:
            index = end_at[step]
            policy.end_episode(index)
            rtg[index], timestep[index], trial_return[index], completed[index] = targets[index], 0, 0.0, False
            if not keeps_context:
                for i in index:
                    histories[i] = []
    return worst


class PathCounter:
    """Counts cached (decode) and recomputed steps of a policy."""

    def __init__(self, policy: DecisionTransformer, monkeypatch):
        self.decoded = self.recomputed = 0
        from kinema.policies.dt import _Rollout

        decode, recompute = policy.transformer.decode, _Rollout.recompute_step

        def counted_decode(*args, **kwargs):
            self.decoded += 1
            return decode(*args, **kwargs)

        def counted_recompute(rollout, *args, **kwargs):
            self.recomputed += 1
            return recompute(rollout, *args, **kwargs)

        monkeypatch.setattr(policy.transformer, "decode", counted_decode)
        monkeypatch.setattr(_Rollout, "recompute_step", counted_recompute)


@pytest.mark.parametrize("name", ["dt", "at"])
def test_cached_rollouts_match_the_forward_pass_across_slides_and_episode_ends(name: str, monkeypatch) -> None:
    policy = tiny_policy(name)
    paths = PathCounter(policy, monkeypatch)
    # K = 4: steps 0-3 decode from the cache, then the windows slide (recompute). Env 1 ends at
    # step 6, envs 0 and 2 at 9, env 1 again at 10: DT contexts restart, so steps 10-13 decode
    # from the cache again; AT keeps its contexts across trials and recomputes from step 4 on.
    error = rollout_error(policy, steps=16, num_envs=3, end_at={6: [1], 9: [0, 2], 10: [1]})
    assert error < 1e-5
    expected = {"dt": (8, 8), "at": (4, 12)}[name]
    assert (paths.decoded, paths.recomputed) == expected


@pytest.mark.parametrize("name", ["dt", "at"])
def test_recomputing_every_step_gives_the_same_actions(name: str, monkeypatch) -> None:
    policy = tiny_policy(name)
    policy.configure_inference(use_kv_cache=False)
    paths = PathCounter(policy, monkeypatch)
    assert rollout_error(policy, steps=9, num_envs=2, end_at={5: [0]}) < 1e-5
    assert paths.decoded == 0 and paths.recomputed == 9


@pytest.mark.parametrize("name", ["dt", "at"])
def test_a_banded_model_streams_with_its_cache_and_matches_a_forward_over_the_whole_episode(
    name: str, monkeypatch
) -> None:
    policy = tiny_policy(name, attention_window=2)
    paths = PathCounter(policy, monkeypatch)
    assert rollout_error(policy, steps=12, num_envs=2, end_at={7: [1]}, full_history=True) < 1e-5
    assert paths.recomputed == 0
    # K = 4 >= n_layers * (W - 1) + 2: the stream also equals what training windows compute.
    assert rollout_error(policy, steps=12, num_envs=2, end_at={7: [1]}) < 1e-5
    wide = tiny_policy(name, attention_window=4)  # receptive field longer than a window: not equal
    assert rollout_error(wide, steps=12, num_envs=1, end_at={}) > 1e-4
    policy.configure_inference(use_kv_cache=False)
    with pytest.raises(ValueError, match="KV cache"):
        policy.reset(1, target_return=1.0)


@pytest.mark.parametrize("name", ["dt", "at"])
def test_batched_act_equals_one_environment_at_a_time(name: str) -> None:
    policy = tiny_policy(name)
    rng = np.random.default_rng(1)
    steps, n = 7, 3
    observations = rng.normal(size=(steps, n, OBS_DIM)).astype(np.float32)
    rewards = rng.normal(size=(steps, n))
    targets = np.array([3.0, 30.0, 300.0])
    policy.reset(n, target_return=targets)
    batched = []
    for t in range(steps):
        batched.append(policy.act(observations[t]))
        policy.observe_reward(rewards[t])
    for i in range(n):
        policy.reset(1, target_return=targets[i])
        for t in range(steps):
            single = policy.act(observations[t, i : i + 1])
            policy.observe_reward(rewards[t, i : i + 1])
            torch.testing.assert_close(single[0], batched[t][i], atol=1e-5, rtol=1e-5)


def test_actions_lie_in_the_action_box_and_targets_differ_per_environment() -> None:
    policy = tiny_policy()
    policy.reset(2, target_return=[0.0, 5000.0])
    obs = np.zeros((2, OBS_DIM), np.float32)
    action = policy.act(obs)
    assert action.shape == (2, ACT_DIM)
    assert (action >= torch.tensor(SPEC.action_low)).all() and (action <= torch.tensor(SPEC.action_high)).all()
    assert (action[0] - action[1]).abs().max() > 1e-6  # same state, different return-to-go


def test_act_rejects_bad_input_with_clear_errors() -> None:
    policy = tiny_policy()
    with pytest.raises(RuntimeError, match="before reset"):
        policy.act(np.zeros((1, OBS_DIM)))
    with pytest.raises(ValueError, match="target return"):
        policy.reset(2)
    with pytest.raises(ValueError, match="unknown conditioning"):
        policy.reset(2, target_return=1.0, temperature=0.5)
    policy.reset(2, target_return=1.0)
    bad = np.zeros((2, OBS_DIM), np.float32)
    bad[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"non-finite observation .*\[1\]"):
        policy.act(bad)
    with pytest.raises(ValueError, match="got 3 observations"):
        policy.act(np.zeros((3, OBS_DIM)))
    with pytest.raises(ValueError, match="one per environment"):
        policy.observe_reward([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="out of range"):
        policy.end_episode([2])


def test_dt_end_episode_starts_that_context_afresh() -> None:
    policy = tiny_policy()
    rng = np.random.default_rng(2)
    policy.reset(2, target_return=10.0)
    for _ in range(3):
        policy.act(rng.normal(size=(2, OBS_DIM)))
        policy.observe_reward([1.0, 1.0])
    policy.end_episode([1])
    obs = rng.normal(size=(2, OBS_DIM)).astype(np.float32)
    after_end = policy.act(obs)
    policy.reset(1, target_return=10.0)
    torch.testing.assert_close(after_end[1], policy.act(obs[1:])[0], atol=1e-5, rtol=1e-5)


def test_weights_round_trip_through_a_state_dict() -> None:
    policy, other = tiny_policy(seed=0), tiny_policy(seed=1)
    state = policy.state_dict()
    assert not any("mask" in key for key in state)  # derived buffers are not saved
    other.load_state_dict(state)
    batch = random_windows()
    torch.testing.assert_close(other.predict_actions(batch), policy.predict_actions(batch))


def test_the_attention_backend_is_an_inference_option(monkeypatch) -> None:
    import kinema.policies.attention as attention_module

    policy = tiny_policy()
    baseline = rollout_actions(policy)
    calls = []
    math_backend = attention_module._BACKENDS["math"]
    monkeypatch.setitem(attention_module._BACKENDS, "math", lambda *args: calls.append(1) or math_backend(*args))
    policy.configure_inference(attention_backend="math")
    torch.testing.assert_close(rollout_actions(policy), baseline, rtol=1e-5, atol=1e-5)
    assert calls  # the rollout went through the chosen backend
    with pytest.raises(ValueError, match="attention_backend must be one of"):
        policy.configure_inference(attention_backend="nope")


def rollout_actions(policy: DecisionTransformer, steps: int = 6) -> torch.Tensor:
    rng = np.random.default_rng(3)
    policy.reset(2, target_return=5.0)
    actions = []
    for _ in range(steps):
        actions.append(policy.act(rng.normal(size=(2, OBS_DIM)).astype(np.float32)))
        policy.observe_reward(np.ones(2))
    return torch.stack(actions)
