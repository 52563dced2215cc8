"""Tests of flowdiff.metrics against closed forms and independent oracles (scipy, POT, brute force)."""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest
import scipy.linalg
import scipy.stats
import torch

import flowdiff.metrics.distances as distances_module
from flowdiff.metrics import (
    DataFloor,
    DigitsFeatureExtractor,
    data_floor,
    default_cache_dir,
    digits_frechet_distance,
    energy_distance,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_gaussians,
    load_digits_split,
    median_bandwidth,
    mmd,
    sliced_wasserstein,
    wasserstein2_exact,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _expected_abs_normal(mean: float, std: float) -> float:
    """E|Z| for Z ~ N(mean, std^2) (folded normal mean)."""
    return std * math.sqrt(2 / math.pi) * math.exp(-(mean**2) / (2 * std**2)) + mean * (
        1 - 2 * scipy.stats.norm.cdf(-mean / std)
    )


def _direct_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Euclidean distances from explicit differences (exact zeros on a diagonal, unlike torch.cdist)."""
    return (a[:, None, :] - b[None, :, :]).norm(dim=-1)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force tiny blocks (7x7 pairwise tiles, few projections per chunk) to exercise the chunked loops."""
    monkeypatch.setattr(distances_module, "_BLOCK_ELEMENTS", 49)


# --------------------------------------------------------------------------
# Sliced Wasserstein
# --------------------------------------------------------------------------


def test_sliced_w2_gaussian_shift_matches_closed_form() -> None:
    # SW2^2(N(0, I), N(m, I)) = E_theta (theta . m)^2 = |m|^2 / D.
    g = _gen(0)
    shift = torch.tensor([1.0, 2.0, 0.0, -1.0], dtype=torch.float64)
    x = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    y = torch.randn(4000, 4, generator=g, dtype=torch.float64) + shift
    sw = sliced_wasserstein(x, y, num_projections=2000, generator=g)
    # Over 20 seeds this estimate of SW2^2 had mean 1.491 and std 0.033; allow ~4.5 std.
    assert abs(sw.item() ** 2 - shift.pow(2).sum().item() / 4) < 0.15
    assert sw.dtype == torch.float64 and sw.ndim == 0


@pytest.mark.parametrize("p", [1, 2, 3])
def test_sliced_wasserstein_1d_unequal_sizes_is_exact_wasserstein(p: int) -> None:
    # In 1-D every direction is +-1 and SW_p = W_p; POT's 1-D solver is an independent oracle.
    import ot

    g = _gen(1)
    x = torch.randn(37, 1, generator=g, dtype=torch.float64)
    y = 0.5 + 2 * torch.randn(23, 1, generator=g, dtype=torch.float64)
    sw = sliced_wasserstein(x, y, num_projections=3, p=p, generator=g)
    expected = ot.wasserstein_1d(x[:, 0].numpy(), y[:, 0].numpy(), p=p) ** (1 / p)
    assert sw.item() == pytest.approx(float(expected), rel=1e-10)
    if p == 1:
        assert sw.item() == pytest.approx(scipy.stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-10)


def test_sliced_wasserstein_same_measure_with_repeated_atoms(small_blocks: None) -> None:
    # y and cat(y, y) are the same empirical measure, so the unequal-size path must agree exactly.
    g = _gen(2)
    x = torch.randn(10, 3, generator=g, dtype=torch.float64)
    y = torch.randn(15, 3, generator=g, dtype=torch.float64)
    a = sliced_wasserstein(x, y, num_projections=50, generator=_gen(7))
    b = sliced_wasserstein(x, torch.cat([y, y]), num_projections=50, generator=_gen(7))
    c = sliced_wasserstein(torch.cat([x, x, x]), torch.cat([y, y]), num_projections=50, generator=_gen(7))
    assert a.item() == pytest.approx(b.item(), rel=1e-12)
    assert a.item() == pytest.approx(c.item(), rel=1e-12)
    assert sliced_wasserstein(x, x.flip(0), generator=_gen(3)).item() == pytest.approx(0.0, abs=1e-12)


def test_sliced_wasserstein_flattens_and_follows_dtype() -> None:
    g = _gen(3)
    x = torch.randn(64, 2, 2, 2, generator=g)
    y = torch.randn(80, 8, generator=g)
    sw32 = sliced_wasserstein(x, y, generator=_gen(5))
    sw64 = sliced_wasserstein(x.double(), y.double(), generator=_gen(5))
    assert sw32.dtype == torch.float32 and sw64.dtype == torch.float64
    assert sw32.item() == pytest.approx(sw64.item(), rel=1e-4)  # same directions for the same seed


def test_sliced_wasserstein_rejects_bad_input() -> None:
    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match="D_x=3.*D_y=4"):
        sliced_wasserstein(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match="p must be"):
        sliced_wasserstein(x, x, p=0.5)
    with pytest.raises(ValueError, match="num_projections"):
        sliced_wasserstein(x, x, num_projections=0)
    with pytest.raises(ValueError, match="at least 1 samples"):
        sliced_wasserstein(torch.randn(0, 3), x)
    with pytest.raises(ValueError, match="non-finite"):
        sliced_wasserstein(torch.full((4, 3), float("nan")), x)
    with pytest.raises(TypeError, match="torch.Tensor"):
        sliced_wasserstein(np.zeros((4, 3)), x)  # type: ignore[arg-type]


