"""The quality grid: policies x datasets x seeds, each cell one kinema training run with a fixed budget.

    python benchmarks/quality.py                          # the whole grid (resumable; hours)
    nohup python benchmarks/quality.py > benchmarks/results/quality.log 2>&1 &   # in the background
    python benchmarks/quality.py --status                 # what is done, stale, running, pending; rebuild quality.json
    python benchmarks/quality.py --rerun-stale            # also re-run cells whose code changed (or is unknown)
    python benchmarks/quality.py --seed-list 1 &          # a second worker on other seeds (cells are locked)
    python benchmarks/quality.py --quick --dataset-path hopper-small=/tmp/h.hdf5 --results-dir /tmp/q

Grid: ``--policies`` names registered policy families (``kinema.policies``: the package's
modules and every ``kinema.policies`` entry point, e.g. the HuggingFace peer ``hf_dt`` in
``benchmarks/hf_peer.py``) or grid variants of one (``VARIANTS``: ``dt_full``, the paper's
full-context DT, ``attention_window=0``, beside kinema's banded default; ``at_chains``, AT's
earlier default, chains of up to 4 episodes without an EMA of weights, and its ablation: ``at_final``,
the loss on the final, best trial of each chain only; ``at_own``, ``at_summary`` and
``at_own_summary``, ``at_later_summary``, ``at_steps``, ``at_later_summary_steps``, ``at_own_steps``:
AT's relabelling, trial-summary and window-weight options; ``at_single``, AT's one-episode chains
without the EMA; ``dt_ema``: DT with the recipe's EMA of weights), x suite datasets (generated on
first use by ``kinema.datasets.suite``; ``--datasets`` overrides, ``--dataset-path
NAME=FILE`` points a name at any D4RL/Minari file) x seeds. No family is named anywhere
else: quality.json records each policy's label (the family's ``label``; a variant's adds
what differs) and the column order (the default grid's, then other requested policies,
variants after their family).

Each cell is ``kinema.train.trainer.run_training`` in its own run directory
``<results>/quality_runs/<dataset>/<policy>/seed<k>/``, so it writes the usual eval.json,
checkpoints and learning curve. Resumable at two levels: a finished cell is skipped, and a
killed cell continues from its last periodic checkpoint (the trainer resumes a run
directory). A cell being trained holds a lock file, so several workers (e.g. one per seed)
can share the grid. After every cell the aggregate ``<results>/quality.json`` is rebuilt
from everything on disk: partial results are always ready to commit (the run directories'
.gitignore keeps only eval.json, trials.json, cell.json and dataset.json).

What a number was computed with: each cell's ``cell.json`` records the sha256 of its
resolved trainer config (canonical JSON: sorted keys, no spaces; the keys in
``UNHASHED`` change how a cell runs, not what it computes, and are left out), the config
itself, and the git commit the cell started at. A cell whose recorded hash differs from the
config the grid would run now is re-run instead of silently keeping the old number. A cell
is *stale* when its commit is older than the last commit touching its family's code (the
modules of the family, and the kinema modules they import, transitively) or the trainer
(``train/``): ``--status`` reports it, the aggregate flags it, and ``--rerun-stale`` re-runs
it. Cells finished before cells recorded a hash are kept and reported as "unverified (no
config hash)"; ``--rerun-stale`` re-runs them too. A re-run of a finished cell trains in
``<cell>/rerun/`` and replaces the cell's results only once it is complete: until then, and
for good if it fails or is killed, the old eval.json, trials.json, cell.json and final
checkpoint stay in place (flagged as before; a failure is noted in the state and in
error.txt), and the next re-run resumes in ``rerun/``.

Protocol (recorded in quality.json): the same budget for every policy: ``--steps`` gradient
steps of batch ``--batch-size``, each family with its own recipe (``policy.recipe``), a
warm-up, where the recipe has one, scaled to 10% of the steps (as DT's 10k of 100k).
Evaluation: ``--eval-episodes`` episodes at the trainer's default target return (the best
episode return in the training data, ``eval.target_return=dataset_max``), reported from the
LAST evaluation (the final checkpoint), mean ± std over seeds (ddof=0) of each seed's mean
normalised score. Scores use the dataset's own reference returns (Minari's convention);
D4RL-reference scores are reported too. Families for which several trials per context mean
something (``multi_trial``) are also played ``--trials`` trials in a row per context
(``kinema.envs.trials.evaluate_trials``) and reported three ways: first trial, last trial,
best of n. With ``--eval-every N`` a cell is also evaluated every N steps during training on the
same start states, and the rows add a *late score*: each seed's mean over the evaluations in the
last half of training (final included), which averages out the swings of a single checkpoint.
How long a grid takes: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import inspect
import json
import os
import shutil
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from filelock import FileLock, Timeout

from kinema.benchmarks.bench_utils import (
    REPO_ROOT,
    RunRecord,
    git,
    git_commit,
    load_average,
    print_table,
    require_positive,
    results_dir_or_error,
    write_json,
)

NAME = "quality"
DEFAULT_POLICIES = ("dt", "at", "hf_dt", "bc")
DEFAULT_DATASETS = ("hopper-medium", "hopper-medium-replay", "walker2d-medium-replay", "halfcheetah-medium")


@dataclass(frozen=True)
class Variant:
    """A grid variant of a registered family: its config overrides and what they change (for its label)."""

    family: str
    overrides: dict[str, Any] = field(default_factory=dict)
    differs: str = ""


AT_CHAINS = {"max_chain_len": 4, "recipe": {"ema": False}}
VARIANTS = {
    "dt_full": Variant("dt", {"attention_window": 0}, "full context"),  # the paper's DT (kinema's default is banded)
    # AT's default before issue 19 (chains of up to 4 episodes, no EMA of weights) and the issue's
    # ablation of it: does any chain setting give a first trial >= DT's, improving from trial to trial?
    # Each pins the chain length and EMA, so AT's defaults can change without changing them.
    "at_chains": Variant("at", AT_CHAINS, "chains of up to 4 episodes, no EMA"),
    "at_final": Variant("at", {**AT_CHAINS, "loss_on": "final_trial"}, "chains, loss on the final trial, no EMA"),
    "at_own": Variant("at", {**AT_CHAINS, "relabel": "own_return"}, "chains, true returns-to-go, no EMA"),
    "at_summary": Variant("at", {**AT_CHAINS, "trial_summary": True}, "chains, previous-trial summary, no EMA"),
    "at_own_summary": Variant("at", {**AT_CHAINS, "relabel": "own_return", "trial_summary": True},
                              "chains, true returns-to-go, previous-trial summary, no EMA"),
    "at_later_summary": Variant("at", {**AT_CHAINS, "relabel": "later_trials", "trial_summary": True},
                                "chains, the chain's best target on later trials only, previous-trial summary, no EMA"),
    "at_steps": Variant("at", {**AT_CHAINS, "window_start": "episode"}, "chains, windows weighted as DT's, no EMA"),
    "at_later_summary_steps": Variant("at", {**AT_CHAINS, "relabel": "later_trials", "trial_summary": True, "window_start": "episode"},
                                      "chains, the chain's best target on later trials only, previous-trial summary, windows weighted as DT's, no EMA"),
    "at_own_steps": Variant("at", {**AT_CHAINS, "relabel": "own_return", "window_start": "episode"},
                            "chains, true returns-to-go, windows weighted as DT's, no EMA"),
    "at_single": Variant("at", {"max_chain_len": 1, "recipe": {"ema": False}}, "one-episode chains, no EMA"),
    # Checkpoint noise: an EMA of the weights (diffusion_policy's warm-up) is what the evaluations see.
    "dt_ema": Variant("dt", {"recipe": {"ema": True}}, "EMA of weights"),
    # The Body Transformer study (issue: BoT >= vanilla transformer and MLP?): the three BoT variants have the
    # same parameters; bc_matched is BC's MLP widened to about BoT's count (4x64: 142k on ant, 138k on walker2d).
    "bot_hard": Variant("bot", {"variant": "hard"}, "hard"),
    "bot_mix": Variant("bot", {"variant": "mix"}, "mix"),
    "bot_vanilla": Variant("bot", {"variant": "vanilla"}, "vanilla (no body mask)"),
    "bc_matched": Variant("bc", {"hidden_dims": [360, 360]}, "360x360, matched to BoT's parameters"),
}
LATE_FRACTION = 0.5  # --eval-every: the late score averages the evaluations from this share of the budget on
WARMUP_FRACTION = 0.1  # a recipe's warm-up, if it has one, is 10% of the budget (DT: 10k of 100k steps)
EVAL_JSON, TRIALS_JSON, CELL_JSON, DATASET_JSON, LOCK = "eval.json", "trials.json", "cell.json", "dataset.json", ".lock"
ERROR_TXT = "error.txt"
RESULT_FILES = (EVAL_JSON, TRIALS_JSON, CELL_JSON, ERROR_TXT)
RESULT_FOLDERS = ("checkpoints", "checkpoint")
RERUN_DIR = "rerun"  # where a finished cell is re-run, beside its results until the new ones are complete
RUNS_GITIGNORE = (
    "# Only the small result files of each cell are committed.\n*\n!*/\n!.gitignore\n"
    "!eval.json\n!trials.json\n!cell.json\n!dataset.json\n"
    f"# An unfinished re-run of a cell.\n{RERUN_DIR}/\n"
)
# Keys of a cell's trainer config that decide how it runs, not what it computes: not hashed,
# so a second worker with other threads or checkpoint spacing shares the grid.
UNHASHED = ("threads", "train.checkpoint_every", "train.log_every", "train.keep_checkpoints")
UNVERIFIED = "unverified (no config hash)"


class GridError(ValueError):
    """A quality-grid argument that cannot be used, with what was expected."""


# -- the grid -------------------------------------------------------------------------------
def parse_dataset_paths(items: Sequence[str]) -> dict[str, Path]:
    paths = {}
    for item in items:
        name, sep, file = item.partition("=")
        if not sep or not name or not file:
            raise GridError(f"--dataset-path expects NAME=FILE, got {item!r}")
        path = Path(file).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"--dataset-path {name}={file}: no such file or directory")
        paths[name] = path
    return paths


def csv_list(text: str, what: str) -> list[str]:
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise GridError(f"{what} expects a comma-separated list, got {text!r}")
    return items


def cell_dir(runs_dir: Path, dataset: str, policy: str, seed: int) -> Path:
    return runs_dir / dataset / policy / f"seed{seed}"


def family_of(policy: str) -> str:
    return VARIANTS[policy].family if policy in VARIANTS else policy


def policy_label(policy: str) -> str:
    """How tables name a grid policy: the family's ``label`` (its name if it has none or is gone), plus a variant's difference."""
    from kinema.policies import policy_class

    family = family_of(policy)
    try:
        label = policy_class(family).label or family
    except ValueError:  # a family no longer registered: its cells on disk keep their name
        label = family
    return f"{label}, {VARIANTS[policy].differs}" if policy in VARIANTS else label


def column_order(requested: Sequence[str], on_disk: Sequence[str]) -> list[str]:
    """Table columns: the default grid's order, then other requested policies in their order; policies found
    only on disk after their family (variants) or at the end. Stable whichever subset one invocation asks for."""
    order = list(dict.fromkeys([*DEFAULT_POLICIES, *requested]))
    for policy in sorted(set(on_disk) - set(order)):
        family = family_of(policy)
        group = [index for index, name in enumerate(order) if family_of(name) == family]
        if group:
            order.insert(group[-1] + 1, policy)
        else:
            order.append(policy)
    present = set(requested) | set(on_disk)
    return [policy for policy in order if policy in present]


def merge_overrides(node: dict[str, Any], overrides: dict[str, Any]) -> None:
    """A variant's overrides on a family's config node; a nested dict (``recipe``) changes only the keys it names."""
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            merge_overrides(node[key], value)
        else:
            node[key] = copy.deepcopy(value)


@functools.lru_cache(maxsize=None)
def _family_config(family: str) -> str:
    from kinema.train.cli import compose_train_config

    return json.dumps(compose_train_config([f"policy={family}"]))  # each family trains with its own recipe


def policy_config(policy: str) -> dict[str, Any]:
    """kinema's Hydra config for a grid policy: its family's, with a variant's overrides."""
    cfg = json.loads(_family_config(family_of(policy)))
    if policy in VARIANTS:
        merge_overrides(cfg["policy"], VARIANTS[policy].overrides)
    return cfg


