"""RoutedLoRALinear and routed_lora_linear: the CPU (gather) path, the module, peft parity, errors.

The numerical helpers here are also used by test_lora_kernels.py for the Triton path.
"""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from clear_fast.kernels.routed_lora import (routed_lora_reference_dense,
                                            routed_lora_reference_dual_path)
from clear_fast.lora import RoutedLoRALinear, routed_lora_linear
import clear_fast.lora as lora_module

# Tolerance rule (performance.md): |out - ref64| <= 2 |torch_lowprec - ref64| + atol, as max norms.
ATOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2, torch.float64: 1e-10}
NAMES = ("out", "grad x", "grad lora_A", "grad lora_B")


def make_mask(kind, batch, rows, gen):
    """Masks for x with `batch` samples and `rows` rows in all."""
    if kind == "none":
        return None
    if kind == "sample":  # per sample, bool, both values present when batch >= 2
        m = torch.rand(batch, generator=gen) < 0.5
        m[0], m[-1] = True, batch < 2
        return m
    if kind == "row":  # per row, float 0/1
        m = (torch.rand(rows, generator=gen) < 0.5).float()
        m[0] = 1.0
        return m
    if kind == "strided":  # per sample, float, a column of a per-layer [B, L] matrix (as Router)
        m = (torch.rand(batch, 3, generator=gen) < 0.5).float()
        m[0, 1], m[-1, 1] = 1.0, 0.0
        return m[:, 1]
    if kind == "all_bypassed":
        return torch.zeros(batch, dtype=torch.bool)
    if kind == "all_routed":
        return torch.ones(batch)
    raise ValueError(kind)


def make_problem(shape, d_out, r, bias=True, seed=0, device="cpu"):
    """float64 inputs: x of `shape`, W, b, A, B, an upstream gradient, and a generator."""
    gen = torch.Generator().manual_seed(seed)
    d_in = shape[-1]
    p = {
        "x": torch.randn(shape, generator=gen, dtype=torch.float64),
        "weight": torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in),
        "bias": torch.randn(d_out, generator=gen, dtype=torch.float64) if bias else None,
        "lora_A": torch.randn(r, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in),
        "lora_B": torch.randn(d_out, r, generator=gen, dtype=torch.float64),
        "dy": torch.randn(*shape[:-1], d_out, generator=gen, dtype=torch.float64),
    }
    return {k: None if v is None else v.to(device) for k, v in p.items()}, gen


def run(fn, p, mask, dtype, adapter_dtype, scaling=0.5):
    """Forward + backward of fn in the given dtypes; returns out and grads of x, lora_A, lora_B."""
    x = p["x"].to(dtype, copy=True).requires_grad_()
    A = p["lora_A"].to(adapter_dtype, copy=True).requires_grad_()
    B = p["lora_B"].to(adapter_dtype, copy=True).requires_grad_()
    bias = None if p["bias"] is None else p["bias"].to(dtype)
    y = fn(x, p["weight"].to(dtype), bias, A, B, scaling, mask)
    y.backward(p["dy"].to(dtype))
    return y.detach(), x.grad, A.grad, B.grad


def check_case(backend, shape, d_out, r, dtype, mask_kind, bias=True, adapter_dtype=None, seed=0,
               device="cpu"):
    """Output and every gradient of `backend` against float64, with the tolerance rule; bypassed
    rows bit-identical to F.linear."""
    adapter_dtype = adapter_dtype or dtype
    p, gen = make_problem(shape, d_out, r, bias, seed, device)
    rows = math.prod(shape[:-1])
    mask = make_mask(mask_kind, shape[0], rows, gen)
    mask = None if mask is None else mask.to(device)

    def ours(*args):
        return routed_lora_linear(*args, backend=backend)

    ref = run(routed_lora_reference_dense, p, mask, torch.float64, torch.float64)
    low = run(routed_lora_reference_dense, p, mask, dtype, adapter_dtype)
    got = run(ours, p, mask, dtype, adapter_dtype)
    for name, g, lo, rf in zip(NAMES, got, low, ref):
        assert g.dtype == lo.dtype, f"{name}: dtype {g.dtype}, expected {lo.dtype}"
        err = (g.double() - rf).abs().max().item()
        bound = 2 * (lo.double() - rf).abs().max().item() + ATOL[dtype]
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"
    if mask is not None:
        x = p["x"].to(dtype)
        bias = None if p["bias"] is None else p["bias"].to(dtype)
        frozen = F.linear(x, p["weight"].to(dtype), bias)
        off = (mask == 0) if mask.numel() == shape[0] else (mask == 0).reshape(shape[:-1])
        assert torch.equal(got[0][off], frozen[off]), "bypassed rows differ from F.linear"


