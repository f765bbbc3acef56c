"""GPU time of the routed LoRA kernels under alternative tile configurations (GPU only).

    python benchmarks/lora_kernel_sweep.py

The fused kernels (kernels/routed_lora.py) are latency-bound at training sizes: a 32 x 128 x 768
layer has a few hundred row tiles, each walking its chunks one after another, and the bytes they
must move take under 10 us on an H200. This sweep times each TileConfig (rows per tile, chunk
width, warps, pipelining depth, half-precision dots for fp32 adapters) for the forward and the
backward launcher alone - GPU time per call from CUDA-graph replays (gpu_ms) - after checking each
against the default configuration (a fast wrong configuration cannot win). The floor column is
bytes moved / 4.8 TB/s (H200 HBM).

Writes benchmarks/results/lora_kernel_sweep_<device>.{json,md}; CONFIG's defaults should follow it.
"""
import argparse
import itertools
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lora_table import environment  # noqa: E402
from mixture_table import device_tag  # noqa: E402

from clear_fast.kernels import routed_lora as K  # noqa: E402

RANK, SCALING, SEQ = 8, 2.0, 128  # rows per sample: the mask is per sample, as in training
# (block_m, block_k = block_n, num_warps, num_stages): the default and the ones that compile for
# sm_90 without register spills (ptxas -v on Triton's PTX, no GPU needed; wider chunks and 4 warps
# at 32-64 rows spill hundreds of bytes in the backward).
SHAPES = [(64, 64, 4, 3), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 1), (16, 64, 8, 2),
          (16, 64, 8, 1), (16, 128, 8, 1), (32, 128, 8, 1)]
HBM = 4.8e12  # bytes/s, H200 (vendor figure); the floor is indicative on other GPUs


def problem(rows, width, dtype, adapter_dtype, fraction, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(rows, width, generator=g).to(device, dtype)
    dy = torch.randn(rows, width, generator=g).to(device, dtype)
    a = (torch.randn(RANK, width, generator=g) / width ** 0.5).to(device, adapter_dtype)
    b = torch.randn(width, RANK, generator=g).to(device, adapter_dtype)
    samples = rows // SEQ
    mask = (torch.arange(samples) < round(fraction * samples)).float().to(device)
    return x, dy, a, b, mask


def floor_us(rows, width, dtype, fraction):
    """Bytes the routed rows must move: forward reads x and y and writes y; backward reads dY twice
    and x, reads and writes dX."""
    e = torch.finfo(dtype).bits // 8
    routed = rows * fraction * width * e
    return {"fwd": 3 * routed / HBM * 1e6, "bwd": 5 * routed / HBM * 1e6}


def gpu_ms(fn, launches=20, replays=10):
    """GPU milliseconds per call of fn: `launches` calls captured in one CUDA graph, the median of
    `replays` timed replays. A loop of eager calls would time the host instead (a launch costs the
    host 40-70 us, about what these kernels take); the operands stay in L2 between calls."""
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    g.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        g.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / launches)
    return sorted(times)[len(times) // 2]


def run_config(cfg, x, dy, a, b, mask):
    y = torch.zeros_like(x)
    u = K.lora_forward_(y, x, a, b, mask, SEQ, SCALING, cfg)
    dx = torch.zeros_like(x)
    dA, dB = K.lora_backward(dy, x, u, a, b, mask, SEQ, SCALING, dx, cfg)
    return y, dx, dA, dB, u


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=32 * SEQ)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("lora_kernel_sweep.py times compiled kernels: it needs a CUDA GPU")
    device = torch.device("cuda")
    configs = [K.TileConfig(block_m=m, block_k=kn, block_n=kn, num_warps=w, num_stages=st, half_dots=h)
               for (m, kn, w, st), h in itertools.product(SHAPES, (False, True))]
    rows = []
    for (dtype, adapter_dtype), fraction in itertools.product(
            [(torch.bfloat16, torch.float32), (torch.float32, torch.float32)], args.fractions):
        x, dy, a, b, mask = problem(args.rows, args.width, dtype, adapter_dtype, fraction, device)
        ref = run_config(K.CONFIG, x, dy, a, b, mask)
        floor = floor_us(args.rows, args.width, dtype, fraction)
        for cfg in configs:
            if cfg.half_dots and dtype == torch.float32:
                continue  # no half activations: the same kernels as half_dots=False
            try:
                got = run_config(cfg, x, dy, a, b, mask)
            except Exception as e:  # e.g. out of shared memory: report, go on
                print(f"{cfg}: {type(e).__name__}: {str(e)[:120]}", flush=True)
                continue
            # Against the default configuration: equal up to accumulation order, or up to half
            # rounding of the adapters with half_dots.
            err = max(((g.float() - r.float()).abs().max() / r.float().abs().max().clamp_min(1e-30)).item()
                      for g, r in zip(got[:4], ref[:4]))
            if err > (3e-2 if cfg.half_dots else 1e-3):
                print(f"{cfg}: WRONG (relative error {err:.2e}), not timed", flush=True)
                continue
            y, dx = torch.zeros_like(x), torch.zeros_like(x)
            u = got[4]
            fwd = gpu_ms(lambda: K.lora_forward_(y, x, a, b, mask, SEQ, SCALING, cfg))
            bwd = gpu_ms(lambda: K.lora_backward(dy, x, u, a, b, mask, SEQ, SCALING, dx, cfg))
            row = {"dtype": str(dtype).replace("torch.", ""), "adapter": str(adapter_dtype).replace("torch.", ""),
                   "fraction": fraction, **cfg._asdict(), "fwd_us": fwd * 1e3, "bwd_us": bwd * 1e3,
                   "floor_fwd_us": floor["fwd"], "floor_bwd_us": floor["bwd"], "rel_err_vs_default": err,
                   "default": cfg == K.CONFIG}
            rows.append(row)
            print(f"{row['dtype']}/{row['adapter']} f={fraction} {cfg}: fwd {row['fwd_us']:.1f} us  "
                  f"bwd {row['bwd_us']:.1f} us  (floor {floor['fwd']:.1f} / {floor['bwd']:.1f})", flush=True)
    env = environment(device)
    tag = device_tag(device)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"lora_kernel_sweep_{tag}.json"), "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    lines = ["# Routed LoRA kernels: GPU time by tile configuration", "",
             f"`python benchmarks/lora_kernel_sweep.py` - {args.rows} rows x {args.width}, rank {RANK}; "
             "GPU time per call, CUDA-graph replays (gpu_ms).", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in env.items()), "",
             "| x / adapter | fraction | block_m | block_k = block_n | warps | stages | half dots | fwd us | bwd us | "
             "floor fwd / bwd us | rel. error vs default |", "|---|---|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in sorted(rows, key=lambda r: (r["dtype"], -r["fraction"], r["fwd_us"] + r["bwd_us"])):
        mark = " (default)" if r["default"] else ""
        lines.append(f"| {r['dtype']} / {r['adapter']} | {r['fraction']} | {r['block_m']} | {r['block_k']} | "
                     f"{r['num_warps']} | {r['num_stages']} | {r['half_dots']}{mark} | {r['fwd_us']:.1f} | {r['bwd_us']:.1f} | "
                     f"{r['floor_fwd_us']:.1f} / {r['floor_bwd_us']:.1f} | {r['rel_err_vs_default']:.1e} |")
    with open(os.path.join(args.out, f"lora_kernel_sweep_{tag}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
