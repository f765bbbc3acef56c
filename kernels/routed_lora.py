"""Triton kernels for the routed LoRA linear, beside the plain PyTorch references they must match.

    y = x W^T + b + s * m[row] * (x A^T) B^T        x [M, in], W [out, in], A [r, in], B [out, r]

Design (and its limit). The base product x W^T (and dY W in the backward) stays with cuBLAS:
it is 96-98 % of the FLOPs and cuBLAS is hard to beat on it. The LoRA term is a few percent of the
FLOPs but, done eagerly, several extra launches and passes over [M, out] activations, so one kernel
does the adapter's whole forward and one its whole backward, over tiles of BLOCK_M rows, and a tile
whose rows all have m == 0 returns before it loads A, B or activations and before it writes
anything:

  forward   U = m * x A^T  [M, r], kept for the backward;  Y += s U B^T in place  (Y = x W^T + b)
  backward  G = m * dY B;  dX += s G A in place (dX = dY W);  partial sums of dA = s G^T x and
            dB = s dY^T U per program, in fp32, summed by torch: deterministic, no atomics.

At small M the launches, not the arithmetic, bound the layer: on the host side a routed layer costs
the base GEMM plus one Triton launch forward, the base GEMM, one Triton launch and one sum backward
(an eager peft LoRA layer launches about five kernels forward and eight backward). Fusing the forward
into the base GEMM's epilogue (LoRAFusion) would save a pass over Y but give up cuBLAS; not done.

The mask stays on the device: each program reads the mask values of its own rows (mask[row //
rows_per_mask], so a per-sample mask needs no expansion) and decides by itself; nothing syncs with
the host. With sequence length >= BLOCK_M a tile holds at most two samples, so at routed fraction f
roughly a fraction f of the tiles does work. Rows with m == 0 inside a working tile are never loaded
or stored, so bypassed rows keep the cuBLAS result bit for bit. Contract between the kernels: U rows
with m == 0 may hold anything (whole bypassed tiles are never written); the backward loads only rows
with m != 0.

Precision: products accumulate in fp32 (fp64 for fp64 inputs). The products with A and B cast
both operands explicitly to one dot dtype: the activation dtype when the adapter has the same half
dtype (tensor cores), else fp32 (IEEE, or TF32 where torch's fp32 matmul precision allows it) unless
half_dots is set, as the layer does under autocast: then the half dtype, which is what autocast does
to peft's LoRA. The adapter-gradient sums multiply in that half dtype when both products do, else
in fp32. Triton's interpreter gets bf16 dots wrong, so under TRITON_INTERPRET=1 bf16 dots run in
fp32.

Tiles, warps and pipelining depth are a TileConfig (CONFIG), chosen from
benchmarks/lora_kernel_sweep.py's timings on an H200, not autotuned (autotune would compile every
variant at first use). The kernels are latency-bound at training sizes (a few hundred row tiles,
each walking its chunks one after another): 32-row tiles, 128-wide chunks, 8 warps and no
pipelining were the fastest of the 8 shapes timed, with and without half dots, for bf16 and fp32.
Plain pointer arithmetic only (no block pointers): the kernels compile for sm_90 with
triton 3.6 and 3.9 (tests/compile_kernels.py compiles them ahead of time, without a GPU).
"""
import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .launch import Launcher
from .utils import acc_dtype, cdiv, interpreting, next_power_of_2


class TileConfig(NamedTuple):
    """Launch parameters of both kernels; benchmarks/lora_kernel_sweep.py times alternatives."""
    block_m: int = 32  # rows per tile: the routing granularity
    block_k: int = 128  # chunk of the input features (columns of x, A, dX)
    block_n: int = 128  # chunk of the output features (columns of Y, dY, rows of B)
    num_warps: int = 8
    num_stages: int = 1  # software-pipelining depth of the chunk loops (Triton's default is 3)
    # Products with fp32 adapters under half activations in the activation dtype (tensor cores)
    # instead of fp32 IEEE; the launchers set it under autocast (half_dots=True).
    half_dots: bool = False