def check_autocast(device, shape=(8, 40, 64), d_out=48, r=8):
    """fp32 model and adapters under bf16 autocast, against the dense reference under the same
    autocast (peft's LoRA is that computation): within the tolerance rule."""
    p, gen = make_problem(shape, d_out, r, device=device)
    mask = make_mask("sample", shape[0], 0, gen).to(device)
    ref = run(routed_lora_reference_dense, p, mask, torch.float64, torch.float64)
    with torch.autocast(device, dtype=torch.bfloat16):
        low = run(routed_lora_reference_dense, p, mask, torch.float32, torch.float32)
        got = run(routed_lora_linear, p, mask, torch.float32, torch.float32)
    assert got[0].dtype == torch.bfloat16  # autocast's dtype, as F.linear's under autocast
    for name, g, lo, rf in zip(NAMES, got, low, ref):
        err = (g.double() - rf).abs().max().item()
        bound = 2 * (lo.double() - rf).abs().max().item() + ATOL[torch.bfloat16]
        assert err <= bound, f"{name}: error {err:.3g} > bound {bound:.3g}"


def test_autocast_matches_the_dense_reference_under_autocast():
    check_autocast("cpu")


def test_triton_path_under_autocast_needs_no_context_of_its_own():
    """Under autocast the Triton path runs without switching autocast off inside (host time per call):
    the same outputs and gradients, bit for bit, as with autocast switched off around it."""
    p, gen = make_problem((4, 40, 64), 48, 8)
    mask = make_mask("sample", 4, 0, gen)

    def routed(x, w, b, A, B, scaling, m):
        return lora_module._routed_lora_linear(x, w, b, A, B, scaling, m, None, "triton", True)

    def routed_with_autocast_off(*args):
        with torch.autocast("cpu", enabled=False):
            return routed(*args)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = run(routed, p, mask, torch.float32, torch.float32)
        want = run(routed_with_autocast_off, p, mask, torch.float32, torch.float32)
    assert got[0].dtype == torch.bfloat16
    for name, g, w in zip(NAMES, got, want):
        assert torch.equal(g, w), name


def check_bypassed_do_not_touch_adapter_grads(backend, dtype=torch.float32):
    """Perturbing a bypassed sample's input leaves the adapter gradients bit-identical."""
    p, _ = make_problem((4, 70, 40), 24, 4)
    mask = torch.tensor([True, False, True, False])

    def grads(x):
        x = x.to(dtype, copy=True).requires_grad_()
        A = p["lora_A"].to(dtype, copy=True).requires_grad_()
        B = p["lora_B"].to(dtype, copy=True).requires_grad_()
        y = routed_lora_linear(x, p["weight"].to(dtype), p["bias"].to(dtype), A, B, 0.5, mask,
                               backend=backend)
        y.backward(p["dy"].to(dtype))
        return A.grad, B.grad

    gA, gB = grads(p["x"])
    x2 = p["x"].clone()
    x2[1] += 10 * torch.randn_like(x2[1])
    x2[3] = float("nan")  # not even a NaN may leak from a bypassed sample
    gA2, gB2 = grads(x2)
    assert torch.equal(gA, gA2) and torch.equal(gB, gB2)


def check_separate_lora_input(backend):
    """x_lora (dropout(x)) feeds only the LoRA term: x gets the base gradient, x_lora the LoRA's."""
    p, _ = make_problem((3, 20, 24), 16, 4)
    x, xl = p["x"].clone().requires_grad_(), torch.randn_like(p["x"]).requires_grad_()
    A, B = p["lora_A"].clone().requires_grad_(), p["lora_B"].clone().requires_grad_()
    m = torch.tensor([1.0, 0.0, 1.0])
    y = routed_lora_linear(x, p["weight"], p["bias"], A, B, 0.5, m, x_lora=xl, backend=backend)
    y.backward(p["dy"])
    got = (y, x.grad, xl.grad, A.grad, B.grad)
    for t in (x, xl, A, B):
        t.grad = None
    lora = routed_lora_reference_dense(xl, p["weight"], None, A, B, 0.5, m)
    lora = lora - F.linear(xl, p["weight"])
    y = F.linear(x, p["weight"], p["bias"]) + lora
    y.backward(p["dy"])
    for name, g, e in zip(("out", "grad x", "grad x_lora", "grad lora_A", "grad lora_B"), got,
                          (y, x.grad, xl.grad, A.grad, B.grad)):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, msg=name)


