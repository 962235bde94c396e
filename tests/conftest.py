"""Shared fixtures: tiny datasets recorded by kinema's own collection code, and CLI runners."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


def run_cli(args: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a kinema console script the way a user does, in a subprocess."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def script(name: str) -> str:
    """The console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Cli:
    """Fixture handle on the CLI helpers (tests are not a package, so they are not imported)."""

    run = staticmethod(run_cli)
    script = staticmethod(script)


@pytest.fixture(scope="session")
def cli() -> Cli:
    return Cli()


@pytest.fixture(scope="session")
def hopper_random_hdf5(tmp_path_factory) -> Path:
    """A small random-policy hopper dataset in D4RL format, recorded with kinema-collect."""
    out = tmp_path_factory.mktemp("data") / "hopper-random-small.hdf5"
    run_cli([script("kinema-collect"), "env=hopper", "behaviour=random", "steps=3000", "seed=0", f"output={out}",
             f"hydra.run.dir={out.parent / 'collect-run'}"], cwd=out.parent)
    return out
