"""Policies: one file per family behind one interface (``kinema.policies.base.Policy``).

A family registers itself with ``@register_policy`` on its class. Families are found
without a list of names: every module of this package is imported on first use, and so is
every module named by an installed package's ``kinema.policies`` entry point, e.g. in its
pyproject.toml::

    [project.entry-points."kinema.policies"]
    my_family = "my_package.my_family"
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib.metadata import entry_points
from typing import Any

from kinema.policies.base import (
    AttentionInference, BatchSpec, InferenceOptions, NormStats, Policy, PolicySpec, Recipe, config_from_dict,
)

ENTRY_POINT_GROUP = "kinema.policies"
_REGISTRY: dict[str, type[Policy]] = {}
_discovered = False


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy family available to ``make_policy`` by its ``name``."""
    if not cls.stateless and cls.end_episode is Policy.end_episode:
        raise TypeError(
            f"{cls.__module__}.{cls.__qualname__} ({cls.name!r}) keeps a context per environment, so it must implement "
            "end_episode(env_indices); a policy whose act() depends on the current observation only declares stateless = True"
        )
    existing = _REGISTRY.get(cls.name)
    if existing is not None and existing.__qualname__ != cls.__qualname__:
        raise ValueError(f"policy name {cls.name!r} is already registered to {existing.__module__}.{existing.__qualname__}")
    _REGISTRY[cls.name] = cls
    return cls


def policy_class(name: str) -> type[Policy]:
    discover_policies()
    if name not in _REGISTRY:
        raise ValueError(f"policy.name={name!r} is not a known policy; choose one of {sorted(_REGISTRY)}")
    return _REGISTRY[name]


def available_policies() -> list[str]:
    discover_policies()
    return sorted(_REGISTRY)


def policy_config(config: dict[str, Any]) -> Any:
    """The family's config dataclass for a plain config dict holding ``name``; bad keys and values are named."""
    values = dict(config)
    cls = policy_class(values.pop("name", None))
    return config_from_dict(cls.config_class, values, source=f"policy config for {cls.name!r}")


def make_policy(config: dict[str, Any], spec: PolicySpec, stats: NormStats) -> Policy:
    """Build a policy from a plain config dict holding ``name`` and the family's fields."""
    return policy_class(config.get("name"))(policy_config(config), spec, stats)


def discover_policies() -> None:
    """Import every family module of this package and of the ``kinema.policies`` entry points (once)."""
    global _discovered
    if _discovered:
        return
    _discovered = True
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg and not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry_point.load()
        except Exception as error:  # a broken plug-in names itself instead of breaking every command
            raise ImportError(f"the {ENTRY_POINT_GROUP} entry point {entry_point.name!r} ({entry_point.value}) failed to load: {error}") from error


__all__ = [
    "AttentionInference", "BatchSpec", "InferenceOptions", "NormStats", "Policy", "PolicySpec", "Recipe", "available_policies",
    "discover_policies", "make_policy", "policy_class", "policy_config", "register_policy",
]
