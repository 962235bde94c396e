"""Every benchmark runs at a tiny size and writes the JSON its README table reads; the HF peer is a correct policy.

No timings are asserted: benchmarks measure, tests check that they run and say what they should.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from kinema.benchmarks import bench_utils, bot_speed, chain_cost, eval_throughput, latency, quality, readme_tables, train_speed

REPO = Path(__file__).resolve().parents[2]
MACHINE_KEYS = {"cpu_model", "torch_version", "torch_default_threads", "date", "git_commit"}


def check_record(data: dict, name: str) -> None:
    assert data["benchmark"] == name
    assert MACHINE_KEYS <= set(data["machine"])
    assert "load_average_before" in data and "load_average_after" in data


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Every benchmark at its --quick size, into one results folder."""
    out = tmp_path_factory.mktemp("results")
    train_speed.main(["--quick", "--out", str(out / "train_speed.json")])
    latency.main(["--quick", "--out", str(out / "latency.json")])
    eval_throughput.main(["--quick", "--out", str(out / "eval_throughput.json")])
    bot_speed.main(["--quick", "--out", str(out / "bot_speed.json")])
    tiny = tiny_hopper_dataset(out)
    quality.main(["--quick", "--policies", "dt,at,hf_dt,bc", "--dataset-path", f"tiny={tiny}", "--results-dir", str(out)])
    chain_cost.main(["--quick", "--dataset-path", str(tiny), "--train-speed", str(out / "train_speed.json"),
                     "--out", str(out / "chain_cost.json")])
    return out


def tiny_hopper_dataset(folder: Path) -> Path:
    from kinema.datasets import OfflineDataset, write_d4rl_hdf5

    rng = np.random.default_rng(0)
    lengths = [25] * 8
    total = sum(lengths)
    terminals = np.zeros(total, dtype=bool)
    terminals[np.cumsum(lengths) - 1] = True
    observations = rng.normal(size=(total, 11)).astype(np.float32)
    dataset = OfflineDataset(
        observations=observations, actions=rng.uniform(-1, 1, size=(total, 3)).astype(np.float32),
        rewards=rng.uniform(0, 3, size=total).astype(np.float32), terminals=terminals,
        timeouts=np.zeros(total, dtype=bool), next_observations=observations,
        metadata={"task": "hopper", "ref_min_score": -20.0, "ref_max_score": 3000.0},
    )
    return write_d4rl_hdf5(dataset, folder / "tiny-hopper.hdf5")


def load(results: Path, name: str) -> dict:
    data = json.loads((results / f"{name}.json").read_text())
    check_record(data, name)
    return data


def test_chain_cost_json(results: Path) -> None:
    data = load(results, "chain_cost")
    # The tiny dataset: 8 episodes of 25 steps, so a chain of 1..4 of them is 25, 50, 75 or 100 steps.
    assert data["config"]["chains"] == 256 and data["chains"]["episodes"] == 8
    assert 25 <= data["chains"]["chain_steps_p50"] <= 100 and data["chains"]["chain_steps_max"] <= 100
    assert 25 < data["chains"]["chain_steps_mean"] < 100
    assert data["flops_fit"]["check"]["relative_error"] < 1e-9  # the FLOP count is exactly quadratic in the length
    gflop = data["gflop_per_sample"]
    assert 0 < gflop["window"] < gflop["whole_chain_mean"]
    assert data["ratio_whole_chain_over_window"] == pytest.approx(gflop["whole_chain_mean"] / gflop["window"])
    (hours,) = data["training_hours"]  # train_speed.json of the same folder ran at 1 thread
    assert hours["threads"] == 1 and 0 < hours["window_h"] < hours["whole_chain_h"]


def test_chain_cost_names_a_bad_argument(capsys) -> None:
    with pytest.raises(SystemExit):
        chain_cost.main(["--chains", "0"])
    assert "--chains must be a positive integer, got 0" in capsys.readouterr().err


