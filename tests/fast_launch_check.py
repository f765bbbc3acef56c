"""kernels/launch.py's Launcher against Triton's own launch path, without a GPU.

    TRITON_INTERPRET=0 python tests/fast_launch_check.py

Under tests/stand_in_gpu.py's stand-in driver (kernels compiled for sm_90, launches recorded
instead of reaching CUDA), the same sequence of calls is made through a Launcher and through
kernel[grid](...), and each recorded launch must match: the same compiled kernel object (Triton
keeps one per specialisation) and the same launcher arguments (grid, stream, tensors by identity,
scalars by value and type). The calls cross every class Triton specialises on - pointer dtype and
16-byte alignment, integers equal to 1, divisible by 16, wider than 32 or 64 bits, unspecialised
integers, constexprs, launch options - and repeat each class so that the Launcher's own path (no
call of Triton's JITFunction.run) is taken and counted. Then every launch of the library (routed
LoRA, fused loss, mixture E-step), through its Launcher and through Triton. Also: a launch hook or
CLEAR_FAST_DIRECT_LAUNCH=0 sends launches through Triton. Run by tests/test_kernels_compile.py in a
subprocess (the tests' conftest turns the interpreter on). Prints 'fast launch: OK ...'; exits 1 on
a mismatch.
"""
import os
import sys

import torch
import triton
import triton.language as tl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
from kernels import clear_loss as cl, gmm, routed_lora as rl  # noqa: E402  (the source tree, installed or not)
from kernels.launch import Launcher  # noqa: E402
from stand_in_gpu import install  # noqa: E402

LAUNCHES = []  # (compiled kernel, launcher arguments), in launch order
# launcher arguments: grid (3), stream, function, packed metadata, then at HOOKS the launch
# metadata and the enter and exit hooks, then the kernel's arguments
HOOKS = slice(6, 9)
install(lambda kernel, args: LAUNCHES.append((kernel, args)))


@triton.jit(do_not_specialize=["m"])
def _probe(x_ptr, y_ptr, n, m, s, BLOCK: tl.constexpr, FLAG: tl.constexpr):
    i = tl.arange(0, BLOCK)
    v = tl.load(x_ptr + i, mask=i < n + m, other=0.0)
    tl.store(y_ptr + i, (v * s).to(y_ptr.dtype.element_ty), mask=(i < n) & FLAG)


def same(a, b, fresh):
    """Equal launcher arguments: tensors the same object (fresh: the same layout, for outputs a
    launcher allocates anew at every call), other values equal and of the same type."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and fresh:
        return (a.shape, a.stride(), a.dtype, a.data_ptr() % 16) == (b.shape, b.stride(), b.dtype, b.data_ptr() % 16)
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b
    return type(a) is type(b) and a == b


def compare(fast, slow, what, fresh=()):
    """fast(), then slow(), one launch each: the two recorded launches must be the same."""
    del LAUNCHES[:]
    fast()
    slow()
    assert len(LAUNCHES) == 2, f"{what}: {len(LAUNCHES)} launches recorded, expected 2"
    (k1, a1), (k2, a2) = LAUNCHES
    assert k1 is k2, f"{what}: the Launcher launched another compiled kernel than Triton picks"
    # launch metadata and the enter and exit hooks: Triton passes its (empty) hook chains and the
    # metadata they would get, the Launcher None for all three, which Triton's launchers read as
    # no hook; both call nothing. Everything else: the same.
    h1, h2 = a1[HOOKS], a2[HOOKS]
    assert (h1 == (None, None, None) and not h2[1].calls and not h2[2].calls) or \
        (type(h1[0]) is type(h2[0]) and h1[1:] == h2[1:]), f"{what}: hooks differ: {h1} vs {h2}"
    rest = [i for i in range(len(a2)) if not HOOKS.start <= i < HOOKS.stop]
    assert len(a1) == len(a2) and all(same(a1[i], a2[i], i in fresh) for i in rest), \
        f"{what}: launcher arguments differ:\n fast {a1}\n triton {a2}"


def count_jit_runs(kernel):
    """Count calls of Triton's JITFunction.run on this kernel (the Launcher's own path makes none)."""
    calls = [0]
    run = kernel.run

    def counted(*args, **kwargs):
        calls[0] += 1
        return run(*args, **kwargs)
    kernel.run = counted
    return calls


def probe_cases():
    """(what, args, meta): a base case and one change at a time, across Triton's specialisations."""
    buf32, buf16, out = torch.zeros(4096), torch.zeros(4096, dtype=torch.float16), torch.zeros(4096)
    base = dict(x=buf32[:100], n=16, m=3, s=0.5, meta={"BLOCK": 32, "FLAG": True})
    param = torch.nn.Parameter(torch.zeros(100))  # a tensor subclass (the layer's adapters are Parameters)
    changes = ([("x", v) for v in (buf32[1:100], buf32[4:100], buf32[3:100], buf16[:100], buf16[8:100], buf16[1:100],
                                   param)]
               + [("n", v) for v in (17, 1, 32, 0, -16, 1 << 31, (1 << 31) + 16, 1 << 33, 1 << 63)]
               + [("m", v) for v in (1, 16, 1 << 31, 1 << 40, 1 << 63)]
               + [("s", v) for v in (0.25, 1, 2)]
               + [("meta", v) for v in ({"BLOCK": 64, "FLAG": True}, {"BLOCK": 32, "FLAG": False},
                                        {"BLOCK": 32, "FLAG": True, "num_warps": 2},
                                        {"BLOCK": 32, "FLAG": 1})])  # equal to True, another constexpr
    for name, value in [(None, None)] + changes:
        c = dict(base, **({} if name is None else {name: value}))
        x = c["x"]
        what = f"probe x {x.dtype} +{x.storage_offset()} n {c['n']} m {c['m']} s {c['s']!r} {c['meta']}"
        yield what, (x, out, c["n"], c["m"], c["s"]), c["meta"]


