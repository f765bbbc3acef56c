"""Where one training step's time goes, clear-lora against plain LoRA (and peft): host or GPU, and
which ops differ.

    python benchmarks/profile_step.py                      # MiniLM, length 128 (the step gap's worst)
    python benchmarks/profile_step.py --models minilm bert-base --lengths 64 128

The steps are epoch_table.py's (one fixed batch of 32, Run.train_step plus the loop's bookkeeping,
random-weight BERT-shaped models). Per variant, after warm-up steps:
  wall ms      one step, CUDA events (a GPU) or perf_counter (the CPU), median of --repeats
  host ms      the host's time to issue one step, no sync inside (perf_counter, median); on a GPU
               near wall ms means the step is host-bound (the GPU waits for launches)
  GPU ms       the sum of the step's kernel times (torch.profiler, per step over --profile-steps
               steps): the GPU's work; wall - GPU is the time it sat idle
  kernels      kernels launched per step
Then the ops (aten ops' host self time; on a GPU also kernels' device time) whose per-step cost
differs most between clear-lora and plain LoRA: the gap, itemised. Writes
benchmarks/results/step_profile_<device>.{json,md}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from epoch_table import GAMMA, NOISE_RATES, _commit, base_classifier, step_cases, sync, timed  # noqa: E402
from mixture_table import device_tag, machine  # noqa: E402

from clear_fast.io import write_text  # noqa: E402

ROUTED = f"clear-lora@{GAMMA * (1 - NOISE_RATES[0]):.2f}"  # the larger routed fraction: the bigger gap
VARIANTS = (ROUTED, "lora", "peft")


def host_seconds(fn, device):
    """Seconds the host takes to issue fn() (the GPU's queue drained first, not waited on after)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    t = time.perf_counter() - t0
    sync(device)
    return t


def op_costs(fn, device, steps):
    """{"host": {aten op: (calls, us) per step}, "gpu": {kernel: (launches, us) per step}} over
    `steps` profiled steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        sync(device)
    host, gpu = {}, {}
    for e in prof.key_averages():
        if e.device_type == DeviceType.CUDA:
            gpu[e.key] = (e.count / steps, e.self_device_time_total / steps)
        elif e.key.startswith("aten::"):
            host[e.key] = (e.count / steps, e.self_cpu_time_total / steps)
    return {"host": host, "gpu": gpu}


def profile_row(base, device, seq, repeats, profile_steps):
    cases = {k: v for k, v in step_cases(base, device, seq, bf16=False).items() if k in VARIANTS}
    wall, host = {k: [] for k in cases}, {k: [] for k in cases}
    for rep in range(2 + repeats):  # interleaved, as epoch_table.time_steps; two warm-up rounds
        for k, (_, fn) in cases.items():
            fn()
            w, h = timed(fn, device), host_seconds(fn, device)
            if rep >= 2:
                wall[k].append(w)
                host[k].append(h)
    ops = {k: op_costs(fn, device, profile_steps) for k, (_, fn) in cases.items()}
    summary = {}
    for k in cases:
        gpu = ops[k]["gpu"]
        summary[k] = {"wall_ms": 1e3 * statistics.median(wall[k]), "host_ms": 1e3 * statistics.median(host[k]),
                      "gpu_ms": sum(us for _, us in gpu.values()) / 1e3 if gpu else None,
                      "kernels": sum(n for n, _ in gpu.values()) if gpu else None,
                      "aten_calls": sum(n for n, _ in ops[k]["host"].values())}
    return {"seq": seq, "summary": summary, "differences": {
        side: differences(ops[ROUTED][side], ops["lora"][side]) for side in ("host", "gpu")}}


def differences(a, b, k=12):
    """The k ops whose per-step cost differs most between a and b: (op, calls a, calls b, us a, us b)."""
    rows = [(op, a.get(op, (0, 0))[0], b.get(op, (0, 0))[0], a.get(op, (0, 0))[1], b.get(op, (0, 0))[1])
            for op in set(a) | set(b)]
    rows.sort(key=lambda r: -abs(r[3] - r[4]))
    return rows[:k]


def markdown(result, command):
    lines = ["# One training step: host or GPU, and what clear-lora adds to plain LoRA", "", f"`{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
             "Method: see the docstring of benchmarks/profile_step.py.", ""]
    for row in result["rows"]:
        lines += [f"## {row['model']}, length {row['seq']}", "",
                  "| variant | wall ms | host ms | GPU ms | GPU busy | kernels | aten calls |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for k, s in row["summary"].items():
            gpu = "-" if s["gpu_ms"] is None else f"{s['gpu_ms']:.2f}"
            busy = "-" if s["gpu_ms"] is None else f"{s['gpu_ms'] / s['wall_ms']:.2f}"
            kern = "-" if s["kernels"] is None else f"{s['kernels']:.0f}"
            lines.append(f"| {k} | {s['wall_ms']:.2f} | {s['host_ms']:.2f} | {gpu} | {busy} | {kern} | "
                         f"{s['aten_calls']:.0f} |")
        for side, what in (("host", "aten ops, host self time"), ("gpu", "kernels, device time")):
            diffs = row["differences"][side]
            if not diffs:
                continue
            lines += ["", f"{what}: largest differences per step, {ROUTED} vs lora", "",
                      f"| op | calls {ROUTED} | calls lora | us {ROUTED} | us lora |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {op[:90]} | {na:.0f} | {nb:.0f} | {ta:.1f} | {tb:.1f} |" for op, na, nb, ta, tb in diffs]
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm"], choices=["minilm", "bert-base"])
    ap.add_argument("--lengths", nargs="+", type=int, default=[128])
    ap.add_argument("--repeats", type=int, default=None, help="timed steps per variant (default 30 GPU, 5 CPU)")
    ap.add_argument("--profile-steps", type=int, default=None, help="profiled steps (default 20 GPU, 2 CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    repeats = args.repeats or (30 if gpu else 5)
    profile_steps = args.profile_steps or (20 if gpu else 2)
    result = {"machine": {**machine(), "commit": _commit()}, "rows": []}
    for name in args.models:
        base = base_classifier(name)
        for seq in args.lengths:
            row = {"model": name, **profile_row(base, device, seq, repeats, profile_steps)}
            result["rows"].append(row)
            print(json.dumps({"model": name, "seq": seq, "summary": row["summary"]}, indent=1), flush=True)
    command = "python benchmarks/profile_step.py " + " ".join(argv if argv is not None else sys.argv[1:])
    stem = os.path.join(args.out, f"step_profile_{device_tag(device)}")
    write_text(stem + ".json", json.dumps(result, indent=1))
    write_text(stem + ".md", markdown(result, command.strip()))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