def check_same_model_headline(data: dict, exact: str, banded: str, hf: str) -> dict:
    """The headline HF / kinema ratio is the exact full-context DT's; a banded default stands beside it."""
    models = data["compared_models"]
    default_is_banded = data["config"]["default_attention_window"] > 0
    assert models["same_model"]["kinema"] == (exact if default_is_banded else banded)
    assert models["same_model"]["hf"] == hf and "attention_window=0" in models["same_model"]["what"]
    if default_is_banded:
        assert models["banded_default"]["kinema"] == banded and "different model" in models["banded_default"]["what"]
    return models


def test_train_speed_json(results: Path) -> None:
    data = load(results, "train_speed")
    models = check_same_model_headline(data, "kinema_dt_exact", "kinema_dt", "hf_dt")
    (entry,) = data["results"]
    assert set(entry["step_time"]) == {"kinema_dt", "hf_dt", "kinema_dt_bf16", models["same_model"]["kinema"]}
    assert all(stat["median_ms"] > 0 and stat["count"] == 2 for stat in entry["step_time"].values())
    assert set(entry["hf_over_kinema"]) == set(models) and all(value > 0 for value in entry["hf_over_kinema"].values())
    assert data["bf16"]
    # kinema skips the last block's return and action tokens, so it does less work than HF per step, same model.
    gflop = data["gflop_per_step"]
    assert 0 < gflop[models["same_model"]["kinema"]] < gflop["hf_dt"]
    assert data["flop_ratio_hf_over_kinema"]["same_model"] > 1


def test_latency_json(results: Path) -> None:
    data = load(results, "latency")
    models = check_same_model_headline(data, "kinema_dt_exact", "kinema_dt", "hf_dt")
    (entry,) = data["results"]
    assert {"kinema_dt", "kinema_dt_recompute", "hf_dt", models["same_model"]["kinema"]} <= set(entry["act_latency"])
    assert set(entry["hf_over_kinema_p50"]) == set(models)
    steps = data["config"]["episode_steps"]
    for stat in entry["act_latency"].values():
        assert stat["count"] == steps and stat["p99_ms"] >= stat["median_ms"] > 0
        assert "sliding_median_ms" in stat  # the quick episode outlasts the context


def test_bot_speed_json(results: Path) -> None:
    data = load(results, "bot_speed")
    counts = data["parameters"]
    assert counts["bot_hard"] == counts["bot_mix"] == counts["bot_vanilla"]
    assert abs(counts["mlp_matched"] / counts["bot_mix"] - 1) < 0.05  # "matched" means it
    assert [(e["batch"], e["threads"]) for e in data["results"]] == [(1, 1), (4, 1)]
    for entry in data["results"]:
        for what in ("train_step", "act"):
            assert set(entry[what]) == set(bot_speed.MODELS) and all(s["count"] == 3 for s in entry[what].values())
            assert set(entry["bot_mix_over"][what]) == {"bot_vanilla", "mlp_matched", "mlp"}


def test_eval_throughput_json(results: Path) -> None:
    data = load(results, "eval_throughput")
    models = check_same_model_headline(data, "kinema_batched_exact", "kinema_batched", "sequential_hf_dt")
    (entry,) = data["results"]
    expected_steps = data["config"]["episodes"] * data["config"]["episode_steps"]
    assert {"kinema_batched", "kinema_sequential", "sequential_recompute", "sequential_hf_dt", "env_only"} <= set(
        entry["throughput"])
    assert set(entry["hf_over_kinema"]) == set(models)
    assert all(stat["env_steps"] == expected_steps for stat in entry["throughput"].values())
    assert entry["throughput"]["sequential_recompute"]["ratio_over_sequential"] == 1.0
    # Same model, same seeds: batched decoding plays the same episodes as batch-1 decoding,
    # and the exact model's batched KV-cache decoding the same as batch-1 recompute.
    assert entry["max_return_difference_batched_vs_sequential"] < 1e-2
    assert entry["max_return_difference_exact_batched_vs_sequential_recompute"] < 1e-2


