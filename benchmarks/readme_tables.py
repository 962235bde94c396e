"""Turn the benchmark JSON files into the README's markdown tables.

    python benchmarks/readme_tables.py            # rewrite the block between the markers in README.md
    python benchmarks/readme_tables.py --print    # only print the tables

The README block sits between ``<!-- benchmarks:start -->`` and ``<!-- benchmarks:end -->``;
everything between them is replaced, nothing else is touched. Without the markers the
tables are printed and the command exits with status 2. A benchmark whose JSON is missing
is left out (and named on stderr). Numbers are never typed into the README by hand, and
nothing here knows a policy family: quality.json records each policy's label and the
column order. JSON written before a benchmark recorded something (the same-model HF ratio,
labels, cell flags) still renders, saying what its numbers compare.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from kinema.benchmarks.bench_utils import REPO_ROOT, results_dir_or_error

START, END = "<!-- benchmarks:start -->", "<!-- benchmarks:end -->"
SUITE_START, SUITE_END = "<!-- suite:start -->", "<!-- suite:end -->"
# How a quality cell's flag (quality.json) is marked in the tables; its meaning is recorded in the JSON.
FLAG_MARKERS = {"unverified": "†", "stale": "‡", "config_changed": "§"}
DIFFERENT_MODEL = "banded default vs HF (different model)"


class MarkersMissing(ValueError):
    pass


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _provenance(data: dict[str, Any], file: str) -> str:
    machine = data.get("machine", {})
    commit = (machine.get("git_commit") or "unknown")[:12]
    cpu = machine.get("cpu_model", "?") + (f" ({machine['torch_cpu_capability']})" if machine.get("torch_cpu_capability") else "")
    text = (
        f"<sub>`{data.get('command', '')}` → `benchmarks/results/{file}`; {cpu}, "
        f"torch {machine.get('torch_version', '?')}, {machine.get('date', '?')}, commit {commit}, "
        f"load average before {data.get('load_average_before')} / after {data.get('load_average_after')}"
    )
    if (data.get("config") or data.get("protocol") or {}).get("quick"):
        text += " — **quick smoke run, not a measurement**"
    return text + ".</sub>"


def _threads(entry: dict[str, Any]) -> str:
    return f"{entry['threads']} thread{'' if entry['threads'] == 1 else 's'}"


def hf_ratio_text(data: dict[str, Any], key: str, legacy_key: str | None, measure: str) -> str:
    """The HF / kinema sentence of a speed benchmark: the same model first, kinema's banded default beside it.

    JSON written before the benchmarks measured the same model holds only ``legacy_key``, the
    banded default against HF; it is shown as that, never as the headline.
    """
    entries = data["results"]
    models = data.get("compared_models") or {}
    if models and any(key in entry for entry in entries):
        parts = []
        for name, pair in models.items():
            values = ", ".join(f"{_fmt(entry[key][name])}× ({_threads(entry)})" for entry in entries if name in entry.get(key, {}))
            if name == "same_model":
                parts.append(f"**HF / kinema, same model**, {measure}: **{values}** (`{pair['kinema']}` vs `{pair['hf']}`: {pair['what']})")
            else:
                parts.append(f"beside it, `{pair['kinema']}` vs `{pair['hf']}` ({pair['what']}): {values}")
        return "; ".join(parts) + "."
    if legacy_key and any(legacy_key in entry for entry in entries):
        values = ", ".join(f"{_fmt(entry[legacy_key])}× ({_threads(entry)})" for entry in entries if legacy_key in entry)
        return f"HF / kinema, {measure}: {values} — {DIFFERENT_MODEL}; this result predates the same-model comparison."
    return ""


def train_speed_section(data: dict[str, Any]) -> str:
    config = data["config"]
    models = data.get("compared_models")
    rows = []
    if models:
        same = models["same_model"]["kinema"]
        banded = models.get("banded_default", {}).get("kinema")
        for entry in data["results"]:
            times, ratios = entry["step_time"], entry["hf_over_kinema"]
            bf16 = times.get("kinema_dt_bf16")
            row = [entry["threads"], _fmt(times[same]["median_ms"], 1), _fmt(times["hf_dt"]["median_ms"], 1),
                   f"**{_fmt(ratios['same_model'])}×**"]
            if banded:
                row += [_fmt(times[banded]["median_ms"], 1), f"{_fmt(ratios['banded_default'])}×"]
            row += [_fmt(bf16["median_ms"], 1) if bf16 else "–", _fmt(entry.get("ratio_fp32_over_bf16")) + "×" if bf16 else "–"]
            rows.append(row)
        headers = ["threads", "kinema DT, full context (ms)", "HF DT (ms)", "HF / kinema, same model"]
        if banded:
            headers += ["kinema DT, banded default (ms)", f"HF / kinema — {DIFFERENT_MODEL}"]
        headers += ["kinema DT default, bf16 (ms)" if banded else "kinema DT bf16 (ms)", "fp32 / bf16"]
    else:  # results written before train_speed measured the full-context model
        for entry in data["results"]:
            times = entry["step_time"]
            bf16 = times.get("kinema_dt_bf16")
            rows.append([
                entry["threads"], _fmt(times["kinema_dt"]["median_ms"], 1), _fmt(times["hf_dt"]["median_ms"], 1),
                f"{_fmt(entry['ratio_hf_over_kinema'])}×",
                _fmt(bf16["median_ms"], 1) if bf16 else "–", _fmt(entry.get("ratio_fp32_over_bf16")) + "×" if bf16 else "–",
            ])
        headers = ["threads", "kinema DT (ms)", "HF DT (ms)", f"HF / kinema — {DIFFERENT_MODEL}", "kinema DT bf16 (ms)", "fp32 / bf16"]
    intro = (
        f"**Training step** (forward + backward + AdamW), batch {config['batch_size']}, K=20, 3 layers × 128, 1 head, "
        f"Hopper dims, random windows; median of {config['steps']} interleaved steps after {config['warmup']} warm-up. "
        f"bf16: {data.get('bf16') or 'not measured'}."
    )
    if models:
        intro += f" {hf_ratio_text(data, 'hf_over_kinema', None, 'median step time')}"
    gflop = data.get("gflop_per_step")
    if gflop and models:
        intro += (
            f" Work per step (forward + backward, `torch.utils.flop_counter`) of the same model: kinema "
            f"{_fmt(gflop[models['same_model']['kinema']], 2)} GFLOP, HF {_fmt(gflop['hf_dt'], 2)} GFLOP, a ratio of "
            f"{_fmt(data['flop_ratio_hf_over_kinema']['same_model'])}×: the most that skipping work buys at equal "
            "configuration (kinema computes only the state tokens in the last block)."
        )
    elif gflop:
        intro += (
            f" Work per step (forward + backward, `torch.utils.flop_counter`): kinema's banded default "
            f"{_fmt(gflop['kinema_dt'], 2)} GFLOP, HF {_fmt(gflop['hf_dt'], 2)} GFLOP, a ratio of "
            f"{_fmt(data['flop_ratio_hf_over_kinema'])}× — {DIFFERENT_MODEL}; kinema computes only the state tokens in the last block."
        )
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "train_speed.json")])


def latency_section(data: dict[str, Any]) -> str:
    config = data["config"]
    rows = []
    for entry in data["results"]:
        for name, stat in entry["act_latency"].items():
            rows.append([entry["threads"], f"`{name}`", _fmt(stat["median_ms"], 3), _fmt(stat["p99_ms"], 3),
                         _fmt(stat.get("filling_median_ms"), 3), _fmt(stat.get("sliding_median_ms"), 3)])
    headers = ["threads", "variant", "p50 (ms)", "p99 (ms)", "p50 while the context fills", "p50 once it slides"]
    intro = (
        f"**Per-action latency**, batch 1: `reset` then one timed `act` per step over episodes of "
        f"{config['episode_steps']} steps (K={config['context_len']}), {config['episodes']} episodes per variant, interleaved. "
        + hf_ratio_text(data, "hf_over_kinema_p50", "ratio_hf_over_kinema_p50", "p50")
    ).rstrip()
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "latency.json")])


def eval_throughput_section(data: dict[str, Any]) -> str:
    config = data["config"]
    rows = []
    for entry in data["results"]:
        for name, stat in entry["throughput"].items():
            rows.append([entry["threads"], f"`{name}`", _fmt(stat["env_steps_per_s_median"], 0),
                         _fmt(stat["ratio_over_sequential"]) + "×"])
    headers = ["threads", "variant", "env-steps/s", "vs sequential batch-1"]
    intro = (
        f"**Evaluation throughput**, {config['task']}, {config['episodes']} episodes × {config['episode_steps']} steps, "
        f"randomly initialised DT; median of {config['repeats']} interleaved repeats. "
        + hf_ratio_text(data, "hf_over_kinema", None, "time per env step, kinema's batched evaluation vs HF's sequential loop")
    ).rstrip()
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "eval_throughput.json")])


def _flag_marks(row: dict[str, Any]) -> str:
    return "".join(FLAG_MARKERS[flag] for flag in FLAG_MARKERS if flag in row.get("flags", {}))


FORMER_DATA_MARKER = "°"


def _former_suite_builds(datasets: dict[str, Any]) -> dict[str, str]:
    """Suite datasets a grid trained on an earlier build of (other data than the manifest's file), and how they differ."""
    from kinema.datasets.suite import load_manifest

    manifest = load_manifest()["datasets"]
    former = {}
    for name, info in datasets.items():
        entry = manifest.get(name)
        if entry is None or info.get("episodes") is None:
            continue  # not a suite dataset (a --dataset-path file)
        if info.get("content_sha256") and entry.get("content_sha256"):
            same = info["content_sha256"] == entry["content_sha256"]
        else:  # recorded before grids kept the content digest
            same = info["episodes"] == entry["episodes"] and abs(info["return_mean"] - entry["return_mean"]) <= 1e-6 * abs(entry["return_mean"])
        if not same:
            former[name] = (f"{name} trained on an earlier build of the suite's file ({info['episodes']} episodes, return mean "
                            f"{info['return_mean']:.1f}; the file kinema generates now has {entry['episodes']}, "
                            f"{entry['return_mean']:.1f}, see Datasets)")
    return former


def quality_section(data: dict[str, Any], file: str = "quality.json") -> str:
    protocol = data["protocol"]
    table = data["table"]
    # Labels and column order as quality.json recorded them; results written before it did use the policy names.
    recorded = [entry["policy"] for entry in data.get("policies", [])]
    labels = {entry["policy"]: entry["label"] for entry in data.get("policies", [])}
    budgets = sorted({(row["steps"], row["batch_size"]) for row in table}, key=lambda b: tuple(map(str, b)))
    former = _former_suite_builds(data.get("datasets", {}))
    if "recipes" in protocol:
        recipes = f"recipes: {protocol['recipes']}"
    else:  # results written before policies declared their recipes
        recipe = protocol["transformer_recipe"]
        recipes = f"transformers use the DT recipe (AdamW {recipe['lr']}, warm-up {recipe['warmup_steps']})"
    parts = [
        f"**Policy quality**: normalised score (dataset reference returns), {protocol['reported']}; "
        f"{protocol['eval_episodes']} evaluation episodes per seed; {recipes}; target return: {protocol['target_return']}."
    ]
    for steps, batch_size in budgets:
        rows_here = [row for row in table if (row["steps"], row["batch_size"]) == (steps, batch_size)]
        policies = [p for p in recorded if any(r["policy"] == p for r in rows_here)]
        policies += sorted({r["policy"] for r in rows_here} - set(policies))
        datasets = sorted({r["dataset"] for r in rows_here})
        by_key = {(r["dataset"], r["policy"]): r for r in rows_here}
        rows = []
        for dataset in datasets:
            info = data.get("datasets", {}).get(dataset, {})
            row = [dataset + (FORMER_DATA_MARKER if dataset in former else ""), _fmt(info.get("normalized_return_mean"), 1)]
            for policy in policies:
                cell = by_key.get((dataset, policy))
                if cell is None or cell["score_mean"] is None:
                    row.append("–")
                else:
                    row.append(f"{cell['score_mean']:.1f} ± {cell['score_std']:.1f} ({len(cell['seeds'])}){_flag_marks(cell)}")
            rows.append(row)
        headers = ["dataset", "dataset average"] + [labels.get(p, p) for p in policies]
        parts.append(f"{steps} steps, batch {batch_size} — mean ± std over seeds (number of seeds):")
        parts.append(_table(headers, rows))
        late_rows = [[dataset] + [f"{cell['late_score_mean']:.1f} ± {cell['late_score_std']:.1f} ({cell['late_seeds']})"
                                  if (cell := by_key.get((dataset, policy))) and cell.get("late_score_mean") is not None else "–"
                                  for policy in policies] for dataset in datasets]
        if any(value != "–" for row in late_rows for value in row[1:]):
            parts.append(f"The same cells' late score: {protocol['late_score']}, evaluated every {protocol['eval_every']} steps "
                         "(one checkpoint's score swings from evaluation to evaluation):")
            parts.append(_table(["dataset"] + headers[2:], late_rows))
        trial_rows = []
        for (dataset, policy), cell in sorted(by_key.items()):
            trials = cell.get("trials")
            if trials:
                trial_rows.append([dataset, labels.get(policy, policy), trials["n"],
                                   *(f"{_fmt(trials[f'{k}_mean'], 1)} ± {_fmt(trials[f'{k}_std'], 1)}"
                                     for k in ("first", "last", "best_of_n")), f"{trials['seeds']}{_flag_marks(cell)}"])
        if trial_rows:
            parts.append("Several trials in one context (compare like with like; best-of-n is the AT paper's number):")
            parts.append(_table(["dataset", "policy", "trials", "first trial", "last trial", "best of n", "seeds"], trial_rows))
    flagged = [flag for flag in FLAG_MARKERS if any(flag in row.get("flags", {}) for row in table)]
    if flagged:
        meanings = protocol.get("flags", {})
        parts.append(" ".join(f"{FLAG_MARKERS[flag]} some seeds {meanings.get(flag, flag)} ({flag.replace('_', ' ')})."
                              for flag in flagged) + " `python benchmarks/quality.py --status` lists the cells.")
    if former:
        parts.append(" ".join(f"{FORMER_DATA_MARKER} {note}." for _, note in sorted(former.items())))
    pending = [c for c in data.get("grid_status", []) if not c["state"].startswith("done")]
    if pending:
        parts.append(f"Grid in progress: {len(pending)} of {len(data['grid_status'])} cells not finished yet.")
    parts.append(_provenance(data, file))
    return "\n\n".join(parts)


def body_quality_section(data: dict[str, Any]) -> str:
    intro = ("**Body Transformer, offline** (the paper's claim: BoT ≥ a vanilla transformer and an MLP): behaviour "
             "cloning with BoT-Hard, BoT-Mix, the same transformer without the body mask, and BC's MLP widened to "
             "BoT's parameter count (`bot_speed` below lists the counts).")
    labels = {entry["policy"]: entry["label"] for entry in data.get("policies", [])}
    orderings = []
    for dataset in sorted({row["dataset"] for row in data["table"]}):
        cells = sorted((row for row in data["table"] if row["dataset"] == dataset and row["score_mean"] is not None),
                       key=lambda row: -row["score_mean"])
        orderings.append(f"{dataset}: " + " > ".join(
            f"{labels.get(row['policy'], row['policy']).split(' (')[0]} {row['score_mean']:.1f} ± {row['score_std']:.1f}"
            for row in cells))
    ranking = "Ordering by mean score (differences smaller than the ± overlap are ties): " + "; ".join(orderings) + "."
    return intro + "\n\n" + quality_section(data, "body/quality.json") + "\n\n" + ranking


def bot_speed_section(data: dict[str, Any]) -> str:
    counts = data["parameters"]
    rows = []
    for entry in data["results"]:
        for name in counts:
            rows.append([entry["threads"], entry["batch"], name, f"{counts[name]:,}", _fmt(entry["train_step"][name]["median_ms"]),
                         _fmt(entry["act"][name]["median_ms"], 3)])
    ratios = "; ".join(
        f"batch {e['batch']}, {e['threads']} thread(s): BoT-Mix / vanilla {e['bot_mix_over']['train_step']['bot_vanilla']}× "
        f"(train), {e['bot_mix_over']['act']['bot_vanilla']}× (act); BoT-Mix / matched MLP "
        f"{e['bot_mix_over']['train_step']['mlp_matched']}× (train), {e['bot_mix_over']['act']['mlp_matched']}× (act)"
        for e in data["results"])
    intro = (f"**Body Transformer compute** on {data['config']['task']} (medians, interleaved): a training step "
             "(loss, backward, Adam) and one `act` call.")
    return "\n\n".join([intro, _table(["threads", "batch", "model", "parameters", "train step ms", "act ms"], rows),
                        f"Ratios: {ratios}.", _provenance(data, "bot_speed.json")])


def rl_quality_section(data: dict[str, Any]) -> str:
    labels = {"bot": "PPO, BoT-Mix", "mlp": "PPO, SB3 default MLP"}
    rows = [[task, labels.get(network, network), f"{s['return_mean']:.1f} ± {s['return_std']:.1f}", len(s["seeds"]),
             ", ".join(str(v) for v in s["steps"])]
            for task, by_network in data["summary"].items() for network, s in by_network.items()]
    config = data["config"]
    intro = ("**Body Transformer, online** (`kinema-rl`, PPO with the behaviour policies' hyper-parameters): last evaluation return "
             f"({config['eval_episodes']} deterministic episodes), mean ± std over seeds; curves in "
             "`benchmarks/results/rl_quality.png`.")
    return "\n\n".join([intro, _table(["task", "policy", "return", "seeds", "steps"], rows), _provenance(data, "rl_quality.json")])


def diffusion_quality_section(data: dict[str, Any]) -> str:
    intro = ("**Diffusion policy** against BC and DT on datasets that mix behaviour policies (medium-expert), where a "
             "multi-modal policy should beat BC; each family with its own recipe, the grid's budget. The walker2d rows "
             "train on `walker2d-medium-expert-avx2` and `walker2d-medium-replay-avx2` (given with `--dataset-path`): "
             "the same files, sha256 for sha256, as the suite's walker2d-medium-expert and walker2d-medium-replay, "
             "which kinema now generates on the AVX2 code paths on every machine (see Datasets). Cells trained on two machines of one grid config: the hopper rows and "
             "walker2d's BC seeds 0-1, diffusion medium-expert seeds 0-1, diffusion medium-replay seed 0 and DT seed 0 "
             "on AVX2, the other walker2d cells on AVX-512.")
    return intro + "\n\n" + quality_section(data, "diffusion/quality.json")


def at_ablation_section(data: dict[str, Any]) -> str:
    intro = ("**Agentic Transformer ablation** (issue 19: AT's first trial ≥ DT's, and its last trial above its first): "
             "variants of AT's options against DT at the grid's budget; each label says what differs from AT's "
             "defaults (one-episode chains, an EMA of the weights, targets relabelled to the chain's best return, "
             "windows starting anywhere in the chain, no trial summary); \"chains\" are chains of up to 4 episodes, "
             "AT's default when these cells ran. `walker2d-medium-replay-avx2` is the suite's "
             "walker2d-medium-replay as kinema generates it now "
             "(the same file); its DT cells are the diffusion grid's (same config). Text: \"Agentic Transformer: what "
             "was tried\".")
    return intro + "\n\n" + quality_section(data, "at/quality.json")


def at_checkpoint_noise_section(data: dict[str, Any]) -> str:
    intro = ("**Checkpoint noise on walker2d-medium-replay** (issue 19): DT and AT with and without an EMA of the "
             "weights, and AT's former chains of up to 4 episodes, at the grid's budget, each cell also evaluated every "
             f"{data['protocol']['eval_every']} steps on the same start states, so a row's late score averages over "
             "the swings of single checkpoints. Text: \"Agentic Transformer: what was tried\".")
    labels = {entry["policy"]: entry["label"] for entry in data.get("policies", [])}
    order = [entry["policy"] for entry in data.get("policies", [])]
    cells = sorted((c for c in data["cells"] if c.get("evaluations")),
                   key=lambda c: (c["dataset"], order.index(c["policy"]) if c["policy"] in order else len(order), c["seed"]))
    from kinema.benchmarks.quality import LATE_FRACTION

    steps = sorted({int(step) for c in cells for step in c["evaluations"] if int(step) >= LATE_FRACTION * data["protocol"]["steps"]})
    rows = [[c["dataset"], labels.get(c["policy"], c["policy"]), c["seed"],
             *(_fmt(c["evaluations"].get(str(step)), 1) for step in steps), _fmt(c["late_score"], 1)] for c in cells]
    per_checkpoint = ("Each cell's evaluations over the last half of training (normalised score, mean of "
                      f"{data['protocol']['eval_episodes']} episodes):")
    headers = ["dataset", "policy", "seed", *(f"step {step}" for step in steps), "late score"]
    return "\n\n".join([intro, quality_section(data, "at_late/quality.json"), per_checkpoint, _table(headers, rows)])


def diffusion_speed_section(data: dict[str, Any]) -> str:
    config, target = data["config"], data["target"]
    peer = data.get("peer", {})
    has_peer = any("lerobot_chunk" in e for e in data["results"])
    has_onnx = any("onnx_chunk" in e for e in data["results"])
    headers = ["DDIM steps", "threads", "batch", "chunk ms", "actions/s (receding)", "actions/s (ensemble)"]
    headers += ["ONNX Runtime chunk ms"] if has_onnx else []
    headers += ["LeRobot chunk ms", "LeRobot / kinema"] if has_peer else []
    rows = []
    for e in data["results"]:
        row = [e["steps"], e["threads"], e["batch"], _fmt(e["chunk"]["median_ms"]), _fmt(e["actions_per_s_receding"], 0),
               _fmt(e["actions_per_s_ensemble"], 0)]
        if has_onnx:
            row.append(_fmt(e["onnx_chunk"]["median_ms"]) if "onnx_chunk" in e else "-")
        if has_peer:
            row += [_fmt(e["lerobot_chunk"]["median_ms"]) if "lerobot_chunk" in e else "-",
                    f"{e['lerobot_over_kinema_chunk']}×" if "lerobot_over_kinema_chunk" in e else "-"]
        rows.append(row)
    measured = ", ".join(f"{k.split('_')[0]} thread(s): {_fmt(v)} ms" for k, v in target["measured_ms"].items())
    if target.get("measured_onnxruntime_ms"):
        measured += "; through ONNX Runtime " + ", ".join(f"{k.split('_')[0]} thread(s): {_fmt(v)} ms"
                                                         for k, v in target["measured_onnxruntime_ms"].items())
    intro = (f"**Diffusion policy speed** on {config['task']}'s shapes ({data['parameters']:,} parameters, horizon "
             f"{config['horizon']}, {config['n_action_steps']} actions executed per chunk; medians, interleaved). Target: "
             f"≤ {_fmt(target['target_ms'], 0)} ms per chunk at {target['setting']} on a 2-core machine; measured "
             f"({target['cpu_capability']}) {measured}.")
    parts = [intro, _table(headers, rows)]
    if has_peer:
        parts.append(f"Peer: {peer['model']}, LeRobot {peer['version']}, {peer['parameters']:,} parameters.")
    elif peer.get("skipped"):
        parts.append(f"LeRobot not measured: {peer['skipped']}")
    parts.append(_provenance(data, "diffusion_speed.json"))
    return "\n\n".join(parts)


def diffusion_inference_section(data: dict[str, Any]) -> str:
    runs, summary = data["runs"], data["summary"]
    labels = {"num_inference_steps": "DDIM steps", "n_action_steps": "actions executed per chunk"}
    defaults = runs[0]["inference_defaults"] if runs else {}
    parts = [f"**Diffusion policy: score against inference options, without retraining** "
             f"({data['config'].get('dataset') or 'given checkpoints'}, {len(runs)} checkpoint(s), "
             f"{runs[0]['eval']['episodes'] if runs else '?'} episodes each; one option changed at a time from "
             f"{defaults.get('num_inference_steps')} DDIM steps and {defaults.get('n_action_steps') or 'the config’s'} "
             "actions per chunk; normalised score, mean over checkpoints)."]
    for option, values in summary.items():
        rows = [[value, *(_fmt(run["scores"][option][value]["normalized_score_mean"], 1) for run in runs),
                 _fmt(entry["mean"], 1)] for value, entry in values.items()]
        parts.append(_table([labels.get(option, option), *(f"seed {run['seed']}" for run in runs), "mean"], rows))
    parts.append(_provenance(data, "diffusion_inference.json"))
    return "\n\n".join(parts)


def diffusion_modes_section(data: dict[str, Any]) -> str:
    summary = data["summary"]
    text = (f"**Multi-modality, shown** (`benchmarks/results/{data['plot']}`): {data['config'].get('dataset')}'s "
            f"{summary['states']} states where the data holds both behaviour policies' actions (each at least a quarter of "
            f"the recorded actions at the {data['config'].get('neighbours')} nearest states; "
            f"{summary.get('contested_candidates')} of {data['config'].get('candidates')} candidates qualify) and the two "
            f"policies disagree most. The diffusion policy's samples cover both modes at {summary['covering_both_modes']} of "
            f"them (at least 10% in each). Mean distance to the nearer mode: diffusion samples "
            f"{_fmt(summary['diffusion_distance_to_nearer_mode'], 3)}, BC's single action "
            f"{_fmt(summary['bc_distance_to_nearer_mode'], 3)}.")
    return "\n\n".join([text, f"![diffusion modes](benchmarks/results/{data['plot']})", _provenance(data, "diffusion_modes.json")])


def chain_cost_section(data: dict[str, Any]) -> str:
    config, chains, gflop = data["config"], data["chains"], data["gflop_per_sample"]
    hours = {entry["threads"]: entry for entry in data.get("training_hours", [])}
    thread_counts = sorted(hours)
    headers = ["AT sample", "steps", "GFLOP (fwd + bwd)", "× window"]
    headers += [f"hours for {config['steps']} steps × batch {config['batch_size']}, {n} thread(s)" for n in thread_counts]
    rows = [
        [f"window (K={config['context_len']})", config["context_len"], _fmt(gflop["window"], 2), "1×",
         *(_fmt(hours[n]["window_h"], 2) for n in thread_counts)],
        ["whole chain (mean)", _fmt(chains["chain_steps_mean"], 0), _fmt(gflop["whole_chain_mean"], 1),
         f"**{_fmt(data['ratio_whole_chain_over_window'], 0)}×**", *(f"≥ {_fmt(hours[n]['whole_chain_h'], 1)}" for n in thread_counts)],
    ]
    intro = (
        f"**Whole chains vs windows** (why AT trains on K-step windows): {config['dataset']}, chains of 1..{config['max_chain_len']} "
        f"episodes drawn by kinema's chain sampler ({config['chains']:,} chains: median {_fmt(chains['chain_steps_p50'], 0)} steps, "
        f"90th percentile {_fmt(chains['chain_steps_p90'], 0)}, 3 tokens per step). Work per training sample (forward + backward; "
        f"{config['model']}) counted by `torch.utils.flop_counter`: exactly quadratic in the length (checked). Hours at the FLOP "
        "rate of the DT training step above: a lower bound for whole chains (long-context attention runs slower; padding ignored)."
    )
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "chain_cost.json")])


