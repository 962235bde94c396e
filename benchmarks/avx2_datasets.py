"""Suite datasets generated on numpy's and torch's AVX2 code paths, on any x86 CPU.

The suite's walker2d medium-replay, expert and medium-expert files were built on an AVX-512
machine; an AVX2 machine regenerates them with other episodes, and the suite refuses those (README,
"Datasets"). The difference comes from numpy's and torch's AVX-512 kernels: with them switched off,
an AVX-512 machine writes the episodes an AVX2 machine writes. The diffusion grid's walker2d rows
train on these files, which every machine can rebuild:

    python benchmarks/avx2_datasets.py walker2d-medium-expert walker2d-medium-replay --out-dir data/avx2

writes ``<out-dir>/<name>-avx2.hdf5`` and prints each file's summary and sha256. Both switches are
read when numpy and torch are imported, so the generation runs in a child process with them set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

# numpy: no AVX-512 dispatch targets; torch: the AVX2 kernels.
AVX2_ENVIRONMENT = {"NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR", "ATEN_CPU_CAPABILITY": "avx2"}

CHILD = """
import json, sys
import torch
from kinema.datasets.d4rl_io import write_d4rl_hdf5
from kinema.datasets.suite import generate_dataset
name, path = sys.argv[1], sys.argv[2]
dataset = generate_dataset(name)
write_d4rl_hdf5(dataset, path)
print(json.dumps({"name": name, "path": path, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
                  **dataset.summary()}))
"""


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="+", help="suite dataset names, e.g. walker2d-medium-replay")
    parser.add_argument("--out-dir", type=Path, required=True, help="folder for <name>-avx2.hdf5")
    args = parser.parse_args(argv)
    from kinema.datasets.suite import sha256_of_file  # here: the parent's numpy may keep its AVX-512 paths

    args.out_dir.mkdir(parents=True, exist_ok=True)
    results = []
    for name in args.names:
        path = args.out_dir / f"{name}-avx2.hdf5"
        if path.exists():
            raise SystemExit(f"{path} exists; remove it to generate it again")
        done = subprocess.run([sys.executable, "-c", CHILD, name, str(path)], env={**os.environ, **AVX2_ENVIRONMENT},
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"generating {name} failed:\n{done.stderr[-2000:]}")
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        summary["sha256"] = sha256_of_file(path)
        print(json.dumps(summary))
        results.append(summary)
    return results


if __name__ == "__main__":
    main()
