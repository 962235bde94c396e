"""Attention kernels at policy shapes: kinema's Triton kernel against SDPA and FlexAttention, per mask kind.

    python benchmarks/attention.py              # on a CUDA GPU: fp16 and bf16, batch 1 and 64
    python benchmarks/attention.py --quick      # CPU dry run under Triton's interpreter (tiny, fp32): checks, no timings worth reading

Cases (tokens, heads x head_dim as kinema's default models use them):

- ``dt_causal``: the Decision Transformer's 60 tokens (20 steps x 3), causal, 1 x 128;
- ``dt_banded``: the same with its banded default (5 steps of 3 tokens) and key padding;
- ``bot_graph``: the Body Transformer on humanoid's body graph (one token per body), 1-hop mask, 2 x 64;
- ``diffusion``: the diffusion policy's 16-action chunk, unmasked, 4 x 32; and a 64-token chunk;
- ``dt_decode``: one DT step, 3 new tokens against a ring cache of 60 slots.

Each case runs every backend on the same inputs: ``triton`` (the mask described, evaluated in the
kernel), ``sdpa`` (the dense mask, PyTorch's choice of fused kernel) and ``flex`` (FlexAttention
compiled with its BlockMask; skipped on CPU). Outputs are checked against an fp32 reference before
timing. On a GPU, times are ``triton.testing.do_bench`` medians (ms); the speed-up is SDPA's time over
Triton's. The end-to-end DT latency with CUDA graphs needs the inference runtime's pure per-step
function (``kinema.sim2real``), which this issue builds next; until then that part is reported as
not run, with the reason.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

NAME = "attention"
TARGETS = {"dt_causal": 1.0, "bot_graph": 1.5}  # Triton over SDPA on an H100/H200-class GPU (the targets)


def _time_ms(function: Callable[[], Any], cuda: bool, rounds: int) -> float:
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(function, warmup=25, rep=100))
    function()
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        function()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def humanoid_adjacency(quick: bool):
    """The 1-hop body-graph mask of humanoid (hopper's in a quick run)."""
    import torch

    from kinema.envs.bodygraph import derive_body_graph

    graph = derive_body_graph("hopper" if quick else "humanoid")
    return torch.as_tensor(graph.attention_mask(1))


def cases(quick: bool, device) -> list[dict[str, Any]]:
    import torch

    from kinema.policies.attention import MaskSpec

    generator = torch.Generator().manual_seed(0)
    valid60 = (torch.rand(64, 60, generator=generator) > 0.1) | torch.eye(60, dtype=torch.bool)[:1].expand(64, 60)
    adjacency = humanoid_adjacency(quick)
    nodes = adjacency.shape[0]
    ring_valid = torch.rand(64, 60, generator=generator) > 0.1
    listed = [
        {"case": "dt_causal", "q_len": 60, "k_len": 60, "heads": 1, "head_dim": 128, "mask": lambda b: MaskSpec(causal=True)},
        {"case": "dt_banded", "q_len": 60, "k_len": 60, "heads": 1, "head_dim": 128,
         "mask": lambda b: MaskSpec(causal=True, window=5, group=3, key_valid=valid60[:b].to(device), keep_diagonal=True)},
        {"case": "bot_graph", "q_len": nodes, "k_len": nodes, "heads": 2, "head_dim": 64,
         "mask": lambda b: MaskSpec(adjacency=adjacency.to(device))},
        {"case": "diffusion", "q_len": 16, "k_len": 16, "heads": 4, "head_dim": 32, "mask": lambda b: None},
        {"case": "diffusion_64", "q_len": 64, "k_len": 64, "heads": 4, "head_dim": 32, "mask": lambda b: None},
        {"case": "dt_decode", "q_len": 3, "k_len": 60, "heads": 1, "head_dim": 128,
         "mask": lambda b: MaskSpec(key_valid=ring_valid[:b].to(device), keep_diagonal=True, ring_start=torch.tensor([27], device=device))},
    ]
    if quick:  # the interpreter is slow: shorter sequences, the same mask kinds
        for case in listed:
            case["head_dim"] = 16
        listed[0].update(q_len=12, k_len=12)
        listed[1].update(q_len=12, k_len=12, mask=lambda b: MaskSpec(causal=True, window=2, group=3, key_valid=valid60[:b, :12].to(device),
                                                                         keep_diagonal=True))
        listed[4].update(q_len=20, k_len=20)
        listed[5].update(k_len=12, mask=lambda b: MaskSpec(key_valid=ring_valid[:b, :12].to(device), keep_diagonal=True,
                                                           ring_start=torch.tensor([6], device=device)))
    return listed


def flex_block_mask(mask, batch: int, heads: int, q_len: int, k_len: int, device):
    """The same mask as a FlexAttention BlockMask (from its dense form: built once, outside the timing)."""
    from torch.nn.attention.flex_attention import create_block_mask

    dense = mask.dense(batch, q_len, k_len, device) if mask is not None else None
    if dense is None:
        return None

    def allowed(b, h, q_index, kv_index):
        return dense[b if dense.shape[0] > 1 else 0, 0, q_index, kv_index]

    return create_block_mask(allowed, B=dense.shape[0], H=None, Q_LEN=q_len, KV_LEN=k_len, device=device)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CPU dry run under Triton's interpreter: tiny sizes, fp32, batch 1 and 2")
    parser.add_argument("--rounds", type=int, default=20, help="timed rounds per backend on CPU (GPU: do_bench)")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/attention.json in a checkout")
    args = parser.parse_args(argv)

    import torch

    cuda = torch.cuda.is_available()
    if not cuda:
        if not args.quick:
            parser.error("no CUDA GPU here: the Triton kernels only run on a GPU (use --quick for the CPU dry run under the interpreter)")
        if "kinema.policies.kernels" not in sys.modules:
            os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton reads it when the kernels are defined
    from kinema.benchmarks.bench_utils import RunRecord, output_or_error, print_table
    from kinema.policies.attention import attention
    from kinema.policies.kernels import reference_attention

    out = output_or_error(parser, args.out, NAME)
    device = torch.device("cuda" if cuda else "cpu")
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32]  # the interpreter's bf16 dot is wrong
    batches = [1, 64] if not args.quick else [1, 2]
    compiled_flex = None
    if cuda:
        from torch.nn.attention.flex_attention import flex_attention

        compiled_flex = torch.compile(flex_attention, dynamic=False)
    record = RunRecord(NAME, argv)
    if cuda:
        record.data["machine"]["gpu"] = torch.cuda.get_device_name()
    results = []
    for case in cases(args.quick, device):
        for batch in batches:
            for dtype in dtypes:
                generator = torch.Generator().manual_seed(1)
                q, k, v = (torch.randn(batch, case["heads"], n, case["head_dim"], generator=generator).to(device, dtype)
                           for n in (case["q_len"], case["k_len"], case["k_len"]))
                mask = case["mask"](batch)
                dense = mask.dense(batch, case["q_len"], case["k_len"], device) if mask is not None else None
                expected = reference_attention(q.float(), k.float(), v.float(), mask)
                runs: dict[str, Callable[[], Any]] = {
                    "triton": lambda: attention(q, k, v, mask=mask, backend="triton"),
                    "sdpa": lambda: attention(q, k, v, mask=dense, backend="sdpa"),
                }
                if compiled_flex is not None:
                    block_mask = flex_block_mask(mask, batch, case["heads"], case["q_len"], case["k_len"], device)
                    runs["flex"] = lambda: compiled_flex(q, k, v, block_mask=block_mask)
                entry: dict[str, Any] = {"case": case["case"], "batch": batch, "dtype": str(dtype).removeprefix("torch."),
                                         "q_len": case["q_len"], "k_len": case["k_len"], "heads": case["heads"],
                                         "head_dim": case["head_dim"], "max_abs_error": {}, "ms": {}}
                with torch.no_grad():
                    for backend, run in runs.items():
                        entry["max_abs_error"][backend] = float((run().float() - expected).abs().max())
                        entry["ms"][backend] = round(_time_ms(run, cuda, args.rounds), 5)
                entry["sdpa_over_triton"] = round(entry["ms"]["sdpa"] / entry["ms"]["triton"], 3)
                if "flex" in entry["ms"]:
                    entry["flex_over_triton"] = round(entry["ms"]["flex"] / entry["ms"]["triton"], 3)
                results.append(entry)
                print(f"{entry['case']} batch {batch} {entry['dtype']}: {entry['ms']} errors {entry['max_abs_error']}", flush=True)

    print_table(["case", "batch", "dtype", "triton ms", "sdpa ms", "flex ms", "SDPA / Triton", "max error (triton)"],
                [[e["case"], e["batch"], e["dtype"], e["ms"]["triton"], e["ms"]["sdpa"], e["ms"].get("flex", "-"),
                  e["sdpa_over_triton"], f"{e['max_abs_error']['triton']:.1e}"] for e in results])
    return record.finish(
        {"config": {"quick": args.quick, "device": str(device), "interpreted": not cuda, "batches": batches,
                    "dtypes": [str(d).removeprefix("torch.") for d in dtypes], "rounds": args.rounds if not cuda else "do_bench"},
         "targets_sdpa_over_triton": TARGETS, "results": results,
         "end_to_end_dt": {"not_run": "needs the inference runtime's pure per-step DT function (kinema.sim2real), not built yet"}},
        out,
    )


if __name__ == "__main__":
    main()