def control_loop_section(data: dict[str, Any]) -> str:
    cases, config = data["cases"], data["config"]
    rows = []
    for case in cases:
        chunking = case.get("chunking") or {}
        latency = chunking.get("chunk_latency_us_p99", case["latency_us_p99"])
        scores = case.get("episode_normalized_scores") or []
        rows.append([case["family"] + (" (per chunk)" if chunking else ""), _fmt(case["rate_hz"], 0),
                     "yes" if case["scheduling"]["realtime"] else "no", case["ticks"], case["deadline_misses"],
                     _fmt(case["jitter_us_p50"], 1), _fmt(case["jitter_us_p99"], 1), _fmt(latency, 0),
                     (case.get("robot_counts") or {}).get("held_actions", "-"),
                     _fmt(sum(scores) / len(scores), 1) if scores and case["rate"] == "task" else "-", case["final_state"]])
    machine = data["machine"]
    intro = (f"**Control loop** (`kinema-deploy` against the virtual robot in its own process, {_fmt(config['duration_s'], 0)} s per "
             f"case, {config['threads']} thread(s), {machine['torch_cpu_capability']}): jitter is each tick's start against its "
             "absolute deadline; latency is the policy's compute time per step (per chunk for the diffusion policy, whose ticks "
             "are served from its queue); held actions are virtual-robot steps that found no action for their observation. "
             "Targets at the task's rate: no deadline misses, p99 jitter ≤ 1 ms. At 500 Hz the virtual robot steps one 2 ms "
             "frame and the policy acts 4× more often than it was trained for, so only the timing there means anything.")
    headers = ["policy", "Hz", "SCHED_FIFO", "ticks", "misses", "jitter p50 µs", "jitter p99 µs", "latency p99 µs",
               "held actions", "score", "state"]
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "control_loop.json")])


