"""Routed LoRA linear vs F.linear, the dense masked reference, the released dual-path form and peft.

    python benchmarks/lora_table.py            # CPU: the gather path; GPU: the Triton path
    python benchmarks/lora_table.py --quick    # fewer repeats

Prints a table of times and ratios per width (BERT-base 768, MiniLM 384), routed fraction and pass
(forward, forward+backward), checks every candidate against the dense reference before timing it
(a fast wrong answer cannot win), and writes benchmarks/results/lora_<cpu|gpu name>.json and .md with the
machine, versions and date. On a GPU it also prints achieved TFLOP/s and GB/s against the floor
max(FLOPs / peak FLOP/s, bytes / peak bandwidth). bench_lora.py reuses the set-up below.
"""
import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from clear_fast.kernels.routed_lora import (routed_lora_reference_dense,
                                            routed_lora_reference_dual_path)
from clear_fast.lora import routed_lora_linear
from mixture_table import device_tag  # benchmarks/ is on sys.path (script or pytest)

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
WIDTHS = {"bert-base": 768, "minilm": 384}
RANK, ALPHA = 8, 16
IMPLS = ("routed", "linear", "dense", "dual_path", "peft")
# Peak dense bf16/fp16 tensor-core FLOP/s and HBM bandwidth (vendor figures) for the floor.
PEAKS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}


def shape_for(device):
    """(batch, seq): the issue's GPU shape; on the CPU a smaller one that runs in seconds."""
    return (32, 128) if device.type == "cuda" else (32, 64)


def make_problem(width, fraction, device, dtype, seed=0):
    """Inputs at a BERT-like shape; the first round(fraction * batch) samples are routed."""
    batch, seq = shape_for(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seq, width, generator=g).to(device, dtype)
    p = {
        "x": x,
        "weight": (torch.randn(width, width, generator=g) / math.sqrt(width)).to(device, dtype),
        "bias": torch.randn(width, generator=g).to(device, dtype),
        "lora_A": (torch.randn(RANK, width, generator=g) / math.sqrt(width)).to(device),
        "lora_B": torch.randn(width, RANK, generator=g).to(device),
        "dy": torch.randn(batch, seq, width, generator=g).to(device, dtype),
        "mask": torch.zeros(batch, dtype=torch.bool, device=device),
    }
    p["mask"][torch.randperm(batch, generator=g)[: round(fraction * batch)].to(device)] = True
    if dtype != torch.float32:  # mixed precision as in training: fp32 adapter, half activations
        p["lora_A"], p["lora_B"] = p["lora_A"].float(), p["lora_B"].float()
    return p


def _peft_layer(p):
    import peft

    width = p["x"].shape[-1]
    holder = torch.nn.Module()
    holder.proj = torch.nn.Linear(width, width, device=p["x"].device, dtype=p["x"].dtype)
    holder.proj.weight.data, holder.proj.bias.data = p["weight"], p["bias"]
    model = peft.get_peft_model(holder, peft.LoraConfig(r=RANK, lora_alpha=ALPHA,
                                                        target_modules=["proj"]))
    layer = model.base_model.model.proj
    layer.lora_A["default"].weight.data = p["lora_A"].clone()
    layer.lora_B["default"].weight.data = p["lora_B"].clone()
    return layer


def make_impl(name, p):
    """A callable(x) -> y for one implementation, with its adapter leaves (or none)."""
    scaling = ALPHA / RANK
    A = p["lora_A"].clone().requires_grad_()
    B = p["lora_B"].clone().requires_grad_()
    args = (p["weight"], p["bias"], A, B, scaling, p["mask"])
    if name == "routed":
        return lambda x: routed_lora_linear(x, *args), (A, B)
    if name == "dense":
        return lambda x: routed_lora_reference_dense(x, *args), (A, B)
    if name == "dual_path":
        return lambda x: routed_lora_reference_dual_path(x, *args), (A, B)
    if name == "linear":
        return lambda x: F.linear(x, p["weight"], p["bias"]), ()
    if name == "peft":  # every row adapted: peft has no routing
        layer = _peft_layer(p)
        return layer, tuple(q for q in layer.parameters() if q.requires_grad)
    raise ValueError(name)


def step(fn, x, dy, backward):
    y = fn(x)
    if backward:
        y.backward(dy)
    return y