def gradcheck_case(backend, shape=(3, 2, 5), d_out=4, r=2):
    p, _ = make_problem(shape, d_out, r)
    mask = torch.tensor([1.0, 0.0, 1.0])
    x, A, B = (p[k].clone().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    W, b = p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_()

    def f(x, W, b, A, B):
        return routed_lora_linear(x, W, b, A, B, 0.75, mask, backend=backend)

    assert torch.autograd.gradcheck(f, (x, W, b, A, B))


# ------------------------------------------------------------------ CPU path numerics
CASES = [  # shape, d_out, r, mask kind, bias; Triton row tiles are 32 rows (CONFIG)
    ((4, 16, 123), 45, 8, "sample", True),  # odd in_features, 4 samples in one tile
    ((2, 37, 64), 123, 1, "sample", False),  # seq 37 does not divide the tile, rank 1
    ((3, 70, 32), 40, 4, "sample", True),  # tiles that mix routed and bypassed samples
    ((3, 70, 32), 40, 4, "strided", True),  # a non-contiguous mask
    ((50, 33), 17, 5, "row", True),  # 2-D input, per-row mask
    ((4, 5, 32), 32, 3, "row", False),  # 3-D input, per-row mask
    ((2, 9, 40), 24, 8, "none", True),
    ((3, 30, 40), 24, 8, "all_bypassed", True),
    ((3, 30, 40), 24, 8, "all_routed", False),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape,d_out,r,mask_kind,bias", CASES)
def test_torch_path_matches_float64(shape, d_out, r, mask_kind, bias, dtype):
    check_case("torch", shape, d_out, r, dtype, mask_kind, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_path_fp32_adapter_with_half_activations(dtype):
    check_case("torch", (4, 12, 48), 40, 4, dtype, "sample", adapter_dtype=torch.float32)


def test_torch_path_bypassed_rows_leave_adapter_grads_unchanged():
    check_bypassed_do_not_touch_adapter_grads("torch")


def test_torch_path_separate_lora_input():
    check_separate_lora_input("torch")


def test_torch_path_gradcheck_float64():
    gradcheck_case("torch")


def test_dual_path_reference_equals_dense_reference():
    p, gen = make_problem((4, 6, 20), 12, 3)
    mask = make_mask("sample", 4, 24, gen)
    args = (p["x"], p["weight"], p["bias"], p["lora_A"], p["lora_B"], 0.5, mask)
    torch.testing.assert_close(routed_lora_reference_dual_path(*args),
                               routed_lora_reference_dense(*args), rtol=1e-12, atol=1e-12)


def test_trainable_frozen_weight_and_bias_get_gradients():
    p, gen = make_problem((3, 4, 10), 7, 2)
    mask = make_mask("sample", 3, 12, gen)
    grads = []
    for fn in (routed_lora_linear, routed_lora_reference_dense):
        W, b = p["weight"].clone().requires_grad_(), p["bias"].clone().requires_grad_()
        fn(p["x"], W, b, p["lora_A"], p["lora_B"], 0.5, mask).backward(p["dy"])
        grads.append((W.grad, b.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ the module
def test_module_contract():
    layer = RoutedLoRALinear(20, 12, r=4, lora_alpha=8, lora_dropout=0.1)
    assert (layer.in_features, layer.out_features, layer.r, layer.lora_alpha) == (20, 12, 4, 8)
    assert layer.scaling == 2.0 and layer.merged is False and layer.routing_mask is None
    assert layer.weight.shape == (12, 20) and not layer.weight.requires_grad
    assert layer.bias.shape == (12,) and not layer.bias.requires_grad
    assert layer.lora_A.shape == (4, 20) and layer.lora_A.requires_grad
    assert layer.lora_B.shape == (12, 4) and torch.count_nonzero(layer.lora_B) == 0
    bound = 1 / math.sqrt(20)  # kaiming_uniform(a=sqrt(5)) on fan_in 20, as peft
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    assert [n for n, _ in layer.named_parameters() if _.requires_grad] == ["lora_A", "lora_B"]
    assert RoutedLoRALinear(5, 3, bias=False).bias is None
    text = repr(layer)
    for part in ("in_features=20", "out_features=12", "r=4", "lora_alpha=8", "scaling=2",
                 "lora_dropout=0.1", "merged=False"):
        assert part in text


def _layer_with_adapter(seed=0, **kw):
    torch.manual_seed(seed)
    layer = RoutedLoRALinear(16, 10, r=4, lora_alpha=8, **kw)
    nn.init.normal_(layer.lora_B)
    return layer


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_without_autograd_equals_the_training_forward(backend):
    """Without autograd the layer's forward skips its autograd.Function: the same output, bit for
    bit, and no graph."""
    layer = _layer_with_adapter()
    x, m = torch.randn(3, 5, 16), torch.tensor([1.0, 0.0, 1.0])
    args = (layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, m)
    y = routed_lora_linear(x, *args, backend=backend)
    assert y.grad_fn is not None
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            y0 = routed_lora_linear(x, *args, backend=backend)
        assert y0.grad_fn is None and torch.equal(y0, y.detach())


def test_parameters_taken_out_of_the_parameter_dict_still_serve():
    """The layer reads its parameters from its parameter dict (host time); where one was taken out of
    it - a parametrization, a plain tensor set in its place - it reads the attribute."""
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, a):
            return 2 * a

    layer = _layer_with_adapter()
    x, m = torch.randn(3, 5, 16), torch.tensor([1.0, 0.0, 1.0])
    want = routed_lora_reference_dense(x, layer.weight, layer.bias, 2 * layer.lora_A, layer.lora_B,
                                       layer.scaling, m)
    parametrize.register_parametrization(layer, "lora_A", Double())
    torch.testing.assert_close(layer(x, m), want)
    plain = _layer_with_adapter()
    weight = plain.weight.detach().clone()
    del plain.weight
    plain.weight = weight  # a plain tensor attribute, as DataParallel's replicas hold them
    want = routed_lora_reference_dense(x, weight, plain.bias, plain.lora_A, plain.lora_B, plain.scaling, m)
    torch.testing.assert_close(plain(x, m), want)


def test_router_refuses_masks_of_another_layer_count():
    from clear_fast.model import Router

    layers = [[_layer_with_adapter()] for _ in range(3)]
    router = Router(layers, ["a", "b", "c"])
    router.set_masks(torch.ones(4, 3, dtype=torch.bool))
    assert all(torch.equal(m[0].routing_mask, torch.ones(4)) for m in layers)
    for bad in (torch.zeros(4, 2, dtype=torch.bool), torch.zeros(4, dtype=torch.bool)):
        with pytest.raises(ValueError, match=r"routing masks must be \[batch, 3\]"):
            router.set_masks(bad)
    router.set_masks(None)
    assert all(m[0].routing_mask is None for m in layers)


def test_router_static_masks_write_one_buffer_per_batch_size():
    """static_masks (compiled models): every set_masks of a batch size writes the same tensors,
    also across inference mode; another batch size has its own."""
    from clear_fast.model import Router

    layers = [[_layer_with_adapter()] for _ in range(3)]
    router = Router(layers, ["a", "b", "c"], static_masks=True)
    g = torch.Generator().manual_seed(0)
    first = torch.rand(4, 3, generator=g) < 0.5
    with torch.inference_mode():
        router.set_masks(first)
    held = [m[0].routing_mask for m in layers]
    for masks in (~first, torch.rand(6, 3, generator=g) < 0.5, first):
        router.set_masks(masks)
        for i, m in enumerate(layers):
            assert torch.equal(m[0].routing_mask, masks[:, i].float())
            assert (m[0].routing_mask is held[i]) == (len(masks) == 4)
    x = torch.randn(4, 5, 16, requires_grad=True)
    layers[0][0](x).sum().backward()  # usable in training after being written in inference mode
    assert x.grad is not None


def test_module_routing_mask_attribute_and_argument():
    layer = _layer_with_adapter()
    x = torch.randn(3, 5, 16)
    m = torch.tensor([1.0, 0.0, 1.0])
    expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B,
                                           layer.scaling, m)
    torch.testing.assert_close(layer(x, m), expected)
    layer.routing_mask = m  # as model surgery does before a whole-model forward
    torch.testing.assert_close(layer(x), expected)
    everything = layer(x, torch.ones(3))  # an explicit mask wins over the attribute
    layer.routing_mask = None
    torch.testing.assert_close(layer(x), everything)
    assert not torch.allclose(everything, expected)


def test_mask_changed_in_place_between_calls():
    layer = _layer_with_adapter()
    x = torch.randn(3, 4, 16)
    m = torch.tensor([1.0, 0.0, 1.0])
    for values in ([1.0, 0.0, 1.0], [0.0, 1.0, 1.0], [0.0, 0.0, 0.0]):
        m.copy_(torch.tensor(values))  # same tensor, new values: nothing stale may be reused
        expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A,
                                               layer.lora_B, layer.scaling, m)
        torch.testing.assert_close(layer(x, m), expected)


def test_mask_changed_behind_autograds_back_between_calls():
    """Changes that bypass the tensor's version counter (through numpy, through .data) are seen."""
    layer = _layer_with_adapter()
    x = torch.randn(3, 4, 16)
    arr = np.array([1.0, 0.0, 1.0], dtype=np.float32)
    m = torch.from_numpy(arr)
    for change in (lambda: arr.__setitem__(slice(None), [0.0, 1.0, 0.0]),
                   lambda: m.data.copy_(torch.tensor([1.0, 1.0, 0.0]))):
        layer(x, m)
        change()
        expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A,
                                               layer.lora_B, layer.scaling, m)
        torch.testing.assert_close(layer(x, m), expected)


def test_masks_made_in_inference_mode():
    """Routing masks drawn under torch.inference_mode (no-grad passes) have no version counter."""
    layer = _layer_with_adapter()
    x = torch.randn(3, 4, 16)
    with torch.inference_mode():
        m = torch.tensor([True, False, True])
        for values in ([True, False, True], [False, True, True]):
            m.copy_(torch.tensor(values))
            expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A,
                                                   layer.lora_B, layer.scaling, m)
            torch.testing.assert_close(layer(x, m), expected)


