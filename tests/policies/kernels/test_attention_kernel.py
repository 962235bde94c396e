"""The Triton attention kernel against an fp32 PyTorch reference, over every mask a MaskSpec describes."""

from __future__ import annotations

import pytest
import torch

from kinema.policies.attention import MaskSpec, attention
from kinema.policies.kernels import attention_forward, reference_attention

LENGTHS = (1, 7, 60, 61, 130)
HEAD_DIMS = {1: 16, 7: 24, 60: 64, 61: 32, 130: 128}  # each length with another head dimension


def masks(length: int, batch: int, generator: torch.Generator) -> dict[str, MaskSpec]:
    key_valid = torch.rand(batch, length, generator=generator) > 0.3
    adjacency = torch.rand(length, length, generator=generator) > 0.6
    return {
        "none": MaskSpec(),
        "causal": MaskSpec(causal=True),
        "padding": MaskSpec(key_valid=key_valid, keep_diagonal=True),
        "banded": MaskSpec(causal=True, window=4, group=3),  # DT's: 3 tokens per step, 4 steps
        "banded_both_ways": MaskSpec(window=2, group=5),
        "graph": MaskSpec(adjacency=adjacency | torch.eye(length, dtype=torch.bool)),
        "dt": MaskSpec(causal=True, window=3, group=3, key_valid=key_valid, keep_diagonal=True),
    }


def qkv(batch: int, heads: int, q_len: int, k_len: int, head_dim: int, device, dtype=torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, heads, n, head_dim, generator=generator).to(device=device, dtype=dtype) for n in (q_len, k_len, k_len)]


@pytest.mark.parametrize("length", LENGTHS)
def test_fp32_matches_the_reference_for_every_mask(length: int, device) -> None:
    batch, heads, head_dim = 2, 3, HEAD_DIMS[length]
    q, k, v = qkv(batch, heads, length, length, head_dim, device)
    for name, spec in masks(length, batch, torch.Generator().manual_seed(length)).items():
        out = attention_forward(q, k, v, spec)
        expected = reference_attention(q.double(), k.double(), v.double(), spec).float()
        assert (out - expected).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("length", (7, 61))
def test_fp16_error_is_within_twice_pytorchs_own_fp16_error(length: int, device) -> None:
    """FlashAttention's rule: the kernel's error against fp32 at most twice PyTorch's fp16 error."""
    q, k, v = qkv(2, 2, length, length, 32, device, torch.float16)
    for name, spec in masks(length, 2, torch.Generator().manual_seed(1)).items():
        exact = reference_attention(q.float(), k.float(), v.float(), spec)
        pytorch_fp16 = reference_attention(q, k, v, spec).float()
        kernel = attention_forward(q, k, v, spec).float()
        assert kernel.dtype == torch.float32 and attention_forward(q, k, v, spec).dtype == torch.float16
        assert (kernel - exact).abs().max() <= 2 * (pytorch_fp16 - exact).abs().max() + 1e-4, name


def test_fewer_queries_than_keys_align_bottom_right_as_decoding_does(device) -> None:
    """One query against 60 cached keys is the last row of the full computation."""
    q, k, v = qkv(2, 2, 60, 60, 16, device)
    for name, spec in masks(60, 2, torch.Generator().manual_seed(2)).items():
        full = attention_forward(q, k, v, spec)
        last = attention_forward(q[:, :, -1:].contiguous(), k, v, spec)
        assert (last - full[:, :, -1:]).abs().max().item() < 1e-6, name
        three = attention_forward(q[:, :, -3:].contiguous(), k, v, spec)
        assert (three - full[:, :, -3:]).abs().max().item() < 1e-6, name


def test_a_query_that_may_attend_to_nothing_gets_zeros_and_an_all_true_mask_changes_nothing(device) -> None:
    q, k, v = qkv(2, 1, 9, 9, 16, device)
    key_valid = torch.ones(2, 9, dtype=torch.bool)
    key_valid[1] = False  # the second sequence has no keys at all
    out = attention_forward(q, k, v, MaskSpec(key_valid=key_valid))
    assert torch.equal(out[1], torch.zeros_like(out[1])) and out[0].abs().sum() > 0
    all_true = MaskSpec(key_valid=torch.ones(2, 9, dtype=torch.bool), adjacency=torch.ones(9, 9, dtype=torch.bool))
    assert (attention_forward(q, k, v, all_true) - attention_forward(q, k, v)).abs().max().item() < 1e-6


def test_strided_inputs_as_a_fused_qkv_projection_produces_them(device) -> None:
    """Blocks split one (B, T, 3, H, d) projection into q, k, v views: non-contiguous strides."""
    qkv_joint = torch.randn(2, 13, 3, 2, 16, generator=torch.Generator().manual_seed(3)).to(device)
    q, k, v = qkv_joint.permute(2, 0, 3, 1, 4)
    assert not q.is_contiguous()
    spec = MaskSpec(causal=True)
    assert (attention_forward(q, k, v, spec) - reference_attention(q, k, v, spec)).abs().max().item() < 1e-5


