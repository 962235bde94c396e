"""Shared fixtures: tiny datasets recorded by kinema's own collection code, and CLI runners."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("MUJOCO_GL", "egl")


@pytest.fixture
def one_thread():
    """Torch on one thread for small models: on 2 cores, oversubscription makes them many times slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def run_cli(args: list[str], cwd: Path, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
    """Run a kinema console script the way a user does, in a subprocess."""
    proc = subprocess.run(args, cwd=cwd, env=_cli_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _cli_env() -> dict[str, str]:
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def kill_when(args: list[str], cwd: Path, ready: Callable[[], bool], settle: float = 0.0, timeout: float = 120) -> None:
    """Start a console script and SIGKILL it (no clean-up, like a crash) once ``ready()`` holds,
    ``settle`` seconds later; fails when it ended first or was not ready within ``timeout``."""
    proc = subprocess.Popen(args, cwd=cwd, env=_cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not ready() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(settle)
        assert proc.poll() is None, f"{' '.join(args)} ended before it could be killed; give it more work"
        assert ready(), f"{' '.join(args)} was not ready to be killed within {timeout} s"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def script(name: str) -> str:
    """The console script installed next to this interpreter."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


class Cli:
    """Fixture handle on the CLI helpers (tests are not a package, so they are not imported)."""

    run = staticmethod(run_cli)
    script = staticmethod(script)
    kill_when = staticmethod(kill_when)


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
