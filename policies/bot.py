"""Body Transformer (Sferrazza et al., CoRL 2024): one token per body part, attention masked by the body graph.

The task's body graph (``kinema.envs.bodygraph``: which observation and action indices belong
to which body, and the kinematic tree) reaches the policy through ``PolicySpec.structure
["body_graph"]``; the checkpoint stores it, so evaluation rebuilds the same model.

- Tokenizer: per node, a linear map from that node's normalised observation slice to a token;
  a node without observations gets the map's bias alone, i.e. a learned token. A learned
  embedding per node is added (which body a token belongs to).
- Encoder: pre-LayerNorm blocks (``kinema.policies.transformer.Block``) through the shared
  attention entry point. Masks follow its convention, True = may attend (the official code
  passes ``nn.TransformerEncoder``'s opposite convention, ``~adjacency``).

  - ``hard``: every layer attends only to nodes within ``hops`` hops (1, itself included, as in
    the paper's BoT-Hard);
  - ``mix``: masked and unmasked layers alternate starting with layer ``first_masked_layer``
    (0: the first layer is masked, as the paper describes BoT-Mix; the official imitation
    code's default ``first_hard_layer=1`` starts unmasked: set 1 to match it);
  - ``vanilla``: the same tokens, no mask (the ablation: a transformer that ignores the body).
- Detokenizer: per node, a linear map from its token to its action slice; tanh, then the task's
  action box. The loss is BC's: mean squared error in the unit action box.

The encoder with its tokenizer (``BodyTransformerEncoder``) is also the backbone of the
stable-baselines3 actor and critic for online PPO.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn

from kinema.policies import register_policy
from kinema.policies.attention import MaskSpec, takes_mask_spec
from kinema.policies.base import (
    AttentionInference, BatchSpec, NormStats, PolicySpec, Recipe, StatelessPolicy, require_positive_int,
)
from kinema.policies.transformer import Block, init_gpt_weights

VARIANTS = ("hard", "mix", "vanilla")


@dataclass
class BoTNetwork:
    """The Body Transformer's model fields (what kinema-rl and the ``ppo`` family take too)."""

    variant: str = "mix"  # hard | mix | vanilla (see the module docstring)
    embed_dim: int = 64
    n_layers: int = 4
    n_heads: int = 2
    mlp_ratio: int = 2  # feed-forward width = mlp_ratio * embed_dim (as the official code: 256 for 128)
    dropout: float = 0.0
    hops: int = 1  # masked layers attend within this many hops of the body graph
    first_masked_layer: int = 0  # mix: which of layers 0 and 1 is the first masked one
    body_graph: Optional[str] = None  # an explicit layout file (bodygraph.json); null = derived from the task's MuJoCo model

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        for key in ("embed_dim", "n_layers", "n_heads", "mlp_ratio"):
            require_positive_int(getattr(self, key), key)
        if self.embed_dim % self.n_heads:
            raise ValueError(f"embed_dim ({self.embed_dim}) must be divisible by n_heads ({self.n_heads})")
        if isinstance(self.hops, bool) or not isinstance(self.hops, int) or self.hops < 0:
            raise ValueError(f"hops must be an integer >= 0, got {self.hops!r}")
        if self.first_masked_layer not in (0, 1):
            raise ValueError(f"first_masked_layer must be 0 or 1, got {self.first_masked_layer!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


@dataclass
class BoTConfig(BoTNetwork):
    """policy=bot: the network, and how it trains offline."""

    # BC's recipe: Adam 3e-4 (AdamW with no weight decay), batch 256.
    recipe: Recipe = field(default_factory=lambda: Recipe(batch_size=256, lr=3.0e-4))
    inference: AttentionInference = field(default_factory=AttentionInference)


def layer_masks(variant: str, n_layers: int, first_masked_layer: int = 0) -> list[bool]:
    """Which layers are masked by the body graph: hard all, vanilla none, mix every other one."""
    if variant == "hard":
        return [True] * n_layers
    if variant == "vanilla":
        return [False] * n_layers
    return [(layer - first_masked_layer) % 2 == 0 for layer in range(n_layers)]


def _index_matrix(groups: list[tuple[int, ...]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes, widest) indices into a flat vector, padded with 0, and the matching validity mask."""
    width = max(1, max(len(g) for g in groups))
    index = torch.zeros(len(groups), width, dtype=torch.long)
    valid = torch.zeros(len(groups), width, dtype=torch.bool)
    for node, members in enumerate(groups):
        index[node, : len(members)] = torch.tensor(members, dtype=torch.long)
        valid[node, : len(members)] = True
    return index, valid


class BodyTransformerEncoder(nn.Module):
    """Normalised observations (B, obs_dim) -> one token per body node (B, nodes, embed_dim).

    All nodes' tokenizers run as one batched matmul: each node's observation slice is gathered
    into a zero-padded row; each node's weights are initialised at zero where its row is padding
    and never receive a gradient there (``padding_weights`` counts them).
    """

    def __init__(self, graph: Any, config: BoTNetwork):
        super().__init__()
        from kinema.policies.body_graph import BodyGraph

        if not isinstance(graph, BodyGraph):
            raise TypeError(f"expected a BodyGraph, got {type(graph).__name__}")
        nodes, dim = len(graph.nodes), config.embed_dim
        obs_index, obs_valid = _index_matrix([node.obs_indices for node in graph.nodes])
        self.register_buffer("obs_index", obs_index, persistent=False)
        self.register_buffer("obs_valid", obs_valid, persistent=False)
        fan_in = obs_valid.sum(dim=1).clamp(min=1).to(torch.float32)  # each node's own width
        self.token_weight = nn.Parameter(torch.randn(nodes, obs_index.shape[1], dim) * obs_valid[..., None] / fan_in.sqrt()[:, None, None])
        self.token_bias = nn.Parameter(torch.zeros(nodes, dim))
        self.node_embedding = nn.Parameter(torch.zeros(nodes, dim))
        self.blocks = nn.ModuleList(Block(dim, config.n_heads, config.dropout, 0.0, config.mlp_ratio) for _ in range(config.n_layers))
        self.ln_f = nn.LayerNorm(dim)
        for block in self.blocks:
            block.apply(init_gpt_weights)
        nn.init.normal_(self.node_embedding, std=0.02)
        self.layer_is_masked = layer_masks(config.variant, config.n_layers, config.first_masked_layer)
        self.register_buffer("graph_mask", torch.as_tensor(graph.attention_mask(config.hops)), persistent=False)

    @property
    def num_nodes(self) -> int:
        return self.token_bias.shape[0]

    @property
    def padding_weights(self) -> int:
        return int((~self.obs_valid).sum()) * self.token_weight.shape[2]

    def forward(self, normalized_obs: torch.Tensor, backend: str | None = None) -> torch.Tensor:
        # where, not a product: a non-finite value at index 0 must not leak into other nodes' padding.
        gathered = torch.where(self.obs_valid, normalized_obs[:, self.obs_index], 0.0)  # (B, nodes, widest)
        tokens = torch.einsum("bni,nid->bnd", gathered, self.token_weight) + self.token_bias + self.node_embedding
        graph_mask = MaskSpec(adjacency=self.graph_mask) if takes_mask_spec(backend, normalized_obs.device) else self.graph_mask
        for block, masked in zip(self.blocks, self.layer_is_masked):
            tokens = block(tokens, mask=graph_mask if masked else None, backend=backend)
        return self.ln_f(tokens)


class NodeDetokenizer(nn.Module):
    """Tokens (B, nodes, D) -> actions (B, act_dim): each node's linear map to its own action slice."""

    def __init__(self, graph: Any, embed_dim: int):
        super().__init__()
        act_index, act_valid = _index_matrix([node.act_indices for node in graph.nodes])
        width = act_index.shape[1]
        # Position of action a in the flattened (nodes * widest) output.
        source = torch.empty(graph.act_dim, dtype=torch.long)
        for node, members in enumerate(node.act_indices for node in graph.nodes):
            for slot, action in enumerate(members):
                source[action] = node * width + slot
        self.register_buffer("action_source", source, persistent=False)
        self.weight = nn.Parameter(torch.randn(len(graph.nodes), embed_dim, width) * 0.02 * act_valid[:, None, :])
        self.bias = nn.Parameter(torch.zeros(len(graph.nodes), width))
        self.padding_weights = int((~act_valid).sum()) * (embed_dim + 1)  # never read: no gradient

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        per_node = torch.einsum("bnd,ndo->bno", tokens, self.weight) + self.bias
        return per_node.flatten(1)[:, self.action_source]


def body_graph_from_spec(spec: PolicySpec) -> Any:
    from kinema.policies.body_graph import BodyGraph

    data = spec.structure.get("body_graph")
    if data is None:
        raise ValueError("the 'bot' policy needs the task's body graph in its spec (structure['body_graph']); "
                         "kinema-train derives it from the task, or takes policy.body_graph=<bodygraph.json>")
    return BodyGraph.from_dict(data, spec.obs_dim, spec.act_dim, source="policy spec structure['body_graph']")


@register_policy
class BoTPolicy(StatelessPolicy):
    name = "bot"
    label = "BoT"
    config_class = BoTConfig
    required_structure = ("body_graph",)

    def __init__(self, config: BoTConfig, spec: PolicySpec, stats: NormStats):
        super().__init__(config, spec, stats)
        graph = body_graph_from_spec(spec)
        self.encoder = BodyTransformerEncoder(graph, config)
        self.detokenizer = NodeDetokenizer(graph, config.embed_dim)

    @property
    def batch_spec(self) -> BatchSpec:
        return BatchSpec("transitions")

    @property
    def trained_parameter_count(self) -> int:
        """Parameters that take part (the padding of the batched per-node maps left out)."""
        return sum(p.numel() for p in self.parameters()) - self.encoder.padding_weights - self.detokenizer.padding_weights

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        """Unit-box action for raw observations."""
        return torch.tanh(self.detokenizer(self.encoder(self.normalize_obs(observations), self.inference.attention_backend)))

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        predicted = self(batch["observations"])
        target = self.unscale_action(batch["actions"]).clamp(-1.0, 1.0)
        loss = torch.mean((predicted - target) ** 2)
        return loss, {"action_mse": loss.item()}

    def step(self, observations: torch.Tensor) -> torch.Tensor:
        return self.scale_action(self(observations))