def check(p, impls):
    """Every routed candidate against the dense reference, once, before timing."""
    x = p["x"].detach().requires_grad_()
    ref = routed_lora_reference_dense(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"],
                                      ALPHA / RANK, p["mask"])
    tol = 1e-3 if p["x"].dtype == torch.float32 else 5e-2
    for name in ("routed", "dual_path"):
        fn, _ = impls[name]
        torch.testing.assert_close(fn(x), ref, rtol=tol, atol=tol, msg=f"{name} is wrong")


def time_round_robin(impls, p, backward, repeats):
    """CPU: seconds per implementation over `repeats` runs, the implementations interleaved in
    every repeat so that a noisy shared machine slows them alike. Returns (minimum, median): the
    ratios use the minimum, the run least disturbed by other processes (as timeit advises)."""
    x = p["x"].detach().requires_grad_()
    times = {n: [] for n in impls}
    for rep in range(repeats + 2):  # two warm-up rounds
        for name, (fn, leaves) in impls.items():
            for leaf in (x, *leaves):
                leaf.grad = None
            t0 = time.perf_counter()
            step(fn, x, p["dy"], backward)
            t = time.perf_counter() - t0
            if rep >= 2:
                times[name].append(t)
    return ({n: min(v) for n, v in times.items()},
            {n: statistics.median(v) for n, v in times.items()})


def time_gpu(impls, p, backward):
    """triton.testing.do_bench medians (CUDA graphs are not used: launch latency is part of it)."""
    import triton

    x = p["x"].detach().requires_grad_()
    out = {}
    for name, (fn, leaves) in impls.items():
        def run():
            for leaf in (x, *leaves):
                leaf.grad = None
            step(fn, x, p["dy"], backward)
        out[name] = triton.testing.do_bench(run, warmup=25, rep=200, return_mode="median") / 1e3
    return out


def work(p, fraction, backward):
    """FLOPs and bytes the routed layer must at least move (base GEMMs + routed LoRA)."""
    M, d = p["x"].numel() // p["x"].shape[-1], p["x"].shape[-1]
    e = p["x"].element_size()
    Mr = fraction * M
    flops = 2 * M * d * d + 2 * Mr * RANK * 2 * d
    bytes_ = e * (2 * M * d + d * d) + e * 3 * Mr * d  # base in/out/W; LoRA re-reads x, r/w y
    if backward:
        flops += 2 * M * d * d + 4 * Mr * RANK * 2 * d
        bytes_ += e * (2 * M * d + d * d) + e * 5 * Mr * d
    return flops, bytes_


def environment(device):
    import triton
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "python": platform.python_version(), "torch": torch.__version__,
           "triton": triton.__version__, "machine": platform.machine(),
           "processor": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "load_average_1min": round(os.getloadavg()[0], 2)}  # other work on a shared machine
    try:
        import peft
        env["peft"] = peft.__version__
    except ImportError:
        pass
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    else:
        try:
            with open("/proc/cpuinfo") as f:
                env["cpu"] = next(ln.split(":", 1)[1].strip() for ln in f if "model name" in ln)
        except (OSError, StopIteration):
            pass
    return env


def measure(p, model, width, fraction, backward, repeats):
    """One table row: times of every implementation and the routed layer's ratios and rates."""
    impls = {n: make_impl(n, p) for n in IMPLS}
    check(p, impls)
    cuda = p["x"].is_cuda
    if cuda:
        t = median = time_gpu(impls, p, backward)
    else:
        t, median = time_round_robin(impls, p, backward, repeats)
    flops, bytes_ = work(p, fraction, backward)
    row = {"model": model, "width": width, "fraction": fraction,
           "pass": "fwd+bwd" if backward else "fwd",
           "ms": {n: round(v * 1e3, 4) for n, v in t.items()},
           "ms_median": {n: round(v * 1e3, 4) for n, v in median.items()},
           "routed_vs_linear": t["routed"] / t["linear"],
           "dual_path_vs_routed": t["dual_path"] / t["routed"],
           "dense_vs_routed": t["dense"] / t["routed"],
           "peft_vs_routed": t["peft"] / t["routed"],
           "tflops": flops / t["routed"] / 1e12, "gbps": bytes_ / t["routed"] / 1e9}
    name = torch.cuda.get_device_name(p["x"].device) if cuda else ""
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    if peak:
        row["floor_fraction"] = max(flops / peak[0], bytes_ / peak[1]) / t["routed"]
    return row


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    repeats = args.repeats or (5 if args.quick else 15)
    load_before = round(os.getloadavg()[0], 2)
    rows = []
    for model, width in WIDTHS.items():
        for fraction in FRACTIONS:
            p = make_problem(width, fraction, device, dtype)
            for backward in (False, True):
                rows.append(measure(p, model, width, fraction, backward, repeats))
                print(_line(rows[-1]), flush=True)
    env = environment(device)
    env["load_average_1min"] = [load_before, env["load_average_1min"]]  # before, after
    result = {"command": " ".join(["python benchmarks/lora_table.py", *argv]),
              "environment": env, "device": device.type, "dtype": str(dtype),
              "shape": dict(zip(("batch", "seq"), shape_for(device))), "rank": RANK,
              "repeats": repeats, "rows": rows, "targets": targets(rows, device.type)}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"lora_{device_tag(device)}")
    if args.threads:
        stem += f"_{args.threads}t"
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(result))
    print(json.dumps(result["targets"], indent=1))
    print(f"wrote {stem}.json and {stem}.md")


