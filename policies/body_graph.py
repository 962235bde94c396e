"""The body graph as data: nodes with their observation and action indices, hop distances, attention masks.

What a body-aware policy consumes (``PolicySpec.structure["body_graph"]`` holds ``BodyGraph.to_dict()``),
with no simulator import, so a checkpoint loads without ``kinema.envs``. Deriving a graph from a
MuJoCo model lives in ``kinema.envs.bodygraph``.
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

BODYGRAPH_FORMAT = "kinema.bodygraph/1"
EXPLICIT_LAYOUT_HINT = (
    "pass an explicit layout file (kinema-train policy.body_graph=<file.json>, kinema-bodygraph body_graph=<file.json>): "
    '{"nodes": [{"name": ..., "parent": <node name or null>, "obs_indices": [...], "act_indices": [...]}, ...]} '
    "(the format kinema-bodygraph writes)"
)


@dataclass(frozen=True)
class BodyNode:
    name: str
    parent: str | None
    obs_indices: tuple[int, ...]
    act_indices: tuple[int, ...]


@dataclass(frozen=True)
class BodyGraph:
    """Nodes in a fixed order (parents before children); every index owned exactly once."""

    nodes: tuple[BodyNode, ...]
    obs_dim: int
    act_dim: int

    def __post_init__(self) -> None:
        _validate(self.nodes, self.obs_dim, self.act_dim, "body graph")

    @property
    def names(self) -> list[str]:
        return [node.name for node in self.nodes]

    def hop_distances(self) -> np.ndarray:
        """(n, n) hops along the tree; -1 between nodes of different trees (several roots)."""
        index = {name: i for i, name in enumerate(self.names)}
        neighbours: list[list[int]] = [[] for _ in self.nodes]
        for i, node in enumerate(self.nodes):
            if node.parent is not None:
                neighbours[i].append(index[node.parent])
                neighbours[index[node.parent]].append(i)
        distances = np.full((len(self.nodes), len(self.nodes)), -1, dtype=np.int64)
        for start in range(len(self.nodes)):
            distances[start, start] = 0
            queue = deque([start])
            while queue:
                current = queue.popleft()
                for other in neighbours[current]:
                    if distances[start, other] < 0:
                        distances[start, other] = distances[start, current] + 1
                        queue.append(other)
        return distances

    def attention_mask(self, hops: int) -> np.ndarray:
        """(n, n) bool, True = node i may attend to node j: j within ``hops`` of i (itself included)."""
        if isinstance(hops, bool) or not isinstance(hops, int) or hops < 0:
            raise ValueError(f"hops must be an integer >= 0, got {hops!r}")
        distances = self.hop_distances()
        return (distances >= 0) & (distances <= hops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": BODYGRAPH_FORMAT,
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "nodes": [
                {"name": n.name, "parent": n.parent, "obs_indices": list(n.obs_indices), "act_indices": list(n.act_indices)}
                for n in self.nodes
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, obs_dim: int, act_dim: int, source: str = "body graph") -> "BodyGraph":
        """A layout given by the user (or a checkpoint), checked against the task's sizes."""
        if not isinstance(data, dict) or not isinstance(data.get("nodes"), list) or not data["nodes"]:
            raise ValueError(f"{source}: expected a JSON object with a non-empty list 'nodes'; {EXPLICIT_LAYOUT_HINT}")
        if data.get("format", BODYGRAPH_FORMAT) != BODYGRAPH_FORMAT:
            raise ValueError(f"{source}: format is {data['format']!r}, expected {BODYGRAPH_FORMAT!r}")
        for key, expected in (("obs_dim", obs_dim), ("act_dim", act_dim)):
            if key in data and data[key] != expected:
                raise ValueError(f"{source}: {key} is {data[key]} but the task has {expected}")
        nodes = []
        for position, entry in enumerate(data["nodes"]):
            where = f"{source}: nodes[{position}]"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} must be an object with name, parent, obs_indices, act_indices")
            unknown = sorted(set(entry) - {"name", "parent", "obs_indices", "act_indices"})
            if unknown or not isinstance(entry.get("name"), str) or not entry["name"]:
                raise ValueError(f"{where} needs a non-empty string 'name' (unknown keys: {unknown})")
            parent = entry.get("parent")
            if parent is not None and not isinstance(parent, str):
                raise ValueError(f"{where} ({entry['name']!r}): parent must be a node name or null, got {parent!r}")
            indices = {}
            for key in ("obs_indices", "act_indices"):
                values = entry.get(key, [])
                if not isinstance(values, list) or any(isinstance(v, bool) or not isinstance(v, int) for v in values):
                    raise ValueError(f"{where} ({entry['name']!r}): {key} must be a list of integers, got {values!r}")
                indices[key] = tuple(values)
            nodes.append(BodyNode(entry["name"], parent, indices["obs_indices"], indices["act_indices"]))
        ordered = tuple(_parents_first(nodes, source))
        _validate(ordered, obs_dim, act_dim, source)  # here, so errors name the file
        return cls(ordered, obs_dim, act_dim)

    @classmethod
    def load(cls, path: str | Path, obs_dim: int, act_dim: int) -> "BodyGraph":
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"body graph {path} not found; {EXPLICIT_LAYOUT_HINT}")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"body graph {path} is not valid JSON: {error}") from None
        return cls.from_dict(data, obs_dim, act_dim, source=str(path))

    def describe(self) -> str:
        """One line per node, indented by depth: name, observation and action indices."""
        depth = {None: -1}
        lines = []
        for node in self.nodes:
            depth[node.name] = depth[node.parent] + 1
            lines.append(f"{'  ' * depth[node.name]}{node.name}: obs {format_indices(node.obs_indices)}; "
                         f"act {format_indices(node.act_indices)}")
        return "\n".join(lines)


