"""Agentic Transformer (Liu & Abbeel 2023, "Emergent Agentic Transformer from Chain of Hindsight Experience").

There is no official code; these are kinema's choices (BENCHMARKS.md, "open choices").

Defaults: one-episode chains (``max_chain_len=1``: DT's windows plus the reward and completion
tokens) and an EMA of the weights for evaluation and checkpoints (``recipe.ema``), the setting
that scored best on kinema's data (README, "Agentic Transformer: what was tried"). The paper's
chains of several episodes are ``policy.max_chain_len=4``.

Chains (``kinema.datasets.samplers.chains``, batch kind ``chains``). A chain is 1..max_chain_len
distinct episodes (drawn in proportion to their length, like DT windows) sorted by
ascending total return and laid end to end. Every episode's target is relabelled to the chain's maximum
return R_max, so its return-to-go is R_max minus the rewards collected so far *in that
episode*: a sub-optimal episode i ends at R_max - R_i > 0, the best one ends at 0. DT's
windows are cut from the chain (a uniform start, up to K steps), so windows cross episode
boundaries; timesteps restart at 0 in every episode (they are the time within a
trial). Why windows and not whole chains: a whole chain costs far more work per sample than a
CPU budget allows (the paper trained on TPUs; README, "Whole chains vs windows"). K-step windows
keep AT's cost equal to DT's and let the model see the end of the previous, worse trial in its
context for the first K steps of a new one.

Completion token d_t: 1 once the episode's cumulative reward up to and including step t
has reached the relabelled target (sticky: it stays 1 for the rest of that trial even if
later rewards are negative). In a sorted chain only the best episode reaches R_max, on
its last steps; at test time d turns 1 when a trial's return passes the target, and the
agent keeps playing that trial and the following ones ("continuing after d = 1").

Tokens, three per step like DT, grouped as ``[(a_{t-1}, r_{t-1}, d_{t-1}), R_t, s_t]``: the
action token also carries the reward that action earned and the completion flag after
it, i.e. the outcome of step t-1, which becomes known only after a_{t-1} was chosen, so
causality is the paper's (R, s, a, r, d) order while the attention length stays 3K rather
than 5K. Rewards are divided by ``reward_scale`` and returns-to-go by ``rtg_scale``.

Loss: on the actions of every episode in the chain (``loss_on="all"``, default: the model
is autoregressive over the whole chain, and the worse trials in front of a better one are
what it learns to improve from), or only on the chain's final, best episode
(``loss_on="final_trial"``; then relabelled targets equal true returns-to-go and the
earlier episodes serve as context only).

Relabelling (``relabel``): ``"chain_max"`` (above) gives every trial the chain's best return as
its target; ``"own_return"`` keeps each trial's true returns-to-go, as DT's windows do, and the
completion token then turns 1 where a trial reaches its own return; ``"later_trials"`` relabels
only the trials that follow another (a chain's first trial and fresh-trial windows keep their
own return), so a first trial is conditioned as DT is and a later one on the chain's best.

Window weights (``window_start``): ``"chain"`` starts a window at a uniform step of the chain,
so in chains of several episodes a step weighs more the longer its episode; ``"episode"`` starts
it at a uniform step of the chain's first drawn episode, so every step of the dataset starts a
window equally often, as in DT.

Trial summary (``trial_summary``, off by default): each step's return token also carries the
previous trial's return (/ ``rtg_scale``) and length (/ ``max_timestep``), zeros on a first
trial, so what the context knows of the trial before reaches every window of a trial, not
only its first K steps, at no extra token. In training it is the chain's episode before the
step's own (none on a chain's first trial and in fresh-trial windows); at test time
``end_episode`` writes the trial that ended.

Test time: ``reset(N, target_return=R)`` then several trials per context. The evaluator
calls ``end_episode(env_indices)`` when a trial ends: unlike DT the context is kept; the
trial's return-to-go restarts at the target, its timestep at 0 and its completion flag at
0, and the new trial's first action token carries the last step of the trial before.
Report first-trial, last-trial and best-of-n scores (``kinema.envs.trials``): best-of-n
alone is the paper's number and flatters any stochastic policy.

Fresh trials (``fresh_trial_prob``, default 0.5). A test context's first trial starts with
nothing before it, but in a chain every trial except the first (the worst) follows a
predecessor, so nearly all training windows over a good trial's first steps show a failed
episode's tail. With probability ``fresh_trial_prob`` a window hides its earlier trials
(they become left padding), so trial starts are also seen the way a first trial meets them;
the other windows keep the predecessor that trials 2..n meet at test time.

What each choice scored, and what limits the model on kinema's data: README, "Agentic
Transformer: what was tried".
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from kinema.policies import Recipe, register_policy
from kinema.policies.base import BatchSpec, require_positive_int
from kinema.policies.dt import DecisionTransformer, DTConfig, _Rollout, dt_recipe

LOSS_ON = ("all", "final_trial")
RELABEL = ("chain_max", "own_return", "later_trials")
WINDOW_START = ("chain", "episode")


def at_recipe() -> Recipe:
    """DT's recipe, evaluated and saved with an EMA of the weights: without it one checkpoint's
    score swings by tens of points from one evaluation to the next on walker2d-medium-replay."""
    return dataclasses.replace(dt_recipe(), ema=True)


@dataclass
class ATConfig(DTConfig):
    reward_scale: float = 1.0  # rewards are divided by this before embedding
    loss_on: str = "all"  # "all" episodes of a chain, or only its "final_trial" (the best)
    max_chain_len: int = 1  # episodes per chain, at most (the chain sampler draws 1..max_chain_len)
    fresh_trial_prob: float = 0.5  # share of windows whose earlier trials are hidden, as before a first trial
    relabel: str = "chain_max"  # trials' targets: the chain's best return, their "own_return", or best on "later_trials" only
    trial_summary: bool = False  # the return token also carries the previous trial's return and length
    window_start: str = "chain"  # windows start at a uniform step of the "chain" or of its first drawn "episode" (DT's weights)
    recipe: Recipe = field(default_factory=at_recipe)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int(self.max_chain_len, "max_chain_len")
        prob = self.fresh_trial_prob
        if isinstance(prob, bool) or not isinstance(prob, (int, float)) or not 0.0 <= prob <= 1.0:
            raise ValueError(f"fresh_trial_prob must be a number in [0, 1], got {prob!r}")
        if not self.reward_scale > 0:
            raise ValueError(f"reward_scale must be positive, got {self.reward_scale}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")
        if self.relabel not in RELABEL:
            raise ValueError(f"relabel must be one of {RELABEL}, got {self.relabel!r}")
        if self.window_start not in WINDOW_START:
            raise ValueError(f"window_start must be one of {WINDOW_START}, got {self.window_start!r}")
        if not isinstance(self.trial_summary, bool):
            raise ValueError(f"trial_summary must be true or false, got {self.trial_summary!r}")


@register_policy
class AgenticTransformer(DecisionTransformer):
    name = "at"
    label = "kinema AT"
    config_class = ATConfig
    default_trials = 4  # the AT protocol: several trials per context; eval.json's headline is the first

    @property
    def action_features(self) -> int:
        return self.spec.act_dim + 2  # action, its reward, completion after it

    @property
    def return_features(self) -> int:
        return 3 if self.config.trial_summary else 1  # return-to-go[, previous trial's return and length]

    @property
    def batch_spec(self) -> BatchSpec:
        options = {"max_chain_len": self.config.max_chain_len, "fresh_trial_prob": float(self.config.fresh_trial_prob),
                   "relabel": self.config.relabel, "window_start": self.config.window_start}
        return BatchSpec("chains", self.config.context_len, options)

    def _window_features(self, batch: dict[str, torch.Tensor], unit_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        needed = ["rewards", "completions"] + (["previous_trial_return", "previous_trial_length"] if self.config.trial_summary else [])
        missing = [key for key in needed if key not in batch]
        if missing:
            raise ValueError(f"at loss: the batch lacks {missing}; the Agentic Transformer trains on 'chains' batches")
        outcome = torch.stack((batch["rewards"] / self.config.reward_scale, batch["completions"].to(unit_actions.dtype)), -1)
        action_feats = torch.cat((unit_actions, outcome), dim=-1)
        return_feats = [batch["returns_to_go"] / self.config.rtg_scale]
        if self.config.trial_summary:
            return_feats += [batch["previous_trial_return"] / self.config.rtg_scale,
                             batch["previous_trial_length"] / self.config.max_timestep]
        return action_feats, torch.stack(return_feats, dim=-1).to(unit_actions.dtype)

    def _loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.loss_on == "all":
            return batch["mask"]
        if "final_trial" not in batch:
            raise ValueError("at loss: loss_on='final_trial' needs the chains batch key 'final_trial'")
        return batch["mask"].bool() & batch["final_trial"].bool()

    # -- rollouts: trials follow each other in one context -------------------------------
    def _make_rollout(self, num_envs: int, targets: np.ndarray) -> "_TrialsRollout":
        return _TrialsRollout(self, num_envs, targets)

    def end_episode(self, env_indices: Any) -> None:
        """A trial of these environments ended: the next one starts in the same context."""
        self._rollout.restart_trial(torch.as_tensor(self._check_env_indices(env_indices), device=self.device))


class _TrialsRollout(_Rollout):
    """DT's rollout plus each trial's return so far and whether it reached the target (fed back as tokens)."""

    TENSOR_STATE = (*_Rollout.TENSOR_STATE, "trial_returns", "completed")

    def __init__(self, policy: AgenticTransformer, num_envs: int, targets: np.ndarray):
        super().__init__(policy, num_envs, targets)
        self.trial_returns = torch.zeros(num_envs, dtype=torch.float64, device=self.device)
        self.completed = torch.zeros(num_envs, dtype=torch.bool, device=self.device)

    def observe_reward(self, rewards: torch.Tensor) -> None:
        super().observe_reward(rewards)
        self.trial_returns += rewards
        self.completed |= self.trial_returns >= self.targets  # sticky within the trial
        self.previous_feats[:, self.act_dim] = rewards / self.config.reward_scale
        self.previous_feats[:, self.act_dim + 1] = self.completed

    def _bind_input_views(self) -> None:
        super()._bind_input_views()
        self.trial_summary = self.step_input[:, self.action_features + 1:]  # empty without config.trial_summary

    def restart_trial(self, index: torch.Tensor) -> None:
        if self.config.trial_summary:  # what the new trial knows of the one that ended, as in training
            length = self.times[index, 1].to(torch.float64)  # the steps taken in the trial
            summary = (self.trial_returns[index] / self.config.rtg_scale, length / self.config.max_timestep)
            self.trial_summary[index] = torch.stack(summary, dim=-1).to(self.step_input.dtype)
        super().restart_trial(index)
        self.trial_returns[index] = 0.0
        self.completed[index] = False

    def record_action(self, unit_action: torch.Tensor) -> None:
        super().record_action(unit_action)
        # The outcome of this action arrives with observe_reward; until then: no reward, same completion.
        self.previous_feats[:, self.act_dim] = 0.0
        self.previous_feats[:, self.act_dim + 1] = self.completed
