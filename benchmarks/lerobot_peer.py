r"""LeRobot's ``DiffusionPolicy`` built for a state-only task, as a latency peer for kinema's diffusion policy.

Benchmark-only: LeRobot is no kinema dependency and lives in its own environment. Importing this
module imports no LeRobot; ``build_lerobot_diffusion`` and ``lerobot_version`` do. The environment
(CPU torch, LeRobot without its dependency tree, then only what its diffusion modules import)::

    python3 -m venv /work/peer-venv
    /work/peer-venv/bin/pip install torch==2.13.0
    echo torch==2.13.0 > /tmp/c.txt  # never let pip swap the CPU wheel for a CUDA torch
    /work/peer-venv/bin/pip install -c /tmp/c.txt --no-deps lerobot==0.4.4 torchvision==0.28.0
    /work/peer-venv/bin/pip install -c /tmp/c.txt draccus==0.10.0 huggingface-hub==0.35.3 safetensors==0.8.0 \
        datasets==4.8.5 pillow==13.0.0 accelerate==1.16.0 imageio==2.38.2 pyserial==3.5 deepdiff==8.6.2 \
        av==15.1.0 einops==0.8.2 diffusers==0.35.2 packaging==25.0
    cd /tmp && /work/peer-venv/bin/python -c "import sys; sys.path.insert(0, '/work/main/benchmarks'); import lerobot_peer as p; print(p.build_lerobot_diffusion(11, 3).sample_chunk(1).shape)"

The pins sit inside LeRobot 0.4.4's own ranges (draccus ==0.10.0, diffusers <0.36, huggingface-hub
<0.36, datasets <5, ...); their dependencies resolved to numpy 2.4.6, pandas 3.1.1, pyarrow 26.0.1.
pip then warns that lerobot 0.4.4 asks for torch<2.11 and torchvision<0.26 (and wandb, torchcodec,
gymnasium, rerun-sdk, opencv, ...): none of those is imported on the diffusion policy's path, and
the policy runs on torch 2.13.

Caveats:

- Run it with the repository root off ``sys.path`` (``python benchmarks/x.py`` from anywhere, or
  ``python -c``/``-m`` from outside the root): kinema's top-level ``datasets`` package would shadow
  HuggingFace's ``datasets``, which LeRobot imports; ``_import_lerobot`` says so instead of failing deep inside.
- LeRobot's ``lerobot.policies`` package imports every policy's config, the dataset, robot and
  motor modules on the way, hence datasets, av, pyserial and deepdiff for a policy that uses none.
- PyPI's torchvision 0.28.0 wheel is built against CUDA torch, so its compiled ops do not load next
  to the CPU torch wheel, and torchvision's import then fails on its unguarded fake registration of
  ``torchvision::nms``. ``_import_torchvision`` declares the two op schemas it needs so the pure-Python
  parts import; a state-only diffusion policy never calls torchvision (only its ResNet image encoder does).
- State-only: LeRobot's config wants ``observation.state`` plus at least one image or an
  ``observation.environment_state``. The observation vector is split between the two keys; the model
  concatenates them per step before the UNet, so the network equals one with a single state key.
- Normalisation is outside the policy in 0.4.x (processor pipelines); the bare policy takes already
  normalised inputs, so random normal observations stand in for normalised states.
- The network is LeRobot's default, a 1-D convolutional UNet (``DiffusionConditionalUnet1d``,
  FiLM-conditioned on the flattened observation history and the step embedding), down_dims
  (512, 1024, 2048), kernel 5, 8 groups: not kinema's transformer, and far larger (248,361,603
  parameters at hopper's sizes, 11 -> 3). Its default scheduler is DDPM with every one of the 100 training
  steps at inference; here it is DDIM with ``num_inference_steps`` (diffusers' defaults
  ``set_alpha_to_one=True``, ``steps_offset=0``, as kinema's DDIM), squaredcos_cap_v2, epsilon, clip_sample.
- ``generate_actions`` denoises the whole horizon and returns the ``n_action_steps`` actions from
  index ``n_obs_steps - 1`` on: a chunk of shape (batch, n_action_steps, act_dim).
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]

PEER_ENV_HELP = (
    "benchmarks/lerobot_peer.py runs in a separate benchmark-only environment: "
    "python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install torch==2.13.0, then the pip commands "
    "in benchmarks/lerobot_peer.py's docstring (lerobot==0.4.4 with --no-deps plus the few packages its "
    "diffusion policy imports), and run with /work/peer-venv/bin/python"
)

_torchvision_op_schemas: Optional[torch.library.Library] = None  # kept alive: dropping it undefines the ops


def _import_torchvision() -> None:
    """Import torchvision even when its compiled ops cannot load (a CUDA wheel next to CPU torch).

    torchvision tolerates a missing ``_C`` everywhere except its fake (meta) registrations of ``nms``
    and ``qnms``, which need the ops to exist; declaring their schemas lets the Python parts import.
    Calling them would still fail, which the diffusion policy never does without images."""
    global _torchvision_op_schemas
    if "torchvision" in sys.modules:
        return
    try:
        import torchvision  # noqa: F401
        return
    except RuntimeError as error:
        if "torchvision::nms" not in str(error):
            raise
    for name in [name for name in sys.modules if name == "torchvision" or name.startswith("torchvision.")]:
        del sys.modules[name]  # the failed import left half-initialised modules behind
    _torchvision_op_schemas = torch.library.Library("torchvision", "FRAGMENT")
    for op in ("nms", "qnms"):
        _torchvision_op_schemas.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401,F811


def _import_lerobot() -> dict[str, Any]:
    """The LeRobot names used here, or an ImportError that says how to make the peer environment."""
    try:
        import lerobot  # noqa: F401
    except ImportError as error:
        raise ImportError(f"LeRobot is not installed in this interpreter. {PEER_ENV_HELP}") from error
    hf_datasets = importlib.util.find_spec("datasets")
    if hf_datasets is not None and hf_datasets.origin and Path(hf_datasets.origin).is_relative_to(REPO_ROOT):
        raise ImportError(f"'datasets' resolves to kinema's {hf_datasets.origin}, not HuggingFace's, which LeRobot "
                          f"imports: take the repository root ({REPO_ROOT}) off sys.path (run from another directory)")
    try:
        _import_torchvision()
        from lerobot.configs.types import FeatureType, PolicyFeature
        from lerobot.policies.diffusion.configuration_diffusion import DiffusionConfig
        from lerobot.policies.diffusion.modeling_diffusion import DiffusionPolicy
        from lerobot.utils.constants import ACTION, OBS_ENV_STATE, OBS_STATE
    except ImportError as error:  # a dependency of LeRobot's import chain is missing
        raise ImportError(f"{error}: the LeRobot environment is incomplete. {PEER_ENV_HELP}") from error
    return {"FeatureType": FeatureType, "PolicyFeature": PolicyFeature, "DiffusionConfig": DiffusionConfig,
            "DiffusionPolicy": DiffusionPolicy, "ACTION": ACTION, "OBS_ENV_STATE": OBS_ENV_STATE,
            "OBS_STATE": OBS_STATE}


def lerobot_version() -> str:
    """The installed LeRobot's version (raises ImportError with the set-up instructions when absent)."""
    try:
        from importlib.metadata import PackageNotFoundError, version
        return version("lerobot")
    except PackageNotFoundError as error:
        raise ImportError(f"LeRobot is not installed in this interpreter. {PEER_ENV_HELP}") from error