def _line(r):
    ms = r["ms"]
    return (f"{r['model']:9s} f={r['fraction']:.2f} {r['pass']:7s} routed {ms['routed']:8.3f} ms  "
            f"linear {ms['linear']:8.3f}  dense {ms['dense']:8.3f}  dual {ms['dual_path']:8.3f}  "
            f"peft {ms['peft']:8.3f} | routed/linear {r['routed_vs_linear']:.3f}  "
            f"dual/routed {r['dual_path_vs_routed']:.2f}  dense/routed {r['dense_vs_routed']:.2f}"
            f" | "
            f"{r['tflops']:.2f} TFLOP/s {r['gbps']:.0f} GB/s"
            + (f", {100 * r['floor_fraction']:.0f}% of floor" if "floor_fraction" in r else ""))


def targets(rows, device):
    """The issue's targets, on forward+backward rows."""
    fb = [r for r in rows if r["pass"] == "fwd+bwd"]
    zero = [r["routed_vs_linear"] for r in fb if r["fraction"] == 0]
    if device == "cuda":
        one = [r["routed_vs_linear"] for r in fb if r["fraction"] == 1]
        dual = [r["dual_path_vs_routed"] for r in fb]
        return {"fraction 0 within 3% of F.linear": max(zero) <= 1.03,
                "fraction 1 at most 1.3x F.linear": max(one) <= 1.3,
                "at least 2x faster than dual path at every fraction": min(dual) >= 2,
                "worst ratios": {"f0_vs_linear": max(zero), "f1_vs_linear": max(one),
                                 "dual_vs_routed": min(dual)}}
    dense = [r["dense_vs_routed"] for r in rows]
    half = [r["dual_path_vs_routed"] for r in fb if r["fraction"] == 0.5]
    return {"fraction 0 within 5% of F.linear": max(zero) <= 1.05,
            "never slower than the dense masked reference": min(dense) >= 1.0,
            "at least 1.6x faster than dual path at fraction 0.5": min(half) >= 1.6,
            "worst ratios": {"f0_vs_linear": max(zero), "dense_vs_routed": min(dense),
                             "dual_vs_routed_at_0.5": min(half)}}


def markdown(res):
    env = res["environment"]
    lines = [f"# Routed LoRA linear, {res['device'].upper()} ({res['dtype']})", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             f"Shape: batch {res['shape']['batch']} x seq {res['shape']['seq']} rows, rank "
             f"{res['rank']}; CPU: minimum of {res['repeats']} interleaved runs (medians in the JSON); "
             "GPU: do_bench median. "
             f"Command: `{res['command']}`.", "",
             "| model | fraction | pass | routed ms | F.linear ms | dense ms | dual-path ms "
             "| peft ms | routed / F.linear | dual / routed | dense / routed | routed TFLOP/s "
             "| routed GB/s | floor / routed |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        ms = r["ms"]
        lines.append(f"| {r['model']} | {r['fraction']:.2f} | {r['pass']} | {ms['routed']:.3f} | "
                     f"{ms['linear']:.3f} | {ms['dense']:.3f} | {ms['dual_path']:.3f} | "
                     f"{ms['peft']:.3f} | {r['routed_vs_linear']:.3f} | "
                     f"{r['dual_path_vs_routed']:.2f} | {r['dense_vs_routed']:.2f} | "
                     f"{r['tflops']:.3f} | {r['gbps']:.1f} | "
                     f"{r.get('floor_fraction', float('nan')):.2f} |")
    lines += ["", "Targets (forward+backward rows; 'never slower than dense' on all rows):", ""]
    for k, v in res["targets"].items():
        lines.append(f"- {k}: {v}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
