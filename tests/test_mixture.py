"""GaussianMixture1D and clean_probability against scikit-learn, degenerate inputs, errors.

Data are drawn fresh on every run: each case's seed is in its test id, so a failure names it
(rerun one with e.g. `pytest tests/test_mixture.py -k 12345`).
"""
import warnings

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from clear_fast.mixture import (ConvergenceWarning, GaussianMixture1D, _first_center,
                                class_medians, clean_probability)

SEEDS = np.random.default_rng().integers(0, 2**31 - 1, size=8).tolist()


def draw(kind, rng):
    """A random 1-D data set of a random size; kinds cover CleaR's losses and harder shapes."""
    n = int(rng.choice([20, 200, 2000, 10000]) * rng.uniform(0.5, 1.5))
    if kind == "bimodal":  # two Gaussians, random separation / widths / weights
        n1 = max(1, int(n * rng.uniform(0.1, 0.9)))
        sep = rng.uniform(0.5, 8.0)
        x = np.concatenate([rng.normal(0, 1, n1), rng.normal(sep, rng.uniform(0.2, 3.0), n - n1)])
    elif kind == "unimodal":
        x = rng.normal(rng.uniform(-5, 5), rng.uniform(0.01, 10), n)
    elif kind == "losses":  # near-zero exponential (clean) + larger gamma (noisy), as CleaR sees
        n_noisy = int(n * rng.uniform(0.05, 0.6))
        x = np.concatenate([rng.exponential(rng.uniform(0.01, 0.3), n - n_noisy),
                            rng.gamma(rng.uniform(1, 4), rng.uniform(0.5, 2), n_noisy)])
    else:  # skewed, heavy right tail
        x = rng.lognormal(0, rng.uniform(0.3, 1.5), n)
    return rng.permutation(x)