def chunk_seams_section(data: dict[str, Any]) -> str:
    summary, config = data["summary"], data["config"]
    rows = [[row["delay_ticks"], row["mode"], _fmt(row["score_mean"], 1), _fmt(row["jerk_at_seams"], 3),
             _fmt(row["jerk_inside_chunks"], 3), _fmt(row["safety_filled_ticks"], 1)] for row in summary]
    intro = (f"**Chunk seams** (the diffusion policy, {config.get('dataset') or 'given checkpoints'}, "
             f"{summary[0]['checkpoints'] if summary else 0} checkpoint(s) × {config['episodes']} episodes; the simulated robot on a "
             "fake clock, every chunk taking the injected delay in ticks; rate limit off). Jerk: mean squared second difference "
             "of the actions sent, at seams (a step served by another chunk than the step before) and inside chunks. Filled "
             "ticks: steps with no action in time, filled by the safety layer.")
    headers = ["delay (ticks)", "mode", "score", "jerk at seams", "jerk inside chunks", "filled ticks"]
    return "\n\n".join([intro, _table(headers, rows), _provenance(data, "chunk_seams.json")])


def robustness_section(data: dict[str, Any]) -> str:
    config, rows = data["config"], data["profiles"]
    realtime = any("virtual_robot_realtime" in row for row in rows)
    headers = ["profile", "plain evaluation", "loop, simulated time", "interventions (loop)"]
    headers += ["virtual robot, real time", "held actions"] if realtime else []
    table = []
    for row in rows:
        loop = row["loop_simulated"]
        line = [row["profile"], _fmt(row["plain"], 1), _fmt(loop["score"], 1),
                ", ".join(f"{k} {v}" for k, v in loop["safety_interventions"].items()) or "none"]
        if realtime:
            live = row.get("virtual_robot_realtime") or {}
            line += [_fmt(live.get("score"), 1), live.get("held_actions", "-")]
        table.append(line)
    scheduling = config.get("scheduling") or {}
    intro = (f"**Robustness** (`{Path(config['checkpoint']).parent.parent.name}/{Path(config['checkpoint']).parent.name}` of "
             f"{Path(config['checkpoint']).parents[2].name}, {config['episodes']} episodes per profile, seeds 0..; the real-time "
             f"virtual robot {config['realtime_episodes']} episodes, SCHED_FIFO {'granted' if scheduling.get('realtime') else 'not used'}). "
             "Normalised score per randomisation profile: plain evaluation, the deployment loop with its default safety layer on "
             "the simulated robot (differences are the safety layer's doing), and on the virtual robot at wall-clock rate.")
    return "\n\n".join([intro, _table(headers, table), _provenance(data, "robustness.json")])


