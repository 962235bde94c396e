"""Kernel tests run the Triton kernels on a GPU when there is one, else under Triton's interpreter.

Triton decides at decoration time, so the variable is set before any test module here imports
``kinema.policies.kernels``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")


@pytest.fixture
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
