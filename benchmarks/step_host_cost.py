"""Host time of a training step and of one layer call, on the GPU's code path, without a GPU.

    TRITON_INTERPRET=0 python benchmarks/step_host_cost.py [--models minilm bert-base] [--rounds 7]

A training step at batch 32 is host-bound on a GPU (benchmarks/results/epoch_gpu_*.md): the step
costs what its host work costs - Python, autograd, aten's dispatch and the kernel launches. This
times that host work here: the routed layers and the loss take their GPU code path (Triton
kernels compiled for sm_90 behind tests/stand_in_gpu.py's stand-in driver, the final driver call a
no-op), aten operations run on CPU tensors of tiny widths (their dispatch, not their arithmetic,
is what costs), AdamW is fused as Run makes it on CUDA, and the routed layer skips its check of
mask values as it does on CUDA. Not included: the CUDA driver's own
launch calls (a few us each on a GPU host) and the hand-off of backward() to autograd's device
thread (once per step). Kernel outputs are left unwritten, so the numbers computed are garbage:
only the time is read.

Rows: building one batch (Tokenized.batch, every step's host work before its forward); per step,
by variant (epoch_table.py's variants, routed fraction 0.68 for clear-lora), also under bf16 autocast
(--bf16: the aten ops then run in bf16 on the CPU, the kernels are compiled for bf16); per layer
call, forward + backward of the routed layer (all routed; clear-lora's masks) against peft's LoRA
and F.linear. Median of rounds, each the mean per call over a loop that follows an untimed call
(the first call after another variant's runs on cold caches), the variants interleaved. The model structure is that of MiniLM / BERT-base (layer counts), widths tiny.
Parts: the same step of each variant cut into Run.train_step's parts (routing masks, forward,
loss, backward, AdamW with zero_grad), each timed on its own, median over rounds x steps.
Epoch loop: whole Run.train_epoch calls (batches of varying length built each step, routing masks,
the loop's bookkeeping; clear-lora also with --clean-prob-source train-steps, which records each
step's outputs), host ms per step, median over as many interleaved rounds.
"""
import argparse
import os
import statistics
import sys
import time

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("run with TRITON_INTERPRET=0: this times the compiled kernels' launch path")

import numpy as np  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(os.path.dirname(HERE), "tests")]
import epoch_table as et  # noqa: E402
import step_launches as sl  # noqa: E402
from mixture_table import machine, save_json_and_md  # noqa: E402
from stand_in_gpu import install as install_stand_in_gpu  # noqa: E402

import clear_fast.kernels.utils as kernel_utils  # noqa: E402
import clear_fast.lora  # noqa: E402


def gpu_code_path():
    """Kernels compiled for sm_90 and launched into a no-op: 'auto' picks them on CPU tensors. The
    routed layer's check of mask values, made on CPU tensors only (on CUDA a host sync), is off."""
    install_stand_in_gpu()
    clear_fast.lora._check_mask_values = lambda m: None
    os.environ["CLEAR_FAST_AUTO_BACKEND"] = "triton"
    kernel_utils.interpreting = lambda: True  # use_triton's guard: the kernels are compiled, not interpreted


