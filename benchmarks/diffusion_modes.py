"""Multi-modality, shown: where medium-expert's two behaviour policies disagree, the diffusion policy's
sampled actions against BC's single action.

    python benchmarks/diffusion_modes.py                  # hopper-medium-expert, the diffusion study's seed-0 cells
    python benchmarks/diffusion_modes.py --diffusion <checkpoint> --bc <checkpoint> --dataset-path <file>

States: the data must hold both modes there, not only the behaviour policies' opinions (at a state
only the expert ever reached, the dataset has no medium action). ``--candidates`` transitions are
drawn (seeded); each is labelled by which committed behaviour policy's mean action
(``datasets/behaviour_policies/<task>``) its recorded action is nearer. A candidate is *contested*
when its ``--neighbours`` nearest candidates (standardised observations) carry both labels, each at
least a quarter; among contested candidates, the ``--states`` where the two policies' mean actions
are farthest apart are shown. Each gets the observation before it as the diffusion policy's
history (an episode's first step repeats itself, as in training).

At each state: ``--samples`` actions of the diffusion policy (the executed entry of independently
sampled chunks), BC's action, and the data: the recorded actions at its neighbouring states. A
sample belongs to the mode whose mean action is nearer. Reported per state and on average: the
share of diffusion samples in each mode, the share of the data's neighbours in each, the distance
from each diffusion sample and from BC's action to the nearer mode (BC's mean-squared-error fit
tends to land between modes), and whether the samples cover both modes (at least 10% in each).

Writes ``<results>/diffusion_modes.json`` and ``diffusion_modes.png`` (one panel per state: the two
action dimensions on which the behaviour policies differ most).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from kinema.benchmarks.bench_utils import RunRecord, require_positive, results_dir_or_error

NAME = "diffusion_modes"
COVERED_SHARE = 0.1  # a mode holds at least this share of the samples to count as covered
CONTESTED_SHARE = 0.25  # a state is contested when each behaviour policy made at least this share of its neighbours' actions


def default_checkpoint(results: Path, dataset: str, policy: str) -> Path:
    return results / "diffusion" / "quality_runs" / dataset / policy / "seed0" / "checkpoint"


def observation_histories(dataset: Any, steps: np.ndarray, n_obs_steps: int) -> np.ndarray:
    """(len(steps), To, obs_dim): each step and the ones before it in its episode, the first step repeated."""
    starts = dataset.episode_starts[dataset.episode_index[steps]]
    offsets = np.arange(-(n_obs_steps - 1), 1)
    indices = np.maximum(steps[:, None] + offsets[None, :], starts[:, None])
    return dataset.observations[indices]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hopper-medium-expert", help="suite dataset (its task's behaviour policies are used)")
    parser.add_argument("--dataset-path", type=Path, default=None, help="read the states from this D4RL/Minari file instead")
    parser.add_argument("--diffusion", type=Path, default=None, help="diffusion checkpoint (default: the diffusion study's seed-0 cell)")
    parser.add_argument("--bc", type=Path, default=None, help="BC checkpoint (default: the diffusion study's seed-0 cell)")
    parser.add_argument("--states", type=int, default=6)
    parser.add_argument("--candidates", type=int, default=5000)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--neighbours", type=int, default=20, help="nearest candidate states that make a state's data")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results-dir", type=Path, default=None, help="default: benchmarks/results/ in a checkout")
    args = parser.parse_args(argv)
    require_positive(parser, args, ("states", "candidates", "samples", "neighbours"))
    results = results_dir_or_error(parser, args.results_dir)

    from kinema.datasets import load_dataset
    from kinema.datasets.suite import load_suite_dataset
    from kinema.datasets.behaviour import committed_policies, load_committed_actor
    from kinema.train.checkpoint import load_checkpoint

    diffusion_dir = args.diffusion or default_checkpoint(results, args.dataset, "diffusion")
    bc_dir = args.bc or default_checkpoint(results, args.dataset, "bc")
    diffusion, bc = load_checkpoint(diffusion_dir).policy.eval(), load_checkpoint(bc_dir).policy.eval()
    if diffusion.name != "diffusion" or bc.name != "bc":
        parser.error(f"--diffusion must be a diffusion checkpoint and --bc a bc one; got {diffusion.name!r} and {bc.name!r}")
    dataset = load_dataset(args.dataset_path) if args.dataset_path else load_suite_dataset(args.dataset)
    task = dataset.task or args.dataset.split("-")[0]
    label = args.dataset_path.name if args.dataset_path else args.dataset
    snapshots = committed_policies(task)
    modes = {level: load_committed_actor(task, snapshots[level]["snapshot"]) for level in ("medium", "expert")}

    rng = np.random.default_rng(args.seed)
    candidates = np.sort(rng.choice(dataset.num_transitions, size=min(args.candidates, dataset.num_transitions), replace=False))
    observations = dataset.observations[candidates].astype(np.float64)
    mode_means = {level: np.clip(actor.mean_action(observations), actor.action_low, actor.action_high) for level, actor in modes.items()}
    disagreement = np.linalg.norm(mode_means["medium"] - mode_means["expert"], axis=1)
    recorded = dataset.actions[candidates].astype(np.float64)
    is_expert = (np.linalg.norm(recorded - mode_means["expert"], axis=1) < np.linalg.norm(recorded - mode_means["medium"], axis=1))
    neighbours = nearest_neighbours(observations, args.neighbours)
    expert_share_nearby = is_expert[neighbours].mean(axis=1)
    contested = (expert_share_nearby >= CONTESTED_SHARE) & (expert_share_nearby <= 1 - CONTESTED_SHARE)
    if not contested.any():
        parser.error(f"none of the {len(candidates)} candidate states has both behaviour policies' actions among its "
                     f"{args.neighbours} nearest neighbours; raise --candidates")
    chosen = np.flatnonzero(contested)[np.argsort(-disagreement[contested])][: args.states]
    steps = candidates[chosen]

    torch.manual_seed(args.seed)
    histories = observation_histories(dataset, steps, diffusion.config.n_obs_steps)
    executed = diffusion.config.n_obs_steps - 1
    with torch.no_grad():
        samples = np.stack([diffusion.predict_chunk(np.repeat(history[None], args.samples, axis=0))[:, executed].numpy()
                            for history in histories])  # (states, samples, act_dim)
        bc.reset(len(steps))
        bc_actions = bc.act(dataset.observations[steps]).numpy()

    states, panels = [], []
    for index, step in enumerate(steps.tolist()):
        medium, expert = mode_means["medium"][chosen[index]], mode_means["expert"][chosen[index]]
        to_medium = np.linalg.norm(samples[index] - medium, axis=1)
        to_expert = np.linalg.norm(samples[index] - expert, axis=1)
        expert_share = float((to_expert < to_medium).mean())
        bc_nearest = float(min(np.linalg.norm(bc_actions[index] - medium), np.linalg.norm(bc_actions[index] - expert)))
        data_actions = recorded[neighbours[chosen[index]]]
        states.append({
            "step": step, "mode_distance": round(float(disagreement[chosen[index]]), 4),
            "data_share_expert": round(float(expert_share_nearby[chosen[index]]), 3),
            "diffusion_share_expert": round(expert_share, 3), "diffusion_share_medium": round(1 - expert_share, 3),
            "covers_both_modes": bool(COVERED_SHARE <= expert_share <= 1 - COVERED_SHARE),
            "diffusion_distance_to_nearer_mode": round(float(np.minimum(to_medium, to_expert).mean()), 4),
            "bc_distance_to_nearer_mode": round(bc_nearest, 4),
        })
        panels.append((medium, expert, samples[index], bc_actions[index], data_actions))

    summary = {
        "states": len(states),
        "contested_candidates": int(contested.sum()),
        "covering_both_modes": sum(s["covers_both_modes"] for s in states),
        "diffusion_distance_to_nearer_mode": round(float(np.mean([s["diffusion_distance_to_nearer_mode"] for s in states])), 4),
        "bc_distance_to_nearer_mode": round(float(np.mean([s["bc_distance_to_nearer_mode"] for s in states])), 4),
    }
    plot_path = results / f"{NAME}.png"
    plot(panels, states, plot_path, label)
    print(f"{len(states)} states of {label} where medium and expert disagree most: diffusion samples cover both "
          f"modes at {summary['covering_both_modes']}; distance to the nearer mode: diffusion samples "
          f"{summary['diffusion_distance_to_nearer_mode']}, BC {summary['bc_distance_to_nearer_mode']}")
    record = RunRecord(NAME, argv)
    return record.finish(
        {"config": {"dataset": args.dataset, "dataset_path": str(args.dataset_path) if args.dataset_path else None,
                    "diffusion_checkpoint": str(diffusion_dir), "bc_checkpoint": str(bc_dir), "states": args.states,
                    "candidates": args.candidates, "neighbours": args.neighbours, "samples": args.samples, "seed": args.seed,
                    "behaviour_policies": {level: snapshots[level]["snapshot"] for level in modes},
                    "diffusion_inference": dict(vars(diffusion.inference))},
         "summary": summary, "per_state": states, "plot": plot_path.name},
        results / f"{NAME}.json",
    )


def nearest_neighbours(observations: np.ndarray, count: int) -> np.ndarray:
    """(n, count) indices of each row's nearest other rows, in observations standardised per dimension."""
    standardised = (observations - observations.mean(0)) / (observations.std(0) + 1e-8)
    squared = (standardised ** 2).sum(1)
    distances = squared[:, None] + squared[None, :] - 2.0 * standardised @ standardised.T
    np.fill_diagonal(distances, np.inf)
    return np.argsort(distances, axis=1)[:, :count]


