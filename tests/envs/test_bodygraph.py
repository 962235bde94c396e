"""Body graphs derived from MuJoCo models: every index placed once, on the right body; explicit layouts checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kinema.envs import TaskSpec, task_spaces
from kinema.envs.bodygraph import BodyGraph, derive_body_graph, format_indices, resolve_body_graph


def nodes_by_name(graph: BodyGraph) -> dict:
    return {node.name: node for node in graph.nodes}


@pytest.mark.parametrize("task", ["hopper", "walker2d", "halfcheetah", "ant", "humanoid", "Swimmer-v5", "InvertedPendulum-v5"])
def test_every_observation_and_action_index_is_placed_exactly_once(task: str) -> None:
    graph = derive_body_graph(task)
    obs_dim, act_dim, _, _ = task_spaces(task)
    assert (graph.obs_dim, graph.act_dim) == (obs_dim, act_dim)
    assert sorted(i for node in graph.nodes for i in node.obs_indices) == list(range(obs_dim))
    assert sorted(i for node in graph.nodes for i in node.act_indices) == list(range(act_dim))
    assert graph.nodes[0].parent is None and graph.names.index(graph.nodes[-1].parent) < len(graph.nodes) - 1


def test_walker2d_legs_hang_off_the_torso() -> None:
    graph = nodes_by_name(derive_body_graph("walker2d"))
    assert graph["thigh"].parent == "torso" and graph["thigh_left"].parent == "torso"
    assert graph["leg"].parent == "thigh" and graph["foot"].parent == "leg"
    assert graph["foot_left"].parent == "leg_left"
    # qpos[1:] then qvel: rootz and rooty (qpos 1, 2 -> obs 0, 1) and the root's three velocities are the torso's.
    assert graph["torso"].obs_indices == (0, 1, 8, 9, 10) and graph["torso"].act_indices == ()
    assert graph["thigh_left"].obs_indices == (5, 14) and graph["thigh_left"].act_indices == (3,)


def test_ant_unnamed_ankles_are_named_after_their_joint_and_actuators_follow_their_joint() -> None:
    graph = nodes_by_name(derive_body_graph("ant"))
    assert set(graph) == {"torso", "aux_1", "ankle_1", "aux_2", "ankle_2", "aux_3", "ankle_3", "aux_4", "ankle_4"}
    assert graph["ankle_1"].parent == "aux_1" and graph["aux_1"].parent == "torso"  # front_left_leg has no joint: welded to the torso
    # Ant-v5's actuators are listed hip_4, ankle_4, hip_1, ...: action 0 drives hip_4 (body aux_4).
    assert graph["aux_4"].act_indices == (0,) and graph["ankle_4"].act_indices == (1,) and graph["aux_1"].act_indices == (2,)
    assert graph["torso"].obs_indices == (0, 1, 2, 3, 4, 13, 14, 15, 16, 17, 18)  # z, quaternion, 6 free-joint velocities


def test_per_body_contact_forces_land_on_their_body_when_observed() -> None:
    ant_with_forces = TaskSpec("ant-cfrc", "Ant-v5", 1000, env_kwargs=(("include_cfrc_ext_in_observation", True),))
    graph = nodes_by_name(derive_body_graph(ant_with_forces))
    assert sum(len(n.obs_indices) for n in graph.values()) == 105
    # cfrc_ext rows of bodies 1..13 (6 values each) start at 27: torso (1) and front_left_leg (2, welded) are the torso's.
    assert set(range(27, 39)) <= set(graph["torso"].obs_indices)
    assert set(range(39, 45)) <= set(graph["aux_1"].obs_indices) and set(range(45, 51)) <= set(graph["ankle_1"].obs_indices)


def test_humanoid_per_dof_and_per_body_rows_land_on_the_right_bodies() -> None:
    graph = nodes_by_name(derive_body_graph("humanoid"))
    # Layout: qpos[2:] 22, qvel 23, cinert 13x10, cvel 13x6, qfrc_actuator 17 (DoFs 6..22), cfrc_ext 13x6.
    cinert, cvel, qfrc, cfrc = 45, 175, 253, 270
    # right_thigh (body 4) carries right_hip_x/z/y: 3 qpos, 3 qvel, its cinert/cvel/cfrc_ext rows and 3 actuator forces.
    thigh = set(graph["right_thigh"].obs_indices)
    assert {8, 9, 10, 31, 32, 33} <= thigh
    assert set(range(cinert + 3 * 10, cinert + 4 * 10)) <= thigh and set(range(cvel + 3 * 6, cvel + 4 * 6)) <= thigh
    assert set(range(qfrc + 3, qfrc + 6)) <= thigh and set(range(cfrc + 3 * 6, cfrc + 4 * 6)) <= thigh
    # right_foot (body 6) has no joint: its rows belong to right_shin.
    assert set(range(cinert + 5 * 10, cinert + 6 * 10)) <= set(graph["right_shin"].obs_indices)
    assert graph["right_thigh"].act_indices == (3, 4, 5) and graph["lwaist"].act_indices == (0, 1)
    assert len(thigh) == 6 + 10 + 6 + 3 + 6


def test_hop_distances_and_masks() -> None:
    graph = derive_body_graph("walker2d")  # torso - thigh - leg - foot, torso - thigh_left - leg_left - foot_left
    names = graph.names
    distances = graph.hop_distances()
    assert distances[names.index("foot"), names.index("foot_left")] == 6
    one, two = graph.attention_mask(1), graph.attention_mask(2)
    torso, thigh, leg, thigh_left = (names.index(n) for n in ("torso", "thigh", "leg", "thigh_left"))
    assert one[torso, torso] and one[torso, thigh] and one[thigh, torso] and not one[torso, leg]
    assert two[torso, leg] and two[thigh, thigh_left] and not two[thigh, names.index("leg_left")]
    assert (one == one.T).all() and one.diagonal().all() and one.sum() == len(names) + 2 * (len(names) - 1)


def test_a_task_without_slices_is_refused_with_how_to_pass_a_layout() -> None:
    with pytest.raises(ValueError, match=r"Reacher-v5.*not made of qpos/qvel.*explicit layout.*body_graph=<file.json>"):
        derive_body_graph("Reacher-v5")


def write_layout(tmp_path: Path, nodes: list, **extra) -> Path:
    path = tmp_path / "layout.json"
    path.write_text(json.dumps({"nodes": nodes, **extra}))
    return path


GOOD = [{"name": "torso", "parent": None, "obs_indices": [0, 1, 2], "act_indices": []},
        {"name": "leg", "parent": "torso", "obs_indices": [3], "act_indices": [0, 1]}]


def test_an_explicit_layout_is_used_as_given(tmp_path: Path) -> None:
    graph = resolve_body_graph("Reacher-v5", 4, 2, explicit=write_layout(tmp_path, GOOD))
    assert graph.names == ["torso", "leg"] and graph.nodes[1].act_indices == (0, 1)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda n: n[1].update(obs_indices=[2, 3]), "obs_indices 2 appears in nodes 'torso' and 'leg'"),
        (lambda n: n[1].update(obs_indices=[3, 4]), "obs_indices has 4, out of range 0..3"),
        (lambda n: n[1].update(obs_indices=[]), "obs_indices 3 belong to no node"),
        (lambda n: n[0].update(act_indices=[-1]), "act_indices has -1, out of range 0..1"),
        (lambda n: n[1].update(parent="hip"), "node 'leg' has parent 'hip', which is no node"),
        (lambda n: n[1].update(name="torso"), "node names must be unique"),
        (lambda n: n[0].update(parent="leg"), "form a cycle"),
        (lambda n: n[1].update(obs_indices=["3"]), "obs_indices must be a list of integers"),
    ],
)
def test_a_malformed_layout_is_refused_naming_the_index(tmp_path: Path, change, message: str) -> None:
    nodes = json.loads(json.dumps(GOOD))
    change(nodes)
    path = write_layout(tmp_path, nodes)
    with pytest.raises(ValueError) as error:
        BodyGraph.load(path, 4, 2)
    assert message in str(error.value) and str(path) in str(error.value)


def test_a_layout_for_another_task_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="obs_dim is 4 but the task has 11"):
        resolve_body_graph("hopper", 11, 3, explicit=write_layout(tmp_path, GOOD, obs_dim=4))


def test_to_dict_round_trips() -> None:
    graph = derive_body_graph("humanoid")
    again = BodyGraph.from_dict(json.loads(json.dumps(graph.to_dict())), graph.obs_dim, graph.act_dim)
    assert again == graph and np.array_equal(again.attention_mask(2), graph.attention_mask(2))


def test_format_indices() -> None:
    assert format_indices([7, 0, 1, 2, 5, 8]) == "0-2, 5, 7-8" and format_indices([]) == "-"


def test_kinema_bodygraph_writes_the_mapping_and_a_drawing(cli, tmp_path: Path) -> None:
    proc = cli.run([cli.script("kinema-bodygraph"), "env=walker2d", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path)
    assert "thigh_left: obs 5, 14; act 3" in proc.stdout
    saved = json.loads((tmp_path / "run" / "bodygraph.json").read_text())
    assert saved["task"] == "walker2d" and [n["name"] for n in saved["nodes"]][:2] == ["torso", "thigh"]
    assert {"name", "parent", "obs_indices", "act_indices"} == set(saved["nodes"][0])
    assert (tmp_path / "run" / "bodygraph.png").read_bytes()[:4] == b"\x89PNG"
    refused = cli.run([cli.script("kinema-bodygraph"), "env=Reacher-v5", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "Reacher-v5" in refused.stderr and "Traceback" not in refused.stderr
