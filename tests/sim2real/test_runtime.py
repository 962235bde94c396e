"""The inference runtime serves every family exactly as the policy's own act() does, and refuses bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.sim2real.runtime import PolicyRuntime
from kinema.train.checkpoint import load_checkpoint

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
FAMILIES = ["bc", "bot", "dt", "dt_full", "at", "diffusion"]
TARGET = 40.0


pytestmark = pytest.mark.usefixtures("one_thread")


def drive(actor, steps: int, num_envs: int, seed: int = 0) -> np.ndarray:
    """The same calls a control loop makes: seeded episodes, actions, rewards, and one environment restarting."""
    rng = np.random.default_rng(seed)
    actor.seed_episodes(np.arange(num_envs), np.arange(num_envs) + 100)
    actions = []
    for step in range(steps):
        actions.append(np.asarray(actor.act(rng.normal(size=(num_envs, 5)).astype(np.float32))))
        actor.observe_reward(rng.uniform(-1.0, 2.0, size=num_envs))
        if step in (6, 13):
            actor.end_episode([step % num_envs])
            actor.seed_episodes([step % num_envs], [1000 + step])
    return np.stack(actions)


def reference(name: str, num_envs: int, steps: int) -> np.ndarray:
    policy = load_checkpoint(GOLDEN / name).policy.eval()
    conditioning = {"target_return": TARGET} if "target_return" in policy.conditioning else {}
    policy.reset(num_envs, **conditioning)
    return drive(policy, steps, num_envs)


@pytest.mark.parametrize("name", FAMILIES)
def test_the_runtime_acts_exactly_as_a_freshly_reset_policy(name: str) -> None:
    """Warm-up leaves no trace: step by step, through episode ends, the same actions. Once one
    environment has restarted, the diffusion policy's act samples only the environments whose queue is
    empty while the fixed-shape step samples all and keeps those: the same chunks up to the float
    rounding of a batched matrix product of another size (exact at batch 1 and in lockstep, below)."""
    runtime = PolicyRuntime(GOLDEN / name, batch_size=3, target_return=TARGET if name in ("dt", "dt_full", "at") else None)
    assert runtime.path == "step_functions"
    expected = reference(name, 3, 20)
    check = (lambda got: np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)) if name == "diffusion" \
        else (lambda got: np.testing.assert_array_equal(got, expected))
    check(drive(runtime, 20, 3))
    runtime.reset()  # every environment afresh, in place
    check(drive(runtime, 20, 3))


def test_the_runtime_carries_the_agentic_transformer_s_trial_summary_across_trials() -> None:
    """AT with ``trial_summary``: the summary lives in the step input, which the pure steps carry."""
    from kinema.policies import NormStats, PolicySpec, make_policy

    spec = PolicySpec(obs_dim=5, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
    stats = NormStats.for_observations(np.zeros(5, np.float32), np.ones(5, np.float32))
    torch.manual_seed(0)
    config = {"name": "at", "context_len": 4, "embed_dim": 16, "n_layers": 1, "n_heads": 1, "dropout": 0.0,
              "attention_dropout": 0.0, "attention_window": 3, "trial_summary": True, "rtg_scale": 1.0}
    policy = make_policy(config, spec, stats).eval()
    with torch.no_grad():  # make the summary's inputs matter at this tiny scale
        policy.embed_return.weight[:, 1:].normal_(0.0, 1.0)
    twin = make_policy(config, spec, stats).eval()
    twin.load_state_dict(policy.state_dict())
    twin.reset(3, target_return=TARGET)
    expected = drive(twin, 20, 3)
    assert twin._rollout.trial_summary.any()
    runtime = PolicyRuntime(policy, batch_size=3, target_return=TARGET)
    assert runtime.path == "step_functions"
    np.testing.assert_array_equal(drive(runtime, 20, 3), expected)


def drive_in_lockstep(actor, steps: int, num_envs: int) -> np.ndarray:
    """Seeded episodes that all restart together (as at batch 1)."""
    rng = np.random.default_rng(1)
    actor.seed_episodes(np.arange(num_envs), np.arange(num_envs) + 7)
    actions = []
    for step in range(steps):
        actions.append(np.asarray(actor.act(rng.normal(size=(num_envs, 5)).astype(np.float32))))
        if step == 8:
            actor.end_episode(np.arange(num_envs))
            actor.seed_episodes(np.arange(num_envs), np.arange(num_envs) + 70)
    return np.stack(actions)


@pytest.mark.parametrize("inference", [{}, {"eta": 1.0}, {"execution": "ensemble", "eta": 1.0}, {"n_action_steps": 1}],
                         ids=["receding", "receding-eta1", "ensemble-eta1", "one-action-per-chunk"])
def test_the_diffusion_step_functions_give_act_s_actions_bit_for_bit(inference: dict) -> None:
    """Sample/pop (receding) and ensemble steps with the noise drawn on the host, from each episode's
    generator: act's actions exactly, at batch 1 through restarts and at batch 3 in lockstep;
    temporal ensembling samples every environment on both paths, so it is exact through single restarts too."""
    for num_envs, driver in ((1, drive), (3, drive_in_lockstep)) + (((3, drive),) if "execution" in inference else ()):
        runtime = PolicyRuntime(GOLDEN / "diffusion", batch_size=num_envs, inference=inference)
        assert runtime.path == "step_functions"
        policy = load_checkpoint(GOLDEN / "diffusion").policy.eval()
        policy.configure_inference(**inference)
        policy.reset(num_envs)
        np.testing.assert_array_equal(driver(runtime, 20, num_envs), driver(policy, 20, num_envs))


def test_bad_observations_and_settings_are_refused_naming_what_is_wrong() -> None:
    runtime = PolicyRuntime(GOLDEN / "bc", batch_size=2)
    observations = np.zeros((2, 5), dtype=np.float32)
    observations[1, 3] = np.nan
    with pytest.raises(ValueError, match=r"environment 1 has a non-finite value at index 3"):
        runtime.act(observations)
    with pytest.raises(ValueError, match=r"shape \(2, 5\)"):
        runtime.act(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="takes no target return"):
        PolicyRuntime(GOLDEN / "bc", target_return=10.0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        PolicyRuntime(GOLDEN / "bc", batch_size=0)
    with pytest.raises(ValueError, match="cuda_graphs=True needs a CUDA device"):
        PolicyRuntime(GOLDEN / "bc", cuda_graphs=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("name", FAMILIES)
def test_cuda_graph_replay_matches_eager_act_through_episode_ends(name: str) -> None:
    kwargs = {"batch_size": 3, "device": "cuda", "target_return": TARGET if name in ("dt", "dt_full", "at") else None}
    graphed, eager = PolicyRuntime(GOLDEN / name, **kwargs), PolicyRuntime(GOLDEN / name, cuda_graphs=False, **kwargs)
    assert graphed.path == "cuda_graph" and eager.path == "step_functions"
    np.testing.assert_allclose(drive(graphed, 20, 3), drive(eager, 20, 3), atol=1e-5)


def test_the_compiled_path_gives_the_eager_actions() -> None:
    """torch.compile of DT's decode step (compiled during warm-up, whose effect on the state is undone)."""
    runtime = PolicyRuntime(GOLDEN / "dt", batch_size=3, target_return=TARGET, compile=True)
    assert runtime.path == "compiled"
    np.testing.assert_allclose(drive(runtime, 12, 3), reference("dt", 3, 12), atol=1e-5)
    with pytest.raises(ValueError, match="no pure step functions to compile"):  # DPM-Solver++: its history is on the host
        PolicyRuntime(GOLDEN / "diffusion", compile=True, inference={"sampler": "dpmsolver"})
