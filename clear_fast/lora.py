"""RoutedLoRALinear: a frozen linear plus a LoRA adapter that each sample uses or bypasses.

    y = x W^T + b + s * m * dropout(x) A^T B^T,   s = lora_alpha / r,   m in {0, 1} per sample/row

Rows with m == 0 get exactly F.linear(x, W, b), bit for bit, and add nothing to the adapter
gradients. Two fused halves do the LoRA work (the math and the GPU kernels are described in
clear_fast/kernels/routed_lora.py): forward (U = m X A^T, then Y += s U B^T in place, routed rows
only) and backward (G = m dY B, dX += s G A in place, dA = s G^T X, dB = s dY^T U). Each has two
implementations:

- CUDA tensors: one Triton kernel each, which skips all-bypassed row tiles without a host sync;
- CPU tensors: plain PyTorch that gathers the routed samples (index_select), works on them alone
  and adds the result back (index_add_), leaving the bypassed rows untouched.

Each half is a torch custom op (torch.library.custom_op with a fake implementation) so that
torch.compile can trace a model that uses the layer; one torch.autograd.Function composes them with
the base product (cuBLAS / MKL) into the forward and backward.
"""
import functools
import math
import numbers
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from clear_fast.kernels.utils import BACKENDS, acc_dtype as _acc_dtype, check_backend, use_triton

__all__ = ["RoutedLoRALinear", "routed_lora_linear"]


@functools.lru_cache(maxsize=None)  # an import statement per call costs host time in every layer call
def _kernels():
    # Imported on first use: the CPU path must work where Triton is not installed.
    from clear_fast.kernels import routed_lora
    return routed_lora


# ------------------------------------------------------------ CPU path: gather the routed samples
def _routed_rows(mask, rows_per_mask):
    """Indices of the rows whose mask value is non-zero (row i uses mask[i // rows_per_mask]).
    Worked out once per half (forward, backward) and shared by its products, not cached across
    calls: a cache keyed on the mask tensor misses changes made through .data or numpy."""
    rows = mask.nonzero().squeeze(1)
    if rows_per_mask > 1 and rows.numel():
        # Row indices into the 2-D [M, d] view, not sample indices into a [B, T, d] view:
        # index_select and index_add_ along dim 0 of 3-D views measured 10-400x slower on 2 busy
        # cores.
        rows = (rows[:, None] * rows_per_mask
                + torch.arange(rows_per_mask, device=rows.device)).flatten()
    return rows


