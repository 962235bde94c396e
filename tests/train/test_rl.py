"""kinema-rl: PPO with Body Transformer or MLP actor-critics; exported actors act exactly as SB3's; killed runs resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.envs import get_task, task_spaces
from kinema.envs.bodygraph import derive_body_graph
from kinema.policies import PolicySpec
from kinema.policies.bot import BoTNetwork
from kinema.train.checkpoint import load_checkpoint, save_checkpoint
from kinema.train.ppo import PPO_RECIPE, make_training_env, new_ppo, read_state, rollout_size
from kinema.train.rl import export_actor, sb3_policy

TINY_BOT = BoTNetwork(variant="hard", embed_dim=16, n_layers=2, n_heads=2)
ROLLOUT = rollout_size(PPO_RECIPE)


def hopper_spec() -> PolicySpec:
    obs_dim, act_dim, low, high = task_spaces("hopper")
    return PolicySpec(obs_dim, act_dim, low, high, 1000, {"body_graph": derive_body_graph("hopper").to_dict()})


@pytest.mark.parametrize("network", ["bot", "mlp"])
def test_the_exported_actor_acts_as_sb3s_deterministic_policy(network: str, tmp_path: Path) -> None:
    spec = hopper_spec()
    vec_env = make_training_env(get_task("hopper"), 0, PPO_RECIPE)
    vec_env.reset()
    for _ in range(30):  # VecNormalize statistics that are not the identity
        vec_env.step(np.stack([vec_env.action_space.sample() for _ in range(vec_env.num_envs)]))
    policy_class, kwargs = sb3_policy(network, spec, TINY_BOT)
    model = new_ppo(vec_env, 0, PPO_RECIPE, policy_class, kwargs)
    with torch.no_grad():  # move the weights off their initialisation, so every layer matters
        for parameter in model.policy.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    exported = export_actor(model, vec_env, network, TINY_BOT, spec)
    save_checkpoint(tmp_path / "ckpt", exported, {"policy": {"name": "ppo", **json.loads(json.dumps(
        __import__("dataclasses").asdict(exported.config)))}}, "hopper", 0, None)
    loaded = load_checkpoint(tmp_path / "ckpt").policy
    raw = np.random.default_rng(0).normal(size=(16, 11)) * 3.0
    expected, _ = model.predict(vec_env.normalize_obs(raw), deterministic=True)
    loaded.reset(16)
    np.testing.assert_allclose(loaded.act(raw).numpy(), expected, atol=2e-5)
    assert (np.abs(expected) == 1.0).any()  # clipping to the action box is part of what is compared


def test_the_bot_critic_and_actor_have_their_own_encoders_and_no_action_mixing() -> None:
    spec = hopper_spec()
    vec_env = make_training_env(get_task("hopper"), 0, PPO_RECIPE)
    policy_class, kwargs = sb3_policy("bot", spec, TINY_BOT)
    model = new_ppo(vec_env, 0, PPO_RECIPE, policy_class, kwargs)
    assert isinstance(model.policy.action_net, torch.nn.Identity)
    extractor = model.policy.mlp_extractor
    assert extractor.actor_encoder is not extractor.critic_encoder
    optimised = {id(p) for group in model.policy.optimizer.param_groups for p in group["params"]}
    assert optimised == {id(p) for p in model.policy.parameters()}
    vec_env.close()


def rl_args(cli, run_dir: Path, *overrides: str) -> list[str]:
    return [cli.script("kinema-rl"), "env=hopper", "network=bot", "bot.variant=hard", "bot.embed_dim=16", "bot.n_layers=2",
            "bot.n_heads=2", f"total_steps={3 * ROLLOUT}", f"snapshot_every={ROLLOUT}", "eval_episodes=2",
            f"hydra.run.dir={run_dir}", *overrides]


def test_kinema_rl_killed_then_rerun_resumes_and_kinema_eval_reproduces_its_score(cli, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cli.kill_when(rl_args(cli, run), tmp_path, lambda: len((read_state(run) or {}).get("curve", [])) >= 2)
    killed = read_state(run)
    assert killed["finished"] is None and killed["num_timesteps"] < 3 * ROLLOUT
    resumed = cli.run(rl_args(cli, run), cwd=tmp_path)
    assert f"resuming from step_{killed['num_timesteps']:09d} at {killed['num_timesteps']} steps" in resumed.stdout
    state = read_state(run)
    assert [p["steps"] for p in state["curve"]] == [0, ROLLOUT, 2 * ROLLOUT, 3 * ROLLOUT]
    assert state["finished"] == "total_steps"
    result = json.loads((run / "eval.json").read_text())
    assert result["step"] == 3 * ROLLOUT and result["returns"] == pytest.approx([result["returns"][0], result["returns"][1]])
    assert (run / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert [p["steps"] for p in json.loads((run / "curve.json").read_text())["curve"]] == [0, ROLLOUT, 2 * ROLLOUT, 3 * ROLLOUT]
    scored = cli.run([cli.script("kinema-eval"), f"checkpoint={run}", f"hydra.run.dir={tmp_path / 'eval'}"], cwd=tmp_path)
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["returns"] == result["returns"], scored.stdout
    # A finished run: the same command does no training; another network in the directory is refused.
    again = cli.run(rl_args(cli, run), cwd=tmp_path)
    assert "resuming" not in again.stdout and read_state(run)["curve"] == state["curve"]
    refused = cli.run(rl_args(cli, run, "network=mlp"), cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "existing training has network='bot'" in refused.stderr


@pytest.mark.parametrize(("override", "message"), [("network=cnn", "network must be one of bot, mlp"),
                                                    ("snapshot_every=1000", "snapshot_every must be a multiple of 4096"),
                                                    ("total_steps=0", "total_steps must be an integer >= 1"),
                                                    ("bot.variant=soft", "variant must be one of hard, mix, vanilla"),
                                                    ("env=Reacher-v5", "Reacher-v5")])
def test_bad_config_is_refused_before_any_work(cli, tmp_path: Path, override: str, message: str) -> None:
    proc = cli.run(rl_args(cli, tmp_path / "run", override), cwd=tmp_path, check=False)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "state.json").exists()


def test_training_environments_take_a_randomisation_profile_and_an_unknown_one_is_refused() -> None:
    from kinema.envs.randomization import DomainRandomization, get_profile
    from kinema.train.config import RLConfig

    vec_env = make_training_env(get_task("hopper"), 0, PPO_RECIPE, randomization=get_profile("mass"))
    vec_env.reset()
    first = vec_env.venv.envs[0]
    assert isinstance(first, DomainRandomization) or isinstance(getattr(first, "env", None), DomainRandomization)
    masses = {tuple(np.round(env.unwrapped.model.body_mass, 6)) for env in vec_env.venv.envs}
    assert len(masses) == len(vec_env.venv.envs)  # each copy drew its own masses
    assert RLConfig(randomization="mass").randomization_profile().mass_scale == (0.7, 1.3)
    with pytest.raises(ValueError, match="randomization profile 'lava' is not defined"):
        RLConfig(randomization="lava").check()
