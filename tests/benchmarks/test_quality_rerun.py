"""A re-run of a finished quality cell keeps its previous result until the new one is complete."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kinema.benchmarks import quality

REPO = Path(__file__).resolve().parents[2]


def grid(out: Path, data: Path, *extra: str) -> dict:
    return quality.main(["--quick", "--policies", "bc", "--dataset-path", f"tiny={data}", "--results-dir", str(out), *extra])


def test_a_failing_or_interrupted_rerun_keeps_the_previous_result(hopper_random_hdf5, tmp_path, monkeypatch, capsys) -> None:
    out = tmp_path / "results"
    grid(out, hopper_random_hdf5)
    cell = out / "quality_runs" / "tiny" / "bc" / "seed0"
    root = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()[-1]
    stale = dict(json.loads((cell / "cell.json").read_text()), git_commit=root)  # its code changed since
    (cell / "cell.json").write_text(json.dumps(stale))
    previous = dict(json.loads((cell / "eval.json").read_text()), marker="previous result")
    (cell / "eval.json").write_text(json.dumps(previous))

    from kinema.train import trainer

    def broken(cfg, run_dir):
        (Path(run_dir) / "metrics.jsonl").write_text("{}\n")  # it got somewhere before failing
        raise RuntimeError("the dataset failed verification")

    monkeypatch.setattr(trainer, "run_training", broken)
    data = grid(out, hopper_random_hdf5, "--rerun-stale")
    assert "FAILED (its previous result is kept): RuntimeError: the dataset failed verification" in capsys.readouterr().err
    assert json.loads((cell / "eval.json").read_text()) == previous
    assert json.loads((cell / "cell.json").read_text()) == stale and (cell / "checkpoint").is_dir()
    assert "the dataset failed verification" in (cell / "error.txt").read_text()
    [status] = data["grid_status"]
    assert status["state"].startswith("done, stale (") and status["state"].endswith("its last re-run failed (see error.txt)")
    [row] = data["table"]
    assert row["flags"] == {"stale": [0]} and row["score_mean"] is not None  # still reported, still flagged

    def interrupted(cfg, run_dir):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "run_training", interrupted)
    with pytest.raises(KeyboardInterrupt):
        grid(out, hopper_random_hdf5, "--rerun-stale")
    assert json.loads((cell / "eval.json").read_text()) == previous
    assert (cell / quality.RERUN_DIR / "cell.json").is_file()  # the next re-run resumes there
    assert f"{quality.RERUN_DIR}/" in (out / "quality_runs" / ".gitignore").read_text()  # never committed half-done

    monkeypatch.undo()
    data = grid(out, hopper_random_hdf5, "--rerun-stale")
    assert "marker" not in json.loads((cell / "eval.json").read_text())  # replaced once the re-run was complete
    assert json.loads((cell / "cell.json").read_text())["git_commit"] != root
    assert not (cell / quality.RERUN_DIR).exists() and not (cell / "error.txt").exists()
    assert (cell / "checkpoint").is_dir() and not (cell / "checkpoints").exists()
    assert [s["state"] for s in data["grid_status"]] == ["done"]


def test_a_cell_held_by_another_worker_is_skipped_until_that_worker_dies(tmp_path) -> None:
    cell = tmp_path / "cell"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom kinema.benchmarks import quality\n"
         f"assert quality.claim(__import__('pathlib').Path({str(cell)!r}))\nprint('held', flush=True)\ntime.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert quality.lock_owner(cell) == holder.pid
        assert not quality.claim(cell)
    finally:
        holder.kill()  # like kill -9: no release, the lock file stays behind
        holder.wait()
    assert (cell / quality.LOCK).exists()
    assert quality.lock_owner(cell) is None  # a dead worker's lock blocks nobody
    assert quality.claim(cell)
    assert quality.lock_owner(cell) is None  # held by this process: not "another worker"
    quality.release(cell)


def test_a_cells_code_is_its_familys_modules_and_sampler_not_every_family() -> None:
    """Adding a family or a sampler does not make every other family's cells stale."""
    if quality.REPO_ROOT is None:
        pytest.skip("needs a checkout")
    assert quality.CodeHistory.family_files("bc") == ["policies/__init__.py", "policies/base.py", "policies/bc.py"]
    assert "policies/dt.py" in quality.CodeHistory.family_files("at")  # AT builds on DT
    assert quality.CodeHistory.sampler_files("bc") == ["datasets/samplers/__init__.py"]
    assert quality.CodeHistory.sampler_files("at") == ["datasets/samplers/__init__.py", "datasets/samplers/chains.py"]
    assert quality.CodeHistory.sampler_files("diffusion") == ["datasets/samplers/__init__.py", "datasets/samplers/chunks.py"]


