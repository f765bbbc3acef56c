"""CleaR's training loss: cross-entropy on the observed labels plus a consistency term that pulls
the routed prediction towards the epoch's ensemble teacher (clear-method.md, step 4)."""
import torch.nn.functional as F


def consistency_loss(logits, teacher_logits, temperature=1.0):
    """T^2 * mean_i [ - sum_c q_ic log softmax(logits_i / T)_c ],  q_i = softmax(teacher_i / T), detached."""
    q = F.softmax(teacher_logits.detach().float() / temperature, dim=-1)
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    return temperature ** 2 * -(q * log_p).sum(-1).mean()


def clear_loss(logits, labels, teacher_logits=None, weight=1.0, temperature=1.0):
    """CE(f(x; m), y~) + lambda * consistency, with no per-sample weighting (as released).

    Returns (total loss, per-sample CE detached): the latter feeds the train-steps clean-probability option.
    """
    ce = F.cross_entropy(logits.float(), labels, reduction="none")
    loss = ce.mean()
    if teacher_logits is not None and weight > 0:
        loss = loss + weight * consistency_loss(logits, teacher_logits, temperature)
    return loss, ce.detach()
