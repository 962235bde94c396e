"""The one attention entry point every kinema model calls.

``attention(q, k, v, mask=None, causal=False)`` takes ``(batch, heads, tokens, head_dim)``
tensors and picks an implementation:

- a FlexAttention ``BlockMask`` as ``mask`` goes to ``flex_attention`` (body-graph masks);
- otherwise PyTorch's ``scaled_dot_product_attention`` (SDPA), which already picks the
  best fused CPU/CUDA kernel;
- ``backend="auto"`` picks ``triton`` for CUDA tensors when Triton is installed and the shapes are
  ones its kernel takes, and SDPA otherwise; each choice is logged once;
- ``backend="name"`` forces a registered backend. Backends that need optional
  dependencies (Triton kernels under ``kinema.policies.kernels``) register themselves
  with :func:`register_attention_backend` when their module is imported, so nothing here
  imports Triton.

Mask convention: a boolean tensor broadcastable to ``(batch, heads, q_len, k_len)`` where
True means "may attend" (SDPA's convention). A row that may attend to nothing would
make SDPA return NaN; callers keep at least the diagonal open.

A :class:`MaskSpec` describes a mask instead of materialising it: causal, a band of ``window``
groups of ``group`` tokens (DT: 3 tokens per step), which keys exist (padding), a graph
adjacency given once per model (BoT), and whether the diagonal stays open. SDPA, math and flex
turn it into a dense mask (:meth:`MaskSpec.dense`); the Triton kernels evaluate it inside the
kernel, never writing a score or mask matrix to memory.

``causal=True`` with fewer queries than keys (decoding against a KV cache) is aligned
bottom-right: query ``i`` sits at key position ``k_len - q_len + i``. SDPA's own
``is_causal`` is aligned top-left, so that case builds an explicit mask here.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import logging
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

AttentionBackend = Callable[..., torch.Tensor]
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaskSpec:
    """Which keys each query may attend to, as a description (positions aligned bottom-right: query
    ``i`` of ``q_len`` sits at key position ``k_len - q_len + i``).

    A key is allowed when every given condition holds: ``causal`` (key position <= query
    position); ``window`` > 0 (query and key groups, position // ``group``, fewer than ``window``
    apart, looking back only when causal, both ways otherwise); ``key_valid`` (B, k_len) bool is
    True at the key; ``adjacency`` (k_len, k_len) bool is True at (query position, key position).
    ``keep_diagonal`` then reopens each query's own position, so no row is empty.

    ``ring_start`` describes decoding into a ring cache instead (DT's cached step groups): the
    queries are the newest tokens, written at slots ``ring_start .. ring_start + q_len - 1``; slot
    order means nothing else, so each query sees every other slot (where ``key_valid``) and its
    own group's slots up to its own. An int, or a one-element integer tensor so that a captured
    CUDA graph can advance it without re-capture. It excludes ``causal``, ``window`` and
    ``adjacency``.
    """

    causal: bool = False
    window: int = 0
    group: int = 1
    key_valid: Optional[torch.Tensor] = None
    adjacency: Optional[torch.Tensor] = None
    keep_diagonal: bool = False
    ring_start: Any = None

    def __post_init__(self) -> None:
        if self.ring_start is not None:
            if self.causal or self.window or self.adjacency is not None:
                raise ValueError("MaskSpec.ring_start (ring-cache decoding) cannot be combined with causal, window or adjacency")
            start = self.ring_start
            if isinstance(start, torch.Tensor):
                if start.numel() != 1 or start.dtype.is_floating_point or start.dtype == torch.bool:
                    raise ValueError(f"MaskSpec.ring_start must be an int or a one-element integer tensor, got {start.dtype} "
                                     f"of shape {tuple(start.shape)}")
            elif isinstance(start, bool) or not isinstance(start, int) or start < 0:
                raise ValueError(f"MaskSpec.ring_start must be an integer >= 0, got {start!r}")
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 0:
            raise ValueError(f"MaskSpec.window must be an integer >= 0 (0: no band), got {self.window!r}")
        if isinstance(self.group, bool) or not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"MaskSpec.group must be an integer >= 1, got {self.group!r}")
        for name in ("key_valid", "adjacency"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, torch.Tensor) or value.dtype != torch.bool or value.ndim != 2):
                raise ValueError(f"MaskSpec.{name} must be a 2-D bool tensor, got {getattr(value, 'dtype', type(value).__name__)} "
                                 f"of shape {tuple(getattr(value, 'shape', ()))}")
        if self.adjacency is not None and self.adjacency.shape[0] != self.adjacency.shape[1]:
            raise ValueError(f"MaskSpec.adjacency must be square (k_len, k_len), got {tuple(self.adjacency.shape)}")

    def check(self, batch: int, q_len: int, k_len: int) -> None:
        """Refuse shapes this description cannot apply to, naming the field."""
        if q_len > k_len:
            raise ValueError(f"MaskSpec: {q_len} queries against {k_len} keys; queries are the last k_len positions at most")
        if isinstance(self.ring_start, int) and self.ring_start + q_len > k_len:
            raise ValueError(f"MaskSpec.ring_start {self.ring_start} + {q_len} new tokens overruns the {k_len} cache slots")
        if self.key_valid is not None and (self.key_valid.shape[1] != k_len or self.key_valid.shape[0] not in (1, batch)):
            raise ValueError(f"MaskSpec.key_valid must have shape ({batch} or 1, {k_len}), got {tuple(self.key_valid.shape)}")
        if self.adjacency is not None and self.adjacency.shape[0] != k_len:
            raise ValueError(f"MaskSpec.adjacency must have shape ({k_len}, {k_len}), got {tuple(self.adjacency.shape)}")

    def dense(self, batch: int, q_len: int, k_len: int, device: torch.device | None = None) -> torch.Tensor:
        """The described mask as a bool tensor (batch or 1, 1, q_len, k_len)."""
        self.check(batch, q_len, k_len)
        key = torch.arange(k_len, device=device)[None, :]
        allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device)
        if self.ring_start is not None:
            start = torch.as_tensor(self.ring_start, device=device).reshape(())
            query = start + torch.arange(q_len, device=device)[:, None]
            allowed &= (key < start) | (key >= start + q_len) | (key <= query)
        else:
            query = torch.arange(k_len - q_len, k_len, device=device)[:, None]
        if self.causal:
            allowed &= key <= query
        if self.window > 0:
            apart = query // self.group - key // self.group
            allowed &= apart < self.window
            if not self.causal:
                allowed &= -apart < self.window
        if self.adjacency is not None:
            allowed &= self.adjacency.to(device)[k_len - q_len :]
        allowed = allowed[None, None]
        if self.key_valid is not None:
            allowed = allowed & self.key_valid.to(device)[:, None, None, :]
        if self.keep_diagonal:
            allowed = allowed | (key == query)
        return allowed

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
# Backends that evaluate a MaskSpec themselves (they say so when they register); every other
# backend gets MaskSpec.dense(). A lazily imported backend counts once its module has registered it.
_DESCRIBED_MASK_BACKENDS: set[str] = set()


def register_attention_backend(name: str, backend: AttentionBackend, takes_mask_spec: bool = False) -> None:
    """Make ``attention(..., backend=name)`` call ``backend(q, k, v, mask, causal, dropout_p, scale)``.

    ``takes_mask_spec``: the backend evaluates a :class:`MaskSpec` itself (otherwise it gets the dense mask)."""
    _BACKENDS[name] = backend
    if takes_mask_spec:
        _DESCRIBED_MASK_BACKENDS.add(name)
    else:
        _DESCRIBED_MASK_BACKENDS.discard(name)


AUTO = "auto"
_logged_choices: set[tuple[str, str]] = set()


@functools.lru_cache(maxsize=None)
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str | None, device: torch.device) -> str | None:
    """``auto`` -> ``triton`` on CUDA where Triton is installed, else ``sdpa`` (logged once per choice and device type)."""
    if backend != AUTO:
        return backend
    choice = "triton" if device.type == "cuda" and _triton_installed() else "sdpa"
    if (choice, device.type) not in _logged_choices:
        _logged_choices.add((choice, device.type))
        logger.info("attention_backend=auto: %s on %s", choice, device.type)
    return choice


def _kernel_takes(q: torch.Tensor, k: torch.Tensor, dropout_p: float) -> bool:
    """Shapes and dtypes the Triton kernel handles (auto falls back to SDPA for others)."""
    return (q.dtype in (torch.float32, torch.float16, torch.bfloat16) and q.shape[-1] <= 128 and k.dtype == q.dtype
            and dropout_p == 0.0)


def takes_mask_spec(backend: str | None, device: torch.device | None = None) -> bool:
    """Whether ``backend`` evaluates a :class:`MaskSpec` itself (models then describe their masks instead of building them)."""
    if backend == AUTO:
        backend = resolve_backend(backend, device if device is not None else torch.device("cpu"))
    if backend is None:
        return False
    _backend(backend)  # a lazily registered backend registers on first request
    return backend in _DESCRIBED_MASK_BACKENDS


def available_attention_backends() -> list[str]:
    return sorted(set(_BACKENDS) | set(_LAZY_BACKEND_MODULES) | {AUTO})


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
    if backend == AUTO:
        backend = resolve_backend(backend, q.device)
        if backend == "triton" and not _kernel_takes(q, k, dropout_p):
            backend = "sdpa"
    if backend is not None:
        implementation = _backend(backend)  # imports a lazily registered backend first
    if isinstance(mask, MaskSpec) and backend not in _DESCRIBED_MASK_BACKENDS:
        mask = mask.dense(q.shape[0], q.shape[-2], k.shape[-2], q.device)  # backends that take dense masks
    if backend is None:
        if mask is not None and not isinstance(mask, torch.Tensor):
            return _flex(q, k, v, mask, causal, dropout_p, scale)  # a FlexAttention BlockMask
        return _sdpa(q, k, v, mask, causal, dropout_p, scale)
    return implementation(q, k, v, mask, causal, dropout_p, scale)
