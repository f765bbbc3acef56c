"""pytest-benchmark: clean_probability vs scikit-learn's GaussianMixture on the same loss-like data.

    pytest benchmarks/bench_mixture.py --benchmark-only

N = 1e3, 1e4, 6.7e4, 1e5, 1e6 with the released CleaR settings and DivideMix's. Few rounds at
large N, and scikit-learn is skipped at 1e6 (seconds per fit): benchmarks/mixture_table.py runs
the full comparison and writes the results. Each clear_fast case first checks its posteriors
against scikit-learn's (not timed), so a fast but wrong fit fails instead of winning.
On a CUDA machine clear_fast runs on GPU tensors (Triton backend) and syncs after each call.
"""
import functools
import warnings

import numpy as np
import pytest
import torch

from mixture_table import SETTINGS, loss_like  # benchmarks/ is on sys.path under pytest

SIZES = [1000, 10000, 67349, 100000, 1000000]
CUDA = torch.cuda.is_available()


@functools.lru_cache(maxsize=None)
def sklearn_p_clean(n, settings):
    from sklearn.mixture import GaussianMixture

    x = loss_like(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = GaussianMixture(2, random_state=0, **SETTINGS[settings]).fit(x[:, None])
    return gm.predict_proba(x[:, None])[:, np.argmin(gm.means_.ravel())]


def rounds(n):
    return 3 if n >= 10**6 else 5 if n >= 67349 else 20


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("n", SIZES)
def test_clear_fast(benchmark, n, settings):
    from clear_fast.mixture import clean_probability

    x = loss_like(n)
    losses = torch.from_numpy(x).cuda() if CUDA else x

    def run():
        p = clean_probability(losses, **SETTINGS[settings])[0]
        if CUDA:
            torch.cuda.synchronize()
        return p

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        p = run()  # warm-up and check
        if n <= 100000:
            p = p.cpu().numpy() if isinstance(p, torch.Tensor) else p
            assert np.abs(p - sklearn_p_clean(n, settings)).max() <= 1e-3
        benchmark.group = f"gmm {settings} N={n}"
        benchmark.pedantic(run, rounds=rounds(n), iterations=1)


@pytest.mark.parametrize("settings", list(SETTINGS))
@pytest.mark.parametrize("n", SIZES[:-1])
def test_sklearn(benchmark, n, settings):
    from sklearn.mixture import GaussianMixture

    x = loss_like(n)[:, None]

    def run():
        gm = GaussianMixture(2, random_state=0, **SETTINGS[settings]).fit(x)
        return gm.predict_proba(x)[:, np.argmin(gm.means_.ravel())]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        benchmark.group = f"gmm {settings} N={n}"
        benchmark.pedantic(run, rounds=rounds(n), iterations=1, warmup_rounds=1)
