"""Shared GPT layers: pre-LayerNorm blocks with fused q/k/v, and a KV-cache decoding path.

Two ways through the same weights:

- :meth:`GPT.forward` runs a whole sequence (training, or recomputing a rollout window).
  ``query_index`` limits the *last* block to the positions a head reads (a Decision
  Transformer predicts actions from state tokens only), so the other positions' query,
  attention output and MLP of that block are never computed. ``cache`` stores every
  block's keys and values so decoding can continue from there.
- :meth:`GPT.decode` appends a few new tokens per call against a preallocated
  :class:`KVCache`: one call costs a few tokens' worth of work whatever the context
  length. It calls the functional ops on the parameters directly (no per-module
  ``__call__`` overhead), works in eval mode only (no dropout) and returns the hidden
  state of the last new token only, the one a policy head reads.

All attention goes through :func:`kinema.policies.attention.attention`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kinema.policies.attention import MaskSpec, attention


class KVCache:
    """Preallocated keys and values of every block: ``data[layer, batch, slot, 0 = key | 1 = value, head, head_dim]``.

    The per-layer key/value views and the write views are built once, so a decoding step
    spends no Python time slicing.
    """

    def __init__(self, n_layers: int, batch: int, n_heads: int, slots: int, head_dim: int, device, dtype=torch.float32):
        self.rebind(torch.zeros(n_layers, batch, slots, 2, n_heads, head_dim, device=device, dtype=dtype))

    def rebind(self, data: torch.Tensor) -> None:
        """Hold ``data`` (layers, batch, slots, 2, heads, head_dim) and build its views."""
        self.data = data
        # (batch, heads, slots, head_dim) views, as attention takes them
        self.keys = [data[layer, :, :, 0].transpose(1, 2) for layer in range(data.shape[0])]
        self.values = [data[layer, :, :, 1].transpose(1, 2) for layer in range(data.shape[0])]
        self._write_views: dict[tuple[int, int, int], torch.Tensor] = {}

    @property
    def slots(self) -> int:
        return self.data.shape[2]

    def write_view(self, layer: int, start: int, stop: int) -> torch.Tensor:
        """(batch, stop - start, 2 * embed_dim) view of slots start..stop-1: keys then values, as a fused qkv lays them out."""
        key = (layer, start, stop)
        view = self._write_views.get(key)
        if view is None:
            view = self._write_views[key] = self.data[layer, :, start:stop].flatten(2)
        return view


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)); GELU (tanh form, as GPT-2)."""

    def __init__(self, embed_dim: int, n_heads: int, dropout: float, attention_dropout: float, mlp_ratio: int = 4):
        super().__init__()
        if embed_dim % n_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by n_heads ({n_heads})")
        self.n_heads = n_heads
        self.head_dim = embed_dim // n_heads
        self.attention_dropout = attention_dropout
        self.ln1 = nn.LayerNorm(embed_dim)
        self.qkv = nn.Linear(embed_dim, 3 * embed_dim)  # fused: one matmul for q, k and v
        self.proj = nn.Linear(embed_dim, embed_dim)
        self.ln2 = nn.LayerNorm(embed_dim)
        self.fc = nn.Linear(embed_dim, mlp_ratio * embed_dim)
        self.fc_out = nn.Linear(mlp_ratio * embed_dim, embed_dim)
        self.dropout = nn.Dropout(dropout)

    def _split_heads(self, qkv: torch.Tensor) -> torch.Tensor:
        """(B, T, 3D) -> (3, B, H, T, head_dim) as a view."""
        batch, tokens, _ = qkv.shape
        return qkv.view(batch, tokens, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | MaskSpec | None = None,
        causal: bool = False,
        query_index: slice | None = None,
        kv_out: torch.Tensor | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """``x`` (B, T, D) -> (B, Tq, D); ``query_index`` picks the Tq positions to compute.

        ``kv_out`` (B, T, 2D), when given, receives this block's keys and values (a KVCache write view);
        ``backend`` names an attention backend (None: the entry point's choice).
        """
        qkv = self.qkv(self.ln1(x))
        if kv_out is not None:
            kv_out.copy_(qkv[..., x.shape[-1] :])
        q, k, v = self._split_heads(qkv)
        # A MaskSpec has no rows to pick: attend for every query, then keep the picked ones.
        pick_after = query_index is not None and isinstance(mask, MaskSpec)
        if query_index is not None:
            x = x[:, query_index]
            if not pick_after:
                q = q[:, :, query_index]
                if mask is not None:
                    mask = mask[..., query_index, :]
            if causal:  # the explicit mask now carries causality; queries are a subset
                raise ValueError("query_index needs an explicit mask, not causal=True")
        dropout_p = self.attention_dropout if self.training else 0.0
        out = attention(q, k, v, mask=mask, causal=causal, dropout_p=dropout_p, backend=backend)
        if pick_after:
            out = out[:, :, query_index]
        out = out.transpose(1, 2).reshape(x.shape)
        x = x + self.dropout(self.proj(out))
        return x + self.dropout(self.fc_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh")))


class GPT(nn.Module):
    """A stack of pre-LN blocks and a final LayerNorm (positional information comes from the caller)."""

    def __init__(self, embed_dim: int, n_layers: int, n_heads: int, dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.embed_dim, self.n_layers, self.n_heads = embed_dim, n_layers, n_heads
        self.head_dim = embed_dim // n_heads
        self.blocks = nn.ModuleList(Block(embed_dim, n_heads, dropout, attention_dropout) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(embed_dim)
        self.apply(init_gpt_weights)
        # GPT-2: scale the residual projections so the residual stream's variance does not grow with depth.
        for block in self.blocks:
            for layer in (block.proj, block.fc_out):
                nn.init.normal_(layer.weight, std=0.02 / math.sqrt(2 * n_layers))

    def new_cache(self, batch: int, slots: int, device=None, dtype=torch.float32) -> KVCache:
        device = device if device is not None else self.ln_f.weight.device
        return KVCache(self.n_layers, batch, self.n_heads, slots, self.head_dim, device, dtype)

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        query_index: slice | None = None,
        cache: KVCache | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Hidden states (B, Tq, D) after the final LayerNorm.

        ``query_index`` selects the output positions (applied in the last block only);
        ``cache`` receives every block's keys and values for slots ``0 .. T-1``; ``backend``
        names the attention backend (None: the entry point's choice).
        """
        last = self.n_layers - 1
        tokens = x.shape[1]
        for index, block in enumerate(self.blocks):
            kv_out = cache.write_view(index, 0, tokens) if cache is not None else None
            x = block(x, mask, causal, query_index if index == last else None, kv_out, backend)
        return self.ln_f(x)

    def decode_weights(self) -> list[tuple[torch.Tensor, ...]]:
        """The parameters :meth:`decode` reads, bound once per rollout (the same tensors, so updates show)."""
        return [
            (b.ln1.weight, b.ln1.bias, b.qkv.weight, b.qkv.bias, b.proj.weight, b.proj.bias,
             b.ln2.weight, b.ln2.bias, b.fc.weight, b.fc.bias, b.fc_out.weight, b.fc_out.bias)
            for b in self.blocks
        ] + [(self.ln_f.weight, self.ln_f.bias)]

    def decode(
        self,
        x: torch.Tensor,
        cache: KVCache,
        slots: torch.Tensor,
        mask: torch.Tensor | MaskSpec,
        last_mask: torch.Tensor | MaskSpec,
        weights: list[tuple[torch.Tensor, ...]] | None = None,
        backend: str | None = None,
    ) -> torch.Tensor:
        """Append ``x`` (N, G, D) at cache ``slots`` (a (G,) index tensor, so a ring position needs no
        host value); the last token's hidden state (N, D).

        ``mask`` (N, 1, G, slots) bool says which slots each new token may attend to (the new
        tokens included); ``last_mask`` (N, 1, 1, slots) is the last token's row, the only
        query of the last block. ``weights`` is :meth:`decode_weights` (bound by the caller
        to save the module attribute lookups). Eval mode only: no dropout.
        """
        batch, new, dim = x.shape
        heads, head_dim = self.n_heads, self.head_dim
        if weights is None:
            weights = self.decode_weights()
        last = len(weights) - 2
        x = x.reshape(batch * new, dim)
        for index in range(last + 1):
            ln1_w, ln1_b, qkv_w, qkv_b, proj_w, proj_b, ln2_w, ln2_b, fc_w, fc_b, out_w, out_b = weights[index]
            qkv = F.linear(torch.layer_norm(x, (dim,), ln1_w, ln1_b), qkv_w, qkv_b).view(batch, new, 3 * dim)
            q, kv = qkv.split((dim, 2 * dim), dim=2)
            cache.data[index].index_copy_(1, slots, kv.view(batch, new, 2, heads, head_dim))
            if index == last:  # only the last token feeds the head
                q = q[:, -1:].view(batch, 1, heads, head_dim).transpose(1, 2)
                out = attention(q, cache.keys[index], cache.values[index], mask=last_mask, backend=backend)
                x = x.view(batch, new, dim)[:, -1]
            else:
                q = q.view(batch, new, heads, head_dim).transpose(1, 2)
                out = attention(q, cache.keys[index], cache.values[index], mask=mask, backend=backend)
            x = x + F.linear(out.transpose(1, 2).reshape(x.shape), proj_w, proj_b)
            h = F.gelu(F.linear(torch.layer_norm(x, (dim,), ln2_w, ln2_b), fc_w, fc_b), approximate="tanh")
            x = x + F.linear(h, out_w, out_b)
        return torch.layer_norm(x, (dim,), *weights[-1])


def init_gpt_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) weights, zero biases, unit LayerNorms."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