def check_probe():
    """Returns (cases, launches the Launcher made itself)."""
    launcher = Launcher(_probe)
    calls = count_jit_runs(_probe)
    cases = list(probe_cases())
    direct = 0
    for rnd in range(2):  # in the second round the Launcher has seen every case
        for what, args, meta in cases:
            before = calls[0]
            compare(lambda: launcher((1,), *args, **meta), lambda: _probe[(1,)](*args, **meta), what)
            direct += calls[0] - before == 1  # only slow()'s own run
            assert rnd == 0 or calls[0] - before == 1, f"{what}: not launched directly on the second round"
    return len(cases), direct


class triton_path:
    """Inside, a Launcher hands every launch to Triton's own path."""

    def __init__(self, launcher):
        self.launcher = launcher

    def __enter__(self):
        self.direct, self.launcher._direct = self.launcher._direct, False

    def __exit__(self, *exc):
        self.launcher._direct = self.direct


def library_launches():
    """(name, launch call, its Launcher, indices of fresh outputs among the launcher arguments)
    for every kernel launch of the library, on small CPU tensors."""
    M, K, N, R, rpm = 64, 32, 48, 4, 16
    x, a, b, y = torch.randn(M, K), torch.randn(R, K), torch.randn(N, R), torch.randn(M, N)
    dy, dx, mask = torch.randn(M, N), torch.randn(M, K), torch.ones(M // rpm)
    u = rl.lora_forward_(y, x, a, b, mask, rpm, 2.0)
    logits, labels, teacher = torch.randn(32, 5), torch.randint(0, 5, (32,)), torch.randn(32, 5)
    stats = cl.clear_loss_forward(logits, labels, teacher, 0.5, 2.0)[2]
    plan = gmm.EMPlan(torch.rand(1000, dtype=torch.float64), 2, max_iter=3)
    # fresh outputs: u; part; loss, ce, stats; dz
    return [("routed forward", lambda: rl.lora_forward_(y, x, a, b, mask, rpm, 2.0), rl._forward, {13}),
            ("routed backward", lambda: rl.lora_backward(dy, x, u, a, b, mask, rpm, 2.0, dx), rl._backward, {15}),
            ("loss forward", lambda: cl.clear_loss_forward(logits, labels, teacher, 0.5, 2.0), cl._forward,
             {12, 13, 14}),
            ("loss backward", lambda: cl.clear_loss_backward(torch.ones(()), logits, labels, teacher, stats, 0.5, 2.0),
             cl._backward, {9, 14}),
            ("mixture E-step 1", lambda: plan.launch(1, 1e-6, False), gmm._gmm_em, set()),
            ("mixture E-step 2", lambda: plan.launch(2, 1e-6, True), gmm._gmm_em, set())]


def check_library():
    """Each launch through its Launcher and through Triton, twice (a miss, then a hit)."""
    launches = library_launches()
    for _ in range(2):
        for name, fn, launcher, fresh in launches:
            def slow():
                with triton_path(launcher):
                    fn()
            compare(fn, slow, name, fresh)
    return len(launches)


def check_hook():
    """With a launch hook set (profilers), the Launcher leaves the launch to Triton, which passes the
    hook to the launcher (the stand-in records it; CUDA's would call it)."""
    from triton import knobs
    launcher, calls = Launcher(_probe), count_jit_runs(_probe)
    (what, args, meta), = list(probe_cases())[:1]
    launcher((1,), *args, **meta)  # now cached
    def hook(metadata):
        pass

    knobs.runtime.launch_enter_hook.add(hook)
    try:
        before = calls[0]
        launcher((1,), *args, **meta)
        assert calls[0] == before + 1 and LAUNCHES[-1][1][HOOKS][1].calls == [hook], \
            "a launch hook was set: Triton must launch, with the hook"
    finally:
        knobs.runtime.launch_enter_hook.remove(hook)
    before = calls[0]
    launcher((1,), *args, **meta)
    assert calls[0] == before and LAUNCHES[-1][1][HOOKS] == (None, None, None), \
        "hook removed: the Launcher launches itself again, without hooks"


def check_switch_off():
    """CLEAR_FAST_DIRECT_LAUNCH=0: every launch through Triton."""
    os.environ["CLEAR_FAST_DIRECT_LAUNCH"] = "0"
    try:
        launcher = Launcher(_probe)
    finally:
        del os.environ["CLEAR_FAST_DIRECT_LAUNCH"]
    calls = count_jit_runs(_probe)
    (what, args, meta), = list(probe_cases())[:1]
    for _ in range(3):
        launcher((1,), *args, **meta)
    assert calls[0] == 3, f"CLEAR_FAST_DIRECT_LAUNCH=0: {calls[0]} of 3 launches went through Triton"


def main():
    check_switch_off()
    check_hook()
    cases, direct = check_probe()
    library = check_library()
    print(f"fast launch: OK, {cases} probe cases x 2 rounds ({direct} launched by the Launcher itself), "
          f"{library} of the library's launches x 2")


if __name__ == "__main__":
    main()
