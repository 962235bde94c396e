"""Agentic Transformer (Liu & Abbeel 2023, "Emergent Agentic Transformer from Chain of Hindsight Experience").

There is no official code; these are kinema's choices (BENCHMARKS.md, "open choices").

Chains (``kinema.datasets.chains``, batch kind ``chains``). A chain is 1..max_chain_len
distinct episodes (drawn in proportion to their length, like DT windows) sorted by
ascending total return and laid end to end. Every episode's target is relabelled to the chain's maximum
return R_max, so its return-to-go is R_max minus the rewards collected so far *in that
episode*: a sub-optimal episode i ends at R_max - R_i > 0, the best one ends at 0. DT's
windows are cut from the chain (a uniform start, up to K steps), so windows cross episode
boundaries; timesteps restart at 0 in every episode (they are the time within a
trial). Why windows and not whole chains: D4RL episodes run to 1000 steps, so a chain of
3-4 whole episodes is 10k+ tokens per sample, beyond a CPU budget (the paper trained on
TPUs); K-step windows keep AT's cost equal to DT's and let the model see the end of the
previous, worse trial in its context for the first K steps of a new one.

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

Test time: ``reset(N, target_return=R)`` then several trials per context. The evaluator
calls ``end_episode(env_indices)`` when a trial ends: unlike DT the context is kept; the
trial's return-to-go restarts at the target, its timestep at 0 and its completion flag at
0, and the new trial's first action token carries the last step of the trial before.
Report first-trial, last-trial and best-of-n scores (``kinema.envs.trials``): best-of-n
alone is the paper's number and flatters any stochastic policy.

Known limitation, measured on kinema's walker2d-medium-replay (5k steps, batch 64, seed 0,
first trial): with chains of one episode (``max_chain_len=1``: DT plus the reward and
completion tokens) AT scores 79.7 (DT: 69.0 over 2 seeds), but with the default chains
of up to 4 episodes it scores 8.8 (``loss_on="all"``) and 9.6 (``"final_trial"``), below
BC. K-step windows show a trial's predecessor only during its first K steps, so beyond
them a relabelled return-to-go cannot be told from a true one; why the final-trial loss,
whose targets are all true, fails as well is not known yet. On hopper-medium-replay the
default scores 25.6 (DT: 29.4 over 3 seeds, BC: 14.8). ``policy.max_chain_len`` sets the chain length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kinema.policies import register_policy
from kinema.policies.base import BatchSpec, require_positive_int
from kinema.policies.dt import DecisionTransformer, DTConfig

LOSS_ON = ("all", "final_trial")


@dataclass
class ATConfig(DTConfig):
    reward_scale: float = 1.0  # rewards are divided by this before embedding
    loss_on: str = "all"  # "all" episodes of a chain, or only its "final_trial" (the best)
    max_chain_len: int = 4  # episodes per chain, at most (the chain sampler draws 1..max_chain_len)

    def __post_init__(self) -> None:
        super().__post_init__()
        require_positive_int(self.max_chain_len, "max_chain_len")
        if not self.reward_scale > 0:
            raise ValueError(f"reward_scale must be positive, got {self.reward_scale}")
        if self.loss_on not in LOSS_ON:
            raise ValueError(f"loss_on must be one of {LOSS_ON}, got {self.loss_on!r}")


@register_policy
class AgenticTransformer(DecisionTransformer):
    name = "at"
    config_class = ATConfig

    @property
    def action_features(self) -> int:
        return self.spec.act_dim + 2  # action, its reward, completion after it

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("chains", self.config.context_len, {"max_chain_len": self.config.max_chain_len})

    def _window_features(self, batch: dict[str, torch.Tensor], unit_actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [key for key in ("rewards", "completions") if key not in batch]
        if missing:
            raise ValueError(f"at loss: the batch lacks {missing}; the Agentic Transformer trains on 'chains' batches")
        outcome = torch.stack((batch["rewards"] / self.config.reward_scale, batch["completions"].to(unit_actions.dtype)), -1)
        action_feats = torch.cat((unit_actions, outcome), dim=-1)
        return action_feats, (batch["returns_to_go"] / self.config.rtg_scale).unsqueeze(-1)

    def _loss_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.config.loss_on == "all":
            return batch["mask"]
        if "final_trial" not in batch:
            raise ValueError("at loss: loss_on='final_trial' needs the chains batch key 'final_trial'")
        return batch["mask"].bool() & batch["final_trial"].bool()

    # -- rollouts: trials follow each other in one context -------------------------------
    def reset(self, num_envs: int, target_return: Any = None, **conditioning: Any) -> None:
        super().reset(num_envs, target_return=target_return, **conditioning)
        state = self._rollout
        state.trial_returns = np.zeros(state.num_envs, dtype=np.float64)
        state.completed = np.zeros(state.num_envs, dtype=bool)

    def observe_reward(self, reward: Any) -> None:
        super().observe_reward(reward)
        rewards = np.asarray(reward, dtype=np.float64).reshape(-1)
        state = self._rollout
        state.trial_returns += rewards
        state.completed |= state.trial_returns >= state.targets  # sticky within the trial
        act_dim = self.spec.act_dim
        state.previous_feats[:, act_dim] = rewards / self.config.reward_scale
        state.previous_feats[:, act_dim + 1] = state.completed

    def _record_action(self, unit_action: torch.Tensor) -> None:
        super()._record_action(unit_action)
        # The outcome of this action arrives with observe_reward; until then: no reward, same completion.
        state, act_dim = self._rollout, self.spec.act_dim
        state.previous_feats[:, act_dim] = 0.0
        state.previous_feats[:, act_dim + 1] = state.completed

    def end_episode(self, env_indices: Any) -> None:
        """A trial of these environments ended: the next one starts in the same context."""
        index = self._check_env_indices(env_indices)
        self._restart_trial(index)
        state = self._rollout
        state.trial_returns[index] = 0.0
        state.completed[index] = False
