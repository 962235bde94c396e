"""Online RL with PPO (stable-baselines3): the Body Transformer or SB3's default MLP as actor and critic.

``kinema-rl`` trains in its run directory with the resumable machinery of ``kinema.train.ppo``
(PPO's recipe: ``PPO_RECIPE``, VecNormalize on observations and rewards). At every snapshot it
exports the actor as a kinema checkpoint (``checkpoint/``: safetensors + config + statistics,
policy family ``ppo``) and evaluates that checkpoint with kinema's evaluation loop, so the curve,
``eval.json`` and ``kinema-eval checkpoint=<run dir>`` all score the same files.

``BoTActorCriticPolicy`` plugs the Body Transformer into SB3 through its custom-policy hooks: the
actor and the critic each get a BoT encoder (separate weights); the actor's per-node detokenizer
gives the Gaussian's mean directly (SB3's ``action_net`` becomes the identity, so no linear layer
mixes the nodes' actions), and the critic's value is a linear map of the mean of its node tokens.
SB3's orthogonal initialisation is off for it (the encoder keeps its own).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stable_baselines3.common.policies import ActorCriticPolicy

from kinema.policies.body_graph import BodyGraph
from kinema.policies.bot import BodyTransformerEncoder, BoTNetwork, NodeDetokenizer

# SB3's MlpPolicy as kinema-rl runs it (its defaults), recorded with the run.
MLP_NETWORK = {"policy": "MlpPolicy", "net_arch": [64, 64], "activation": "tanh", "log_std_init": 0.0, "ortho_init": True}


class BoTActorCritic(nn.Module):
    """SB3's ``mlp_extractor`` contract: latent for the actor (the mean action) and for the critic."""

    def __init__(self, graph: Any, config: BoTNetwork):
        super().__init__()
        self.actor_encoder = BodyTransformerEncoder(graph, config)
        self.actor_detokenizer = NodeDetokenizer(graph, config.embed_dim)
        self.critic_encoder = BodyTransformerEncoder(graph, config)
        self.latent_dim_pi = graph.act_dim
        self.latent_dim_vf = config.embed_dim

    def forward_actor(self, features: torch.Tensor) -> torch.Tensor:
        return self.actor_detokenizer(self.actor_encoder(features))

    def forward_critic(self, features: torch.Tensor) -> torch.Tensor:
        return self.critic_encoder(features).mean(dim=1)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_actor(features), self.forward_critic(features)


class BoTActorCriticPolicy(ActorCriticPolicy):
    """SB3's actor-critic with Body Transformer encoders (a module-level class: SB3 zips refer to it by name)."""

    def __init__(self, *args: Any, body_graph: dict, bot: dict, **kwargs: Any):
        self.body_graph = body_graph
        self.bot = bot
        space = args[0] if args else kwargs["observation_space"]
        action_space = args[1] if len(args) > 1 else kwargs["action_space"]
        self._graph = BodyGraph.from_dict(body_graph, int(space.shape[0]), int(action_space.shape[0]), source="body graph")
        kwargs["ortho_init"] = False
        super().__init__(*args, **kwargs)

    def _build_mlp_extractor(self) -> None:
        self.mlp_extractor = BoTActorCritic(self._graph, BoTNetwork(**self.bot))

    def _build(self, lr_schedule: Any) -> None:
        super()._build(lr_schedule)
        self.action_net = nn.Identity()  # the per-node detokenizer already gives the mean
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), "body_graph": self.body_graph, "bot": self.bot}


def bot_model_fields(bot: BoTNetwork) -> dict[str, Any]:
    """The network's fields (the layout file is not one: the graph itself travels in the spec)."""
    return {k: v for k, v in dataclasses.asdict(bot).items() if k != "body_graph"}