def per_call_us(fn, calls):
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved(fns, rounds, calls):
    """{label: median over rounds of us per call}, every label once per round, its timed calls right
    after an untimed one (the first call after another label's runs on cold caches)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            fn()
            times[k].append(per_call_us(fn, calls))
    return {k: statistics.median(v) for k, v in times.items()}


def small_base(model_name):
    """A random classifier with the layer counts of `model_name` and tiny widths."""
    et.MODELS[model_name + "-small"] = sl.MODELS[model_name]
    return et.base_classifier(model_name + "-small")


def cpu_run(kind, base, **make_run_args):
    """A Run of variant `kind` around a copy of base on the CPU, AdamW fused as Run makes it on CUDA."""
    model, router = et.build(kind, base, torch.device("cpu"))
    run = et.make_run(kind, model, router, torch.device("cpu"), **make_run_args)
    for group in run.optimizer.param_groups:
        group["fused"] = True
    return run


def routed_label(kind):
    return f"{kind}@{et.GAMMA * (1 - sl.NOISE):.2f}"


def step_cases(model_name, kinds, bf16=False):
    """(batch of 32 x 16 tokens, {variant label: (run, routing probabilities, teacher)}): a Run per
    variant around a copy of one small model; bf16: under bf16 autocast, as --bf16 runs."""
    base = small_base(model_name)
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, et.VOCAB, (et.BATCH, sl.SEQ), generator=g),
             "attention_mask": torch.ones(et.BATCH, sl.SEQ, dtype=torch.long),
             "labels": torch.randint(0, et.NUM_LABELS, (et.BATCH,), generator=g)}
    teacher = torch.randn(et.BATCH, et.NUM_LABELS, generator=g)
    cases = {}
    for kind in kinds:
        run = cpu_run(kind, base, bf16=bf16)
        routed = kind in ("clear-lora", "reference")
        p = et.GAMMA * et.clean_flags(et.BATCH, sl.NOISE, seed=2) if routed else None
        cases[routed_label(kind) if routed else kind] = (run, p, teacher if routed else None)
    return batch, cases


def step_fns(model_name, bf16=False):
    """{variant: a training step as epoch_table.step_fn takes it}."""
    batch, cases = step_cases(model_name, et.VARIANTS, bf16)
    return {label: et.step_fn(run, batch, p, t) for label, (run, p, t) in cases.items()}


def step_parts_ms(model_name, rounds, steps=5):
    """{variant: {part: median ms}}: Run.train_step's parts timed one by one (its body, written out
    here to put a clock between the parts), the variants interleaved in every round."""
    from clear_fast.losses import clear_loss

    batch, cases = step_cases(model_name, ("clear-lora", "lora", "peft"))
    for run, _, _ in cases.values():
        run.model.train()

    def one_step(run, p, t):
        clock = [time.perf_counter()]
        run._route(p)
        clock.append(time.perf_counter())
        logits = run._logits(batch)
        clock.append(time.perf_counter())
        loss, _ = clear_loss(logits, batch["labels"], t, run.cfg.consistency_weight, run.cfg.temperature)
        clock.append(time.perf_counter())
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        clock.append(time.perf_counter())
        run.optimizer.step()
        clock.append(time.perf_counter())
        return [(b - a) * 1e3 for a, b in zip(clock, clock[1:])]

    names = ("routing", "forward", "loss", "backward", "AdamW")
    times = {k: [] for k in cases}
    for r in range(rounds + 1):  # round 0 warms up
        for k, case in cases.items():
            for _ in range(steps):
                parts = one_step(*case)
                if r:
                    times[k].append(parts)
    return {k: dict(zip(names, (statistics.median(col) for col in zip(*v)))) for k, v in times.items()}


def epoch_loop_ms(model_name, rounds, n=320, length=16):
    """{variant: host ms per step of Run.train_epoch}: whole training epochs (batches built from a
    synthetic split of lengths <= `length`, masks drawn, per-sample outputs recorded for train-steps),
    the variants interleaved, median over rounds after one untimed round. What the epoch loop adds to
    the steps shows beside the step rows."""
    base = small_base(model_name)
    train = et.synthetic_split(n, length, seed=10)
    cases = {}
    for label, kind, source in (("clear-lora", "clear-lora", "pass"), ("clear-lora-train-steps", "clear-lora", "train-steps"),
                                ("lora", "lora", "pass"), ("peft", "peft", "pass")):
        run = cpu_run(kind, base, train=train, source=source)
        routed = kind == "clear-lora"
        p = et.GAMMA * et.clean_flags(n, sl.NOISE, seed=3) if routed else None
        teacher = torch.randn(n, et.NUM_LABELS, generator=torch.Generator().manual_seed(4)) if routed else None
        cases[routed_label(label) if routed else label] = (run, p, teacher)
    steps = -(-n // et.BATCH)
    times = {k: [] for k in cases}
    for r in range(rounds + 1):
        for k, (run, p, teacher) in cases.items():
            t0 = time.perf_counter()
            run.train_epoch(3, p, teacher)
            if r:
                times[k].append((time.perf_counter() - t0) * 1e3 / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def layer_fns(width=32, rows=(32, 16)):
    """{variant: forward + backward of one layer call} at a tiny width."""
    from peft import LoraConfig, get_peft_model

    from clear_fast import RoutedLoRALinear

    torch.manual_seed(0)
    linear = torch.nn.Linear(width, width)
    routed = RoutedLoRALinear.from_linear(linear, r=et.LORA["r"], lora_alpha=et.LORA["lora_alpha"])
    peft_layer = get_peft_model(torch.nn.Sequential(torch.nn.Linear(width, width)),
                                LoraConfig(r=et.LORA["r"], lora_alpha=et.LORA["lora_alpha"], target_modules=["0"]))
    x = torch.randn(*rows, width, requires_grad=True)
    mask = torch.rand(rows[0]) < 0.68

    def fwd_bwd(fn):
        return lambda: fn().sum().backward()

    return {"routed, mask": fwd_bwd(lambda: routed(x, mask)),
            "routed, no mask": fwd_bwd(lambda: routed(x)),
            "peft": fwd_bwd(lambda: peft_layer(x)),
            "F.linear": fwd_bwd(lambda: linear(x))}


def batch_fn(n=1280, length=128):
    """Building one training batch of 32 (Tokenized.batch) from a split of lengths <= `length`."""
    split = et.synthetic_split(n, length, seed=3)
    index = np.random.default_rng(0).permutation(n)[: et.BATCH]
    return {"Tokenized.batch": lambda: split.batch(index, torch.device("cpu"))}


def table(result):
    lines = ["# Host time of a step and of a layer call, GPU code path, no GPU", "",
             f"`TRITON_INTERPRET=0 python benchmarks/step_host_cost.py --rounds {result['rounds']}` (method: the module docstring)", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()), "",
             "| what | variant | host us | / F.linear |", "|---|---|---:|---:|"]
    layer = result["layer_us"]
    lines += [f"| layer fwd+bwd | {k} | {v:.1f} | {v / layer['F.linear']:.2f} |" for k, v in layer.items()]
    lines += [f"| batch of 32, length <= 128 | {k} | {v:.1f} | - |" for k, v in result["batch_us"].items()]
    lines += ["", "| model | variant | host ms per step | / lora | / peft |", "|---|---|---:|---:|---:|"]
    for suffix, key in (("", "step_us"), (", bf16 autocast", "step_us_bf16")):
        for name, steps in result.get(key, {}).items():
            lines += [f"| {name}{suffix} | {k} | {v / 1e3:.2f} | {v / steps['lora']:.3f} | {v / steps['peft']:.3f} |"
                      for k, v in steps.items()]
    for name, loop in result.get("epoch_loop_ms", {}).items():
        lines += ["", f"{name}, Run.train_epoch (320 samples, lengths <= 16): host ms per step", "",
                  "| variant | ms per step | / lora | / peft |", "|---|---:|---:|---:|"]
        lines += [f"| {k} | {v:.2f} | {v / loop['lora']:.3f} | {v / loop['peft']:.3f} |" for k, v in loop.items()]
    for name, variants in result.get("step_parts_ms", {}).items():
        parts = list(next(iter(variants.values())))
        lines += ["", f"{name}, a step by part (ms, median)", "", "| variant | " + " | ".join(parts) + " |",
                  "|---|" + "---:|" * len(parts)]
        lines += [f"| {k} | " + " | ".join(f"{v[p]:.2f}" for p in parts) + " |" for k, v in variants.items()]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=["minilm", "bert-base"], choices=list(sl.MODELS))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # unwritten kernel outputs may hold denormals, slow on a CPU
    gpu_code_path()
    result = {"machine": machine(), "rounds": args.rounds,
              "layer_us": interleaved(layer_fns(), args.rounds, calls=200),
              "batch_us": interleaved(batch_fn(), args.rounds, calls=200),
              "step_us": {name: interleaved(step_fns(name), args.rounds, calls=5) for name in args.models},
              "step_us_bf16": {name: interleaved(step_fns(name, bf16=True), args.rounds, calls=5)
                               for name in args.models},
              "step_parts_ms": {name: step_parts_ms(name, args.rounds) for name in args.models},
              "epoch_loop_ms": {name: epoch_loop_ms(name, args.rounds) for name in args.models}}
    md = table(result)
    save_json_and_md(args.out, "step_host_cost", result, md)
    print(md)


if __name__ == "__main__":
    main()
