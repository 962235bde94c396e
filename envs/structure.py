"""Task structure a policy family may need beyond shapes (``Policy.required_structure``).

Each entry derives one kind of structure from a task, or reads it from the file a user gives
(the family's config field of the same name), and returns plain JSON-serialisable values:
they travel in ``PolicySpec.structure`` and are saved with the checkpoint.
"""

from __future__ import annotations

from typing import Any, Callable


def _body_graph(task: Any, obs_dim: int, act_dim: int, explicit: Any) -> dict[str, Any]:
    from .bodygraph import resolve_body_graph

    return resolve_body_graph(task, obs_dim, act_dim, explicit=explicit).to_dict()


STRUCTURES: dict[str, Callable[[Any, int, int, Any], dict[str, Any]]] = {"body_graph": _body_graph}


def task_structure(names: tuple[str, ...], task: Any, obs_dim: int, act_dim: int, explicit: dict[str, Any]) -> dict[str, Any]:
    """``{name: structure}`` for each name; ``explicit[name]`` (a file path or None) overrides the derivation."""
    unknown = sorted(set(names) - set(STRUCTURES))
    if unknown:
        raise ValueError(f"unknown task structure {unknown}; kinema can provide {sorted(STRUCTURES)}")
    return {name: STRUCTURES[name](task, obs_dim, act_dim, explicit.get(name)) for name in names}
