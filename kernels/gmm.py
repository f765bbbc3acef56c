"""One EM iteration of a 1-D Gaussian mixture in one pass over x, beside the torch reference.

For each sample x and component k (scikit-learn's "full" covariance in one dimension):

    log p_k(x) = -0.5 * ((x - mu_k) / sd_k)^2 - log sd_k - 0.5 log(2 pi) + log w_k
    lse(x)     = log sum_k p_k(x)            r_k(x) = p_k(x) / sum_j p_j(x)

and the M-step's sufficient statistics, taken about the means mu_k the E-step used (so the
variance needs no E[x^2] - E[x]^2 cancellation even for one far outlier):

    S0_k = sum r_k     S1_k = sum r_k (x - mu_k)     S2_k = sum r_k (x - mu_k)^2     LL = sum lse

Design. The kernel does the whole iteration t in one launch and needs no host synchronisation:
every program first reduces iteration t-1's per-program partial sums (a few hundred numbers, the
same order in every program, so all agree bit for bit) into theta_{t-1} with the M-step, program 0
records theta_{t-1}, then all run the E-step over their tiles of x and write their partial sums for
iteration t. The host keeps a history of partial sums per iteration ([T + 1, P, 4, KP] float64),
so the lower bounds of many iterations can be read at once and the fit rolled back to the first
iteration that met scikit-learn's convergence test (see clear_fast.mixture). No atomics: the
partial sums are reduced in a fixed order, so results are deterministic.

Precision: float64 throughout (the data are a few MB; the work is bound by launches, not bytes).
Plain pointer arithmetic, tl.* math only, no autotune: runs on triton 3.6 and 3.9 and through the
interpreter (TRITON_INTERPRET=1) on CPU tensors.
Limit: offsets are int32, so N * n_components must stay below 2^31.
"""
import math

import torch
import triton
import triton.language as tl

from .launch import Launcher
from .utils import cdiv, next_power_of_2

LOG_2PI = math.log(2.0 * math.pi)
EPS10 = 10.0 * torch.finfo(torch.float64).eps  # scikit-learn adds this to every sum of r
BLOCK = 1024  # samples per tile
MAX_PROGRAMS = 256  # partial sums per iteration; every program reduces all of them


# ----------------------------------------------------------------------------- torch reference


def m_step_reference(stats, shift, reg_covar):
    """theta from statistics [3, K] (S0, S1, S2 about `shift` [K]): scikit-learn's M-step.

    sklearn: nk = sum r + 10 eps, mu = sum r x / nk, var = sum r (x - mu)^2 / nk + reg_covar,
    w = nk / sum nk. Written in the shifted sums exactly (an empty component gets mu = 0 and
    var = reg_covar, as in sklearn).
    """
    s0, s1, s2 = stats[0], stats[1], stats[2]
    nk = s0 + EPS10
    e = s1 / nk - shift * (EPS10 / nk)  # mu - shift
    variances = (s2 - e * (2.0 * s1 - e * s0)) / nk + reg_covar
    return shift + e, variances, nk / nk.sum()


def em_step_reference(x, means, variances, weights):
    """E-step at (means, variances, weights) and the statistics the kernel accumulates.

    x: [N] float64; parameters: [K] float64. Returns (stats [3, K] about `means`, sum of lse,
    responsibilities [N, K], lse [N]).
    """
    prec = variances.rsqrt()
    d = x[:, None] - means
    y = d * prec
    log_prob = -0.5 * y * y + (prec.log() + weights.log() - 0.5 * LOG_2PI)
    lse = torch.logsumexp(log_prob, dim=1)
    resp = torch.exp(log_prob - lse[:, None])
    rd = resp * d
    stats = torch.stack([resp.sum(0), rd.sum(0), (rd * d).sum(0)])
    return stats, lse.sum(), resp, lse


# ----------------------------------------------------------------------------- Triton kernel


