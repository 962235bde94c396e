"""kinema-train's run config as typed dataclasses: the one source of its defaults and checks.

Hydra uses ``TrainConfig`` as the schema of ``train.yaml`` (types are checked when the
config is composed, naming the key), and ``check_run_config`` runs the range checks on the
resolved config before any work starts, every message naming the full key. The policy and
dataset groups bring their own dataclasses (``kinema.policies``) and are checked when the
policy is built, also before any work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Optional

TARGET_RETURN_MODES = ("dataset_max", "task")


def _require_int(value: Any, key: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {value!r}")


@dataclass
class TrainLoop:
    steps: int = 1000  # the quick start's budget (a few minutes on a 2-core CPU); the quality grid trains 5000
    log_every: int = 100
    checkpoint_every: int = 1000  # periodic checkpoints (with optimiser and sampler state) to resume from
    keep_checkpoints: int = 2  # periodic checkpoints kept; at least 1, or an interrupted run could not resume

    def check(self) -> None:
        _require_int(self.steps, "train.steps", 0)
        for key in ("log_every", "checkpoint_every", "keep_checkpoints"):
            _require_int(getattr(self, key), f"train.{key}", 1)


@dataclass
class EvalSettings:
    episodes: int = 10
    num_envs: int = 10
    seed: int = 1000  # episode i is seeded with seed + i
    trials: Optional[int] = None  # episodes per context (AT protocol); null = the policy's default (at: 4)
    every: Optional[int] = None  # evaluate every N training steps as well; 0 = only at the end; null = 4 times over the run
    episodes_during_training: Optional[int] = 5  # null = eval.episodes
    # Target return of return-conditioned policies: dataset_max (best episode return in the training
    # data) | task (the task's target_return, the DT paper's values for D4RL's own files) | a number.
    # Policies that take no target return ignore dataset_max and refuse anything else.
    target_return: Any = "dataset_max"

    def check(self) -> None:
        _require_int(self.episodes, "eval.episodes", 1)
        _require_int(self.num_envs, "eval.num_envs", 1)
        _require_int(self.seed, "eval.seed", 0)
        for key, minimum in (("trials", 1), ("every", 0), ("episodes_during_training", 1)):
            if getattr(self, key) is not None:
                _require_int(getattr(self, key), f"eval.{key}", minimum)
        target = self.target_return
        if target is not None and target not in TARGET_RETURN_MODES:
            if isinstance(target, bool) or not isinstance(target, (int, float)) or not math.isfinite(target):
                raise ValueError(f"eval.target_return must be a finite number or one of {TARGET_RETURN_MODES}, got {target!r}")


@dataclass
class TrainConfig:
    env: Optional[str] = None  # task name (hopper, walker2d, ...) or Gymnasium id; null = read from the dataset
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: Optional[int] = None  # torch intra-op threads; null = torch's default
    train: TrainLoop = field(default_factory=TrainLoop)
    eval: EvalSettings = field(default_factory=EvalSettings)
    policy: Any = None  # a policy group: the family's config dataclass
    dataset: Any = None  # a dataset group: {name, path}


def check_eval_settings(eval_cfg: dict[str, Any]) -> None:
    """Range checks of an ``eval`` block (keys it does not know, e.g. from older checkpoints, are ignored)."""
    known = {f.name for f in dataclasses.fields(EvalSettings)}
    EvalSettings(**{key: value for key, value in eval_cfg.items() if key in known}).check()


def check_run_config(cfg: dict[str, Any]) -> None:
    """Range checks of the resolved run config; a ValueError naming the full key."""
    _require_int(cfg.get("seed"), "seed", 0)
    if cfg.get("threads") is not None:
        _require_int(cfg["threads"], "threads", 1)
    device = cfg.get("device")
    if not isinstance(device, str) or not (device in ("auto", "cpu") or device.startswith("cuda")):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    TrainLoop(**cfg["train"]).check()
    check_eval_settings(cfg["eval"])
    dataset = cfg.get("dataset")
    if not isinstance(dataset, dict) or not (dataset.get("name") or dataset.get("path")):
        raise ValueError("dataset: set dataset=<suite name> or dataset.path=<file.hdf5 or Minari dataset dir>")


# -- kinema-collect ------------------------------------------------------------------------------

BEHAVIOURS = {
    "random": "uniform random actions over the action box (D4RL's random)",
    "sb3": "a stable-baselines3 checkpoint: checkpoint=<file.zip> algo=ppo|sac|td3|a2c|ddpg",
    "snapshot": "a kinema actor snapshot (safetensors + JSON): snapshot=<path without suffix>",
}
SB3_ALGORITHMS = ("ppo", "sac", "td3", "a2c", "ddpg")
COMPRESSIONS = (None, "gzip", "lzf")
SUITE_SIZES = ("default", "full")


@dataclass
class BehaviourSettings:
    name: str = "random"  # random | sb3 | snapshot (what drives the recording)
    train: bool = False  # train (or resume) a PPO behaviour policy for env instead of collecting
    total_steps: int = 2_000_000
    stop_at_return: Optional[float] = None  # stop once the last 3 snapshot evaluations average at least this
    snapshot_every: int = 20480
    work_dir: Optional[str] = None  # null = $KINEMA_BEHAVIOUR/<task> or ~/.cache/kinema/behaviour/<task>
    export: bool = False  # after training, pick medium/expert and copy snapshots into datasets/behaviour_policies/


@dataclass
class CollectConfig:
    env: Optional[str] = None  # task name (hopper, walker2d, halfcheetah, ant) or a Gymnasium id
    steps: int = 100_000  # transitions to record
    seed: int = 0
    num_envs: int = 10  # environments stepped together, one batched policy call per step
    output: Optional[str] = None  # .hdf5 file to write (D4RL layout)
    overwrite: bool = False  # true: replace an existing output file (refused otherwise)
    compression: Optional[str] = None  # null (like D4RL) | gzip | lzf
    # behaviour=sb3: a stable-baselines3 checkpoint of your own
    checkpoint: Optional[str] = None  # path to the .zip
    algo: str = "ppo"
    vecnormalize: Optional[str] = None  # VecNormalize statistics (.pkl) the checkpoint was trained with, if any
    deterministic: bool = False  # true: the policy's mean action; false: sampled, like D4RL's behaviour data
    # behaviour=snapshot: a kinema actor snapshot (prefix of .safetensors + .json)
    snapshot: Optional[str] = None
    # the benchmark suite
    dataset: Optional[str] = None  # a suite name (hopper-medium-replay, ...) or "all"
    size: str = "default"  # default (200k transitions, checksummed) | full (D4RL's 1M)
    data_dir: Optional[str] = None  # null = $KINEMA_DATA or ~/.cache/kinema/datasets
    manifest: Optional[str] = None  # null = the suite manifest shipped in kinema/datasets/suite.json
    update_manifest: bool = False  # maintainers: regenerate and record checksums in datasets/suite.json
    embed: bool = False  # maintainers: with update_manifest, also rewrite the embedded hopper slice
    behaviour: BehaviourSettings = field(default_factory=BehaviourSettings)

    def check(self) -> None:
        """Range checks before any work, each message naming the key (Hydra has checked the types)."""
        _require_int(self.steps, "steps", 1)
        _require_int(self.num_envs, "num_envs", 1)
        _require_int(self.seed, "seed", 0)
        _require_int(self.behaviour.total_steps, "behaviour.total_steps", 1)
        _require_int(self.behaviour.snapshot_every, "behaviour.snapshot_every", 1)
        choices = (("compression", self.compression, COMPRESSIONS), ("size", self.size, SUITE_SIZES),
                   ("algo", self.algo, SB3_ALGORITHMS), ("behaviour", self.behaviour.name, tuple(BEHAVIOURS)))
        for key, value, allowed in choices:
            if value not in allowed:
                raise ValueError(f"{key} must be one of {', '.join('null' if a is None else a for a in allowed)}, got {value!r}")
        stop = self.behaviour.stop_at_return
        if stop is not None and not math.isfinite(stop):
            raise ValueError(f"behaviour.stop_at_return must be a finite number or null, got {stop!r}")


# -- kinema-bodygraph ----------------------------------------------------------------------------


@dataclass
class BodyGraphConfig:
    env: Optional[str] = None  # task name (hopper, ant, humanoid, ...) or a Gymnasium MuJoCo id
    body_graph: Optional[str] = None  # an explicit layout (bodygraph.json) to check against env and draw


# -- kinema-bench --------------------------------------------------------------------------------

@dataclass
class BenchConfig:
    checkpoint: Optional[str] = None  # checkpoint directory (or a run directory holding checkpoint/)
    batch: int = 1  # environments served together
    threads: int = 1  # torch (and ONNX Runtime) intra-op threads
    steps: int = 300  # timed actions per path
    warmup: int = 20  # untimed actions per path first
    cold_start_runs: int = 3  # fresh processes per path timed from start to first action (0: skip)
    backend: Optional[str] = None  # attention backend (sdpa, math, flex, triton); null: the policy's
    device: str = "cpu"
    target_return: Optional[float] = None  # for families conditioned on one; null: the checkpoint's evaluation target
    paths: Optional[list[str]] = None  # a subset of act, runtime, compiled, cuda_graph, onnxruntime; null: every one available
    pin: Optional[list[int]] = None  # CPU cores to pin the process to (os.sched_setaffinity); null: as started


# -- kinema-rl -----------------------------------------------------------------------------------

def _bot_network() -> Any:
    from kinema.policies.bot import BoTNetwork

    return BoTNetwork()


@dataclass
class RLConfig:
    env: str = "hopper"  # task name (hopper, walker2d, halfcheetah, ant, humanoid) or a Gymnasium MuJoCo id
    seed: int = 0
    network: str = "bot"  # bot: Body Transformer actor and critic | mlp: stable-baselines3's default MlpPolicy (64x64 tanh)
    bot: Any = field(default_factory=_bot_network)  # network=bot: kinema.policies.bot.BoTNetwork (variant, embed_dim, ...)
    total_steps: int = 1_000_000  # environment steps
    snapshot_every: int = 20480  # evaluate, export checkpoint/ and save a resumable learner every N steps (5 PPO rollouts)
    eval_episodes: int = 10  # episodes per evaluation (deterministic actions); episode i is seeded eval_seed + i
    eval_seed: int = 1000
    randomization: Optional[str] = None  # train under this domain-randomisation profile (kinema.envs.randomization); evaluation stays nominal
    randomization_file: Optional[str] = None  # a YAML file of profiles of your own

    def randomization_profile(self) -> Any:
        """The training environments' profile (None: nominal)."""
        if not self.randomization:
            return None
        from kinema.envs.randomization import get_profile

        return get_profile(self.randomization, self.randomization_file)

    def check(self) -> None:
        from kinema.policies.ppo import NETWORKS
        from kinema.train.ppo import PPO_RECIPE, require_whole_rollouts

        _require_int(self.seed, "seed", 0)
        _require_int(self.total_steps, "total_steps", 1)
        _require_int(self.snapshot_every, "snapshot_every", 1)
        _require_int(self.eval_episodes, "eval_episodes", 1)
        _require_int(self.eval_seed, "eval_seed", 0)
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {', '.join(NETWORKS)}, got {self.network!r}")
        require_whole_rollouts(self.snapshot_every, PPO_RECIPE)
        self.randomization_profile()  # an unknown profile is refused before anything runs
