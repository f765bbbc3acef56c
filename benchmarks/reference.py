"""The released CleaR implementation's cost, reproduced faithfully for the benchmarks.

For LoRA the released code keeps a frozen deep copy of every encoder layer and runs it beside the
adapted layer on every sample, then blends the two outputs per sample with the layer's routing
mask (clear-method.md, "Known costs"): about twice the encoder compute and the frozen weights
twice in memory, whatever the routed fraction. The adapter inside the adapted layer is peft's LoRA
(query and value, r 4, lora_alpha 1, as released). Its mixture is scikit-learn's GaussianMixture.

This is a cost model for the benchmarks, not part of the library: its outputs equal clear_fast's
routed model given the same masks and adapter weights (tests/test_reference.py checks that), so
the two can be timed against each other on the same work.
"""
import copy

import numpy as np
import torch
from torch import nn

from clear_fast.model import Router, head_module_names

__all__ = ["DualPathLayer", "released_lora_reference", "sklearn_clean_probability"]


class DualPathLayer(nn.Module):
    """One encoder layer run twice: out = m * adapted(x) + (1 - m) * frozen(x), per sample.

    routing_mask: [B] (bool or 0/1) set before the forward, as on RoutedLoRALinear; None means
    every sample adapted. The frozen copy runs on every sample in either case (the released cost).
    """

    def __init__(self, adapted: nn.Module, frozen: nn.Module):
        super().__init__()
        self.adapted, self.frozen = adapted, frozen
        self.routing_mask = None

    def forward(self, hidden_states, *args, **kwargs):
        adapted = self.adapted(hidden_states, *args, **kwargs)
        frozen = self.frozen(hidden_states, *args, **kwargs)
        # transformers 5 layers return a tensor, older ones a tuple whose first item is the output
        a, f = (adapted[0], frozen[0]) if isinstance(adapted, tuple) else (adapted, frozen)
        m = self.routing_mask
        if m is None:
            out = a
        else:
            if m.dim() != 1 or m.shape[0] != a.shape[0]:
                raise ValueError(f"routing_mask has shape {tuple(m.shape)}; expected [{a.shape[0]}], "
                                 f"one value per sample of the batch")
            m = m.to(a.dtype).view(-1, *([1] * (a.dim() - 1)))
            out = m * a + (1 - m) * f
        return (out, *adapted[1:]) if isinstance(adapted, tuple) else out


def _encoder_layers(model):
    """The nn.ModuleList of transformer layers of a BERT-like encoder classifier."""
    backbone = getattr(model, getattr(model, "base_model_prefix", ""), None)
    layers = getattr(getattr(backbone, "encoder", None), "layer", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"{type(model).__name__} has no <backbone>.encoder.layer list of transformer "
                         f"layers: the reference supports BERT-like encoders only")
    return layers


def released_lora_reference(model, r=4, lora_alpha=1.0, target_modules=("query", "value"),
                            lora_dropout=0.0):
    """Turn a classifier into the released implementation's LoRA model, in place.

    Returns (peft_model, router): a frozen deep copy of each encoder layer is taken first, then
    peft's LoRA goes into the model (the head trainable, as peft's modules_to_save), then each
    adapted layer is paired with its frozen copy in a DualPathLayer. router.set_masks(masks
    [B, L]) sets every layer's per-sample mask, as clear_fast's Router does for the routed model.
    """
    from peft import LoraConfig, get_peft_model

    frozen = [copy.deepcopy(layer).requires_grad_(False) for layer in _encoder_layers(model)]
    config = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                        target_modules=list(target_modules), modules_to_save=head_module_names(model))
    peft_model = get_peft_model(model, config)
    inner = peft_model.base_model.model
    layers = _encoder_layers(inner)
    for i, f in enumerate(frozen):
        layers[i] = DualPathLayer(layers[i], f.to(next(layers[i].parameters()).device))
    names = [n for n, m in inner.named_modules() if isinstance(m, DualPathLayer)]
    return peft_model, Router([[layer] for layer in layers], names)


def sklearn_clean_probability(losses, random_state=0):
    """The released mixture: GaussianMixture(2) with scikit-learn's defaults (kmeans init, tol
    1e-3, reg_covar 1e-6, max_iter 100) on the raw losses; the posterior of the smaller-mean
    component. Returns a float64 numpy array [N]."""
    from sklearn.mixture import GaussianMixture

    x = (losses.detach().cpu().double().numpy() if isinstance(losses, torch.Tensor)
         else np.asarray(losses, dtype=np.float64)).reshape(-1, 1)
    gmm = GaussianMixture(n_components=2, max_iter=100, tol=1e-3, reg_covar=1e-6,
                          random_state=random_state).fit(x)
    return gmm.predict_proba(x)[:, int(np.argmin(gmm.means_.ravel()))]