CONFIG = TileConfig()
BACKWARD_PROGRAMS = 256  # at most this many backward programs (partial sums), each a run of tiles
# `scaling` reaches the compiled kernels as fp32 (Triton passes Python floats so; the interpreter keeps
# float64): in float64 layers it is rounded to fp32 (relative 6e-8), exact for powers of two such as
# the usual alpha / r. kernels/gmm.py, which needs float64 constants, passes them by pointer.


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
              torch.float32: tl.float32, torch.float64: tl.float64}


def _dot_dtype(a, b, half_dots=False):
    """One dtype for both dot operands: the shared half dtype (tensor cores), else fp32/fp64; with
    half_dots, the activations' half dtype a for fp32 adapters b too."""
    if torch.float64 in (a, b):
        return tl.float64
    if (a == b or half_dots) and a in (torch.float16, torch.bfloat16):
        if a == torch.bfloat16 and interpreting():
            return tl.float32  # the interpreter's bf16 tl.dot returns garbage
        return _TL_DTYPES[a]
    return tl.float32


def _grad_dot_dtype(dot_a, dot_b, acc):
    """Dot dtype of the adapter-gradient sums: the half dtype when both adapter products run in it
    (as autograd does for a half or autocast LoRA), else the accumulation dtype acc (torch)."""
    return dot_a if dot_a == dot_b and dot_a in (tl.float16, tl.bfloat16) else _TL_DTYPES[acc]


def _precision(dot_dtype, fp32_precision=None):
    """fp32 dots follow torch's setting for fp32 matmuls (fp32_precision, default: the current
    torch.get_float32_matmul_precision()), as cuBLAS (and so peft's LoRA) does: IEEE by default, TF32
    after torch.set_float32_matmul_precision("high" or "medium"). Never silently TF32."""
    if dot_dtype == tl.float32:
        fp32_precision = fp32_precision or torch.get_float32_matmul_precision()
        return "ieee" if fp32_precision == "highest" else "tf32"
    return "ieee" if dot_dtype == tl.float64 else None


def _block_r(r):
    return max(16, next_power_of_2(r))  # tl.dot needs every dimension >= 16


