"""CleaR's training loss: cross-entropy on the observed labels plus a consistency term that pulls
the routed prediction towards the epoch's ensemble teacher (clear-method.md, step 4).

Two implementations of one formula: plain torch (the reference, and the CPU path), and on CUDA
tensors a fused Triton forward and backward (clear_fast/kernels/clear_loss.py) that launch 2 kernels
where the torch ops launch 8-27, which counts in a host-bound GPU step.
"""
import torch
import torch.nn.functional as F

from clear_fast.kernels.utils import check_backend, use_triton


_NO_IGNORED_LABEL = -(2 ** 62)


def consistency_loss(logits, teacher_logits, temperature=1.0):
    """T^2 * mean_i [ - sum_c q_ic log softmax(logits_i / T)_c ],  q_i = softmax(teacher_i / T), detached."""
    q = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return temperature ** 2 * -(q * log_p).sum(-1).mean()


def clear_loss(logits, labels, teacher_logits=None, weight=1.0, temperature=1.0, backend="auto"):
    """CE(f(x; m), y~) + lambda * consistency, with no per-sample weighting (as released).

    logits [B, C]; labels [B] integers (any integer dtype) in [0, C); teacher_logits [B, C] or
    None (CE only).
    Returns (total loss, per-sample CE detached, fp32): the latter feeds the train-steps
    clean-probability option. backend: "auto" (fused Triton kernels on CUDA tensors, torch
    otherwise), "torch" or "triton". A label outside [0, C): the torch path raises (a clear
    error on CPU tensors, torch's device-side bound check on CUDA ones); the Triton path makes
    that sample's CE and the loss NaN (checking would cost a host sync).
    """
    check_backend(backend)
    temperature = _scalar(temperature)
    _check_loss_inputs(logits, labels, teacher_logits, temperature)
    weight = _scalar(weight)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight < float("inf"):
        raise ValueError(f"weight (the consistency term's) must be a finite number >= 0, got {weight!r}")
    weight = float(weight)
    labels = labels.long()  # any integer dtype; int64 as cross_entropy wants (no copy when it is)
    teacher = teacher_logits if teacher_logits is not None and weight > 0 else None
    if logits.shape[0] and use_triton(logits, backend) and not torch.compiler.is_compiling():
        if teacher is not None:
            teacher = teacher.detach().contiguous()
        return _FusedClearLoss.apply(logits.contiguous(), labels.contiguous(), teacher, float(weight),
                                     float(temperature))
    _check_label_range(logits, labels)
    # no ignore_index: a label of -100 on a GPU fails torch's own bound check instead of being skipped
    ce = F.cross_entropy(logits.float(), labels, reduction="none", ignore_index=_NO_IGNORED_LABEL)
    loss = ce.mean()
    if teacher is not None:
        loss = loss + weight * consistency_loss(logits, teacher, temperature)
    return loss, ce.detach()


def _check_loss_inputs(logits, labels, teacher_logits, temperature):
    if not torch.is_tensor(logits) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating-point tensor [batch, classes], got "
                         f"{tuple(logits.shape) if torch.is_tensor(logits) else type(logits).__name__}")
    if (not torch.is_tensor(labels) or labels.shape != logits.shape[:1] or labels.is_floating_point()
            or labels.is_complex() or labels.dtype == torch.bool):
        raise ValueError(f"labels must be integers of shape [{logits.shape[0]}] (one class index per "
                         f"row of logits), got "
                         f"{(tuple(labels.shape), labels.dtype) if torch.is_tensor(labels) else type(labels).__name__}")
    if teacher_logits is not None and (not torch.is_tensor(teacher_logits)
                                       or teacher_logits.shape != logits.shape):
        raise ValueError(f"teacher_logits must have the logits' shape {tuple(logits.shape)}, got "
                         f"{tuple(teacher_logits.shape) if torch.is_tensor(teacher_logits) else type(teacher_logits).__name__}")
    for name, t in (("labels", labels), ("teacher_logits", teacher_logits)):
        if t is not None and t.device != logits.device:
            raise ValueError(f"{name} are on {t.device}, the logits on {logits.device}: put them on one device")
    if logits.shape[0] == 0:
        raise ValueError("logits has no rows: the loss of an empty batch is undefined")
    if not (isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
            and 0 < temperature < float("inf")):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _scalar(value):
    """A numpy scalar or a 0-d tensor (not bool) as the Python number it holds; anything else as it is."""
    if torch.is_tensor(value) and value.dim() == 0 and value.dtype != torch.bool:
        return value.item()
    if hasattr(value, "dtype") and hasattr(value, "item") and getattr(value, "ndim", None) == 0 \
            and value.dtype != bool:
        return value.item()
    return value


def _check_label_range(logits, labels):
    # On CPU tensors (cheap there; on a GPU a host sync): torch's cross_entropy would skip -100
    # (its ignore_index) without a word and raise a bare IndexError for other labels out of range.
    if labels.device.type == "cpu" and labels.numel() and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(labels)
        if lo < 0 or hi >= logits.shape[1]:
            raise ValueError(f"labels must be class indices in [0, {logits.shape[1]}) for "
                             f"{logits.shape[1]} classes of logits, got values from {int(lo)} to {int(hi)}")


def _kernels():
    # Imported on first use: the CPU path must work where Triton is not installed.
    from clear_fast.kernels import clear_loss
    return clear_loss


class _FusedClearLoss(torch.autograd.Function):
    """clear_loss on the Triton kernels; the teacher gets no gradient (it is detached)."""

    @staticmethod
    def forward(ctx, logits, labels, teacher, weight, temperature):
        loss, ce, stats = _kernels().clear_loss_forward(logits, labels, teacher, weight, temperature)
        ctx.save_for_backward(logits, labels, teacher, stats)
        ctx.weight, ctx.temperature = weight, temperature
        ctx.mark_non_differentiable(ce)
        return loss, ce

    @staticmethod
    def backward(ctx, grad_loss, grad_ce):
        logits, labels, teacher, stats = ctx.saved_tensors
        grad = _kernels().clear_loss_backward(grad_loss.contiguous(), logits, labels, teacher, stats,
                                              ctx.weight, ctx.temperature)
        return grad, None, None, None, None
