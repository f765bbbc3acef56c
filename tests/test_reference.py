"""The released-implementation reference (benchmarks/reference.py) computes what it claims: all
routed = plain LoRA, none routed = the frozen model, mixed masks = clear_fast's routed model with
the same adapter weights, per sample and per layer, outputs and adapter gradients."""
import copy
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from clear_fast.model import draw_routing_masks, inject_routed_lora

_spec = importlib.util.spec_from_file_location(
    "clear_reference", Path(__file__).resolve().parents[1] / "benchmarks" / "reference.py")
reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference)

B, T, LAYERS = 6, 12, 3


def tiny_classifier(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    cfg = BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32, num_labels=3,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(cfg).eval()


def random_adapters(model, seed):
    """Non-zero lora_B (peft starts it at zero, which would make every mask look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 2.0)


def copy_adapters(src_peft, dst_routed):
    """peft's lora_A/B weights (same shapes) into clear_fast's RoutedLoRALinear modules."""
    dst = dict(dst_routed.named_modules())
    n = 0
    with torch.no_grad():
        for name, module in src_peft.base_model.model.named_modules():
            if hasattr(module, "lora_A") and "adapted" in name:
                ours = dst[name.replace(".adapted", "")]
                ours.lora_A.copy_(module.lora_A["default"].weight)
                ours.lora_B.copy_(module.lora_B["default"].weight)
                n += 1
    assert n == 2 * LAYERS


@pytest.fixture()
def models():
    base = tiny_classifier()
    ref, router = reference.released_lora_reference(copy.deepcopy(base))
    random_adapters(ref, seed=1)
    routed = copy.deepcopy(base)
    routed_router = inject_routed_lora(routed, ("query", "value"), r=4, lora_alpha=1.0)
    copy_adapters(ref, routed)
    torch.manual_seed(2)
    batch = {"input_ids": torch.randint(1, 97, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.long)}
    batch["attention_mask"][0, 7:] = 0  # a padded sample too
    return base, ref, router, routed, routed_router, batch


def logits(model, batch):
    return model(**batch).logits


def test_structure_frozen_copy_per_layer(models):
    base, ref, router, *_ = models
    assert router.num_layers == LAYERS
    layers = ref.base_model.model.bert.encoder.layer
    assert all(isinstance(layer, reference.DualPathLayer) for layer in layers)
    trainable = {n for n, p in ref.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "classifier" in n for n in trainable)
    assert not any(p.requires_grad for layer in layers for p in layer.frozen.parameters())
    # The frozen copy holds the pretrained weights: one more encoder's worth of parameters.
    n_base = sum(p.numel() for p in base.bert.encoder.layer.parameters())
    assert sum(p.numel() for layer in layers for p in layer.frozen.parameters()) == n_base


def test_all_routed_equals_plain_lora(models):
    base, ref, router, *_ = models
    # The same peft adapters without the frozen copies: the plain LoRA model.
    plain = copy.deepcopy(ref)
    plain_layers = plain.base_model.model.bert.encoder.layer
    for i in range(LAYERS):
        plain_layers[i] = plain_layers[i].adapted
    batch = models[-1]
    expected = logits(plain, batch)
    router.set_masks(torch.ones(B, LAYERS, dtype=torch.bool))
    torch.testing.assert_close(logits(ref, batch), expected, rtol=1e-5, atol=1e-6)
    router.set_masks(None)  # no mask: every sample adapted
    torch.testing.assert_close(logits(ref, batch), expected, rtol=1e-5, atol=1e-6)
    # The adapters change the output far beyond the tolerance, so the comparisons can fail.
    assert (expected - logits(base, batch)).abs().max() > 1e-3


def test_none_routed_equals_frozen_model(models):
    base, ref, router, *_ = models
    batch = models[-1]
    router.set_masks(torch.zeros(B, LAYERS, dtype=torch.bool))
    out = logits(ref, batch)
    # The head is trainable in both, but untouched: the frozen model's logits exactly.
    torch.testing.assert_close(out, logits(base, batch), rtol=1e-5, atol=1e-6)


def test_mixed_masks_blend_per_sample_and_layer(models):
    _, ref, router, routed, routed_router, batch = models
    torch.manual_seed(3)
    masks = draw_routing_masks(torch.full((B,), 0.5), LAYERS)
    masks[0] = torch.tensor([True, False, True])
    masks[1] = torch.tensor([False, True, False])
    router.set_masks(masks)
    routed_router.set_masks(masks)
    ref.train(), routed.train()  # dropout is 0: train mode only switches the autograd path
    out_ref, out_ours = logits(ref, batch), logits(routed, batch)
    torch.testing.assert_close(out_ref, out_ours, rtol=1e-5, atol=1e-5)
    # Per sample: flipping one sample's masks changes that sample's row only.
    flipped = masks.clone()
    flipped[2] = ~flipped[2]
    router.set_masks(flipped)
    out_flipped = logits(ref, batch)
    changed = (out_flipped - out_ref).abs().amax(1) > 1e-4
    assert changed.tolist() == [i == 2 for i in range(B)]
    # Adapter gradients agree with the routed model's.
    router.set_masks(masks)
    labels = torch.arange(B) % 3
    for model in (ref, routed):
        torch.nn.functional.cross_entropy(logits(model, batch), labels).backward()
    grads_ref = {n.replace(".adapted", "").replace(".default.weight", ""): p.grad
                 for n, p in ref.base_model.model.named_parameters() if "lora_" in n}
    for n, p in routed.named_parameters():
        if "lora_" in n:
            torch.testing.assert_close(grads_ref[n], p.grad, rtol=1e-4, atol=1e-6)


def test_bad_mask_and_model_errors(models):
    _, ref, router, *_ = models
    router.set_masks(torch.ones(B + 1, LAYERS, dtype=torch.bool))
    with pytest.raises(ValueError, match="one value per sample"):
        logits(ref, models[-1])
    with pytest.raises(ValueError, match="BERT-like encoders only"):
        reference.released_lora_reference(torch.nn.Linear(3, 3))


def test_sklearn_clean_probability_picks_low_loss_component():
    rng = np.random.default_rng(0)
    losses = np.concatenate([rng.exponential(0.05, 300), rng.normal(3.0, 0.5, 100)])
    p = reference.sklearn_clean_probability(torch.as_tensor(losses))
    assert p.shape == (400,)
    assert p[:300].mean() > 0.95 and p[300:].mean() < 0.05
