"""The benchmark suite: deterministic regeneration, verification against the manifest, the shipped suite."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from kinema.datasets.behaviour import _make_training_env, _new_model, committed_policies, load_committed_actor, save_actor
from kinema.datasets.d4rl_io import read_d4rl_hdf5, write_d4rl_hdf5
from kinema.datasets.errors import DatasetError
from kinema.datasets import suite
from kinema.datasets.suite import (
    AVX2_CODE_PATHS, INFOS_RTOL, KINDS, SUITE_MANIFEST, build_manifest, content_record, embedded_dataset_path,
    ensure_suite_dataset, generate_dataset, load_manifest, on_avx2_code_paths, sha256_of_file, verify_dataset_file,
)
from kinema.envs import get_task

SMALL = 300  # transitions per collected dataset in these tests
MANIFEST_KEYS = ("transitions", "episodes", "return_mean", "return_min", "return_max", "ref_min_score", "ref_max_score", "sha256",
                 "content_sha256", "content_parts", "infos_sums")


@pytest.fixture(scope="module")
def policies_root(tmp_path_factory) -> Path:
    """Committed-style hopper policies from four untrained PPO learners: replay 0 and 4096, medium, expert."""
    root = tmp_path_factory.mktemp("policies")
    directory = root / "hopper"
    names = {}
    for seed, steps in enumerate((0, 4096, 8192, 12288)):
        vec_env = _make_training_env(get_task("hopper"), seed)
        vec_env.reset()
        for _ in range(10):
            vec_env.step(np.stack([vec_env.action_space.sample() for _ in range(vec_env.num_envs)]))
        names[steps] = f"step_{steps:09d}"
        save_actor(_new_model(vec_env, seed), vec_env, directory / names[steps],
                   {"task": "hopper", "training_steps": steps, "training_seed": 0})
    manifest = {
        "task": "hopper", "algorithm": "PPO (stable-baselines3)", "recipe": {"n_steps": 512}, "training_seed": 0,
        "expert": {"steps": 12288, "snapshot": names[12288]}, "medium": {"steps": 8192, "snapshot": names[8192]},
        "replay": [{"steps": 0, "snapshot": names[0]}, {"steps": 4096, "snapshot": names[4096]}],
    }
    (directory / "policies.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture(scope="module")
def small_suite(policies_root, tmp_path_factory) -> tuple[Path, Path]:
    """A manifest built at SMALL transitions, and the cache it was built in."""
    work = tmp_path_factory.mktemp("suite")
    manifest_path = work / "suite.json"
    build_manifest(["hopper"], work / "built", manifest_path, size=SMALL, policies_dir=policies_root, log=lambda line: None)
    return manifest_path, work / "built"


def test_manifest_records_every_dataset(small_suite) -> None:
    manifest = load_manifest(small_suite[0])
    assert list(manifest["datasets"]) == [f"hopper-{kind}" for kind in KINDS]
    for name, entry in manifest["datasets"].items():
        for key in MANIFEST_KEYS:
            assert key in entry, (name, key)
        assert len(entry["sha256"]) == 64 and len(entry["content_sha256"]) == 64
        assert entry["infos_sums"]["qpos"]["dtype"] == "<f8" and len(entry["infos_sums"]["qvel"]["sum"]) == 6
    assert manifest["datasets"]["hopper-medium-expert"]["transitions"] == 2 * SMALL
    # Built on the AVX2 code paths, also on an AVX-512 CPU (torch's capability in the building process).
    assert not manifest["libraries"]["cpu"].startswith("AVX512")
    refs = manifest["tasks"]["hopper"]
    assert refs["ref_episodes"] == 100 and refs["d4rl_ref_max"] == 3234.3
    assert manifest["datasets"]["hopper-medium"]["ref_max_score"] == refs["ref_max_score"]


def test_regeneration_is_deterministic(small_suite, policies_root, tmp_path) -> None:
    manifest_path, built = small_suite
    for name in ("hopper-random", "hopper-medium-replay", "hopper-medium-expert"):
        path = ensure_suite_dataset(name, tmp_path / "fresh", manifest_path=manifest_path, progress=False,
                                    policies_dir=policies_root)
        assert path.read_bytes() == (built / f"{name}.hdf5").read_bytes()
        assert sha256_of_file(path) == load_manifest(manifest_path)["datasets"][name]["sha256"]
    replay = read_d4rl_hdf5(tmp_path / "fresh" / "hopper-medium-replay.hdf5")
    assert replay.metadata["behaviour_training_steps"] == [0, 4096]
    assert replay.metadata["ref_min_score"] == load_manifest(manifest_path)["tasks"]["hopper"]["ref_min_score"]
    assert set(replay.infos) == {"qpos", "qvel"}
    # medium-expert is medium followed by expert.
    both = read_d4rl_hdf5(tmp_path / "fresh" / "hopper-medium-expert.hdf5")
    medium = read_d4rl_hdf5(tmp_path / "fresh" / "hopper-medium.hdf5")
    np.testing.assert_array_equal(both.observations[:SMALL], medium.observations)


def _as_if_avx512(monkeypatch) -> None:
    """This process counts as an AVX-512 CPU without the AVX2 switches, whatever the CPU."""
    monkeypatch.setattr(suite, "cpu_has_avx512", lambda: True)
    for key in AVX2_CODE_PATHS:
        monkeypatch.delenv(key, raising=False)


def test_avx2_code_paths_are_recognised(monkeypatch) -> None:
    _as_if_avx512(monkeypatch)
    assert not on_avx2_code_paths()
    for key, value in AVX2_CODE_PATHS.items():
        monkeypatch.setenv(key, value)
    assert on_avx2_code_paths()
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")  # one library still on its AVX-512 kernels
    assert not on_avx2_code_paths()
    monkeypatch.setattr(suite, "cpu_has_avx512", lambda: False)
    assert on_avx2_code_paths()


def test_an_avx512_cpu_generates_on_the_avx2_code_paths_in_a_child(small_suite, policies_root, tmp_path, monkeypatch) -> None:
    manifest_path, built = small_suite
    _as_if_avx512(monkeypatch)

    def in_this_process(**arguments) -> None:
        raise AssertionError("generated in the AVX-512 process")

    monkeypatch.setattr(suite, "_generate_file", in_this_process)
    path = ensure_suite_dataset("hopper-medium-expert", tmp_path / "cache", manifest_path=manifest_path, progress=False,
                                policies_dir=policies_root)
    assert sha256_of_file(path) == load_manifest(manifest_path)["datasets"]["hopper-medium-expert"]["sha256"]
    assert (tmp_path / "cache" / "hopper-medium.hdf5").is_file()  # its parts, generated in the child
    with pytest.raises(DatasetError, match=r"generating hopper-medium failed in its child process on the AVX2 code paths "
                                           r"\(exit code 1"):
        ensure_suite_dataset("hopper-medium", tmp_path / "other", manifest_path=manifest_path, progress=False,
                             policies_dir=tmp_path / "no-policies")
    assert not (tmp_path / "other" / "hopper-medium.hdf5").exists()


def test_a_tampered_file_is_refused(small_suite, tmp_path) -> None:
    manifest_path, built = small_suite
    cache = tmp_path / "cache"
    cache.mkdir()
    path = cache / "hopper-random.hdf5"
    shutil.copyfile(built / "hopper-random.hdf5", path)
    assert ensure_suite_dataset("hopper-random", cache, manifest_path=manifest_path) == path
    with h5py.File(path, "r+") as file:
        file["rewards"][0] = file["rewards"][0] + 1.0
    expected = load_manifest(manifest_path)["datasets"]["hopper-random"]["sha256"]
    with pytest.raises(DatasetError) as error:
        ensure_suite_dataset("hopper-random", cache, manifest_path=manifest_path)
    message = str(error.value)
    assert str(path) in message and expected in message and sha256_of_file(path) in message
    assert "does not match" in message and "delete it" in message
    entry = load_manifest(manifest_path)["datasets"]["hopper-random"]
    assert entry["content_sha256"] in message and content_record(path)["content_sha256"] in message
    assert "rewards differ" in message and "observations differ" not in message
    path.unlink()  # deleting it is the cure: regenerated, verified
    assert sha256_of_file(ensure_suite_dataset("hopper-random", cache, manifest_path=manifest_path)) == expected


def test_regeneration_that_differs_from_the_manifest_is_reported(small_suite, tmp_path) -> None:
    manifest = load_manifest(small_suite[0])
    entry = manifest["datasets"]["hopper-random"]
    entry["sha256"] = entry["content_sha256"] = entry["content_parts"]["actions"] = "0" * 64
    manifest_path = tmp_path / "suite.json"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="regenerated hopper-random has sha256 .*actions differ.* library versions"):
        ensure_suite_dataset("hopper-random", tmp_path / "cache", manifest_path=manifest_path, progress=False)
    with pytest.raises(DatasetError, match="'hopper-nope' is not in the suite manifest"):
        ensure_suite_dataset("hopper-nope", tmp_path / "cache", manifest_path=manifest_path)


def cached_copy(small_suite, name: str, cache: Path) -> tuple[Path, Path]:
    """(manifest path, a copy of the built file ``name`` in ``cache``) to edit."""
    manifest_path, built = small_suite
    cache.mkdir(exist_ok=True)
    path = cache / f"{name}.hdf5"
    shutil.copyfile(built / f"{name}.hdf5", path)
    return manifest_path, path


def nudge_last_bits(path: Path, key: str) -> None:
    """What another CPU's float64 arithmetic does to MuJoCo's state: some values one ulp off."""
    with h5py.File(path, "r+") as file:
        values = file[key][()]
        values[::7] = np.nextafter(values[::7], np.inf)
        values[3::11] = np.nextafter(values[3::11], -np.inf)
        file[key][...] = values


def test_infos_that_differ_in_the_last_bits_pass_by_content(small_suite, tmp_path, capsys) -> None:
    manifest_path, path = cached_copy(small_suite, "hopper-medium-replay", tmp_path / "cache")
    nudge_last_bits(path, "infos/qpos")
    nudge_last_bits(path, "infos/qvel")
    entry = load_manifest(manifest_path)["datasets"]["hopper-medium-replay"]
    assert sha256_of_file(path) != entry["sha256"] and content_record(path)["content_sha256"] == entry["content_sha256"]
    assert ensure_suite_dataset("hopper-medium-replay", path.parent, manifest_path=manifest_path) == path
    assert "hopper-medium-replay: verified by content digest " + entry["content_sha256"][:12] in capsys.readouterr().err
    assert verify_dataset_file(path, entry, "hopper-medium-replay", manifest_path, regenerated=False) == "content"
    shutil.copyfile(small_suite[1] / "hopper-medium-replay.hdf5", path)
    assert verify_dataset_file(path, entry, "hopper-medium-replay", manifest_path, regenerated=False) == "sha256"


@pytest.mark.parametrize("change, differs", [
    ("observation", "observations differ"),
    ("reward", "rewards differ"),
    ("qpos", "infos/qpos column 2 sum"),
    ("truncated", "cannot be read"),
    ("fewer transitions", "transitions, expected"),
])
def test_a_changed_or_truncated_file_is_refused_naming_what_differs(small_suite, tmp_path, change, differs) -> None:
    manifest_path, path = cached_copy(small_suite, "hopper-medium-replay", tmp_path / "cache")
    entry = load_manifest(manifest_path)["datasets"]["hopper-medium-replay"]
    if change == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif change == "fewer transitions":
        dataset = read_d4rl_hdf5(path)
        write_d4rl_hdf5(dataset.select_episodes(np.arange(dataset.num_episodes - 1)), path)
    else:
        key, index = {"observation": ("observations", (5, 0)), "reward": ("rewards", 5), "qpos": ("infos/qpos", (5, 2))}[change]
        with h5py.File(path, "r+") as file:
            file[key][index] = file[key][index] + 1e-3
    with pytest.raises(DatasetError) as error:
        ensure_suite_dataset("hopper-medium-replay", path.parent, manifest_path=manifest_path)
    message = str(error.value)
    assert message.startswith(f"{path}: sha256 {sha256_of_file(path)} does not match")
    assert entry["sha256"] in message and entry["content_sha256"] in message and differs in message
    assert "delete it" in message


def test_small_generation_matches_twice_in_memory(policies_root) -> None:
    refs = {"ref_min_score": 0.0, "ref_max_score": 1.0, "d4rl_ref_min": None, "d4rl_ref_max": None}
    first = generate_dataset("hopper-expert", 120, refs=refs, policies_dir=policies_root)
    again = generate_dataset("hopper-expert", 120, refs=refs, policies_dir=policies_root)
    np.testing.assert_array_equal(first.actions, again.actions)
    assert first.metadata["behaviour_training_steps"] == 12288 and first.metadata["kind"] == "expert"
    with pytest.raises(DatasetError, match="not a suite dataset name"):
        generate_dataset("hopper-mediocre", 10, refs=refs)


@pytest.mark.slow
def test_cli_regenerates_and_verifies(cli, small_suite, tmp_path) -> None:
    manifest_path, _ = small_suite
    args = [cli.script("kinema-collect"), "dataset=hopper-random", f"manifest={manifest_path}", f"data_dir={tmp_path}",
            f"hydra.run.dir={tmp_path / 'run'}"]
    proc = cli.run(args, cwd=tmp_path)
    assert "verified against the manifest" in proc.stdout and (tmp_path / "hopper-random.hdf5").is_file()
    with h5py.File(tmp_path / "hopper-random.hdf5", "r+") as file:
        file["actions"][0, 0] = 0.123
    refused = cli.run(args, cwd=tmp_path, check=False)
    assert refused.returncode == 2 and "does not match the suite manifest" in refused.stderr


# -- the suite shipped in the repository ------------------------------------------------------


# Regenerated on AVX2 these have other episodes than the manifest's (AVX-512) files, so their
# content digest could not be recorded from a regeneration checked against the manifest.
def shipped_manifest() -> dict:
    return load_manifest(SUITE_MANIFEST)


def test_shipped_manifest_entries_and_policies() -> None:
    manifest = shipped_manifest()
    assert {"hopper", "walker2d", "halfcheetah"} <= set(manifest["tasks"])
    for task in manifest["tasks"]:
        for kind in KINDS:
            entry = manifest["datasets"][f"{task}-{kind}"]
            for key in MANIFEST_KEYS:
                assert key in entry, (task, kind, key)
            assert entry["libraries"]["cpu"] == "AVX2", (task, kind)  # reproducible on every x86-64 CPU with AVX2
    for task in manifest["tasks"]:
        policies = committed_policies(task)
        for snapshot in [policies["expert"], policies["medium"], *policies["replay"]]:
            load_committed_actor(task, snapshot["snapshot"])  # loads, and fits the task's spaces


def test_shipped_suite_has_the_d4rl_shape() -> None:
    datasets = shipped_manifest()["datasets"]
    for task in shipped_manifest()["tasks"]:
        random, medium, expert = (datasets[f"{task}-{kind}"]["return_mean"] for kind in ("random", "medium", "expert"))
        replay = datasets[f"{task}-medium-replay"]
        assert 0.2 < (medium - random) / (expert - random) < 0.5, task  # medium ~ a third of expert
        assert expert > 2 * medium, task
        assert replay["return_min"] < random + 0.1 * (expert - random), task  # starts near random
        assert replay["return_max"] > medium, task  # reaches medium


def test_embedded_dataset_is_the_recorded_slice() -> None:
    record = shipped_manifest()["embedded"]
    path = embedded_dataset_path()
    assert path.stat().st_size == record["size_bytes"] <= 10 * 1024 * 1024
    assert sha256_of_file(path) == record["sha256"]
    dataset = read_d4rl_hdf5(path)
    assert dataset.num_transitions == record["transitions"]
    assert dataset.metadata["slice_of"] == "hopper-medium-replay"
    assert dataset.reference_returns == (shipped_manifest()["tasks"]["hopper"]["ref_min_score"],
                                         shipped_manifest()["tasks"]["hopper"]["ref_max_score"])
    assert verify_dataset_file(path, record, "the embedded slice", SUITE_MANIFEST, regenerated=False) == "sha256"


def test_shipped_manifest_verifies_an_edited_copy_of_the_embedded_slice(tmp_path) -> None:
    """The real file: float64 infos off by an ulp pass by content; a changed action does not."""
    record = shipped_manifest()["embedded"]
    copy = tmp_path / "slice.hdf5"
    shutil.copyfile(embedded_dataset_path(), copy)
    nudge_last_bits(copy, "infos/qvel")
    assert verify_dataset_file(copy, record, "the embedded slice", SUITE_MANIFEST, regenerated=False) == "content"
    with h5py.File(copy, "r+") as file:
        file["infos/qpos"][0, 0] += 1e6 * INFOS_RTOL * abs(file["infos/qpos"][:, 0]).sum()
    with pytest.raises(DatasetError, match="infos/qpos column 0 sum"):
        verify_dataset_file(copy, record, "the embedded slice", SUITE_MANIFEST, regenerated=False)
    shutil.copyfile(embedded_dataset_path(), copy)
    with h5py.File(copy, "r+") as file:
        file["actions"][10, 1] = -file["actions"][10, 1]
    with pytest.raises(DatasetError, match=r"slice.hdf5: sha256 .* actions differ"):
        verify_dataset_file(copy, record, "the embedded slice", SUITE_MANIFEST, regenerated=False)