def export_actor(model: Any, vec_env: Any, network: str, bot: BoTNetwork, spec: Any) -> Any:
    """The PPO actor as a kinema ``ppo`` policy: its mean network with VecNormalize's statistics."""
    from kinema.policies import NormStats, make_policy

    rms = vec_env.obs_rms
    stats = NormStats.for_observations(rms.mean.astype(np.float32), np.sqrt(rms.var + vec_env.epsilon).astype(np.float32))
    config: dict[str, Any] = {"name": "ppo", "network": network, "obs_clip": float(vec_env.clip_obs)}
    state = model.policy.state_dict()
    if network == "bot":
        config["bot"] = bot_model_fields(bot)
        weights = {f"mean.encoder.{k[len('mlp_extractor.actor_encoder.'):]}": v for k, v in state.items()
                   if k.startswith("mlp_extractor.actor_encoder.")}
        weights.update({f"mean.detokenizer.{k[len('mlp_extractor.actor_detokenizer.'):]}": v for k, v in state.items()
                        if k.startswith("mlp_extractor.actor_detokenizer.")})
    else:
        hidden = [v.shape[0] for k, v in state.items() if k.startswith("mlp_extractor.policy_net.") and k.endswith(".weight")]
        config["hidden_dims"] = hidden
        weights = {f"mean.policy_net.{k[len('mlp_extractor.policy_net.'):]}": v for k, v in state.items()
                   if k.startswith("mlp_extractor.policy_net.")}
        weights.update({f"mean.action_net.{k[len('action_net.'):]}": v for k, v in state.items() if k.startswith("action_net.")})
    policy = make_policy(config, spec, stats)
    policy.load_state_dict(weights)
    return policy


def sb3_policy(network: str, spec: Any, bot: BoTNetwork) -> tuple[Any, dict[str, Any]]:
    """(policy, policy_kwargs) for ``new_ppo``: SB3's default MlpPolicy, or the Body Transformer."""
    if network == "mlp":
        return "MlpPolicy", {}
    return BoTActorCriticPolicy, {"body_graph": spec.structure["body_graph"], "bot": bot_model_fields(bot)}


def network_description(network: str, bot: BoTNetwork) -> dict[str, Any]:
    """What a run's networks are, as recorded in its identity and curve.json."""
    if network == "mlp":
        return MLP_NETWORK
    return {"policy": "BoT actor-critic", **bot_model_fields(bot), "log_std_init": 0.0, "ortho_init": False}


