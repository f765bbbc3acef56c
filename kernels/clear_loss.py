"""CleaR's training loss in one Triton launch forward and one backward.

For logits z [B, C], observed labels y [B] and, optionally, teacher logits t [B, C] (detached),
temperature T and weight w (clear_fast.losses.clear_loss, whose torch path is the reference):

    ce_i   = lse(z_i) - z_i,y                               (cross-entropy)
    cons_i = lse(z_i / T) - sum_c q_ic z_ic / T,  q_i = softmax(t_i / T)   (= -sum_c q log softmax(z/T))
    loss   = mean_i (ce_i + w T^2 cons_i)
    dloss/dz_ic = (softmax(z_i)_c - [c == y_i] + w T (softmax(z_i / T)_c - q_ic)) / B

Why: on a GPU at batch 32 a training step is bound by the host's launches, and the loss done with
torch ops launches about 8 kernels (CE alone) to 27 (with the consistency term) per step; here the
forward is one launch that writes the loss, the per-sample CE and three log-sum-exps per row (for the
backward), and the backward is one launch (benchmarks/step_launches.py counts them).

Forward: one program walks every row block (batch sizes of training are small; one program also
makes the mean's summation order fixed), and within a row block the classes in chunks with online
log-sum-exps, so any number of classes works. Backward: one program per row block.
A label outside [0, C) gives that row a NaN CE (and so a NaN loss) instead of reading out of bounds.
fp32 arithmetic whatever the logits' dtype (the torch path upcasts too); the gradient comes back in
the logits' dtype.
"""
import torch
import triton
import triton.language as tl

from .launch import Launcher
from .utils import cdiv, next_power_of_2

_ELEMENTS = 4096  # rows x classes per block: three fp32 blocks of this size stay in registers
_MAX_CHUNK = 256
NUM_WARPS = 4  # both kernels (tests/compile_kernels.py builds them with it)