def serving_section(data: dict[str, Any]) -> str:
    """A ``kinema-bench`` result (bench.json): every serving path of one checkpoint on this machine."""
    settings, machine = data["settings"], data["machine"]
    rows, fastest = [], None
    for path, entry in data["paths"].items():
        if "skipped" in entry:
            rows.append([path, "-", "-", "-", "-", "-", entry["skipped"]])
            continue
        latency = entry["latency_ms"]
        rows.append([path, _fmt(latency["median_ms"], 3), _fmt(latency["mean_ms"], 3), _fmt(latency["p99_ms"], 3), _fmt(entry["max_ms"], 3),
                     _fmt(entry["cold_start_s"]["median"], 2) if "cold_start_s" in entry else "-", entry.get("runtime_path", "")])
        if fastest is None or latency["mean_ms"] < fastest[1]:  # the mean: a chunked policy's steps are bimodal
            fastest = (path, latency["mean_ms"])
    checkpoint = Path(data["checkpoint"])
    name = f"{checkpoint.parents[2].name} {checkpoint.parents[1].name}" if len(checkpoint.parents) > 2 else str(checkpoint)
    intro = (f"**Serving paths** (`kinema-bench`, {name}, batch {settings['batch']}, {settings['threads']} thread(s), cores "
             f"{data['cpu_affinity']}, {machine['torch_cpu_capability']}): per-action latency from observations handed over to "
             f"actions held as a numpy array, over {settings['steps']} actions (a chunked policy samples a chunk on some steps "
             f"and pops a queued action on the others: its mean is the cost per action); cold start is a fresh process's start "
             f"to its first action. Fastest here (mean): **{fastest[0] if fastest else '-'}**.")
    command = f"kinema-bench checkpoint={data['checkpoint']} threads={settings['threads']} steps={settings['steps']}"
    provenance = (f"<sub>`{command}` → `bench.json`; {machine.get('cpu_model', '?')} ({machine.get('torch_cpu_capability')}), "
                  f"torch {machine.get('torch_version', '?')}, {machine.get('date', '?')}, commit {(machine.get('git_commit') or '?')[:12]}.</sub>")
    return "\n\n".join([intro, _table(["path", "p50 ms", "mean ms", "p99 ms", "max ms", "cold start s", "note"], rows), provenance])


