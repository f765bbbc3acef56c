"""Host cost of one layer call: what bounds a small-batch step on a GPU.

    python benchmarks/host_overhead.py            # GPU: bf16 activations, fp32 adapters
    python benchmarks/host_overhead.py --rows 8   # tiny tensors: the host work alone

On a GPU at BERT-sized batches a LoRA step is bound by the host (Python, autograd, kernel launches),
not by the GPU: the README's GPU tables show a routed layer at 32 x 128 rows costing 6-12x F.linear
while the arithmetic is a few percent more. This script measures, per layer call (forward, and
forward + backward), for the routed layer (with a mask and without), peft's LoRA layer and F.linear:

  host us    perf_counter over `calls` calls queued back to back, no sync inside (on a GPU the
             host enqueues faster than a busy GPU runs only when the host is not the bound);
  wall us    the same loop including the final synchronize;
  kernels    GPU kernels launched per call (torch.profiler), the count each launch's host cost
             multiplies;
  GPU us     the time those kernels run on the GPU (torch.profiler, summed): what a call would
             cost once the host keeps ahead (larger batches, CUDA graphs) - the kernels' own cost.

Writes benchmarks/results/host_<device>.{json,md}. Shapes and dtypes as in lora_table.py.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_table import environment, make_impl, make_problem  # noqa: E402
from mixture_table import device_tag  # noqa: E402

VARIANTS = ("routed@0", "routed@0.5", "routed@1", "routed_no_mask", "peft", "linear")


def impl(name, p):
    if name == "routed_no_mask":
        return make_impl("routed", dict(p, mask=None))
    if name.startswith("routed@"):  # the first round(f x batch) samples routed
        batch = p["x"].shape[0]
        mask = torch.zeros(batch, dtype=torch.bool, device=p["x"].device)
        mask[: round(float(name.split("@")[1]) * batch)] = True
        return make_impl("routed", dict(p, mask=mask))
    return make_impl(name, p)


def run(fn, leaves, x, dy, backward, calls):
    for _ in range(calls):
        for leaf in leaves:
            leaf.grad = None
        y = fn(x)
        if backward:
            y.backward(dy)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(name, p, backward, calls, repeats):
    fn, leaves = impl(name, p)
    x = p["x"].detach().requires_grad_()
    run(fn, leaves, x, p["dy"], backward, 3)  # warm-up: Triton compiles on first use
    sync(x.device)
    host, wall = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(fn, leaves, x, p["dy"], backward, calls)
        t1 = time.perf_counter()
        sync(x.device)
        t2 = time.perf_counter()
        host.append((t1 - t0) / calls * 1e6)
        wall.append((t2 - t0) / calls * 1e6)
    kernels = gpu_us = None
    if x.is_cuda:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run(fn, leaves, x, p["dy"], backward, 10)
            sync(x.device)
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = sum(e.count for e in events) / 10
        gpu_us = sum(getattr(e, "self_device_time_total", None) or e.self_cuda_time_total
                     for e in events) / 10
    return {"variant": name, "pass": "fwd+bwd" if backward else "fwd", "host_us": min(host),
            "wall_us": min(wall), "kernels_per_call": kernels, "gpu_kernel_us": gpu_us}


def launcher_us(p, calls):
    """Host us per call of the two Triton launchers alone (no autograd, no checks), and of
    F.linear for scale: what a launch itself costs."""
    from clear_fast.kernels import routed_lora as K
    x = p["x"].reshape(-1, p["x"].shape[-1])
    dy = p["dy"].reshape(x.shape)
    a, b = p["lora_A"], p["lora_B"]
    mask, rpm = torch.ones(1, device=x.device), x.shape[0]
    y, dx = torch.zeros_like(x), torch.zeros_like(x)
    u = K.lora_forward_(y, x, a, b, mask, rpm, 2.0)
    pa, pb = torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone())  # as a layer passes them
    fns = {"lora_forward_": lambda: K.lora_forward_(y, x, a, b, mask, rpm, 2.0),
           "lora_forward_ (adapters as nn.Parameter)": lambda: K.lora_forward_(y, x, pa, pb, mask, rpm, 2.0),
           "lora_backward": lambda: K.lora_backward(dy, x, u, a, b, mask, rpm, 2.0, dx),
           "F.linear": lambda: torch.nn.functional.linear(x, p["weight"], p["bias"])}
    out = {}
    for name, fn in fns.items():
        fn()
        sync(x.device)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            best = min(best, (time.perf_counter() - t0) / calls * 1e6)
            sync(x.device)
        out[name] = best
    return out


def stubbed_us(p, calls, repeats=5):
    """Host us of a routed@1 fwd+bwd call as it is, with the backward launcher replaced by a stub
    that launches nothing, and with both replaced: what each launch costs inside autograd (the
    backward runs on autograd's device thread)."""
    from clear_fast.kernels import routed_lora as K
    M, R = p["x"].numel() // p["x"].shape[-1], p["lora_A"].shape[0]
    u = torch.zeros(M, R, device=p["x"].device)
    grads = (torch.zeros_like(p["lora_A"]), torch.zeros_like(p["lora_B"]))
    real = K.lora_forward_, K.lora_backward
    out = {}
    try:
        for name, fwd, bwd in (("as is", *real), ("backward stubbed", real[0], lambda *a, **k: grads),
                               ("both stubbed", lambda *a, **k: u, lambda *a, **k: grads)):
            K.lora_forward_, K.lora_backward = fwd, bwd
            out[name] = measure("routed@1", p, True, calls, repeats)["host_us"]
    finally:
        K.lora_forward_, K.lora_backward = real
    # On a GPU autograd runs the backward on its own device thread; here on the calling thread.
    with torch.autograd.set_multithreading_enabled(False):
        out["as is, backward on the calling thread"] = measure("routed@1", p, True, calls, repeats)["host_us"]
    return out


def python_profile(name, p, calls, rows=25):
    """cProfile of `calls` fwd+bwd calls with the backward on the calling thread (cProfile sees
    one thread only): the Python functions the host time goes to, by own time."""
    import cProfile
    import io
    import pstats
    fn, leaves = impl(name, p)
    x = p["x"].detach().requires_grad_()
    with torch.autograd.set_multithreading_enabled(False):
        run(fn, leaves, x, p["dy"], True, 3)
        prof = cProfile.Profile()
        prof.enable()
        run(fn, leaves, x, p["dy"], True, calls)
        sync(x.device)
        prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(rows)
    return buf.getvalue()


def profile_table(name, p, rows=20):
    """torch.profiler's host-side table (self CPU time) of 20 fwd+bwd calls of one variant."""
    from torch.profiler import ProfilerActivity, profile
    fn, leaves = impl(name, p)
    x = p["x"].detach().requires_grad_()
    run(fn, leaves, x, p["dy"], True, 3)
    sync(x.device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if x.is_cuda else [])
    with profile(activities=acts) as prof:
        run(fn, leaves, x, p["dy"], True, 20)
        sync(x.device)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def _fmt(v, digits):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--dtype", default=None, help="activations: bfloat16 (GPU default) or float32")
    ap.add_argument("--rows", type=int, default=None, help="batch x 128 rows (default: lora_table's)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's host tables for routed@1 and peft fwd+bwd and "
                         "the host cost of the bare Triton launchers (not written to the results)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    p = make_problem(args.width, 1.0, device, dtype)
    if args.rows:
        p = {k: (v[: args.rows] if v.dim() == 3 or k == "mask" else v) for k, v in p.items()}
    rows = []
    for backward in (False, True):
        for name in VARIANTS:
            if name == "peft":
                try:
                    import peft  # noqa: F401
                except ImportError:
                    continue
            r = measure(name, p, backward, args.calls, args.repeats)
            rows.append(r)
            print(f"{r['pass']:8s} {name:15s} host {r['host_us']:8.1f} us  wall {r['wall_us']:8.1f} us"
                  f"  kernels {_fmt(r['kernels_per_call'], 0)}  GPU {_fmt(r['gpu_kernel_us'], 1)} us",
                  flush=True)
    if args.profile:
        if device.type == "cuda":
            print("host us per call, bare launchers:",
                  {k: round(v, 1) for k, v in launcher_us(p, args.calls).items()}, flush=True)
            print("host us per routed@1 fwd+bwd:",
                  {k: round(v, 1) for k, v in stubbed_us(p, args.calls).items()}, flush=True)
        for name in ("routed@1", "peft"):
            print(f"== torch.profiler, {name} fwd+bwd x 20\n{profile_table(name, p)}", flush=True)
        print(f"== cProfile, routed@1 fwd+bwd x {args.calls}\n{python_profile('routed@1', p, args.calls)}",
              flush=True)
    shape = f"{tuple(p['x'].shape)} {dtype}, width {args.width}"
    env = environment(device)
    tag = device_tag(device) + (f"_{args.dtype}" if args.dtype else "")  # default dtype: no suffix
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"host_{tag}.json"), "w") as f:
        json.dump({"environment": env, "shape": shape, "rows": rows}, f, indent=1)
    lines = ["# Host cost of one layer call", "",
             f"`{' '.join(['python benchmarks/host_overhead.py', *(argv or sys.argv[1:])])}`"
             f" - x {shape}; minimum of {args.repeats} loops of "
             f"{args.calls} calls.", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| pass | variant | host us / call | wall us / call | GPU kernels / call | GPU kernel us / call |",
             "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['pass']} | {r['variant']} | {r['host_us']:.1f} | {r['wall_us']:.1f} | "
                     f"{_fmt(r['kernels_per_call'], 0)} | {_fmt(r['gpu_kernel_us'], 1)} |")
    with open(os.path.join(args.out, f"host_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
