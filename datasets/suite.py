"""kinema's benchmark dataset suite: D4RL's five datasets per task, regenerated from committed policies.

Nothing large is committed. ``datasets/behaviour_policies/<task>/`` holds the PPO actor
snapshots (safetensors + JSON) and ``datasets/suite.json`` the manifest: for every
dataset its size, seed, return statistics, reference returns, the sha256 of the file
that regeneration produced at the default size on the machine that built the manifest, and
a content digest of what kinema trains and evaluates from. ``ensure_suite_dataset``
regenerates a missing file into ``$KINEMA_DATA`` (default ``~/.cache/kinema/datasets``)
and refuses a file that matches neither (see ``verify_dataset_file``).

What regeneration reproduces exactly, and what not: the AVX-512 kernels of numpy, torch, MKL
and oneDNN round float arithmetic differently in the last bits from their AVX2 kernels, and
walker2d's dynamics amplify those bits until episodes change. So the suite is always generated
on the AVX2 code paths (``AVX2_CODE_PATHS``: an AVX-512 CPU generates in a child process with
the libraries' switches set). With the recorded library versions, observations, actions,
rewards, terminals, timeouts, next_observations (float32 / bool) and the metadata then come
out the same on every x86-64 CPU with AVX2. ``infos/qpos`` and ``infos/qvel`` are MuJoCo's
float64 state; should they differ in the last bits on some CPU, the file's sha256 differs
while every array a policy sees is identical: such a file is accepted by its content digest
(``verify_dataset_file``).

The datasets of a task (D4RL's protocol on Gymnasium MuJoCo v5):

- ``random``: uniform random actions.
- ``medium``: the PPO snapshot whose return is nearest a third of the expert's, actions
  sampled from its Gaussian.
- ``expert``: the best PPO snapshot, actions sampled.
- ``medium-replay``: D4RL stores the replay buffer of the learner up to medium. PPO is
  on-policy, so the faithful equivalent is the learner's own rollouts. Those cannot be
  regenerated from committed files exactly, so kinema rolls out the committed sequence of
  learner snapshots (one every 20,480 training steps, from the untrained policy up to
  the one before medium) in training order, each acting for an equal share of the
  transitions while episodes run on across the switches, as rollouts span PPO updates.
  At full size each snapshot acts for exactly its 20,480 training steps, so the file has
  as many transitions as the learner collected up to medium. The approximation: the
  policy changes every 5 PPO updates instead of every update, and the environment
  seeds differ from the training run's.
- ``medium-expert``: medium followed by expert (D4RL's concatenation).

Sizes: ``default`` is 200,000 transitions per collected dataset (medium-expert 400,000),
which regenerates the three-task suite in minutes on a 2-core CPU; ``full`` is D4RL's
1,000,000 (medium-replay: the learner's steps up to medium). Only the default size has
pinned checksums.

Reference returns (Minari's convention): ``ref_min_score`` / ``ref_max_score`` are the
mean returns of the random policy and of the expert policy over 100 episodes, measured
once per task when the manifest is built and stored in it; regeneration reuses them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import h5py
import numpy as np

from kinema.envs import get_task

from .behaviour import COMMITTED_POLICIES_DIR, committed_policies, load_committed_actor
from .collect import UniformRandomPolicy, collect, episode_returns
from .d4rl_io import _read_infos, _read_metadata, read_d4rl_hdf5, write_d4rl_hdf5
from .errors import DatasetError
from .store import OfflineDataset, concatenate

SUITE_FORMAT = "kinema-suite/1"
SUITE_MANIFEST = Path(__file__).resolve().parent / "suite.json"
EMBEDDED_DIR = Path(__file__).resolve().parent / "embedded"
SUITE_TASKS = ("hopper", "walker2d", "halfcheetah", "ant")
KINDS = ("random", "medium", "medium-replay", "expert", "medium-expert")
COLLECTED_KINDS = ("random", "medium", "medium-replay", "expert")
DEFAULT_TRANSITIONS = 200_000
FULL_TRANSITIONS = 1_000_000
SIZES = ("default", "full")
# Collection seeds per kind: different episodes in every dataset of a task.
COLLECTION_SEEDS = {"random": 0, "medium": 1, "medium-replay": 2, "expert": 3}
REFERENCE_EPISODES = 100
REFERENCE_SEEDS = {"random": 100, "expert": 101}
MANIFEST_NOTE = (
    "sha256 is of the file regenerated at the manifest's size on the machine that built it; content_sha256 covers "
    "the arrays kinema trains on and the metadata, identical on every CPU with the recorded libraries; infos/* "
    "(MuJoCo's float64 state) may differ across CPUs in the last bits and are checked against infos_sums"
)


def data_dir(directory: str | os.PathLike | None = None) -> Path:
    """Where suite datasets are cached: the argument, else $KINEMA_DATA, else ~/.cache/kinema/datasets."""
    if directory is not None:
        return Path(directory)
    return Path(os.environ.get("KINEMA_DATA") or Path.home() / ".cache" / "kinema" / "datasets")


def require_writable_dir(directory: Path, given: str | os.PathLike | None = None) -> None:
    """Create ``directory`` and check a file can be written there, or a DatasetError naming where it came from."""
    origin = "data_dir" if given is not None else ("$KINEMA_DATA" if os.environ.get("KINEMA_DATA") else "the default cache")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".kinema-write-check-"):
            pass
    except OSError as error:
        raise DatasetError(
            f"suite datasets go to {directory} ({origin}), which cannot be written: {error.strerror or error}; "
            "point KINEMA_DATA (or data_dir=) at a writable directory"
        ) from error


# ---------------------------------------------------------------------------------------
# The AVX2 code paths
# ---------------------------------------------------------------------------------------

# The AVX-512 kernels of numpy, torch (ATen), MKL and oneDNN round float arithmetic differently in the last bits from
# their AVX2 kernels, and walker2d's dynamics amplify those bits until episodes change. So the suite is generated on
# the AVX2 code paths on every x86 machine: an AVX-512 CPU generates in a child process with these switches set (each
# library reads its own when it loads).
AVX2_CODE_PATHS = {
    "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",  # numpy's AVX-512 dispatch targets
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}


def cpu_has_avx512() -> bool:
    """Whether this CPU has AVX-512 (numpy's hardware detection, which the switches above do not change)."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__
    except ImportError:  # another numpy layout: ask torch
        import torch

        return torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return bool(__cpu_features__.get("AVX512F"))


def on_avx2_code_paths() -> bool:
    """True when this process computes as an AVX2 CPU does: it has no AVX-512, or it started with AVX2_CODE_PATHS set."""
    return not cpu_has_avx512() or all(os.environ.get(key) == value for key, value in AVX2_CODE_PATHS.items())


def _call_on_avx2_code_paths(function: str, arguments: dict[str, Any], what: str) -> None:
    """Call this module's ``function(**arguments)`` (JSON arguments) in a child process on the AVX2 code paths."""
    code = f"import json, sys; from kinema.datasets import suite; suite.{function}(**json.loads(sys.argv[1]))"
    # The child imports what this process imports: same interpreter, same module search path.
    environment = {**os.environ, **AVX2_CODE_PATHS, "PYTHONPATH": os.pathsep.join(path for path in sys.path if path)}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(arguments)], env=environment)
    if done.returncode != 0:
        raise DatasetError(f"{what} failed in its child process on the AVX2 code paths (exit code {done.returncode}; "
                           f"its error is printed above); the child ran {sys.executable} with {AVX2_CODE_PATHS}")


