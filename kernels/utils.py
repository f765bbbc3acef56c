"""Helpers shared by the kernels and their callers. Imports torch only, never triton, so that the
CPU paths of the library can use them where Triton is not installed."""
import os

import torch

BACKENDS = ("auto", "torch", "triton")


def interpreting():
    """True when Triton kernels run through the interpreter (TRITON_INTERPRET=1, set before import)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend):
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def use_triton(t, backend):
    """Whether a call on tensor t runs its Triton kernel (the one rule of every fast path here):
    backend "triton", or "auto" on a CUDA tensor. CLEAR_FAST_AUTO_BACKEND=triton makes "auto" pick
    the kernels on CPU tensors too, under the interpreter: a whole model then runs the GPU's code
    path on the CPU (tests, and benchmarks/step_launches.py's count of the launches of a step)."""
    if t.is_cuda:
        return backend != "torch"
    if backend == "auto" and os.environ.get("CLEAR_FAST_AUTO_BACKEND") == "triton":
        if not interpreting():
            raise ValueError("CLEAR_FAST_AUTO_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 "
                             "set before triton is first imported (the kernels then run interpreted)")
        return True
    if backend != "triton":
        return False
    if not interpreting():
        raise ValueError("backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before "
                         "triton is first imported to run the kernel on the CPU (for tests)")
    return True


# Launchers use these two, not triton.cdiv / triton.next_power_of_2: those are ConstexprFunctions in
# recent Triton, 2-6 us a call on the host (measured, triton 3.9), and a routed layer's launches
# are host-bound at training sizes.
def cdiv(a, b):
    """ceil(a / b) for ints, b > 0."""
    return -(-a // b)


def next_power_of_2(n):
    """The smallest power of 2 >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def acc_dtype(dtype):
    """Accumulator dtype for products of inputs in `dtype`: fp64 for fp64, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32
