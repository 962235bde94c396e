"""Every benchmark runs at a tiny size and writes the JSON its README table reads; the HF peer is a correct policy.

No timings are asserted: benchmarks measure, tests check that they run and say what they should.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))  # benchmarks/ is a folder of scripts, not a package

MACHINE_KEYS = {"cpu_model", "torch_version", "torch_default_threads", "date", "git_commit"}


def bench(name: str):
    return importlib.import_module(name)


def check_record(data: dict, name: str) -> None:
    assert data["benchmark"] == name
    assert MACHINE_KEYS <= set(data["machine"])
    assert "load_average_before" in data and "load_average_after" in data


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> Path:
    """Every benchmark at its --quick size, into one results folder."""
    out = tmp_path_factory.mktemp("results")
    bench("train_speed").main(["--quick", "--out", str(out / "train_speed.json")])
    bench("latency").main(["--quick", "--out", str(out / "latency.json")])
    bench("eval_throughput").main(["--quick", "--out", str(out / "eval_throughput.json")])
    tiny = tiny_hopper_dataset(out)
    bench("quality").main(["--quick", "--policies", "dt,at,bc,hf_dt", "--dataset-path", f"tiny={tiny}", "--results-dir", str(out)])
    bench("chain_cost").main(["--quick", "--dataset-path", str(tiny), "--train-speed", str(out / "train_speed.json"),
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
        bench("chain_cost").main(["--chains", "0"])
    assert "--chains must be a positive integer, got 0" in capsys.readouterr().err


def test_train_speed_json(results: Path) -> None:
    data = load(results, "train_speed")
    (entry,) = data["results"]
    assert set(entry["step_time"]) == {"kinema_dt", "hf_dt", "kinema_dt_bf16"}
    assert all(stat["median_ms"] > 0 and stat["count"] == 2 for stat in entry["step_time"].values())
    assert entry["ratio_hf_over_kinema"] > 0 and data["bf16"]
    # kinema skips the last block's return and action tokens, so it does less work than HF per step.
    assert 0 < data["gflop_per_step"]["kinema_dt"] < data["gflop_per_step"]["hf_dt"]
    assert data["flop_ratio_hf_over_kinema"] > 1


def test_latency_json(results: Path) -> None:
    data = load(results, "latency")
    (entry,) = data["results"]
    assert {"kinema_dt", "kinema_dt_recompute", "hf_dt"} <= set(entry["act_latency"])
    steps = data["config"]["episode_steps"]
    for stat in entry["act_latency"].values():
        assert stat["count"] == steps and stat["p99_ms"] >= stat["median_ms"] > 0
        assert "sliding_median_ms" in stat  # the quick episode outlasts the context


def test_eval_throughput_json(results: Path) -> None:
    data = load(results, "eval_throughput")
    (entry,) = data["results"]
    expected_steps = data["config"]["episodes"] * data["config"]["episode_steps"]
    assert {"kinema_batched", "kinema_sequential", "sequential_recompute", "sequential_hf_dt", "env_only"} <= set(
        entry["throughput"])
    assert all(stat["env_steps"] == expected_steps for stat in entry["throughput"].values())
    assert entry["throughput"]["sequential_recompute"]["ratio_over_sequential"] == 1.0
    # Same model, same seeds: batched decoding plays the same episodes as batch-1 decoding,
    # and the exact model's batched KV-cache decoding the same as batch-1 recompute.
    assert entry["max_return_difference_batched_vs_sequential"] < 1e-2
    assert entry["max_return_difference_exact_batched_vs_sequential_recompute"] < 1e-2


def test_quality_grid_json_and_resume(results: Path) -> None:
    data = load(results, "quality")
    assert {(row["dataset"], row["policy"]) for row in data["table"]} == {("tiny", p) for p in ("dt", "at", "bc", "hf_dt")}
    for row in data["table"]:
        assert row["steps"] == 4 and row["seeds"] == [0] and row["score_mean"] is not None
        assert ("trials" in row) == (row["policy"] in ("dt", "at"))
    for row in data["table"]:
        if "trials" in row:
            assert {"first_mean", "last_mean", "best_of_n_mean"} <= set(row["trials"])
    assert all(cell["state"] == "done" for cell in data["grid_status"])
    assert data["datasets"]["tiny"]["episodes"] == 8

    # A second run skips finished cells and redoes only the one whose result is gone.
    runs = results / "quality_runs" / "tiny"
    kept = (runs / "bc" / "seed0" / "eval.json").read_text()
    (runs / "dt" / "seed0" / "eval.json").unlink()
    (runs / "dt" / "seed0" / "trials.json").unlink()
    again = bench("quality").main(["--quick", "--policies", "dt,bc", "--datasets", "tiny", "--dataset-path",
                                   f"tiny={results / 'tiny-hopper.hdf5'}", "--results-dir", str(results)])
    assert (runs / "bc" / "seed0" / "eval.json").read_text() == kept
    assert (runs / "dt" / "seed0" / "eval.json").is_file() and (runs / "dt" / "seed0" / "trials.json").is_file()
    assert len(again["table"]) == 4  # the aggregate still holds every cell on disk


def test_readme_tables_rewrites_only_the_marked_block(results: Path, tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nbefore\n<!-- benchmarks:start -->\nold table\n<!-- benchmarks:end -->\nafter\n")
    command = [sys.executable, str(BENCH_DIR / "readme_tables.py"), "--results-dir", str(results), "--readme", str(readme)]
    subprocess.run(command, check=True, capture_output=True, text=True, timeout=60)
    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n<!-- benchmarks:start -->\n") and text.endswith("<!-- benchmarks:end -->\nafter\n")
    assert "old table" not in text
    for heading in ("| threads | kinema DT (ms) | HF DT (ms) |", "| threads | variant | p50 (ms) |",
                    "| threads | variant | env-steps/s |", "| dataset | dataset average | kinema DT | kinema AT | HF DT | BC |",
                    "| dataset | policy | trials | first trial | last trial | best of n |",
                    "| AT sample | steps | GFLOP (fwd + bwd) | × window |"):
        assert heading in text
    assert "quick smoke run" in text

    no_markers = tmp_path / "PLAIN.md"
    no_markers.write_text("# nothing to replace\n")
    proc = subprocess.run([*command[:-1], str(no_markers)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "benchmarks:start" in proc.stderr and "| threads |" in proc.stdout
    assert no_markers.read_text() == "# nothing to replace\n"


# -- the HF peer is a correct kinema policy -------------------------------------------------------
def hf_policy():
    from kinema.policies import NormStats, PolicySpec, make_policy

    bench("hf_peer")  # registers "hf_dt"
    spec = PolicySpec(11, 3, (-1.0, -2.0, -1.0), (1.0, 2.0, 1.0), 1000)
    stats = NormStats.for_observations(np.full(11, 0.5, np.float32), np.full(11, 2.0, np.float32))
    torch.manual_seed(0)
    return make_policy({"name": "hf_dt", "context_len": 6}, spec, stats).eval()


def test_hf_dt_loss_ignores_padded_positions() -> None:
    policy = hf_policy()
    generator = torch.Generator().manual_seed(1)
    batch = bench("train_speed").random_windows(8, 6, generator)
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
