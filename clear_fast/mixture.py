"""Clean probabilities: a 1-D Gaussian mixture with scikit-learn's semantics, on CPU and GPU.

CleaR fits a two-component mixture to the per-sample losses each epoch and routes each sample with
the posterior of the smaller-mean component. ``GaussianMixture1D`` reproduces
``sklearn.mixture.GaussianMixture(covariance_type="full", n_init=1)`` on one feature:

- init: scikit-learn's ``KMeans(n_clusters, n_init=1, random_state)`` labels, one-hot, one M-step.
  For two components it is re-implemented here (k-means++ seeding with the same random draws and
  distance arithmetic, then Lloyd with the same stopping rules, its assignment as one comparison
  with the midpoint) so it runs on the data's device in a few vectorised passes; other component
  counts call scikit-learn's KMeans on the CPU;
- EM: reg_covar added to every variance, stop at the first iteration whose mean log-likelihood
  lower bound changed by less than tol, ConvergenceWarning when max_iter is reached first;
- a final E-step with the final parameters gives the posteriors (as sklearn's fit_predict).

Computation: float64 on the input's device. backend="torch" runs vectorised torch (a specialised
two-component E-step on the CPU); backend="triton" runs kernels/gmm.py's fused E-step, which reads
the lower bounds back only every CHECK_EVERY iterations and rolls back to the first iteration that
met the test, so the result equals the sequential loop's; "auto" picks triton for CUDA tensors.
Host syncs on a GPU: the NaN/inf check, one per Lloyd iteration (its stopping test, usually < 10),
and one per CHECK_EVERY EM iterations. Not yet timed on a GPU (no device in the session that
wrote it): benchmarks/mixture_table.py times N = 1e6 end to end there.

Degenerate input (documented answers): fewer than max(2, n_components) samples, empty input, NaN or
inf, or a wrong shape raise ValueError; data with a single distinct value warn (as sklearn's KMeans
does) and fit one real component plus an empty one at mean 0 (sklearn's result); clean_probability
then returns p_clean = 1 for every sample, since there is nothing to separate.
"""
import functools
import inspect
import math
import warnings

import numpy as np
import torch

from clear_fast.kernels.gmm import (EPS10, EMPlan, em_step_reference, em_step_triton,
                                    m_step_reference)
from clear_fast.kernels.utils import check_backend, use_triton

CHECK_EVERY = 8  # triton backend: EM iterations between reads of the lower bounds (host syncs)
_KMEANS_MAX_ITER, _KMEANS_TOL = 300, 1e-4  # sklearn KMeans defaults
_CHUNK = 16384  # CPU E-step chunk: 8 float64 work rows of it fit in L2
_LOG_2PI = math.log(2.0 * math.pi)


class ConvergenceWarning(UserWarning):
    """EM stopped at max_iter before the lower bound settled (sklearn's warning, same meaning)."""


# ----------------------------------------------------------------------------- input handling


def _as_tensor(x, name="x"):
    """x (numpy / array-like / torch, [N] or [N, 1]) -> (float64 contiguous [N], is_torch)."""
    is_torch = isinstance(x, torch.Tensor)
    if is_torch:
        if x.is_complex() or x.dtype == torch.bool:
            raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
        shape = tuple(x.shape)
    else:
        arr = np.asarray(x)
        if arr.dtype.kind not in "fiu":
            raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
        shape = arr.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise ValueError(f"{name} must be 1-D or a column [N, 1], got shape {shape}")
    if shape[0] == 0:
        raise ValueError(f"{name} is empty")
    # data, not part of a graph: per-sample losses straight from a loss function carry gradients
    t = x.detach() if is_torch else torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64))
    t = t.reshape(-1).to(torch.float64).contiguous()
    bad = ~torch.isfinite(t)
    if bad.any():  # one host sync, before any work
        idx = bad.nonzero().flatten()
        raise ValueError(f"{name} has {idx.numel()} NaN or infinite value(s), first at indices "
                         f"{idx[:5].tolist()}")
    return t, is_torch


def _output(t, is_torch):
    return t if is_torch else t.cpu().numpy()


def _check_random_state(seed):
    """sklearn.utils.check_random_state without importing scikit-learn (2 s)."""
    if seed is None:
        return np.random.mtrand._rand
    if isinstance(seed, (int, np.integer)) and not isinstance(seed, bool):
        return np.random.RandomState(seed)
    if isinstance(seed, np.random.RandomState):
        return seed
    raise TypeError(f"random_state must be None, an int or a numpy RandomState, got {seed!r}")


