"""Label-noise generators: rates, conventions, bookkeeping, determinism and errors."""
import json
from collections import Counter

import numpy as np
import pytest

from clear_fast.noise import NOISE_TYPES, inject_noise

N, K = 20_000, 10


@pytest.fixture(scope="module")
def labels():
    return np.random.default_rng(0).integers(0, K, N)


@pytest.fixture(scope="module")
def features():
    x = np.random.default_rng(1).standard_normal((N, 16))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def within_binomial(achieved, p, n, sigmas=4):
    return abs(achieved - p) <= sigmas * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("rate", [0.2, 0.45])
@pytest.mark.parametrize("noise_type,expected", [
    ("symmetric", lambda r: r * (K - 1) / K),
    ("asymmetric", lambda r: r),
    ("asymmetric-next", lambda r: r),
    ("instance", lambda r: r),
])
def test_flip_rate_within_binomial_tolerance(labels, features, noise_type, expected, rate):
    info = inject_noise(labels, K, noise_type, rate, seed=3, features=features).info
    # the instance generator's truncated normal shifts its mean a little above r at small r
    assert info["expected_flip_rate"] == pytest.approx(expected(rate), abs=0.01)
    assert within_binomial(info["achieved_flip_rate"], info["expected_flip_rate"], N), info["achieved_flip_rate"]


def test_instance_expected_rate_is_truncated_normal_mean(labels, features):
    # N(0.2, 0.1) cut at 0 (two sd below): mean 0.2 + 0.1 * phi(2) / (1 - Phi(2)) = 0.20553
    assert inject_noise(labels, K, "instance", 0.2, 0, features).info["expected_flip_rate"] == pytest.approx(0.20553, abs=1e-4)


@pytest.mark.parametrize("noise_type", ["symmetric", "symmetric-exact"])
def test_symmetric_flips_spread_evenly_over_other_classes(labels, noise_type):
    res = inject_noise(labels, K, noise_type, 0.4, seed=5)
    offsets = ((res.noisy_labels - labels) % K)[~res.clean_mask]
    counts = np.bincount(offsets, minlength=K)
    assert counts[0] == 0
    flips = len(offsets)
    for c in counts[1:]:
        assert within_binomial(c / flips, 1 / (K - 1), flips), counts


@pytest.mark.parametrize("n,rate", [(20_000, 0.45), (1001, 0.3), (7, 0.5), (50, 0.0)])
def test_symmetric_exact_flips_exactly_round_rn_to_other_classes(n, rate):
    y = np.random.default_rng(n).integers(0, K, n)
    res = inject_noise(y, K, "symmetric-exact", rate, seed=2)
    assert res.info["num_flipped"] == round(rate * n)
    assert res.info["achieved_flip_rate"] == res.info["expected_flip_rate"] == round(rate * n) / n


@pytest.mark.parametrize("noise_type,offset", [("asymmetric", K - 1), ("asymmetric-next", 1)])
def test_asymmetric_flips_only_to_the_neighbour(labels, noise_type, offset):
    res = inject_noise(labels, K, noise_type, 0.3, seed=4)
    flipped = ~res.clean_mask
    assert flipped.sum() > 0
    assert np.all((res.noisy_labels[flipped] - labels[flipped]) % K == offset)
    # every class flips (class 0 wraps around to K - 1 or 1)
    assert set(labels[flipped].tolist()) == set(range(K))


@pytest.mark.parametrize("noise_type", NOISE_TYPES)
def test_clean_mask_and_transition_counts_match_labels(labels, features, noise_type):
    rate = 0.35
    res = inject_noise(labels, K, noise_type, rate, seed=6, features=features)
    assert res.noisy_labels.dtype == np.int64 and res.clean_mask.dtype == bool
    np.testing.assert_array_equal(res.clean_mask, res.noisy_labels == labels)
    pairs = Counter(zip(labels.tolist(), res.noisy_labels.tolist()))
    expected = [[pairs[(i, j)] for j in range(K)] for i in range(K)]
    assert res.info["transition_counts"] == expected
    assert res.info["num_flipped"] == int((~res.clean_mask).sum())
    assert json.loads(json.dumps(res.info)) == res.info  # JSON-serialisable, nothing lost
    assert res.info["noise_type"] == noise_type and res.info["seed"] == 6 and res.info["num_classes"] == K
    assert res.info["requested_rate"] == rate and isinstance(res.info["convention"], str)


def test_no_noise_leaves_labels_unchanged(labels, features):
    for noise_type, rate in [(t, 0.0) for t in NOISE_TYPES] + [("none", 0.4)]:
        res = inject_noise(labels, K, noise_type, rate, seed=1, features=features)
        np.testing.assert_array_equal(res.noisy_labels, labels)
        assert res.clean_mask.all() and res.info["achieved_flip_rate"] == res.info["expected_flip_rate"] == 0.0


