"""End to end: CleaR training steps and whole epochs against plain LoRA, peft and the released code.

    python benchmarks/epoch_table.py             # MiniLM and BERT-base sizes, lengths 64 and 128
    python benchmarks/epoch_table.py --quick     # MiniLM, length 64, few steps (as bench_epoch.py)
    python benchmarks/epoch_table.py --compile reduce-overhead   # steps of compiled models (CUDA graphs)

Random-weight BertForSequenceClassification models built from configs (no download), batch 32,
routed fractions gamma x (1 - noise rate) for noise 0.2 and 0.4 (gamma 0.85). Variants:
  clear-lora   clear_fast's routed layer, masks drawn per layer, CE + consistency loss;
  lora         the same layer with every sample routed, CE only (plain LoRA);
  peft         peft's LoRA (get_peft_model, query/value, r 4, alpha 1), CE only;
  reference    the released implementation's cost (benchmarks/reference.py): a frozen copy of
               every encoder layer run beside the adapted one, blended per sample; sklearn GMM.

Sections:
  step    one training step as Run.train_epoch takes it (Run.train_step: masks, forward, loss,
          backward, AdamW; then the loop's loss sum and routed count; train mode set once), the
          variants interleaved in every repeat, each timed step right after an untimed one of the
          same variant, median; CUDA events on a GPU. Step results committed before 997efa9 set
          train mode in every step (a module walk, 0.5-0.9 ms of host time on this CPU, the most in
          peft's model): their step ratios lean toward 1. Results committed before the untimed step
          was added timed each step right after another variant's, on cold caches: the variant that
          followed the reference (clear-lora at the larger routed fraction) paid the most.
  memory  on a GPU the peak allocated bytes of a step (torch.cuda.max_memory_allocated); on the
          CPU, where no allocator reports a peak, an account of what a step holds at its peak:
          parameters + optimizer state + gradients + the activations autograd saves for backward
          (unique storages seen by saved_tensors_hooks). It leaves out transient temporaries freed
          within an op and allocator overhead, which are alike across the variants. Not measured
          under --compile reduce-overhead on a GPU (CUDA graphs allocate at recording, from their
          own pool; the table before this change showed parameters + state + gradients there).
  epoch   one post-warm-up epoch (on a GPU the fastest of three rounds that run every variant once,
          after an untimed small epoch of each: Triton compiles on first use, and first runs at a
          new size scattered +-40 % on an H200; results before this change: the fastest of two
          back-to-back epochs per variant) on a
          synthetic split of random token ids (lengths uniform in [--min-length-frac x L, L]) by part:
          training steps, clean-probability pass, mixture fit, evaluation. Driven through
          clear_fast.trainer.Run's own methods (train_epoch, evaluate, clean_probability_pass,
          predict) on models built here; the reference runs Run.train_epoch and Run.predict (E = 2
          passes, so it gets this project's batching: inference mode, length-sorted, eval batch 128)
          with sklearn's mixture.
  pass    where the clean-probability pass spends its time, by implementation: a naive loop, the
          passes one after another, and the shared-prefix pass (Run.predict's default), checked
          against separate passes with the same masks before it is timed.

Writes benchmarks/results/epoch_<cpu|gpu name>.json and .md with the machine, versions, date, load.
"""
import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mixture_table import device_tag, machine  # noqa: E402
from reference import released_lora_reference, sklearn_clean_probability  # noqa: E402

from clear_fast.config import COMPILE_MODES, TrainConfig  # noqa: E402
from clear_fast.mixture import clean_probability  # noqa: E402
from clear_fast.model import inject_routed_lora  # noqa: E402
from clear_fast.trainer import Run, Tokenized  # noqa: E402

MODELS = {"minilm": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
          "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)}
VARIANTS = ("clear-lora", "lora", "peft", "reference")
NOISE_RATES = (0.2, 0.4)
GAMMA, BATCH, NUM_LABELS, VOCAB = 0.85, 32, 10, 30522
LORA = dict(r=4, lora_alpha=1.0, target_modules=("query", "value"))


# ----------------------------------------------------------------------------- models and data
def base_classifier(name, seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=VOCAB, num_labels=NUM_LABELS, **MODELS[name])
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg)