def sklearn_fit(x, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # both may warn (max_iter): compared below
        return GaussianMixture(2, covariance_type="full", random_state=0, **kw).fit(x[:, None])


def assert_matches(ours, ref, x, atol):
    p_ours, p_ref = ours.predict_proba(x), ref.predict_proba(x[:, None])
    assert np.abs(p_ours - p_ref).max() <= atol
    scale = x.std() + 1e-12
    assert np.allclose(ours.means_, ref.means_.ravel(), rtol=0, atol=10 * atol * scale)
    assert np.allclose(ours.variances_, ref.covariances_.ravel(), rtol=10 * atol,
                       atol=10 * atol * scale**2)
    assert np.allclose(ours.weights_, ref.weights_, rtol=0, atol=10 * atol)
    assert ours.covariances_.shape == ref.covariances_.shape
    assert np.argmin(ours.means_) == np.argmin(ref.means_.ravel())  # same clean component


@pytest.mark.parametrize("kind", ["bimodal", "unimodal", "losses", "lognormal"])
@pytest.mark.parametrize("seed", SEEDS)
def test_matches_sklearn_tight(kind, seed):
    x = draw(kind, np.random.default_rng(seed))
    opts = dict(tol=1e-8, max_iter=300)  # unimodal data can need thousands: same cap on both
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        ours = GaussianMixture1D(**opts).fit(x)
    ref = sklearn_fit(x, **opts)
    assert ours.converged_ == ref.converged_
    assert_matches(ours, ref, x, atol=1e-4)


@pytest.mark.parametrize("kind", ["bimodal", "losses"])
@pytest.mark.parametrize("seed", SEEDS[:5])
def test_matches_sklearn_default_settings(kind, seed):
    x = draw(kind, np.random.default_rng(seed))
    ours, ref = GaussianMixture1D().fit(x), sklearn_fit(x)
    assert_matches(ours, ref, x, atol=1e-3)
    assert abs(ours.n_iter_ - ref.n_iter_) <= 1
    assert ours.lower_bound_ == pytest.approx(ref.lower_bound_, rel=1e-6, abs=1e-6)
    p, gmm = clean_probability(x)
    p_ref = ref.predict_proba(x[:, None])[:, np.argmin(ref.means_.ravel())]
    assert np.abs(p - p_ref).max() <= 1e-3


@pytest.mark.parametrize("seed", SEEDS[:3])
def test_released_and_dividemix_options(seed):
    rng = np.random.default_rng(seed)
    x = draw("losses", rng)
    opts = dict(max_iter=10, tol=1e-2, reg_covar=5e-4)  # DivideMix's settings
    p, gmm = clean_probability(x, normalize=True, random_state=int(seed % 1000), **opts)
    xn = (x - x.min()) / (x.max() - x.min())
    ref = GaussianMixture(2, random_state=int(seed % 1000), **opts).fit(xn[:, None])
    p_ref = ref.predict_proba(xn[:, None])[:, np.argmin(ref.means_.ravel())]
    assert np.abs(p - p_ref).max() <= 1e-3
    assert gmm.n_iter_ == ref.n_iter_ and gmm.converged_ == ref.converged_


def test_max_iter_semantics_and_warning():
    x = draw("bimodal", np.random.default_rng(SEEDS[0]))
    for max_iter in (1, 2, 3):  # tol=0 never converges: the parameters after exactly max_iter
        with pytest.warns(ConvergenceWarning, match="did not converge"):
            ours = GaussianMixture1D(max_iter=max_iter, tol=0.0).fit(x)
        assert not ours.converged_ and ours.n_iter_ == max_iter
        assert_matches(ours, sklearn_fit(x, max_iter=max_iter, tol=0.0), x, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # max_iter=0: the kmeans init alone, no warning
        ours = GaussianMixture1D(max_iter=0).fit(x)
    assert_matches(ours, sklearn_fit(x, max_iter=0), x, atol=1e-6)


def test_three_components_use_sklearn_kmeans():
    rng = np.random.default_rng(SEEDS[1])
    x = np.concatenate([rng.normal(0, 1, 500), rng.normal(5, 1, 300), rng.normal(12, 2, 200)])
    ours = GaussianMixture1D(n_components=3, tol=1e-8, max_iter=1000).fit(x)
    ref = GaussianMixture(3, random_state=0, tol=1e-8, max_iter=1000).fit(x[:, None])
    assert np.abs(ours.predict_proba(x) - ref.predict_proba(x[:, None])).max() <= 1e-4


@pytest.mark.parametrize("seed", SEEDS[:4])
def test_kmeans_seed_draw_matches_numpy_choice(seed):
    rng = np.random.default_rng(seed)
    for n in [2, 3, 7, *rng.integers(2, 10**6, size=20).tolist()]:
        rs_seed = int(rng.integers(0, 2**31 - 1))
        ref = np.random.RandomState(rs_seed).choice(n, p=np.ones(n) / n)
        assert _first_center(n, np.random.RandomState(rs_seed).random_sample()) == ref
    # the exact fallback near a cdf step
    for n in (10, 1000, 3 * 10**6):
        for i in (1, n // 3, n - 1):
            u = np.nextafter(i / n, 0.0)
            cdf = np.full(n, 1.0 / n).cumsum()
            cdf /= cdf[-1]
            assert _first_center(n, u) == cdf.searchsorted(u, side="right")


def test_other_random_states_match_sklearn():
    x = draw("unimodal", np.random.default_rng(SEEDS[2]))
    for rs in (1, 7, 12345):
        ours = GaussianMixture1D(random_state=rs).fit(x)
        ref = GaussianMixture(2, random_state=rs).fit(x[:, None])
        assert np.abs(ours.predict_proba(x) - ref.predict_proba(x[:, None])).max() <= 1e-3


def test_values_on_the_kmeans_midpoint_go_where_sklearn_sends_them():
    """Integer-valued data: k-means++ picks 1 and 3, and every 2 sits on their midpoint; sklearn's
    rounding of c^2 - 2 x c (not 'ties to cluster 0') decides where they go, and with them the fit
    (here the lower component's posterior at 2 was 0.95 against sklearn's 0.05)."""
    cases = [(5, 1)] + [(seed, rs) for seed in range(8) for rs in range(5)]
    for seed, rs in cases:
        x = np.random.default_rng(seed).integers(0, 5, 300).astype(float)
        ours = GaussianMixture1D(random_state=rs).fit(x)
        ref = GaussianMixture(2, random_state=rs).fit(x[:, None])
        np.testing.assert_allclose(np.sort(ours.means_), np.sort(ref.means_.ravel()), rtol=0, atol=1e-8,
                                   err_msg=f"data seed {seed}, random_state {rs}")


# ----------------------------------------------------------------------------- types and devices


def test_types_shapes_and_dtypes():
    rng = np.random.default_rng(SEEDS[3])
    x = draw("losses", rng)
    p_np, gmm = clean_probability(x)
    assert isinstance(p_np, np.ndarray) and p_np.dtype == np.float64 and p_np.shape == x.shape
    assert isinstance(gmm.means_, np.ndarray) and gmm.means_.shape == (2,)
    p_t, gmm_t = clean_probability(torch.from_numpy(x))
    assert isinstance(p_t, torch.Tensor) and p_t.dtype == torch.float64
    assert isinstance(gmm_t.means_, torch.Tensor)
    assert torch.equal(p_t, torch.from_numpy(p_np))
    p_col, _ = clean_probability(torch.from_numpy(x)[:, None].float())  # [N, 1] float32
    assert p_col.shape == (x.size,)
    assert np.abs(p_col.numpy() - p_np).max() < 1e-3  # float32 rounding of the data only
    p_list, _ = clean_probability(x.tolist())
    assert isinstance(p_list, np.ndarray) and np.array_equal(p_list, p_np)
    ints = rng.integers(0, 5, 300)
    assert GaussianMixture1D().fit(ints).predict(ints).dtype == np.int64
    assert gmm.score_samples(x) == pytest.approx(
        GaussianMixture(2, random_state=0).fit(x[:, None]).score_samples(x[:, None]), abs=1e-4)
    assert np.array_equal(gmm.predict(x), gmm.predict_proba(x).argmax(1))
    assert 0.0 <= p_np.min() and p_np.max() <= 1.0


def test_thread_count_restored():
    before = torch.get_num_threads()
    clean_probability(np.random.default_rng(0).normal(size=500))
    assert torch.get_num_threads() == before


# ----------------------------------------------------------------------------- degenerate input


def test_all_equal_losses():
    with pytest.warns(ConvergenceWarning, match="distinct clusters"):
        p, gmm = clean_probability(np.full(100, 0.7))
    assert np.array_equal(p, np.ones(100))
    ref = sklearn_fit(np.full(100, 0.7))  # the fitted mixture is sklearn's
    assert np.allclose(np.sort(gmm.means_), np.sort(ref.means_.ravel()))
    with pytest.warns(ConvergenceWarning):
        p, _ = clean_probability(torch.zeros(10), normalize=True)
    assert torch.equal(p, torch.ones(10, dtype=torch.float64))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 9])
def test_very_small_n_matches_sklearn(n):
    x = np.random.default_rng(SEEDS[4] + n).gamma(2.0, 1.0, n)
    ours = GaussianMixture1D().fit(x)
    ref = sklearn_fit(x)
    assert np.abs(ours.predict_proba(x) - ref.predict_proba(x[:, None])).max() <= 1e-4


def test_one_huge_outlier():
    rng = np.random.default_rng(SEEDS[5])
    x = rng.exponential(0.5, 5000)
    x[rng.integers(5000)] = 1e6
    ours, ref = GaussianMixture1D().fit(x), sklearn_fit(x)
    assert_matches(ours, ref, x, atol=1e-4)
    # the outlier forms its own component, with variance reg_covar (no cancellation error)
    k = int(np.argmax(ours.means_))
    assert ours.means_[k] == pytest.approx(1e6, rel=1e-14)  # sklearn: 1e6 / (1 + 10 eps)
    assert ours.variances_[k] == pytest.approx(1e-6, rel=1e-6)
    p, _ = clean_probability(x)
    assert p[x == 1e6] < 1e-6 and p[x < 1e6].min() > 1 - 1e-6


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="empty"):
        clean_probability(np.array([]))
    bad = np.arange(20.0)
    bad[[3, 11]] = np.nan
    bad[17] = np.inf
    with pytest.raises(ValueError,
                       match=r"3 NaN or infinite value\(s\), first at indices \[3, 11, 17\]"):
        clean_probability(bad)
    with pytest.raises(ValueError, match=r"1-D or a column \[N, 1\], got shape \(10, 2\)"):
        GaussianMixture1D().fit(np.zeros((10, 2)))
    with pytest.raises(ValueError, match="got shape"):
        GaussianMixture1D().fit(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match=r"got shape \(\)"):
        GaussianMixture1D().fit(np.float64(3.0))
    with pytest.raises(TypeError, match="real numbers"):
        GaussianMixture1D().fit(np.ones(5, dtype=complex))
    with pytest.raises(TypeError, match="real numbers"):
        GaussianMixture1D().fit(torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"at least max\(2, n_components\) = 2 samples, got 1"):
        GaussianMixture1D().fit(np.array([1.0]))
    with pytest.raises(ValueError, match=r"= 3 samples, got 2"):
        GaussianMixture1D(n_components=3).fit(np.array([1.0, 2.0]))
    for kw, msg in [(dict(n_components=0), "n_components"), (dict(tol=-1.0), "tol"),
                    (dict(reg_covar=float("nan")), "reg_covar"), (dict(max_iter=-1), "max_iter"),
                    (dict(init_params="random"), "init_params"), (dict(backend="cuda"), "backend"),
                    (dict(random_state="x"), "random_state")]:
        with pytest.raises((ValueError, TypeError), match=msg):
            GaussianMixture1D(**kw)
    with pytest.raises(RuntimeError, match="not fitted"):
        GaussianMixture1D().predict_proba(np.ones(3))