def sha256_of_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_name(name: str) -> tuple[str, str]:
    """'hopper-medium-replay' -> ('hopper', 'medium-replay')."""
    for kind in sorted(KINDS, key=len, reverse=True):
        if name.endswith("-" + kind):
            return name[: -len(kind) - 1], kind
    raise DatasetError(f"{name!r} is not a suite dataset name; expected '<task>-<kind>' with kind one of {list(KINDS)}")


# ---------------------------------------------------------------------------------------
# The manifest
# ---------------------------------------------------------------------------------------


def load_manifest(path: str | os.PathLike | None = None) -> dict[str, Any]:
    path = Path(path) if path is not None else SUITE_MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: suite manifest not found")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: suite manifest is not valid JSON ({error})") from error
    for key in ("format", "tasks", "datasets"):
        if key not in manifest:
            raise DatasetError(f"{path}: suite manifest has no '{key}' key")
    if manifest["format"] != SUITE_FORMAT:
        raise DatasetError(f"{path}: suite manifest format is {manifest['format']!r}, expected {SUITE_FORMAT!r}")
    return manifest


def _write_manifest(manifest: dict[str, Any], path: Path) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, path)


def suite_names(manifest: dict[str, Any] | None = None) -> list[str]:
    return list((manifest or load_manifest())["datasets"])


