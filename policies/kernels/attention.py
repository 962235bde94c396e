"""Fused attention forward in Triton for the short sequences of policies, with the mask evaluated in the kernel.

One program computes ``BLOCK_M`` queries of one (batch, head) and walks the keys ``BLOCK_N`` at a
time with the online softmax (running maximum and sum, FlashAttention's recurrence) in fp32.
Which keys a query sees comes from a :class:`~kinema.policies.attention.MaskSpec`, evaluated on
indices inside the kernel: causal and banded masks also skip the key blocks they exclude;
key-padding reads one (B, k_len) validity row and graph masks one (k_len, k_len) adjacency given
once per model. No score or mask matrix is written to memory. Any length works (loads and stores
are bounds-masked), any head dimension up to 128 (padded to a power of two, at least 16, the
smallest ``tl.dot``). A query that may attend to nothing gets zeros (SDPA would return NaN).

Decoding: with ``MaskSpec.ring_start`` the same kernel attends a few new tokens (one, or DT's group
of three) against a ring of cached keys and values, the per-step cost of a cached rollout; the
cache is read in place through its strides.

Inputs fp32, fp16 or bf16; fp32 multiplies in IEEE fp32 (not TF32), so it matches PyTorch's fp32.
Attention dropout (training only) has no kernel: with ``dropout_p`` > 0 the backend computes in
PyTorch from the dense mask. Backward: not a kernel. :class:`TritonAttention` recomputes the attention in PyTorch from the
dense form of the same mask and differentiates that (exact, at the dense path's memory cost).

On a machine without a GPU the kernel runs under Triton's interpreter (``TRITON_INTERPRET=1``, set
before this module is imported): slow, for tests. Nothing here touches the Triton driver at import.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from kinema.policies.attention import MaskSpec

# Triton decides when a kernel is decorated whether it will be interpreted.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _attention_forward_kernel(
    Q, K, V, Out, KeyValid, Adjacency, RingStart,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_valid_b, stride_valid_n, stride_adj_m, stride_adj_n,
    heads, q_len, k_len, head_dim, scale, window, group,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_VALID: tl.constexpr, HAS_ADJACENCY: tl.constexpr,
    KEEP_DIAGONAL: tl.constexpr, RING: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    start_m = tl.program_id(0)
    batch_head = tl.program_id(1)
    b = batch_head // heads
    h = batch_head % heads
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_in = offs_m < q_len
    d_in = offs_d < head_dim
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_in[:, None] & d_in[None, :], other=0.0)
    if RING:  # the new tokens sit at RingStart.. of a ring cache (read from memory: a CUDA graph may advance it)
        ring_start = tl.load(RingStart)
        q_pos = offs_m + ring_start
    else:
        ring_start = 0
        q_pos = offs_m + (k_len - q_len)  # bottom-right alignment
    qk_scale = scale * 1.4426950408889634  # exp2 instead of exp
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Key blocks the causal / banded mask cannot reach are skipped, not just masked.
    first_pos = start_m * BLOCK_M + (k_len - q_len)
    last_pos = tl.minimum(first_pos + BLOCK_M, k_len) - 1
    lo = 0
    hi = k_len
    if CAUSAL:
        hi = last_pos + 1
    if HAS_WINDOW:
        lo = tl.maximum(first_pos // group - window + 1, 0) * group
        lo = (lo // BLOCK_N) * BLOCK_N
        if not CAUSAL:
            hi = tl.minimum((last_pos // group + window) * group, k_len)

    for start_n in range(lo, hi, BLOCK_N):
        k_pos = start_n + offs_n
        key_in = k_pos < k_len
        k = tl.load(K + b * stride_kb + h * stride_kh + k_pos[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                    mask=key_in[None, :] & d_in[:, None], other=0.0)
        if IEEE:
            scores = tl.dot(q, k, input_precision="ieee")
        else:
            scores = tl.dot(q, k)
        allowed = row_in[:, None] & key_in[None, :]
        if CAUSAL:
            allowed = allowed & (k_pos[None, :] <= q_pos[:, None])
        if HAS_WINDOW:
            apart = q_pos[:, None] // group - k_pos[None, :] // group
            allowed = allowed & (apart < window)
            if not CAUSAL:
                allowed = allowed & (-apart < window)
        if RING:
            in_group = (k_pos[None, :] >= ring_start) & (k_pos[None, :] < ring_start + q_len)
            allowed = allowed & (~in_group | (k_pos[None, :] <= q_pos[:, None]))
        if HAS_VALID:
            valid = tl.load(KeyValid + b * stride_valid_b + k_pos * stride_valid_n, mask=key_in, other=0)
            allowed = allowed & (valid[None, :] != 0)
        if HAS_ADJACENCY:
            linked = tl.load(Adjacency + q_pos[:, None] * stride_adj_m + k_pos[None, :] * stride_adj_n,
                             mask=row_in[:, None] & key_in[None, :], other=0)
            allowed = allowed & (linked != 0)
        if KEEP_DIAGONAL:
            allowed = allowed | (row_in[:, None] & (k_pos[None, :] == q_pos[:, None]))
        scores = tl.where(allowed, scores * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing allowed yet stays at zero
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + b * stride_vb + h * stride_vh + k_pos[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=key_in[:, None] & d_in[None, :], other=0.0)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
             out.to(Out.dtype.element_ty), mask=row_in[:, None] & d_in[None, :])


def _block(length: int, largest: int) -> int:
    return min(largest, max(16, triton.next_power_of_2(length)))


def check_supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Refuse inputs the kernel does not handle, naming what is wrong."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"triton attention takes (batch, heads, tokens, head_dim) tensors, got {q.ndim}/{k.ndim}/{v.ndim}-D")
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"triton attention takes fp32, fp16 or bf16 q, k and v of one dtype, got {q.dtype}/{k.dtype}/{v.dtype}")
    if q.shape[-1] > MAX_HEAD_DIM or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
        raise ValueError(f"triton attention takes one head dimension <= {MAX_HEAD_DIM} for q, k and v, "
                         f"got {q.shape[-1]}/{k.shape[-1]}/{v.shape[-1]}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"triton attention: q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} disagree")
    if q.device.type != "cuda" and not INTERPRETED:
        raise ValueError(f"triton attention runs on CUDA tensors (got {q.device.type}); on a CPU only under Triton's "
                         "interpreter, with TRITON_INTERPRET=1 set before kinema.policies.kernels is imported")


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec | None = None,
                      scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale, masked as ``mask`` describes) v, computed by the fused kernel (no autograd)."""
    check_supported(q, k, v)
    mask = mask if mask is not None else MaskSpec()
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[-2]
    mask.check(batch, q_len, k_len)
    out = torch.empty_like(q)
    if q_len == 0 or batch * heads == 0:
        return out
    key_valid = mask.key_valid
    if key_valid is not None:
        key_valid = key_valid.to(device=q.device, dtype=torch.int8).expand(batch, k_len)
    adjacency = mask.adjacency.to(device=q.device, dtype=torch.int8) if mask.adjacency is not None else None
    placeholder = torch.zeros(1, 1, dtype=torch.int8, device=q.device)  # an unused pointer argument
    valid_arg = key_valid if key_valid is not None else placeholder
    adjacency_arg = adjacency if adjacency is not None else placeholder
    ring = mask.ring_start is not None
    ring_start = torch.as_tensor(mask.ring_start if ring else 0, dtype=torch.int32, device=q.device).reshape(1)
    block_m, block_n = _block(q_len, 64), _block(k_len, 64)
    grid = (triton.cdiv(q_len, block_m), batch * heads)
    _attention_forward_kernel[grid](
        q, k, v, out, valid_arg, adjacency_arg, ring_start,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *valid_arg.stride(), *adjacency_arg.stride(),
        heads, q_len, k_len, head_dim, float(scale if scale is not None else 1.0 / math.sqrt(head_dim)),
        mask.window, mask.group,
        CAUSAL=mask.causal, HAS_WINDOW=mask.window > 0, HAS_VALID=key_valid is not None,
        HAS_ADJACENCY=adjacency is not None, KEEP_DIAGONAL=mask.keep_diagonal, RING=ring, IEEE=q.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, triton.next_power_of_2(head_dim)),
    )
    return out


def reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: MaskSpec | None = None,
                        scale: float | None = None, dropout_p: float = 0.0) -> torch.Tensor:
    """The same computation in plain PyTorch from the dense mask (rows with nothing allowed give zeros)."""
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if mask is not None:
        allowed = mask.dense(q.shape[0], q.shape[-2], k.shape[-2], q.device)
        scores = scores.masked_fill(~allowed, float("-inf"))
        weights = torch.softmax(scores, dim=-1)
        weights = torch.where(allowed.any(-1, keepdim=True), weights, torch.zeros((), dtype=weights.dtype, device=weights.device))
    else:
        weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = torch.nn.functional.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


class TritonAttention(torch.autograd.Function):
    """The fused kernel forward; backward through the PyTorch recomputation of the same attention (exact)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):  # type: ignore[override]
        ctx.save_for_backward(q, k, v)
        ctx.mask, ctx.scale = mask, scale
        return attention_forward(q, k, v, mask, scale)

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(needed) for t, needed in zip((q, k, v), ctx.needs_input_grad[:3])]
            out = reference_attention(*inputs, ctx.mask, ctx.scale)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out) if wanted else ())
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)


def triton_attention(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None) -> torch.Tensor:
    """The ``triton`` backend of :func:`kinema.policies.attention.attention`."""
    if isinstance(mask, torch.Tensor):
        raise ValueError("the triton attention backend takes a MaskSpec, not a dense mask tensor")
    if mask is not None and not isinstance(mask, MaskSpec):
        raise ValueError(f"the triton attention backend takes a MaskSpec, got {type(mask).__name__}")
    if causal:
        mask = MaskSpec(causal=True) if mask is None else _with_causal(mask)
    if dropout_p > 0.0:  # the kernel has no dropout: training with attention dropout takes the PyTorch path
        return reference_attention(q, k, v, mask, scale, dropout_p)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return TritonAttention.apply(q, k, v, mask, scale)
    return attention_forward(q, k, v, mask, scale)


def _with_causal(mask: MaskSpec) -> MaskSpec:
    import dataclasses

    return dataclasses.replace(mask, causal=True)
