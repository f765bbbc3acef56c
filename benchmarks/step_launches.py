"""GPU work launched by one training step, by variant: what a host-bound GPU step pays for.

    python benchmarks/step_launches.py

On a GPU at batch 32 a LoRA step of a MiniLM- or BERT-base-sized model is bound by the host: the
GPU waits while Python, autograd and the launches queue its work (benchmarks/results/
host_profile_gpu_nvidia_h200.log: 10-20 us of host time per aten op that launches a kernel, 40-80
us per Triton launch on that machine). So a step's host cost follows the number of launches it
makes, which does not depend on the hardware and can be counted here, on the CPU, without a GPU.

Counted: every aten operation of a step that does GPU work (views, empty allocations and other
metadata-only operations are left out) and every Triton kernel launch. The routed layers and the
loss take their GPU code path (CLEAR_FAST_AUTO_BACKEND=triton under Triton's interpreter, so their
kernels are counted as the launches they are on a GPU, not as the CPU path's operations), and AdamW
is fused, as clear_fast.trainer.Run makes it on CUDA. Not counted: the CPU-only check that float
routing masks hold 0/1 (on a GPU it would be a host sync, so it is skipped there), and reads of a
scalar to the host (.item(): transformers' check of the attention mask, one per forward, the same
in every variant). One aten operation may launch more than one kernel on a GPU (some reductions):
the counts are of dispatches, the unit each host cost above is measured in.

Variants as in epoch_table.py (clear-lora at routed fraction 0.68 with masks, CE + consistency;
lora: the routed layer with every sample routed, CE only; peft; the released-code reference), on
random models with MiniLM's and BERT-base's layer counts but small widths (the count depends on
the layers, not their sizes), batch 32, length 16, by phase: forward + loss, backward, optimizer.
Writes benchmarks/results/step_launches.{json,md} (--bf16: step_launches_bf16.*, under bf16 autocast).
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (through clear_fast)

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import epoch_table as et  # noqa: E402
from mixture_table import machine, save_json_and_md  # noqa: E402

import clear_fast.lora  # noqa: E402
from clear_fast.losses import clear_loss  # noqa: E402

# the layer structure of each model of epoch_table.py, at small widths
MODELS = {name: dict(cfg, hidden_size=32, num_attention_heads=2, intermediate_size=64)
          for name, cfg in et.MODELS.items()}
SEQ, NOISE = 16, 0.2
PHASES = ("forward", "backward", "optimizer")

# aten operations that launch no GPU work: views, allocations without a fill, metadata
NO_LAUNCH = {"view", "_unsafe_view", "reshape", "_reshape_alias", "t", "transpose", "permute", "expand",
             "slice", "select", "as_strided", "alias", "detach", "unsqueeze", "squeeze", "split",
             "split_with_sizes", "unbind", "chunk", "narrow", "empty", "empty_strided", "empty_like",
             "new_empty", "new_empty_strided", "lift_fresh", "is_same_size", "_has_compatible_shallow_copy_type",
             "_record_function_enter_new", "_record_function_exit", "result_type",
             "_local_scalar_dense"}  # .item(): a host read, not a launch (see the docstring)


class LaunchCounter(TorchDispatchMode):
    """Counts launching aten operations (by name) and Triton launches ('<triton> name') in a phase."""

    def __init__(self):
        super().__init__()
        self.counts = {p: collections.Counter() for p in PHASES}
        self.phase, self.paused = None, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if self.phase and not self.paused and name not in NO_LAUNCH:
            self.counts[self.phase][name] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


@contextlib.contextmanager
def counting():
    """A LaunchCounter with Triton launches counted once each (the interpreter's own tensor
    copies inside a launch are not GPU work) and the CPU-only mask-value check left out."""
    counter = LaunchCounter()
    getitem, check = InterpretedFunction.__getitem__, clear_fast.lora._check_mask_values

    def launch(kernel, grid):
        run = getitem(kernel, grid)

        def counted(*args, **kwargs):
            if counter.phase and not counter.paused:
                module = kernel.fn.__module__.rpartition(".")[2]
                counter.counts[counter.phase][f"<triton> {module}.{kernel.fn.__name__}"] += 1
            with counter.pause():
                return run(*args, **kwargs)
        return counted

    def unchecked(m):
        with counter.pause():
            return check(m)

    backend = os.environ.get("CLEAR_FAST_AUTO_BACKEND")
    os.environ["CLEAR_FAST_AUTO_BACKEND"] = "triton"
    InterpretedFunction.__getitem__, clear_fast.lora._check_mask_values = launch, unchecked
    try:
        with counter:
            yield counter
    finally:
        InterpretedFunction.__getitem__, clear_fast.lora._check_mask_values = getitem, check
        if backend is None:
            del os.environ["CLEAR_FAST_AUTO_BACKEND"]
        else:
            os.environ["CLEAR_FAST_AUTO_BACKEND"] = backend


def count_step(run, batch, p_route, teacher):
    """Launches of one training step (as epoch_table.step_fn takes it), by phase."""
    run.model.train()
    for group in run.optimizer.param_groups:
        group["fused"] = True  # what Run uses on CUDA; the CPU's default is a per-tensor loop

    def step(counter=None):
        def phase(name):
            if counter:
                counter.phase = name
        phase("forward")
        run._route(p_route)
        loss, _ = clear_loss(run._logits(batch), batch["labels"], teacher)
        phase("backward")
        loss.backward()
        phase("optimizer")
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)  # as the trainer does: no work
        phase(None)

    step()  # AdamW creates its state in the first step
    with counting() as counter:
        step(counter)
    return counter.counts


def measure(model_name, kinds=et.VARIANTS, bf16=False):
    """{variant label: launches by phase and name} of one step of each variant (bf16: under bf16
    autocast, as --bf16 trains)."""
    et.MODELS[model_name + "-small"] = MODELS[model_name]
    base = et.base_classifier(model_name + "-small")
    g = torch.Generator().manual_seed(1)
    batch = {"input_ids": torch.randint(1000, et.VOCAB, (et.BATCH, SEQ), generator=g),
             "attention_mask": torch.ones(et.BATCH, SEQ, dtype=torch.long),
             "labels": torch.randint(0, et.NUM_LABELS, (et.BATCH,), generator=g)}
    teacher = torch.randn(et.BATCH, et.NUM_LABELS, generator=g)
    rows = {}
    for kind in kinds:
        model, router = et.build(kind, base, torch.device("cpu"))
        run = et.make_run(kind, model, router, torch.device("cpu"), bf16=bf16)
        routed = kind in ("clear-lora", "reference")
        p = et.GAMMA * et.clean_flags(et.BATCH, NOISE, seed=2) if routed else None
        label = f"{kind}@{et.GAMMA * (1 - NOISE):.2f}" if routed else kind
        counts = count_step(run, batch, p, teacher if routed else None)
        rows[label] = {ph: dict(sorted(c.items())) for ph, c in counts.items()}
    return rows


def totals(counts):
    """Launches by phase, and 'step' for the whole step."""
    return {ph: sum(c.values()) for ph, c in counts.items()} | {"step": sum(sum(c.values()) for c in counts.values())}


def triton_launches(counts):
    return sum(n for c in counts.values() for k, n in c.items() if k.startswith("<triton>"))


def difference(a, b):
    """Operations (by phase:name) that a makes more (+) or fewer (-) times than b."""
    keys = {(ph, k) for x in (a, b) for ph, c in x.items() for k in c}
    d = {f"{ph}:{k}": a[ph].get(k, 0) - b[ph].get(k, 0) for ph, k in sorted(keys)}
    return {k: v for k, v in d.items() if v}


def table(result):
    command = "python benchmarks/step_launches.py" + (" --bf16" if result["bf16"] else "")
    lines = [f"# GPU work launched per training step (`{command}`)", "",
             f"{result['machine']['date']}; torch {result['machine']['torch']}, triton "
             f"{result['machine']['triton']}. Dispatches of aten operations that do GPU work plus "
             "Triton launches, with the routed layers and the loss on their GPU code path (see the "
             "script's docstring). Batch 32; MiniLM and BERT-base layer counts at small widths"
             + ("; under bf16 autocast." if result["bf16"] else "."), "",
             "| model | variant | forward + loss | backward | optimizer | step | of which Triton | step / lora |",
             "|---|---|---|---|---|---|---|---|"]
    for model, rows in result["models"].items():
        base = totals(rows["lora"])["step"]
        for label, counts in rows.items():
            t = totals(counts)
            lines.append(f"| {model} | {label} | {t['forward']} | {t['backward']} | {t['optimizer']} | "
                         f"{t['step']} | {triton_launches(counts)} | {t['step'] / base:.3f} |")
    for model, diff in result["clear_lora_minus_lora"].items():
        lines += ["", f"clear-lora minus lora ({model}): "
                  + ", ".join(f"{k} {v:+d}" for k, v in diff.items())]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--bf16", action="store_true", help="under bf16 autocast, as --bf16 trains "
                    "(writes step_launches_bf16.*)")
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    args = ap.parse_args(argv)
    if os.environ["TRITON_INTERPRET"] != "1":
        sys.exit("step_launches.py counts through Triton's interpreter: run it with TRITON_INTERPRET unset or 1")
    torch.manual_seed(0)
    models = {m: measure(m, bf16=args.bf16) for m in args.models}
    clear = f"clear-lora@{et.GAMMA * (1 - NOISE):.2f}"
    result = {"machine": machine(), "batch": et.BATCH, "seq": SEQ, "bf16": args.bf16, "models": models,
              "clear_lora_minus_lora": {m: difference(rows[clear], rows["lora"]) for m, rows in models.items()}}
    md = table(result)
    save_json_and_md(args.out, "step_launches" + ("_bf16" if args.bf16 else ""), result, md)
    print(md)


if __name__ == "__main__":
    main()
