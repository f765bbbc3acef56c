"""A GPU that is not there, for Triton's launch path (no CUDA needed).

install(launch) makes Triton compile kernels for sm_90 (it ships its own ptxas) and hands every
launch - after all of Triton's host code, where the CUDA driver would be called - to
launch(compiled_kernel, launcher_args) (default: nothing). Used to check the launch path
(tests/fast_launch_check.py) and to time it (benchmarks/launcher_host_cost.py,
step_host_cost.py). Relies on Triton internals (the active driver, CompiledKernel._init_handles),
written against triton 3.9; run with TRITON_INTERPRET=0.
"""
import torch
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import CompiledKernel
from triton.runtime import driver


class StandInDriver:
    """What Triton's launch path asks of the active driver."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def install(launch=None):
    def init_handles(self):  # instead of loading the cubin on a GPU
        if self.module is None:
            self.module, self.function = "stand-in", 0
            self._run = (lambda *args: None) if launch is None else (lambda *args: launch(self, args))

    driver.set_active(StandInDriver())
    CompiledKernel._init_handles = init_handles