def _entry(name: str, manifest: dict[str, Any], manifest_path: Path) -> dict[str, Any]:
    if name not in manifest["datasets"]:
        raise DatasetError(
            f"{name!r} is not in the suite manifest {manifest_path}; available: {', '.join(manifest['datasets']) or '(none)'}"
        )
    return manifest["datasets"][name]


def library_versions() -> dict[str, str]:
    """Versions, and the vector code path, that decide the bytes of a regenerated file (recorded in the manifest).

    ``cpu`` is torch's CPU capability in the generating process: AVX2 wherever the suite is generated
    (``AVX2_CODE_PATHS``)."""
    import gymnasium
    import h5py
    import mujoco
    import torch

    return {
        "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__, "numpy": np.__version__,
        "torch": torch.__version__, "h5py": h5py.version.version, "hdf5": h5py.version.hdf5_version,
        "python": ".".join(map(str, sys.version_info[:2])), "cpu": torch.backends.cpu.get_cpu_capability(),
    }


def generating_libraries() -> dict[str, str]:
    """library_versions() as a generation started here sees them (AVX2 when it runs in a child on the AVX2 code paths)."""
    return library_versions() if on_avx2_code_paths() else {**library_versions(), "cpu": "AVX2"}


# ---------------------------------------------------------------------------------------
# Regeneration
# ---------------------------------------------------------------------------------------


def transitions_for(kind: str, size: str | int, policies: dict[str, Any]) -> int:
    """Transitions one collected dataset gets at ``size`` ("default", "full", or a number)."""
    if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
        if size < 1:
            raise ValueError(f"size must be 'default', 'full' or a positive number of transitions, got {size}")
        return int(size)
    if size == "default":
        return DEFAULT_TRANSITIONS
    if size == "full":
        if kind == "medium-replay":
            return int(policies["medium"]["steps"])  # what the learner collected up to medium
        return FULL_TRANSITIONS
    raise ValueError(f"size must be one of {list(SIZES)} or a positive number of transitions, got {size!r}")


def _replay_schedule(task: str, policies: dict[str, Any], transitions: int, directory: Path | None) -> list[tuple[int, Any]]:
    """Equal shares of ``transitions`` for the replay snapshots, in training order."""
    snapshots = policies["replay"]
    if not snapshots:
        raise DatasetError(f"{task}: the committed policies list no replay snapshots (medium at step 0?)")
    count = len(snapshots)
    starts = [round(i * transitions / count) for i in range(count)]
    schedule, seen = [], set()
    for start, snapshot in zip(starts, snapshots):
        if start in seen:
            continue  # fewer transitions than snapshots: later snapshots only
        seen.add(start)
        schedule.append((start, load_committed_actor(task, snapshot["snapshot"], directory)))
    return schedule


def _dataset_metadata(name: str, task: str, kind: str, size: str | int, refs: dict[str, Any], policies: dict[str, Any] | None,
                      seed: int) -> dict[str, Any]:
    spec = get_task(task)
    metadata: dict[str, Any] = {
        "dataset_name": name, "kind": kind, "size": str(size), "collection_seed": seed,
        "suite_format": SUITE_FORMAT,
        "ref_min_score": refs["ref_min_score"], "ref_max_score": refs["ref_max_score"],
        "ref_episodes": REFERENCE_EPISODES,
        "d4rl_ref_min": spec.d4rl_ref_min, "d4rl_ref_max": spec.d4rl_ref_max,
    }
    if kind == "random":
        metadata.update(algorithm="uniform-random", behaviour_training_steps=0)
    else:
        metadata.update(algorithm=policies["algorithm"], behaviour_training_seed=policies["training_seed"],
                        behaviour_recipe=policies["recipe"], actions="sampled from the policy's Gaussian")
        if kind == "medium-replay":
            metadata["behaviour_training_steps"] = [s["steps"] for s in policies["replay"]]
        elif kind == "medium-expert":
            metadata["behaviour_training_steps"] = [policies["medium"]["steps"], policies["expert"]["steps"]]
        else:
            metadata["behaviour_training_steps"] = policies[kind]["steps"]
    return metadata


