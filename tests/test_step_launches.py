"""The launches of a training step (benchmarks/step_launches.py), which bound a host-bound GPU step:
CleaR's routing and loss add next to nothing to a plain LoRA step, and a routed layer costs one
Triton launch forward and one backward."""
import os
import sys

import pytest

from clear_fast.kernels.utils import interpreting

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))


@pytest.mark.skipif(not interpreting(), reason="counts through Triton's interpreter (TRITON_INTERPRET=1)")
def test_clear_lora_step_launches_about_what_plain_lora_does():
    import step_launches as sl

    rows = sl.measure("minilm", kinds=("clear-lora", "lora", "peft"))
    clear, lora, peft = (sl.totals(rows[k]) for k in ("clear-lora@0.68", "lora", "peft"))
    # drawing the routing masks: random numbers, a comparison, one float copy of all the layers' masks
    assert clear["step"] - lora["step"] <= 3, sl.difference(rows["clear-lora@0.68"], rows["lora"])
    assert lora["step"] < peft["step"]
    routed_layers = 6 * 2  # MiniLM's 6 layers, query and value
    for label in ("clear-lora@0.68", "lora"):
        assert rows[label]["forward"]["<triton> routed_lora._forward_kernel"] == routed_layers
        assert rows[label]["backward"]["<triton> routed_lora._backward_kernel"] == routed_layers
        assert rows[label]["forward"]["<triton> clear_loss._forward_kernel"] == 1
        assert sl.triton_launches(rows[label]) == 2 * routed_layers + 2  # and the loss's backward
    assert "CLEAR_FAST_AUTO_BACKEND" not in os.environ  # the count leaves the environment as it was


@pytest.mark.skipif(not interpreting(), reason="counts through Triton's interpreter (TRITON_INTERPRET=1)")
def test_bf16_step_casts_the_frozen_weights_once(monkeypatch):
    """Under bf16 autocast the routed layers reuse their frozen weight and bias cast to bf16: a
    step's forward launches two casts fewer per routed layer than casting at every call."""
    import step_launches as sl

    from clear_fast.lora import RoutedLoRALinear

    cached = sl.measure("minilm", kinds=("lora",), bf16=True)["lora"]["forward"]
    monkeypatch.setattr(RoutedLoRALinear, "_frozen_in", lambda self, dtype: (self.weight, self.bias))
    each_call = sl.measure("minilm", kinds=("lora",), bf16=True)["lora"]["forward"]
    routed_layers = 6 * 2
    assert each_call["_to_copy"] - cached["_to_copy"] == 2 * routed_layers
    assert sum(each_call.values()) - sum(cached.values()) == 2 * routed_layers