# --------------------------------------------------------------------------
# Energy distance
# --------------------------------------------------------------------------


def test_energy_distance_1d_gaussians_closed_form() -> None:
    # E = 2 E|X - Y| - E|X - X'| - E|Y - Y'|, with E|X - X'| = 2 sigma / sqrt(pi) for a Gaussian.
    g = _gen(4)
    x = torch.randn(4000, 1, generator=g, dtype=torch.float64)
    y = 1.0 + 1.5 * torch.randn(4000, 1, generator=g, dtype=torch.float64)
    expected = 2 * _expected_abs_normal(1.0, math.sqrt(1 + 1.5**2)) - 2 / math.sqrt(math.pi) - 3 / math.sqrt(math.pi)
    # Over 20 seeds at N = 2000 the std was 0.040, so about 0.028 here; allow ~4 std.
    assert energy_distance(x, y).item() == pytest.approx(expected, abs=0.11)


def test_energy_distance_near_zero_for_same_distribution_positive_for_shift() -> None:
    g = _gen(5)
    x = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    z = torch.randn(2000, 3, generator=g, dtype=torch.float64)
    same = energy_distance(x, z).item()
    shifted = energy_distance(x, z + 0.5).item()
    # Null std at N = 2000 in 1-D was 6e-4; in 3-D it is of the same order.
    assert abs(same) < 5e-3
    assert shifted > 0.1


def test_energy_distance_v_statistic_equals_scipy_in_1d() -> None:
    # The V-statistic is the energy distance of the empirical measures; in 1-D it equals
    # 2 * integral (F - G)^2 = scipy.stats.energy_distance(u, v)^2.
    g = _gen(6)
    x = torch.randn(31, 1, generator=g, dtype=torch.float64)
    y = 0.3 + torch.randn(17, 1, generator=g, dtype=torch.float64)
    expected = scipy.stats.energy_distance(x[:, 0].numpy(), y[:, 0].numpy()) ** 2
    assert energy_distance(x, y, unbiased=False).item() == pytest.approx(expected, rel=1e-9)


def test_energy_distance_chunked_matches_brute_force(small_blocks: None) -> None:
    g = _gen(7)
    x = torch.randn(23, 5, generator=g, dtype=torch.float64)
    y = torch.randn(30, 5, generator=g, dtype=torch.float64) * 1.3
    dxy, dxx, dyy = _direct_distances(x, y), _direct_distances(x, x), _direct_distances(y, y)
    n, m = len(x), len(y)
    unbiased = 2 * dxy.mean() - dxx.sum() / (n * (n - 1)) - dyy.sum() / (m * (m - 1))
    biased = 2 * dxy.mean() - dxx.mean() - dyy.mean()
    assert energy_distance(x, y).item() == pytest.approx(unbiased.item(), rel=1e-9)
    assert energy_distance(x, y, unbiased=False).item() == pytest.approx(biased.item(), rel=1e-9)
    result32 = energy_distance(x.float(), y.float())
    assert result32.dtype == torch.float32
    assert result32.item() == pytest.approx(unbiased.item(), rel=1e-4)


def test_energy_distance_needs_two_samples_when_unbiased() -> None:
    with pytest.raises(ValueError, match="at least 2 samples, got N=1"):
        energy_distance(torch.randn(1, 2), torch.randn(5, 2))


# --------------------------------------------------------------------------
# MMD
# --------------------------------------------------------------------------


def _gaussian_rbf_mmd2(dim: int, h: float, s1: float, s2: float, shift_sq: float) -> float:
    """Population MMD^2 between N(mu1, s1^2 I) and N(mu2, s2^2 I) for k = exp(-|a-b|^2 / (2 h^2))."""

    def mean_kernel(variance: float, dist_sq: float) -> float:
        return (h**2 / (h**2 + variance)) ** (dim / 2) * math.exp(-dist_sq / (2 * (h**2 + variance)))

    return mean_kernel(2 * s1**2, 0.0) + mean_kernel(2 * s2**2, 0.0) - 2 * mean_kernel(s1**2 + s2**2, shift_sq)