def test_no_mask_first_in_inference_mode_then_training():
    """The all-routed mask is made once per device: made under inference_mode, it must still be
    savable for a later training backward."""
    lora_module._ALL_ROUTED.clear()
    layer = _layer_with_adapter()
    with torch.inference_mode():
        layer(torch.randn(2, 3, 16))
    x = torch.randn(2, 3, 16, requires_grad=True)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None and x.grad is not None


def test_from_linear_shares_frozen_weights():
    lin = nn.Linear(16, 10)
    layer = RoutedLoRALinear.from_linear(lin, r=2, lora_alpha=4, lora_dropout=0.2)
    assert layer.weight.data_ptr() == lin.weight.data_ptr()
    assert layer.bias.data_ptr() == lin.bias.data_ptr()
    assert not layer.weight.requires_grad and lin.weight.requires_grad
    assert (layer.r, layer.scaling, layer.lora_dropout.p) == (2, 2.0, 0.2)
    x = torch.randn(4, 16)
    layer.eval()
    torch.testing.assert_close(layer(x), lin(x), rtol=0, atol=0)  # B = 0: exactly the linear
    half = RoutedLoRALinear.from_linear(nn.Linear(8, 3, bias=False).to(torch.float16))
    assert half.bias is None and half.lora_A.dtype == torch.float16
    with pytest.raises(TypeError, match="expects an nn.Linear"):
        RoutedLoRALinear.from_linear(nn.Conv1d(2, 2, 1))


