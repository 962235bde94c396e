"""Domain randomisation and delays for MuJoCo tasks: one wrapper, named profiles, seeded per episode.

A profile says what varies and by how much; the wrapper draws a new variation at every seeded reset
from a generator seeded by the episode's seed, so an episode's dynamics depend on its seed alone (not
on how many environments run at once, or in which order):

- ``mass_scale``, ``friction_scale``, ``damping_scale``, ``actuator_gain_scale``: ``[low, high]``; each
  body's mass and inertia, each geom's sliding friction, each DoF's damping and each actuator's gear is
  multiplied by its own factor drawn uniformly from the range;
- ``observation_noise_std``: Gaussian noise added to every observation the policy sees (rewards and
  terminations still come from the true state);
- ``action_delay_steps``: ``[low, high]``; each episode applies actions that many steps late (zeros first);
- ``push_force``, ``push_probability``, ``push_steps``: at each step, with that probability, a horizontal
  force of ``push_force`` newtons (random sign) pushes the robot's root body for ``push_steps`` steps.

The built-in profiles live in ``randomization_profiles.yaml`` next to this module; ``kinema-eval
randomization=[...]`` and ``kinema-deploy virtual.randomization=<name>`` take their names, and a YAML file
of your own (``randomization_file=<path>``) adds more. ``info["randomization"]`` after a reset holds what
was drawn.
"""

from __future__ import annotations

from collections import deque
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Optional

import gymnasium
import numpy as np

PROFILES_FILE = Path(__file__).with_name("randomization_profiles.yaml")
NOMINAL = "none"
ROOT_BODY = 1  # the first body after the world: the torso of kinema's locomotion tasks
_STREAM = 0x5EED_D0  # keeps the randomisation's generator apart from the environment's own


