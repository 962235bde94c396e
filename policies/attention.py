"""The one attention entry point every kinema model calls.

``attention(q, k, v, mask=None, causal=False)`` takes ``(batch, heads, tokens, head_dim)``
tensors and picks an implementation:

- a FlexAttention ``BlockMask`` as ``mask`` goes to ``flex_attention`` (body-graph masks);
- otherwise PyTorch's ``scaled_dot_product_attention`` (SDPA), which already picks the
  best fused CPU/CUDA kernel;
- ``backend="name"`` forces a registered backend. Backends that need optional
  dependencies (Triton kernels under ``kinema.policies.kernels``) register themselves
  with :func:`register_attention_backend` when their module is imported, so nothing here
  imports Triton.

Mask convention: a boolean tensor broadcastable to ``(batch, heads, q_len, k_len)`` where
True means "may attend" (SDPA's convention). A row that may attend to nothing would
make SDPA return NaN; callers keep at least the diagonal open.

``causal=True`` with fewer queries than keys (decoding against a KV cache) is aligned
bottom-right: query ``i`` sits at key position ``k_len - q_len + i``. SDPA's own
``is_causal`` is aligned top-left, so that case builds an explicit mask here.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable

import torch
import torch.nn.functional as F

AttentionBackend = Callable[..., torch.Tensor]

# Modules imported on first request for a backend they provide.
_LAZY_BACKEND_MODULES = {"triton": "kinema.policies.kernels"}


def _sdpa(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None):
    if causal and (mask is not None or q.shape[-2] != k.shape[-2]):
        mask, causal = _with_causal(mask, q.shape[-2], k.shape[-2], q.device), False
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, is_causal=causal, scale=scale)


def _math(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None):
    """Plain softmax(q k^T) v: a readable reference, and the fastest choice for tiny problems."""
    if causal:
        mask = _with_causal(mask, q.shape[-2], k.shape[-2], q.device)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    return torch.matmul(weights, v)


def _flex(q, k, v, mask=None, causal=False, dropout_p=0.0, scale=None):
    from torch.nn.attention.flex_attention import flex_attention  # imported on first use: it is heavy

    if causal or dropout_p > 0.0:
        raise ValueError("the flex backend takes causality from its BlockMask and has no dropout; pass causal=False, dropout_p=0")
    return flex_attention(q, k, v, block_mask=mask, scale=scale)


_BACKENDS: dict[str, AttentionBackend] = {"sdpa": _sdpa, "math": _math, "flex": _flex}


def register_attention_backend(name: str, backend: AttentionBackend) -> None:
    """Make ``attention(..., backend=name)`` call ``backend(q, k, v, mask, causal, dropout_p, scale)``."""
    _BACKENDS[name] = backend


def available_attention_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY_BACKEND_MODULES))


def _backend(name: str) -> AttentionBackend:
    if name not in _BACKENDS and name in _LAZY_BACKEND_MODULES:
        try:
            importlib.import_module(_LAZY_BACKEND_MODULES[name])
        except ImportError as error:
            raise ValueError(f"attention backend {name!r} is unavailable: {error}") from error
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {available_attention_backends()}")
    return _BACKENDS[name]


def _with_causal(mask: torch.Tensor | None, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """``mask`` AND a bottom-right aligned causal mask."""
    causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(diagonal=k_len - q_len)
    return causal if mask is None else mask & causal


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Any = None,
    causal: bool = False,
    dropout_p: float = 0.0,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over ``(batch, heads, tokens, head_dim)`` tensors."""
    if backend is None:
        if mask is not None and not isinstance(mask, torch.Tensor):
            return _flex(q, k, v, mask, causal, dropout_p, scale)  # a FlexAttention BlockMask
        return _sdpa(q, k, v, mask, causal, dropout_p, scale)
    return _backend(backend)(q, k, v, mask, causal, dropout_p, scale)