def test_merge_unmerge_round_trip():
    layer = _layer_with_adapter()
    w0 = layer.weight.clone()
    x = torch.randn(4, 6, 16)
    routed_all = layer(x)
    layer.merge()
    assert layer.merged and "merged=True" in repr(layer)
    # merged: every row adapted, the mask ignored (documented)
    torch.testing.assert_close(layer(x, torch.zeros(4)), routed_all, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    layer.unmerge()
    torch.testing.assert_close(layer.weight, w0, rtol=0, atol=1e-6)
    assert not layer.merged
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()


def test_state_dict_records_merged_and_scaling():
    """A merged layer's state dict loads into a fresh layer as the same function; one made with
    another scaling is refused; an older state dict without the entry loads as unmerged."""
    layer = _layer_with_adapter()
    x = torch.randn(4, 16)
    layer.merge()
    expected = layer(x)
    fresh = RoutedLoRALinear(16, 10, r=4, lora_alpha=8)
    fresh.load_state_dict(layer.state_dict())
    assert fresh.merged
    torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)
    fresh.unmerge()
    torch.testing.assert_close(fresh(x), expected, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    with pytest.raises(ValueError, match="scaling .* is 2, this layer's 1"):
        RoutedLoRALinear(16, 10, r=4, lora_alpha=4).load_state_dict(layer.state_dict())
    old = {k: v for k, v in layer.state_dict().items() if not k.endswith("_extra_state")}
    merged = _layer_with_adapter(seed=1)
    merged.merge()
    merged.load_state_dict(old)  # strict: the missing entry is not an error
    assert not merged.merged
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=0)


def test_merged_layer_checks_its_inputs(layer):
    layer.merge()
    with pytest.raises(ValueError, match="feature size mismatch"):
        layer(torch.randn(4, 15))
    with pytest.raises(ValueError, match="mask has shape"):
        layer(torch.randn(4, 16), torch.ones(99))


def _peft_pair(dropout):
    peft = pytest.importorskip("peft")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(24, 20)

        def forward(self, x):
            return self.proj(x)

    torch.manual_seed(0)
    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=dropout,
                                                        target_modules=["proj"]))
    pl = model.base_model.model.proj
    ours = RoutedLoRALinear.from_linear(pl.base_layer, r=4, lora_alpha=12, lora_dropout=dropout)
    with torch.no_grad():
        nn.init.normal_(pl.lora_B["default"].weight)
        ours.lora_A.copy_(pl.lora_A["default"].weight)
        ours.lora_B.copy_(pl.lora_B["default"].weight)
    return model, pl, ours


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_equals_peft_lora_when_every_row_routed(dropout):
    model, pl, ours = _peft_pair(dropout)
    x = torch.randn(3, 7, 24)
    results = []
    for fwd, a, b in ((model, pl.lora_A["default"].weight, pl.lora_B["default"].weight),
                      (ours, ours.lora_A, ours.lora_B)):
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)  # same dropout draw: peft and we both drop the LoRA input once
        y = fwd(xi)
        y.backward(torch.ones_like(y))
        results.append((y, xi.grad, a.grad, b.grad))
    for name, p_, o in zip(NAMES, *results):
        torch.testing.assert_close(o, p_, rtol=1e-5, atol=1e-5, msg=name)