def _blocks(rows, classes):
    block_c = min(next_power_of_2(classes), _MAX_CHUNK)
    block_b = min(next_power_of_2(rows), max(1, _ELEMENTS // block_c))
    return block_b, block_c


@triton.jit
def _online_lse(m, s, v):
    """Running (max, sum of exp(. - max)) per row updated with a [BB, BC] block v (-inf = absent)."""
    m_new = tl.maximum(m, tl.max(v, axis=1))
    s = s * tl.exp(m - m_new) + tl.sum(tl.exp(v - m_new[:, None]), axis=1)
    return m_new, s


@triton.jit
def _forward_kernel(z_ptr, y_ptr, t_ptr, loss_ptr, ce_ptr, stats_ptr, B, C, inv_t, w_t2,
                    HAS_TEACHER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    total = tl.zeros([BLOCK_B], dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        live = rows < B
        y = tl.load(y_ptr + rows, mask=live, other=0)
        m = tl.full([BLOCK_B], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_B], dtype=tl.float32)
        zy = tl.zeros([BLOCK_B], dtype=tl.float32)
        hit = tl.zeros([BLOCK_B], dtype=tl.int32)
        m_zt = tl.full([BLOCK_B], float("-inf"), tl.float32)
        s_zt = tl.zeros([BLOCK_B], dtype=tl.float32)
        m_tt = tl.full([BLOCK_B], float("-inf"), tl.float32)
        s_tt = tl.zeros([BLOCK_B], dtype=tl.float32)
        qz = tl.zeros([BLOCK_B], dtype=tl.float32)  # sum exp(t/T - m_tt) z/T, rescaled with m_tt
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + tl.arange(0, BLOCK_C)
            io = live[:, None] & (cols[None, :] < C)
            # -inf past C (no share of the sums); 0 in rows past B, so that no inf - inf is computed
            z = tl.load(z_ptr + rows[:, None] * C + cols[None, :], mask=io, other=float("-inf")).to(tl.float32)
            z = tl.where(live[:, None], z, 0.0)
            m, s = _online_lse(m, s, z)
            is_y = cols[None, :] == y[:, None]
            zy += tl.sum(tl.where(is_y & io, z, 0.0), axis=1)
            hit += tl.sum((is_y & io).to(tl.int32), axis=1)
            if HAS_TEACHER:
                zt = z * inv_t
                m_zt, s_zt = _online_lse(m_zt, s_zt, zt)
                tt = tl.load(t_ptr + rows[:, None] * C + cols[None, :], mask=io,
                             other=float("-inf")).to(tl.float32) * inv_t
                tt = tl.where(live[:, None], tt, 0.0)
                m_new = tl.maximum(m_tt, tl.max(tt, axis=1))
                e = tl.exp(tt - m_new[:, None])
                scale = tl.exp(m_tt - m_new)
                s_tt = s_tt * scale + tl.sum(e, axis=1)
                qz = qz * scale + tl.sum(e * tl.where(io, zt, 0.0), axis=1)
                m_tt = m_new
        lse = m + tl.log(s)
        ce = tl.where(hit == 1, lse - zy, float("nan"))
        row = ce
        tl.store(stats_ptr + rows * 3, lse, mask=live)
        if HAS_TEACHER:
            lse_zt = m_zt + tl.log(s_zt)
            row += w_t2 * (lse_zt - qz / s_tt)
            tl.store(stats_ptr + rows * 3 + 1, lse_zt, mask=live)
            tl.store(stats_ptr + rows * 3 + 2, m_tt + tl.log(s_tt), mask=live)
        tl.store(ce_ptr + rows, ce, mask=live)
        total += tl.where(live, row, 0.0)
    tl.store(loss_ptr, tl.sum(total, axis=0) / B)


@triton.jit
def _backward_kernel(g_ptr, z_ptr, y_ptr, t_ptr, stats_ptr, dz_ptr, B, C, inv_t, w_t,
                     HAS_TEACHER: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    live = rows < B
    scale = tl.load(g_ptr).to(tl.float32) / B
    y = tl.load(y_ptr + rows, mask=live, other=0)
    lse = tl.load(stats_ptr + rows * 3, mask=live, other=0.0)
    if HAS_TEACHER:
        lse_zt = tl.load(stats_ptr + rows * 3 + 1, mask=live, other=0.0)
        lse_tt = tl.load(stats_ptr + rows * 3 + 2, mask=live, other=0.0)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        io = live[:, None] & (cols[None, :] < C)
        offs = rows[:, None] * C + cols[None, :]
        z = tl.load(z_ptr + offs, mask=io, other=0.0).to(tl.float32)
        d = tl.exp(z - lse[:, None]) - tl.where(cols[None, :] == y[:, None], 1.0, 0.0)
        if HAS_TEACHER:
            t = tl.load(t_ptr + offs, mask=io, other=0.0).to(tl.float32)
            d += w_t * (tl.exp(z * inv_t - lse_zt[:, None]) - tl.exp(t * inv_t - lse_tt[:, None]))
        tl.store(dz_ptr + offs, (d * scale).to(dz_ptr.dtype.element_ty), mask=io)


# launched through Launchers: less host time per launch than kernel[grid](...) (kernels/launch.py)
_forward, _backward = Launcher(_forward_kernel), Launcher(_backward_kernel)


def clear_loss_forward(logits, labels, teacher, weight, temperature):
    """(loss [] fp32, per-sample CE [B] fp32, stats [B, 3] fp32 for the backward). logits [B, C]
    and teacher [B, C] (or None: CE only) contiguous floats, labels [B] contiguous integers."""
    B, C = logits.shape
    dev = logits.device
    loss = torch.empty((), device=dev, dtype=torch.float32)
    ce = torch.empty(B, device=dev, dtype=torch.float32)
    stats = torch.empty((B, 3), device=dev, dtype=torch.float32)
    block_b, block_c = _blocks(B, C)
    has_t = teacher is not None
    _forward((1,), logits, labels, teacher if has_t else logits, loss, ce, stats, B, C,
             1.0 / temperature, weight * temperature ** 2, HAS_TEACHER=has_t,
             BLOCK_B=block_b, BLOCK_C=block_c, num_warps=NUM_WARPS)
    return loss, ce, stats


def clear_loss_backward(grad_loss, logits, labels, teacher, stats, weight, temperature):
    """d loss / d logits [B, C] in the logits' dtype; grad_loss: the loss's incoming gradient, a
    one-element tensor read on the device (no host sync)."""
    B, C = logits.shape
    dz = torch.empty_like(logits, memory_format=torch.contiguous_format)
    block_b, block_c = _blocks(B, C)
    has_t = teacher is not None
    _backward((cdiv(B, block_b),), grad_loss, logits, labels, teacher if has_t else logits, stats, dz, B, C,
              1.0 / temperature, weight * temperature, HAS_TEACHER=has_t, BLOCK_B=block_b,
              BLOCK_C=block_c, num_warps=NUM_WARPS)
    return dz
