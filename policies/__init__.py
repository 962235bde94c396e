"""Policies: one file per family behind one interface (``kinema.policies.base.Policy``)."""

from __future__ import annotations

from typing import Any

from kinema.policies.base import BatchSpec, NormStats, Policy, PolicySpec, config_from_dict

_REGISTRY: dict[str, type[Policy]] = {}
FAMILIES = ("bc", "dt", "at")


def register_policy(cls: type[Policy]) -> type[Policy]:
    """Class decorator: make a policy family available to ``make_policy`` by its ``name``."""
    _REGISTRY[cls.name] = cls
    return cls


def available_policies() -> list[str]:
    _import_families()
    return sorted(_REGISTRY)


def make_policy(config: dict[str, Any], spec: PolicySpec, stats: NormStats) -> Policy:
    """Build a policy from a plain config dict holding ``name`` and the family's fields."""
    _import_families()
    values = dict(config)
    name = values.pop("name", None)
    if name not in _REGISTRY:
        raise ValueError(f"policy.name={name!r} is not a known policy; choose one of {sorted(_REGISTRY)}")
    cls = _REGISTRY[name]
    return cls(config_from_dict(cls.config_class, values, source=f"policy config for {name!r}"), spec, stats)


def _import_families() -> None:
    # Imported lazily so `import kinema.policies` stays cheap; each family registers itself.
    import importlib

    for family in FAMILIES:
        importlib.import_module(f"kinema.policies.{family}")


__all__ = ["BatchSpec", "NormStats", "Policy", "PolicySpec", "available_policies", "make_policy", "register_policy"]