def test_dropout_only_in_training_and_only_on_the_lora_input():
    layer = _layer_with_adapter(lora_dropout=0.5)
    x = torch.randn(4, 3, 16)
    layer.eval()
    expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A,
                                           layer.lora_B, layer.scaling, None)
    torch.testing.assert_close(layer(x), expected)
    layer.train()
    m = torch.tensor([0.0, 1.0, 0.0, 1.0])
    y = layer(x, m)
    assert torch.equal(y[m == 0], F.linear(x, layer.weight, layer.bias)[m == 0])
    assert not torch.allclose(y[m == 1], expected[m == 1])  # dropout changed the adapted rows


def test_torch_compile_matches_eager():
    if not hasattr(torch, "compile"):
        pytest.skip("torch.compile is not available in this torch build")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lora = _layer_with_adapter()
            self.head = nn.Linear(10, 3)

        def forward(self, x, m):
            return self.head(torch.relu(self.lora(x, m)))

    net = Net()
    x = torch.randn(4, 7, 16)
    m = torch.tensor([1.0, 0.0, 1.0, 0.0])
    results = []
    # aot_eager traces through dynamo and AOTAutograd with fake tensors (what inductor needs
    # too) without a minutes-long C++ compile on the CI machine.
    for model in (net, torch.compile(net, backend="aot_eager", fullgraph=False)):
        net.zero_grad()
        xi = x.clone().requires_grad_()
        y = model(xi, m)
        y.sum().backward()
        results.append((y.detach(), xi.grad, net.lora.lora_A.grad.clone(),
                        net.lora.lora_B.grad.clone()))
    for name, e, c in zip(NAMES, *results):
        torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-6, msg=name)
    # the layer's custom ops trace whole: no graph break (no nonzero or .item() seen by dynamo)
    torch._dynamo.reset()
    assert torch._dynamo.explain(net)(x, m).graph_break_count == 0


def test_non_contiguous_input():
    layer = _layer_with_adapter()
    x = torch.randn(7, 4, 16).transpose(0, 1)  # [4, 7, 16], not contiguous
    m = torch.tensor([1.0, 0.0, 1.0, 1.0])
    expected = routed_lora_reference_dense(x, layer.weight, layer.bias, layer.lora_A,
                                           layer.lora_B, layer.scaling, m)
    torch.testing.assert_close(layer(x, m), expected)


def test_autocast_runs_the_frozen_linear_in_autocast_dtype():
    layer = _layer_with_adapter()
    x = torch.randn(3, 5, 16, requires_grad=True)
    m = torch.tensor([1.0, 0.0, 1.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x, m)
        frozen = F.linear(x, layer.weight, layer.bias)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y[1], frozen[1])  # bypassed: exactly what F.linear gives under autocast
    bf = torch.bfloat16
    expected = routed_lora_linear(x.detach().to(bf), layer.weight.to(bf), layer.bias.to(bf),
                                  layer.lora_A, layer.lora_B, layer.scaling, m)
    assert torch.equal(y, expected)
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and layer.lora_A.grad.dtype == torch.float32
    assert layer.lora_A.grad.abs().sum() > 0


