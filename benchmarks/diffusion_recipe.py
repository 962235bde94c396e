"""Which diffusion recipe learns within a CPU budget: prediction type and learning rate against the error of sampled actions.

    python benchmarks/diffusion_recipe.py                      # hopper-medium-expert, 4 recipes, 1,500 steps of batch 64
    python benchmarks/diffusion_recipe.py --quick --dataset-path <file> --out /tmp/r.json

Each recipe trains the diffusion policy at its default model from the same seed, interleaved step
by step (AdamW, betas (0.9, 0.95), weight decay 1e-3, cosine schedule over ``--steps`` after a 10%
warm-up, EMA), on chunks drawn by the same sampler. Every ``--every`` steps the EMA model samples
the chunks of a fixed held-out batch (DDIM, 10 steps) and the mean squared error between the
executed action (chunk index To - 1) and the data's action is recorded. Even a perfect sampler
has an error of twice the data's conditional variance, since it draws an action rather than the
mean. BC's error, the conditional mean's, is recorded beside as the reference: a model that
samples well is near twice BC's error.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Sequence

import torch

from kinema.benchmarks.bench_utils import RunRecord, output_or_error, print_table, require_positive

NAME = "diffusion_recipe"
RECIPES = {  # name -> (prediction_type, lr)
    "epsilon, lr 1e-4 (diffusion_policy's)": ("epsilon", 1e-4),
    "epsilon, lr 1e-3": ("epsilon", 1e-3),
    "sample, lr 3e-4": ("sample", 3e-4),
    "sample, lr 1e-3": ("sample", 1e-3),
}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="hopper-medium-expert")
    parser.add_argument("--dataset-path", type=Path, default=None, help="a D4RL/Minari file instead of the suite dataset")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--every", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="smoke run: 4 steps, evaluated every 2, held-out batch 16")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/diffusion_recipe.json in a checkout")
    args = parser.parse_args(argv)
    held_out_size = 512
    if args.quick:
        args.steps, args.every, held_out_size = 4, 2, 16
    require_positive(parser, args, ("steps", "every", "batch_size"))
    out = output_or_error(parser, args.out, NAME)

    from kinema.datasets import load_dataset, make_sampler
    from kinema.datasets.suite import load_suite_dataset
    from kinema.envs import task_spaces
    from kinema.policies import NormStats, PolicySpec, Recipe, make_policy
    from kinema.policies.diffusion import DiffusionConfig
    from kinema.train.recipe import make_ema, make_optimizer, make_scheduler

    torch.set_num_threads(1)
    record = RunRecord(NAME, argv)
    dataset = load_dataset(args.dataset_path) if args.dataset_path else load_suite_dataset(args.dataset)
    obs_dim, act_dim, low, high = task_spaces(dataset.task or args.dataset.split("-")[0])
    spec, stats = PolicySpec(obs_dim, act_dim, low, high), NormStats(dataset.statistics())
    defaults = DiffusionConfig()
    chunks = {"context_len": defaults.horizon, "n_obs_steps": defaults.n_obs_steps, "n_action_steps": defaults.n_action_steps}
    held_out = make_sampler(dataset, "chunks", batch_size=held_out_size, seed=99, **chunks).sample()
    executed = chunks["n_obs_steps"] - 1
    target = held_out["actions"][:, executed]

    torch.manual_seed(0)
    bc = make_policy({"name": "bc"}, spec, stats)
    runs: dict[str, dict[str, Any]] = {}
    for name, (prediction_type, lr) in RECIPES.items():
        torch.manual_seed(0)
        policy = make_policy({"name": "diffusion", "prediction_type": prediction_type}, spec, stats)
        recipe = Recipe(batch_size=args.batch_size, lr=lr, betas=(0.9, 0.95), weight_decay=1e-3, decay_all_parameters=False,
                        schedule="cosine", warmup_steps=max(1, args.steps // 10), ema=True)
        optimizer = make_optimizer(policy, recipe)
        runs[name] = {"policy": policy, "optimizer": optimizer, "schedule": make_scheduler(optimizer, recipe, args.steps),
                      "ema": make_ema(policy, recipe), "curve": [],
                      "sampler": make_sampler(dataset, "chunks", batch_size=args.batch_size, seed=0, **chunks)}
    bc_recipe = Recipe(batch_size=args.batch_size, lr=3e-4)
    bc_run = {"optimizer": make_optimizer(bc, bc_recipe), "curve": [],
              "sampler": make_sampler(dataset, "transitions", batch_size=args.batch_size, seed=0)}

    for step in range(1, args.steps + 1):
        for run in runs.values():
            loss, _ = run["policy"].loss(run["sampler"].sample())
            run["optimizer"].zero_grad(set_to_none=True)
            loss.backward()
            run["optimizer"].step()
            run["schedule"].step()
            run["ema"].update_parameters(run["policy"])
        loss, _ = bc.loss(bc_run["sampler"].sample())
        bc_run["optimizer"].zero_grad(set_to_none=True)
        loss.backward()
        bc_run["optimizer"].step()
        if step % args.every == 0 or step == args.steps:
            with torch.no_grad():
                for run in runs.values():
                    model = run["ema"].module.eval()
                    torch.manual_seed(1)  # the same initial noise for every recipe
                    chunk = model.predict_chunk(held_out["observations"].numpy())
                    run["curve"].append({"step": step, "executed_action_mse": round(float(((chunk[:, executed] - target) ** 2).mean()), 5)})
                bc.eval().reset(held_out_size)
                bc_mse = float(((bc.act(held_out["observations"][:, executed].numpy()) - target) ** 2).mean())
                bc.train()
                bc_run["curve"].append({"step": step, "executed_action_mse": round(bc_mse, 5)})
            print(f"step {step}: " + ", ".join(f"{name} {run['curve'][-1]['executed_action_mse']}" for name, run in runs.items())
                  + f"; BC {bc_run['curve'][-1]['executed_action_mse']}", flush=True)

    rows = [[name, *(point["executed_action_mse"] for point in run["curve"])] for name, run in runs.items()]
    rows.append(["BC (the conditional mean; a perfect sampler: about twice this)", *(p["executed_action_mse"] for p in bc_run["curve"])])
    print_table(["recipe", *(f"step {p['step']}" for p in bc_run["curve"])], rows)
    return record.finish(
        {"config": {"dataset": args.dataset if args.dataset_path is None else str(args.dataset_path), "steps": args.steps,
                    "batch_size": args.batch_size, "every": args.every, "held_out": held_out_size, "chunks": chunks,
                    "recipes": {name: {"prediction_type": p, "lr": lr} for name, (p, lr) in RECIPES.items()},
                    "quick": args.quick},
         "curves": {name: run["curve"] for name, run in runs.items()}, "bc_curve": bc_run["curve"]},
        out,
    )


if __name__ == "__main__":
    main()