def _shrink_torch(x, w, mask, rows_per_mask, rows):
    acc, cd = _acc_dtype(x.dtype), torch.promote_types(x.dtype, w.dtype)
    if rows.numel() == 0:
        return torch.zeros((x.shape[0], w.shape[0]), dtype=acc, device=x.device)
    every = rows.numel() == x.shape[0]
    m = mask.to(acc).index_select(0, rows // rows_per_mask)[:, None]
    val = ((x if every else x.index_select(0, rows)).to(cd) @ w.to(cd).T).to(acc) * m
    if every:
        return val
    u = torch.zeros((x.shape[0], w.shape[0]), dtype=acc, device=x.device)
    return u.index_copy_(0, rows, val)


def _expand_torch_(y, u, w, scaling, rows):
    cd = torch.promote_types(y.dtype, w.dtype)
    if rows.numel() == y.shape[0] and cd == y.dtype:
        y.addmm_(u.to(cd), w.to(cd).T, alpha=scaling)  # one pass over y, no temporary
    elif rows.numel() == y.shape[0]:
        y.add_((u.to(cd) @ w.to(cd).T).to(y.dtype), alpha=scaling)
    elif rows.numel():
        delta = (u.index_select(0, rows).to(cd) @ w.to(cd).T).to(y.dtype)
        y.index_add_(0, rows, delta, alpha=scaling)


def _grad_torch(p, q, scaling, transpose, rows):
    acc = _acc_dtype(q.dtype)
    shape = (q.shape[1], p.shape[1]) if transpose else (p.shape[1], q.shape[1])
    if rows.numel() == 0:
        return torch.zeros(shape, dtype=acc, device=q.device)
    if rows.numel() != q.shape[0]:
        p, q = p.index_select(0, rows), q.index_select(0, rows)
    p, q = p.to(acc), q.to(acc)
    return (q.T @ p if transpose else p.T @ q).mul_(scaling)


def _forward_torch_(y, x, a, b, mask, rows_per_mask, scaling):
    rows = _routed_rows(mask, rows_per_mask)
    u = _shrink_torch(x, a, mask, rows_per_mask, rows)
    _expand_torch_(y, u, b, scaling, rows)
    return u


def _backward_torch(dy, x, u, a, b, mask, rows_per_mask, scaling, dx):
    rows = _routed_rows(mask, rows_per_mask)
    g = _shrink_torch(dy, b.T, mask, rows_per_mask, rows)  # m * dY B, [M, r]
    if dx is not None:
        _expand_torch_(dx, g, a.T, scaling, rows)  # dx += s m (dY B) A, in place
    return (_grad_torch(g, x, scaling, False, rows),  # s G^T x
            _grad_torch(u, dy, scaling, True, rows))  # s dY^T U


# ------------------------------------------------------------ each half: Triton or torch
def _forward_impl_(y, x, a, b, mask, rows_per_mask, scaling, backend, half_dots):
    if use_triton(y, backend):
        return _kernels().lora_forward_(y, x, a, b, mask, rows_per_mask, scaling, half_dots=half_dots)
    return _forward_torch_(y, x, a, b, mask, rows_per_mask, scaling)


def _backward_impl(dy, x, u, a, b, mask, rows_per_mask, scaling, dx, backend, half_dots):
    if use_triton(dy, backend):
        return _kernels().lora_backward(dy, x, u, a, b, mask, rows_per_mask, scaling, dx,
                                        half_dots=half_dots)
    return _backward_torch(dy, x, u, a, b, mask, rows_per_mask, scaling, dx)


# ------------------------------------------------------------ the same as torch custom ops
# torch.compile traces these (it cannot look inside them); eager calls skip the custom-op
# dispatcher, which costs 20-150 us a call (measured).
@torch.library.custom_op("clear_fast::lora_forward_", mutates_args=("y",))
def _forward_op(y: Tensor, x: Tensor, a: Tensor, b: Tensor, mask: Tensor, rows_per_mask: int,
                scaling: float, backend: str, half_dots: bool) -> Tensor:
    return _forward_impl_(y, x, a, b, mask, rows_per_mask, scaling, backend, half_dots)


@_forward_op.register_fake
def _(y, x, a, b, mask, rows_per_mask, scaling, backend, half_dots):
    return x.new_empty((x.shape[0], a.shape[0]), dtype=_acc_dtype(x.dtype))


@torch.library.custom_op("clear_fast::lora_backward", mutates_args=("dx",))
def _backward_op(dy: Tensor, x: Tensor, u: Tensor, a: Tensor, b: Tensor, mask: Tensor,
                 rows_per_mask: int, scaling: float, dx: Optional[Tensor],
                 backend: str, half_dots: bool) -> tuple[Tensor, Tensor]:
    dA, dB = _backward_impl(dy, x, u, a, b, mask, rows_per_mask, scaling, dx, backend, half_dots)
    return dA, dB.clone()  # eagerly both are views of one buffer; a custom op's outputs may not alias


@_backward_op.register_fake
def _(dy, x, u, a, b, mask, rows_per_mask, scaling, dx, backend, half_dots):
    acc = _acc_dtype(dy.dtype)
    return dy.new_empty(tuple(a.shape), dtype=acc), dy.new_empty(tuple(b.shape), dtype=acc)


def _eager_or_op(fn, op):
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else fn(*args)
    return call


_lora_forward_ = _eager_or_op(_forward_impl_, _forward_op)
_lora_backward = _eager_or_op(_backward_impl, _backward_op)


# ------------------------------------------------------------ autograd
def _routed_forward(x, x_lora, weight, bias, lora_A, lora_B, mask, opts):
    """(y, U): the forward of RoutedLoRAFunction, and what its backward needs besides the inputs."""
    # The base is F.linear on x as given, the very call bypassed rows must equal bit for bit.
    out = F.linear(x, weight, bias)
    if not out.is_contiguous():  # the LoRA term is added in place through a 2-D view
        out = out.contiguous()
    xl = (x if x_lora is None else x_lora).reshape(-1, x.shape[-1])
    scaling, rows_per_mask, backend, half_dots = opts
    u = _lora_forward_(out.view(-1, out.shape[-1]), xl, lora_A, lora_B, mask, rows_per_mask, scaling,
                       backend, half_dots)
    return out, u


class RoutedLoRAFunction(torch.autograd.Function):
    """Routed LoRA. x [..., in] (M rows); x_lora (dropout(x)) or None for x itself; mask [G] float
    (row i uses mask[i // rows_per_mask]); opts (scaling, rows_per_mask, backend, half_dots) in one
    argument (each argument of apply costs host time); half_dots: the Triton path multiplies the
    adapter in the activations' half dtype (set under autocast). Use routed_lora_linear, which
    checks the inputs."""

    @staticmethod
    def forward(ctx, x, x_lora, weight, bias, lora_A, lora_B, mask, opts):
        out, u = _routed_forward(x, x_lora, weight, bias, lora_A, lora_B, mask, opts)
        ctx.save_for_backward(x, x_lora, weight, lora_A, lora_B, mask, u)
        ctx.opts, ctx.has_bias = opts, bias is not None
        return out

    @staticmethod
    @once_differentiable  # u is saved without its graph: a second derivative would drop terms, so it raises
    def backward(ctx, dy):
        x, x_lora, weight, lora_A, lora_B, mask, u = ctx.saved_tensors
        need = ctx.needs_input_grad
        shape = x.shape
        dy = dy.reshape(-1, dy.shape[-1]).contiguous()
        x = x.reshape(-1, shape[-1])
        xl = x if x_lora is None else x_lora.reshape(-1, shape[-1])
        dx = dx_lora = dW = db = None
        if need[0]:
            dx = dy @ weight
        if need[1] and x_lora is not None:
            dx_lora = torch.zeros_like(xl, memory_format=torch.contiguous_format)  # the kernel writes it as rows
        # The adapter's input gradient goes into dx, or into dx_lora when the adapter has its own
        # (dropout) input.
        scaling, rows_per_mask, backend, half_dots = ctx.opts
        dA, dB = _lora_backward(dy, xl, u, lora_A, lora_B, mask, rows_per_mask, scaling,
                                dx if x_lora is None else dx_lora, backend, half_dots)
        if dx is not None:
            dx = dx.view(shape)
        if dx_lora is not None:
            dx_lora = dx_lora.view(shape)
        if need[2]:
            dW = dy.T @ x  # only when the user made the frozen weight trainable
        if need[3] and ctx.has_bias:
            db = dy.sum(0)
        dA = None if not need[4] else dA if dA.dtype == lora_A.dtype else dA.to(lora_A.dtype)
        dB = None if not need[5] else dB if dB.dtype == lora_B.dtype else dB.to(lora_B.dtype)
        return dx, dx_lora, dW, db, dA, dB, None, None


# ------------------------------------------------------------ input checks
_ALL_ROUTED = {}  # device -> a one-element mask of 1.0, made once (on a GPU a fill kernel per call)


def _all_routed(device):
    if torch.compiler.is_compiling():
        return torch.ones(1, device=device, dtype=torch.float32)
    mask = _ALL_ROUTED.get(device)
    if mask is None:
        with torch.inference_mode(False):  # a later training call saves it for the backward
            mask = _ALL_ROUTED[device] = torch.ones(1, device=device, dtype=torch.float32)
    return mask


def _is_int(n):
    return isinstance(n, numbers.Integral) and not isinstance(n, (bool, np.bool_))


def _check(x, weight, bias, lora_A, lora_B, mask, x_lora, backend):
    """Validate the inputs; returns (mask as a float [G] tensor, rows per mask entry). The usual
    call passes one quick test (on a GPU a layer call's checks are host time of a host-bound
    step); any other goes through the checks one by one, which name what is wrong."""
    if not _usual(x, weight, bias, lora_A, lora_B, mask, x_lora, backend):
        _check_each(x, weight, bias, lora_A, lora_B, mask, x_lora, backend)
    rows = math.prod(x.shape[:-1])
    if mask is None:
        return _all_routed(x.device), max(rows, 1)
    n = mask.numel()
    if mask.dim() != 1 or n not in (x.shape[0], rows):
        raise ValueError(f"mask has shape {tuple(mask.shape)}; expected [{x.shape[0]}] (one value "
                         f"per sample) or [{rows}] (one per row) for x of shape {tuple(x.shape)}")
    # the kernels index it as a flat float array; the Router's masks are one already (no dispatch)
    m = mask if mask.dtype is torch.float32 and mask.is_contiguous() else mask.to(torch.float32).contiguous()
    # Checking the values costs a host sync: done in eager CPU calls on float masks only (a bool mask
    # is 0/1 by its type), never on the GPU path nor while torch.compile traces (a graph break).
    if mask.dtype != torch.bool and not m.is_cuda and not torch.compiler.is_compiling():
        _check_mask_values(m)
    return m, rows // n if n else 1


def _usual(x, weight, bias, lora_A, lora_B, mask, x_lora, backend):
    """Whether the inputs pass every check of _check_each (False may still pass them: then
    _check_each finds nothing)."""
    try:
        dev, dt = x.device, x.dtype
        out_f, in_f = weight.shape
        r, k = lora_A.shape
        return (x.is_floating_point() and x.dim() >= 2 and x.shape[-1] == in_f == k and r >= 1
                and lora_B.shape == (out_f, r) and weight.dtype == dt and weight.device == dev
                and lora_A.device == dev and lora_B.device == dev
                and lora_A.is_floating_point() and lora_B.is_floating_point()
                and (bias is None or (bias.shape == (out_f,) and bias.dtype == dt and bias.device == dev))
                and (x_lora is None or (x_lora.shape == x.shape and x_lora.dtype == dt and x_lora.device == dev))
                and (mask is None or (isinstance(mask, Tensor) and mask.device == dev
                                      and (mask.dtype == torch.bool or mask.is_floating_point())))
                and backend in BACKENDS)
    except Exception:  # noqa: BLE001 - whatever it was, _check_each names it
        return False


def _check_each(x, weight, bias, lora_A, lora_B, mask, x_lora, backend):
    """Every check, one by one, raising with what is wrong."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape [batch, ..., in_features], got shape {tuple(x.shape)}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], "
                         f"got {tuple(weight.shape)}")
    out_f, in_f = weight.shape
    if x.shape[-1] != in_f:
        raise ValueError(f"feature size mismatch: x has {x.shape[-1]} features in its last "
                         f"dimension but weight expects in_features={in_f}")
    if lora_A.dim() != 2 or lora_A.shape[0] < 1:
        raise ValueError(f"lora_A must be [r, in_features] with rank r >= 1, "
                         f"got {tuple(lora_A.shape)}")
    r = lora_A.shape[0]
    if lora_A.shape[1] != in_f:
        raise ValueError(f"lora_A has shape {tuple(lora_A.shape)}, expected [r, {in_f}]")
    if tuple(lora_B.shape) != (out_f, r):
        raise ValueError(f"lora_B has shape {tuple(lora_B.shape)}, expected [{out_f}, {r}]")
    if bias is not None and tuple(bias.shape) != (out_f,):
        raise ValueError(f"bias has shape {tuple(bias.shape)}, expected [{out_f}]")
    if mask is not None and not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None, got {type(mask).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("x_lora", x_lora), ("mask", mask)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and t.dtype != x.dtype:
            raise TypeError(f"x is {x.dtype} but the frozen {name} is {t.dtype}: cast the input "
                            f"or the layer (e.g. layer.to({x.dtype}))")
    for name, t in (("lora_A", lora_A), ("lora_B", lora_B)):
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point, got {t.dtype}")
    if x_lora is not None and (x_lora.shape != x.shape or x_lora.dtype != x.dtype):
        raise ValueError(f"x_lora must match x ({tuple(x.shape)}, {x.dtype}), "
                         f"got {tuple(x_lora.shape)}, {x_lora.dtype}")
    check_backend(backend)
    if mask is not None and mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"mask must be bool or floating point (0/1), got dtype {mask.dtype}")


def _check_mask_values(m):
    if bool(((m != 0) & (m != 1)).any()):
        raise ValueError("mask values must be 0 or 1 (or bool); got other values")


def routed_lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask=None, *, x_lora=None,
                       backend="auto"):
    """y = x W^T + b + scaling * m * x_lora A^T B^T, bypassed rows exactly F.linear(x, W, b).

    x [..., in]; mask [B] per sample (B = x.shape[0]) or [M] per row (M = rows of x), bool or float
    0/1, None = every row routed. x_lora: the LoRA input (dropout(x)); None means x.
    backend: "auto" (Triton on CUDA, gather path on CPU), "torch" or "triton" (on CPU tensors only
    under TRITON_INTERPRET=1, for tests).
    """
    autocast = isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)
    return _routed_lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask, x_lora, backend, autocast)


def _routed_lora_linear(x, weight, bias, lora_A, lora_B, scaling, mask, x_lora, backend, autocast):
    if autocast:
        # Under autocast the frozen linear runs in autocast's dtype, as F.linear would. The adapter
        # keeps its own dtype; on CUDA its products run in autocast's dtype too (fp32 accumulation),
        # as peft's LoRA's would under autocast; the CPU path keeps them in the adapter's dtype
        # (inside it, autocast is off).
        dt = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dt), weight.to(dt)
        bias = None if bias is None else bias.to(dt)
        x_lora = None if x_lora is None else x_lora.to(dt)
    mask_f, rows_per_mask = _check(x, weight, bias, lora_A, lora_B, mask, x_lora, backend)
    if x.numel() == 0:
        return F.linear(x, weight, bias)
    args = (x, x_lora, weight, bias, lora_A, lora_B, mask_f, (float(scaling), rows_per_mask, backend, autocast))
    # Without autograd (evaluation, the clean-probability pass) the forward runs as it is: the
    # autograd.Function's own host work would buy nothing there.
    apply = RoutedLoRAFunction.apply if torch.is_grad_enabled() else _forward_only
    # Inside, autocast would change nothing on the Triton path (F.linear's inputs are in autocast's
    # dtype already, the kernels are not autocast ops): the context (host time) only for the torch path.
    if not autocast or use_triton(x, backend):
        return apply(*args)
    with torch.autocast(x.device.type, enabled=False):
        return apply(*args)


def _forward_only(*args):
    return _routed_forward(*args)[0]


# ------------------------------------------------------------ the module
class RoutedLoRALinear(nn.Module):
    """A frozen nn.Linear plus a LoRA adapter (peft's names and initialisation) routed per sample.

    forward(x, mask=None): mask [B] per sample or [M] per row; when None, `self.routing_mask` is
    used (set it before calling a whole model whose code calls the layer with one argument);
    when that is None too, every row is routed. lora_dropout applies to the LoRA input only, in
    training mode. While merged (merge()), forward is the merged linear and ignores any mask.

    cache_frozen_cast (off by default): under autocast, keep the frozen weight and bias cast to
    autocast's dtype from call to call while their storage and version counter are unchanged,
    where autocast casts them at every call (a launch and a pass over W each). Off because an edit
    through `.data` does not bump the version counter, so the kept cast would go stale without a
    word; the CLI's trainer, which owns its model, turns it on.
    """

    # Class defaults too, for layers pickled by a version before these attributes.
    cache_frozen_cast = False
    _frozen_cast = None
    # True while the layer projects an input that every sample of the batch shares (DeBERTa-v2's
    # relative-position embeddings; set by inject_routed_lora's hooks). Such a call always takes the
    # frozen layer: a per-sample mask cannot apply to it, and adapting it would let bypassed samples
    # see (and train) the adapter. Always, not only under routing, so that a model is evaluated as
    # it was trained.
    shared_input = False

    def __init__(self, in_features, out_features, r=8, lora_alpha=8, lora_dropout=0.0, bias=True,
                 device=None, dtype=None):
        super().__init__()
        if not _is_int(r) or r < 1:
            raise ValueError(f"rank r must be an integer >= 1, got {r!r}")
        if not all(_is_int(n) and n >= 1 for n in (in_features, out_features)):
            raise ValueError(f"in_features and out_features must be integers >= 1, got {in_features!r}, "
                             f"{out_features!r}")
        if isinstance(lora_alpha, bool) or not isinstance(lora_alpha, numbers.Real) or not math.isfinite(lora_alpha):
            raise ValueError(f"lora_alpha must be a finite number, got {lora_alpha!r}")
        if isinstance(lora_dropout, bool) or not isinstance(lora_dropout, numbers.Real) or not 0.0 <= lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be a number in [0, 1), got {lora_dropout!r}")
        # numpy scalars (a config read with numpy, a sweep's grid) as the Python numbers they stand for
        r, in_features, out_features = int(r), int(in_features), int(out_features)
        lora_alpha = int(lora_alpha) if isinstance(lora_alpha, numbers.Integral) else float(lora_alpha)
        lora_dropout = float(lora_dropout)
        f = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.r, self.lora_alpha = r, lora_alpha
        self.scaling = lora_alpha / r
        self.weight = nn.Parameter(torch.empty(out_features, in_features, **f), requires_grad=False)
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, **f), requires_grad=False)
        else:
            self.register_parameter("bias", None)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **f))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **f))
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        self.routing_mask = None
        self.merged = False
        self.cache_frozen_cast = False
        self._frozen_cast = None  # (key, weight, bias) in autocast's dtype; see _frozen_in
        self.reset_parameters()

    def reset_parameters(self):
        # Frozen part as nn.Linear initialises it; adapter as peft: A Kaiming-uniform, B zero.
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self):
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @classmethod
    def from_linear(cls, linear, r=8, lora_alpha=8, lora_dropout=0.0):
        """Wrap an nn.Linear: the new layer shares its weight and bias storage (frozen here; the
        original parameters keep their requires_grad). merge() therefore changes both."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"from_linear expects an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, r=r, lora_alpha=lora_alpha,
                    lora_dropout=lora_dropout, bias=linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight = nn.Parameter(linear.weight.detach(), requires_grad=False)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return layer

    def forward(self, x, mask=None):
        routing = mask is None and self.routing_mask is not None  # the Router's per-sample masks
        if routing:
            mask = self.routing_mask
        weight, bias, lora_A, lora_B = self._tensors()
        if self.shared_input:
            return F.linear(x, weight - self._delta_weight() if self.merged else weight, bias)
        if self.merged:  # the merged linear: the inputs are checked all the same, the mask then ignored
            _check(x, weight, bias, lora_A, lora_B, mask, None, "auto")
            return F.linear(x, weight, bias)
        if routing:
            if isinstance(x, Tensor) and x.dim() >= 2 and x.shape[0] != mask.shape[0]:
                raise ValueError(
                    f"this layer's routing masks (set by Router.route) hold {mask.shape[0]} samples, but its "
                    f"input has {x.shape[0]} in its first dimension (shape {tuple(x.shape)}). Either the model "
                    "calls this layer on inputs that are not [batch, ..., features] (XLNet's and Longformer's "
                    "layers take [tokens, batch, features]): leave it out of the target modules; or, in a loop "
                    "of one's own, the masks were routed for another batch: route each batch before its "
                    "forward (router.route(p_route); router.route(None) runs every adapter, as for evaluation).")
        dropout = self._modules["lora_dropout"]
        x_lora = dropout(x) if self.training and isinstance(dropout, nn.Dropout) else None
        autocast = isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)
        if autocast and self.cache_frozen_cast:
            weight, bias = self._frozen_in(torch.get_autocast_dtype(x.device.type))
        return _routed_lora_linear(x, weight, bias, lora_A, lora_B, self.scaling, mask, x_lora, "auto", autocast)

    def _tensors(self):
        """(weight, bias, lora_A, lora_B): from the parameter dict, not through nn.Module.__getattr__
        (host time in every call), unless one was taken out of it (torch.nn.utils.parametrize,
        DataParallel's replicas, FSDP1, a plain tensor set in its place): then as attributes."""
        params = self._parameters
        try:
            return params["weight"], params["bias"], params["lora_A"], params["lora_B"]
        except KeyError:
            return self.weight, self.bias, self.lora_A, self.lora_B

    def _frozen_in(self, dtype):
        """The frozen weight and bias in autocast's dtype, cast once and reused while they stay
        unchanged (same storage, same version): autocast would cast them at every call, a launch
        and a pass over W each (the same values). Not while torch.compile traces (it handles the
        casts itself), nor for a weight or bias made trainable (the gradient must reach it)."""
        w, b = self.weight, self.bias
        if (w.dtype == dtype or w.requires_grad or (b is not None and b.requires_grad)
                or torch.compiler.is_compiling()):
            return w, b
        key = (dtype, w.device, w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        if self._frozen_cast is None or self._frozen_cast[0] != key:
            with torch.inference_mode(False), torch.no_grad():  # usable in training after an eval pass
                self._frozen_cast = (key, w.to(dtype), None if b is None else b.to(dtype))
        return self._frozen_cast[1], self._frozen_cast[2]

    # The state dict holds, besides the tensors, whether the weight is merged and the adapter's
    # scaling: a merged weight loaded into an unmerged layer (or one with another lora_alpha / r)
    # would otherwise apply the adapter twice (or at another scale) without a word.
    def get_extra_state(self):
        return torch.tensor([float(self.merged), self.scaling], dtype=torch.float64)

    def set_extra_state(self, state):
        merged, scaling = (float(v) for v in torch.as_tensor(state).tolist())
        if not math.isclose(scaling, self.scaling, rel_tol=1e-12):
            raise ValueError(f"the state dict's adapter scaling (lora_alpha / r) is {scaling:g}, this "
                             f"layer's {self.scaling:g}: make the layer with the same lora_alpha and r")
        self.merged = bool(merged)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        extra = prefix + torch.nn.modules.module._EXTRA_STATE_KEY_SUFFIX
        had_extra = extra in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not had_extra:  # a state dict from before this entry existed: an unmerged layer's
            if extra in missing_keys:
                missing_keys.remove(extra)
            self.merged = False

    def _delta_weight(self):
        return (self.lora_B @ self.lora_A * self.scaling).to(self.weight.dtype)

    @torch.no_grad()
    def merge(self):
        """W += s B A: inference at the cost of F.linear; every row adapted, the mask ignored."""
        if self.merged:
            raise RuntimeError("RoutedLoRALinear is already merged")
        self.weight.add_(self._delta_weight())
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= s B A: back to the routed layer (exact up to floating-point rounding)."""
        if not self.merged:
            raise RuntimeError("RoutedLoRALinear is not merged")
        self.weight.sub_(self._delta_weight())
        self.merged = False

    def extra_repr(self):
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, r={self.r}, lora_alpha={self.lora_alpha}, "
                f"scaling={self.scaling:g}, lora_dropout={p}, merged={self.merged}")