# ----------------------------------------------------------------------------- k-means init


def _first_center(n, u):
    """RandomState.choice(n, p=ones(n) / n) given its uniform draw u, in O(1) where exact.

    numpy returns searchsorted(cumsum(p) / cumsum(p)[-1], u, "right"). That cumsum is (i + 1) / n
    up to about 3 n^2 eps in units of 1/n, so floor(u n) is the answer unless u n is that close to
    an integer; then the cumsum is done as numpy does it.
    """
    t = u * n
    i = math.floor(t)
    if min(t - i, i + 1 - t) > 4.0 * n * n * np.finfo(np.float64).eps + 1e-12:
        return min(i, n - 1)
    cdf = np.full(n, 1.0 / n).cumsum()
    cdf /= cdf[-1]
    return int(cdf.searchsorted(u, side="right"))


def _sq_dist(xc, x_sq, c, out):
    """sklearn's euclidean_distances(c, X, squared=True) in one dimension, same operation order
    (-2 (x c) + c^2 + x^2, clipped at 0), into `out`; c: scalar or [M, 1] -> out [M, N]."""
    return torch.mul(xc, c, out=out).mul_(-2.0).add_(c * c).add_(x_sq).clamp_(min=0.0)


def _lloyd_labels(xc, centers, out):
    """sklearn's Lloyd assignment argmin_j (c_j^2 - 2 x c_j), ties to cluster 0, with its rounding:
    fl(c_j^2) - 2 fl(x c_j) (its gemm adds -2 X C^T to the squared norms), so that values on the
    midpoint (data with many ties: integers) go where sklearn sends them. Into `out` (float64 0 / 1)."""
    c0, c1 = centers[0], centers[1]
    d0 = torch.mul(xc, c0).mul_(-2.0).add_(c0 * c0)
    d1 = torch.mul(xc, c1).mul_(-2.0).add_(c1 * c1)
    return torch.lt(d1, d0, out=out)


def _kmeans2_labels(x, random_state):
    """Labels (float64 0 / 1) of KMeans(2, n_init=1, random_state).fit(x[:, None]).

    k-means++ (2 + int(log 2) = 2 local trials) on the centred data with the same draws and the
    same distance arithmetic, then Lloyd (max_iter 300, tol = 1e-4 * var(x)): stop when the
    labels repeat (strict) or the squared centre shift <= tol, then relabel with the final
    centres if not strict. In 1-D Lloyd keeps the centres' order and each cluster is a half-line,
    so labels repeat exactly when the cluster sizes do. Returns (labels, n_distinct): n_distinct
    == 1 when a cluster came out empty (a single distinct value). One host sync per Lloyd
    iteration (its stopping test).
    """
    n = x.numel()
    xc = x - x.mean()
    x_sq = xc * xc
    rs = random_state
    c0 = xc[_first_center(n, rs.random_sample())]
    closest = _sq_dist(xc, x_sq, c0, torch.empty_like(xc))
    rand = torch.as_tensor(rs.uniform(size=2), dtype=torch.float64, device=x.device)
    cand = xc[torch.searchsorted(closest.cumsum(0), rand * closest.sum()).clamp_(max=n - 1)]
    dist = _sq_dist(xc, x_sq, cand[:, None], torch.empty(2, n, dtype=xc.dtype, device=x.device))
    pots = torch.minimum(closest, dist, out=dist).sum(1)
    centers = torch.stack([c0, torch.where(pots[1] < pots[0], cand[1], cand[0])])

    tol = float(x_sq.mean()) * _KMEANS_TOL  # np.var(X) * tol (xc is centred)
    total = xc.sum()
    labels = torch.empty_like(xc)
    n1_old, strict = -1, False
    for _ in range(_KMEANS_MAX_ITER):
        _lloyd_labels(xc, centers, labels)
        n1 = labels.sum()
        s1 = xc.dot(labels)
        new = torch.stack([(total - s1) / (n - n1), s1 / n1])
        n1, shift = torch.stack([n1, ((new - centers) ** 2).sum()]).tolist()
        if n1 in (0, n):  # empty cluster: only when every value is the same
            return torch.zeros_like(xc), 1
        centers = new
        if n1 == n1_old:
            strict = True
            break
        if shift <= tol:
            break
        n1_old = n1
    if not strict:
        _lloyd_labels(xc, centers, labels)
    return labels, 2