def test_losses_that_carry_gradients_are_taken_as_data():
    logits = torch.randn(50, 4, requires_grad=True)
    labels = torch.randint(0, 4, (50,))
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    p, _ = clean_probability(ce)
    expected, _ = clean_probability(ce.detach())
    assert not p.requires_grad and torch.equal(p, expected)


def test_degenerate_and_overflowing_fits_raise():
    # reg_covar = 0 and a single value (an empty component): sklearn's ill-defined covariance error
    with pytest.raises(ValueError, match="ill-defined empirical covariance.*increase reg_covar"):
        GaussianMixture1D(reg_covar=0.0).fit(np.ones(10))
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(2, reg_covar=0.0).fit(np.ones((10, 1)))  # sklearn's own
    with pytest.raises(ValueError, match="NaN or infinite.*overflow float64"):
        clean_probability(np.concatenate([np.full(10, 1e200), np.full(10, -1e200), np.arange(10.0)]))


def test_classwise_labels_are_any_non_negative_integers():
    """Large label values (ids, not 0..K-1) group the same as small ones, in memory O(N)."""
    rng = np.random.default_rng(0)
    losses, labels = rng.exponential(1.0, 60), rng.integers(0, 3, 60)
    p, _ = clean_probability(losses, labels=labels)
    p_big, _ = clean_probability(losses, labels=labels * 10**9 + 7)
    assert np.array_equal(p, p_big)


