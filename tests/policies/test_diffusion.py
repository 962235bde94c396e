"""The diffusion policy: noise schedule, sampling, multi-modality, chunk execution, ensembling, round trips."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.policies.diffusion import DiffusionConfig, DiffusionPolicy, make_noise_scheduler

SPEC = PolicySpec(obs_dim=4, act_dim=2, action_low=(-100.0, -100.0), action_high=(100.0, 100.0), max_episode_steps=50)
TINY = {"name": "diffusion", "embed_dim": 16, "n_layers": 1, "n_heads": 2, "horizon": 6, "n_obs_steps": 2, "n_action_steps": 3}


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: threads only add overhead
    yield
    torch.set_num_threads(previous)


def identity_stats(obs_dim: int = 4, act_dim: int = 2) -> NormStats:
    """Observations and actions pass through normalisation unchanged (mean 0, std 1; actions in [-1, 1])."""
    return NormStats({"observations": {"mean": np.zeros(obs_dim), "std": np.ones(obs_dim)},
                      "actions": {"min": -np.ones(act_dim), "max": np.ones(act_dim)}})


def tiny_policy(**overrides) -> DiffusionPolicy:
    torch.manual_seed(0)
    return make_policy({**TINY, **overrides}, SPEC, identity_stats()).eval()


# -- the noise schedule and the samplers -------------------------------------------------------------
def test_squared_cosine_schedule_is_monotone_and_capped() -> None:
    scheduler = make_noise_scheduler(DiffusionConfig(), "ddpm")
    alphas_cumprod = scheduler.alphas_cumprod
    assert len(alphas_cumprod) == 100
    assert (alphas_cumprod[1:] < alphas_cumprod[:-1]).all()  # noise only grows with t
    assert 0.0 < alphas_cumprod[-1] < 1e-3 and alphas_cumprod[0] > 0.99
    assert (scheduler.betas <= 0.999).all()  # squaredcos_cap_v2 caps beta
    ddim = make_noise_scheduler(DiffusionConfig(), "ddim")
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == list(range(90, -1, -10))


def gaussian_epsilon(mean: float, std: float, alphas_cumprod: torch.Tensor):
    """The exact noise predictor for data ~ N(mean, std^2): E[eps | x_t]."""
    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = alphas_cumprod[int(t)]
        return math.sqrt(1 - abar) * (x - math.sqrt(abar) * mean) / (abar * std**2 + 1 - abar)
    return predict


def sample_with(scheduler, predict, steps: int, eta: float | None, count: int = 20000) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    scheduler.set_timesteps(steps)
    x = torch.randn(count, 1, generator=generator, dtype=torch.float64)
    for t in scheduler.timesteps:
        kwargs = {} if eta is None else {"eta": eta}
        x = scheduler.step(predict(x, t), t, x, generator=generator, **kwargs).prev_sample
    return x


def test_ddim_with_every_training_step_and_eta_one_samples_like_ddpm() -> None:
    """With the exact noise predictor of a Gaussian, DDIM (all 100 steps, eta = 1) and DDPM draw the same
    distribution; both are close to the data's (100-step DDPM's fixed posterior variance under-disperses a little)."""
    config = DiffusionConfig(prediction_type="epsilon")  # the predictor below gives the noise
    mean, std = 0.3, 0.2
    ddpm = make_noise_scheduler(config, "ddpm")
    predict = gaussian_epsilon(mean, std, ddpm.alphas_cumprod.double())
    ddpm_samples = sample_with(ddpm, predict, 100, None)
    ddim_samples = sample_with(make_noise_scheduler(config, "ddim"), predict, 100, 1.0)
    assert abs(ddpm_samples.mean().item() - ddim_samples.mean().item()) < 1e-3
    assert abs(ddpm_samples.std().item() - ddim_samples.std().item()) < 1e-3
    for samples in (ddpm_samples, ddim_samples):
        assert abs(samples.mean().item() - mean) < 0.01 and abs(samples.std().item() - std) < 0.02
    deterministic = sample_with(make_noise_scheduler(config, "ddim"), predict, 10, 0.0)  # the default sampler
    assert abs(deterministic.mean().item() - mean) < 0.02 and 0.5 * std < deterministic.std().item() < std


@pytest.mark.parametrize("prediction_type, eta", [("sample", 0.0), ("epsilon", 0.0), ("sample", 1.0), ("epsilon", 0.5)])
def test_the_fixed_step_ddim_of_the_step_functions_is_diffusers_step_bit_for_bit(prediction_type: str, eta: float) -> None:
    """FixedDDIM repeats DDIMScheduler.step's arithmetic from a precomputed table (no host-side branch on
    the timestep): the same chunk, to the bit, at every step of a 10-step and a 7-step schedule."""
    from kinema.policies.diffusion import FixedDDIM

    config = DiffusionConfig(prediction_type=prediction_type)
    generator = torch.Generator().manual_seed(0)
    for steps in (10, 7):
        reference, table = make_noise_scheduler(config, "ddim"), make_noise_scheduler(config, "ddim")
        fixed = FixedDDIM(table, steps, eta, prediction_type, True, torch.device("cpu"))
        reference.set_timesteps(steps)
        assert torch.equal(fixed.timesteps, reference.timesteps)
        sample = torch.randn(3, 6, 2, generator=generator)
        expected = sample.clone()
        for index, timestep in enumerate(reference.timesteps):
            output, noise = torch.randn(3, 6, 2, generator=generator) * 1.5, torch.randn(3, 6, 2, generator=generator)
            expected = reference.step(output, timestep, expected, eta=eta, variance_noise=noise).prev_sample
            sample = fixed.step(index, output, sample, noise)
            assert torch.equal(sample, expected), (steps, index)


def test_the_denoiser_learns_both_modes_of_a_bimodal_action_where_bc_averages_them() -> None:
    """One observation, two equally likely actions (+0.7 and -0.7): BC's mean squared error lands
    between them; the diffusion policy's samples land on both."""
    torch.manual_seed(0)
    spec = PolicySpec(obs_dim=1, act_dim=1, action_low=(-1.0,), action_high=(1.0,))
    stats = NormStats({"observations": {"mean": [0.0], "std": [1.0]}, "actions": {"min": [-1.0], "max": [1.0]}})
    diffusion = make_policy({"name": "diffusion", "embed_dim": 32, "n_layers": 2, "n_heads": 2, "horizon": 2,
                             "n_obs_steps": 1, "n_action_steps": 1}, spec, stats)
    bc = make_policy({"name": "bc", "hidden_dims": [32, 32]}, spec, stats)
    optimisers = [torch.optim.Adam(p.parameters(), lr=2e-3) for p in (diffusion, bc)]
    for _ in range(300):
        modes = torch.where(torch.rand(128, 1, 1) < 0.5, 0.7, -0.7)
        observations = torch.zeros(128, 1, 1)
        losses = [diffusion.loss({"observations": observations, "actions": modes.expand(128, 2, 1)})[0],
                  bc.loss({"observations": observations[:, 0], "actions": modes[:, 0]})[0]]
        for optimiser, loss in zip(optimisers, losses):
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    diffusion.eval()
    samples = diffusion.predict_chunk(torch.zeros(400, 1, 1))[:, 0, 0]
    near_upper, near_lower = (samples - 0.7).abs() < 0.2, (samples + 0.7).abs() < 0.2
    assert 0.25 < near_upper.float().mean() < 0.75 and 0.25 < near_lower.float().mean() < 0.75
    assert (near_upper | near_lower).float().mean() > 0.9
    assert abs(bc.eval().act(np.zeros((1, 1))).item()) < 0.2