@triton.jit
def _gmm_em_kernel(
    x_ptr, n, tiles_per_program,
    stats_ptr,  # float64 [T + 1, P, 4, KP]: rows S0, S1, S2, LL (LL in column 0)
    params_ptr,  # float64 [T + 1, 3, KP]: rows means, variances, weights
    resp_ptr,  # float64 [n, K], written when STORE_RESP
    consts_ptr,  # float64 [3]: reg_covar, 10 eps, log(2 pi) (by pointer: float scalars would be fp32)
    it, n_programs,
    K: tl.constexpr, KP: tl.constexpr, PP: tl.constexpr, BLOCK: tl.constexpr,
    FROM_STATS: tl.constexpr, STORE_RESP: tl.constexpr,
):
    pid = tl.program_id(0)
    reg_covar = tl.load(consts_ptr)
    eps10 = tl.load(consts_ptr + 1)
    log_2pi = tl.load(consts_ptr + 2)
    ks = tl.arange(0, KP)
    kmask = ks < K
    slot = 4 * KP  # one program's partial sums
    if FROM_STATS:
        # theta_{it-1} = M-step of iteration it-1, whose sums were taken about theta_{it-2}'s means.
        ps = tl.arange(0, PP)
        # (not named `offs`: compiled Triton would take the tile loop's `offs` for a loop-carried
        # variable of another shape; the interpreter does not check this)
        sums = stats_ptr + (it - 1) * n_programs * slot + ps[:, None] * slot + ks[None, :]
        pmask = (ps[:, None] < n_programs) & kmask[None, :]
        s0 = tl.sum(tl.load(sums, mask=pmask, other=0.0), axis=0)
        s1 = tl.sum(tl.load(sums + KP, mask=pmask, other=0.0), axis=0)
        s2 = tl.sum(tl.load(sums + 2 * KP, mask=pmask, other=0.0), axis=0)
        shift = tl.load(params_ptr + (it - 2) * 3 * KP + ks, mask=kmask, other=0.0)
        nk = s0 + eps10
        e = s1 / nk - shift * (eps10 / nk)
        mean = shift + e
        var = tl.where(kmask, (s2 - e * (2.0 * s1 - e * s0)) / nk + reg_covar, 1.0)
        w = tl.where(kmask, nk, 0.0)
        w = w / tl.sum(w, axis=0)
        if pid == 0:
            theta_out = params_ptr + (it - 1) * 3 * KP + ks
            tl.store(theta_out, mean, mask=kmask)
            tl.store(theta_out + KP, var, mask=kmask)
            tl.store(theta_out + 2 * KP, w, mask=kmask)
    else:
        theta = params_ptr + (it - 1) * 3 * KP + ks
        mean = tl.load(theta, mask=kmask, other=0.0)
        var = tl.load(theta + KP, mask=kmask, other=1.0)
        w = tl.load(theta + 2 * KP, mask=kmask, other=0.0)

    prec = 1.0 / tl.sqrt(var)
    # -inf in padded components (w = 0), without taking log(0)
    const = tl.where(kmask, tl.log(prec) + tl.log(tl.where(kmask, w, 1.0)) - 0.5 * log_2pi,
                     float("-inf"))
    # per-tile sums folded into [KP] accumulators: few registers even in float64
    acc0 = tl.zeros([KP], dtype=tl.float64)
    acc1 = tl.zeros([KP], dtype=tl.float64)
    acc2 = tl.zeros([KP], dtype=tl.float64)
    acc_ll = tl.zeros([KP], dtype=tl.float64)
    rows = tl.arange(0, BLOCK)
    for t in range(0, tiles_per_program):
        offs = (pid + t * n_programs) * BLOCK + rows
        rmask = offs < n
        xv = tl.load(x_ptr + offs, mask=rmask, other=0.0).to(tl.float64)
        d = xv[:, None] - mean[None, :]
        y = d * prec[None, :]
        log_prob = tl.where(kmask[None, :], -0.5 * y * y + const[None, :], float("-inf"))
        mx = tl.max(log_prob, axis=1)
        ex = tl.exp(log_prob - mx[:, None])
        tot = tl.sum(ex, axis=1)
        r = tl.where(rmask[:, None], ex / tot[:, None], 0.0)
        rd = r * d
        acc0 += tl.sum(r, axis=0)
        acc1 += tl.sum(rd, axis=0)
        acc2 += tl.sum(rd * d, axis=0)
        acc_ll += tl.where(ks == 0, tl.sum(tl.where(rmask, mx + tl.log(tot), 0.0), axis=0), 0.0)
        if STORE_RESP:
            tl.store(resp_ptr + offs[:, None] * K + ks[None, :], r,
                     mask=rmask[:, None] & kmask[None, :])
    out = stats_ptr + it * n_programs * slot + pid * slot + ks
    tl.store(out, acc0)
    tl.store(out + KP, acc1)
    tl.store(out + 2 * KP, acc2)
    tl.store(out + 3 * KP, acc_ll)