def build(kind, base, device):
    """(model, router or None) for one variant, from a copy of the same random base model."""
    model = copy.deepcopy(base)
    if kind in ("clear-lora", "lora"):
        router = inject_routed_lora(model, LORA["target_modules"], LORA["r"], LORA["lora_alpha"])
    elif kind == "peft":
        from peft import LoraConfig, get_peft_model

        model, router = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["lora_alpha"],
                                                         target_modules=list(LORA["target_modules"]),
                                                         modules_to_save=["classifier"])), None
    elif kind == "reference":
        model, router = released_lora_reference(model, **LORA)
    else:
        raise ValueError(f"unknown variant {kind!r}; expected one of {', '.join(VARIANTS)}")
    return model.to(device), router


def synthetic_split(n, max_len, seed, min_frac=0.5):
    """A Tokenized split of random token ids ([CLS] ... [SEP]), lengths uniform in [min_frac L, L]."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(2, int(min_frac * max_len)), max_len + 1, n)
    ids = [[101, *rng.integers(1000, VOCAB, k - 2).tolist(), 102] for k in lengths]
    return Tokenized(ids, rng.integers(0, NUM_LABELS, n))


def clean_flags(n, noise, seed):
    """1 for the (1 - noise) fraction of samples taken as clean, 0 for the rest: routed fraction
    gamma x (1 - noise), as with a perfect clean-probability estimate."""
    flags = torch.zeros(n)
    flags[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: round((1 - noise) * n)]] = 1
    return flags


def make_run(kind, model, router, device, train=None, test=None, source="pass", bf16=False, compile_mode=None):
    """A trainer Run around a model built here (Run.load's data and model loading skipped);
    compile_mode: torch.compile the forward in that mode, as --compile --compile-mode do."""
    method = "clear-lora" if kind in ("clear-lora", "reference") else "lora"
    cfg = TrainConfig(method=method, clean_prob_source=source, progress=False, device=device.type,
                      bf16=bf16, compile=compile_mode is not None, compile_mode=compile_mode or "default",
                      batch_size=BATCH, output_dir=tempfile.gettempdir()).validate()
    run = Run(cfg)
    run.attach_model(model, router)
    run.train, run.test, run.dev = train, test, None
    run.label_names = [str(i) for i in range(NUM_LABELS)]
    return run


# ----------------------------------------------------------------------------- timing helpers
# CPU clock: "wall" (perf_counter) or "cpu" (this process's CPU time over all its threads, which a
# busy shared machine inflates far less than wall time: run with --threads 1 so that no thread
# spins at a barrier waiting for a descheduled sibling). CUDA events on a GPU either way.
CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
clock = time.perf_counter


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """Seconds of fn(); CUDA events on a GPU (no host sync inside fn is assumed)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        fn()
        end.record()
        sync(device)
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


# ----------------------------------------------------------------------------- training step
def step_fn(run, batch, p_route, teacher):
    """One training step as Run.train_epoch takes it: Run.train_step (routing masks, forward, loss,
    backward, AdamW) and the loop's bookkeeping (the loss sum; the routed count when routed). Train
    mode is set here, once, as train_epoch sets it once per epoch."""
    run.model.train()
    loss_sum = torch.zeros((), device=run.device)
    routed = torch.zeros((), device=run.device, dtype=torch.long)

    def step():
        loss, _, _, masks = run.train_step(batch, p_route, teacher)
        loss_sum.add_(loss.detach(), alpha=BATCH)
        if masks is not None:
            torch.sum(masks, (0, 1), out=routed)
    return step


def step_cases(base, device, seq, bf16, compile_mode=None):
    """{label: (run, step callable)} for every variant and routed fraction, on one fixed batch."""
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, VOCAB, (BATCH, seq), generator=g).to(device),
             "attention_mask": torch.ones(BATCH, seq, dtype=torch.long, device=device),
             "labels": torch.randint(0, NUM_LABELS, (BATCH,), generator=g).to(device)}
    teacher = torch.randn(BATCH, NUM_LABELS, generator=g).to(device)
    cases = {}
    for kind in VARIANTS:
        model, router = build(kind, base, device)
        run = make_run(kind, model, router, device, bf16=bf16, compile_mode=compile_mode)
        if kind in ("clear-lora", "reference"):
            # The reference's cost does not depend on the routed fraction: timed at one.
            for noise in NOISE_RATES if kind == "clear-lora" else NOISE_RATES[:1]:
                p = (GAMMA * clean_flags(BATCH, noise, seed=2)).to(device)
                cases[f"{kind}@{GAMMA * (1 - noise):.2f}"] = (run, step_fn(run, batch, p, teacher))
        else:
            cases[kind] = (run, step_fn(run, batch, None, None))
    return cases


