"""The Triton kernel tests (tests/policies/kernels) under Triton's interpreter, in a fresh process, when there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

KERNEL_TESTS = Path(__file__).resolve().parent / "kernels"


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the kernel tests are collected directly")
def test_kernel_tests_pass_under_the_interpreter() -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", KINEMA_KERNEL_TESTS="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(KERNEL_TESTS)],
                          cwd=KERNEL_TESTS.parents[2], env=env, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
