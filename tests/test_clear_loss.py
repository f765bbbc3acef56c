"""The fused CleaR loss (kernels/clear_loss.py) against the torch path of clear_fast.losses.clear_loss,
through Triton's interpreter on the CPU and compiled on a GPU when one is present."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from clear_fast.kernels.utils import interpreting
from clear_fast.losses import clear_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available() or interpreting(),
                          reason="needs a CUDA GPU and TRITON_INTERPRET=0 (compiled kernels)")
interpreter = pytest.mark.skipif(not interpreting(), reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

# (batch, classes, teacher, weight, temperature): one and several row blocks, one and several
# chunks of classes (256 per chunk), CE only, consistency with T = 1 and T = 2, weight 0
CASES = [(32, 10, True, 1.0, 1.0), (5, 600, True, 0.3, 2.0), (300, 7, True, 1.0, 2.0),
         (9, 77, False, 1.0, 1.0), (4, 5, True, 0.0, 1.0), (3, 1, True, 1.0, 1.0)]


def both_paths(B, C, teacher, weight, temperature, device, dtype=torch.float32, grad_scale=1.7, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = (3 * torch.randn(B, C, generator=g)).to(device, dtype)
    y = torch.randint(0, C, (B,), generator=g).to(device)
    t = (3 * torch.randn(B, C, generator=g)).to(device) if teacher else None
    out = {}
    for backend in ("torch", "triton"):
        zz = z.clone().requires_grad_()
        loss, ce = clear_loss(zz, y, t, weight, temperature, backend=backend)
        (grad_scale * loss).backward()
        out[backend] = loss.detach(), ce, zz.grad
    return out


def check_case(B, C, teacher, weight, temperature, device, dtype=torch.float32):
    out = both_paths(B, C, teacher, weight, temperature, device, dtype)
    (loss_t, ce_t, grad_t), (loss_k, ce_k, grad_k) = out["torch"], out["triton"]
    assert ce_k.dtype == torch.float32 and loss_k.shape == () and grad_k.dtype == dtype
    assert not ce_k.requires_grad
    # fp32 sums in other orders (chunked log-sum-exps) and, compiled, exp2-based exponentials: a few
    # ulp of the log-sum-exp (~10 here) apart, which the gradient's softmax inherits
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ce_k, ce_t, rtol=1e-5, atol=1e-5)
    # the gradient in the logits' dtype: both paths round the same fp32 gradient to it
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-4)
    torch.testing.assert_close(grad_k, grad_t, **tol)


DEVICES = [pytest.param("cpu", marks=interpreter), pytest.param("cuda", marks=cuda)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("B,C,teacher,weight,temperature", CASES)
def test_fused_loss_matches_torch(B, C, teacher, weight, temperature, device):
    check_case(B, C, teacher, weight, temperature, device)


@pytest.mark.parametrize("device", DEVICES)
def test_fused_loss_half_logits(device):
    check_case(16, 40, True, 1.0, 2.0, device, torch.bfloat16)


@interpreter
def test_fused_loss_is_the_formula_in_float64():
    # independent of both implementations: the documented formula, in float64
    g = torch.Generator().manual_seed(3)
    z, t = torch.randn(6, 9, generator=g, dtype=torch.float64), torch.randn(6, 9, generator=g, dtype=torch.float64)
    y, T, w = torch.randint(0, 9, (6,), generator=g), 2.0, 0.7
    ce = torch.logsumexp(z, 1) - z.gather(1, y[:, None])[:, 0]
    cons = torch.logsumexp(z / T, 1) - (torch.softmax(t / T, 1) * z / T).sum(1)
    loss, ce_k = clear_loss(z.float(), y, t.float(), w, T, backend="triton")
    assert abs(loss.item() - (ce + w * T * T * cons).mean().item()) < 1e-5
    torch.testing.assert_close(ce_k.double(), ce, rtol=1e-6, atol=1e-6)


@interpreter
def test_fused_loss_teacher_gets_no_gradient():
    z, t = torch.randn(4, 3, requires_grad=True), torch.randn(4, 3, requires_grad=True)
    loss, _ = clear_loss(z, torch.tensor([0, 1, 2, 0]), t, backend="triton")
    loss.backward()
    assert t.grad is None and z.grad is not None and z.grad.abs().sum() > 0


@interpreter
def test_fused_loss_label_out_of_range_is_nan_not_a_wrong_number():
    z, y = torch.randn(4, 5), torch.tensor([0, 5, 1, -1])
    loss, ce = clear_loss(z, y, None, backend="triton")
    assert torch.isnan(loss)
    assert torch.isnan(ce[[1, 3]]).all() and torch.isfinite(ce[[0, 2]]).all()
    torch.testing.assert_close(ce[[0, 2]], F.cross_entropy(z[[0, 2]], y[[0, 2]], reduction="none"))
    with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 5\).*from -1 to 5"):
        clear_loss(z, y, None, backend="torch")  # the CPU path checks


def test_loss_labels_out_of_range_raise_on_cpu_tensors():
    """-100, torch's ignore_index, is not skipped: every label must name a class."""
    z = torch.randn(4, 5)
    for bad in (-100, -1, 5):
        with pytest.raises(ValueError, match="labels must be class indices in"):
            clear_loss(z, torch.tensor([0, bad, 1, 2]))