_gmm_em = Launcher(_gmm_em_kernel)  # less host time per launch than kernel[grid](...) (kernels/launch.py)


class EMPlan:
    """Launch geometry and history buffers for EM on x [N] with K components, up to T iterations."""

    def __init__(self, x, n_components, max_iter):
        if x.dim() != 1 or not x.is_contiguous():
            raise ValueError("EMPlan expects a contiguous 1-D tensor")
        n = x.numel()
        if n * n_components >= 2**31:
            raise ValueError(f"N * n_components = {n * n_components} exceeds the kernel's int32 "
                             "offsets (2^31)")
        self.x, self.n, self.k = x, n, n_components
        self.kp = max(2, next_power_of_2(n_components))  # no size-1 aranges
        tiles = cdiv(n, BLOCK)
        self.programs = min(tiles, MAX_PROGRAMS)
        self.tiles_per_program = cdiv(tiles, self.programs)
        opts = dict(dtype=torch.float64, device=x.device)
        self.stats = torch.zeros(max_iter + 1, self.programs, 4, self.kp, **opts)
        self.params = torch.zeros(max_iter + 1, 3, self.kp, **opts)
        self.consts = torch.tensor([0.0, EPS10, LOG_2PI], **opts)
        self.reg_covar = 0.0

    def _consts(self, reg_covar):
        """The kernel's float64 constants, with reg_covar set (on the device, only when it changes)."""
        if float(reg_covar) != self.reg_covar:
            self.consts[0] = self.reg_covar = float(reg_covar)
        return self.consts

    def launch(self, it, reg_covar, from_stats, resp=None):
        """Iteration `it` (1-based): E-step at theta_{it-1} (computed in-kernel from iteration
        it-1's sums when from_stats, else read from params[it-1]); sums go to stats[it]."""
        _gmm_em(
            (self.programs,), self.x, self.n, self.tiles_per_program, self.stats, self.params,
            self.x if resp is None else resp,
            self._consts(reg_covar), it, self.programs,
            K=self.k, KP=self.kp, PP=max(2, next_power_of_2(self.programs)), BLOCK=BLOCK,
            FROM_STATS=from_stats, STORE_RESP=resp is not None, num_warps=4,
        )

    def set_params(self, it, means, variances, weights):
        self.params[it, :, : self.k] = torch.stack([means, variances, weights])

    def get_params(self, it):
        return self.params[it, :, : self.k].unbind(0)

    def sums(self, it):
        """stats [3, K] and the sum of lse of iteration `it`, reduced over programs by torch."""
        s = self.stats[it].sum(0)
        return s[:3, : self.k], s[3, 0]

    def lower_bounds(self, last):
        """Mean log-likelihoods of iterations 1..last as a device tensor [last]."""
        return self.stats[1 : last + 1, :, 3, 0].sum(1) / self.n


def em_step_triton(x, means, variances, weights, store_resp=False):
    """One fused E-step + sums with the Triton kernel (same outputs as em_step_reference, lse
    per sample excepted): (stats [3, K] about `means`, sum of lse, responsibilities or None)."""
    plan = EMPlan(x, means.numel(), max_iter=1)
    plan.set_params(0, means, variances, weights)
    resp = torch.empty(x.numel(), means.numel(), dtype=torch.float64, device=x.device) \
        if store_resp else None
    plan.launch(1, reg_covar=0.0, from_stats=False, resp=resp)
    stats, ll = plan.sums(1)
    return stats, ll, resp