def test_the_entry_point_backend_gives_sdpas_outputs_and_gradients(device) -> None:
    q, k, v = (t.requires_grad_() for t in qkv(2, 2, 61, 61, 16, device, seed=4))
    spec = MaskSpec(causal=True, window=4, group=3, key_valid=torch.rand(2, 61, generator=torch.Generator().manual_seed(5)) > 0.2,
                    keep_diagonal=True)
    weights = torch.randn(2, 2, 61, 16, generator=torch.Generator().manual_seed(6)).to(device)
    grads = {}
    for backend in ("triton", "sdpa"):
        out = attention(q, k, v, mask=spec, backend=backend)
        grads[backend] = (out.detach(), *torch.autograd.grad((out * weights).sum(), (q, k, v)))
    for triton_value, sdpa_value in zip(grads["triton"], grads["sdpa"]):
        assert (triton_value - sdpa_value).abs().max().item() < 1e-5
    causal_flag = attention(q.detach(), k.detach(), v.detach(), causal=True, backend="triton")
    assert (causal_flag - attention(q.detach(), k.detach(), v.detach(), causal=True)).abs().max().item() < 1e-5


def test_bad_inputs_are_refused_naming_the_problem(device) -> None:
    q, k, v = qkv(1, 1, 4, 4, 16, device)
    with pytest.raises(ValueError, match="MaskSpec, not a dense mask"):
        attention(q, k, v, mask=torch.ones(4, 4, dtype=torch.bool), backend="triton")
    torch.manual_seed(0)
    dropped = attention(q, k, v, dropout_p=0.5, backend="triton")  # no dropout kernel: PyTorch's path, with dropout
    torch.manual_seed(0)
    assert torch.allclose(dropped, reference_attention(q, k, v, dropout_p=0.5))
    with pytest.raises(ValueError, match="head dimension <= 128"):
        attention_forward(*qkv(1, 1, 4, 4, 160, device))
    with pytest.raises(ValueError, match="fp32, fp16 or bf16"):
        attention_forward(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match=r"key_valid must have shape \(1 or 1, 4\)"):
        attention_forward(q, k, v, MaskSpec(key_valid=torch.ones(1, 5, dtype=torch.bool)))
    with pytest.raises(ValueError, match="queries against"):
        attention_forward(*qkv(1, 1, 5, 4, 16, device))


@pytest.mark.parametrize("position", (0, 2, 4))
def test_decoding_into_a_ring_cache_gives_the_last_rows_of_the_full_computation(position: int, device) -> None:
    """DT's cached rollout: 5 step groups of 3 tokens in a ring, the newest group written at ``position``."""
    groups, group = 5, 3
    q, k, v = qkv(2, 2, groups * group, groups * group, 16, device, seed=7)
    valid = torch.rand(2, groups * group, generator=torch.Generator().manual_seed(8)) > 0.3
    full = attention_forward(q, k, v, MaskSpec(causal=True, group=group, key_valid=valid, keep_diagonal=True))
    # ring position of each sequence group: the newest at `position`, the others in a scrambled order
    others = [g for g in range(groups) if g != position][::-1]
    ring_of_group = dict(zip(range(groups - 1), others)) | {groups - 1: position}
    slot_order = torch.empty(groups * group, dtype=torch.long)  # ring slot -> sequence token
    for sequence_group, ring_group in ring_of_group.items():
        slot_order[ring_group * group : (ring_group + 1) * group] = torch.arange(sequence_group * group, (sequence_group + 1) * group)
    ring_k, ring_v, ring_valid = k[:, :, slot_order], v[:, :, slot_order], valid[:, slot_order]
    new = q[:, :, -group:]
    for start in (position * group, torch.tensor([position * group], device=device)):
        spec = MaskSpec(key_valid=ring_valid, keep_diagonal=True, ring_start=start)
        decoded = attention_forward(new, ring_k, ring_v, spec)
        assert (decoded - full[:, :, -group:]).abs().max().item() < 1e-6
        assert torch.equal(spec.dense(2, group, groups * group)[..., slot_order.argsort()],
                           MaskSpec(causal=True, group=group, key_valid=valid, keep_diagonal=True).dense(2, groups * group, groups * group)[..., -group:, :])
    single = attention_forward(new[:, :, -1:], ring_k, ring_v, MaskSpec(key_valid=ring_valid, keep_diagonal=True,
                                                                        ring_start=position * group + group - 1))
    assert (single - full[:, :, -1:]).abs().max().item() < 1e-6
    with pytest.raises(ValueError, match="overruns"):
        MaskSpec(ring_start=groups * group - 1).check(1, group, groups * group)
    with pytest.raises(ValueError, match="cannot be combined"):
        MaskSpec(ring_start=0, causal=True)