@pytest.mark.parametrize("weight", [float("nan"), -1.0, float("inf"), "1", True, torch.tensor([0.5, 0.5]),
                                    np.array([0.5])])
def test_loss_rejects_a_bad_consistency_weight(weight):
    with pytest.raises(ValueError, match="weight .* must be a finite number >= 0"):
        clear_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 3), weight)


def test_loss_takes_weight_and_temperature_as_numpy_or_tensor_scalars():
    args = (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 3))
    want = clear_loss(*args, 0.5)[0]
    for weight in (np.float32(0.5), np.float64(0.5), torch.tensor(0.5)):
        assert torch.equal(clear_loss(*args, weight)[0], want)
    want = clear_loss(*args, 0.5, 2.0)[0]
    for temperature in (np.float32(2.0), torch.tensor(2.0)):  # the temperature too
        assert torch.equal(clear_loss(*args, 0.5, temperature)[0], want)


@pytest.mark.parametrize("args,match", [
    ((torch.randn(4), torch.zeros(4, dtype=torch.long)), "logits must be a floating-point tensor"),
    ((torch.randn(4, 3), torch.zeros(5, dtype=torch.long)), "labels must be integers of shape \\[4\\]"),
    ((torch.randn(4, 3), torch.zeros(4)), "labels must be integers"),
    ((torch.randn(4, 3), torch.zeros(4, dtype=torch.bool)), "labels must be integers"),
    ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), torch.randn(4, 2)), "teacher_logits must have"),
    ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None, 1.0, 0.0), "temperature must be a finite number > 0"),
    ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long), None, 1.0, float("inf")), "temperature must be a finite"),
    ((torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta")), "labels are on meta, the logits on cpu"),
    ((torch.randn(0, 3), torch.zeros(0, dtype=torch.long)), "no rows"),
])
def test_loss_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        clear_loss(*args)


def test_loss_takes_any_integer_labels():
    z, y = torch.randn(4, 3), torch.tensor([0, 2, 1, 2])
    assert torch.equal(clear_loss(z, y.int())[1], clear_loss(z, y)[1])


def test_auto_backend_env_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("CLEAR_FAST_AUTO_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CLEAR_FAST_AUTO_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1"):
        clear_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


def test_loss_unknown_backend():
    with pytest.raises(ValueError, match="backend must be one of"):
        clear_loss(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), backend="cuda")


@interpreter
def test_auto_backend_env_runs_a_training_step_on_the_kernels(monkeypatch, record_calls):
    """CLEAR_FAST_AUTO_BACKEND=triton: a routed model's layers and loss take their kernels on CPU
    tensors, and the step's loss and adapter gradients match the CPU path's."""
    from transformers import BertConfig, BertForSequenceClassification

    from clear_fast.kernels import clear_loss as loss_kernels, routed_lora
    from clear_fast.model import draw_routing_masks, inject_routed_lora

    monkeypatch.delenv("CLEAR_FAST_AUTO_BACKEND", raising=False)  # the first step is the CPU path
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=2000, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64, num_labels=4,
                                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    router = inject_routed_lora(model, None, r=2, lora_alpha=2)
    for m in router.modules():
        torch.nn.init.normal_(m.lora_B)
    ids, y = torch.randint(1000, 2000, (3, 7)), torch.tensor([0, 3, 1])
    router.set_masks(draw_routing_masks(torch.tensor([1.0, 0.0, 1.0]), router.num_layers))
    teacher = torch.randn(3, 4)
    launches = record_calls(routed_lora, "lora_forward_", "lora_backward")
    record_calls(loss_kernels, "clear_loss_forward")

    def step():
        model.zero_grad()
        loss, _ = clear_loss(model(input_ids=ids).logits, y, teacher, 1.0, 2.0)
        loss.backward()
        return loss.detach(), [m.lora_A.grad.clone() for m in router.modules()]

    cpu_loss, cpu_grads = step()
    assert launches == []
    monkeypatch.setenv("CLEAR_FAST_AUTO_BACKEND", "triton")
    loss, grads = step()
    n = len(router.modules())
    assert launches.count("lora_forward_") == n and launches.count("lora_backward") == n
    assert launches.count("clear_loss_forward") == 1
    torch.testing.assert_close(loss, cpu_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, cpu_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@cuda
def test_cuda_fused_loss_makes_no_host_sync():
    z = torch.randn(32, 10, device="cuda", requires_grad=True)
    y, t = torch.randint(0, 10, (32,), device="cuda"), torch.randn(32, 10, device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = clear_loss(z, y, t)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