def test_autocast_casts_the_frozen_weight_once_while_it_is_unchanged():
    """Under autocast the layer keeps the frozen weight and bias in autocast's dtype between calls
    (autocast would cast them at every call): the same output and gradients as casting each time,
    one cast reused, a new one after an in-place change of the weight or under another autocast
    dtype, none for a trainable weight, and a cast made in an inference pass serves training."""
    layer = _layer_with_adapter()
    x = torch.randn(3, 5, 16)
    m = torch.tensor([1.0, 0.0, 1.0])
    bf = torch.bfloat16
    assert not layer.cache_frozen_cast  # by default autocast's own cast at every call: .data edits are seen
    with torch.autocast("cpu", dtype=bf):
        before = layer(x, m)
        layer.weight.data.mul_(0)
        layer.bias.data.zero_()
        after = layer(x, m)
        assert not torch.equal(before, after) and layer._frozen_cast is None
        layer.reset_parameters()
    layer.cache_frozen_cast = True
    old = copy.deepcopy(layer)  # a layer pickled before these attributes: the class's defaults
    del old.__dict__["cache_frozen_cast"], old.__dict__["_frozen_cast"]
    with torch.autocast("cpu", dtype=bf):
        want = routed_lora_linear(x, layer.weight, layer.bias, layer.lora_A, layer.lora_B, layer.scaling, m)
        assert torch.equal(old(x, m), want)

    def step(layer):
        xg = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=bf):
            y = layer(xg, m)
        y.float().square().sum().backward()
        grads = (xg.grad, layer.lora_A.grad.clone(), layer.lora_B.grad.clone())
        layer.zero_grad()
        return y, grads

    def cast_each_time(layer):
        xg = x.clone().requires_grad_()
        A, B = (t.detach().clone().requires_grad_() for t in (layer.lora_A, layer.lora_B))
        with torch.autocast("cpu", dtype=bf):
            y = routed_lora_linear(xg, layer.weight, layer.bias, A, B, layer.scaling, m)
        y.float().square().sum().backward()
        return y, (xg.grad, A.grad, B.grad)

    with torch.inference_mode(), torch.autocast("cpu", dtype=bf):
        layer(x, m)  # first cast inside an inference pass
    cast = layer._frozen_cast[1]
    assert cast.dtype == bf and not cast.is_inference()
    for _ in range(2):
        got, want = step(layer), cast_each_time(layer)
        assert layer._frozen_cast[1] is cast  # reused
        assert torch.equal(got[0], want[0]) and all(torch.equal(a, b) for a, b in zip(got[1], want[1]))
    with torch.no_grad():
        layer.weight.mul_(1.5)  # an in-place change (as merge() makes): cast again
    got, want = step(layer), cast_each_time(layer)
    assert layer._frozen_cast[1] is not cast and torch.equal(got[0], want[0])
    with torch.autocast("cpu", dtype=torch.float16):
        layer(x, m)
    assert layer._frozen_cast[1].dtype == torch.float16  # another autocast dtype: cast again
    layer.weight.requires_grad_(True)  # a trainable weight is never cached: its gradient must flow
    xg = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=bf):
        layer(xg, m).float().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0


def test_zero_rows():
    layer = _layer_with_adapter()
    assert layer(torch.randn(0, 5, 16)).shape == (0, 5, 10)


# ------------------------------------------------------------------ errors
@pytest.fixture
def layer():
    return _layer_with_adapter()


def test_error_mask_shape(layer):
    x = torch.randn(4, 6, 16)
    with pytest.raises(ValueError, match=r"mask has shape \(5,\); expected \[4\].*or \[24\]"):
        layer(x, torch.ones(5))
    with pytest.raises(ValueError, match="mask has shape"):
        layer(x, torch.ones(4, 6))


def test_error_feature_size(layer):
    with pytest.raises(ValueError, match="feature size mismatch: x has 15 features"):
        layer(torch.randn(4, 15))


def test_error_non_floating_input(layer):
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got dtype torch.int64"):
        layer(torch.ones(4, 16, dtype=torch.long))