def time_steps(cases, device, repeats, warmup=2):
    """Median seconds per case, the cases interleaved in every repeat (a busy machine slows all).
    Each timed step comes right after an untimed step of the same case, as in training, where a
    step follows a step of the same model: the first step after another model's runs on cold
    caches (on the stand-in of step_host_cost.py, timing it cost the case that followed the
    reference ~0.02 of its ratio)."""
    times = {k: [] for k in cases}
    for rep in range(warmup + repeats):
        for label, (_, fn) in cases.items():
            fn()
            t = timed(fn, device)
            if rep >= warmup:
                times[label].append(t)
    return {k: statistics.median(v) for k, v in times.items()}


def _unique_bytes(tensors):
    seen = {}
    for t in tensors:
        if t is not None and t.device.type != "meta":
            s = t.untyped_storage()
            seen[(s.device, s.data_ptr())] = s.nbytes()
    return sum(seen.values())


def step_memory(run, fn, device, measure=True):
    """Bytes a training step holds at its peak (see the module docstring for the method):
    parameters + optimizer state + gradients, plus on a GPU the allocator's peak above what was
    allocated before the step, on the CPU the activations saved for backward. measure=False: the
    parameters only, peak None."""
    params = list(run.model.parameters())
    if not measure:
        return {"params_mb": _unique_bytes(params) / 2**20, "peak_mb": None}
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    # Gradients: one per trainable parameter, of its size. Not read from p.grad: under CUDA graphs
    # (--compile reduce-overhead) the previous step's gradients are graph outputs that another
    # case's replay has overwritten, and touching them raises.
    grads = sum(p.numel() * p.element_size() for p in params if p.requires_grad)
    static = _unique_bytes(params) + _unique_bytes(state) + grads
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        sync(device)
        return {"params_mb": _unique_bytes(params) / 2**20,
                "peak_mb": (static + torch.cuda.max_memory_allocated(device) - before) / 2**20}
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def pack(t):
        if t.untyped_storage().data_ptr() not in param_ptrs:
            saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()  # the step's backward runs inside too; only the forward's saved tensors are packed
    activations = _unique_bytes(saved)
    saved.clear()
    return {"params_mb": _unique_bytes(params) / 2**20, "activations_mb": activations / 2**20,
            "peak_mb": (static + activations) / 2**20}


# ----------------------------------------------------------------------------- whole epoch
def epoch_parts(kind, base, device, train, test, noise, source="pass", bf16=False):
    """Seconds by part of one post-warm-up epoch (and the routed fraction) for one variant."""
    model, router = build(kind, base, device)
    run = make_run(kind, model, router, device, train, test, source, bf16)
    routed = kind in ("clear-lora", "reference")
    p_route = (GAMMA * clean_flags(len(train), noise, seed=3)).to(device) if routed else None
    teacher = torch.randn(len(train), NUM_LABELS, generator=torch.Generator().manual_seed(4)).to(device) \
        if routed else None
    parts = {}
    with _timer(parts, "train_s", device):
        ep = run.train_epoch(3, p_route, teacher)
    with _timer(parts, "eval_s", device):
        run.evaluate(test)
    if kind == "clear-lora":
        with _timer(parts, "pass_s", device):
            cp = run.clean_probability_pass(ep)
        # Run times its parts by wall clock: the mixture again on the same losses, on this clock.
        with _timer(parts, "mixture_s", device):
            clean_probability(cp["losses"].double() if device.type == "cpu" else cp["losses"])
        parts["pass_s"] = max(0.0, parts["pass_s"] - parts["mixture_s"])
    elif kind == "reference":
        with _timer(parts, "pass_s", device):
            zbar = run.predict(train, GAMMA, run.cfg.ensemble_passes, "pass")
            losses = torch.nn.functional.cross_entropy(zbar, train.labels.to(device), reduction="none")
        with _timer(parts, "mixture_s", device):
            sklearn_clean_probability(losses)
    else:
        parts.update(pass_s=0.0, mixture_s=0.0)  # plain LoRA has no clean-probability pass
    parts["total_s"] = sum(parts.values())
    parts["routed_fraction"] = ep["routed_fraction"]
    return parts


