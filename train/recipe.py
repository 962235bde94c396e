"""A policy's training recipe (``kinema.policies.Recipe``) turned into optimiser, schedule and EMA.

The recipe is declared by the family's config; this module only builds what it asks for.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from kinema.policies import Policy, Recipe

# Modules whose weights carry no weight decay when recipe.decay_all_parameters is False.
NO_DECAY_MODULES = (nn.LayerNorm, nn.Embedding, nn.GroupNorm, nn.BatchNorm1d)


def parameter_groups(policy: Policy, recipe: Recipe) -> list[dict[str, Any]]:
    """One group with the recipe's weight decay; with ``decay_all_parameters=False`` a second,
    without decay, for biases and the weights of norms and embeddings."""
    if recipe.decay_all_parameters:
        return [{"params": list(policy.parameters()), "weight_decay": recipe.weight_decay}]
    no_decay: set[int] = set()
    for module in policy.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if name.endswith("bias") or isinstance(module, NO_DECAY_MODULES):
                no_decay.add(id(parameter))
    decay = [p for p in policy.parameters() if id(p) not in no_decay]
    rest = [p for p in policy.parameters() if id(p) in no_decay]
    return [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": rest, "weight_decay": 0.0}]


def make_optimizer(policy: Policy, recipe: Recipe) -> torch.optim.Optimizer:
    groups = parameter_groups(policy, recipe)
    optimizer_class = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam}[recipe.optimizer]
    return optimizer_class(groups, lr=recipe.lr, betas=recipe.betas)


def lr_factor(recipe: Recipe, horizon: int) -> Callable[[int], float]:
    """The multiplier of ``recipe.lr`` at each optimiser step (LambdaLR's convention: step 0 first)."""
    warmup = recipe.warmup_steps

    def factor(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        if recipe.schedule == "constant":
            return 1.0
        decay_steps = max(1, horizon - warmup)
        progress = min(1.0, (step - warmup) / decay_steps)
        return recipe.min_lr_ratio + (1.0 - recipe.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def make_scheduler(optimizer: torch.optim.Optimizer, recipe: Recipe, horizon: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(recipe, horizon))


def ema_decay(recipe: Recipe, updates: int) -> float:
    """diffusion_policy's EMA warm-up: 0 on the first update, then 1 - (1 + step)^-power, capped."""
    step = updates - 1
    if step <= 0:
        return 0.0
    return min(recipe.ema_max_decay, 1.0 - (1.0 + step) ** -recipe.ema_power)


def make_ema(policy: Policy, recipe: Recipe) -> AveragedModel | None:
    """torch's AveragedModel with the recipe's decay; ``.module`` is the averaged policy."""
    if not recipe.ema:
        return None

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        # num_averaged counts earlier updates; AveragedModel copies the weights on the very first.
        decay = ema_decay(recipe, int(num_averaged) + 1)
        torch._foreach_lerp_(averaged, current, 1.0 - decay)

    ema = AveragedModel(policy, multi_avg_fn=update)
    ema.module.eval()
    return ema
