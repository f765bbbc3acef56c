"""Host time of the routed LoRA launchers on a machine without a GPU.

    TRITON_INTERPRET=0 python benchmarks/launcher_host_cost.py

A routed layer's launches are host-bound on a GPU at training sizes, and most of a launch's host
time is Python: Triton's JIT launch path (argument specialisation, the kernel-cache lookup) and the
launcher's own work (allocations, choosing dtypes and precisions). That part needs no GPU to be
timed: here Triton compiles the kernels for sm_90 (as tests/compile_kernels.py does) under a stand-in
driver, and the final C call into the CUDA driver is replaced by a no-op, so what is timed is all of
the launch but cuLaunchKernel (a few us on a GPU host). Per call, minimum over 5 rounds:

  launcher        kernels.routed_lora.lora_forward_ / lora_backward as the layer calls them
  Launcher launch the forward kernel launched through its kernels/launch.py Launcher with its
                  prepared constexprs, as the launcher does (the launch's share of the launcher)
  Launcher call   the same with the constexprs as keywords (Launcher.__call__)
  Triton launch   the same through Triton's own path, kernel[grid](...)

Tensors are CPU tensors of small shapes (the backward's final torch sum of partial gradients, a
GPU launch, runs on the CPU here: kept small so that it does not dominate). Relies on Triton
internals (the active driver, CompiledKernel._init_handles); written against triton 3.9.
"""
import os
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET=0: this times the compiled kernels' launch path")

import torch  # noqa: E402
import triton  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from kernels import routed_lora as rl  # noqa: E402  (the source tree, installed or not)
from kernels.utils import cdiv  # noqa: E402
from stand_in_gpu import install as install_stand_in_gpu  # noqa: E402


def per_call_us(fn, calls=2000, rounds=5):
    fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls * 1e6)
    return best


def main():
    install_stand_in_gpu()
    M, K, N, R, rows_per_mask = 256, 64, 64, 8, 16
    x, a, b, y = torch.randn(M, K), torch.randn(R, K), torch.randn(N, R), torch.randn(M, N)
    dy, dx, mask = torch.randn(M, N), torch.randn(M, K), torch.ones(M // rows_per_mask)
    u = rl.lora_forward_(y, x, a, b, mask, rows_per_mask, 2.0)
    c = rl.CONFIG
    precision = torch.get_float32_matmul_precision()
    meta = rl._launch_meta(c, R, x.dtype, a.dtype, y.dtype, b.dtype, precision, None)
    prepared = rl._prepared(c, R, x.dtype, a.dtype, y.dtype, b.dtype, precision, None)

    grid = (cdiv(M, c.block_m),)
    args = (x, a, b, y, u, mask, M, K, N, R, rows_per_mask, 2.0)
    rows = {"forward launcher": lambda: rl.lora_forward_(y, x, a, b, mask, rows_per_mask, 2.0),
            "forward Launcher launch": lambda: rl._forward.launch(grid, args, prepared),
            "forward Launcher call": lambda: rl._forward(grid, *args, **meta),
            "forward Triton launch": lambda: rl._forward_kernel[grid](*args, **meta),
            "backward launcher": lambda: rl.lora_backward(dy, x, u, a, b, mask, rows_per_mask, 2.0, dx)}
    print(f"triton {triton.__version__}, torch {torch.__version__}; host us per call (min of 5 rounds)")
    for name, fn in rows.items():
        print(f"{name:24s} {per_call_us(fn):7.1f} us")


if __name__ == "__main__":
    main()