# -- execution in closed loop ---------------------------------------------------------------------------
class ScriptedChunks:
    """Stands in for sampling: chunk[b, j] = (the newest observation's step, j); records each call's history."""

    def __init__(self, horizon: int):
        self.horizon, self.histories = horizon, []

    def __call__(self, obs_normalized, noise, committed=None, step_noise=None):
        self.histories.append(obs_normalized[..., 0].clone())
        newest = obs_normalized[:, -1, 0]
        index = torch.arange(self.horizon, dtype=torch.float32)
        return torch.stack([newest[:, None].expand(-1, self.horizon) / 100.0, index[None].expand(len(newest), -1) / 100.0], -1)


def observations_at(step: int, num_envs: int) -> np.ndarray:
    """observation[e, 0] = the step number (so a chunk says when it was sampled)."""
    obs = np.zeros((num_envs, 4), dtype=np.float32)
    obs[:, 0] = step
    return obs


def test_receding_horizon_executes_n_action_steps_from_index_to_minus_one_then_resamples(monkeypatch) -> None:
    policy = tiny_policy()
    scripted = ScriptedChunks(TINY["horizon"])
    monkeypatch.setattr(policy, "sample_chunks", scripted)
    policy.reset(2)
    taken = []
    for step in range(7):
        if step == 4:
            policy.end_episode([1])  # env 1 starts a new episode: history and queue dropped
        taken.append(np.round(policy.act(observations_at(step, 2)).numpy() * 100).astype(int))
    taken = np.stack(taken)  # (steps, envs, (sampled at, chunk index))
    # env 0: chunks sampled at steps 0, 3 and 6, each executed from index To - 1 = 1 for Ta = 3 steps
    assert taken[:, 0].tolist() == [[0, 1], [0, 2], [0, 3], [3, 1], [3, 2], [3, 3], [6, 1]]
    # env 1: the same until its episode ended before step 4, then a fresh chunk at once
    assert taken[:, 1].tolist() == [[0, 1], [0, 2], [0, 3], [3, 1], [4, 1], [4, 2], [4, 3]]
    # the first observation of an episode fills the whole history; later ones slide it
    assert scripted.histories[0].tolist() == [[0, 0], [0, 0]]
    assert scripted.histories[1].tolist() == [[2, 3], [2, 3]]
    assert scripted.histories[2].tolist() == [[4, 4]]  # env 1 alone, its new episode's first observation


