"""Checked without a GPU, in subprocesses with Triton's interpreter off: every Triton kernel variant
builds for sm_90 (Hopper; compile_kernels.py), and kernels/launch.py's Launcher launches the kernel
Triton would, with the arguments Triton would (fast_launch_check.py)."""
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")


def _can_compile_ahead():
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
        from triton.backends.nvidia import compiler  # noqa: F401  (the CUDA backend and its ptxas)
    except ImportError:
        return False
    return True


needs_cuda_compiler = pytest.mark.skipif(not _can_compile_ahead(),
                                         reason="this triton cannot compile for a CUDA target ahead of time")


def _run(script):
    """stdout + stderr of tests/<script> run with the interpreter off (conftest turned it on here)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, path], env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    return out


@needs_cuda_compiler
def test_every_kernel_variant_compiles_for_sm90():
    out = _run("compile_kernels.py")
    built = re.search(r"built (\d+) of (\d+) variants", out)
    assert built and built[1] == built[2] and int(built[2]) >= 40, out[-3000:]  # every variant built (52 today)


@needs_cuda_compiler
def test_launcher_launches_what_triton_would():
    out = _run("fast_launch_check.py")
    done = re.search(r"fast launch: OK, (\d+) probe cases x 2 rounds \((\d+) launched by the Launcher itself\), "
                     r"(\d+) of the library's launches", out)
    assert done, out[-3000:]
    cases, direct, library = map(int, done.groups())
    # every probe case of the second round, and the first round's repeats of a class, went direct
    assert cases >= 20 and direct > cases and library == 6, out[-3000:]
