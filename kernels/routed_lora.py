"""Triton kernels for the routed LoRA linear, beside the plain PyTorch references they must match.

    y = x W^T + b + s * m[row] * (x A^T) B^T        x [M, in], W [out, in], A [r, in], B [out, r]

Design (and its limit). The base product x W^T (and dY W in the backward) stays with cuBLAS:
it is 96-98 % of the FLOPs and cuBLAS is hard to beat on it. The LoRA term is a few percent of the
FLOPs but, done eagerly, several extra passes over [M, out] activations, so the kernels below do
only the LoRA part, over tiles of BLOCK_M rows, and a tile whose rows all have m == 0 returns
before it loads A, B or activations and before it writes anything:

  shrink   U = m * X Wt^T        [M, r]   (forward: X = x, Wt = A;  backward: X = dY, Wt = B^T)
  expand   Y += s * U Wo^T       in place  (forward: Y = x W^T + b;  backward: Y = dY W, Wo = A^T)
  grad     P^T Q over rows       [r, K]   (dA = s G^T x, dB = s (U^T dY)^T), split-M partial sums
                                          in fp32 summed by torch: deterministic, no atomics.

The mask stays on the device: each program reads the mask values of its own rows (mask[row //
rows_per_mask], so a per-sample mask needs no expansion) and decides by itself; nothing syncs with
the host.
With sequence length >= BLOCK_M a tile holds at most two samples, so at routed fraction f roughly a
fraction f of the tiles does work. Rows with m == 0 inside a working tile are never loaded or
stored, so bypassed rows keep the cuBLAS result bit for bit. Contract between the kernels: U and G
rows with m == 0 may hold anything (whole bypassed tiles are never written); every consumer loads
only rows with m != 0.

Limit: the base GEMM and the LoRA kernels are separate launches (two extra in the forward, four
in the backward, plus one partial-sum reduction per adapter gradient when the row range is split),
so at small M the launch latency, not the arithmetic, bounds how close routed fraction 0 gets to
F.linear. Fusing expand into the base GEMM's epilogue (LoRAFusion) would remove one pass over Y
but gives up cuBLAS; not done here. Not yet timed on a GPU: the GPU targets are unverified.

Precision: products accumulate in fp32 (fp64 for fp64 inputs). Shrink and expand cast both operands
explicitly to one dot dtype: the activation dtype when the adapter has the same half dtype (tensor
cores), else fp32 with IEEE precision (fp32 adapters with half activations, as in mixed-precision
training). The adapter-gradient reduction always multiplies in fp32: it is a few FLOPs per row.
Triton's interpreter gets bf16 dots wrong, so under TRITON_INTERPRET=1 bf16 dots run in fp32.
Plain pointer arithmetic only (no block pointers, no autotune): the kernels compile for sm_90 with
triton 3.6 and 3.9 (tests/test_lora_kernels.py compiles them ahead of time, without a GPU).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .utils import acc_dtype, interpreting

BLOCK_M = 64  # rows per tile: the routing granularity
BLOCK_K = 64  # reduction chunk of shrink, column chunk of grad
BLOCK_N = 64  # output columns per expand program
GRAD_PROGRAMS = 256  # the adapter-gradient reduction aims at this many programs (fills a GPU)
# `scaling` reaches the compiled kernels as fp32 (Triton passes Python floats so; the interpreter keeps
# float64): in float64 layers it is rounded to fp32 (relative 6e-8), exact for powers of two such as
# the usual alpha / r. kernels/gmm.py, which needs float64 constants, passes them by pointer.


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}


def _dot_dtype(a, b):
    """One dtype for both dot operands: the shared half dtype (tensor cores), else fp32/fp64."""
    if torch.float64 in (a, b):
        return tl.float64
    if a == b and a in (torch.float16, torch.bfloat16):
        if a == torch.bfloat16 and interpreting():
            return tl.float32  # the interpreter's bf16 tl.dot returns garbage
        return _TL_DTYPES[a]
    return tl.float32


def _precision(dot_dtype):
    # fp32 dots must not silently become TF32: torch's fp32 matmuls are IEEE by default.
    return "ieee" if dot_dtype in (tl.float32, tl.float64) else None


def _block_r(r):
    return max(16, triton.next_power_of_2(r))  # tl.dot needs every dimension >= 16


@triton.jit
def _tile_rows(mask_ptr, start, M, rows_per_mask, BLOCK: tl.constexpr):
    """Row indices of one tile, their mask values, and which rows are routed (m != 0)."""
    rows = start + tl.arange(0, BLOCK)
    in_range = rows < M
    m = tl.load(mask_ptr + rows // rows_per_mask, mask=in_range, other=0.0)
    return rows.to(tl.int64), m, in_range & (m != 0)


@triton.jit
def _shrink_kernel(x_ptr, w_ptr, u_ptr, mask_ptr, M, K, R, rows_per_mask,
                   s_xm, s_xk, s_wr, s_wk, s_um, s_ur,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    rows, m, routed = _tile_rows(mask_ptr, tl.program_id(0) * BLOCK_M, M, rows_per_mask, BLOCK_M)
    if tl.max(routed.to(tl.int32), axis=0) > 0:  # an all-bypassed tile does nothing at all
        rr = tl.arange(0, BLOCK_R)
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + rows[:, None] * s_xm + ks[None, :] * s_xk,
                        mask=routed[:, None] & (ks[None, :] < K), other=0.0)
            w = tl.load(w_ptr + rr[None, :] * s_wr + ks[:, None] * s_wk,
                        mask=(rr[None, :] < R) & (ks[:, None] < K), other=0.0)
            acc = tl.dot(x.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
        acc = acc * m[:, None].to(ACC)
        tl.store(u_ptr + rows[:, None] * s_um + rr[None, :] * s_ur, acc,
                 mask=(rows[:, None] < M) & (rr[None, :] < R))


@triton.jit
def _expand_kernel(y_ptr, u_ptr, w_ptr, mask_ptr, M, N, R, rows_per_mask, scaling,
                   s_ym, s_yn, s_um, s_ur, s_wn, s_wr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    rows, m, routed = _tile_rows(mask_ptr, tl.program_id(0) * BLOCK_M, M, rows_per_mask, BLOCK_M)
    if tl.max(routed.to(tl.int32), axis=0) > 0:
        rr = tl.arange(0, BLOCK_R)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        u = tl.load(u_ptr + rows[:, None] * s_um + rr[None, :] * s_ur,
                    mask=routed[:, None] & (rr[None, :] < R), other=0.0)
        w = tl.load(w_ptr + cols[None, :] * s_wn + rr[:, None] * s_wr,
                    mask=(rr[:, None] < R) & (cols[None, :] < N), other=0.0)
        delta = tl.dot(u.to(DOT), w.to(DOT), input_precision=PRECISION, out_dtype=ACC)
        io = routed[:, None] & (cols[None, :] < N)  # bypassed rows: neither read nor written
        y_ptrs = y_ptr + rows[:, None] * s_ym + cols[None, :] * s_yn
        y = tl.load(y_ptrs, mask=io, other=0.0)
        tl.store(y_ptrs, (y.to(ACC) + scaling * delta).to(y.dtype), mask=io)


@triton.jit
def _grad_kernel(p_ptr, q_ptr, part_ptr, mask_ptr, M, K, R, rows_per_mask, tiles_per_split, scaling,
                 s_pm, s_pr, s_qm, s_qk, s_ts, s_tr, s_tk,
                 BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    split = tl.program_id(1)
    rr = tl.arange(0, BLOCK_R)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC)
    for t in range(0, tiles_per_split):
        start = (split * tiles_per_split + t) * BLOCK_M
        rows, m, routed = _tile_rows(mask_ptr, start, M, rows_per_mask, BLOCK_M)
        if tl.max(routed.to(tl.int32), axis=0) > 0:
            pt = tl.load(p_ptr + rows[None, :] * s_pm + rr[:, None] * s_pr,  # P^T tile [R, BLOCK_M]
                         mask=routed[None, :] & (rr[:, None] < R), other=0.0)
            q = tl.load(q_ptr + rows[:, None] * s_qm + cols[None, :] * s_qk,
                        mask=routed[:, None] & (cols[None, :] < K), other=0.0)
            acc = tl.dot(pt.to(DOT), q.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    tl.store(part_ptr + split * s_ts + rr[:, None] * s_tr + cols[None, :] * s_tk, acc * scaling,
             mask=(rr[:, None] < R) & (cols[None, :] < K))


def lora_shrink(x, w, mask, rows_per_mask):
    """U = m[row] * x w^T for routed rows. x [M, K], w [R, K], mask [G] float32 (row i uses
    mask[i // rows_per_mask]). Returns U [M, R] in acc_dtype(x.dtype); rows with m == 0 are
    undefined."""
    M, K = x.shape
    R = w.shape[0]
    u = torch.empty((M, R), device=x.device, dtype=acc_dtype(x.dtype))
    dot = _dot_dtype(x.dtype, w.dtype)
    _shrink_kernel[(triton.cdiv(M, BLOCK_M),)](
        x, w, u, mask, M, K, R, rows_per_mask,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), u.stride(0), u.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(R),
        DOT=dot, ACC=_TL_DTYPES[u.dtype], PRECISION=_precision(dot))
    return u


def lora_expand_(y, u, w, mask, rows_per_mask, scaling):
    """In place: y[row] += scaling * u[row] w^T for rows with m != 0; other rows untouched.
    y [M, N], u [M, R] (from lora_shrink), w [N, R]. Returns y."""
    M, N = y.shape
    R = u.shape[1]
    dot = _dot_dtype(y.dtype, w.dtype)
    _expand_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        y, u, w, mask, M, N, R, rows_per_mask, float(scaling),
        y.stride(0), y.stride(1), u.stride(0), u.stride(1), w.stride(0), w.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_R=_block_r(R),
        DOT=dot, ACC=_TL_DTYPES[acc_dtype(y.dtype)], PRECISION=_precision(dot))
    return y


def lora_grad(p, q, mask, rows_per_mask, scaling=1.0, transpose=False):
    """scaling * P^T Q summed over rows with m != 0: p [M, R], q [M, K] -> [R, K] in
    acc_dtype(q.dtype), or its transpose [K, R] (contiguous) when `transpose`: dB needs that
    layout, so writing it directly saves a launch."""
    M, K = q.shape
    R = p.shape[1]
    k_tiles, m_tiles = triton.cdiv(K, BLOCK_K), triton.cdiv(M, BLOCK_M)
    # Enough programs to fill a GPU, each summing a contiguous run of row tiles.
    splits = max(1, min(m_tiles, GRAD_PROGRAMS // k_tiles))
    tiles_per_split = triton.cdiv(m_tiles, splits)
    splits = triton.cdiv(m_tiles, tiles_per_split)
    acc = acc_dtype(q.dtype)
    part = torch.empty((splits, K, R) if transpose else (splits, R, K), device=q.device, dtype=acc)
    s_tr, s_tk = (part.stride(2), part.stride(1)) if transpose else (part.stride(1), part.stride(2))
    dot = _TL_DTYPES[acc]  # adapter gradients: always fp32 (fp64) operands, few FLOPs
    _grad_kernel[(k_tiles, splits)](
        p, q, part, mask, M, K, R, rows_per_mask, tiles_per_split, float(scaling),
        p.stride(0), p.stride(1), q.stride(0), q.stride(1), part.stride(0), s_tr, s_tk,
        BLOCK_M=BLOCK_M, BLOCK_K=BLOCK_K, BLOCK_R=_block_r(R),
        DOT=dot, ACC=_TL_DTYPES[acc], PRECISION=_precision(dot))
    return part[0] if splits == 1 else part.sum(0)


# ---------------------------------------------------------------- plain PyTorch references
def mask_as_rows(mask, x):
    """A [B] (per sample) or [M] (per row) mask shaped to broadcast against x [..., out]."""
    if mask.numel() == x.shape[0]:
        return mask.reshape(x.shape[0], *([1] * (x.dim() - 1)))
    return mask.reshape(*x.shape[:-1], 1)


def _lora_term(x, lora_A, lora_B, scaling):
    cd = torch.promote_types(x.dtype, lora_A.dtype)
    return (F.linear(F.linear(x.to(cd), lora_A.to(cd)), lora_B.to(cd)) * scaling).to(x.dtype)


def routed_lora_reference_dense(x, weight, bias, lora_A, lora_B, scaling, mask):
    """LoRA computed for every row, then multiplied by the mask (None: every row routed)."""
    lora = _lora_term(x, lora_A, lora_B, scaling)
    if mask is not None:
        lora = lora * mask_as_rows(mask, x).to(x.dtype)
    return F.linear(x, weight, bias) + lora


def routed_lora_reference_dual_path(x, weight, bias, lora_A, lora_B, scaling, mask):
    """The released code's form: frozen and adapted outputs both in full, blended by the mask."""
    frozen = F.linear(x, weight, bias)
    adapted = F.linear(x, weight, bias) + _lora_term(x, lora_A, lora_B, scaling)
    if mask is None:
        return adapted
    m = mask_as_rows(mask, x).to(x.dtype)
    return m * adapted + (1 - m) * frozen