@dataclass
class LeRobotDiffusionPeer:
    """A built LeRobot ``DiffusionPolicy`` (eval mode, CPU) and fixed random normalised observations."""

    policy: Any
    keys: dict[str, Any]  # observation key -> width, in the order the observation vector is split
    n_obs_steps: int
    parameter_count: int
    network: str
    seed: int = 0
    _observations: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    def observations(self, batch_size: int) -> dict[str, torch.Tensor]:
        """(batch, n_obs_steps, width) per key, drawn once per batch size so timing excludes input making."""
        if batch_size not in self._observations:
            generator = torch.Generator().manual_seed(self.seed + batch_size)
            self._observations[batch_size] = {
                key: torch.randn(batch_size, self.n_obs_steps, width, generator=generator)
                for key, width in self.keys.items()}
        return self._observations[batch_size]

    def sample_chunk(self, batch_size: int) -> torch.Tensor:
        """LeRobot's full chunk generation: DDIM over the horizon, then its n_action_steps executed actions.

        ``generate_actions`` rather than ``predict_action_chunk``: the latter reads the policy's rollout
        queues (filled by ``select_action``), the former takes the observation history as given, as
        kinema's ``predict_chunk`` does."""
        with torch.no_grad():  # as LeRobot's own predict_action_chunk
            return self.policy.diffusion.generate_actions(self.observations(batch_size))