def test_classwise_losses_subtract_each_class_median_before_the_mixture():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 5, 400)
    losses = rng.exponential(0.2, 400) + 2.0 * labels  # class k's clean losses sit near 2k
    noisy = rng.random(400) < 0.3
    losses[noisy] += 4.0
    med = class_medians(torch.as_tensor(losses), torch.as_tensor(labels)).numpy()
    for k in range(5):
        group = np.sort(losses[labels == k])
        assert np.all(med[labels == k] == group[(len(group) - 1) // 2])  # torch.median's lower median
    p, _ = clean_probability(torch.as_tensor(losses) - torch.as_tensor(med))
    p_cls, _ = clean_probability(losses, labels=labels)
    assert np.allclose(p_cls, p.numpy())
    # one global mixture calls the clean samples of the hardest classes noisy; centring per class does not
    p_raw, _ = clean_probability(losses)
    hard_clean = (labels >= 3) & ~noisy
    assert (p_raw[hard_clean] > 0.5).mean() < 0.5 < 0.95 < (p_cls[hard_clean] > 0.5).mean()
    assert (p_cls[noisy] > 0.5).mean() < 0.05


@pytest.mark.parametrize("labels, message", [
    (np.zeros(7, dtype=int), "labels has 7 entries but losses has 8"),
    (np.array([0, 1, -1, 0, 1, 0, 1, 0]), "non-negative integers"),
    (np.array([0, 1, 0.5, 0, 1, 0, 1, 0]), "non-negative integers"),
])
def test_classwise_losses_bad_labels(labels, message):
    with pytest.raises(ValueError, match=message):
        clean_probability(np.arange(8.0), labels=labels)


def test_clean_probability_fits_on_one_thread(monkeypatch):
    """Like the mixture's public methods (_one_thread): a second OpenMP thread spinning on a busy
    2-core machine made the 1e5-sample call 3-5x slower."""
    from clear_fast import mixture

    seen, fit = [], mixture.GaussianMixture1D._fit
    monkeypatch.setattr(mixture.GaussianMixture1D, "_fit",
                        lambda self, *a, **k: seen.append(torch.get_num_threads()) or fit(self, *a, **k))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        mixture.clean_probability(torch.rand(100, dtype=torch.float64))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_model_selection_members_match_sklearn():
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(0, 1, 300), rng.normal(4, 0.5, 100)])
    for k in (2, 3):
        ours, theirs = GaussianMixture1D(n_components=k), GaussianMixture(n_components=k, random_state=0)
        np.testing.assert_array_equal(ours.fit_predict(x), theirs.fit_predict(x[:, None]))
        for name in ("score", "bic", "aic"):
            assert getattr(ours, name)(x) == pytest.approx(getattr(theirs, name)(x[:, None]), rel=1e-9), name


def test_params_as_sklearn_estimators_give_them():
    """get_params / set_params / repr: sklearn.base.clone copies the settings, not the fit; set_params
    checks as the constructor does."""
    from sklearn.base import clone

    gmm = GaussianMixture1D(n_components=3, tol=1e-5).fit(np.r_[np.zeros(5), np.ones(5), 2 * np.ones(5)])
    copy = clone(gmm)
    assert copy.get_params() == gmm.get_params() and copy.get_params()["n_components"] == 3
    assert not hasattr(copy, "means_")
    assert gmm.set_params(max_iter=7) is gmm and gmm.max_iter == 7 and gmm.n_components == 3
    assert repr(gmm) == "GaussianMixture1D(n_components=3, tol=1e-05, max_iter=7)"
    with pytest.raises(ValueError, match="unknown parameter.*n_init"):
        gmm.set_params(n_init=3)
    with pytest.raises(ValueError, match="n_components must be a positive int"):
        gmm.set_params(n_components=0)