def test_mmd_unbiased_matches_gaussian_closed_form() -> None:
    g = _gen(8)
    x = torch.randn(1500, 3, generator=g, dtype=torch.float64)
    y = 0.5 + 1.2 * torch.randn(1500, 3, generator=g, dtype=torch.float64)
    expected = _gaussian_rbf_mmd2(3, 1.5, 1.0, 1.2, 3 * 0.25)
    # Over 20 seeds: mean 0.0624 (truth 0.0622), std 0.0052; allow ~4 std.
    assert mmd(x, y, bandwidth=1.5).item() == pytest.approx(expected, abs=0.02)


def test_mmd_unbiased_near_zero_for_same_distribution() -> None:
    g = _gen(9)
    x = torch.randn(1500, 3, generator=g, dtype=torch.float64)
    z = torch.randn(1500, 3, generator=g, dtype=torch.float64)
    # Null std over 20 seeds was 2.5e-4; the shifted value below is ~0.06.
    assert abs(mmd(x, z, bandwidth=1.5).item()) < 1.5e-3
    assert mmd(x, z + 0.5, bandwidth=1.5).item() > 0.03
    # Median heuristic and multi-bandwidth run and separate the two cases as well.
    assert abs(mmd(x, z).item()) < 1.5e-3 < mmd(x, z + 0.5).item()
    assert abs(mmd(x, z, bandwidth=[0.5, 1.0, 2.0]).item()) < 1.5e-3


@pytest.mark.parametrize("kernel", ["rbf", "laplacian"])
def test_mmd_chunked_matches_brute_force(kernel: str, small_blocks: None) -> None:
    g = _gen(10)
    x = torch.randn(20, 4, generator=g, dtype=torch.float64)
    y = torch.randn(26, 4, generator=g, dtype=torch.float64) + 0.3
    bandwidths = [0.7, 2.0]

    def gram(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d = _direct_distances(a, b)
        mats = [torch.exp(-(d**2) / (2 * h**2)) if kernel == "rbf" else torch.exp(-d / h) for h in bandwidths]
        return torch.stack(mats).mean(0)

    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    n, m = len(x), len(y)
    unbiased = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    unbiased = unbiased + (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1)) - 2 * kxy.mean()
    biased = kxx.mean() + kyy.mean() - 2 * kxy.mean()
    assert mmd(x, y, kernel=kernel, bandwidth=bandwidths).item() == pytest.approx(unbiased.item(), rel=1e-9)
    assert mmd(x, y, kernel, bandwidths, unbiased=False).item() == pytest.approx(biased.item(), rel=1e-9)


def test_median_bandwidth_matches_scipy() -> None:
    g = _gen(11)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.randn(25, 3, generator=g, dtype=torch.float64)
    expected = np.median(scipy.spatial.distance.pdist(torch.cat([x, y]).numpy()))
    assert median_bandwidth(x, y) == pytest.approx(float(expected), rel=1e-12)


def test_mmd_rejects_bad_arguments() -> None:
    x = torch.randn(6, 2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        mmd(x, x, kernel="cosine")
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x, bandwidth=-1.0)
    with pytest.raises(ValueError, match="bandwidth"):
        mmd(x, x, bandwidth=[])
    with pytest.raises(ValueError, match="median pairwise distance"):
        mmd(torch.zeros(6, 2), torch.zeros(6, 2))


# --------------------------------------------------------------------------
# Exact W2
# --------------------------------------------------------------------------


def test_wasserstein2_exact_translation_and_1d() -> None:
    g = _gen(12)
    x = torch.randn(60, 3, generator=g, dtype=torch.float64)
    shift = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    # The optimal plan between a measure and its translate is the translation: W2 = |shift|.
    assert wasserstein2_exact(x, x + shift).item() == pytest.approx(shift.norm().item(), rel=1e-9)
    # 1-D, equal sizes: W2^2 is the mean squared gap of the sorted samples.
    a = torch.randn(50, 1, generator=g, dtype=torch.float64)
    b = torch.randn(50, 1, generator=g, dtype=torch.float64) * 2
    expected = (a[:, 0].sort().values - b[:, 0].sort().values).pow(2).mean().sqrt()
    result = wasserstein2_exact(a.float(), b.float())
    assert result.dtype == torch.float32
    assert result.item() == pytest.approx(expected.item(), rel=1e-5)


