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