def test_a_score_neutral_commit_leaves_cells_current_unless_it_rerecords_golden_outputs(tmp_path, monkeypatch) -> None:
    def run_git(*args: str) -> str | None:
        out = subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True)
        return out.stdout if out.returncode == 0 else None

    def commit(message: str, *files: str) -> str:
        for name in files:
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(message)
        run_git("add", *files)
        assert run_git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", message) is not None
        return run_git("rev-parse", "HEAD").strip()

    monkeypatch.setattr(quality, "git", run_git)
    run_git("init", "-q")
    changed = commit("change the model", "policies/model.py")
    commit("refactor\n\nScore-neutral: golden tests pass unchanged", "policies/model.py")
    assert quality.last_score_changing_commit(["policies/model.py"]) == changed
    commit("unrelated", "README.md")
    assert quality.last_score_changing_commit(["policies/model.py"]) == changed
    empty_claim = commit("refactor\n\nScore-neutral:", "policies/model.py")  # a claim needs its evidence
    assert quality.last_score_changing_commit(["policies/model.py"]) == empty_claim
    rerecorded = commit("new outputs\n\nScore-neutral: trust me", "policies/model.py", "tests/golden/model/expected.json")
    assert quality.last_score_changing_commit(["policies/model.py"]) == rerecorded
    # declared afterwards, in the file
    forgot = commit("a refactor whose message forgot the line", "policies/model.py")
    assert quality.last_score_changing_commit(["policies/model.py"]) == forgot
    monkeypatch.setattr(quality, "REPO_ROOT", tmp_path)
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / quality.SCORE_NEUTRAL_COMMITS).write_text(f"# comment\n{forgot[:9]} golden tests unchanged\n{rerecorded[:9]} nope\n")
    assert quality.last_score_changing_commit(["policies/model.py"]) == rerecorded


def test_a_dataset_that_changed_under_its_cells_is_refused(hopper_random_hdf5, tmp_path, capsys) -> None:
    import h5py

    out = tmp_path / "results"
    grid(out, hopper_random_hdf5)
    record_path = out / "quality_runs" / "tiny" / "dataset.json"
    record = json.loads(record_path.read_text())
    assert len(record["content_sha256"]) == 64
    changed = tmp_path / "changed.hdf5"
    changed.write_bytes(hopper_random_hdf5.read_bytes())
    with h5py.File(changed, "r+") as file:
        file["rewards"][0] = file["rewards"][0] + 1.0  # regenerated differently, say
    grid(out, changed, "--seed-list", "1")
    assert "FAILED: GridError: " in capsys.readouterr().err
    new_cell = out / "quality_runs" / "tiny" / "bc" / "seed1"
    assert "content_sha256 differ" in (new_cell / "error.txt").read_text() and not (new_cell / "eval.json").exists()
    assert json.loads(record_path.read_text()) == record
    # A record from before the digest was kept is compared by what it holds.
    record_path.write_text(json.dumps({key: value for key, value in record.items() if key != "content_sha256"}))
    grid(out, changed, "--seed-list", "1")
    assert "return_mean differ" in (new_cell / "error.txt").read_text()
    grid(out, hopper_random_hdf5, "--seed-list", "1")  # the recorded data again: trains, and pins its digest
    assert (new_cell / "eval.json").is_file() and json.loads(record_path.read_text()) == record


def test_an_option_added_after_a_cell_was_recorded_reruns_it_only_off_its_default(hopper_random_hdf5, tmp_path) -> None:
    out = tmp_path / "results"
    grid(out, hopper_random_hdf5)
    cell = out / "quality_runs" / "tiny" / "bc" / "seed0"

    def record_without(key: str) -> None:  # as if the option did not exist when the cell ran
        record = json.loads((cell / "cell.json").read_text())
        del record["config"]["policy"][key]
        record["config_sha256"] = quality.config_hash(record["config"])
        (cell / "cell.json").write_text(json.dumps(record))

    record_without("dropout")  # now at its default, 0.0: the same computation
    assert [s["state"] for s in grid(out, hopper_random_hdf5, "--status")["grid_status"]] == ["done"]
    matched = cell.parent.parent / "bc_matched" / "seed0"
    matched.mkdir(parents=True)
    for name in ("cell.json", "eval.json"):
        (matched / name).write_text((cell / name).read_text())
    cell = matched
    record_without("hidden_dims")  # bc_matched sets it to 360x360: not what the recorded config computed
    states = {s["policy"]: s["state"] for s in quality.main(["--quick", "--policies", "bc,bc_matched", "--dataset-path",
                                                              f"tiny={hopper_random_hdf5}", "--results-dir", str(out),
                                                              "--status"])["grid_status"]}
    assert states["bc"] == "done" and states["bc_matched"].startswith("config changed")


def test_evaluations_during_training_give_each_row_a_late_score(hopper_random_hdf5, tmp_path) -> None:
    out = tmp_path / "results"
    data = grid(out, hopper_random_hdf5, "--eval-every", "1")  # --quick: 4 steps, so evaluations at 1, 2, 3 and 4
    evaluation = json.loads((out / "quality_runs" / "tiny" / "bc" / "seed0" / "eval.json").read_text())
    assert [e["step"] for e in evaluation["evaluations"]] == [1, 2, 3, 4]
    assert evaluation["evaluations"][-1]["normalized_score_mean"] == pytest.approx(evaluation["normalized_score_mean"])
    late = [e["normalized_score_mean"] for e in evaluation["evaluations"][1:]]  # steps >= half of 4
    (row,) = data["table"]
    assert row["late_score_mean"] == pytest.approx(sum(late) / 3, abs=0.01) and row["late_seeds"] == 1
    assert data["protocol"]["eval_every"] == 1 and "last half" in data["protocol"]["late_score"]
    assert quality.late_score([{"step": 1, "normalized_score_mean": 5.0}], steps=4) is None
    from kinema.benchmarks import readme_tables

    section = readme_tables.quality_section(data)
    assert "late score" in section and f"{row['late_score_mean']:.1f} ± 0.0 (1)" in section
    per_cell = readme_tables.at_checkpoint_noise_section(data).splitlines()[-1]  # each cell's late evaluations
    assert per_cell.split(" | ")[3:] == [f"{round(score, 4):.1f}" for score in late] + [f"{row['late_score_mean']:.1f} |"]
    with pytest.raises(SystemExit):
        grid(out, hopper_random_hdf5, "--eval-every", "-1")