def test_wasserstein2_exact_limits_and_missing_pot(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="max_samples=10"):
        wasserstein2_exact(torch.randn(11, 2), torch.randn(5, 2), max_samples=10)
    monkeypatch.setitem(sys.modules, "ot", None)  # makes `import ot` raise ImportError
    with pytest.raises(ImportError, match="pip install POT"):
        wasserstein2_exact(torch.randn(5, 2), torch.randn(5, 2))


# --------------------------------------------------------------------------
# Data floor
# --------------------------------------------------------------------------


def test_data_floor_draws_disjoint_samples_of_the_right_size() -> None:
    data = torch.arange(100, dtype=torch.float64)[:, None]
    seen = []

    def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
        seen.append((len(a), len(b)))
        return float(len(set(a[:, 0].tolist()) & set(b[:, 0].tolist())))

    floor = data_floor(overlap, data, num_samples=50, num_repeats=3, generator=_gen(0))
    assert isinstance(floor, DataFloor)
    assert floor.values == (0.0, 0.0, 0.0) and floor.mean == 0.0 and floor.std == 0.0
    assert seen == [(50, 50)] * 3
    reference = torch.arange(100, 130, dtype=torch.float64)[:, None]
    floor = data_floor(overlap, data, reference, num_samples=30, generator=_gen(0))
    assert floor.values == (0.0,) and floor.num_samples == 30
    with pytest.raises(ValueError, match="2\\*num_samples <= N"):
        data_floor(overlap, data, num_samples=51)
    with pytest.raises(ValueError, match="reference has 30"):
        data_floor(overlap, data, reference, num_samples=31)


# --------------------------------------------------------------------------
# Fréchet distance
# --------------------------------------------------------------------------


def test_frechet_gaussians_diagonal_closed_form() -> None:
    # Commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum (sqrt a_i - sqrt b_i)^2.
    a = torch.tensor([1.0, 4.0, 0.25, 0.0], dtype=torch.float64)
    b = torch.tensor([9.0, 1.0, 0.25, 2.0], dtype=torch.float64)
    mu1 = torch.tensor([0.0, 1.0, 2.0, 3.0], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, 3.0], dtype=torch.float64)
    expected = (mu1 - mu2).pow(2).sum() + (a.sqrt() - b.sqrt()).pow(2).sum()
    result = frechet_distance_gaussians(mu1, torch.diag(a), mu2, torch.diag(b))
    assert result.item() == pytest.approx(expected.item(), rel=1e-12)  # includes a singular covariance


def test_frechet_gaussians_general_matches_scipy_sqrtm() -> None:
    rng = np.random.default_rng(13)
    dim = 6
    left, right = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    cov1, cov2 = left @ left.T + 0.1 * np.eye(dim), right @ right.T
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    cross = scipy.linalg.sqrtm(cov1 @ cov2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(cov1 + cov2 - 2 * cross)
    result = frechet_distance_gaussians(*(torch.from_numpy(v) for v in (mu1, cov1, mu2, cov2)))
    assert result.item() == pytest.approx(expected, rel=1e-9)
    swapped = frechet_distance_gaussians(*(torch.from_numpy(v) for v in (mu2, cov2, mu1, cov1)))
    assert swapped.item() == pytest.approx(expected, rel=1e-9)


def _samples_with_exact_moments(n: int, mean: torch.Tensor, cov: torch.Tensor, seed: int) -> torch.Tensor:
    """n samples whose sample mean and unbiased sample covariance are exactly ``mean`` and ``cov``."""
    z = torch.randn(n, len(mean), generator=_gen(seed), dtype=torch.float64)
    z = z - z.mean(0)
    whitening = torch.linalg.cholesky(torch.cov(z.T))
    z = torch.linalg.solve_triangular(whitening, z.T, upper=False).T  # sample covariance now I
    return mean + z @ torch.linalg.cholesky(cov).T


def test_frechet_from_features_with_known_moments() -> None:
    mean_x = torch.tensor([0.0, 1.0, -1.0], dtype=torch.float64)
    mean_y = torch.tensor([0.5, 1.0, 0.0], dtype=torch.float64)
    cov_x = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    cov_y = torch.diag(torch.tensor([4.0, 2.0, 0.5], dtype=torch.float64))
    x = _samples_with_exact_moments(200, mean_x, cov_x, 14)
    y = _samples_with_exact_moments(150, mean_y, cov_y, 15)
    expected = 0.25 + 1.0 + (1 - 2) ** 2 + 0.0 + (math.sqrt(3) - math.sqrt(0.5)) ** 2
    assert frechet_distance_from_features(x, y).item() == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(x.float(), y.float()).dtype == torch.float32
    assert frechet_distance(x, x).item() == pytest.approx(0.0, abs=1e-9)


def test_frechet_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="at least 2 samples, got N=1"):
        frechet_distance_from_features(torch.randn(1, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="D_x=3.*D_y=2"):
        frechet_distance_from_features(torch.randn(4, 3), torch.randn(5, 2))
    with pytest.raises(ValueError, match=r"\(D, D\) = \(2, 2\)"):
        frechet_distance_gaussians(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2))