def _kmeans_init(x, n_components, random_state, reg_covar):
    """sklearn's kmeans init: KMeans labels, one-hot responsibilities, one M-step (w = nk / N)."""
    if n_components == 2:
        labels, distinct = _kmeans2_labels(x, random_state)
    else:
        from sklearn.cluster import KMeans  # 2 s import, only for K != 2

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its duplicate-points warning is re-issued below
            km = KMeans(n_clusters=n_components, n_init=1, random_state=random_state)
            km.fit(x.cpu().numpy()[:, None])
        distinct = len(np.unique(km.labels_))
        labels = torch.as_tensor(km.labels_, device=x.device)
    if distinct < n_components:
        warnings.warn(f"Number of distinct clusters ({distinct}) found smaller than n_clusters "
                      f"({n_components}). Possibly due to duplicate points in the data.",
                      ConvergenceWarning, stacklevel=4)
    if n_components == 2:  # one-hot, [K, N]
        resp = torch.stack([1.0 - labels, labels])
    else:
        resp = torch.zeros(n_components, x.numel(), dtype=torch.float64, device=x.device)
        resp.scatter_(0, labels.long()[None], 1.0)
    nk = resp.sum(1) + EPS10
    means = (resp @ x) / nk
    variances = (x - means[:, None]).square_().mul_(resp).sum(1) / nk + reg_covar
    return means, variances, nk / x.numel()


# ----------------------------------------------------------------------------- E-steps


def _estep2(x, means, variances, weights, work=None, resp=None):
    """Two-component E-step + shifted sums on the CPU in a few in-place passes per chunk.

    With s = log p_1 - log p_0:  r_1 = sigmoid(s), r_0 = 1 - r_1 (absolute error ~1e-16) and
    lse = log p_0 + softplus(s), softplus(s) = relu(s) - log(max(r_0, r_1)): exact for any s, with a
    log of a number in [0.5, 1] instead of torch's slow float64 log1p / logaddexp. The sums of a
    chunk come from one [3, C] x [C, 5] product. Chunks of _CHUNK samples keep the 8 work rows in
    L2 (at N = 1e6 this halves the time per sample, measured). Parameters are python floats.
    work: _estep2_work(N); resp: optional [2, N] output for (r_0, r_1).
    Returns (stats [3, 2], sum of lse).
    """
    (m0, m1), (v0, v1), (w0, w1) = means, variances, weights
    p0, p1 = 1.0 / math.sqrt(v0), 1.0 / math.sqrt(v1)
    c0 = math.log(p0) + math.log(w0) - 0.5 * _LOG_2PI
    c1 = math.log(p1) + math.log(w1) - 0.5 * _LOG_2PI
    work = _estep2_work(x.numel()) if work is None else work
    g = torch.zeros(3, 5, dtype=torch.float64)  # rows (1, r0, r1) . columns (d0, d1, q0, q1, 1)
    relu_sum = log_max = 0.0
    for start in range(0, x.numel(), _CHUNK):
        xs = x[start : start + _CHUNK]
        rows = work[:, : xs.numel()]
        d0, d1, q0, q1, ones, r0, r1, tmp = rows
        torch.sub(xs, m0, out=d0)
        torch.sub(xs, m1, out=d1)
        torch.mul(d0, d0, out=q0)
        torch.mul(d1, d1, out=q1)
        s = torch.mul(q0, 0.5 * p0 * p0, out=tmp).add_(q1, alpha=-0.5 * p1 * p1).add_(c1 - c0)
        relu_sum += float(torch.clamp(s, min=0.0, out=r0).sum())
        torch.sigmoid(s, out=r1)
        torch.sub(ones, r1, out=r0)
        log_max += float(torch.maximum(r0, r1, out=tmp).log_().sum())
        g += rows[4:7] @ rows[0:5].T
        if resp is not None:
            resp[:, start : start + xs.numel()] = rows[5:7]
    g = g.tolist()
    total_ll = relu_sum - log_max + x.numel() * c0 - 0.5 * p0 * p0 * g[0][2]
    stats = torch.tensor([[g[1][4], g[2][4]], [g[1][0], g[2][1]], [g[1][2], g[2][3]]],
                         dtype=torch.float64)
    return stats, total_ll


