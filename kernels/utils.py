"""Helpers shared by the kernels and their callers. Imports torch only, never triton, so that the
CPU paths of the library can use them where Triton is not installed."""
import os

import torch


def interpreting():
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def acc_dtype(dtype):
    """Accumulator dtype for products of inputs in `dtype`: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