@dataclass(frozen=True)
class RandomizationProfile:
    name: str = NOMINAL
    mass_scale: Optional[tuple[float, float]] = None
    friction_scale: Optional[tuple[float, float]] = None
    damping_scale: Optional[tuple[float, float]] = None
    actuator_gain_scale: Optional[tuple[float, float]] = None
    observation_noise_std: float = 0.0
    action_delay_steps: Optional[tuple[int, int]] = None
    push_force: float = 0.0
    push_probability: float = 0.0
    push_steps: int = 5

    def __post_init__(self) -> None:
        where = f"randomization profile {self.name!r}"
        for name in ("mass_scale", "friction_scale", "damping_scale", "actuator_gain_scale"):
            value = getattr(self, name)
            if value is None:
                continue
            if len(value) != 2 or not all(np.isfinite(v) and v > 0 for v in value) or value[0] > value[1]:
                raise ValueError(f"{where}: {name} must be [low, high] with 0 < low <= high, got {list(value)}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        delay = self.action_delay_steps
        if delay is not None:
            if len(delay) != 2 or any(int(v) != v or v < 0 for v in delay) or delay[0] > delay[1]:
                raise ValueError(f"{where}: action_delay_steps must be [low, high], whole numbers with 0 <= low <= high, got {list(delay)}")
            object.__setattr__(self, "action_delay_steps", (int(delay[0]), int(delay[1])))
        for name in ("observation_noise_std", "push_force"):
            if not (np.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{where}: {name} must be a number >= 0, got {getattr(self, name)!r}")
        if not 0 <= self.push_probability <= 1:
            raise ValueError(f"{where}: push_probability must be in [0, 1], got {self.push_probability!r}")
        if int(self.push_steps) != self.push_steps or self.push_steps < 1:
            raise ValueError(f"{where}: push_steps must be a whole number >= 1, got {self.push_steps!r}")

    @property
    def is_nominal(self) -> bool:
        return self == RandomizationProfile(name=self.name)

    def to_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


def load_profiles(path: str | Path | None = None) -> dict[str, RandomizationProfile]:
    """The built-in profiles, plus those of ``path`` (a YAML mapping of name -> fields) when given."""
    import yaml

    known = {field.name for field in fields(RandomizationProfile)} - {"name"}
    profiles = {NOMINAL: RandomizationProfile()}
    for source in [PROFILES_FILE] + ([Path(path)] if path else []):
        if not source.is_file():
            raise FileNotFoundError(f"randomization profiles: {source} does not exist")
        entries = yaml.safe_load(source.read_text()) or {}
        if not isinstance(entries, dict):
            raise ValueError(f"{source}: expected a mapping of profile name -> settings, got {type(entries).__name__}")
        for name, settings in entries.items():
            settings = settings or {}
            unknown = sorted(set(settings) - known)
            if unknown:
                raise ValueError(f"{source}: profile {name!r} has unknown keys {unknown}; expected some of {sorted(known)}")
            profiles[str(name)] = RandomizationProfile(name=str(name), **settings)
    return profiles


def get_profile(name: str, path: str | Path | None = None) -> RandomizationProfile:
    profiles = load_profiles(path)
    if name not in profiles:
        raise ValueError(f"randomization profile {name!r} is not defined; known: {sorted(profiles)}"
                         + ("" if path else " (add your own with randomization_file=<profiles.yaml>)"))
    return profiles[name]


class DomainRandomization(gymnasium.Wrapper):
    """A MuJoCo task whose dynamics, sensing and actuation vary per episode as ``profile`` says."""

    def __init__(self, env: gymnasium.Env, profile: RandomizationProfile):
        super().__init__(env)
        import mujoco

        self._mujoco = mujoco
        self.profile = profile
        model = env.unwrapped.model
        self._nominal = {"body_mass": model.body_mass.copy(), "body_inertia": model.body_inertia.copy(),
                         "geom_friction": model.geom_friction.copy(), "dof_damping": model.dof_damping.copy(),
                         "actuator_gear": model.actuator_gear.copy()}
        self._random = np.random.default_rng([_STREAM, 0])
        self._delayed: deque[np.ndarray] = deque()
        self._push_left = 0

    def _factors(self, scale: Optional[tuple[float, float]], count: int) -> np.ndarray:
        return np.ones(count) if scale is None else self._random.uniform(scale[0], scale[1], size=count)

    def _draw(self) -> dict[str, Any]:
        base = self.env.unwrapped
        model, nominal, profile = base.model, self._nominal, self.profile
        mass = self._factors(profile.mass_scale, model.nbody)
        friction = self._factors(profile.friction_scale, model.ngeom)
        damping = self._factors(profile.damping_scale, model.nv)
        gain = self._factors(profile.actuator_gain_scale, model.nu)
        model.body_mass[:] = nominal["body_mass"] * mass
        model.body_inertia[:] = nominal["body_inertia"] * mass[:, None]  # same shape, heavier: inertia scales with mass
        model.geom_friction[:, 0] = nominal["geom_friction"][:, 0] * friction
        model.dof_damping[:] = nominal["dof_damping"] * damping
        model.actuator_gear[:, 0] = nominal["actuator_gear"][:, 0] * gain
        self._mujoco.mj_setConst(model, base.data)  # quantities derived from masses (subtree masses, solver weights)
        delay = 0 if profile.action_delay_steps is None else int(self._random.integers(profile.action_delay_steps[0],
                                                                                          profile.action_delay_steps[1] + 1))
        self._delayed = deque(np.zeros(self.action_space.shape, dtype=self.action_space.dtype) for _ in range(delay))
        self._push_left = 0
        base.data.xfrc_applied[:] = 0.0
        return {"profile": profile.name, "mass_scale_mean": float(mass[1:].mean()), "friction_scale_mean": float(friction.mean()),
                "damping_scale_mean": float(damping.mean()), "actuator_gain_scale_mean": float(gain.mean()), "action_delay_steps": delay}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
        if seed is not None:
            self._random = np.random.default_rng([_STREAM, int(seed)])
        drawn = self._draw()
        observation, info = self.env.reset(seed=seed, options=options)
        info = dict(info, randomization=drawn)
        return self._sensed(observation), info

    def step(self, action: Any) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self._delayed or (self.profile.action_delay_steps and self.profile.action_delay_steps[1] > 0):
            self._delayed.append(np.asarray(action))
            action = self._delayed.popleft()
        self._push()
        observation, reward, terminated, truncated, info = self.env.step(action)
        return self._sensed(observation), reward, terminated, truncated, info

    def _push(self) -> None:
        profile, data = self.profile, self.env.unwrapped.data
        if self._push_left == 0 and profile.push_probability and self._random.random() < profile.push_probability:
            self._push_left = profile.push_steps
            data.xfrc_applied[ROOT_BODY, 0] = profile.push_force * self._random.choice((-1.0, 1.0))
        elif self._push_left > 0:
            self._push_left -= 1
            if self._push_left == 0:
                data.xfrc_applied[ROOT_BODY, :] = 0.0

    def _sensed(self, observation: np.ndarray) -> np.ndarray:
        if not self.profile.observation_noise_std:
            return observation
        noise = self._random.normal(0.0, self.profile.observation_noise_std, size=np.shape(observation))
        return (observation + noise).astype(np.asarray(observation).dtype)
