"""Compile every Triton kernel variant the launchers can pick for a Hopper GPU (sm_90), no GPU needed.

    TRITON_INTERPRET=0 python tests/compile_kernels.py

Triton's interpreter, which runs the kernels in CI, skips checks that real compilation makes (for
instance a loop-carried variable changing shape, or tl.dot's minimum block sizes), so a kernel can
pass every interpreter test and still fail to build on the first GPU (it happened: see
kernels/gmm.py). This builds each variant ahead of time through triton.compile with an explicit
target, down to the cubin (Triton ships its own ptxas), and checks that half-precision dots use
tensor cores (mma). Run by tests/test_kernels_compile.py in a subprocess, since the tests' conftest
turns the interpreter on before triton is imported. Prints one line per variant and
'built K of N variants'; exits 1 on a failure.
"""
import itertools
import os
import sys

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import clear_loss, gmm, routed_lora as rl  # noqa: E402  (the source tree, installed or not)
from kernels.utils import acc_dtype  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.float64: "*fp64"}
FLOATS = ("scaling", "inv_t", "w_t2", "w_t")  # Python floats: Triton passes them as fp32


def build(fn, pointers, constexprs, options=None):
    """triton.compile fn with the named pointer types, fp32 for float scalars, i32 for int ones."""
    sig = {name: "constexpr" if name in constexprs else pointers.get(name, "fp32" if name in FLOATS else "i32")
           for name in fn.arg_names}
    consts = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=TARGET, options=options)


def routed_lora_variants():
    """(name, fn, pointers, constexprs, options) for each kernel, from the launchers' own choices."""
    # (x dtype, adapter dtype, mode): half dots for fp32 adapters under autocast; TF32 fp32 dots
    # where torch's fp32 matmul precision allows them
    cases = ([(d, d, None) for d in POINTER] + [(h, torch.float32, m) for h in (torch.bfloat16, torch.float16)
                                                for m in (None, "half_dots")]
             + [(torch.float32, torch.float32, "tf32")])
    for (xd, wd, mode), r in itertools.product(cases, (4, 64)):
        acc = acc_dtype(xd)
        config = rl._config(None, mode == "half_dots")
        precision = "high" if mode == "tf32" else "highest"
        tag = f"x {xd} w {wd} r {r}" + (f" {mode}" if mode else "")
        for has_dx in (None, True, False):
            constexprs = dict(rl._launch_meta(config, r, xd, wd, xd, wd, precision, has_dx))
            options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages")}
            if has_dx is None:
                yield (f"forward {tag}", rl._forward_kernel,
                       dict(x_ptr=POINTER[xd], a_ptr=POINTER[wd], b_ptr=POINTER[wd], y_ptr=POINTER[xd],
                            u_ptr=POINTER[acc], mask_ptr="*fp32"), constexprs, options)
            else:
                yield (f"backward {tag} dx {has_dx}", rl._backward_kernel,
                       dict(dy_ptr=POINTER[xd], x_ptr=POINTER[xd], u_ptr=POINTER[acc], a_ptr=POINTER[wd],
                            b_ptr=POINTER[wd], dx_ptr=POINTER[xd], part_ptr=POINTER[acc], mask_ptr="*fp32"),
                       constexprs, options)


def gmm_variants():
    for xd, k, from_stats, store_resp in itertools.product((torch.float32, torch.float64), (2, 3),
                                                           (False, True), (False, True)):
        kp = max(2, triton.next_power_of_2(k))
        yield (f"gmm em x {xd} K {k} from_stats {from_stats} store_resp {store_resp}", gmm._gmm_em_kernel,
               dict(x_ptr=POINTER[xd], stats_ptr="*fp64", params_ptr="*fp64", resp_ptr="*fp64", consts_ptr="*fp64"),
               dict(K=k, KP=kp, PP=triton.next_power_of_2(gmm.MAX_PROGRAMS), BLOCK=gmm.BLOCK,
                    FROM_STATS=from_stats, STORE_RESP=store_resp), None)


def clear_loss_variants():
    for zd, has_t, (rows, classes) in itertools.product((torch.float32, torch.bfloat16, torch.float16),
                                                        (True, False), ((32, 10), (32, 77), (300, 7), (5, 600))):
        block_b, block_c = clear_loss._blocks(rows, classes)
        consts = dict(HAS_TEACHER=has_t, BLOCK_B=block_b, BLOCK_C=block_c)
        tag = f"logits {zd} teacher {has_t} blocks {block_b} x {block_c}"
        yield (f"loss forward {tag}", clear_loss._forward_kernel,
               dict(z_ptr=POINTER[zd], y_ptr="*i64", t_ptr="*fp32", loss_ptr="*fp32", ce_ptr="*fp32",
                    stats_ptr="*fp32"), consts, dict(num_warps=clear_loss.NUM_WARPS))
        yield (f"loss backward {tag}", clear_loss._backward_kernel,
               dict(g_ptr="*fp32", z_ptr=POINTER[zd], y_ptr="*i64", t_ptr="*fp32", stats_ptr="*fp32",
                    dz_ptr=POINTER[zd]), consts, dict(num_warps=clear_loss.NUM_WARPS))


def main():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("run with TRITON_INTERPRET=0: the interpreter does not compile")
    failures = built = 0
    for name, fn, pointers, constexprs, options in itertools.chain(routed_lora_variants(), gmm_variants(),
                                                       clear_loss_variants()):
        try:
            kernel = build(fn, pointers, constexprs, options)
            tensor_cores = constexprs.get("DOT_A") in (tl.float16, tl.bfloat16) or constexprs.get("PRECISION_A") == "tf32"
            if tensor_cores and "mma" not in kernel.asm["ptx"]:
                raise AssertionError("a half-precision or TF32 dot that does not use tensor cores (no mma in the PTX)")
            built += 1
            print(f"ok   {name}: shared {kernel.metadata.shared} B", flush=True)
        except Exception as e:  # report every variant, then fail
            failures += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
    print(f"built {built} of {built + failures} variants")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
