"""Body graphs: which observation and action indices belong to which part of the robot.

A body graph is what the Body Transformer tokenises: one node per body part, each owning a
slice of the observation (what is sensed there) and of the action (what is actuated there),
nodes linked by the kinematic tree. kinema derives it from the compiled MuJoCo model, so it
is right by construction and works on a robot the user brings:

- nodes: the bodies that carry joints, plus every root (a body hanging from the world); a
  body without joints belongs to its nearest ancestor node (it is welded to it). A node is
  named after its body, or after its first joint when the body has no name;
- edges: each node's parent is its nearest ancestor node (``body_parentid``); hop distances
  by breadth-first search over the undirected tree;
- observations: Gymnasium v5 describes its layout in ``env.unwrapped.observation_structure``
  (``skipped_qpos``, then ``qpos``, ``qvel``, ``cinert``, ``cvel``, ``qfrc_actuator``,
  ``cfrc_ext``, ``ten_length``, ``ten_velocity`` counts, in observation order). qpos and
  qvel entries map through their joint (``jnt_qposadr``, ``dof_jntid``, ``jnt_bodyid``);
  per-DoF rows (``qfrc_actuator``) through the DoF's joint; per-body rows (``cinert``,
  ``cvel``, ``cfrc_ext``: 10, 6, 6 values per body, the last bodies of the model) through
  their body; tendon rows through the tendon's first wrapped object. Without a structure,
  ``qpos[k:]`` + ``qvel`` is tried for the ``k`` that fits the observation size;
- actions: each actuator through its transmission (``actuator_trntype``/``actuator_trnid``):
  joint -> the joint's body; site and slider-crank -> the site's body; body -> that body;
  tendon -> the body of the tendon's first wrapped joint or site.

Every derived layout is then *verified* on the environment itself: distinct marker values
are written into the model's data arrays and the environment's own ``_get_obs()`` must put
each marker exactly where the layout says. A task whose observation is not made of such
slices (Reacher-v5: cosines, sines and a fingertip-to-target vector) is refused naming it;
pass an explicit layout instead (``policy.body_graph=<bodygraph.json>``, the format
``kinema-bodygraph`` writes). Explicit layouts are validated index by index.
"""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Callable

import numpy as np

from kinema.policies.body_graph import (  # noqa: F401  (the data structure, re-exported here)
    BODYGRAPH_FORMAT, EXPLICIT_LAYOUT_HINT, BodyGraph, BodyNode, format_indices,
)


# -- derivation from a MuJoCo model ----------------------------------------------------------------

# Values per row of the per-body quantities Gymnasium observes.
BODY_ROW_SIZES = {"cinert": 10, "cvel": 6, "cfrc_ext": 6}
TENDON_KEYS = ("ten_length", "ten_velocity")


class _ModelTree:
    """The kinematic tree of an ``mjModel``, reduced to nodes."""

    def __init__(self, model: Any):
        import mujoco

        self.model = model
        self.mujoco = mujoco
        parents = [int(p) for p in model.body_parentid]
        has_joints = [int(n) > 0 for n in model.body_jntnum]
        is_node = [b > 0 and (has_joints[b] or parents[b] == 0) for b in range(model.nbody)]
        # Each body belongs to itself when it is a node, else to its parent's node (welded to it).
        self.node_of_body = [-1] * model.nbody
        for body in range(1, model.nbody):  # parents have lower ids than children in MuJoCo
            self.node_of_body[body] = body if is_node[body] else self.node_of_body[parents[body]]
        self.node_bodies = [b for b in range(model.nbody) if is_node[b]]
        self.parent_node = {b: (self.node_of_body[parents[b]] if parents[b] > 0 else None) for b in self.node_bodies}
        self.names = {b: self._node_name(b) for b in self.node_bodies}

    def _node_name(self, body: int) -> str:
        name = self.mujoco.mj_id2name(self.model, self.mujoco.mjtObj.mjOBJ_BODY, body)
        if not name and self.model.body_jntnum[body] > 0:
            name = self.mujoco.mj_id2name(self.model, self.mujoco.mjtObj.mjOBJ_JOINT, int(self.model.body_jntadr[body]))
        return name or f"body{body}"

    def joint_node(self, joint: int) -> int:
        return self.node_of_body[int(self.model.jnt_bodyid[joint])]

    def qpos_node(self, address: int) -> int:
        joint = int(np.searchsorted(self.model.jnt_qposadr, address, side="right") - 1)
        return self.joint_node(joint)

    def dof_node(self, dof: int) -> int:
        return self.joint_node(int(self.model.dof_jntid[dof]))

    def tendon_node(self, tendon: int) -> int:
        model, obj = self.model, self.mujoco.mjtWrap
        first = int(model.tendon_adr[tendon])
        for wrap in range(first, first + int(model.tendon_num[tendon])):
            kind, target = int(model.wrap_type[wrap]), int(model.wrap_objid[wrap])
            if kind == obj.mjWRAP_JOINT:
                return self.joint_node(target)
            if kind == obj.mjWRAP_SITE:
                return self.node_of_body[int(model.site_bodyid[target])]
        raise ValueError(f"tendon {tendon} wraps no joint or site; its actuator or observation cannot be placed on a body")

    def actuator_node(self, actuator: int) -> int:
        model, trn = self.model, self.mujoco.mjtTrn
        kind, target = int(model.actuator_trntype[actuator]), int(model.actuator_trnid[actuator][0])
        if kind in (trn.mjTRN_JOINT, trn.mjTRN_JOINTINPARENT):
            return self.joint_node(target)
        if kind in (trn.mjTRN_SITE, trn.mjTRN_SLIDERCRANK):
            return self.node_of_body[int(model.site_bodyid[target])]
        if kind == trn.mjTRN_BODY:
            return self.node_of_body[target]
        if kind == trn.mjTRN_TENDON:
            return self.tendon_node(target)
        raise ValueError(f"actuator {actuator} has transmission type {kind}, which kinema cannot place on a body")