def test_error_mask_dtype_and_values(layer):
    x = torch.randn(4, 16)
    with pytest.raises(TypeError, match="mask must be bool or floating point"):
        layer(x, torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask values must be 0 or 1"):
        layer(x, torch.tensor([1.0, 0.5, 0.0, 1.0]))


def test_error_mask_of_another_type(layer):
    for mask in ([1, 0, 1, 1], True, np.ones(4)):
        with pytest.raises(TypeError, match="mask must be a torch.Tensor or None, got"):
            layer(torch.randn(4, 16), mask)


def test_error_mask_on_another_device(layer):
    if not torch.cuda.is_available():
        mask = torch.ones(4, device="meta")  # any device other than x's
    else:
        mask = torch.ones(4, device="cuda")
    with pytest.raises(ValueError, match="mask is on .* but x is on cpu"):
        layer(torch.randn(4, 16), mask)


def test_error_rank_and_shapes():
    with pytest.raises(ValueError, match="rank r must be an integer >= 1, got 0"):
        RoutedLoRALinear(8, 4, r=0)
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        RoutedLoRALinear(8, 4, lora_dropout=1.0)
    with pytest.raises(ValueError, match="in_features and out_features must be integers >= 1, got 8.0"):
        RoutedLoRALinear(8.0, 4)
    for alpha in ("1", float("nan"), True):
        with pytest.raises(ValueError, match="lora_alpha must be a finite number"):
            RoutedLoRALinear(8, 4, lora_alpha=alpha)
    x, W = torch.randn(2, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="rank r >= 1"):
        routed_lora_linear(x, W, None, torch.randn(0, 8), torch.randn(4, 0), 1.0, None)
    with pytest.raises(ValueError, match=r"lora_B has shape \(4, 3\), expected \[4, 2\]"):
        routed_lora_linear(x, W, None, torch.randn(2, 8), torch.randn(4, 3), 1.0, None)


def test_error_dtype_mismatch_with_frozen_weight(layer):
    with pytest.raises(TypeError, match="x is torch.float16 but the frozen weight is torch.float"):
        layer(torch.randn(2, 16, dtype=torch.float16))


def _bad_inputs():
    """(what, inputs) with one thing wrong each, from valid inputs of routed_lora_linear."""
    ok = dict(x=torch.randn(2, 3, 8), weight=torch.randn(4, 8), bias=torch.randn(4), lora_A=torch.randn(2, 8),
              lora_B=torch.randn(4, 2), mask=torch.ones(2), x_lora=None, backend="auto")
    meta = lambda t: t.to("meta")  # noqa: E731 - a device other than x's
    changes = [("x a list", "x", [[1.0] * 8]), ("x integer", "x", torch.ones(2, 8, dtype=torch.long)),
               ("x 1-D", "x", torch.randn(8)), ("x other features", "x", torch.randn(2, 3, 7)),
               ("weight 1-D", "weight", torch.randn(8)), ("weight 3-D", "weight", torch.randn(1, 4, 8)),
               ("weight float64", "weight", torch.randn(4, 8, dtype=torch.float64)),
               ("weight elsewhere", "weight", meta(torch.randn(4, 8))),
               ("bias shape", "bias", torch.randn(5)), ("bias float64", "bias", torch.randn(4, dtype=torch.float64)),
               ("bias elsewhere", "bias", meta(torch.randn(4))),
               ("lora_A rank 0", "lora_A", torch.randn(0, 8)), ("lora_A features", "lora_A", torch.randn(2, 7)),
               ("lora_A 3-D", "lora_A", torch.randn(1, 2, 8)), ("lora_A integer", "lora_A", torch.ones(2, 8, dtype=torch.long)),
               ("lora_A elsewhere", "lora_A", meta(torch.randn(2, 8))),
               ("lora_B shape", "lora_B", torch.randn(4, 3)), ("lora_B integer", "lora_B", torch.ones(4, 2, dtype=torch.long)),
               ("lora_B elsewhere", "lora_B", meta(torch.randn(4, 2))),
               ("x_lora shape", "x_lora", torch.randn(2, 8)), ("x_lora float64", "x_lora", torch.randn(2, 3, 8, dtype=torch.float64)),
               ("x_lora elsewhere", "x_lora", meta(torch.randn(2, 3, 8))),
               ("mask a list", "mask", [1.0, 1.0]), ("mask integer", "mask", torch.ones(2, dtype=torch.long)),
               ("mask size", "mask", torch.ones(5)), ("mask 2-D", "mask", torch.ones(2, 3)),
               ("mask elsewhere", "mask", meta(torch.ones(2))), ("backend", "backend", "cuda")]
    return [(what, dict(ok, **{name: value})) for what, name, value in changes], ok


@pytest.mark.parametrize("what", [w for w, _ in _bad_inputs()[0]])
def test_quick_check_never_passes_what_the_full_checks_refuse(what):
    """The layer's inputs pass one quick test in the usual case and the full checks otherwise: each
    wrong input must fail the quick test (the mask's size is checked after it, always) and get an
    error that names the wrong argument."""
    cases, ok = _bad_inputs()
    inputs = dict(cases)[what]
    args = [inputs[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "mask", "x_lora", "backend")]
    assert lora_module._usual(*args) is what.startswith(("mask size", "mask 2-D"))
    with pytest.raises((TypeError, ValueError)) as e:
        routed_lora_linear(inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_A"], inputs["lora_B"], 1.0,
                           inputs["mask"], x_lora=inputs["x_lora"], backend=inputs["backend"])
    assert what.split()[0] in str(e.value)
    assert lora_module._usual(*[ok[k] for k in ("x", "weight", "bias", "lora_A", "lora_B", "mask", "x_lora",
                                                 "backend")]) is True


def test_error_backend():
    x, W, A, B = torch.randn(2, 8), torch.randn(4, 8), torch.randn(2, 8), torch.randn(4, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        routed_lora_linear(x, W, None, A, B, 1.0, None, backend="cuda")


def test_numpy_hyperparameters_are_taken_as_the_numbers_they_are():
    """r, lora_alpha and lora_dropout from numpy (a sweep's grid) work as Python numbers do (peft
    takes them too); a string is refused by name."""
    a = RoutedLoRALinear(8, 6, r=np.int64(2), lora_alpha=np.float32(3.0), lora_dropout=np.float64(0.25))
    b = RoutedLoRALinear(8, 6, r=2, lora_alpha=3.0, lora_dropout=0.25)
    assert (a.r, a.scaling, a.lora_dropout.p) == (b.r, b.scaling, b.lora_dropout.p)
    assert type(a.r) is int and type(a.lora_alpha) is float
    with pytest.raises(ValueError, match="lora_dropout must be a number in"):
        RoutedLoRALinear(8, 6, lora_dropout="0.1")
