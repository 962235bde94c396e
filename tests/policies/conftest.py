"""Without a GPU, the Triton kernel tests run in a process of their own (test_kernels_interpreted.py).

Triton's interpreter must be chosen before the kernels are defined, and other tests in a long session
(FlexAttention, torch.compile) load Triton in ways that break the interpreter afterwards; a fresh
process with ``TRITON_INTERPRET=1`` from its start avoids both.
"""

import os

import torch

collect_ignore = [] if torch.cuda.is_available() or os.environ.get("KINEMA_KERNEL_TESTS") == "1" else ["kernels"]