def plot(panels: list[tuple[np.ndarray, ...]], states: list[dict[str, Any]], path: Path, dataset: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.9 * rows), squeeze=False)
    for axis, (medium, expert, samples, bc_action, data), state in zip(axes.flat, panels, states):
        dims = np.argsort(-np.abs(medium - expert))[:2] if len(medium) > 1 else np.array([0, 0])
        axis.scatter(data[:, dims[0]], data[:, dims[1]], s=10, c="0.6", label="data: actions at nearby states")
        axis.scatter(samples[:, dims[0]], samples[:, dims[1]], s=8, c="tab:blue", alpha=0.6, label="diffusion samples")
        axis.scatter(*medium[dims], marker="o", s=90, facecolors="none", edgecolors="tab:green", linewidths=2, label="medium mean")
        axis.scatter(*expert[dims], marker="*", s=140, c="tab:purple", label="expert mean")
        axis.scatter(*bc_action[dims], marker="X", s=110, c="tab:red", label="BC")
        axis.set_xlabel(f"action {dims[0]}")
        axis.set_ylabel(f"action {dims[1]}")
        axis.set_title(f"step {state['step']}: nearer expert: {state['diffusion_share_expert']:.0%} of samples, "
                       f"{state['data_share_expert']:.0%} of data", fontsize=9)
    for axis in list(axes.flat)[len(panels):]:
        axis.axis("off")
    axes.flat[0].legend(fontsize=7, loc="best")
    figure.suptitle(f"{dataset}: states where the data holds both behaviour policies' actions and they disagree most")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
