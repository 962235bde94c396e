"""The attention entry point: dispatch, mask conventions, cache-style causal alignment."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from kinema.policies.attention import attention, available_attention_backends, register_attention_backend


def _qkv(batch=2, heads=2, q_len=6, k_len=6, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, dim, generator=generator) for n in (q_len, k_len, k_len))


def _reference(q, k, v, allowed):
    scores = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1) @ v


def test_sdpa_and_math_backends_agree_with_a_plain_softmax() -> None:
    q, k, v = _qkv()
    allowed = torch.rand(2, 1, 6, 6, generator=torch.Generator().manual_seed(1)) > 0.4
    allowed |= torch.eye(6, dtype=torch.bool)  # no empty rows
    expected = _reference(q, k, v, allowed)
    torch.testing.assert_close(attention(q, k, v, mask=allowed), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention(q, k, v, mask=allowed, backend="math"), expected, atol=1e-5, rtol=1e-5)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(attention(q, k, v, causal=True), _reference(q, k, v, causal), atol=1e-5, rtol=1e-5)
    # causal and a mask combine
    torch.testing.assert_close(
        attention(q, k, v, mask=allowed, causal=True), _reference(q, k, v, allowed & causal), atol=1e-5, rtol=1e-5
    )


def test_causal_with_fewer_queries_is_aligned_to_the_last_keys() -> None:
    """Decoding the last 2 tokens against 6 cached keys equals the last 2 rows of full causal attention."""
    q, k, v = _qkv()
    full = attention(q, k, v, causal=True)
    for backend in (None, "sdpa", "math"):
        tail = attention(q[:, :, -2:], k, v, causal=True, backend=backend)
        torch.testing.assert_close(tail, full[:, :, -2:], atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_a_flex_block_mask_dispatches_to_flex_attention() -> None:
    from torch.nn.attention.flex_attention import create_block_mask

    q, k, v = _qkv(batch=1, heads=1, q_len=16, k_len=16)
    block_mask = create_block_mask(lambda b, h, qi, ki: qi >= ki, None, None, 16, 16, device="cpu")
    torch.testing.assert_close(attention(q, k, v, mask=block_mask), attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_backends_can_be_registered_and_unknown_ones_are_named() -> None:
    calls = []

    def doubled(q, k, v, mask, causal, dropout_p, scale):
        calls.append(causal)
        return 2 * attention(q, k, v, mask=mask, causal=causal)

    register_attention_backend("test-doubled", doubled)
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, causal=True, backend="test-doubled"), 2 * attention(q, k, v, causal=True))
    assert calls == [True] and "test-doubled" in available_attention_backends()
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        attention(q, k, v, backend="nope")


def test_importing_the_models_does_not_import_triton() -> None:
    code = (
        "import sys, kinema.policies.attention, kinema.policies.transformer, kinema.policies.dt, kinema.policies.at; "
        "sys.exit(1 if 'triton' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_mask_description_gives_the_masks_dt_and_bot_build_by_hand() -> None:
    from kinema.policies.attention import MaskSpec
    from kinema.policies.body_graph import BodyGraph
    from kinema.policies.dt import TOKENS_PER_STEP, step_attention_mask

    valid = torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) > 0.3
    for window in (0, 2):
        by_hand = (step_attention_mask(4, window)[None, None] & valid[:, None, None, :]) | torch.eye(12, dtype=torch.bool)
        spec = MaskSpec(causal=True, window=window, group=TOKENS_PER_STEP, key_valid=valid, keep_diagonal=True)
        assert torch.equal(spec.dense(3, 12, 12), by_hand)
    graph = BodyGraph.from_dict({"nodes": [
        {"name": "root", "parent": None, "obs_indices": [0], "act_indices": []},
        {"name": "hip", "parent": "root", "obs_indices": [1], "act_indices": [0]},
        {"name": "knee", "parent": "hip", "obs_indices": [2], "act_indices": [1]}]}, obs_dim=3, act_dim=2)
    adjacency = torch.as_tensor(graph.attention_mask(1))
    assert torch.equal(MaskSpec(adjacency=adjacency).dense(1, 3, 3)[0, 0], adjacency)
    # decoding: the last query row of a causal band
    assert torch.equal(MaskSpec(causal=True, window=2, group=3).dense(1, 1, 12)[0, 0, 0], step_attention_mask(4, 2)[-1])


def test_a_mask_description_through_dense_backends_equals_its_dense_mask() -> None:
    from kinema.policies.attention import MaskSpec

    q, k, v = _qkv(q_len=4, k_len=9)
    spec = MaskSpec(causal=True, window=2, group=3, key_valid=torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.3,
                    keep_diagonal=True)
    dense = spec.dense(2, 4, 9)
    for backend in (None, "sdpa", "math"):
        torch.testing.assert_close(attention(q, k, v, mask=spec, backend=backend), _reference(q, k, v, dense), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fields, message", [
    ({"window": -1}, "window must be an integer >= 0"),
    ({"group": 0}, "group must be an integer >= 1"),
    ({"key_valid": torch.ones(2, 3)}, "key_valid must be a 2-D bool tensor"),
    ({"adjacency": torch.ones(2, 3, dtype=torch.bool)}, "adjacency must be square"),
])
def test_a_malformed_mask_description_is_refused_naming_the_field(fields, message) -> None:
    from kinema.policies.attention import MaskSpec

    with pytest.raises(ValueError, match=message):
        MaskSpec(**fields)


def test_auto_picks_sdpa_off_cuda_and_says_so_once(caplog) -> None:
    import logging

    from kinema.policies import attention as attention_module

    attention_module._logged_choices.clear()
    q, k, v = _qkv()
    with caplog.at_level(logging.INFO, logger="kinema.policies.attention"):
        out = attention(q, k, v, causal=True, backend="auto")
        attention(q, k, v, causal=True, backend="auto")
    torch.testing.assert_close(out, attention(q, k, v, causal=True))
    assert [r.getMessage() for r in caplog.records] == ["attention_backend=auto: sdpa on cpu"]
    assert not attention_module.takes_mask_spec("auto", torch.device("cpu"))
    assert attention_module.resolve_backend("auto", torch.device("cuda")) in ("triton", "sdpa")
