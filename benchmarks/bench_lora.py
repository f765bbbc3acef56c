"""pytest-benchmark: routed LoRA linear vs F.linear, dense masked, dual-path and peft.

    pytest benchmarks/bench_lora.py --benchmark-only

Forward, backward and both, at routed fractions 0-1, at BERT-base (768) and MiniLM (384) widths.
CPU: the gather path, batch 32 x seq 64, fp32. GPU: the Triton path, batch 32 x seq 128, bf16
activations with an fp32 adapter. Each routed candidate is checked against the dense reference
before it is timed. For a table of ratios run benchmarks/lora_table.py.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from lora_table import FRACTIONS, WIDTHS, check, make_impl, make_problem  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
ROUNDS = 20 if DEVICE.type == "cuda" else 3
PASSES = ("fwd", "bwd", "fwd+bwd")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, name, width, fraction, pass_):
    p = make_problem(width, fraction, DEVICE, DTYPE)
    impls = {n: make_impl(n, p) for n in ("routed", "dual_path")}
    impls[name] = make_impl(name, p)
    check(p, impls)  # a fast wrong answer must not win
    fn, leaves = impls[name]
    x = p["x"].detach().requires_grad_()

    def clear():
        for leaf in (x, *leaves):
            leaf.grad = None

    def forward():
        clear()
        y = fn(x)
        _sync()
        return y

    def forward_backward():
        clear()
        fn(x).backward(p["dy"])
        _sync()

    def setup_backward():
        clear()
        y = fn(x)
        _sync()
        return (y,), {}

    def backward(y):
        y.backward(p["dy"])
        _sync()

    benchmark.extra_info.update(width=width, fraction=fraction, impl=name, device=DEVICE.type)
    if pass_ == "fwd":
        benchmark.pedantic(forward, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    elif pass_ == "fwd+bwd":
        benchmark.pedantic(forward_backward, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    else:
        benchmark.pedantic(backward, setup=setup_backward, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("fraction", FRACTIONS)
@pytest.mark.parametrize("width", WIDTHS.values(), ids=WIDTHS.keys())
@pytest.mark.parametrize("impl", ["routed", "dense", "dual_path"])
def test_routed_variants(benchmark, impl, width, fraction, pass_):
    benchmark.group = f"{pass_} width {width} fraction {fraction}"
    _bench(benchmark, impl, width, fraction, pass_)


@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("width", WIDTHS.values(), ids=WIDTHS.keys())
@pytest.mark.parametrize("impl", ["linear", "peft"])
def test_unrouted_baselines(benchmark, impl, width, pass_):
    # F.linear and peft do not depend on the routed fraction: timed once per width.
    pytest.importorskip("peft")
    benchmark.group = f"{pass_} width {width} baselines"
    _bench(benchmark, impl, width, 0.5, pass_)