@contextlib.contextmanager
def _timer(out, key, device):
    sync(device)
    t0 = clock()
    yield
    sync(device)
    out[key] = clock() - t0


def epoch_cases(noise_rates):
    """(label, variant, noise, clean-probability source) of the epoch section."""
    cases = []
    for noise in noise_rates:
        f = f"{GAMMA * (1 - noise):.2f}"
        cases += [(f"clear-lora@{f}", "clear-lora", noise, "pass"),
                  (f"clear-lora-train-steps@{f}", "clear-lora", noise, "train-steps")]
    cases += [("lora", "lora", None, "pass"), ("peft", "peft", None, "pass"),
              (f"reference@{GAMMA * (1 - noise_rates[0]):.2f}", "reference", noise_rates[0], "pass")]
    return cases


# ----------------------------------------------------------------------------- the pass
def predict_with(run, split, shared, seed=None):
    """Run.predict's 2-pass clean-probability pass with the shared-prefix pass on or off (off: the
    passes one after another), from the given random seed (None: as the stream stands)."""
    if seed is not None:
        torch.manual_seed(seed)
    before = run._share_prefix
    run._share_prefix = shared and run.router.layer_paths is not None
    try:
        return run.predict(split, GAMMA, 2, "pass")
    finally:
        run._share_prefix = before


@contextlib.contextmanager
def counted_shared_rows():
    """Counts [computed rows, all rows] over the layer calls of shared-prefix passes inside."""
    from clear_fast import model as model_module
    counts, forward = [0, 0], model_module._SharedPrefixLayer.forward

    def counting(self, *args, **kwargs):
        counts[0] += len(self.rows)
        counts[1] += self.total
        return forward(self, *args, **kwargs)

    model_module._SharedPrefixLayer.forward = counting
    try:
        yield counts
    finally:
        model_module._SharedPrefixLayer.forward = forward


@torch.no_grad()
def predict_naive(run, split, gamma, passes=2):
    """The pass as a plain loop writes it: no_grad, dataset order, the training batch size."""
    run.model.eval()
    out = torch.zeros(len(split), NUM_LABELS, device=run.device)
    for _ in range(passes):
        for s in range(0, len(split), BATCH):
            batch = split.batch(np.arange(s, min(s + BATCH, len(split))), run.device)
            run._route(torch.full((len(batch["index"]),), gamma, device=run.device))
            out[batch["index"]] += run._logits(batch)
    run._route(None)
    return out / passes


def pass_profile(base, device, train, repeats, bf16_variant=True):
    """Seconds of the 2-pass clean-probability pass by implementation, the shared-prefix pass (the
    default) checked against separate passes with the same masks, and the top ops of the pass."""
    model, router = build("clear-lora", base, device)
    run = make_run("clear-lora", model, router, device, train)
    ref = predict_with(run, train, shared=False, seed=5)
    with counted_shared_rows() as counts:
        shared = predict_with(run, train, shared=True, seed=5)
    work = counts[0] / max(counts[1], 1)
    max_diff = float((ref - shared).abs().max())
    if not max_diff < 1e-3:
        raise AssertionError(f"the shared-prefix pass differs from separate passes by {max_diff}")
    impls = {"naive (no_grad, dataset order, batch 32)": lambda: predict_naive(run, train, GAMMA),
             "separate passes (inference_mode, sorted, batch 128)": lambda: predict_with(run, train, False),
             "shared prefix (Run.predict's default, exact)": lambda: predict_with(run, train, True)}
    if bf16_variant:
        run16 = make_run("clear-lora", model, router, device, train, bf16=True)
        impls["separate passes + bf16 autocast"] = lambda: predict_with(run16, train, False)
        impls["shared prefix + bf16 autocast"] = lambda: predict_with(run16, train, True)
    times = {k: [] for k in impls}
    for rep in range(1 + repeats):
        for k, fn in impls.items():
            t = timed(fn, device)
            if rep:
                times[k].append(t)
    rows = {k: statistics.median(v) for k, v in times.items()}
    return {"seconds": rows, "shared_prefix_work_fraction": work, "shared_prefix_max_abs_diff": max_diff,
            "top_ops": top_ops(run, train, device)}


