"""Triton kernels behind the attention entry point (the ``kernels`` extra: ``pip install kinema[kernels]``).

Importing this package imports Triton and registers the ``triton`` attention backend; the entry point
does that on the first ``backend="triton"`` request, so kinema itself never imports Triton. Nothing
here queries the Triton driver at import time.
"""

from kinema.policies.attention import register_attention_backend
from kinema.policies.kernels.attention import attention_forward, reference_attention, triton_attention

register_attention_backend("triton", triton_attention, takes_mask_spec=True)

__all__ = ["attention_forward", "reference_attention", "triton_attention"]