@pytest.mark.parametrize("noise_type", NOISE_TYPES[1:])
def test_same_seed_same_labels_other_seed_other_labels(labels, features, noise_type):
    first = inject_noise(labels, K, noise_type, 0.3, seed=11, features=features).noisy_labels
    np.random.seed(999)  # global numpy state must not matter
    np.random.random(17)
    again = inject_noise(list(labels), K, noise_type, 0.3, seed=11, features=features).noisy_labels
    other = inject_noise(labels, K, noise_type, 0.3, seed=12, features=features).noisy_labels
    np.testing.assert_array_equal(first, again)
    assert (first != other).any()


def test_instance_noise_targets_depend_on_features():
    # Two feature clusters per class, far from the origin: the softmax over x W[y] is then nearly
    # one-hot, so each (class, cluster) sends its flips almost always to one class, and the two
    # clusters of a class mostly to different ones. Symmetric noise spreads them evenly.
    rng = np.random.default_rng(2)
    n, k = 6000, 6
    y = rng.integers(0, k, n)
    cluster = rng.integers(0, 2, n)
    centres = 30 * rng.standard_normal((k, 2, 8))
    x = centres[y, cluster] + 0.01 * rng.standard_normal((n, 8))

    def dominant_targets(noisy):
        shares, tops = [], {}
        for c in range(k):
            for g in range(2):
                flips = noisy[(y == c) & (cluster == g) & (noisy != y)]
                target, count = Counter(flips.tolist()).most_common(1)[0]
                shares.append(count / len(flips))
                tops[c, g] = target
        return min(shares), sum(tops[c, 0] != tops[c, 1] for c in range(k))

    min_share, differing = dominant_targets(inject_noise(y, k, "instance", 0.4, seed=0, features=x).noisy_labels)
    assert min_share > 0.9 and differing >= 2
    min_share, _ = dominant_targets(inject_noise(y, k, "symmetric", 0.4, seed=0).noisy_labels)
    assert min_share < 0.5

    # same seed, other features: other noisy labels
    a = inject_noise(y, k, "instance", 0.4, seed=0, features=x).noisy_labels
    b = inject_noise(y, k, "instance", 0.4, seed=0, features=-x).noisy_labels
    assert (a != b).any()


def test_instance_accepts_torch_features(labels, features):
    torch = pytest.importorskip("torch")
    from_numpy = inject_noise(labels, K, "instance", 0.3, 8, features).noisy_labels
    from_torch = inject_noise(labels, K, "instance", 0.3, 8, torch.tensor(features, dtype=torch.float64)).noisy_labels
    np.testing.assert_array_equal(from_numpy, from_torch)


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(rate=1.0), ValueError, r"noise rate must be a number in \[0, 1\)"),
    (dict(rate=-0.1), ValueError, r"noise rate"),
    (dict(rate=float("nan")), ValueError, r"noise rate"),
    (dict(rate="0.2"), ValueError, r"noise rate"),
    (dict(rate=True), ValueError, r"noise rate"),
    (dict(noise_type="uniform"), ValueError, r"unknown noise type 'uniform'.*symmetric-exact.*instance"),
    (dict(noise_type="none", rate=1.5), ValueError, r"noise rate"),
    (dict(labels=[0, 1, 3, 7, -1]), ValueError, r"2 label\(s\) outside \[0, 4\): \[-1, 7\]"),
    (dict(labels=[0.0, 1.0]), TypeError, r"integer class ids.*float64"),
    (dict(labels=[[0, 1]]), ValueError, r"1-D"),
    (dict(labels=[]), ValueError, r"empty"),
    (dict(num_classes=1, labels=[0, 0]), ValueError, r"num_classes must be an integer >= 2"),
    (dict(seed=-1), ValueError, r"seed must be a non-negative integer"),
    (dict(seed=1.5), ValueError, r"seed"),
    (dict(noise_type="instance"), ValueError, r"'instance' needs features \[N, d\]"),
    (dict(noise_type="instance", features=np.zeros((3, 4))), ValueError, r"shape \[N, d\] = \[4, d\].*\(3, 4\)"),
    (dict(noise_type="instance", features=np.zeros(4)), ValueError, r"shape"),
    (dict(noise_type="instance", features=np.full((4, 2), np.nan)), ValueError, r"NaN or infinite"),
    (dict(noise_type="instance", features=np.array([["a"]] * 4)), TypeError, r"float array"),
])
def test_bad_input_is_a_clear_error(kwargs, error, match):
    args = dict(labels=[0, 1, 2, 3], num_classes=4, noise_type="symmetric", rate=0.2, seed=0, features=None)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        inject_noise(**args)