@triton.jit
def _tile_rows(mask_ptr, start, M, rows_per_mask, BLOCK: tl.constexpr):
    """Row indices of one tile, their mask values, and which rows are routed (m != 0)."""
    rows = start + tl.arange(0, BLOCK)
    in_range = rows < M
    m = tl.load(mask_ptr + rows // rows_per_mask, mask=in_range, other=0.0)
    return rows.to(tl.int64), m, in_range & (m != 0)


@triton.jit
def _rows_times_wt(p_ptr, w_ptr, rows, routed, K, R,
                   BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """P[rows] W^T for one tile, [BLOCK_M, BLOCK_R] in ACC: P [M, K], W [R, K]; rows that are not
    routed are never loaded (they read as 0)."""
    rr = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        p = tl.load(p_ptr + rows[:, None] * K + ks[None, :],
                    mask=routed[:, None] & (ks[None, :] < K), other=0.0)
        w = tl.load(w_ptr + rr[None, :] * K + ks[:, None],
                    mask=(rr[None, :] < R) & (ks[:, None] < K), other=0.0)
        acc = tl.dot(p.to(DOT), w.to(DOT), acc, input_precision=PRECISION, out_dtype=ACC)
    return acc


@triton.jit
def _add_rows_times_wt_(y_ptr, u, w_ptr, rows, routed, N, R, scaling,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr):
    """In place Y[rows] += scaling * u W^T, routed rows only (others neither read nor written):
    u [BLOCK_M, BLOCK_R] in registers, W [N, R]."""
    rr = tl.arange(0, BLOCK_R)
    u = u.to(DOT)
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        w = tl.load(w_ptr + cols[None, :] * R + rr[:, None],
                    mask=(rr[:, None] < R) & (cols[None, :] < N), other=0.0)
        delta = tl.dot(u, w.to(DOT), input_precision=PRECISION, out_dtype=ACC)
        io = routed[:, None] & (cols[None, :] < N)
        _add_scaled_(y_ptr + rows[:, None] * N + cols[None, :], io, io, delta, scaling, ACC)


@triton.jit
def _add_scaled_(ptrs, load_mask, store_mask, delta, scaling, ACC: tl.constexpr):
    """In place *ptrs += scaling * delta in ACC (elements outside load_mask read as 0)."""
    p = tl.load(ptrs, mask=load_mask, other=0.0)
    tl.store(ptrs, (p.to(ACC) + scaling * delta).to(p.dtype), mask=store_mask)


# Sizes that change from batch to batch are not specialised on (Triton would otherwise compile a
# variant per divisibility class of M and of the sequence length, seconds each on first use).
@triton.jit(do_not_specialize=["M", "rows_per_mask"])
def _forward_kernel(x_ptr, a_ptr, b_ptr, y_ptr, u_ptr, mask_ptr, M, K, N, R, rows_per_mask, scaling,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_R: tl.constexpr, DOT_A: tl.constexpr, DOT_B: tl.constexpr,
                    ACC: tl.constexpr, PRECISION_A: tl.constexpr, PRECISION_B: tl.constexpr):
    """One row tile: U = m x A^T (stored for the backward), then Y += s U B^T. Every tensor is
    row-major contiguous (x [M, K], a [R, K], b [N, R], y [M, N], u [M, R])."""
    rows, m, routed = _tile_rows(mask_ptr, tl.program_id(0) * BLOCK_M, M, rows_per_mask, BLOCK_M)
    if tl.max(routed.to(tl.int32), axis=0) > 0:  # an all-bypassed tile does nothing at all
        u = _rows_times_wt(x_ptr, a_ptr, rows, routed, K, R,
                           BLOCK_M, BLOCK_K, BLOCK_R, DOT_A, ACC, PRECISION_A)
        u = u * m[:, None].to(ACC)
        rr = tl.arange(0, BLOCK_R)
        tl.store(u_ptr + rows[:, None] * R + rr[None, :], u,
                 mask=(rows[:, None] < M) & (rr[None, :] < R))
        _add_rows_times_wt_(y_ptr, u, b_ptr, rows, routed, N, R, scaling,
                            BLOCK_N, BLOCK_R, DOT_B, ACC, PRECISION_B)


@triton.jit(do_not_specialize=["M", "rows_per_mask", "tiles_per_program"])
def _backward_kernel(dy_ptr, x_ptr, u_ptr, a_ptr, b_ptr, dx_ptr, part_ptr, mask_ptr,
                     M, K, N, R, rows_per_mask, tiles_per_program, scaling,
                     HAS_DX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_A: tl.constexpr,
                     DOT_B: tl.constexpr, DOT_G: tl.constexpr, ACC: tl.constexpr,
                     PRECISION_A: tl.constexpr, PRECISION_B: tl.constexpr, PRECISION_G: tl.constexpr):
    """A run of row tiles, each in one pass over dY and one over X: while G = m dY B accumulates
    over the dY chunks, the same chunks give dB = s dY^T U; then each X chunk gives dX += s G A
    (HAS_DX) and dA = s G^T X. The sums over rows go to this program's slot of part (dA [R, K]
    row-major, then dB [N, R] row-major), which torch sums over programs (deterministic, no
    atomics). The first routed tile of a run stores its terms, later ones add to them; a run
    without one stores zeros. Every tensor is row-major contiguous (dy [M, N], x and dx [M, K],
    u [M, R], a [R, K], b [N, R], part [programs, R * K + N * R])."""
    rr = tl.arange(0, BLOCK_R)
    part_a = part_ptr + tl.program_id(0).to(tl.int64) * (R * K + N * R)
    part_b = part_a + R * K
    started = tl.full([], 0, tl.int1)  # whether this program's slot holds a sum yet
    for t in range(0, tiles_per_program):
        start = (tl.program_id(0) * tiles_per_program + t) * BLOCK_M
        rows, m, routed = _tile_rows(mask_ptr, start, M, rows_per_mask, BLOCK_M)
        if tl.max(routed.to(tl.int32), axis=0) > 0:
            u = tl.load(u_ptr + rows[:, None] * R + rr[None, :],
                        mask=routed[:, None] & (rr[None, :] < R), other=0.0)
            g = tl.zeros((BLOCK_M, BLOCK_R), dtype=ACC)
            for n0 in range(0, N, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                dy = tl.load(dy_ptr + rows[:, None] * N + cols[None, :],
                             mask=routed[:, None] & (cols[None, :] < N), other=0.0)
                b = tl.load(b_ptr + cols[:, None] * R + rr[None, :],
                            mask=(cols[:, None] < N) & (rr[None, :] < R), other=0.0)
                g = tl.dot(dy.to(DOT_B), b.to(DOT_B), g, input_precision=PRECISION_B, out_dtype=ACC)
                d = tl.dot(tl.trans(dy.to(DOT_G)), u.to(DOT_G), input_precision=PRECISION_G, out_dtype=ACC)
                io = (cols[:, None] < N) & (rr[None, :] < R)
                _add_scaled_(part_b + cols[:, None] * R + rr[None, :], io & started, io, d, scaling, ACC)
            g = g * m[:, None].to(ACC)
            gt = tl.trans(g.to(DOT_G))
            gd = g.to(DOT_A)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :],
                            mask=routed[:, None] & (ks[None, :] < K), other=0.0)
                if HAS_DX:
                    a = tl.load(a_ptr + rr[:, None] * K + ks[None, :],
                                mask=(rr[:, None] < R) & (ks[None, :] < K), other=0.0)
                    delta = tl.dot(gd, a.to(DOT_A), input_precision=PRECISION_A, out_dtype=ACC)
                    io = routed[:, None] & (ks[None, :] < K)
                    _add_scaled_(dx_ptr + rows[:, None] * K + ks[None, :], io, io, delta,
                                 scaling, ACC)
                d = tl.dot(gt, x.to(DOT_G), input_precision=PRECISION_G, out_dtype=ACC)
                io = (rr[:, None] < R) & (ks[None, :] < K)
                _add_scaled_(part_a + rr[:, None] * K + ks[None, :], io & started, io, d, scaling, ACC)
            started = tl.full([], 1, tl.int1)
            tl.debug_barrier()  # the next tile's loads may run on other threads than these stores
    if not started:  # no routed row in the whole run: the slot still enters the sum
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            tl.store(part_a + rr[:, None] * K + ks[None, :], tl.zeros((BLOCK_R, BLOCK_K), dtype=ACC),
                     mask=(rr[:, None] < R) & (ks[None, :] < K))
        for n0 in range(0, N, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            tl.store(part_b + cols[:, None] * R + rr[None, :], tl.zeros((BLOCK_N, BLOCK_R), dtype=ACC),
                     mask=(cols[:, None] < N) & (rr[None, :] < R))


# launched through Launchers: less host time per launch than kernel[grid](...) (kernels/launch.py)
_forward, _backward = Launcher(_forward_kernel), Launcher(_backward_kernel)


def _config(config, half_dots):
    c = config or CONFIG
    return _with_half_dots(c) if half_dots and not c.half_dots else c


@functools.lru_cache(maxsize=None)
def _with_half_dots(config):  # once per configuration, not a new tuple per launch
    return config._replace(half_dots=True)


def _launch_meta(c, r, x_dtype, a_dtype, y_dtype, b_dtype, fp32_precision, has_dx):
    """A kernel's compile-time arguments for these dtypes. The products with A multiply x (forward)
    or dY (backward) of x_dtype, those with B y (forward) or dY of y_dtype. fp32_precision:
    torch.get_float32_matmul_precision(). has_dx: None for the forward, else the backward's HAS_DX."""
    acc = acc_dtype(x_dtype)
    dot_a, dot_b = _dot_dtype(x_dtype, a_dtype, c.half_dots), _dot_dtype(y_dtype, b_dtype, c.half_dots)
    meta = dict(BLOCK_M=c.block_m, BLOCK_K=c.block_k, BLOCK_N=c.block_n, BLOCK_R=_block_r(r),
                DOT_A=dot_a, DOT_B=dot_b, ACC=_TL_DTYPES[acc], PRECISION_A=_precision(dot_a, fp32_precision),
                PRECISION_B=_precision(dot_b, fp32_precision), num_warps=c.num_warps, num_stages=c.num_stages)
    if has_dx is not None:
        dot_g = _grad_dot_dtype(dot_a, dot_b, acc)
        meta.update(HAS_DX=has_dx, DOT_G=dot_g, PRECISION_G=_precision(dot_g, fp32_precision))
    return meta


@functools.lru_cache(maxsize=None)
def _prepared(c, r, x_dtype, a_dtype, y_dtype, b_dtype, fp32_precision, has_dx):
    """_launch_meta's arguments prepared for the forward's (has_dx None) or the backward's Launcher,
    once per combination, not at every launch (a routed layer's launches are host-bound at training
    sizes). The caller reads fp32_precision at every launch, so that a change takes effect."""
    launcher = _forward if has_dx is None else _backward
    return launcher.prepare(**_launch_meta(c, r, x_dtype, a_dtype, y_dtype, b_dtype, fp32_precision, has_dx))


def _check_in_place(t, name):
    if not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous (row-major), got strides "
                         f"{t.stride()}")


def lora_forward_(y, x, a, b, mask, rows_per_mask, scaling, config=None, half_dots=False):
    """In place: y[row] += scaling * m (x a^T) b^T for rows with m != 0; other rows untouched.
    y [M, N], x [M, K], a [R, K], b [N, R], mask [G] float32 (row i uses mask[i // rows_per_mask]).
    Returns U = m x a^T [M, R] in acc_dtype(x.dtype), for the backward; rows with m == 0 undefined.
    config: a TileConfig (default CONFIG); half_dots=True sets its half_dots (autocast).
    The kernels take row-major contiguous tensors, no strides (each launch argument costs host
    time): the inputs are made so here, y (written in place) must be."""
    _check_in_place(y, "y")
    x, a, b = x.contiguous(), a.contiguous(), b.contiguous()
    c = _config(config, half_dots)
    M, K = x.shape
    N, R = b.shape
    u = torch.empty((M, R), device=x.device, dtype=acc_dtype(x.dtype))
    plan = _prepared(c, R, x.dtype, a.dtype, y.dtype, b.dtype, torch.get_float32_matmul_precision(), None)
    _forward.launch((cdiv(M, c.block_m),), (x, a, b, y, u, mask, M, K, N, R, rows_per_mask, float(scaling)), plan)
    return u


def lora_backward(dy, x, u, a, b, mask, rows_per_mask, scaling, dx=None, config=None,
                  half_dots=False):
    """The adapter's part of the backward, routed rows only. dy [M, N], x [M, K] (the LoRA input),
    u [M, R] from lora_forward_, a [R, K], b [N, R]. With G = m dy b: in place dx[row] += scaling *
    G a when dx [M, K] is given; returns (dA, dB) = (scaling * G^T x [R, K], scaling * dy^T u [N, R])
    in acc_dtype(dy.dtype). config, half_dots, contiguity: as for lora_forward_ (dx as y)."""
    if dx is not None:
        _check_in_place(dx, "dx")
    dy, x, u, a, b = dy.contiguous(), x.contiguous(), u.contiguous(), a.contiguous(), b.contiguous()
    c = _config(config, half_dots)
    M, N = dy.shape
    K, R = x.shape[1], u.shape[1]
    tiles = cdiv(M, c.block_m)
    tiles_per_program = cdiv(tiles, min(tiles, BACKWARD_PROGRAMS))
    programs = cdiv(tiles, tiles_per_program)
    part = torch.empty((programs, R * K + N * R), device=dy.device, dtype=acc_dtype(dy.dtype))
    has_dx = dx is not None
    plan = _prepared(c, R, dy.dtype, a.dtype, dy.dtype, b.dtype, torch.get_float32_matmul_precision(), has_dx)
    if not has_dx:
        dx = dy  # never read nor written (HAS_DX is off); any pointer will do
    _backward.launch((programs,), (dy, x, u, a, b, dx, part, mask, M, K, N, R, rows_per_mask, tiles_per_program,
                                   float(scaling)), plan)
    total = part[0] if programs == 1 else part.sum(0)
    # dA and dB are its two halves (as_strided: one call each, half the host time of slice + view)
    return total.as_strided((R, K), (K, 1)), total.as_strided((N, R), (R, 1), total.storage_offset() + R * K)


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