# Result file (relative to the results folder) -> the section that renders it, in README order.
SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "train_speed": train_speed_section,
    "latency": latency_section,
    "serving/dt/bench": serving_section,
    "serving/bc/bench": serving_section,
    "serving/bot/bench": serving_section,
    "serving/diffusion/bench": serving_section,
    "eval_throughput": eval_throughput_section,
    "quality": quality_section,
    "chain_cost": chain_cost_section,
    "body/quality": body_quality_section,
    "bot_speed": bot_speed_section,
    "rl_quality": rl_quality_section,
    "diffusion/quality": diffusion_quality_section,
    "at/quality": at_ablation_section,
    "at_late/quality": at_checkpoint_noise_section,
    "diffusion_speed": diffusion_speed_section,
    "diffusion_inference": diffusion_inference_section,
    "diffusion_modes": diffusion_modes_section,
    "control_loop": control_loop_section,
    "chunk_seams": chunk_seams_section,
    "robustness": robustness_section,
}


def render(results_dir: Path) -> tuple[str, list[str]]:
    """(markdown of every available benchmark, names of the missing ones)."""
    sections, missing = [], []
    for name, section in SECTIONS.items():
        path = results_dir / f"{name}.json"
        if not path.is_file():
            missing.append(name)
            continue
        try:
            data = json.loads(path.read_text())
            sections.append(section(data))
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a {name} benchmark result ({type(error).__name__}: {error})") from error
    return "\n\n".join(sections), missing


