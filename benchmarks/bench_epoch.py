"""pytest-benchmark: CleaR training step, epoch and clean-probability pass (the --quick set-up).

    pytest benchmarks/bench_epoch.py --benchmark-only

MiniLM-sized random model, batch 32, length 64; a small synthetic split for the epoch and the pass.
Variants and method as in benchmarks/epoch_table.py, which prints the full table with ratios. The
shared-prefix pass (the default) is checked against separate passes before it is timed.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from epoch_table import (GAMMA, NOISE_RATES, base_classifier, build, epoch_parts, make_run,  # noqa: E402
                         predict_naive, predict_with, step_cases, sync, synthetic_split)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SEQ, SAMPLES = 64, 64
ROUNDS = 10 if DEVICE.type == "cuda" else 3


@pytest.fixture(scope="module")
def base():
    return base_classifier("minilm")


@pytest.fixture(scope="module")
def steps(base):
    return step_cases(base, DEVICE, SEQ, bf16=False)


@pytest.fixture(scope="module")
def split():
    return synthetic_split(SAMPLES, SEQ, seed=10)


def _synced(fn):
    def run():
        fn()
        sync(DEVICE)
    return run


@pytest.mark.parametrize("case", [f"clear-lora@{GAMMA * (1 - n):.2f}" for n in NOISE_RATES]
                         + ["lora", "peft", f"reference@{GAMMA * (1 - NOISE_RATES[0]):.2f}"])
def test_step(benchmark, steps, case):
    benchmark.group = "training step, minilm L64 B32"
    _, fn = steps[case]
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("kind,source", [("clear-lora", "pass"), ("clear-lora", "train-steps"),
                                         ("lora", "pass"), ("reference", "pass")],
                         ids=["clear-lora", "clear-lora-train-steps", "lora", "reference"])
def test_epoch(benchmark, base, split, kind, source):
    benchmark.group = f"epoch, minilm L{SEQ}, {SAMPLES} samples"
    test = synthetic_split(SAMPLES // 2, SEQ, seed=11)
    parts = benchmark.pedantic(lambda: epoch_parts(kind, base, DEVICE, split, test, NOISE_RATES[0], source),
                               rounds=1, warmup_rounds=0)
    benchmark.extra_info.update({k: v for k, v in parts.items() if v is not None})


@pytest.fixture(scope="module")
def pass_run(base, split):
    model, router = build("clear-lora", base, DEVICE)
    run = make_run("clear-lora", model, router, DEVICE, split)
    ref = predict_with(run, split, shared=False, seed=5)
    shared = predict_with(run, split, shared=True, seed=5)
    torch.testing.assert_close(shared, ref, rtol=1e-4, atol=1e-4)  # a fast wrong pass cannot win
    return run


@pytest.mark.parametrize("impl", ["naive", "separate-passes", "shared-prefix"])
def test_clean_probability_pass(benchmark, pass_run, split, impl):
    benchmark.group = f"clean-probability pass (2 passes), minilm L{SEQ}, {SAMPLES} samples"
    fn = {"naive": lambda: predict_naive(pass_run, split, GAMMA),
          "separate-passes": lambda: predict_with(pass_run, split, False),
          "shared-prefix": lambda: predict_with(pass_run, split, True)}[impl]
    benchmark.pedantic(_synced(fn), rounds=ROUNDS, warmup_rounds=1)
