"""The fused Triton E-step (kernels/gmm.py) against its torch reference, and a whole fit with
backend="triton": through the interpreter on CPU tensors (tests/conftest.py sets TRITON_INTERPRET=1),
or compiled on CUDA tensors when a GPU is present and TRITON_INTERPRET=0.
Fresh random data per run (drawn on the CPU); the seed is in each test id."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from clear_fast.kernels.gmm import EMPlan, em_step_reference, em_step_triton, m_step_reference
from clear_fast.kernels.utils import interpreting
from clear_fast.mixture import GaussianMixture1D, clean_probability

SEEDS = np.random.default_rng().integers(0, 2**31 - 1, size=3).tolist()
F64 = dict(dtype=torch.float64)
# Where the kernel runs: compiled on a GPU, else the interpreter on the CPU.
DEVICE = "cuda" if torch.cuda.is_available() and not interpreting() else "cpu"


def on_device(*tensors):
    return tuple(t.to(DEVICE) for t in tensors)


def random_params(k, gen):
    means = torch.randn(k, generator=gen, **F64) * 2
    variances = torch.rand(k, generator=gen, **F64) + 0.05
    weights = torch.softmax(torch.randn(k, generator=gen, **F64), 0)
    return on_device(means, variances, weights)


@pytest.mark.parametrize("n,k", [(1000, 2), (1023, 2), (5000, 2), (1023, 3), (777, 1), (3000, 5)])
@pytest.mark.parametrize("seed", SEEDS[:2])
def test_estep_kernel_matches_reference(n, k, seed):
    gen = torch.Generator().manual_seed(seed)
    x, = on_device(torch.randn(n, generator=gen, **F64) * 3)
    theta = random_params(k, gen)
    stats, ll, resp = em_step_triton(x, *theta, store_resp=True)
    stats_ref, ll_ref, resp_ref, _ = em_step_reference(x, *theta)
    # float64 both ways, different summation order: errors are ~n * eps of the magnitudes
    assert torch.allclose(resp, resp_ref, rtol=0, atol=1e-13)
    assert torch.allclose(stats, stats_ref, rtol=1e-11, atol=1e-9)
    assert ll.item() == pytest.approx(ll_ref.item(), rel=1e-12)
    assert torch.allclose(resp.sum(1), torch.ones(n, **F64, device=DEVICE), atol=1e-14)


@pytest.mark.parametrize("seed", SEEDS)
def test_in_kernel_m_step_over_iterations(seed):
    """Ten launches chained on the device (theta derived in-kernel from the previous sums) equal
    ten reference iterations: parameters, per-iteration lower bounds and the final sums."""
    gen = torch.Generator().manual_seed(seed)
    x, = on_device(torch.cat([torch.randn(1500, generator=gen, **F64) * 0.3,
                              torch.randn(1100, generator=gen, **F64) + 2.5]))
    theta = random_params(2, gen)
    plan = EMPlan(x, 2, max_iter=10)
    plan.set_params(0, *theta)
    thetas, bounds = [theta], []
    for it in range(1, 11):
        plan.launch(it, 1e-6, from_stats=it >= 2)
        stats, ll, _, _ = em_step_reference(x, *thetas[-1])
        bounds.append(ll.item() / x.numel())
        thetas.append(m_step_reference(stats, thetas[-1][0], 1e-6))
    for it in range(1, 10):  # params[it] = theta_it, derived in-kernel by launch it + 1
        for got, want in zip(plan.get_params(it), thetas[it]):
            assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
    assert np.allclose(plan.lower_bounds(10).cpu().numpy(), bounds, rtol=1e-12, atol=1e-12)
    final = m_step_reference(plan.sums(10)[0], plan.get_params(9)[0], 1e-6)
    for got, want in zip(final, thetas[10]):
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("seed", SEEDS)
def test_triton_fit_matches_torch_and_sklearn(seed):
    """A whole fit through the kernel: convergence read every CHECK_EVERY iterations and rolled
    back, so n_iter_, lower_bound_ and the posteriors equal the sequential loop's."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1500, 4000))
    nz = int(n * rng.uniform(0.1, 0.5))
    x = rng.permutation(np.concatenate([rng.exponential(0.1, n - nz), rng.gamma(2.0, 1.0, nz)]))
    xt, = on_device(torch.from_numpy(x))
    for opts in (dict(), dict(tol=1e-6, max_iter=13), dict(max_iter=10, tol=1e-2, reg_covar=5e-4)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # ours and sklearn's ConvergenceWarning at max_iter
            tri = GaussianMixture1D(backend="triton", **opts).fit(xt)
            ref = GaussianMixture1D(backend="torch", **opts).fit(torch.from_numpy(x))
            skl = GaussianMixture(2, random_state=0, **opts).fit(x[:, None])
        assert (tri.n_iter_, tri.converged_) == (ref.n_iter_, ref.converged_)
        assert tri.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-12)
        p_tri = tri.predict_proba(xt).cpu().numpy()
        assert np.abs(p_tri - ref.predict_proba(x)).max() <= 1e-12
        assert np.abs(p_tri - skl.predict_proba(x[:, None])).max() <= 1e-3
    p, _ = clean_probability(xt, backend="triton")
    p_ref, _ = clean_probability(x)
    assert np.abs(torch.as_tensor(p).cpu().numpy() - p_ref).max() <= 1e-12


def test_plan_rejects_bad_input():
    with pytest.raises(ValueError, match="contiguous 1-D"):
        EMPlan(torch.zeros(4, 2, **F64), 2, 5)


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs a CUDA tensor"):
        GaussianMixture1D(backend="triton").fit(torch.rand(100, **F64))
    # "auto" falls back to torch on the CPU whatever the environment
    assert GaussianMixture1D(backend="auto").fit(torch.rand(100, **F64)).n_iter_ >= 1