# --------------------------------------------------------------------------
# Digits classifier and digits Fréchet distance
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory) -> tuple[DigitsFeatureExtractor, os.PathLike[str]]:
    cache_dir = tmp_path_factory.mktemp("flowdiff_cache")
    return DigitsFeatureExtractor.load_or_train(cache_dir), cache_dir


def test_digits_split_convention() -> None:
    split = load_digits_split()
    assert split.train_images.shape == (1438, 1, 8, 8) and split.test_images.shape == (359, 1, 8, 8)
    assert split.train_images.min() == -1 and split.train_images.max() == 1
    assert len(set(split.train_indices.tolist()) | set(split.test_indices.tolist())) == 1797
    from sklearn.datasets import load_digits

    raw = load_digits()
    first = int(split.test_indices[0])
    assert torch.equal(split.test_images[0, 0], torch.from_numpy(raw.images[first] / 8.0 - 1.0).float())
    assert split.test_labels[0].item() == raw.target[first]
    # Same rows as the data layer's held-out split, so the classifier never saw them.
    from flowdiff.data import load_dataset

    heldout = load_dataset("digits", split="heldout", seed=0, heldout_fraction=0.2)
    assert torch.equal(heldout.indices, split.test_indices)
    assert torch.equal(heldout.x.float(), split.test_images)
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(test_fraction=1.0)


def test_digits_classifier_accuracy_and_cache_reuse(
    digits_cache: tuple[DigitsFeatureExtractor, os.PathLike[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, cache_dir = digits_cache
    assert model.trained_now and model.cache_path is not None and model.cache_path.is_file()
    split = load_digits_split()
    accuracy = model.accuracy(split.test_images, split.test_labels)  # measured here, not the stored number
    assert accuracy > 0.95
    assert model.test_accuracy == pytest.approx(accuracy)
    # Written atomically: the final file only, no temporary left behind.
    assert sorted(p.name for p in model.cache_path.parent.iterdir()) == [model.cache_path.name]
    mtime = os.stat(model.cache_path).st_mtime_ns
    reloaded = DigitsFeatureExtractor.load_or_train(cache_dir)
    assert not reloaded.trained_now and reloaded.test_accuracy == pytest.approx(model.test_accuracy)
    assert os.stat(model.cache_path).st_mtime_ns == mtime
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, reloaded.state_dict()[name])
    # FLOWDIFF_CACHE_DIR selects the default cache folder.
    monkeypatch.setenv("FLOWDIFF_CACHE_DIR", str(cache_dir))
    assert default_cache_dir() == model.cache_path.parent
    assert not DigitsFeatureExtractor.load_or_train().trained_now


def test_digits_frechet_distance_separates_real_from_degraded(
    digits_cache: tuple[DigitsFeatureExtractor, os.PathLike[str]],
) -> None:
    model, _ = digits_cache
    split = load_digits_split()
    fd = lambda a, b: digits_frechet_distance(a, b, extractor=model)
    floor = data_floor(fd, split.train_images, split.test_images, num_samples=359, num_repeats=3, generator=_gen(0))
    assert floor.mean > 0
    # Mode dropping (only digits 0-4) and uniform noise must sit far above the real-vs-real floor.
    half = split.train_images[split.train_labels < 5][:359]
    noise = torch.rand(359, 1, 8, 8, generator=_gen(1)) * 2 - 1
    assert fd(half, split.test_images).item() > 5 * floor.mean
    assert fd(noise, split.test_images).item() > 20 * floor.mean
    # Identical sets: 0; the flat (N, 64) layout is accepted.
    assert fd(split.test_images.reshape(359, 64), split.test_images).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="\\(N, 1, 8, 8\\)"):
        fd(torch.zeros(10, 3, 8, 8), split.test_images)
    with pytest.raises(ValueError, match="at least 2 samples"):
        fd(split.test_images[:1], split.test_images)
