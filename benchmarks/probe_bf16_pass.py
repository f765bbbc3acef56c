"""Diagnostic: where the time of the clean-probability pass goes under bf16 autocast on a GPU.

    PYTHONPATH=$PWD python benchmarks/probe_bf16_pass.py     # on the GPU machine (gpu_all.sh's setup)
    PROBE_DEVICE=cpu PROBE_N=40 python benchmarks/probe_bf16_pass.py   # a dry run here

Times Run.predict's 2-pass pass (MiniLM-sized random model, 1280 samples of length <= 128) four
times each way: fp32 / bf16, separate passes / shared prefix, equal lengths, the routed layer's torch
path; prints the Triton kernel cache sizes (recompiles) and a torch.profiler table of the bf16
shared-prefix pass. On an H100 (benchmarks/results/probe_bf16_pass_gpu_nvidia_h100_80gb_hbm3.log,
before the fix) the bf16 shared-prefix pass took 2.4-2.6 s against 0.18 s for separate passes, 90 %
of it host time in aten::_cudnn_attention_forward (~20 ms a call: cuDNN builds a plan per new
shape, and the shared prefix's row counts change every call); no Triton recompiles. Fixed by
clear_fast.model.without_cudnn_attention.
"""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch
import epoch_table as et
import clear_fast.lora as lora_mod

dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
N = int(os.environ.get("PROBE_N", "1280"))
sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
base = et.base_classifier(os.environ.get("PROBE_MODEL", "minilm"))
train = et.synthetic_split(N, 128, seed=3)
train_eq = et.synthetic_split(N, 128, seed=3, min_frac=1.0)
model, router = et.build("clear-lora", base, dev)
run32 = et.make_run("clear-lora", model, router, dev, train)
run16 = et.make_run("clear-lora", model, router, dev, train, bf16=True)


def cache_sizes():
    from clear_fast.kernels import routed_lora as rl
    out = {}
    for name in ("_forward_kernel", "_backward_kernel"):
        fn = getattr(rl, name)
        caches = getattr(fn, "device_caches", {})
        out[name] = sum(len(v[0]) for v in caches.values()) if caches else None
    return out


def times(label, fn, n=4):
    ts = []
    for _ in range(n):
        sync(); t0 = time.perf_counter(); fn(); sync()
        ts.append(round(time.perf_counter() - t0, 3))
    print(f"{label:40s} {ts} caches {cache_sizes()}", flush=True)


times("fp32 separate", lambda: et.predict_with(run32, train, False))
times("fp32 shared", lambda: et.predict_with(run32, train, True))
times("bf16 separate", lambda: et.predict_with(run16, train, False))
times("bf16 shared", lambda: et.predict_with(run16, train, True))
times("bf16 shared, equal lengths", lambda: et.predict_with(run16, train_eq, True))
times("bf16 separate, equal lengths", lambda: et.predict_with(run16, train_eq, False))
orig = lora_mod.use_triton
lora_mod.use_triton = lambda t, b: False
times("bf16 shared, torch LoRA path", lambda: et.predict_with(run16, train, True))
lora_mod.use_triton = orig

from torch.profiler import ProfilerActivity, profile
for label, r in (("bf16 shared", run16),):
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        et.predict_with(r, train, True)
        sync()
    ka = prof.key_averages()
    print("== by self CPU", label)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=70))
    print("== by self device", label)
    print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=70))