def replace_block(readme_text: str, block: str, readme: Path, start_marker: str = START, end_marker: str = END) -> str:
    start, end = readme_text.find(start_marker), readme_text.find(end_marker)
    if start < 0 or end < 0 or end < start:
        raise MarkersMissing(
            f"{readme} has no `{start_marker}` ... `{end_marker}` block to rewrite; add both markers where the tables belong"
        )
    return readme_text[: start + len(start_marker)] + "\n" + block + "\n" + readme_text[end:]


def suite_manifest() -> Path:
    """datasets/suite.json: the checkout's, else the installed package's copy (package data)."""
    if REPO_ROOT is not None:
        return REPO_ROOT / "datasets" / "suite.json"
    from importlib.resources import files

    return Path(str(files("kinema.datasets") / "suite.json"))


def suite_section(manifest: dict[str, Any]) -> str:
    """The dataset suite as regenerated (datasets/suite.json): size and returns of the data itself."""
    rows = []
    for name, entry in manifest["datasets"].items():
        rows.append([
            f"`{name}`", f"{entry['episodes']:,}", f"{entry['transitions']:,}", f"{entry['return_mean']:.1f}",
            f"{entry['return_min']:.1f}", f"{entry['return_max']:.1f}", _fmt(entry.get("normalized_return_mean"), 1),
            f"`{entry['sha256'][:12]}`",
        ])
    headers = ["dataset", "episodes", "transitions", "return mean", "min", "max", "normalised score of the data", "sha256"]
    return (
        _table(headers, rows)
        + f"\n\n<sub>From `datasets/suite.json` ({manifest.get('size', 'default')} size); normalised with the "
        "suite's own reference returns. Regenerate with `kinema-collect dataset=all`.</sub>"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=None, help="benchmark JSON files (default: benchmarks/results/ in a checkout)")
    parser.add_argument("--readme", type=Path, default=REPO_ROOT / "README.md" if REPO_ROOT else None,
                        help="README to rewrite (default: the checkout's)")
    parser.add_argument("--print", dest="print_only", action="store_true", help="print the tables, leave the README alone")
    args = parser.parse_args(argv)
    results_dir = results_dir_or_error(parser, args.results_dir)
    if args.readme is None and not args.print_only:
        parser.error("kinema.benchmarks is installed outside a source checkout: pass --readme FILE or --print")
    block, missing = render(results_dir)
    if missing:
        print(f"no results yet for: {', '.join(missing)} (run python benchmarks/<name>.py)", file=sys.stderr)
    if args.print_only:
        print(block)
        return 0
    try:
        text = args.readme.read_text()
        updated = replace_block(text, block, args.readme)
        if SUITE_START in updated and SUITE_END in updated:
            suite = suite_section(json.loads(suite_manifest().read_text()))
            updated = replace_block(updated, suite, args.readme, SUITE_START, SUITE_END)
        else:
            print(f"{args.readme} has no {SUITE_START} block: dataset suite table not written", file=sys.stderr)
    except (OSError, MarkersMissing) as error:
        print(block)
        print(f"\nreadme_tables: {error}", file=sys.stderr)
        return 2
    if updated != text:
        args.readme.write_text(updated)
    print(f"updated {args.readme} ({len(SECTIONS) - len(missing)} benchmark tables)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