def generate_dataset(
    name: str,
    size: str | int = "default",
    refs: dict[str, Any] | None = None,
    manifest: dict[str, Any] | None = None,
    policies_dir: str | os.PathLike | None = None,
    progress: bool = False,
    part_loader: Callable[[str], OfflineDataset] | None = None,
) -> OfflineDataset:
    """Build suite dataset ``name`` in memory from the committed behaviour policies.

    ``refs`` (ref_min_score / ref_max_score) default to the manifest's values for the
    task. ``part_loader`` supplies medium and expert for medium-expert (default: generate
    them here too).
    """
    task, kind = split_name(name)
    if refs is None:
        manifest = manifest or load_manifest()
        if task not in manifest["tasks"]:
            raise DatasetError(f"task {task!r} has no reference returns in the suite manifest; build the manifest first")
        refs = manifest["tasks"][task]
    directory = Path(policies_dir) / task if policies_dir is not None else None
    policies = committed_policies(task, directory) if kind != "random" else None
    if kind == "medium-expert":
        load = part_loader or (lambda part: generate_dataset(part, size, refs, manifest, policies_dir, progress))
        parts = [load(f"{task}-medium"), load(f"{task}-expert")]
        metadata = _dataset_metadata(name, task, kind, size, refs, policies, seed=-1)
        metadata.update(collection_seed=[COLLECTION_SEEDS["medium"], COLLECTION_SEEDS["expert"]], task=task, env_id=get_task(task).gym_id, max_episode_steps=get_task(task).max_episode_steps)
        return concatenate(parts, metadata=metadata)
    seed = COLLECTION_SEEDS[kind]
    transitions = transitions_for(kind, size, policies or {})
    if kind == "random":
        behaviour: Any = UniformRandomPolicy.for_task(task)
    elif kind == "medium-replay":
        behaviour = _replay_schedule(task, policies, transitions, directory)
    else:
        behaviour = load_committed_actor(task, policies[kind]["snapshot"], directory)
    metadata = _dataset_metadata(name, task, kind, size, refs, policies, seed)
    return collect(task, behaviour, transitions, seed=seed, metadata=metadata, progress=progress, source=name)


def dataset_path(name: str, size: str | int = "default", directory: str | os.PathLike | None = None) -> Path:
    suffix = "" if size == "default" else f"-{size}"
    return data_dir(directory) / f"{name}{suffix}.hdf5"


# ---------------------------------------------------------------------------------------
# Verification
# ---------------------------------------------------------------------------------------

# The arrays kinema trains and evaluates from, in the order the content digest takes them.
CONTENT_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations")
# infos/* are compared by per-column sums: a column's sum and abs-sum must be within this
# share of its recorded abs-sum. Measured between AVX2 and AVX-512 on the embedded slice of
# hopper-medium-replay: values differ by up to 4e-14 (4e-11 relative, near zero), column sums
# by 3e-16 of the abs-sum. Hashing infos rounded to float32 instead would not be robust: a last-bit
# difference still flips a float32 rounding now and then.
INFOS_RTOL = 1e-9


def _part_digest(header: str, payload: bytes = b"") -> str:
    return hashlib.sha256(header.encode() + b"\n" + payload).hexdigest()


def _array_digest(key: str, array: np.ndarray | None) -> str:
    if array is None:
        return _part_digest(f"{key} absent")
    little_endian = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return _part_digest(f"{key} {little_endian.dtype.str} {list(array.shape)}", little_endian.tobytes())


def _column_sums(array: np.ndarray) -> dict[str, Any]:
    columns = np.asarray(array, dtype=np.float64).reshape(len(array), -1)
    return {"dtype": array.dtype.str, "shape": list(array.shape),
            "sum": columns.sum(axis=0).tolist(), "abs_sum": np.abs(columns).sum(axis=0).tolist()}


def _fingerprint(path: Path) -> tuple[dict[str, Any], int]:
    """The manifest's content record of the file at ``path``, and its number of transitions."""
    with h5py.File(path, "r") as file:
        arrays = {key: file[key][()] if key in file else None for key in CONTENT_KEYS}
        infos = _read_infos(file["infos"], str(path)) if "infos" in file else {}
        metadata = _read_metadata(file["metadata"]) if "metadata" in file else {}
    parts = {key: _array_digest(key, arrays[key]) for key in CONTENT_KEYS}
    parts["metadata"] = _part_digest("metadata", json.dumps(metadata, sort_keys=True, separators=(",", ":")).encode())
    record = {
        "content_sha256": _part_digest("".join(f"{key} {digest}\n" for key, digest in parts.items())),
        "content_parts": parts,
        "infos_sums": {key: _column_sums(value) for key, value in sorted(infos.items())},
    }
    observations = arrays["observations"]
    return record, len(observations) if observations is not None else 0