def learning_curve_png(curve: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [p["steps"] for p in curve]
    figure, axes = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    mean = np.array([p["eval_return_mean"] for p in curve])
    std = np.array([p["eval_return_std"] for p in curve])
    axes.plot(steps, mean, marker="o", markersize=3, label="evaluation (deterministic, kinema-eval's loop)")
    axes.fill_between(steps, mean - std, mean + std, alpha=0.2)
    train = [(p["steps"], p["train_return_mean"]) for p in curve if p.get("train_return_mean") is not None]
    if train:
        axes.plot(*zip(*train), linestyle="--", label="training episodes (stochastic, last 100)")
    axes.set_xlabel("environment steps")
    axes.set_ylabel("return")
    axes.set_title(title, fontsize=10)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_rl(cfg: Any, run_dir: Path, log: Any = print) -> dict[str, Any]:
    """Train (or resume) PPO per ``cfg`` (a ``kinema.train.config.RLConfig``) in ``run_dir``; returns eval.json's content."""
    from filelock import FileLock, Timeout
    from tqdm import tqdm

    from kinema.envs import get_task, task_spaces
    from kinema.envs.structure import task_structure
    from kinema.policies import PolicySpec
    from kinema.train.checkpoint import load_checkpoint, save_checkpoint
    from kinema.train.evaluation import run_evaluation
    from kinema.train.ppo import PPO_RECIPE, make_training_env, new_ppo, open_run, run_ppo

    cfg.check()
    task = get_task(cfg.env)
    obs_dim, act_dim, low, high = task_spaces(task)
    structure = task_structure(("body_graph",), task, obs_dim, act_dim, {"body_graph": cfg.bot.body_graph}) if cfg.network == "bot" else {}
    spec = PolicySpec(obs_dim, act_dim, tuple(low), tuple(high), task.max_episode_steps, structure)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / ".kinema-rl.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise ValueError(f"run directory {run_dir} is in use by another kinema-rl; wait for it or choose another hydra.run.dir") from None
    try:
        structure_digest = hashlib.sha256(json.dumps(spec.structure, sort_keys=True).encode()).hexdigest()
        profile = cfg.randomization_profile()
        identity = {"task": task.name, "gym_id": task.gym_id, "seed": cfg.seed, "recipe": PPO_RECIPE,
                    "snapshot_every": cfg.snapshot_every, "network": cfg.network,
                    "networks": network_description(cfg.network, cfg.bot), "task_structure_sha256": structure_digest,
                    # only when set, so runs started before this option existed still resume
                    **({"randomization": profile.to_dict()} if profile is not None else {})}
        state = open_run(run_dir, identity)
        eval_cfg = {"episodes": cfg.eval_episodes, "num_envs": min(cfg.eval_episodes, 10), "seed": cfg.eval_seed, "trials": 1}
        run_config = {"env": task.name, "seed": cfg.seed, "eval": eval_cfg, "rl": {**identity, "total_steps": cfg.total_steps}}
        label = f"PPO, {'BoT-' + cfg.bot.variant if cfg.network == 'bot' else 'MLP'} on {task.name}"

        def build() -> tuple[Any, Any]:
            vec_env = make_training_env(task, cfg.seed, PPO_RECIPE, randomization=profile)
            policy, kwargs = sb3_policy(cfg.network, spec, cfg.bot)
            return new_ppo(vec_env, cfg.seed, PPO_RECIPE, policy, kwargs), vec_env

        exported: dict[int, Any] = {}

        def on_snapshot(model: Any, vec_env: Any, steps: int, wall: float) -> dict[str, Any]:
            policy = exported[steps] = export_actor(model, vec_env, cfg.network, cfg.bot, spec)
            result = run_evaluation(policy, task.name, eval_cfg, {}, None)
            return {"eval_return_mean": round(result["return_mean"], 1), "eval_return_std": round(result["return_std"], 1),
                    "normalized_score_mean": result.get("normalized_score_mean")}

        bar = tqdm(total=cfg.total_steps, initial=min(state["num_timesteps"], cfg.total_steps), desc=label, unit="step",
                   mininterval=1.0, dynamic_ncols=True)

        def report(point: dict[str, Any]) -> None:
            # After the learner and state.json: checkpoint/ never runs ahead of the curve.
            policy = exported.pop(point["steps"])
            save_checkpoint(run_dir / "checkpoint", policy, {**run_config, "policy": _policy_config(policy)}, task.name,
                            point["steps"], None)
            bar.update(max(0, min(point["steps"], cfg.total_steps) - bar.n))
            bar.set_postfix(eval_return=point["eval_return_mean"])
            (run_dir / "curve.json").write_text(json.dumps({"config": run_config, "curve": state["curve"]}, indent=1) + "\n")
            learning_curve_png(state["curve"], run_dir / "learning_curve.png", label)

        if state["checkpoint"] is None and not state["curve"]:
            log(f"kinema-rl: {label}: starting in {run_dir}")
        try:
            state = run_ppo(run_dir, state, cfg.total_steps, cfg.snapshot_every, build, on_snapshot, log=lambda m: log(f"kinema-rl: {m}"),
                            progress=report)
        finally:
            bar.close()
        # eval.json: the exported checkpoint loaded back, as kinema-eval loads it.
        loaded = load_checkpoint(run_dir / "checkpoint")
        result = run_evaluation(loaded.policy, task.name, eval_cfg, {}, None)
        result.update({"task": task.name, "policy": "ppo", "network": cfg.network, "step": loaded.step,
                       "finished": state["finished"], "training_wall_time_s": state["wall_time_s"]})
        (run_dir / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
        (run_dir / "curve.json").write_text(json.dumps({"config": run_config, "curve": state["curve"]}, indent=1) + "\n")
        learning_curve_png(state["curve"], run_dir / "learning_curve.png", label)
        return result
    finally:
        lock.release()


def _policy_config(policy: Any) -> dict[str, Any]:
    return {"name": policy.name, **json.loads(json.dumps(dataclasses.asdict(policy.config)))}