def build_lerobot_diffusion(obs_dim: int, act_dim: int, horizon: int = 16, n_obs_steps: int = 2,
                            n_action_steps: int = 8, num_inference_steps: int = 10, seed: int = 0,
                            down_dims: Optional[Sequence[int]] = None) -> LeRobotDiffusionPeer:
    """LeRobot's DiffusionPolicy for a state-only task: DDIM, 100 training steps, squaredcos_cap_v2.

    ``down_dims`` None keeps LeRobot's default UNet widths (512, 1024, 2048); the horizon must be a
    multiple of 2 ** len(down_dims) (LeRobot's config checks it)."""
    if obs_dim < 2:
        raise ValueError(f"obs_dim must be at least 2 (it is split between two LeRobot keys), got {obs_dim}")
    lr = _import_lerobot()
    FeatureType, PolicyFeature = lr["FeatureType"], lr["PolicyFeature"]
    # LeRobot needs an image or an environment state besides the state; the UNet sees their concatenation,
    # so splitting one observation vector between the two keys leaves the network unchanged.
    keys = {lr["OBS_STATE"]: obs_dim - obs_dim // 2, lr["OBS_ENV_STATE"]: obs_dim // 2}
    extra = {} if down_dims is None else {"down_dims": tuple(down_dims)}
    config = lr["DiffusionConfig"](
        input_features={lr["OBS_STATE"]: PolicyFeature(FeatureType.STATE, (keys[lr["OBS_STATE"]],)),
                        lr["OBS_ENV_STATE"]: PolicyFeature(FeatureType.ENV, (keys[lr["OBS_ENV_STATE"]],))},
        output_features={lr["ACTION"]: PolicyFeature(FeatureType.ACTION, (act_dim,))},
        n_obs_steps=n_obs_steps, horizon=horizon, n_action_steps=n_action_steps,
        noise_scheduler_type="DDIM", num_train_timesteps=100, beta_schedule="squaredcos_cap_v2",
        num_inference_steps=num_inference_steps,
        device="cpu",  # explicit: None makes LeRobot probe for an accelerator and log a warning
        push_to_hub=False, **extra)
    torch.manual_seed(seed)  # weight initialisation; the timing does not depend on the weights
    policy = lr["DiffusionPolicy"](config).eval()
    widths = ", ".join(str(width) for width in config.down_dims)
    network = (f"LeRobot DiffusionConditionalUnet1d, down_dims ({widths}), kernel {config.kernel_size}, "
               f"{config.n_groups} groups, FiLM; DDIM {num_inference_steps} of {config.num_train_timesteps} steps")
    return LeRobotDiffusionPeer(policy=policy, keys=keys, n_obs_steps=n_obs_steps,
                                parameter_count=sum(p.numel() for p in policy.parameters()),
                                network=network, seed=seed)
