"""Body Transformer: graph masks in the entry point's convention, locality of BoT-Hard, variants, checkpoints."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kinema.envs.bodygraph import BodyGraph, BodyNode
from kinema.policies import NormStats, PolicySpec, make_policy
from kinema.policies.attention import attention
from kinema.policies.bot import layer_masks
from kinema.train.checkpoint import load_checkpoint, save_checkpoint

# A chain root - a - b - c (c is three hops from root), plus a leaf d on root.
CHAIN = BodyGraph(
    (
        BodyNode("root", None, (0, 1), ()),
        BodyNode("a", "root", (2,), (0,)),
        BodyNode("b", "a", (3, 4), (1,)),
        BodyNode("c", "b", (5,), (2, 3)),
        BodyNode("d", "root", (), (4,)),  # no observation: a learned token
    ),
    obs_dim=6,
    act_dim=5,
)
SPEC = PolicySpec(6, 5, (-1.0,) * 5, (1.0,) * 5, structure={"body_graph": CHAIN.to_dict()})
STATS = NormStats.for_observations(np.zeros(6, np.float32), np.ones(6, np.float32))
SMALL = {"name": "bot", "embed_dim": 16, "n_heads": 2}


def bot(**config) -> torch.nn.Module:
    torch.manual_seed(0)
    return make_policy({**SMALL, **config}, SPEC, STATS)


def input_gradient(policy, action: int) -> np.ndarray:
    """d action[action] / d observation, at a random observation."""
    obs = torch.randn(1, 6, requires_grad=True)
    policy(obs)[0, action].backward()
    return obs.grad[0].abs().numpy()


def test_masks_say_true_may_attend_as_the_attention_entry_point_does() -> None:
    mask = torch.tensor(CHAIN.attention_mask(1))
    assert mask[0, 1] and not mask[0, 2]  # root sees a, not b
    q = torch.randn(1, 1, 5, 4)
    k = torch.randn(1, 1, 5, 4)
    v = torch.randn(1, 1, 5, 4)
    out = attention(q, k, v, mask=mask)
    # Row 0 may attend to root, a and d only: its output is a mix of those values.
    blocked = v.clone()
    blocked[..., 2:4, :] += 100.0  # change b and c: row 0 must not move
    assert torch.allclose(attention(q, k, blocked, mask=mask)[..., 0, :], out[..., 0, :])
    assert not torch.allclose(attention(q, k, blocked, mask=mask)[..., 1, :], out[..., 1, :])  # a sees b


def test_one_hard_layer_is_blind_beyond_one_hop() -> None:
    policy = bot(variant="hard", n_layers=1)
    grad = input_gradient(policy, action=0)  # action 0 is node a's: a sees root, a, b
    assert grad[[0, 1, 2, 3, 4]].min() > 0
    assert grad[5] == 0.0  # c is two hops from a
    grad_c = input_gradient(policy, action=2)  # node c sees b and c only
    assert grad_c[[0, 1, 2]].max() == 0.0 and grad_c[[3, 4, 5]].min() > 0


def test_two_hard_layers_see_two_hops_and_vanilla_sees_everything() -> None:
    assert input_gradient(bot(variant="hard", n_layers=2), action=2)[[0, 1]].max() == 0.0  # root is 3 hops from c
    assert input_gradient(bot(variant="hard", n_layers=2), action=2)[2] > 0  # a is 2 hops from c
    assert input_gradient(bot(variant="hard", n_layers=1, hops=2), action=2)[2] > 0
    assert input_gradient(bot(variant="vanilla", n_layers=1), action=2).min() > 0
    assert input_gradient(bot(variant="mix", n_layers=2), action=2).min() > 0  # layer 1 is unmasked


def test_mix_alternates_masked_and_unmasked_layers() -> None:
    assert layer_masks("mix", 4) == [True, False, True, False]
    assert layer_masks("mix", 4, first_masked_layer=1) == [False, True, False, True]
    assert layer_masks("hard", 3) == [True] * 3 and layer_masks("vanilla", 2) == [False] * 2
    assert bot(variant="mix", n_layers=4).encoder.layer_is_masked == [True, False, True, False]


def test_each_action_is_read_from_its_own_node() -> None:
    policy = bot(variant="hard", n_layers=1)
    tokens = torch.zeros(1, 5, 16, requires_grad=True)
    policy.detokenizer(tokens)[0, 4].backward()  # action 4 belongs to d (node 4)
    assert tokens.grad[0].abs().sum(dim=1).nonzero().flatten().tolist() == [4]


def test_act_is_in_the_action_box_and_refuses_nan() -> None:
    policy = bot()
    policy.reset(3)
    action = policy.act(np.random.default_rng(0).normal(size=(3, 6)) * 100)
    assert action.shape == (3, 5) and (action.abs() <= 1.0).all()
    with pytest.raises(ValueError, match="environment"):
        policy.act(np.array([[0, 0, 0, 0, 0, 0], [np.nan, 0, 0, 0, 0, 0], [0] * 6], np.float32))


def test_bot_learns_a_linear_expert() -> None:
    policy = bot(variant="mix", n_layers=2)  # the unmasked layer lets every action see every input
    weights = torch.randn(6, 5) * 0.3
    optimiser = torch.optim.Adam(policy.parameters(), lr=3e-3)
    for _ in range(300):
        obs = torch.randn(128, 6)
        loss, _ = policy.loss({"observations": obs, "actions": torch.tanh(obs @ weights)})
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert loss.item() < 0.02


def test_without_a_body_graph_the_policy_says_where_it_comes_from() -> None:
    plain = PolicySpec(6, 5, (-1.0,) * 5, (1.0,) * 5)
    with pytest.raises(ValueError, match=r"body graph.*policy.body_graph=<bodygraph.json>"):
        make_policy(SMALL, plain, STATS)


@pytest.mark.parametrize(("field", "value", "message"), [("variant", "soft", "variant must be one of hard, mix, vanilla"),
                                                          ("hops", -1, "hops must be an integer >= 0"),
                                                          ("first_masked_layer", 2, "first_masked_layer must be 0 or 1"),
                                                          ("n_heads", 3, "divisible by n_heads")])
def test_bad_config_values_are_named(field: str, value, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        make_policy({**SMALL, field: value}, SPEC, STATS)


def test_body_graph_and_actions_survive_a_checkpoint_round_trip(tmp_path) -> None:
    policy = bot(variant="mix", n_layers=2)
    save_checkpoint(tmp_path / "ckpt", policy, {"policy": {**SMALL, "variant": "mix", "n_layers": 2}}, "custom", 5, None)
    loaded = load_checkpoint(tmp_path / "ckpt").policy
    assert BodyGraph.from_dict(loaded.spec.structure["body_graph"], 6, 5) == CHAIN
    obs = np.random.default_rng(1).normal(size=(4, 6)).astype(np.float32)
    policy.reset(4)
    loaded.reset(4)
    np.testing.assert_array_equal(policy.act(obs).numpy(), loaded.act(obs).numpy())


def test_padding_of_the_batched_per_node_maps_starts_at_zero_and_is_not_counted() -> None:
    policy = bot()
    encoder = policy.encoder
    assert (encoder.token_weight.detach()[~encoder.obs_valid] == 0).all()
    real = sum(len(n.obs_indices) for n in CHAIN.nodes) * 16 + sum(len(n.act_indices) for n in CHAIN.nodes) * (16 + 1)
    padded = encoder.token_weight.numel() + policy.detokenizer.weight.numel() + policy.detokenizer.bias.numel()
    assert policy.trained_parameter_count == sum(p.numel() for p in policy.parameters()) - (padded - real)


def test_resuming_with_another_body_graph_is_refused(hopper_random_hdf5, tmp_path) -> None:
    import json

    from kinema.envs.bodygraph import derive_body_graph
    from kinema.train.cli import compose_train_config
    from kinema.train.trainer import run_training

    graph = derive_body_graph("hopper").to_dict()
    swapped = json.loads(json.dumps(graph))
    swapped["nodes"][1]["obs_indices"], swapped["nodes"][2]["obs_indices"] = graph["nodes"][2]["obs_indices"], graph["nodes"][1]["obs_indices"]
    layout = tmp_path / "layout.json"
    layout.write_text(json.dumps(swapped))
    overrides = [f"dataset.path={hopper_random_hdf5}", "policy=bot", "policy.embed_dim=16", "policy.n_layers=1",
                 "train.steps=2", "train.checkpoint_every=1", "eval.episodes=1", "eval.num_envs=1"]
    run_training(compose_train_config([*overrides, "train.steps=1"]), tmp_path / "run")
    with pytest.raises(ValueError, match="another task structure.*body_graph"):
        run_training(compose_train_config([*overrides, f"policy.body_graph={layout}"]), tmp_path / "run")