# One observation segment: (data field, first element, count, element -> node).
Segment = tuple[str, int, int, Callable[[int], int]]


def _segments_from_structure(tree: _ModelTree, structure: dict[str, int], source: str) -> list[Segment]:
    model = tree.model
    segments: list[Segment] = []
    for key, count in structure.items():
        count = int(count)
        if key == "skipped_qpos" or count == 0:
            continue
        if key == "qpos":
            segments.append(("qpos", int(structure.get("skipped_qpos", 0)), count, tree.qpos_node))
        elif key == "qvel":
            segments.append(("qvel", 0, count, tree.dof_node))
        elif key == "qfrc_actuator":
            segments.append(("qfrc_actuator", model.nv - count, count, tree.dof_node))  # the last DoFs (v5 skips the root's)
        elif key in BODY_ROW_SIZES:
            width = BODY_ROW_SIZES[key]
            if count % width:
                raise ValueError(f"{source}: observation_structure[{key!r}] = {count} is not a whole number of {width}-value body rows")
            first_body = model.nbody - count // width
            segments.append((key, first_body * width, count, lambda e, w=width: tree.node_of_body[e // w]))
        elif key in TENDON_KEYS:
            segments.append((key, model.ntendon - count, count, tree.tendon_node))
        else:
            raise ValueError(f"{source}: observation_structure has {key!r} ({count} values), which kinema cannot place "
                             f"on a body; {EXPLICIT_LAYOUT_HINT}")
    return segments


def _candidate_layouts(env: Any, tree: _ModelTree, obs_dim: int, source: str) -> list[list[Segment]]:
    structure = getattr(env.unwrapped, "observation_structure", None)
    if isinstance(structure, dict):
        return [_segments_from_structure(tree, structure, source)]
    model = tree.model
    skipped = model.nq + model.nv - obs_dim
    if 0 <= skipped <= model.nq:
        return [[("qpos", skipped, model.nq - skipped, tree.qpos_node), ("qvel", 0, model.nv, tree.dof_node)]]
    return []


def _data_array(data: Any, field_name: str) -> np.ndarray:
    return getattr(data, field_name).reshape(-1)


def _layout_is_observed(env: Any, segments: list[Segment], obs_dim: int) -> bool:
    """Write a distinct marker into every element a segment names and check ``_get_obs`` puts it there."""
    unwrapped = env.unwrapped
    data = unwrapped.data
    fields = sorted({segment[0] for segment in segments} | {"qpos", "qvel"})
    saved = {name: _data_array(data, name).copy() for name in fields}
    try:
        # Small distinct values: inside every clipping range Gymnasium applies (qvel ±10, contact forces ±1).
        counter = 0
        for name in fields:
            array = getattr(data, name)
            markers = 1e-3 + 1e-6 * np.arange(counter, counter + array.size)
            array[...] = markers.reshape(array.shape)
            counter += array.size
        observation = np.asarray(unwrapped._get_obs(), dtype=np.float64).reshape(-1)
        if observation.size != obs_dim or sum(s[2] for s in segments) != obs_dim:
            return False
        expected = np.concatenate([_data_array(data, name)[first:first + count] for name, first, count, _ in segments])
        return bool(np.allclose(observation, expected, rtol=0, atol=1e-9))
    except (AttributeError, TypeError, ValueError, IndexError):
        return False
    finally:
        for name, values in saved.items():
            getattr(data, name)[...] = values.reshape(getattr(data, name).shape)


def derive_body_graph(task: Any) -> BodyGraph:
    """The body graph of a kinema task or Gymnasium MuJoCo id, verified on the environment."""
    from kinema.envs.registry import get_task, make_env

    spec = get_task(task)
    source = f"task {spec.name!r} ({spec.gym_id})"
    env = make_env(spec)
    try:
        model = getattr(env.unwrapped, "model", None)
        if model is None or not hasattr(model, "body_parentid"):
            raise ValueError(f"{source} is not a MuJoCo environment: no model to derive a body graph from; {EXPLICIT_LAYOUT_HINT}")
        obs_dim, act_dim = int(env.observation_space.shape[0]), int(env.action_space.shape[0])
        if act_dim != model.nu:
            raise ValueError(f"{source}: the action has {act_dim} values but the model {model.nu} actuators; {EXPLICIT_LAYOUT_HINT}")
        env.reset(seed=0)
        tree = _ModelTree(model)
        segments = next((c for c in _candidate_layouts(env, tree, obs_dim, source) if _layout_is_observed(env, c, obs_dim)), None)
        if segments is None:
            raise ValueError(f"{source}: its observation ({obs_dim} values) is not made of qpos/qvel/per-body slices "
                             f"kinema can place on bodies; {EXPLICIT_LAYOUT_HINT}")
        obs_owner: list[int] = []
        for _, first, count, node_of in segments:
            obs_owner.extend(node_of(element) for element in range(first, first + count))
        act_owner = [tree.actuator_node(a) for a in range(model.nu)]
    finally:
        env.close()
    nodes = []
    for body in tree.node_bodies:
        parent = tree.parent_node[body]
        nodes.append(BodyNode(
            tree.names[body], None if parent is None else tree.names[parent],
            tuple(i for i, owner in enumerate(obs_owner) if owner == body),
            tuple(i for i, owner in enumerate(act_owner) if owner == body),
        ))
    return BodyGraph(tuple(nodes), obs_dim, act_dim)


def resolve_body_graph(task: Any, obs_dim: int, act_dim: int, explicit: str | Path | None = None) -> BodyGraph:
    """An explicit layout file when given (checked against the sizes), else the derived graph."""
    if explicit:
        return BodyGraph.load(explicit, obs_dim, act_dim)
    graph = derive_body_graph(task)
    if (graph.obs_dim, graph.act_dim) != (obs_dim, act_dim):
        raise ValueError(f"the body graph of {task!r} has {graph.obs_dim} observations and {graph.act_dim} actions, "
                         f"the data {obs_dim} and {act_dim}; {EXPLICIT_LAYOUT_HINT}")
    return graph


def draw_body_graph(graph: BodyGraph, path: str | Path, title: str = "") -> Path:
    """A PNG of the tree, root at the top, each node boxed with its observation and action indices."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    children: dict[str | None, list[str]] = {}
    for node in graph.nodes:
        children.setdefault(node.parent, []).append(node.name)
    position: dict[str, tuple[float, int]] = {}
    next_leaf = [0.0]

    def place(name: str, depth: int) -> float:
        kids = children.get(name, [])
        x = float(np.mean([place(kid, depth + 1) for kid in kids])) if kids else next_leaf[0]
        if not kids:
            next_leaf[0] += 1.0
        position[name] = (x, depth)
        return x

    for root in children.get(None, []):
        place(root, 0)
    width = max(next_leaf[0], 1.0)
    depth = max(d for _, d in position.values()) + 1
    figure, axes = plt.subplots(figsize=(max(6.0, 2.4 * width), max(3.0, 2.0 * depth)), dpi=110)
    by_name = {node.name: node for node in graph.nodes}
    for node in graph.nodes:
        if node.parent is not None:
            (x0, y0), (x1, y1) = position[node.parent], position[node.name]
            axes.plot([x0, x1], [-y0, -y1], color="0.55", linewidth=1.2, zorder=1)
    for name, (x, y) in position.items():
        node = by_name[name]
        # Long index lists wrap so neighbouring boxes never overlap.
        lines = [name, *textwrap.wrap(f"obs {format_indices(node.obs_indices)}", 24), f"act {format_indices(node.act_indices)}"]
        axes.text(x, -y, "\n".join(lines), ha="center", va="center", fontsize=8, zorder=2,
                  bbox={"boxstyle": "round,pad=0.4", "facecolor": "#e8f0fb" if node.act_indices else "#f4f4f4",
                        "edgecolor": "#3b6db3" if node.act_indices else "0.5"})
    axes.set_xlim(-0.7, width - 0.3)
    axes.set_ylim(-depth + 0.4, 0.6)
    axes.axis("off")
    axes.set_title(title or f"body graph: {len(graph.nodes)} nodes, {graph.obs_dim} observations, {graph.act_dim} actions",
                   fontsize=10)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path)
    plt.close(figure)
    return path