def format_indices(indices: tuple[int, ...] | list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2, 5, 7-8'; [] -> '-'."""
    if not indices:
        return "-"
    runs: list[list[int]] = []
    for value in sorted(indices):
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _validate(nodes: tuple[BodyNode, ...], obs_dim: int, act_dim: int, source: str) -> None:
    names = [node.name for node in nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{source}: node names must be unique, {duplicates} appear more than once")
    seen: set[str] = set()
    for node in nodes:
        if node.parent is not None and node.parent not in seen:
            known = "a later node" if node.parent in names else "no node"
            raise ValueError(f"{source}: node {node.name!r} has parent {node.parent!r}, which is {known} "
                             "(parents come before their children; the tree has no cycles)")
        seen.add(node.name)
    for key, size in (("obs_indices", obs_dim), ("act_indices", act_dim)):
        owner: dict[int, str] = {}
        for node in nodes:
            for index in getattr(node, key):
                if not 0 <= index < size:
                    raise ValueError(f"{source}: node {node.name!r}: {key} has {index}, out of range 0..{size - 1}")
                if index in owner:
                    raise ValueError(f"{source}: {key} {index} appears in nodes {owner[index]!r} and {node.name!r}; "
                                     "each index belongs to exactly one node")
                owner[index] = node.name
        missing = sorted(set(range(size)) - set(owner))
        if missing:
            raise ValueError(f"{source}: {key} {format_indices(missing)} belong to no node; every index must be in exactly one")


def _parents_first(nodes: list[BodyNode], source: str) -> list[BodyNode]:
    """The nodes in their given order when parents already come first, else in tree levels; refuse cycles."""
    names = [node.name for node in nodes]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"{source}: node names must be unique, {duplicates} appear more than once")
    known = set(names)
    if all(n.parent is None or n.parent not in known or names.index(n.parent) < i for i, n in enumerate(nodes)):
        return list(nodes)  # already parents first: keep the given order
    ordered: list[BodyNode] = []
    placed: set[str] = set()
    remaining = list(nodes)
    while remaining:
        # An unknown parent counts as placed here; _validate then reports it naming the node.
        ready = [n for n in remaining if n.parent is None or n.parent in placed or n.parent not in known]
        if not ready:
            raise ValueError(f"{source}: the parents of {[n.name for n in remaining]} form a cycle; a body graph is a tree")
        ordered.extend(ready)
        placed.update(n.name for n in ready)
        remaining = [n for n in remaining if n.name not in placed]
    return ordered