def test_temporal_ensembling_averages_every_chunks_prediction_with_acts_weights(monkeypatch) -> None:
    decay = 0.5
    policy = tiny_policy()
    policy.configure_inference(execution="ensemble", ensemble_decay=decay)
    monkeypatch.setattr(policy, "sample_chunks", ScriptedChunks(TINY["horizon"]))
    policy.reset(1)
    first, executable = TINY["n_obs_steps"] - 1, TINY["horizon"] - TINY["n_obs_steps"] + 1
    for step in range(8):
        action = policy.act(observations_at(step, 1))[0].numpy()
        # the chunks sampled at steps s = step - k, oldest first, predict this step from their index first + step - s
        sampled_at = [s for s in range(max(0, step - executable + 1), step + 1)]
        weights = np.exp(-decay * np.arange(len(sampled_at)))
        expected = [np.dot(weights, sampled_at) / weights.sum() / 100.0,
                    np.dot(weights, [first + step - s for s in sampled_at]) / weights.sum() / 100.0]
        np.testing.assert_allclose(action, expected, rtol=1e-5)


def test_a_chunk_keeps_the_committed_actions_and_fixed_noise_fixes_the_chunk() -> None:
    policy = tiny_policy()
    history = np.random.default_rng(0).normal(size=(3, 2, 4))
    noise = torch.randn(3, 6, 2)
    committed = np.full((3, 2, 2), 0.25)
    chunk = policy.predict_chunk(history, committed_actions=committed, noise=noise)
    assert chunk.shape == (3, 6, 2)
    np.testing.assert_allclose(chunk[:, 1:3].numpy(), committed)  # entries To - 1 .. To, the committed ones
    again = policy.predict_chunk(history, committed_actions=committed, noise=noise)
    assert torch.equal(chunk, again)


# -- round trips and invariance --------------------------------------------------------------------------
def spread(policy: DiffusionPolicy) -> DiffusionPolicy:
    """Random non-zero weights everywhere (adaLN-Zero starts at zero), so actions depend on everything."""
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
    return policy


def test_checkpoint_round_trip_samples_identical_actions_for_a_fixed_seed(tmp_path) -> None:
    from kinema.train.checkpoint import load_checkpoint, save_checkpoint

    policy = spread(tiny_policy())
    run_config = {"policy": {"name": "diffusion", **json.loads(json.dumps(dataclasses.asdict(policy.config)))}, "seed": 0}
    save_checkpoint(tmp_path / "ckpt", policy, run_config, "test", 0, None)
    loaded = load_checkpoint(tmp_path / "ckpt").policy.eval()
    observations = np.random.default_rng(1).normal(size=(5, 2, 4)).astype(np.float32)

    def play(p):
        p.reset(2)
        p.seed_episodes([0, 1], [11, 12])
        return np.stack([p.act(o).numpy() for o in observations])

    np.testing.assert_array_equal(play(policy), play(loaded))


@pytest.mark.parametrize("execution", ["receding", "ensemble"])
def test_scores_do_not_depend_on_how_many_environments_run_together(execution: str) -> None:
    """Each environment's noise comes from its episode's seed; what is left between batch sizes is
    float rounding of batched matrix products, which contacts amplify to 1e-4 of a return over an
    episode: far below what other noise changes (more than 1e-2)."""
    from kinema.envs import evaluate, get_task

    task = dataclasses.replace(get_task("hopper"), max_episode_steps=30)
    spec = PolicySpec(obs_dim=11, act_dim=3, action_low=(-1.0,) * 3, action_high=(1.0,) * 3)
    torch.manual_seed(3)
    policy = spread(make_policy({**TINY, "inference": {"execution": execution, "eta": 1.0}}, spec,
                                identity_stats(11, 3))).eval()
    results = [evaluate(policy, task, episodes=5, seed=4, num_envs=n) for n in (1, 5)]
    np.testing.assert_allclose(results[0].returns, results[1].returns, rtol=1e-3)
    assert results[0].lengths == results[1].lengths
    unseeded = policy
    unseeded.seed_episodes = None  # a caller that never seeds episodes: torch's global generator
    other = evaluate(unseeded, task, episodes=5, seed=4, num_envs=5).returns
    assert np.abs(np.array(other) - results[0].returns).max() > 1e-2