def evaluates_weight_ema(policy: str) -> bool:
    """Whether the policy's recipe evaluates an EMA of the weights."""
    from kinema.policies import policy_class

    try:
        policy_class(family_of(policy))
    except ValueError:  # a family no longer registered: its recipe is unknown
        return False
    return bool(policy_config(policy)["policy"]["recipe"].get("ema"))


def recipes_protocol(policies: Sequence[str]) -> str:
    """The protocol's recipe line; it names the columns scored with an EMA of the weights, which are then not
    like for like with the columns scored with the last weights."""
    line = "each family's own (policy.recipe), warm-up scaled to " + f"{WARMUP_FRACTION:.0%} of steps"
    with_ema = ", ".join(f'"{policy_label(policy)}"' for policy in policies if evaluates_weight_ema(policy))
    if with_ema:
        line += f"; scored with an EMA of the weights (policy.recipe.ema): {with_ema}; the others with the last weights"
    return line


def cell_config(policy: str, dataset: str, dataset_paths: dict[str, Path], seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """The trainer config of one cell: kinema's Hydra config with the grid's budget applied."""
    cfg = policy_config(policy)
    recipe = cfg["policy"]["recipe"]
    recipe["batch_size"] = args.batch_size
    if recipe["warmup_steps"] > 0:
        recipe["warmup_steps"] = int(WARMUP_FRACTION * args.steps)
    train = cfg["train"]
    train.update({"steps": args.steps, "checkpoint_every": args.checkpoint_every,
                  "log_every": min(int(train["log_every"]), args.checkpoint_every), "keep_checkpoints": 1})
    # One protocol for every policy's headline score: single episodes from the same start states.
    # Multi-trial scores come from a separate run into trials.json (a family's own eval.trials is overridden).
    cfg["eval"].update({"episodes": args.eval_episodes, "num_envs": min(10, args.eval_episodes), "every": 0, "trials": 1})
    if args.eval_every:  # the same episodes (start states) at every evaluation, so checkpoints compare like with like
        cfg["eval"].update({"every": args.eval_every, "episodes_during_training": args.eval_episodes})
    cfg["seed"], cfg["device"], cfg["threads"] = seed, "cpu", args.threads
    if dataset in dataset_paths:
        cfg["dataset"] = {"name": dataset, "path": str(dataset_paths[dataset])}
    else:
        cfg["dataset"] = {"name": dataset, "path": None}
    cfg["env"] = None
    return cfg


def config_hash(cfg: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a cell's config, ``UNHASHED`` keys left out."""
    hashed = copy.deepcopy(cfg)
    for dotted in UNHASHED:
        *parents, key = dotted.split(".")
        node = hashed
        for parent in parents:
            node = node.get(parent) or {}
        node.pop(key, None)
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def cell_digest(cfg: dict[str, Any], run_dir: Path, policy: str) -> str:
    """The config hash a cell's record is compared with.

    A family option added after the cell was recorded and left at its default computes what the
    recorded config did, so it is left out of the hash (otherwise every new option would re-run
    every cell of its family)."""
    import dataclasses

    from kinema.policies import policy_class

    recorded = (((read_json(run_dir / CELL_JSON) or {}).get("config") or {}).get("policy")) or {}
    if not recorded:
        return config_hash(cfg)
    defaults = {option.name: json.loads(json.dumps(option.default, default=str))  # as the config holds it (tuple -> list)
                for option in dataclasses.fields(policy_class(family_of(policy)).config_class)
                if option.default is not dataclasses.MISSING}
    added = [key for key, value in cfg["policy"].items() if key not in recorded and key in defaults and value == defaults[key]]
    if not added:
        return config_hash(cfg)
    trimmed = copy.deepcopy(cfg)
    for key in added:
        del trimmed["policy"][key]
    return config_hash(trimmed)


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configs."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def plays_trials(policy: str) -> bool:
    """Several trials per context mean something only for a policy that keeps a context per environment."""
    from kinema.policies import policy_class

    return policy_class(family_of(policy)).multi_trial


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# -- code history: is a cell's commit older than its family's code? -------------------------------
class CodeHistory:
    """When each family's code, or the trainer, last changed in git (nothing is known outside a checkout)."""

    def __init__(self) -> None:
        self._last_change: dict[str, str | None] = {}
        self._ancestor: dict[tuple[str, str], bool | None] = {}

    @staticmethod
    def family_files(family: str) -> list[str]:
        """Checkout-relative files of the family: its classes' modules and the kinema modules they import, transitively."""
        from kinema.policies import policy_class

        cls = policy_class(family)
        start = {klass.__module__ for klass in (*cls.__mro__, cls.config_class)}
        seen: set[str] = set()
        pending = [name for name in start if name in sys.modules]
        files = set()
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            module = sys.modules.get(name)
            path = repository_file(name)
            if path is None:
                continue
            files.add(path)
            for value in vars(module).values():
                if inspect.ismodule(value) and value.__name__.startswith(name + "."):
                    continue  # a package's submodule, set there by whoever imported it (kinema.policies discovers every family)
                imported = value.__name__ if inspect.ismodule(value) else getattr(value, "__module__", None)
                if isinstance(imported, str) and imported.startswith("kinema.") and imported not in seen:
                    pending.append(imported)
        return sorted(files)

    @staticmethod
    def sampler_files(family: str) -> list[str]:
        """The sampler code the family's batches come from: the shared machinery (transitions and windows
        too) and the module registering its batch kind, read from a config at the family's defaults.
        Every sampler module when the kind cannot be read that way (a batch_spec that needs more than
        ``self.config``)."""
        from types import SimpleNamespace

        from kinema.datasets.samplers import SAMPLERS, discover_samplers
        from kinema.policies import policy_class

        cls = policy_class(family)
        discover_samplers()
        try:
            kind = cls.batch_spec.fget(SimpleNamespace(config=cls.config_class())).kind
            module = repository_file(SAMPLERS[kind].__module__)
        except Exception:
            return ["datasets/samplers"]
        return sorted({"datasets/samplers/__init__.py", *([module] if module else [])})

    def last_change(self, family: str) -> str | None:
        """The last commit touching the family's files or the code every cell's score goes through (None: unknown)."""
        if family not in self._last_change:
            try:
                paths = [*self.family_files(family), *self.sampler_files(family), *SHARED_SCORE_CODE]
            except ValueError:  # the family is no longer registered
                paths = []
            self._last_change[family] = last_score_changing_commit(paths) if paths else None
        return self._last_change[family]

    def _is_ancestor(self, older: str, newer: str) -> bool | None:
        if (older, newer) not in self._ancestor:
            known = git("cat-file", "-e", f"{newer}^{{commit}}") is not None
            self._ancestor[(older, newer)] = (git("merge-base", "--is-ancestor", older, newer) is not None) if known else None
        return self._ancestor[(older, newer)]

    def stale_reason(self, family: str, commit: str | None) -> str | None:
        """Why a cell that ran at ``commit`` is stale, or None when it is current (or nothing can be known)."""
        if not commit or REPO_ROOT is None:
            return None
        base = commit.removesuffix("-dirty")
        last = self.last_change(family)
        if last is None:
            return None
        current = self._is_ancestor(last, base)
        if current is None:
            return f"its commit {base[:12]} is not in this repository"
        if not current:
            return f"{family}'s code or the shared training/evaluation code changed in {last[:12]}, after the cell's commit {base[:12]}"
        return None


# A commit that touches a family's code without changing what it computes (a refactor, a new backend
# the default path never takes) says so in its message with a line "Score-neutral: <evidence>", e.g.
# the golden-output tests passing unchanged. It then leaves the family's cells current. A commit
# whose message lacks the line can be declared afterwards in SCORE_NEUTRAL_COMMITS, one
# "<commit> <evidence>" per line. A commit that also re-records the golden outputs cannot make
# either claim: it is ignored.
SCORE_NEUTRAL = "Score-neutral:"
SCORE_NEUTRAL_COMMITS = "benchmarks/score_neutral_commits.txt"
GOLDEN_OUTPUTS = "tests/golden"


def claims_score_neutral(message: str) -> bool:
    return any(line.startswith(SCORE_NEUTRAL) and line[len(SCORE_NEUTRAL):].strip() for line in message.splitlines())


def declared_score_neutral() -> list[str]:
    """Commit prefixes (7+ hex digits) declared in SCORE_NEUTRAL_COMMITS with their evidence."""
    if REPO_ROOT is None or not (REPO_ROOT / SCORE_NEUTRAL_COMMITS).is_file():
        return []
    declared = []
    for line in (REPO_ROOT / SCORE_NEUTRAL_COMMITS).read_text().splitlines():
        commit, _, evidence = line.split("#", 1)[0].strip().partition(" ")
        if len(commit) >= 7 and evidence.strip():
            declared.append(commit.lower())
    return declared


def last_score_changing_commit(paths: Sequence[str]) -> str | None:
    """The newest commit touching ``paths`` that does not validly claim to be score-neutral (None: none, or no git)."""
    out = git("log", "--format=%H%x1f%B%x1e", "--", *paths)
    if out is None:
        return None
    declared = declared_score_neutral()
    for entry in out.split("\x1e"):
        commit, _, message = entry.strip().partition("\x1f")
        if not commit:
            continue
        if claims_score_neutral(message) or any(commit.startswith(prefix) for prefix in declared):
            touched = git("diff-tree", "--no-commit-id", "--name-only", "-r", "--root", commit, "--", GOLDEN_OUTPUTS)
            if touched is not None and not touched.strip():
                continue
        return commit
    return None


def repository_file(module: str) -> str | None:
    """The checkout's file of module ``kinema.<folder>.<...>`` (each folder is a package), whether the
    running kinema is that checkout (editable) or installed from it; None outside kinema."""
    parts = module.split(".")
    if REPO_ROOT is None or len(parts) < 2 or parts[0] != "kinema":
        return None
    base = REPO_ROOT.joinpath(*parts[1:])
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return str(candidate.relative_to(REPO_ROOT))
    return None


# What every cell's number goes through besides its family's own modules: the trainer, the
# samplers that feed it, and the evaluation loop and scores.
# Besides the family's own modules and its sampler (CodeHistory.sampler_files).
SHARED_SCORE_CODE = ("train", "envs/evaluate.py", "envs/scores.py", "envs/registry.py")


# -- locks: several workers may share one grid ---------------------------------------------------
# A cell being trained holds an OS file lock (filelock) on <cell>/.lock, released by the kernel
# when its worker dies, so a killed worker never blocks the cell. The worker's pid is written
# beside it only so --status can say who is training.
WORKER_PID = ".worker"
_held_locks: dict[Path, FileLock] = {}


def lock_owner(run_dir: Path) -> int | None:
    """The pid of another live worker training this cell, if any (None when free or held here)."""
    if run_dir in _held_locks or not (run_dir / LOCK).exists():
        return None
    probe = FileLock(str(run_dir / LOCK))
    try:
        probe.acquire(timeout=0)
    except Timeout:
        try:
            return int((run_dir / WORKER_PID).read_text().strip())
        except (OSError, ValueError):
            return 0  # held, by a worker that has not written its pid yet
    probe.release()
    return None


def claim(run_dir: Path) -> bool:
    """Take the cell's lock for this worker; False when another worker holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(run_dir / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return False
    (run_dir / WORKER_PID).write_text(str(os.getpid()))
    _held_locks[run_dir] = lock
    return True


def release(run_dir: Path) -> None:
    lock = _held_locks.pop(run_dir, None)
    if lock is not None:
        (run_dir / WORKER_PID).unlink(missing_ok=True)
        lock.release()


# -- the state of one cell -------------------------------------------------------------------------
@dataclass
class CellState:
    state: str  # what --status prints; finished cells start with "done"
    flags: list[str] = field(default_factory=list)  # "unverified", "stale", "config_changed"

    @property
    def finished(self) -> bool:
        return self.state.startswith("done")

    @property
    def kind(self) -> str:
        """One word for counts: done, unverified, stale, running, failed, ..."""
        return self.flags[0] if self.finished and self.flags else self.state.split(" ")[0]


def cell_state(run_dir: Path, policy: str, expected_hash: str | None, needs_trials: bool, history: CodeHistory) -> CellState:
    """Where a cell stands. ``expected_hash``: the config the grid would run now (None: not compared)."""
    record = read_json(run_dir / CELL_JSON)
    evaluated = (run_dir / EVAL_JSON).is_file()
    worker = lock_owner(run_dir)  # another worker's, not this one's claim
    # A finished cell with an error.txt kept its results through a failed re-run.
    failed = "; its last re-run failed (see error.txt)" if evaluated and (run_dir / ERROR_TXT).is_file() else ""
    if evaluated and record is None:
        return CellState(f"done, {UNVERIFIED}{failed}", ["unverified"])
    if record is not None and expected_hash is not None and record.get("config_sha256") != expected_hash:
        if worker is not None:
            return CellState(f"running (pid {worker or '?'}) with another config")
        return CellState(f"config changed (re-run on the next run){failed}", ["config_changed"])
    if evaluated and not (needs_trials and not (run_dir / TRIALS_JSON).is_file()):
        reason = history.stale_reason(family_of(policy), (record or {}).get("git_commit"))
        if reason:
            return CellState(f"done, stale ({reason}){failed}", ["stale"])
        return CellState("done")
    if worker is not None:
        return CellState(f"running (pid {worker or '?'})")
    if (run_dir / ERROR_TXT).is_file():
        return CellState("failed (see error.txt); retried on the next run")
    if (run_dir / "checkpoints").is_dir() or evaluated:
        return CellState("interrupted (resumes where it stopped)")
    return CellState("pending")


def clear_cell(run_dir: Path) -> None:
    """Remove a cell's results and checkpoints so it trains from scratch."""
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in (*RESULT_FOLDERS, RERUN_DIR):
        shutil.rmtree(run_dir / folder, ignore_errors=True)


def promote_rerun(run_dir: Path) -> None:
    """A complete re-run replaces the cell's results: everything in ``rerun/`` moves up, the old results go."""
    work_dir = run_dir / RERUN_DIR
    for name in RESULT_FILES:
        (run_dir / name).unlink(missing_ok=True)
    for folder in RESULT_FOLDERS:
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    for item in sorted(work_dir.iterdir()):
        if item.name in (LOCK, WORKER_PID):
            item.unlink()  # the cell's lock is the one in run_dir
            continue
        target = run_dir / item.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(item, target)
    work_dir.rmdir()


# -- one cell ------------------------------------------------------------------------------------
def describe_dataset(cfg: dict[str, Any], out: Path) -> None:
    """Once per dataset: its size, average return (the bar a policy should clear) and content digest.

    Afterwards, a GridError when the dataset now resolves to other data than the recorded one
    (regenerated differently, another --dataset-path file): the dataset's cells would mix results
    on two datasets."""
    from kinema.datasets.suite import content_record
    from kinema.envs import reference_returns
    from kinema.train.data import resolve_dataset

    data = resolve_dataset(cfg["dataset"], cfg.get("env"))
    returns = np.asarray(data.dataset.episode_returns, dtype=np.float64)
    info: dict[str, Any] = {
        "name": data.name, "path": str(data.path), "task": data.task.name, "episodes": int(len(returns)),
        "transitions": int(data.dataset.num_transitions), "return_mean": float(returns.mean()),
        "return_max": float(returns.max()), "reference_returns": data.reference_returns,
        # The suite's digest of the arrays a policy trains on and the metadata (not of float64 infos/*, whose last
        # bits may differ between CPUs); a Minari dataset is a folder, compared by its summary.
        "content_sha256": content_record(data.path)["content_sha256"] if data.path.is_file() else None,
    }
    ref_min, ref_max, source = reference_returns(data.task, data.reference_returns)
    info.update({"reference_source": source, "normalized_return_mean": 100 * (info["return_mean"] - ref_min) / (ref_max - ref_min)})
    recorded = read_json(out)
    if recorded is None:
        write_json(out, info)
        return
    # Records from before the digest was kept are compared by what they hold.
    keys = ("content_sha256",) if recorded.get("content_sha256") and info["content_sha256"] else ("episodes", "transitions", "return_mean")
    changed = [key for key in keys if recorded.get(key) != info[key]]
    if changed:
        def described(record: dict[str, Any]) -> str:
            return (f"{record.get('episodes')} episodes, return mean {record.get('return_mean')}, "
                    f"content digest {record.get('content_sha256') or 'not recorded'}")
        raise GridError(
            f"{out} records the data this dataset's cells trained on ({described(recorded)}), but "
            f"{info['name']} now resolves to {data.path} ({described(info)}): {', '.join(changed)} differ. Training here "
            f"would mix results on two datasets in one row: move {out.parent} aside, use another --results-dir, or give "
            "the new data another name with --dataset-path NAME=FILE"
        )
    if not recorded.get("content_sha256") and info["content_sha256"]:
        write_json(out, {**recorded, "content_sha256": info["content_sha256"]})  # the same data: pin it from now on


def prepare_cell(run_dir: Path, policy: str, cfg: dict[str, Any], digest: str, state: CellState) -> tuple[Path, str | None]:
    """Where the cell trains, and why it is re-run (None: a first run or a resumed one).

    A cell with results is re-run in ``rerun/`` (resumed there if an earlier re-run of the
    same config was cut short), so its results stay until the new ones are complete; a
    cell without results is cleared. The config the cell runs is recorded in its cell.json.
    """
    record = read_json(run_dir / CELL_JSON)
    why = None
    if "config_changed" in state.flags and record is not None:
        keys = changed_keys(record.get("config") or {}, json.loads(json.dumps(cfg)))
        why = "config changed" + (f" ({', '.join(keys)})" if keys else "")
    elif state.finished and state.flags:  # stale or unverified, re-run on request
        why = state.state.removeprefix("done, ").split("; ")[0]
    work_dir = run_dir
    if why and (run_dir / EVAL_JSON).is_file():
        work_dir = run_dir / RERUN_DIR
        record = read_json(work_dir / CELL_JSON)
        if record is None or record.get("config_sha256") != digest:
            shutil.rmtree(work_dir, ignore_errors=True)  # nothing to resume: start the re-run afresh
            record = None
        work_dir.mkdir(exist_ok=True)
    elif why:
        clear_cell(run_dir)
        record = None
    if record is None:  # the commit the cell starts at: a resumed cell keeps its first (oldest) one
        write_json(work_dir / CELL_JSON, {"policy": policy, "family": family_of(policy), "config_sha256": digest,
                                          "git_commit": git_commit(), "unhashed": list(UNHASHED), "config": cfg})
    return work_dir, why


def run_cell(policy: str, run_dir: Path, cfg: dict[str, Any], args: argparse.Namespace, work_dir: Path | None = None) -> str:
    """Train and evaluate one cell in ``work_dir`` (default: the cell's own directory; resuming if
    it was interrupted); a re-run's ``work_dir`` replaces the cell's results once complete.
    Returns what was done."""
    from kinema.train.trainer import run_training

    work_dir = work_dir or run_dir
    done = []
    if not (work_dir / EVAL_JSON).is_file():
        start = time.perf_counter()
        result = run_training(cfg, work_dir)
        elapsed = time.perf_counter() - start
        # The trainer's eval.json plus how long this session spent on the cell.
        result["quality_cell_wall_s"] = round(elapsed, 1)
        if cfg["eval"]["every"]:
            result["evaluations"] = evaluations_during_training(work_dir)
        write_json(work_dir / EVAL_JSON, result)
        done.append(f"trained+evaluated in {elapsed / 60:.1f} min")
    if plays_trials(policy) and args.trials > 1 and not (work_dir / TRIALS_JSON).is_file():
        trials = run_trials(work_dir, args)
        if trials is not None:
            done.append(f"{args.trials} trials")
    # Finished: the resume checkpoints (optimiser state) are dead weight; checkpoint/ keeps the final policy.
    shutil.rmtree(work_dir / "checkpoints", ignore_errors=True)
    if work_dir != run_dir:
        promote_rerun(run_dir)
        done.append("replaced the previous result")
    return ", ".join(done) or "already done"


def evaluations_during_training(run_dir: Path) -> list[dict[str, Any]]:
    """Every evaluation of a run, the final one included, from its metrics log (one per step, the last logged)."""
    from kinema.train.metrics import METRICS_JSONL, read_rows

    by_step = {}
    for row in read_rows(run_dir / METRICS_JSONL):
        if "eval/normalized_score_mean" in row:
            by_step[int(row["step"])] = {"step": int(row["step"]), "normalized_score_mean": row["eval/normalized_score_mean"],
                                         "return_mean": row["eval/return_mean"]}
    return [by_step[step] for step in sorted(by_step)]


def late_score(evaluations: list[dict[str, Any]], steps: int | None) -> float | None:
    """Mean normalised score of the evaluations in the last half of training (the final one included), to 4
    decimals (tables show one: no double rounding); None without evaluations."""
    late = [e["normalized_score_mean"] for e in evaluations if steps is not None and e["step"] >= LATE_FRACTION * steps]
    return round(float(np.mean(late)), 4) if late else None


def run_trials(run_dir: Path, args: argparse.Namespace) -> dict[str, Any] | None:
    try:
        from kinema.envs.trials import evaluate_trials
    except ImportError:
        print("kinema.envs.trials is not available: multi-trial scores skipped", file=sys.stderr)
        return None
    from kinema.train.checkpoint import load_checkpoint

    evaluation = json.loads((run_dir / EVAL_JSON).read_text())
    loaded = load_checkpoint(run_dir / "checkpoint")
    loaded.policy.eval()
    conditioning = {"target_return": evaluation["target_return"]} if evaluation.get("target_return") is not None else {}
    result = evaluate_trials(
        loaded.policy, loaded.task, episodes=args.eval_episodes, trials=args.trials,
        seed=int(loaded.config["eval"]["seed"]), num_envs=min(10, args.eval_episodes),
        conditioning=conditioning, dataset_refs=loaded.dataset_refs,
    ).to_dict()
    result.update({"step": loaded.step, **conditioning})
    write_json(run_dir / TRIALS_JSON, result)
    return result


# -- aggregation ----------------------------------------------------------------------------------
def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    array = np.asarray(values, dtype=np.float64)
    return round(float(array.mean()), 2), round(float(array.std()), 2)


def d4rl_score(task: str, return_mean: float) -> float | None:
    from kinema.envs import get_task

    spec = get_task(task)
    if spec.d4rl_ref_min is None or spec.d4rl_ref_max is None:
        return None
    return 100.0 * (return_mean - spec.d4rl_ref_min) / (spec.d4rl_ref_max - spec.d4rl_ref_min)


def _batch_size(run_dir: Path, record: dict[str, Any] | None, previous: dict[tuple, dict[str, Any]], key: tuple) -> Any:
    """The cell's batch size: from its cell.json; for older cells from the final checkpoint's config,
    or, once that is gone (checkpoints are not committed), from the previous quality.json."""
    if record is not None:
        return record["config"]["policy"]["recipe"]["batch_size"]
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "checkpoint" / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return previous.get(key, {}).get("batch_size")
    policy = cfg.get("policy") or {}
    return (policy.get("recipe") or {}).get("batch_size", (cfg.get("train") or {}).get("batch_size"))


def collect_cells(runs_dir: Path, states: dict[tuple[str, str, int], CellState], previous_json: Path) -> list[dict[str, Any]]:
    """Every cell on disk with an evaluation, whatever worker or session produced it, with its state's flags."""
    previous = {(c["dataset"], c["policy"], c["seed"], c.get("steps")): c for c in (read_json(previous_json) or {}).get("cells", [])}
    cells = []
    for evaluation_path in sorted(runs_dir.glob(f"*/*/seed*/{EVAL_JSON}")):
        run_dir = evaluation_path.parent
        evaluation = json.loads(evaluation_path.read_text())
        record = read_json(run_dir / CELL_JSON)
        key = (run_dir.parent.parent.name, run_dir.parent.name, int(run_dir.name.removeprefix("seed")))
        cell = {
            "dataset": key[0],
            "policy": key[1],
            "seed": key[2],
            "steps": evaluation.get("step"),
            "batch_size": _batch_size(run_dir, record, previous, (*key, evaluation.get("step"))),
            "episodes": evaluation.get("episodes"),
            "target_return": evaluation.get("target_return"),
            "return_mean": evaluation.get("return_mean"),
            "normalized_score": evaluation.get("normalized_score_mean"),
            "late_score": late_score(evaluation.get("evaluations", []), evaluation.get("step")),
            "reference_source": evaluation.get("reference_source"),
            "d4rl_score": d4rl_score(evaluation["task"], evaluation["return_mean"]) if evaluation.get("task") else None,
            "wall_s": evaluation.get("quality_cell_wall_s"),
            "config_sha256": (record or {}).get("config_sha256"),
            "git_commit": (record or {}).get("git_commit"),
            "state": states[key].state,
            "flags": states[key].flags,
        }
        if evaluation.get("evaluations"):
            cell["evaluations"] = {str(e["step"]): round(e["normalized_score_mean"], 4) for e in evaluation["evaluations"]}
        trials_path = run_dir / TRIALS_JSON
        if trials_path.is_file():
            trials = json.loads(trials_path.read_text())
            cell["trials"] = {
                "n": trials["trials"],
                "first": trials.get("first_trial_score_mean"),
                "last": trials.get("last_trial_score_mean"),
                "best_of_n": trials.get("best_of_n_score_mean"),
            }
        cells.append(cell)
    return cells


def aggregate(cells: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (dataset, policy, budget): mean ± std over seeds of the last evaluation."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for cell in cells:
        groups.setdefault((cell["dataset"], cell["policy"], cell["steps"], cell["batch_size"]), []).append(cell)
    rows = []
    for (dataset, policy, steps, batch_size), members in sorted(groups.items(), key=lambda item: tuple(map(str, item[0]))):
        scores = [c["normalized_score"] for c in members if c["normalized_score"] is not None]
        d4rl = [c["d4rl_score"] for c in members if c["d4rl_score"] is not None]
        row: dict[str, Any] = {
            "dataset": dataset, "policy": policy, "steps": steps, "batch_size": batch_size,
            "seeds": sorted(c["seed"] for c in members),
            "episodes_per_seed": members[0]["episodes"],
            "reference_source": members[0]["reference_source"],
        }
        row["score_mean"], row["score_std"] = _mean_std(scores)
        row["d4rl_score_mean"], row["d4rl_score_std"] = _mean_std(d4rl)
        row["return_mean"], _ = _mean_std([c["return_mean"] for c in members])
        late = [c["late_score"] for c in members if c.get("late_score") is not None]
        if late:
            row["late_score_mean"], row["late_score_std"] = _mean_std(late)
            row["late_seeds"] = len(late)
        flags: dict[str, list[int]] = {}
        for cell in members:
            for flag in cell["flags"]:
                flags.setdefault(flag, []).append(cell["seed"])
        if flags:
            row["flags"] = {flag: sorted(seeds) for flag, seeds in flags.items()}
        with_trials = [c["trials"] for c in members if "trials" in c]
        if with_trials:
            row["trials"] = {"n": with_trials[0]["n"], "seeds": len(with_trials)}
            for key in ("first", "last", "best_of_n"):
                mean, std = _mean_std([t[key] for t in with_trials if t[key] is not None])
                row["trials"][f"{key}_mean"], row["trials"][f"{key}_std"] = mean, std
        rows.append(row)
    return rows


@dataclass
class Grid:
    """What one invocation asks for, and how to price a cell's config."""

    runs_dir: Path
    policies: list[str]
    datasets: list[str]
    dataset_paths: dict[str, Path]
    seeds: list[int]
    args: argparse.Namespace
    history: CodeHistory = field(default_factory=CodeHistory)

    def cells(self) -> list[tuple[int, str, str]]:
        """(seed, dataset, policy), seed-major: a whole seed's grid is ready first."""
        return [(seed, dataset, policy) for seed in self.seeds for dataset in self.datasets for policy in self.policies]

    def config(self, seed: int, dataset: str, policy: str) -> dict[str, Any]:
        return cell_config(policy, dataset, self.dataset_paths, seed, self.args)

    def state(self, seed: int, dataset: str, policy: str, digest: str | None = None) -> CellState:
        run_dir = cell_dir(self.runs_dir, dataset, policy, seed)
        if digest is None:
            digest = cell_digest(self.config(seed, dataset, policy), run_dir, policy)
        return cell_state(run_dir, policy, digest, plays_trials(policy) and self.args.trials > 1, self.history)

    def states(self) -> tuple[list[dict[str, Any]], dict[tuple[str, str, int], CellState]]:
        """(the requested grid's status rows, the state of every requested or evaluated cell by (dataset, policy, seed))."""
        states, status = {}, []
        for seed, dataset, policy in self.cells():
            state = self.state(seed, dataset, policy)
            states[(dataset, policy, seed)] = state
            status.append({"dataset": dataset, "policy": policy, "seed": seed, "state": state.state, "flags": state.flags})
        for evaluation_path in sorted(self.runs_dir.glob(f"*/*/seed*/{EVAL_JSON}")):
            run_dir = evaluation_path.parent
            dataset, policy, seed = run_dir.parent.parent.name, run_dir.parent.name, int(run_dir.name.removeprefix("seed"))
            if (dataset, policy, seed) not in states:  # outside this grid: its config is not compared
                needs_trials = (run_dir / TRIALS_JSON).is_file()
                states[(dataset, policy, seed)] = cell_state(run_dir, policy, None, needs_trials, self.history)
        return status, states


def write_aggregate(record: RunRecord, results_dir: Path, grid: Grid) -> dict[str, Any]:
    status, states = grid.states()
    cells = collect_cells(grid.runs_dir, states, results_dir / f"{NAME}.json")
    datasets = {}
    for path in sorted(grid.runs_dir.glob(f"*/{DATASET_JSON}")):
        datasets[path.parent.name] = json.loads(path.read_text())
    order = column_order(grid.policies, [cell["policy"] for cell in cells])
    args = grid.args
    data = dict(record.data)
    data.update({
        "protocol": {
            "steps": args.steps, "batch_size": args.batch_size, "eval_episodes": args.eval_episodes,
            "trials": args.trials, "threads": args.threads, "quick": args.quick,
            "recipes": recipes_protocol(order),
            "target_return": "best episode return in the training data (eval.target_return=dataset_max)",
            "reported": "last evaluation (final checkpoint); mean ± std (ddof=0) over seeds of per-seed mean normalised score",
            "eval_every": args.eval_every,
            **({"late_score": "each seed's mean over its evaluations in the last half of training (steps >= "
                              f"{LATE_FRACTION:g} x steps, the final one included), mean ± std over seeds"}
               if args.eval_every else {}),
            "score_reference": "dataset reference returns (Minari convention); d4rl_score uses D4RL's",
            "trials_protocol": "multi-trial families: first trial, last trial and best of n trials played in one context (kinema.envs.trials)",
            "cell_records": "cell.json: sha256 of the resolved trainer config (canonical JSON, without "
                            f"{', '.join(UNHASHED)}) and the git commit the cell started at",
            "flags": {"unverified": "finished before cells recorded their config hash and commit",
                      "stale": "the family's code or the trainer changed after the cell's commit",
                      "config_changed": "the grid would now run another config (re-run on the next run)"},
        },
        "policies": [{"policy": policy, "family": family_of(policy), "label": policy_label(policy)} for policy in order],
        "table": aggregate(cells),
        "datasets": datasets,
        "cells": cells,
        "grid_status": status,
    })
    data["load_average_after"] = load_average()
    write_json(results_dir / f"{NAME}.json", data)
    return data


def print_summary(data: dict[str, Any]) -> None:
    rows = []
    labels = {entry["policy"]: entry["label"] for entry in data["policies"]}
    columns = list(labels)
    for row in sorted(data["table"], key=lambda r: (r["dataset"], columns.index(r["policy"]), str(r["steps"]))):
        score = "-" if row["score_mean"] is None else f"{row['score_mean']:.1f} ± {row['score_std']:.1f}"
        trials = row.get("trials")
        trial_text = "-" if not trials else (f"{trials['first_mean']} / {trials['last_mean']} / {trials['best_of_n_mean']}")
        flags = ", ".join(f"{flag} {seeds}" for flag, seeds in row.get("flags", {}).items()) or "-"
        rows.append([row["dataset"], labels.get(row["policy"], row["policy"]), row["steps"], len(row["seeds"]), score,
                     trial_text, flags])
    print_table(["dataset", "policy", "steps", "seeds", "score (last eval)", "trials first/last/best", "flags (seeds)"], rows)
    listed = {(c["dataset"], c["policy"], c["seed"]): c["state"] for c in data["cells"]}
    listed.update({(c["dataset"], c["policy"], c["seed"]): c["state"] for c in data["grid_status"]})
    by_state: dict[str, list[str]] = {}
    for (dataset, policy, seed), state in sorted(listed.items()):
        if state != "done":
            by_state.setdefault(state, []).append(f"{dataset}/{policy}/seed{seed}")
    for state, names in sorted(by_state.items()):
        print(f"{state}: {len(names)} cell(s): {', '.join(names)}")
    counts: dict[str, int] = {}
    for cell in data["grid_status"]:
        kind = CellState(cell["state"], cell.get("flags", [])).kind
        counts[kind] = counts.get(kind, 0) + 1
    print("grid:", ", ".join(f"{count} {state}" for state, count in sorted(counts.items())))


# -- command line ----------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> tuple[argparse.Namespace, Path]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--policies", default=",".join(DEFAULT_POLICIES),
                        help="registered policy families or grid variants (" + ", ".join(VARIANTS) + "), in column order")
    parser.add_argument("--datasets", default=",".join(DEFAULT_DATASETS), help="suite dataset names (or names given by --dataset-path)")
    parser.add_argument("--dataset-path", action="append", default=[], metavar="NAME=FILE",
                        help="train on FILE (D4RL HDF5 or Minari dir) under the grid name NAME; repeatable")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1")
    parser.add_argument("--seed-list", default=None, help="explicit comma-separated seeds (overrides --seeds)")
    parser.add_argument("--steps", type=int, default=5000, help="gradient steps per cell")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--eval-episodes", type=int, default=10)
    parser.add_argument("--trials", type=int, default=4, help="trials per context for multi-trial families (1 = skip)")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--eval-every", type=int, default=0,
                        help="also evaluate every N steps during training (--eval-episodes each, the same start states) "
                             "and report the late score, the mean over the last half of training (0 = final evaluation only)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: leave the other core to others)")
    parser.add_argument("--results-dir", type=Path, default=None,
                        help="where quality.json and quality_runs/ live (default: benchmarks/results/ in a checkout)")
    parser.add_argument("--status", action="store_true", help="only report the grid and rebuild quality.json")
    parser.add_argument("--rerun-stale", action="store_true",
                        help="also re-run finished cells that are stale (code changed since) or unverified (no config hash)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, batch 8, 2 episodes, 2 trials, 1 seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_episodes, args.trials, args.seeds, args.checkpoint_every = 4, 8, 2, 2, 1, 2
    require_positive(parser, args, ("steps", "batch_size", "eval_episodes", "trials", "seeds", "checkpoint_every", "threads"))
    if args.eval_every < 0:
        parser.error(f"--eval-every must be >= 0 (0 = final evaluation only), got {args.eval_every}")
    return args, results_dir_or_error(parser, args.results_dir)


def run_grid(record: RunRecord, results_dir: Path, grid: Grid) -> None:
    """Every unfinished cell in turn; with --rerun-stale, stale and unverified ones too."""
    cells = grid.cells()
    for index, (seed, dataset, policy) in enumerate(cells, start=1):
        run_dir = cell_dir(grid.runs_dir, dataset, policy, seed)
        label = f"[{index}/{len(cells)}] {dataset} / {policy} / seed {seed}"
        cfg = grid.config(seed, dataset, policy)
        digest = cell_digest(cfg, run_dir, policy)
        state = grid.state(seed, dataset, policy, digest)
        if state.finished and not (grid.args.rerun_stale and state.flags):
            continue
        if not claim(run_dir) and not (time.sleep(0.5) or claim(run_dir)):  # once more: another worker may only have probed it
            print(f"{label}: being trained by pid {lock_owner(run_dir) or '?'}, skipped", flush=True)
            continue
        try:
            state = grid.state(seed, dataset, policy, digest)  # another worker may have finished it meanwhile
            if state.finished and not (grid.args.rerun_stale and state.flags):
                continue
            describe_dataset(cfg, grid.runs_dir / dataset / DATASET_JSON)  # before anything of the cell is touched
            work_dir, why = prepare_cell(run_dir, policy, cfg, digest, state)
            print(f"{label}: starting" + (f" again: {why}" if why else ""), flush=True)
            outcome = run_cell(policy, run_dir, cfg, grid.args, work_dir)
            (run_dir / ERROR_TXT).unlink(missing_ok=True)
            print(f"{label}: {outcome}", flush=True)
        except Exception as error:  # one broken cell must not stop the grid; it is retried next time
            (run_dir / ERROR_TXT).write_text(traceback.format_exc())
            kept = " (its previous result is kept)" if (run_dir / RERUN_DIR).is_dir() and (run_dir / EVAL_JSON).is_file() else ""
            print(f"{label}: FAILED{kept}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        finally:
            release(run_dir)
        write_aggregate(record, results_dir, grid)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, results_dir = parse_args(argv)
    policies = csv_list(args.policies, "--policies")
    datasets = csv_list(args.datasets, "--datasets")
    dataset_paths = parse_dataset_paths(args.dataset_path)
    if args.dataset_path and args.datasets == ",".join(DEFAULT_DATASETS):
        datasets = list(dataset_paths)  # only the given files, unless --datasets says otherwise
    seeds = [int(s) for s in csv_list(args.seed_list, "--seed-list")] if args.seed_list else list(range(args.seeds))
    from kinema.policies import available_policies

    unknown = sorted({p for p in policies if family_of(p) not in available_policies()})
    if unknown:
        raise GridError(f"--policies: unknown policy {unknown}; available: {available_policies() + sorted(VARIANTS)}")

    runs_dir = results_dir / "quality_runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    gitignore = runs_dir / ".gitignore"
    if not gitignore.is_file() or gitignore.read_text() != RUNS_GITIGNORE:
        gitignore.write_text(RUNS_GITIGNORE)
    record = RunRecord(NAME, argv)
    grid = Grid(runs_dir, policies, datasets, dataset_paths, seeds, args)

    if not args.status:
        import torch

        original_threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            run_grid(record, results_dir, grid)
        finally:
            torch.set_num_threads(original_threads)

    data = write_aggregate(record, results_dir, grid)
    print_summary(data)
    print(f"wrote {results_dir / (NAME + '.json')}")
    return data


if __name__ == "__main__":
    main()