def top_ops(run, split, device, k=10):
    """Share of self time per op in one pass of Run.predict (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        run.predict(split, GAMMA, 1, "p")
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    events = [e for e in prof.key_averages() if getattr(e, attr) > 0]
    total = sum(getattr(e, attr) for e in events)
    events.sort(key=lambda e: -getattr(e, attr))
    return [{"op": e.key, "share": getattr(e, attr) / total, "ms": getattr(e, attr) / 1e3} for e in events[:k]]


# ----------------------------------------------------------------------------- the table
def run_all(args, device, save=lambda result: None):
    """The sections in order, model by model; save(result) after every row (a long CPU run that is
    stopped keeps what it measured)."""
    result = {"steps": [], "epochs": [], "passes": []}
    for name in args.models:
        base = base_classifier(name)
        for seq in args.lengths:
            cases = step_cases(base, device, seq, args.bf16, args.compile)
            times = time_steps(cases, device, args.repeats)
            # CUDA graphs allocate a step's memory when they are recorded, from their own pool, so a
            # replayed step allocates nothing and its peak above the start reads as zero: not measured
            graphs = args.compile == "reduce-overhead" and device.type == "cuda"
            mem = {k: step_memory(run, fn, device, measure=not graphs) for k, (run, fn) in cases.items()}
            row = {"model": name, "seq": seq, "ms": {k: 1e3 * v for k, v in times.items()}, "memory": mem,
                   "ratios": step_ratios(times, mem)}
            result["steps"].append(row)
            save(result)
            print(_step_line(row), flush=True)
            del cases
        for seq in args.epoch_lengths:
            if name not in args.epoch_models:
                continue
            n = args.epoch_samples
            train, test = synthetic_split(n, seq, 10, args.min_length_frac), \
                synthetic_split(n // 2, seq, 11, args.min_length_frac)
            # On a GPU, first an untimed epoch on a small split of the same length: Triton compiles
            # each kernel specialisation on first use, cuBLAS picks its algorithms.
            warm = (synthetic_split(160, seq, 12, args.min_length_frac),
                    synthetic_split(64, seq, 13, args.min_length_frac)) if device.type == "cuda" else None
            cases = epoch_cases(NOISE_RATES)
            if warm:
                for _, kind, noise, source in cases:
                    epoch_parts(kind, base, device, *warm, noise, source, args.bf16)
            # the variants interleaved in every round (a slow spell of the machine hits them all),
            # the fastest round of each reported
            parts = {}
            for _ in range(args.epoch_repeats or (3 if warm else 1)):
                for label, kind, noise, source in cases:
                    p = epoch_parts(kind, base, device, train, test, noise, source, args.bf16)
                    if label not in parts or p["total_s"] < parts[label]["total_s"]:
                        parts[label] = p
            for label in parts:
                print(f"  epoch {name} L{seq} {label:<30} " + "  ".join(
                    f"{k} {v:.2f}" for k, v in parts[label].items() if v is not None), flush=True)
            row = {"model": name, "seq": seq, "samples": n, "parts": parts, "ratios": epoch_ratios(parts)}
            result["epochs"].append(row)
            save(result)
            print(json.dumps(row["ratios"]), flush=True)
            if name in args.pass_models and seq == args.epoch_lengths[0]:
                prof = pass_profile(base, device, train, args.pass_repeats)
                prof.update(model=name, seq=seq, samples=n)
                result["passes"].append(prof)
                save(result)
                print(json.dumps(prof, indent=1), flush=True)
    return result


def step_ratios(t, mem):
    plain, peft = t["lora"], t["peft"]
    out = {}
    for k in t:
        if k.startswith("clear-lora"):
            out[f"{k} / lora"] = t[k] / plain
            out[f"{k} / peft"] = t[k] / peft
        if k.startswith("reference"):
            out[f"{k} / clear-lora"] = t[k] / min(v for c, v in t.items() if c.startswith("clear-lora"))
        if k[:5] in ("clear", "refer") and mem[k]["peak_mb"] is not None:
            out[f"{k} memory / lora"] = mem[k]["peak_mb"] / mem["lora"]["peak_mb"]
    return out


def epoch_ratios(parts):
    tot = {k: v["total_s"] for k, v in parts.items()}
    ref = next(v for k, v in tot.items() if k.startswith("reference"))
    out = {}
    for k, v in tot.items():
        if k.startswith("clear-lora"):
            out[f"{k} / lora"] = v / tot["lora"]
            out[f"{k} / peft"] = v / tot["peft"]
            out[f"reference / {k}"] = ref / v
    return out


def _step_line(row):
    ms = "  ".join(f"{k} {v:.0f}" for k, v in row["ms"].items())
    return f"step {row['model']} L{row['seq']} ms: {ms}\n  " + "  ".join(
        f"{k} {v:.3f}" for k, v in row["ratios"].items())


TARGETS = {"step": ("clear-lora step / plain LoRA step (ours and peft's)", 1.05),
           "memory": ("clear-lora step memory / plain LoRA", 1.05),
           "reference": ("released reference epoch / clear-lora epoch (at least)", 1.7),
           "epoch_pass": ("clear-lora epoch with the pass / plain LoRA epoch", 1.6),
           "epoch_steps": ("clear-lora epoch with train-steps / plain LoRA epoch", 1.1)}


def targets(result):
    """Each target with the worst measured value over models, lengths and fractions."""
    worst = {}
    for row in result["steps"]:
        for k, v in row["ratios"].items():
            if k.startswith("clear-lora") and "memory" not in k:
                worst["step"] = max(worst.get("step", 0), v)
            elif k.startswith("clear-lora"):
                worst["memory"] = max(worst.get("memory", 0), v)
    for row in result["epochs"]:
        for k, v in row["ratios"].items():
            if k.startswith("reference"):
                worst["reference"] = min(worst.get("reference", np.inf), v)
            elif "train-steps" in k and k.endswith("/ lora"):
                worst["epoch_steps"] = max(worst.get("epoch_steps", 0), v)
            elif k.endswith("/ lora"):
                worst["epoch_pass"] = max(worst.get("epoch_pass", 0), v)
    out = {}
    for key, value in worst.items():
        text, bound = TARGETS[key]
        met = value >= bound if key == "reference" else value <= bound
        out[key] = {"target": text, "bound": bound, "worst": value, "met": bool(met)}
    return out


def markdown(result, command):
    lines = ["# End to end: training step and epoch, clear-lora vs plain LoRA, peft and the released code",
             "", f"`{command}`", "", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items()),
             "", "Method: see the docstring of benchmarks/epoch_table.py (step: median of interleaved repeats; "
             "epoch: one post-warm-up epoch driven through clear_fast.trainer.Run).", "", "## Targets", "",
             "| target | bound | worst measured | met |", "|---|---:|---:|---|"]
    for t in result["targets"].values():
        lines.append(f"| {t['target']} | {t['bound']} | {t['worst']:.3f} | {'yes' if t['met'] else 'no'} |")
    lines += ["", "## Training step (ms, median) and memory (MiB, peak account)", "",
              "| model | L | variant | ms | peak MiB | params MiB |", "|---|---:|---|---:|---:|---:|"]
    for row in result["steps"]:
        for k, v in row["ms"].items():
            m = row["memory"][k]
            peak = "-" if m["peak_mb"] is None else f"{m['peak_mb']:.0f}"
            lines.append(f"| {row['model']} | {row['seq']} | {k} | {v:.1f} | {peak} | {m['params_mb']:.0f} |")
        lines.append("| | | ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items()) + " | | | |")
    lines += ["", "## Epoch by part (s)", "",
              "| model | L | N | variant | train | pass | mixture | eval | total | routed |",
              "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in result["epochs"]:
        for k, p in row["parts"].items():
            rf = "-" if p["routed_fraction"] is None else f"{p['routed_fraction']:.2f}"
            lines.append(f"| {row['model']} | {row['seq']} | {row['samples']} | {k} | {p['train_s']:.2f} | "
                         f"{p['pass_s']:.2f} | {p['mixture_s']:.3f} | {p['eval_s']:.2f} | {p['total_s']:.2f} | {rf} |")
        lines.append("| | | | ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in row["ratios"].items())
                     + " | | | | | | |")
    for prof in result["passes"]:
        lines += ["", f"## Clean-probability pass, {prof['model']} L{prof['seq']}, {prof['samples']} samples, "
                  "2 passes (s, median)", "", "| implementation | s |", "|---|---:|"]
        lines += [f"| {k} | {v:.2f} |" for k, v in prof["seconds"].items()]
        lines += ["", f"Shared prefix: computes {prof['shared_prefix_work_fraction']:.3f} of the layer-rows of "
                  f"two independent passes; max |logit difference| {prof['shared_prefix_max_abs_diff']:.1e}.",
                  "", "Top ops of one pass (self time):", "", "| op | share | ms |", "|---|---:|---:|"]
        lines += [f"| {o['op']} | {o['share']:.3f} | {o['ms']:.0f} |" for o in prof["top_ops"]]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="MiniLM, length 64, few steps and samples")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--lengths", nargs="+", type=int, default=[64, 128], help="step section lengths")
    ap.add_argument("--epoch-models", nargs="+", default=None, help="default: --models")
    ap.add_argument("--epoch-lengths", nargs="+", type=int, default=None, help="default: --lengths")
    ap.add_argument("--epoch-samples", type=int, default=640)
    ap.add_argument("--epoch-repeats", type=int, default=None,
                    help="rounds of timed epochs, every variant once per round, the fastest of each "
                         "reported (default 3 GPU, 1 CPU)")
    ap.add_argument("--pass-models", nargs="+", default=["minilm"])
    ap.add_argument("--min-length-frac", type=float, default=0.5)
    ap.add_argument("--repeats", type=int, default=None, help="step repeats (default 10 CPU, 30 GPU)")
    ap.add_argument("--pass-repeats", type=int, default=3)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast in every variant (GPU)")
    ap.add_argument("--tf32", action="store_true", help="TF32 fp32 products in every variant (GPU; the CLI's --tf32)")
    ap.add_argument("--compile", default=None, metavar="MODE", choices=COMPILE_MODES,
                    help="torch.compile every variant's forward in this mode (the CLI's --compile "
                         "--compile-mode); steps only: the epoch sections are skipped (their batches "
                         "change shape, which recompiles)")
    ap.add_argument("--clock", choices=list(CLOCK), default="wall", help="CPU timer (see CLOCK)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if args.quick:
        args.models, args.lengths, args.epoch_samples = ["minilm"], [64], min(args.epoch_samples, 128)
        args.repeats, args.pass_repeats = args.repeats or 3, 1
    args.repeats = args.repeats or (30 if args.device.startswith("cuda") else 10)
    args.epoch_models = [] if args.compile else args.epoch_models or args.models
    args.epoch_lengths = args.epoch_lengths or args.lengths
    return args


def _commit():
    """The code measured: $BENCH_COMMIT when set (a GPU machine's copy of .git can be older than the
    tree it runs: gpu_all.sh's callers pass the commit they sent), else git describe of this checkout,
    '-dirty' when files differ from it."""
    import subprocess

    if os.environ.get("BENCH_COMMIT"):
        return os.environ["BENCH_COMMIT"]
    try:
        return subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True,
                              cwd=os.path.dirname(os.path.abspath(__file__)), timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None):
    global clock
    args = parse_args(argv)
    device = torch.device(args.device)
    clock = CLOCK[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    import peft
    import transformers

    info = machine()
    info.update(transformers=transformers.__version__, peft=peft.__version__, clock=args.clock,
                torch_threads=torch.get_num_threads(), commit=_commit())
    print(json.dumps(info), flush=True)
    # bf16 and compiled figures beside the plain ones
    stem = (device_tag(device) + ("_bf16" if args.bf16 else "") + ("_tf32" if args.tf32 else "")
            + (f"_compile_{args.compile}" if args.compile else ""))
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"epoch_{stem}")
    command = "python benchmarks/epoch_table.py " + " ".join(sys.argv[1:] if argv is None else argv)

    def save(result):
        result.update(machine=info, args=vars(args), targets=targets(result))
        with open("/proc/loadavg") as f:
            result["machine"]["load_average_end"] = f.read().split()[:3]
        with open(base + ".json", "w") as f:
            json.dump(result, f, indent=1)
        with open(base + ".md", "w") as f:
            f.write(markdown(result, command.strip()))

    result = run_all(args, device, save)
    save(result)
    print(json.dumps(result["targets"], indent=1))
    print("wrote", base + ".json", "and", base + ".md")


if __name__ == "__main__":
    main()