# -- the quality grid ----------------------------------------------------------------------------
def rerun_quality(results: Path, policies: str, *extra: str) -> dict:
    return quality.main(["--quick", "--policies", policies, "--datasets", "tiny", "--dataset-path",
                         f"tiny={results / 'tiny-hopper.hdf5'}", "--results-dir", str(results), *extra])


def test_quality_grid_json_and_resume(results: Path) -> None:
    data = load(results, "quality")
    assert {(row["dataset"], row["policy"]) for row in data["table"]} == {("tiny", p) for p in ("dt", "at", "bc", "hf_dt")}
    assert [entry["policy"] for entry in data["policies"]] == ["dt", "at", "hf_dt", "bc"]  # as requested
    labels = {entry["policy"]: entry["label"] for entry in data["policies"]}
    assert labels["hf_dt"] == "HF DT"  # the family's own label
    # AT's recipe evaluates an EMA of the weights and DT's does not: the protocol names the columns that differ so.
    assert f'EMA of the weights (policy.recipe.ema): "{labels["at"]}"; the others' in data["protocol"]["recipes"]
    for row in data["table"]:
        assert row["steps"] == 4 and row["seeds"] == [0] and row["score_mean"] is not None and "flags" not in row
        assert ("trials" in row) == (row["policy"] in ("dt", "at"))
    for row in data["table"]:
        if "trials" in row:
            assert {"first_mean", "last_mean", "best_of_n_mean"} <= set(row["trials"])
    assert all(cell["state"] == "done" for cell in data["grid_status"])
    assert data["datasets"]["tiny"]["episodes"] == 8
    for cell in data["cells"]:
        record = json.loads((results / "quality_runs" / "tiny" / cell["policy"] / "seed0" / "cell.json").read_text())
        assert len(record["config_sha256"]) == 64 and record["config_sha256"] == cell["config_sha256"]
        assert record["config_sha256"] == quality.config_hash(record["config"]) and record["git_commit"]

    # A second run skips finished cells and redoes only the one whose result is gone.
    runs = results / "quality_runs" / "tiny"
    kept = (runs / "bc" / "seed0" / "eval.json").read_text()
    (runs / "dt" / "seed0" / "eval.json").unlink()
    (runs / "dt" / "seed0" / "trials.json").unlink()
    again = rerun_quality(results, "dt,bc")
    assert (runs / "bc" / "seed0" / "eval.json").read_text() == kept
    assert (runs / "dt" / "seed0" / "eval.json").is_file() and (runs / "dt" / "seed0" / "trials.json").is_file()
    assert len(again["table"]) == 4  # the aggregate still holds every cell on disk


def test_quality_reruns_a_cell_whose_config_changed(results: Path, capsys) -> None:
    cell = results / "quality_runs" / "tiny" / "bc" / "seed0"
    record = json.loads((cell / "cell.json").read_text())
    old = dict(record, config_sha256="0" * 64)
    old["config"] = json.loads(json.dumps(record["config"]))
    old["config"]["policy"]["recipe"]["lr"] = 0.5  # what an older grid ran
    (cell / "cell.json").write_text(json.dumps(old))
    (cell / "eval.json").write_text(json.dumps(dict(json.loads((cell / "eval.json").read_text()), marker="old")))

    status = rerun_quality(results, "bc", "--status")
    assert {c["policy"]: c["state"] for c in status["grid_status"]}["bc"].startswith("config changed")
    assert "marker" in json.loads((cell / "eval.json").read_text())  # --status changes nothing

    rerun_quality(results, "bc")
    assert "config changed (policy.recipe.lr)" in capsys.readouterr().out
    assert "marker" not in json.loads((cell / "eval.json").read_text())  # the old number is gone
    assert json.loads((cell / "cell.json").read_text())["config_sha256"] == record["config_sha256"]


