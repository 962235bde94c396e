"""Training recipes: declared by the policy config, built by kinema.train.recipe."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kinema.policies import NormStats, PolicySpec, Recipe, make_policy
from kinema.train.recipe import ema_decay, lr_factor, make_ema, make_optimizer

SPEC = PolicySpec(obs_dim=3, act_dim=2, action_low=(-1.0, -1.0), action_high=(1.0, 1.0))
STATS = NormStats.for_observations(np.zeros(3), np.ones(3))


def test_constant_schedule_warms_up_linearly_then_holds() -> None:
    factor = lr_factor(Recipe(warmup_steps=4), horizon=100)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_cosine_schedule_reaches_its_floor_at_the_horizon_and_stays() -> None:
    recipe = Recipe(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    factor = lr_factor(recipe, horizon=110)
    assert factor(9) == 1.0 and factor(10) == pytest.approx(1.0)
    assert factor(60) == pytest.approx(0.1 + 0.9 * 0.5)
    assert factor(110) == pytest.approx(0.1) and factor(500) == pytest.approx(0.1)  # past the horizon: the floor


def test_parameter_groups_spare_norms_biases_and_embeddings_when_asked() -> None:
    policy = make_policy({"name": "dt", "embed_dim": 8, "n_layers": 1, "context_len": 4, "attention_window": 2}, SPEC, STATS)
    every = make_optimizer(policy, Recipe(weight_decay=0.1))
    assert len(every.param_groups) == 1 and every.param_groups[0]["weight_decay"] == 0.1
    split = make_optimizer(policy, Recipe(weight_decay=0.1, decay_all_parameters=False))
    decay, rest = split.param_groups
    assert rest["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    no_decay = {id(p) for p in rest["params"]}
    assert id(policy.embed_timestep.weight) in no_decay and id(policy.embed_norm.weight) in no_decay
    assert id(policy.embed_state.bias) in no_decay and id(policy.embed_state.weight) not in no_decay
    assert len(decay["params"]) + len(rest["params"]) == len(list(policy.parameters()))


def test_ema_follows_diffusion_policys_warm_up_decay() -> None:
    recipe = Recipe(ema=True)
    assert ema_decay(recipe, 1) == 0.0
    assert ema_decay(recipe, 11) == pytest.approx(1 - 11 ** -0.75)
    assert ema_decay(recipe, 10**9) == recipe.ema_max_decay
    policy = make_policy({"name": "bc", "hidden_dims": [4]}, SPEC, STATS)
    ema = make_ema(policy, recipe)
    first = [p.detach().clone() for p in policy.parameters()]
    ema.update_parameters(policy)  # the first update copies the weights
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(1.0)
    ema.update_parameters(policy)  # second update: decay 1 - 2^-0.75 toward the new weights
    decay = 1 - 2 ** -0.75
    for averaged, before, now in zip(ema.module.parameters(), first, policy.parameters()):
        torch.testing.assert_close(averaged, decay * before + (1 - decay) * now)


@pytest.mark.parametrize(
    "values, key",
    [({"lr": 0}, "lr"), ({"schedule": "linear"}, "schedule"), ({"optimizer": "sgd"}, "optimizer"),
     ({"batch_size": 0}, "batch_size"), ({"betas": [0.9]}, "betas"), ({"grad_clip": -1}, "grad_clip"),
     ({"warmup_steps": -1}, "warmup_steps"), ({"ema_max_decay": 1.0}, "ema_max_decay")],
)
def test_bad_recipe_values_are_named(values: dict, key: str) -> None:
    with pytest.raises(ValueError, match=key):
        make_policy({"name": "bc", "recipe": values}, SPEC, STATS)


def test_a_partial_recipe_keeps_the_familys_other_values() -> None:
    policy = make_policy({"name": "dt", "recipe": {"lr": 3e-4}}, SPEC, STATS)
    assert policy.config.recipe.lr == 3e-4 and policy.config.recipe.batch_size == 64 and policy.config.recipe.grad_clip == 0.25
    assert math.isclose(policy.config.recipe.weight_decay, 1e-4)