# -- bad input ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides, message", [
    ({"inference": {"num_inference_steps": 101}}, r"inference.num_inference_steps \(101\) must be at most num_train_timesteps \(100\)"),
    ({"n_action_steps": 6}, r"n_action_steps \(6\) must be at most horizon - n_obs_steps \+ 1 \(5\)"),
    ({"n_obs_steps": 7}, r"n_obs_steps \(7\) must be at most horizon \(6\)"),
    ({"prediction_type": "v"}, "prediction_type must be one of epsilon, sample"),
    ({"inference": {"sampler": "euler"}}, "inference.sampler must be one of ddim, dpmsolver"),
])
def test_bad_config_values_are_named(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy({**TINY, **overrides}, SPEC, identity_stats())


def test_an_inference_override_is_checked_against_the_trained_model_and_leaves_it_usable() -> None:
    policy = tiny_policy()
    with pytest.raises(ValueError, match=r"inference.num_inference_steps \(500\) must be at most num_train_timesteps"):
        policy.configure_inference(num_inference_steps=500)
    assert policy.inference.num_inference_steps == 10
    policy.reset(1)
    assert policy.act(np.zeros((1, 4))).shape == (1, 2)


def test_missing_action_statistics_and_bad_calls_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match="needs the statistic actions.min"):
        make_policy(TINY, SPEC, NormStats.for_observations(np.zeros(4), np.ones(4)))
    policy = tiny_policy()
    with pytest.raises(RuntimeError, match="act called before reset"):
        policy.act(np.zeros((1, 4)))
    with pytest.raises(ValueError, match=r"observation_history must have shape \(N, 2, 4\)"):
        policy.predict_chunk(np.zeros((1, 3, 4)))
    with pytest.raises(ValueError, match=r"committed_actions must have shape \(N=1, P, 2\) with 1 <= P <= 5"):
        policy.predict_chunk(np.zeros((1, 2, 4)), committed_actions=np.zeros((1, 6, 2)))
    with pytest.raises(ValueError, match="non-finite"):
        policy.predict_chunk(np.full((1, 2, 4), np.nan))
    policy.reset(2)
    with pytest.raises(ValueError, match="non-finite observation"):
        policy.act(np.array([[0.0] * 4, [np.nan] * 4]))


def test_kinema_train_and_eval_run_the_diffusion_policy(cli, hopper_random_hdf5, tmp_path) -> None:
    run = tmp_path / "run"
    cli.run([cli.script("kinema-train"), "policy=diffusion", f"dataset.path={hopper_random_hdf5}", "train.steps=6",
             "policy.embed_dim=16", "policy.n_layers=1", "policy.recipe.batch_size=16", "policy.recipe.warmup_steps=2",
             "eval.episodes=2", "eval.num_envs=2", "threads=1", f"hydra.run.dir={run}"], cwd=tmp_path)
    assert (run / "checkpoint" / "ema.safetensors").is_file()
    evaluated = tmp_path / "eval"
    cli.run([cli.script("kinema-eval"), f"checkpoint={run / 'checkpoint'}", "+inference.num_inference_steps=4",
             "+inference.sampler=dpmsolver", "eval.episodes=2", f"hydra.run.dir={evaluated}"], cwd=tmp_path)
    result = json.loads((evaluated / "eval.json").read_text())
    assert result["episodes"] == 2 and np.isfinite(result["return_mean"])


def test_an_interrupted_diffusion_run_resumes_bit_identically(hopper_random_hdf5, tmp_path) -> None:
    """The loss draws noise and timesteps from torch's generator: its state resumes with the sampler's, the optimiser's and the EMA's."""
    import shutil

    from safetensors.torch import load_file

    from kinema.train.cli import compose_train_config
    from kinema.train.trainer import run_training

    def config(steps: int) -> dict:
        return compose_train_config([f"dataset.path={hopper_random_hdf5}", "policy=diffusion", "policy.embed_dim=16",
                                     "policy.n_layers=1", "policy.recipe.batch_size=8", "policy.recipe.warmup_steps=2",
                                     "policy.recipe.schedule_steps=6",  # the cosine horizon of the uninterrupted run
                                     f"train.steps={steps}", "train.checkpoint_every=3", "eval.episodes=1",
                                     "eval.num_envs=1", "eval.every=0", "threads=1"])

    run_training(config(6), tmp_path / "straight")
    run_training(config(3), tmp_path / "interrupted")
    shutil.rmtree(tmp_path / "interrupted" / "checkpoint")
    run_training(config(6), tmp_path / "interrupted")
    for name in ("model.safetensors", "ema.safetensors"):
        a, b = (load_file(str(tmp_path / run / "checkpoint" / name)) for run in ("straight", "interrupted"))
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