def test_quality_reports_unverified_and_stale_cells(results: Path, capsys) -> None:
    runs = results / "quality_runs" / "tiny"
    (runs / "hf_dt" / "seed0" / "cell.json").unlink()  # as cells finished before cells recorded a hash
    at_record = runs / "at" / "seed0" / "cell.json"
    fresh = json.loads(at_record.read_text())
    root = subprocess.run(["git", "rev-list", "--max-parents=0", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.split()[-1]
    at_record.write_text(json.dumps(dict(fresh, git_commit=root)))  # at's code and the trainer changed since

    data = rerun_quality(results, "dt,at,hf_dt,bc", "--status")
    out = capsys.readouterr().out
    states = {c["policy"]: c["state"] for c in data["grid_status"]}
    assert states["hf_dt"] == "done, unverified (no config hash)" and "unverified (no config hash): 1 cell(s)" in out
    assert states["at"].startswith("done, stale (at's code or the shared training/evaluation code changed in ") and "stale" in out
    assert (runs / "hf_dt" / "seed0" / "eval.json").is_file()  # kept, not deleted
    rows = {row["policy"]: row for row in data["table"]}
    assert rows["hf_dt"]["flags"] == {"unverified": [0]} and rows["at"]["flags"] == {"stale": [0]}
    block, _ = readme_tables.render(results)
    assert "(1)†" in block and "(1)‡" in block and "unverified" in block

    rerun_quality(results, "at", "--rerun-stale")  # re-runs the stale cell; the unverified one is outside this grid
    assert json.loads(at_record.read_text())["git_commit"] != root
    assert (runs / "hf_dt" / "seed0" / "eval.json").is_file() and not (runs / "hf_dt" / "seed0" / "cell.json").exists()


@pytest.fixture()
def unseen_family():
    """A policy family registered in this process only: no file of the repository knows its name."""
    from kinema.policies import _REGISTRY, register_policy
    from kinema.policies.bc import BCPolicy

    class UnseenFamily(BCPolicy):
        name = "unseen_family_for_benchmarks"
        label = "Unseen family"

    register_policy(UnseenFamily)
    yield UnseenFamily.name
    _REGISTRY.pop(UnseenFamily.name, None)


def test_a_new_family_gets_its_column_without_any_list(results: Path, tmp_path: Path, unseen_family: str) -> None:
    data = quality.main(["--quick", "--policies", f"bc,{unseen_family}", "--dataset-path",
                         f"tiny={results / 'tiny-hopper.hdf5'}", "--results-dir", str(tmp_path)])
    assert data["policies"][-1] == {"policy": unseen_family, "family": unseen_family, "label": "Unseen family"}
    block, _ = readme_tables.render(tmp_path)
    assert "| dataset | dataset average | BC | Unseen family |" in block


def test_column_order_is_stable_with_variants_after_their_family() -> None:
    assert quality.column_order(["dt", "at", "hf_dt", "bc"], ["bc", "at_final", "dt_full", "other"]) == [
        "dt", "dt_full", "at", "at_final", "hf_dt", "bc", "other"]
    # Whatever subset one invocation asks for, the default grid's order comes first.
    assert quality.column_order(["new", "bc", "at"], ["dt", "at", "bc", "new"]) == ["dt", "at", "bc", "new"]


def test_which_columns_are_scored_with_an_ema_of_the_weights_follows_the_recipe_and_variant() -> None:
    assert quality.evaluates_weight_ema("at") and quality.evaluates_weight_ema("dt_ema")
    assert not quality.evaluates_weight_ema("dt") and not quality.evaluates_weight_ema("at_single")  # variant turns it off
    assert not quality.evaluates_weight_ema("a_family_no_longer_registered")
    assert "EMA" not in quality.recipes_protocol(["dt", "bc"])


def test_outside_a_checkout_results_need_an_explicit_place(monkeypatch, capsys) -> None:
    monkeypatch.setattr(bench_utils, "RESULTS_DIR", None)
    for main, option in ((train_speed.main, "--out FILE"), (quality.main, "--results-dir DIR")):
        with pytest.raises(SystemExit):
            main(["--quick"])
        err = capsys.readouterr().err
        assert "outside a source checkout" in err and option in err


# -- the README tables ---------------------------------------------------------------------------
def test_readme_tables_rewrites_only_the_marked_block(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- benchmarks:start -->\nold table\n<!-- benchmarks:end -->\nafter\n")
    # Run as a script from the repository root, as the README says.
    command = [sys.executable, "benchmarks/readme_tables.py", "--results-dir", str(results), "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60, cwd=REPO)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- benchmarks:start -->\n") and text.endswith("<!-- benchmarks:end -->\nafter\n")
    assert "old table" not in text
    for heading in ("| threads | kinema DT, full context (ms) | HF DT (ms) | HF / kinema, same model |",
                    "| threads | variant | p50 (ms) |",
                    "| threads | variant | env-steps/s |", "| dataset | dataset average | kinema DT | kinema AT | HF DT | BC |",
                    "| dataset | policy | trials | first trial | last trial | best of n |",
                    "| AT sample | steps | GFLOP (fwd + bwd) | × window |"):
        assert heading in text
    assert "quick smoke run" in text and text.count("**HF / kinema, same model**") == 3

    no_markers = tmp_path / "PLAIN.md"
    no_markers.write_text("# nothing to replace\n")
    proc = subprocess.run([*command[:-1], str(no_markers)], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2 and "benchmarks:start" in proc.stderr and "| threads |" in proc.stdout
    assert no_markers.read_text() == "# nothing to replace\n"


def test_readme_tables_runs_as_a_module_and_imports_no_policy(results: Path, tmp_path: Path) -> None:
    code = ("import sys, runpy; sys.argv = ['readme_tables', '--print', '--results-dir', sys.argv[1]]; "
            "runpy.run_module('kinema.benchmarks.readme_tables', run_name='__main__'); "
            "assert not any(name.startswith('kinema.policies') for name in sys.modules), 'imported kinema.policies'")
    proc = subprocess.run([sys.executable, "-c", code, str(results)], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "| threads | variant | p50 (ms) |" in proc.stdout


def test_speed_tables_from_results_written_before_the_same_model_ratio(results: Path, tmp_path: Path) -> None:
    """Old JSON holds only the banded default's ratio: it renders, labelled as a different model, never as the headline."""
    train = load(results, "train_speed")
    for entry in train["results"]:
        entry["ratio_hf_over_kinema"] = entry.pop("hf_over_kinema")["banded_default"]
        entry["step_time"].pop("kinema_dt_exact")
    train.pop("compared_models")
    train["flop_ratio_hf_over_kinema"] = train["flop_ratio_hf_over_kinema"]["banded_default"]
    lat = load(results, "latency")
    for entry in lat["results"]:
        entry["ratio_hf_over_kinema_p50"] = entry.pop("hf_over_kinema_p50")["banded_default"]
    lat.pop("compared_models")
    text = readme_tables.train_speed_section(train) + readme_tables.latency_section(lat)
    assert "HF / kinema, same model" not in text and not re.search(r"\*\*\d", text)  # no headline, no bold ratio
    assert "| HF / kinema — banded default vs HF (different model) |" in text
    assert "p50: " in text and "— banded default vs HF (different model)" in text


# -- the HF peer: a family from outside kinema's policies, found through its entry point --------------
def test_hf_peer_registers_through_its_entry_point_without_importing_transformers() -> None:
    code = ("import sys\n"
            "import kinema.benchmarks, kinema.benchmarks.hf_peer\n"
            "from kinema.policies import available_policies, policy_class\n"
            "assert 'hf_dt' in available_policies() and policy_class('hf_dt').label == 'HF DT'\n"
            "assert 'transformers' not in sys.modules, 'transformers imported before an HF model was built'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_hf_peer_without_transformers_says_what_to_install(monkeypatch) -> None:
    spec, stats = train_speed.hopper_spec()
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(ImportError, match=r'pip install "kinema\[test\]"'):
        train_speed.hf_dt(spec, stats)


def hf_policy():
    from kinema.policies import NormStats, PolicySpec, make_policy

    spec = PolicySpec(11, 3, (-1.0, -2.0, -1.0), (1.0, 2.0, 1.0), 1000)
    stats = NormStats.for_observations(np.full(11, 0.5, np.float32), np.full(11, 2.0, np.float32))
    torch.manual_seed(0)
    return make_policy({"name": "hf_dt", "context_len": 6}, spec, stats).eval()


def test_hf_dt_loss_ignores_padded_positions() -> None:
    policy = hf_policy()
    generator = torch.Generator().manual_seed(1)
    batch = train_speed.random_windows(8, 6, generator)
    batch["actions"] = batch["actions"] * torch.tensor([1.0, 2.0, 1.0])
    assert not batch["mask"].all()  # some rows are left-padded
    loss, metrics = policy.loss(batch)

    garbage = {key: value.clone() for key, value in batch.items()}
    padding = ~batch["mask"]
    garbage["observations"][padding] = float("nan")
    garbage["actions"][padding] = 1e6
    garbage["returns_to_go"][padding] = -1e9
    garbage["timesteps"][padding] = 123456
    padded_loss, _ = policy.loss(garbage)
    assert torch.equal(loss, padded_loss) and metrics["action_mse"] == pytest.approx(loss.item())

    real = batch["mask"].nonzero()[0]
    changed = {key: value.clone() for key, value in batch.items()}
    changed["actions"][real[0], real[1]] += 0.5
    assert not torch.equal(policy.loss(changed)[0], loss)

    with pytest.raises(ValueError, match="context_len=6"):
        policy.loss({key: value[:, :5] for key, value in batch.items()})


def test_hf_dt_act_is_batched_and_matches_single_rollouts() -> None:
    policy = hf_policy()
    rng = np.random.default_rng(0)
    steps, envs = 9, 3  # longer than the context of 6: the window slides
    observations = rng.normal(size=(steps, envs, 11)).astype(np.float32)
    rewards = rng.uniform(0, 3, size=(steps, envs))
    targets = [3600.0, 1800.0, 900.0]

    policy.reset(envs, target_return=targets)
    batched = []
    for step in range(steps):
        action = policy.act(observations[step])
        assert action.shape == (envs, 3)
        assert (action >= policy.action_low).all() and (action <= policy.action_high).all()
        batched.append(action)
        policy.observe_reward(rewards[step])
    batched = torch.stack(batched)

    for env in range(envs):
        policy.reset(1, target_return=targets[env])
        for step in range(steps):
            single = policy.act(observations[step, env : env + 1])
            torch.testing.assert_close(single[0], batched[step, env], rtol=1e-5, atol=1e-5)
            policy.observe_reward(rewards[step, env : env + 1])
    assert not torch.allclose(batched[:, 0], batched[:, 2])  # the target return conditions the actions

    with pytest.raises(ValueError, match="after reset"):
        policy.act(observations[0, :2])
    with pytest.raises(ValueError, match="target return"):
        policy.reset(2)


def test_hf_dt_end_episode_restarts_that_environment_only() -> None:
    """Before, the adapter kept one step counter for all environments and no end_episode: a second
    trial carried the first one's window and return-to-go."""
    policy = hf_policy()
    observations = np.random.default_rng(2).normal(size=(7, 2, 11)).astype(np.float32)

    def play(model, steps, envs) -> list[torch.Tensor]:
        actions = []
        for obs in steps:
            actions.append(model.act(obs[envs]))
            model.observe_reward(np.ones(len(actions[-1])))
        return actions

    policy.reset(2, target_return=[3600.0, 1800.0])
    play(policy, observations[:4], slice(0, 2))
    policy.end_episode([1])
    after = play(policy, observations[4:], slice(0, 2))
    fresh = hf_policy()
    fresh.reset(1, target_return=1800.0)
    restarted = play(fresh, observations[4:], slice(1, 2))
    for ours, theirs in zip(after, restarted):
        torch.testing.assert_close(ours[1], theirs[0], rtol=1e-5, atol=1e-5)


def test_rl_quality_runs_both_networks_and_resumes_finished_runs_without_work(tmp_path: Path) -> None:
    from kinema.benchmarks import rl_quality

    data = rl_quality.main(["--quick", "--results-dir", str(tmp_path)])
    check_record(data, "rl_quality")
    assert set(data["summary"]["hopper"]) == {"bot", "mlp"}
    for run in data["runs"]:
        assert [p["steps"] for p in run["curve"]] == [0, 4096] and run["final"]["step"] == 4096
        assert run["git_commit"] and (tmp_path / "rl_runs" / "hopper" / run["network"] / "seed0" / "cell.json").is_file()
    assert (tmp_path / "rl_quality.png").read_bytes()[:4] == b"\x89PNG"
    again = rl_quality.main(["--quick", "--results-dir", str(tmp_path)])  # finished: evaluated again, not retrained
    assert [r["curve"] for r in again["runs"]] == [r["curve"] for r in data["runs"]]


def test_rl_quality_refuses_bad_options_before_any_work(tmp_path: Path, capsys) -> None:
    from kinema.benchmarks import rl_quality

    with pytest.raises(SystemExit):
        rl_quality.main(["--quick"])  # smoke runs never write into the committed results
    assert "--quick needs --results-dir" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rl_quality.main(["--snapshot-every", "1000", "--results-dir", str(tmp_path)])
    assert "snapshot_every must be a multiple of 4096" in capsys.readouterr().err
    assert not (tmp_path / "rl_runs" / "hopper").exists()


def test_diffusion_speed_json(tmp_path: Path) -> None:
    from kinema.benchmarks import diffusion_speed

    onnx = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnxscript") is not None
    data = diffusion_speed.main(["--quick", "--no-peer", "--onnx-max-steps", "2", "--out", str(tmp_path / "diffusion_speed.json")])
    check_record(json.loads((tmp_path / "diffusion_speed.json").read_text()), "diffusion_speed")
    assert [(e["steps"], e["batch"], e["threads"]) for e in data["results"]] == [(2, 1, 1), (10, 1, 1)]
    assert ["onnx_chunk" in e for e in data["results"]] == [onnx, False]  # exported up to --onnx-max-steps only
    for entry in data["results"]:
        assert entry["chunk"]["count"] == entry["cycle"]["count"] == 3
        assert entry["actions_per_s_receding"] > entry["actions_per_s_ensemble"] > 0  # 8 actions per chunk against 1
    assert data["target"]["target_ms"] == 15.0 and data["peer"] == {"skipped": "--no-peer"}


def test_diffusion_modes_plots_samples_against_bc_where_behaviour_policies_disagree(tmp_path: Path) -> None:
    from kinema.benchmarks import diffusion_modes
    from kinema.train.cli import compose_train_config
    from kinema.train.trainer import run_training

    data = tiny_hopper_dataset(tmp_path)
    for policy, extra in (("bc", []), ("diffusion", ["policy.embed_dim=16", "policy.n_layers=1", "policy.recipe.batch_size=16"])):
        run_training(compose_train_config([f"policy={policy}", f"dataset.path={data}", "train.steps=3", "eval.episodes=1",
                                           "eval.num_envs=1", "threads=1", *extra]), tmp_path / policy)
    result = diffusion_modes.main(["--dataset-path", str(data), "--diffusion", str(tmp_path / "diffusion" / "checkpoint"),
                                   "--bc", str(tmp_path / "bc" / "checkpoint"), "--states", "2", "--candidates", "50",
                                   "--samples", "20", "--results-dir", str(tmp_path / "out")])
    assert (tmp_path / "out" / "diffusion_modes.png").is_file() and (tmp_path / "out" / "diffusion_modes.json").is_file()
    assert result["summary"]["states"] == 2 and len(result["per_state"]) == 2
    for state in result["per_state"]:
        assert state["diffusion_share_expert"] + state["diffusion_share_medium"] == pytest.approx(1.0)
    section = readme_tables.diffusion_modes_section(json.loads((tmp_path / "out" / "diffusion_modes.json").read_text()))
    assert "cover both modes at" in section and "diffusion_modes.png" in section
    with pytest.raises(SystemExit):  # the two checkpoints the wrong way round
        diffusion_modes.main(["--dataset-path", str(data), "--diffusion", str(tmp_path / "bc" / "checkpoint"),
                              "--bc", str(tmp_path / "diffusion" / "checkpoint"), "--results-dir", str(tmp_path / "out")])


def test_diffusion_recipe_json(tmp_path: Path) -> None:
    from kinema.benchmarks import diffusion_recipe

    data = diffusion_recipe.main(["--quick", "--dataset-path", str(tiny_hopper_dataset(tmp_path)),
                                  "--out", str(tmp_path / "diffusion_recipe.json")])
    check_record(json.loads((tmp_path / "diffusion_recipe.json").read_text()), "diffusion_recipe")
    assert set(data["curves"]) == set(diffusion_recipe.RECIPES)
    assert [point["step"] for point in data["bc_curve"]] == [2, 4]
    assert all(len(curve) == 2 and all(p["executed_action_mse"] > 0 for p in curve) for curve in data["curves"].values())


def test_diffusion_inference_sweeps_steps_and_action_steps_without_retraining(tmp_path: Path) -> None:
    from kinema.benchmarks import diffusion_inference
    from kinema.train.cli import compose_train_config
    from kinema.train.trainer import run_training

    data = tiny_hopper_dataset(tmp_path)
    run_training(compose_train_config(["policy=diffusion", f"dataset.path={data}", "train.steps=2", "eval.episodes=1",
                                       "eval.num_envs=1", "threads=1", "policy.embed_dim=16", "policy.n_layers=1",
                                       "policy.recipe.batch_size=8", "policy.num_train_timesteps=20"]), tmp_path / "run")
    checkpoint = str(tmp_path / "run" / "checkpoint")
    result = diffusion_inference.main(["--checkpoints", checkpoint, "--steps", "2,20", "--action-steps", "1,8",
                                       "--episodes", "1", "--out", str(tmp_path / "inference.json")])
    check_record(json.loads((tmp_path / "inference.json").read_text()), "diffusion_inference")
    scores = result["runs"][0]["scores"]
    assert set(scores["num_inference_steps"]) == {"2", "20"} and set(scores["n_action_steps"]) == {"1", "8"}
    assert result["summary"]["n_action_steps"]["1"]["checkpoints"] == 1
    section = readme_tables.diffusion_inference_section(json.loads((tmp_path / "inference.json").read_text()))
    assert "| DDIM steps | seed 0 | mean |" in section and "| actions executed per chunk | seed 0 | mean |" in section
    with pytest.raises(ValueError, match="num_inference_steps"):  # more sampling steps than the 20 it was trained with
        diffusion_inference.main(["--checkpoints", checkpoint, "--steps", "21", "--action-steps", "0", "--episodes", "1",
                                  "--out", str(tmp_path / "refused.json")])
    with pytest.raises(SystemExit):
        diffusion_inference.main(["--checkpoints", checkpoint, "--steps", "0", "--out", str(tmp_path / "refused.json")])