def content_record(path: str | os.PathLike) -> dict[str, Any]:
    """What the manifest records of a dataset file besides its sha256.

    ``content_sha256``: one digest of the arrays in CONTENT_KEYS as stored (name, dtype,
    shape and bytes of each, in that order) and of the metadata (canonical JSON);
    ``content_parts``: the digest of each of those, to say which one differs;
    ``infos_sums``: dtype, shape and per-column sum and abs-sum of every ``infos/*`` array.
    """
    return _fingerprint(Path(path))[0]


def _infos_differences(recorded: dict[str, Any], actual: dict[str, Any]) -> list[str]:
    problems = []
    for key in sorted(set(recorded) | set(actual)):
        if key not in actual or key not in recorded:
            problems.append(f"infos/{key} is {'missing from the file' if key not in actual else 'not in the manifest'}")
            continue
        want, got = recorded[key], actual[key]
        if (want["dtype"], want["shape"]) != (got["dtype"], got["shape"]):
            problems.append(f"infos/{key} is {got['dtype']} {tuple(got['shape'])}, expected {want['dtype']} {tuple(want['shape'])}")
            continue
        scale = np.asarray(want["abs_sum"])
        for what in ("sum", "abs_sum"):
            off = ~(np.abs(np.asarray(got[what]) - np.asarray(want[what])) <= INFOS_RTOL * scale)  # NaN is off
            for column in np.flatnonzero(off)[:3]:
                problems.append(f"infos/{key} column {column} {what} is {got[what][column]!r}, expected {want[what][column]!r} "
                                f"(tolerance {INFOS_RTOL:g} of the column's abs-sum)")
    return problems


def _content_mismatch(path: Path, entry: dict[str, Any]) -> str | None:
    """None when the file's content matches the manifest entry, else what differs (with both digests)."""
    expected = entry.get("content_sha256")
    if expected is None:
        return "the manifest records no content digest for it, so only the file's sha256 can be checked"
    try:
        record, transitions = _fingerprint(path)
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as error:
        # h5py reports truncated or corrupt files as OSError/RuntimeError/KeyError.
        return (f"its content cannot be read as a D4RL-layout HDF5 file (truncated or corrupt?): {error}; "
                f"the manifest's content digest is {expected}")
    problems = []
    if transitions != entry.get("transitions", transitions):
        problems.append(f"it has {transitions:,} transitions, expected {entry['transitions']:,}")
    recorded_parts = entry.get("content_parts", {})
    problems += [f"{key} differ{'s' if key == 'metadata' else ''}" for key, digest in record["content_parts"].items()
                 if recorded_parts.get(key) not in (None, digest)]
    if record["content_sha256"] != expected and not problems:
        problems.append("the content digest differs")
    problems += _infos_differences(entry.get("infos_sums", {}), record["infos_sums"])
    if not problems:
        return None
    return f"its content digest is {record['content_sha256']}, the manifest's {expected}: {'; '.join(problems)}"


def verify_dataset_file(path: Path, entry: dict[str, Any], name: str, manifest_path: Path, regenerated: bool) -> str:
    """Which check the file at ``path`` passes against its manifest ``entry``, else DatasetError.

    "sha256": the file is the one the manifest was built from, bit for bit. "content": its
    sha256 differs, but the arrays kinema trains and evaluates from and the metadata have
    the manifest's content digest, and ``infos/*`` are within INFOS_RTOL of the recorded
    sums (the file was regenerated on a CPU whose float64 arithmetic differs in the last
    bits). The error names the file, both digests of each kind and what differs.
    """
    actual = sha256_of_file(path)
    expected = entry["sha256"]
    if actual == expected:
        return "sha256"
    mismatch = _content_mismatch(path, entry)
    if mismatch is None:
        return "content"
    if regenerated:
        raise DatasetError(
            f"{path}: regenerated {name} has sha256 {actual}, but the suite manifest {manifest_path} expects {expected}; "
            f"{mismatch}. Regeneration is deterministic only with the library versions and the vector code path the "
            f"manifest records for it ({entry.get('libraries', 'under libraries')}; yours: {generating_libraries()}); "
            "the file was kept for inspection."
        )
    raise DatasetError(
        f"{path}: sha256 {actual} does not match the suite manifest {manifest_path} for {name} (expected {expected}); "
        f"{mismatch}. The file was modified or truncated (or made with other libraries or another vector code path than "
        f"the manifest's 'libraries'): delete it and kinema regenerates it on next use."
    )