def _estep2_work(n):
    work = torch.empty(8, min(n, _CHUNK), dtype=torch.float64)
    work[4].fill_(1.0)
    return work


def _estep(x, means, variances, weights, work=None, with_resp=False):
    """(stats [3, K] about `means`, sum of lse as a float, responsibilities [K, N] or None)."""
    if means.numel() == 2 and x.device.type == "cpu":
        resp = torch.empty(2, x.numel(), dtype=torch.float64) if with_resp else None
        stats, ll = _estep2(x, means.tolist(), variances.tolist(), weights.tolist(), work, resp)
        return stats, ll, resp
    stats, ll, resp, _ = em_step_reference(x, means, variances, weights)
    return stats, float(ll), resp.T


# ----------------------------------------------------------------------------- EM loops


def _em_torch(x, theta, tol, reg_covar, max_iter):
    """scikit-learn's EM loop; returns (theta, n_iter, lower_bound, converged)."""
    work = _estep2_work(x.numel()) if x.device.type == "cpu" and theta[0].numel() == 2 else None
    lower_bound = -math.inf
    for n_iter in range(1, max_iter + 1):
        stats, ll, _ = _estep(x, *theta, work)
        theta = m_step_reference(stats.to(x.device), theta[0], reg_covar)
        prev, lower_bound = lower_bound, ll / x.numel()
        if abs(lower_bound - prev) < tol:
            return theta, n_iter, lower_bound, True
    return theta, max_iter, lower_bound, False


def _em_triton(x, theta, tol, reg_covar, max_iter):
    """The same loop with the fused kernel: no host sync except every CHECK_EVERY iterations, when
    the lower bounds so far are read, and the fit rolls back to the first iteration c with
    |L_c - L_{c-1}| < tol: theta_c = M-step of iteration c's sums, exactly what the loop returns."""
    plan = EMPlan(x, theta[0].numel(), max_iter)
    plan.set_params(0, *theta)
    bounds, converged_at, checked = [], None, 1
    for it in range(1, max_iter + 1):
        plan.launch(it, reg_covar, from_stats=it >= 2)
        if it % CHECK_EVERY == 0 or it == max_iter:
            bounds = plan.lower_bounds(it).tolist()  # the host sync
            for c in range(checked + 1, it + 1):
                if abs(bounds[c - 1] - bounds[c - 2]) < tol:
                    converged_at = c
                    break
            checked = it
            if converged_at is not None:
                break
    c = converged_at or max_iter
    stats, _ = plan.sums(c)
    theta = m_step_reference(stats, plan.get_params(c - 1)[0], reg_covar)
    return theta, c, bounds[c - 1], converged_at is not None


