"""Synthetic label noise for experiments (training labels only; test labels stay clean).

Each generator is seeded only by ``seed`` through ``np.random.default_rng(seed)``, so one seed gives
the same noisy labels whatever else a run does, and methods compared on one seed see the same noise.

Conventions (see docs/clear-method.md, "Label noise"), with r the rate and K the number of classes:

- ``none``: labels unchanged, whatever the rate (so a CLI default rate needs no override);
  ``info`` records the rate as requested and an expected flip rate of 0.
- ``symmetric`` (CleaR's released code): each label is redrawn from the row of the transition
  matrix with 1 - r + r/K on the diagonal and r/K elsewhere, so the expected fraction actually
  flipped is r (K - 1) / K.
- ``symmetric-exact``: exactly round(r N) samples, chosen at random, flip to a uniformly chosen
  different class.
- ``asymmetric`` (CleaR's released code): class i flips to (i - 1) mod K with probability r.
- ``asymmetric-next`` (Co-teaching, SelfMix): class i flips to (i + 1) mod K with probability r.
- ``instance`` (Xia et al. 2020, as used for text by DyGen): per-sample flip rate
  q_i ~ N(r, 0.1) truncated to [0, 1]; W ~ N(0, 1) of shape [K, d, K]; scores = x_i W[y_i] with
  the own class at -inf; the label is drawn from q_i softmax(scores) + (1 - q_i) on the own
  class. ``features`` x [N, d] should be a meaningful representation such as L2-normalised
  sentence embeddings of the frozen backbone: the scores scale with the feature norm, so large
  norms send each sample's flips almost always to one class. At r = 0 no label flips (the
  truncated normal would otherwise still give a mean flip rate of about 0.08).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np

NOISE_TYPES = ("none", "symmetric", "symmetric-exact", "asymmetric", "asymmetric-next", "instance")

_CONVENTIONS = {
    "none": "labels unchanged (the rate is ignored)",
    "symmetric": "released CleaR convention: each label redrawn from a transition matrix with 1 - r + r/K on "
                 "the diagonal and r/K elsewhere (expected flip rate r(K-1)/K)",
    "symmetric-exact": "exactly round(r*N) samples, chosen at random, flipped to a uniformly chosen different class",
    "asymmetric": "released CleaR convention: class i flips to (i - 1) mod K with probability r",
    "asymmetric-next": "Co-teaching/SelfMix convention: class i flips to (i + 1) mod K with probability r",
    "instance": "Xia et al. 2020: q_i ~ N(r, 0.1) truncated to [0, 1], W ~ N(0, 1) [K, d, K], label drawn from "
                "q_i * softmax(x_i W[y_i], own class -inf) + (1 - q_i) on the own class",
}
_FLIP_SD = 0.1  # standard deviation of the per-sample flip rate in the instance-dependent generator


@dataclass
class NoiseResult:
    noisy_labels: np.ndarray  # int64
    clean_mask: np.ndarray  # bool: noisy_labels == true labels
    info: dict  # JSON-serialisable summary, see inject_noise


def inject_noise(labels, num_classes: int, noise_type: str, rate: float, seed: int,
                 features=None) -> NoiseResult:
    """Corrupt ``labels`` (int class ids in [0, num_classes)) by the named convention.

    ``features`` [N, d] is needed by ``instance`` only (and ignored by the others). ``info``
    holds noise_type, convention, requested_rate, achieved_flip_rate, expected_flip_rate, seed,
    num_classes, num_samples, num_flipped and transition_counts (K x K, rows = true class,
    columns = observed class).
    """
    labels, num_classes, rate, seed = _check(labels, num_classes, noise_type, rate, seed)
    rng = np.random.default_rng(seed)
    n, k = len(labels), num_classes

    if noise_type == "none" or rate == 0:
        noisy, expected = labels.copy(), 0.0
    elif noise_type == "symmetric":
        # Redrawing uniformly over all K classes with probability r is exactly that matrix row.
        redraw = rng.random(n) < rate
        noisy = np.where(redraw, rng.integers(0, k, n), labels)
        expected = rate * (k - 1) / k
    elif noise_type == "symmetric-exact":
        chosen = rng.choice(n, size=round(rate * n), replace=False)
        noisy = labels.copy()
        noisy[chosen] = (labels[chosen] + rng.integers(1, k, len(chosen))) % k  # never the own class
        expected = len(chosen) / n
    elif noise_type in ("asymmetric", "asymmetric-next"):
        step = -1 if noise_type == "asymmetric" else 1
        noisy = np.where(rng.random(n) < rate, (labels + step) % k, labels)
        expected = rate
    else:  # instance
        noisy, expected = _instance_noise(labels, k, rate, rng, _check_features(features, n))

    noisy = noisy.astype(np.int64)
    clean = noisy == labels
    flipped = int(n - clean.sum())
    transitions = np.bincount(labels * k + noisy, minlength=k * k).reshape(k, k)
    info = {
        "noise_type": noise_type,
        "convention": _CONVENTIONS[noise_type],
        "requested_rate": rate,
        "achieved_flip_rate": flipped / n,
        "expected_flip_rate": float(expected),
        "seed": seed,
        "num_classes": k,
        "num_samples": n,
        "num_flipped": flipped,
        "transition_counts": transitions.tolist(),
    }
    return NoiseResult(noisy, clean, info)


def _instance_noise(labels, k, rate, rng, x):
    """Xia et al. 2020; returns (noisy labels, expected flip rate = mean of the truncated normal)."""
    from scipy.stats import truncnorm

    flip_dist = truncnorm((0 - rate) / _FLIP_SD, (1 - rate) / _FLIP_SD, loc=rate, scale=_FLIP_SD)
    q = flip_dist.rvs(len(labels), random_state=rng)
    w = rng.standard_normal((k, x.shape[1], k))
    scores = np.empty((len(labels), k))
    for c in np.unique(labels):  # per class, so W[y_i] is never materialised per sample ([N, d, K])
        rows = labels == c
        scores[rows] = x[rows] @ w[c]
    own = np.arange(len(labels)), labels
    scores[own] = -np.inf
    probs = np.exp(scores - scores.max(axis=1, keepdims=True))
    probs *= (q / probs.sum(axis=1))[:, None]
    probs[own] = 1 - q
    # Inverse-CDF draw, one uniform per sample; the clip guards against cumsum rounding below u.
    u = rng.random(len(labels))[:, None]
    noisy = np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), k - 1)
    return noisy, flip_dist.mean()


def _check(labels, num_classes, noise_type, rate, seed):
    if noise_type not in NOISE_TYPES:
        raise ValueError(f"unknown noise type {noise_type!r}; choose one of {', '.join(NOISE_TYPES)}")
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real) or not 0 <= rate < 1:
        raise ValueError(f"noise rate must be a number in [0, 1), got {rate!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"noise seed must be a non-negative integer, got {seed!r}")
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class ids, got shape {labels.shape}")
    if len(labels) == 0:
        raise ValueError("labels is empty: there is nothing to corrupt")
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"labels must be integer class ids, got dtype {labels.dtype}")
    labels = labels.astype(np.int64)
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} label(s) outside [0, {num_classes}): "
                         f"{sorted(set(labels[bad].tolist()))[:10]}")
    return labels, int(num_classes), float(rate), int(seed)


def _check_features(features, n):
    if features is None:
        raise ValueError("noise type 'instance' needs features [N, d] (e.g. normalised sentence embeddings)")
    if hasattr(features, "detach"):  # a torch tensor, on any device
        features = features.detach().cpu().double().numpy()
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < 1:
        raise ValueError(f"features must have shape [N, d] = [{n}, d] with d >= 1, got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise TypeError(f"features must be a float array, got dtype {x.dtype}")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or infinite values")
    return x