def ensure_suite_dataset(
    name: str,
    data_dir: str | os.PathLike | None = None,
    size: str = "default",
    manifest_path: str | os.PathLike | None = None,
    progress: bool = True,
    policies_dir: str | os.PathLike | None = None,
) -> Path:
    """Path of suite dataset ``name``, regenerated first if absent; verified against the manifest.

    Accepted when its sha256 matches, or its content digest does with infos/* within
    tolerance (``verify_dataset_file``; the second case is reported on stderr). Raises
    DatasetError naming the file, both digests and what differs otherwise. Full-size
    files have no pinned checksum and are not verified.
    """
    manifest_path = Path(manifest_path) if manifest_path is not None else SUITE_MANIFEST
    manifest = load_manifest(manifest_path)
    entry = _entry(name, manifest, manifest_path)
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    path = dataset_path(name, size, data_dir)
    regenerated = False
    if not path.exists():
        require_writable_dir(path.parent, data_dir)  # before minutes of collection, not after
        regenerated = True
        estimate = entry.get("regeneration_s")
        note = ""
        if estimate and size == "default":
            note = f", about {estimate:.0f} s" if estimate < 90 else f", about {estimate / 60:.0f} min"
            note += " on a 2-core CPU"
        print(f"kinema: generating {name} ({size} size) into {path}{note}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        arguments = {"name": name, "path": str(path), "data_dir": None if data_dir is None else str(data_dir), "size": size,
                     "manifest_path": str(manifest_path), "progress": progress,
                     "policies_dir": None if policies_dir is None else str(policies_dir)}
        if on_avx2_code_paths():
            _generate_file(**arguments)
        else:
            _call_on_avx2_code_paths("_generate_file", arguments, f"generating {name}")
        print(f"kinema: generated {name} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    if size == "default":
        check = verify_dataset_file(path, entry, name, manifest_path, regenerated)
        if check == "content":
            print(f"kinema: {name}: verified by content digest {entry['content_sha256'][:12]} (the arrays kinema trains on "
                  f"and the metadata are the manifest's; float64 infos/* within {INFOS_RTOL:g} of its sums); the file's "
                  f"sha256 differs from the manifest's {entry['sha256'][:12]}, as expected on a CPU whose float64 "
                  f"arithmetic differs from the building machine's", file=sys.stderr, flush=True)
    return path


def _generate_file(name: str, path: str, data_dir: str | None, size: str, manifest_path: str, progress: bool,
                   policies_dir: str | None) -> None:
    """Generate suite dataset ``name`` into ``path`` (medium-expert: from its verified parts)."""
    manifest = load_manifest(manifest_path)

    def part(part_name: str) -> OfflineDataset:
        return read_d4rl_hdf5(ensure_suite_dataset(part_name, data_dir, size, manifest_path, progress, policies_dir))

    # "default" means the size the manifest was built at (200,000 for the shipped one).
    generation_size = manifest.get("size", "default") if size == "default" else size
    dataset = generate_dataset(name, generation_size, manifest=manifest, policies_dir=policies_dir, progress=progress,
                               part_loader=part)
    write_d4rl_hdf5(dataset, path)


def load_suite_dataset(name: str, data_dir: str | os.PathLike | None = None, size: str = "default") -> OfflineDataset:
    return read_d4rl_hdf5(ensure_suite_dataset(name, data_dir, size))


# ---------------------------------------------------------------------------------------
# Building the manifest (maintainers: after training / exporting behaviour policies)
# ---------------------------------------------------------------------------------------


def reference_scores(task: str, policies_dir: str | os.PathLike | None = None, episodes: int = REFERENCE_EPISODES) -> dict[str, Any]:
    """Minari-style reference returns of a task: random and expert policy, ``episodes`` each."""
    spec = get_task(task)
    directory = Path(policies_dir) / task if policies_dir is not None else None
    policies = committed_policies(task, directory)
    random_returns = episode_returns(task, UniformRandomPolicy.for_task(task), episodes, seed=REFERENCE_SEEDS["random"])
    expert = load_committed_actor(task, policies["expert"]["snapshot"], directory)
    expert_returns = episode_returns(task, expert, episodes, seed=REFERENCE_SEEDS["expert"])
    return {
        "ref_min_score": float(random_returns.mean()), "ref_max_score": float(expert_returns.mean()),
        "random_return_std": float(random_returns.std()), "expert_return_std": float(expert_returns.std()),
        "ref_episodes": episodes, "ref_seeds": REFERENCE_SEEDS,
        "d4rl_ref_min": spec.d4rl_ref_min, "d4rl_ref_max": spec.d4rl_ref_max,
        "expert_snapshot": policies["expert"]["snapshot"],
    }


def _behaviour_summary(task: str, policies: dict[str, Any]) -> dict[str, Any]:
    return {
        "expert_snapshot": policies["expert"]["snapshot"], "expert_steps": policies["expert"]["steps"],
        "medium_snapshot": policies["medium"]["snapshot"], "medium_steps": policies["medium"]["steps"],
        "replay_snapshots": len(policies["replay"]), "behaviour_trained_steps": policies.get("trained_steps"),
        "behaviour_training_wall_time_s": policies.get("training_wall_time_s"),
        "behaviour_policies": f"behaviour_policies/{task}/policies.json",
    }


def build_manifest(
    tasks: list[str] | None = None,
    directory: str | os.PathLike | None = None,
    manifest_path: str | os.PathLike | None = None,
    size: str | int = "default",
    policies_dir: str | os.PathLike | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Regenerate the datasets of ``tasks`` and record their statistics and checksums.

    Existing reference returns are reused while the task's expert snapshot is unchanged.
    Other tasks' entries in the manifest are kept. On an AVX-512 CPU the build runs in a child
    process on the AVX2 code paths (``AVX2_CODE_PATHS``), which logs with print.
    """
    manifest_path = Path(manifest_path) if manifest_path is not None else SUITE_MANIFEST
    manifest = load_manifest(manifest_path) if manifest_path.exists() else {"format": SUITE_FORMAT, "tasks": {}, "datasets": {}}
    policies_root = Path(policies_dir) if policies_dir is not None else COMMITTED_POLICIES_DIR
    tasks = tasks or [t for t in SUITE_TASKS if (policies_root / t / "policies.json").is_file()]
    if not tasks:
        raise FileNotFoundError(f"{policies_root}: no committed behaviour policies; train and export them first")
    if not on_avx2_code_paths():
        arguments = {"tasks": list(tasks), "directory": None if directory is None else str(directory),
                     "manifest_path": str(manifest_path), "size": size,
                     "policies_dir": None if policies_dir is None else str(policies_dir)}
        _call_on_avx2_code_paths("build_manifest", arguments, "building the suite manifest")
        return load_manifest(manifest_path)
    # Top-level libraries: the last build's; each dataset records its own below, since a task rebuilt
    # later may come from other library versions.
    manifest["libraries"] = library_versions()
    manifest.update(default_transitions=DEFAULT_TRANSITIONS, full_transitions=FULL_TRANSITIONS, note=MANIFEST_NOTE)
    manifest["size"] = size
    for task in tasks:
        previous = manifest["tasks"].get(task)
        policies = committed_policies(task, policies_root / task)
        if previous is None or previous.get("expert_snapshot") != policies["expert"]["snapshot"]:
            log(f"[{task}] measuring reference returns ({REFERENCE_EPISODES} episodes each of random and expert)")
            manifest["tasks"][task] = reference_scores(task, policies_root if policies_dir is not None else None)
        manifest["tasks"][task].update(_behaviour_summary(task, policies))
        refs = manifest["tasks"][task]
        generated: dict[str, OfflineDataset] = {}
        for kind in KINDS:
            name = f"{task}-{kind}"
            start = time.perf_counter()
            dataset = generate_dataset(
                name, size, refs=refs, manifest=manifest, policies_dir=policies_dir, progress=True,
                part_loader=lambda part: generated[part],
            )
            path = dataset_path(name, "default", directory)  # the manifest's size is its default
            write_d4rl_hdf5(dataset, path)
            elapsed = time.perf_counter() - start
            if kind == "medium-expert":
                elapsed += manifest["datasets"][f"{task}-medium"]["regeneration_s"] + manifest["datasets"][f"{task}-expert"]["regeneration_s"]
            generated[name] = read_d4rl_hdf5(path)
            summary = dataset.summary()
            manifest["datasets"][name] = {
                "task": task, "kind": kind, "transitions": summary["transitions"], "episodes": summary["episodes"],
                "return_mean": summary["return_mean"], "return_std": summary["return_std"],
                "return_min": summary["return_min"], "return_max": summary["return_max"],
                "terminals": summary["terminals"], "timeouts": summary["timeouts"],
                "ref_min_score": refs["ref_min_score"], "ref_max_score": refs["ref_max_score"],
                "normalized_return_mean": 100.0 * (summary["return_mean"] - refs["ref_min_score"]) / (refs["ref_max_score"] - refs["ref_min_score"]),
                "d4rl_ref_min": refs["d4rl_ref_min"], "d4rl_ref_max": refs["d4rl_ref_max"],
                "behaviour_training_steps": dataset.metadata["behaviour_training_steps"],
                "collection_seed": dataset.metadata["collection_seed"],
                "size_bytes": path.stat().st_size, "regeneration_s": round(elapsed, 1),
                "sha256": sha256_of_file(path), **content_record(path), "libraries": library_versions(),
            }
            log(f"[{name}] {summary['transitions']} transitions, {summary['episodes']} episodes, "
                f"return {summary['return_mean']:.1f} [{summary['return_min']:.1f}, {summary['return_max']:.1f}], {elapsed:.0f} s")
        _write_manifest(manifest, manifest_path)
    ordered = {f"{t}-{k}": manifest["datasets"][f"{t}-{k}"] for t in SUITE_TASKS for k in KINDS if f"{t}-{k}" in manifest["datasets"]}
    manifest["datasets"] = ordered
    _write_manifest(manifest, manifest_path)
    return manifest


# ---------------------------------------------------------------------------------------
# The embedded default dataset
# ---------------------------------------------------------------------------------------

EMBEDDED_SOURCE = "hopper-medium-replay"
EMBEDDED_NAME = "hopper-medium-replay-slice"
EMBEDDED_EVERY_NTH_EPISODE = 5


def embedded_dataset_path() -> Path:
    return EMBEDDED_DIR / f"{EMBEDDED_NAME}.hdf5"


def make_embedded_dataset(
    source_path: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    every_nth_episode: int = EMBEDDED_EVERY_NTH_EPISODE,
    manifest_path: str | os.PathLike | None = None,
    directory: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Every n-th episode of hopper-medium-replay (so the slice still spans random to
    medium), written gzip-compressed; recorded in the manifest under 'embedded'."""
    manifest_path = Path(manifest_path) if manifest_path is not None else SUITE_MANIFEST
    source_path = Path(source_path) if source_path is not None else ensure_suite_dataset(EMBEDDED_SOURCE, directory, manifest_path=manifest_path)
    output = Path(output) if output is not None else embedded_dataset_path()
    source = read_d4rl_hdf5(source_path)
    selected = source.select_episodes(np.arange(0, source.num_episodes, every_nth_episode))
    metadata = dict(source.metadata)
    metadata.update(dataset_name=EMBEDDED_NAME, slice_of=EMBEDDED_SOURCE, slice_rule=f"every {every_nth_episode}th episode",
                    slice_source_sha256=sha256_of_file(source_path))
    sliced = OfflineDataset(
        observations=selected.observations, actions=selected.actions, rewards=selected.rewards,
        terminals=selected.terminals, timeouts=selected.timeouts, next_observations=selected.next_observations,
        infos=selected.infos, metadata=metadata, source=EMBEDDED_NAME,
    )
    write_d4rl_hdf5(sliced, output, compression="gzip")
    summary = sliced.summary()
    record = {"file": f"embedded/{output.name}", "slice_of": EMBEDDED_SOURCE, "slice_rule": metadata["slice_rule"],
              **{key: summary[key] for key in ("transitions", "episodes", "return_mean", "return_min", "return_max")},
              "size_bytes": output.stat().st_size, "sha256": sha256_of_file(output), **content_record(output)}
    manifest = load_manifest(manifest_path)
    manifest["embedded"] = record
    _write_manifest(manifest, manifest_path)
    return record


def describe_suite(manifest: dict[str, Any] | None = None, directory: str | os.PathLike | None = None) -> str:
    """The table ``kinema-collect --list`` prints."""
    manifest = manifest or load_manifest()
    lines = [f"{'dataset':<28} {'transitions':>11} {'episodes':>8} {'return mean':>11} {'[min, max]':>20} {'normalised':>10}  cached"]
    for name, entry in manifest["datasets"].items():
        cached = "yes" if dataset_path(name, "default", directory).exists() else "no"
        span = f"[{entry['return_min']:.0f}, {entry['return_max']:.0f}]"
        lines.append(f"{name:<28} {entry['transitions']:>11,} {entry['episodes']:>8,} {entry['return_mean']:>11.1f} {span:>20} "
                     f"{entry['normalized_return_mean']:>10.1f}  {cached}")
    lines.append(f"cache: {data_dir(directory)} (set KINEMA_DATA to move it); regenerate with kinema-collect dataset=<name>")
    return "\n".join(lines)