def _one_thread(fn):
    """Run a public entry point with torch on 1 CPU thread (restored after). At these sizes
    OpenMP gains little, and on a busy 2-core machine its second thread, spinning after any
    parallel op (validation included), made a 1e5-sample fit 5x slower (measured: 210 ms vs
    40 ms). Covers the whole call, so no op in it starts a parallel region."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        old = torch.get_num_threads()
        if old == 1:
            return fn(*args, **kwargs)
        torch.set_num_threads(1)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(old)

    return wrapper


# ----------------------------------------------------------------------------- public API


class GaussianMixture1D:
    """scikit-learn's GaussianMixture(covariance_type="full", n_init=1) for 1-D data, fast.

    fit(x) -> self; predict_proba(x) [N, K]; predict(x) [N]; score_samples(x) [N] (log density);
    fit_predict(x), score(x), bic(x), aic(x), get_params(), set_params(**p) as sklearn's.
    x: numpy array / array-like or torch tensor, [N] or [N, 1], any real dtype; computed in float64
    on x's device. numpy in -> numpy out; torch in -> torch out (float64) on x's device. Fitted
    attributes follow the type of the data given to fit: means_ [K], variances_ [K], covariances_
    [K, 1, 1] (sklearn's shape), weights_ [K]; converged_, n_iter_, lower_bound_ (python scalars).
    Unlike sklearn, means_ is 1-D, and random_state defaults to 0 (sklearn's to None): the same fit
    every call. backend: "torch", "triton" (fused kernel; CUDA tensors, or CPU
    tensors under TRITON_INTERPRET=1) or "auto" (triton for CUDA tensors, else torch).
    """

    def __init__(self, n_components=2, tol=1e-3, reg_covar=1e-6, max_iter=100,
                 init_params="kmeans", random_state=0, backend="auto"):
        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) \
                or n_components < 1:
            raise ValueError(f"n_components must be a positive int, got {n_components!r}")
        if isinstance(max_iter, bool) or not isinstance(max_iter, (int, np.integer)) \
                or max_iter < 0:
            raise ValueError(f"max_iter must be an int >= 0, got {max_iter!r}")
        for name, value in (("tol", tol), ("reg_covar", reg_covar)):
            if not isinstance(value, (int, float, np.floating)) or not value >= 0:
                raise ValueError(f"{name} must be a number >= 0, got {value!r}")
        if init_params != "kmeans":
            raise ValueError(f"init_params must be 'kmeans' (the only one implemented), got "
                             f"{init_params!r}")
        check_backend(backend)
        _check_random_state(random_state)  # type check now, draws at fit
        self.n_components, self.tol = int(n_components), float(tol)
        self.reg_covar = float(reg_covar)
        self.max_iter, self.init_params = int(max_iter), init_params
        self.random_state, self.backend = random_state, backend

    _PARAMS = ("n_components", "tol", "reg_covar", "max_iter", "init_params", "random_state", "backend")

    def get_params(self, deep=True):
        """The constructor's arguments, as sklearn's estimators give them (sklearn.base.clone uses it)."""
        return {name: getattr(self, name) for name in self._PARAMS}

    def set_params(self, **params):
        """Change constructor arguments, checked as the constructor checks them; returns self."""
        unknown = sorted(set(params) - set(self._PARAMS))
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(unknown)} of GaussianMixture1D; valid: "
                             f"{', '.join(self._PARAMS)}")
        self.__init__(**{**self.get_params(), **params})
        return self

    def __repr__(self):
        defaults = inspect.signature(GaussianMixture1D.__init__).parameters
        changed = [f"{k}={v!r}" for k, v in self.get_params().items() if v != defaults[k].default]
        return f"GaussianMixture1D({', '.join(changed)})"

    def _backend_for(self, x):
        return _em_triton if use_triton(x, self.backend) else _em_torch

    @_one_thread
    def fit(self, x):
        t, is_torch = _as_tensor(x)
        return self._fit(t, is_torch)

    def _fit(self, t, is_torch):
        n, k = t.numel(), self.n_components
        if n < max(2, k):
            raise ValueError(f"need at least max(2, n_components) = {max(2, k)} samples, got {n}")
        em = self._backend_for(t)
        theta = _kmeans_init(t, k, _check_random_state(self.random_state), self.reg_covar)
        _check_fitted(theta, self.reg_covar)  # EM's first E-step divides by the variances
        if self.max_iter == 0:
            n_iter, lower_bound, converged = 0, -math.inf, False
        else:
            theta, n_iter, lower_bound, converged = em(t, theta, self.tol, self.reg_covar,
                                                       self.max_iter)
        if not converged and self.max_iter > 0:
            warnings.warn("Best performing initialization did not converge. Try different init "
                          "parameters, or increase max_iter, tol, or check for degenerate data.",
                          ConvergenceWarning, stacklevel=3)
        _check_fitted(theta, self.reg_covar)
        self._theta = theta
        self.means_, self.variances_, self.weights_ = (_output(p, is_torch) for p in theta)
        self.covariances_ = self.variances_.reshape(k, 1, 1)
        self.converged_, self.n_iter_, self.lower_bound_ = converged, n_iter, lower_bound
        return self

    def _params_on(self, device):
        if not hasattr(self, "_theta"):
            raise RuntimeError("this GaussianMixture1D is not fitted yet: call fit(x) first")
        return [p.to(device) for p in self._theta]

    def _resp(self, t):
        """Posteriors as [K, N] (a view of [N, K] for the triton and reference paths)."""
        theta = self._params_on(t.device)
        if self._backend_for(t) is _em_triton:
            return em_step_triton(t, *theta, store_resp=True)[2].T
        return _estep(t, *theta, with_resp=True)[2]

    @_one_thread
    def predict_proba(self, x):
        t, is_torch = _as_tensor(x)
        return _output(self._resp(t).T.contiguous(), is_torch)

    @_one_thread
    def predict(self, x):
        t, is_torch = _as_tensor(x)
        return _output(self._resp(t).argmax(0), is_torch)

    @_one_thread
    def score_samples(self, x):
        t, is_torch = _as_tensor(x)
        return _output(em_step_reference(t, *self._params_on(t.device))[3], is_torch)

    # sklearn's model-selection members, with its formulas (1 feature, full covariance).
    def fit_predict(self, x):
        """fit(x), then the component of each sample under the final parameters (sklearn's final E-step)."""
        return self.fit(x).predict(x)

    def score(self, x):
        """Mean log-likelihood per sample (a Python float)."""
        return float(self.score_samples(x).mean())

    def _n_parameters(self):
        k = self.n_components
        return 3 * k - 1  # k means, k variances, k - 1 free weights

    def _minus_2_log_likelihood(self, x):
        """(-2 * total log-likelihood as sklearn computes it, sample count), x converted once."""
        log_density = self.score_samples(x)
        return -2 * float(log_density.mean()) * len(log_density), len(log_density)

    def bic(self, x):
        deviance, n = self._minus_2_log_likelihood(x)
        return deviance + self._n_parameters() * math.log(n)

    def aic(self, x):
        return self._minus_2_log_likelihood(x)[0] + 2 * self._n_parameters()


def _check_fitted(theta, reg_covar):
    """Raise where sklearn would (a component with no spread, with reg_covar = 0), and where float64
    ran out (losses so large that their squares overflow): never NaN probabilities."""
    means, variances, weights = theta
    values = torch.cat([means, variances, weights])
    if not bool(torch.isfinite(values).all()):
        raise ValueError("the Gaussian mixture's parameters came out NaN or infinite: values this "
                         "large or this spread overflow float64 arithmetic; rescale them (e.g. "
                         "normalize=True)")
    if not bool((variances > 0).all()):
        raise ValueError(f"Fitting the mixture model failed because some components have ill-defined "
                         f"empirical covariance (variances {variances.tolist()}, reg_covar "
                         f"{reg_covar:g}): increase reg_covar, as scikit-learn advises")


@_one_thread
def class_medians(values, labels):
    """The (lower) median of values [N] within each label's group, per sample [N]: the element
    at rank (n_k - 1) // 2 of its group, as torch.median. One sort, no loop over classes."""
    labels = labels.reshape(-1).to(values.device, torch.long)
    labels = torch.unique(labels, return_inverse=True)[1]  # 0..G-1: bincount's length is G, not max + 1
    by_value = torch.argsort(values, stable=True)
    order = by_value[torch.argsort(labels[by_value], stable=True)]  # by label, then by value
    sorted_labels = labels[order]
    counts = torch.bincount(sorted_labels)
    starts = torch.cumsum(counts, 0) - counts
    return values[order][starts + (counts - 1) // 2][labels]


@_one_thread  # it calls the mixture's internals, which the public methods' wrapper does not cover
def clean_probability(losses, normalize=False, labels=None, **gmm_options):
    """CleaR's clean probability: posterior of the smaller-mean component of a 2-component
    GaussianMixture1D(**gmm_options) fitted to the per-sample losses.

    normalize=True min-max normalises the losses first (DivideMix); the default uses the raw
    losses (the released CleaR code). labels ([N] observed labels, optional; a deviation from the
    released code) subtracts each observed class's median loss first, so that one global mixture
    does not call every sample of a hard class noisy. Returns (p_clean [N] float64 in the type and
    on the device of `losses`, the fitted mixture). Losses with a single distinct value carry no
    evidence of noise: p_clean = 1 for every sample (the mixture is still fitted and warns, as sklearn).
    """
    t, is_torch = _as_tensor(losses, "losses")
    if labels is not None:
        lab, _ = _as_tensor(labels, "labels")
        if lab.numel() != t.numel():
            raise ValueError(f"labels has {lab.numel()} entries but losses has {t.numel()}")
        if bool((lab < 0).any()) or not bool((lab == lab.round()).all()):
            raise ValueError("labels must be non-negative integers (class indices)")
        t = t - class_medians(t, lab.to(t.device))
    lo, hi = t.min(), t.max()
    single_value = bool(lo == hi)
    if normalize and not single_value:
        t = (t - lo) / (hi - lo)
    gmm = GaussianMixture1D(**gmm_options)._fit(t, is_torch)
    if single_value:
        p = torch.ones_like(t)
    else:
        resp = gmm._resp(t)
        clean = torch.argmin(gmm._theta[0]).to(resp.device).view(1)  # stays on the device
        p = resp.index_select(0, clean).squeeze(0)
    return _output(p, is_torch), gmm
