"""Tests of flowdiff.data: toy sets against their closed-form moments and supports, mixtures,
digits, user files, seeded disjoint splits and the resumable batch sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from flowdiff.data import (
    TOY_DATASETS,
    BatchSampler,
    Dataset,
    available_datasets,
    batches,
    checkerboard,
    gaussian_mixture_samples,
    load_dataset,
    load_folder,
    mixture_parameters,
    moons,
    rings,
    spirals,
)

STANDARDISED = ["checkerboard", "eight_gaussians", "moons", "pinwheel", "rings", "spirals"]


def assert_mean_close(samples: torch.Tensor, expected: torch.Tensor, sigmas: float = 5.0) -> None:
    """Sample mean within `sigmas` standard errors (estimated from the sample) of the truth."""
    standard_error = samples.std(0) / math.sqrt(samples.shape[0])
    deviation = (samples.mean(0) - expected).abs()
    assert (deviation < sigmas * standard_error).all(), f"mean off by {deviation} (standard error {standard_error})"


# --- toy sets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TOY_DATASETS))
def test_toy_shape_dtype_and_determinism(name: str) -> None:
    generate = TOY_DATASETS[name]
    x = generate(100, 7)
    assert x.shape == (100, 2) and x.dtype == torch.get_default_dtype()
    assert torch.equal(x, generate(100, torch.Generator().manual_seed(7)))
    assert not torch.equal(x, generate(100, 8))
    assert generate(3, 0, dtype=torch.float64).dtype == torch.float64
    assert generate(0, 0).shape == (0, 2)


@pytest.mark.parametrize("name", STANDARDISED)
def test_toy_sets_are_standardised(name: str) -> None:
    """Mean 0 and E|x|² = 2 hold exactly in the population (closed forms in flowdiff.data.toy)."""
    x = TOY_DATASETS[name](40_000, 3, dtype=torch.float64)
    assert_mean_close(x, torch.zeros(2, dtype=torch.float64))
    assert_mean_close((x**2).sum(1, keepdim=True), torch.tensor([2.0], dtype=torch.float64))


def test_standardisation_holds_for_other_shape_parameters() -> None:
    for x in (
        moons(30_000, 1, noise=0.3, dtype=torch.float64),
        spirals(30_000, 1, turns=2.5, noise=0.1, dtype=torch.float64),
        rings(30_000, 1, num_rings=2, noise=0.2, dtype=torch.float64),
    ):
        assert_mean_close(x, torch.zeros(2, dtype=torch.float64))
        assert_mean_close((x**2).sum(1, keepdim=True), torch.tensor([2.0], dtype=torch.float64))


def test_checkerboard_support_is_the_black_cells() -> None:
    raw = checkerboard(5000, 0, dtype=torch.float64) * 2 / math.sqrt(3)  # back to raw [-2, 2]² units
    assert raw.abs().max() <= 2.0
    cells = torch.floor(raw).long()
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    # all 8 black cells are used, about equally (1/8 each)
    counts = torch.unique(cells, dim=0, return_counts=True)[1]
    assert len(counts) == 8 and counts.min() > 5000 / 8 - 5 * math.sqrt(5000 / 8)


def test_rings_radii_and_labels() -> None:
    x, y = rings(4000, 0, noise=0.0, return_labels=True, dtype=torch.float64)
    # noise 0: radius exactly (k+1)/scale with scale = sqrt(E|raw|²/2) = sqrt(7.5/2)
    torch.testing.assert_close(x.norm(dim=1), (y + 1).double() / math.sqrt(7.5 / 2))


def test_eight_gaussians_is_the_published_mixture() -> None:
    parameters = mixture_parameters("eight_gaussians", dtype=torch.float64)
    x, labels = TOY_DATASETS["eight_gaussians"](20_000, 0, return_labels=True, dtype=torch.float64)
    # each point minus its centre, divided by the scale, is standard normal
    z = (x - parameters["means"][labels]) / parameters["scales"][labels, None]
    assert_mean_close(z, torch.zeros(2, dtype=torch.float64))
    assert abs(z.var().item() - 1.0) < 0.03
    # covariance of the mixture is exactly I
    torch.testing.assert_close(torch.cov(x.T), torch.eye(2, dtype=torch.float64), atol=0.04, rtol=0)


# --- Gaussian mixture samples -------------------------------------------------------------------------


def test_gaussian_mixture_moments_and_weights() -> None:
    means = torch.tensor([[0.0, 2.0, -1.0], [3.0, -1.0, 0.5]], dtype=torch.float64)
    scales = torch.tensor([[0.5, 1.0, 0.2], [1.5, 0.3, 0.7]], dtype=torch.float64)
    weights = torch.tensor([3.0, 1.0], dtype=torch.float64)  # normalised to (0.75, 0.25)
    x, labels = gaussian_mixture_samples(40_000, means, scales, weights, generator=0, return_labels=True)
    assert x.shape == (40_000, 3) and x.dtype == torch.float64
    w = weights / weights.sum()
    mean = (w[:, None] * means).sum(0)
    second = (w[:, None] * (means**2 + scales**2)).sum(0)
    assert_mean_close(x, mean)
    assert_mean_close(x**2, second)
    fraction = (labels == 0).double().mean().item()
    assert abs(fraction - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 40_000)
    # reproducible, scalar scale accepted
    assert torch.equal(x, gaussian_mixture_samples(40_000, means, scales, weights, generator=0))
    assert gaussian_mixture_samples(5, means, 0.1).shape == (5, 3)


def test_gaussian_mixture_validation() -> None:
    means = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"shape \(K, D\)"):
        gaussian_mixture_samples(5, torch.zeros(3), 1.0)
    with pytest.raises(ValueError, match=r"scales must .*got shape \(3,\)"):
        gaussian_mixture_samples(5, means, torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_mixture_samples(5, means, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="weights"):
        gaussian_mixture_samples(5, means, 1.0, torch.tensor([0.0, 0.0]))
    with pytest.raises(ValueError, match="unknown mixture 'nope'"):
        mixture_parameters("nope")


# --- digits -------------------------------------------------------------------------------------------


def test_digits_range_labels_and_disjoint_splits() -> None:
    train = load_dataset("digits", "train", seed=3)
    heldout = load_dataset("digits", "test", seed=3)
    assert train.shape == (1, 8, 8) and train.num_classes == 10
    assert len(train) + len(heldout) == 1797 and len(heldout) == round(1797 * 0.2)
    assert train.x.min() == -1.0 and train.x.max() == 1.0
    # pixel values were integers 0..16: (x + 1) * 8 is integral
    assert torch.equal((train.x + 1) * 8, torch.round((train.x + 1) * 8))
    assert set(train.y.tolist()) == set(range(10))
    assert set(train.indices.tolist()).isdisjoint(heldout.indices.tolist())
    assert set(train.indices.tolist()) | set(heldout.indices.tolist()) == set(range(1797))
    # reproducible from the seed, and a different seed splits differently
    again = load_dataset("digits", "train", seed=3)
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    assert not torch.equal(train.indices, load_dataset("digits", "train", seed=4).indices)
    # n takes the first rows of the split; too many is an error naming the size
    assert torch.equal(load_dataset("digits", "train", n=10, seed=3).x, train.x[:10])
    with pytest.raises(ValueError, match="n=2000 exceeds the 1438"):
        load_dataset("digits", "train", n=2000)


# --- toy splits ---------------------------------------------------------------------------------------


def test_toy_splits_are_reproducible_and_disjoint() -> None:
    train = load_dataset("moons", "train", seed=1)
    heldout = load_dataset("moons", "heldout", seed=1)
    assert len(train) == 8000 and len(heldout) == 2000 and train.num_classes == 2
    assert torch.equal(train.x, load_dataset("two_moons", "train", seed=1).x)
    assert not torch.equal(train.x, load_dataset("moons", "train", seed=2).x)
    common = (torch.cdist(train.x.double(), heldout.x.double()) == 0).sum()
    assert common == 0
    assert len(load_dataset("8gaussians", "train", n=123)) == 123
    assert len(load_dataset("pinwheel", "all", n=1000)) == 1000
    # options reach the generator, labels follow them
    wheel = load_dataset("pinwheel", n=500, num_arms=7)
    assert wheel.num_classes == 7 and int(wheel.y.max()) == 6
    # fresh samples from the true distribution, reproducible
    assert train.has_sampler and train.sample(17, 0).shape == (17, 2)
    assert torch.equal(train.sample(17, 0), train.sample(17, 0))
    assert load_dataset("checkerboard").y is None


def test_unknown_dataset_and_bad_arguments() -> None:
    assert {"moons", "digits", "checkerboard", "eight_gaussians", "spirals", "pinwheel", "rings"} <= set(
        available_datasets()
    )
    with pytest.raises(ValueError, match=r"unknown dataset 'mnist-ish'.*'checkerboard'.*'digits'"):
        load_dataset("mnist-ish")
    with pytest.raises(ValueError, match="unknown split 'validation'"):
        load_dataset("moons", "validation")
    with pytest.raises(ValueError, match="heldout_fraction"):
        load_dataset("moons", heldout_fraction=1.0)
    with pytest.raises(ValueError, match="seed"):
        load_dataset("moons", seed=-1)


# --- user files ---------------------------------------------------------------------------------------


def _write_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def test_load_flat_folder_of_grey_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (8, 8), dtype=np.uint8) for _ in range(5)]
    arrays[0][0, 0], arrays[0][0, 1] = 0, 255
    for i, array in enumerate(arrays):
        _write_png(tmp_path / f"img{i}.png", array)
    data = load_folder(tmp_path)
    assert data.x.shape == (5, 1, 8, 8) and data.y is None
    # files are read in sorted order; pixels p map to p/127.5 - 1
    expected = torch.from_numpy(np.stack(arrays)).double()[:, None] / 127.5 - 1
    torch.testing.assert_close(data.x.double(), expected)
    assert data.x[0, 0, 0, 0] == -1.0 and data.x[0, 0, 0, 1] == 1.0
    # resizing makes equal sizes
    assert load_folder(tmp_path, size=(4, 6)).shape == (1, 4, 6)


def test_load_class_folders_rgb(tmp_path: Path) -> None:
    for name, value in (("cat", 10), ("dog", 200)):
        (tmp_path / name).mkdir()
        for i in range(3):
            _write_png(tmp_path / name / f"{i}.png", np.full((4, 4, 3), value, dtype=np.uint8))
    data = load_dataset(str(tmp_path), "all")
    assert data.x.shape == (6, 3, 4, 4) and data.num_classes == 2 and data.class_names == ["cat", "dog"]
    torch.testing.assert_close(data.x[data.y == 1], torch.full((3, 3, 4, 4), 200 / 127.5 - 1))
    train, heldout = load_dataset(tmp_path, "train"), load_dataset(tmp_path, "heldout")
    assert len(train) + len(heldout) == 6
    assert set(train.indices.tolist()).isdisjoint(heldout.indices.tolist())


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image files"):
        load_folder(tmp_path)
    _write_png(tmp_path / "a.png", np.zeros((4, 4), dtype=np.uint8))
    _write_png(tmp_path / "b.png", np.zeros((5, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="b.png.*size"):
        load_folder(tmp_path)


def test_load_npy_npz_and_pt(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(20, 3)).astype(np.float32)
    y = np.arange(20) % 4
    np.save(tmp_path / "x.npy", x)
    np.savez(tmp_path / "xy.npz", x=x, y=y)
    torch.save(torch.from_numpy(x), tmp_path / "x.pt")
    torch.save({"x": torch.from_numpy(x), "y": torch.from_numpy(y), "num_classes": 5}, tmp_path / "xy.pt")

    plain = load_dataset(tmp_path / "x.npy", "all")
    torch.testing.assert_close(plain.x, torch.from_numpy(x))
    assert plain.y is None and plain.shape == (3,)
    labelled = load_dataset(str(tmp_path / "xy.npz"), "all")
    assert torch.equal(labelled.y, torch.from_numpy(y).long()) and labelled.num_classes == 4
    torch.testing.assert_close(load_dataset(tmp_path / "x.pt", "all").x, torch.from_numpy(x))
    from_dict = load_dataset(tmp_path / "xy.pt", "all", dtype=torch.float64)
    assert from_dict.num_classes == 5 and from_dict.x.dtype == torch.float64
    # splits of user files are disjoint and cover the data
    train, heldout = load_dataset(tmp_path / "xy.pt", "train"), load_dataset(tmp_path / "xy.pt", "test")
    assert (len(train), len(heldout)) == (16, 4)
    assert set(train.indices.tolist()) | set(heldout.indices.tolist()) == set(range(20))
    # uint8 arrays are images: scaled to [-1, 1]
    np.save(tmp_path / "img.npy", np.array([[0, 255]], dtype=np.uint8))
    torch.testing.assert_close(load_dataset(tmp_path / "img.npy", "all").x, torch.tensor([[-1.0, 1.0]]))
    torch.save({"images": torch.zeros(2)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="'x'.*found \\['images'\\]"):
        load_dataset(tmp_path / "bad.pt", "all")


# --- batches ------------------------------------------------------------------------------------------


def test_each_epoch_is_a_permutation() -> None:
    data = Dataset(x=torch.arange(10.0)[:, None], y=torch.arange(10) % 3, num_classes=3)
    sampler = batches(data, 3, generator=0)
    assert sampler.batches_per_epoch == 3
    for _ in range(4):  # 4 epochs: each visits 9 distinct samples (the tail of 1 is dropped)
        seen = torch.cat([next(sampler)[0][:, 0] for _ in range(3)])
        assert len(set(seen.tolist())) == 9
    x, y = next(sampler)
    assert torch.equal(y, x[:, 0].long() % 3)  # labels stay with their samples
    short = BatchSampler(data, 4, generator=0, drop_last=False)
    assert [len(next(short)[0]) for _ in range(6)] == [4, 4, 2, 4, 4, 2]


def test_batch_sampler_resumes_exactly() -> None:
    data = Dataset(x=torch.randn(23, 2))
    sampler = BatchSampler(data, 5, generator=torch.Generator().manual_seed(11))
    for _ in range(6):  # into the second epoch (4 batches per epoch)
        next(sampler)
    state = sampler.state_dict()
    expected = [next(sampler)[0] for _ in range(10)]  # crosses two more epoch boundaries

    resumed = BatchSampler(data, 5, generator=12345)
    resumed.load_state_dict(state)
    assert resumed.epoch == 1
    for want in expected:
        assert torch.equal(next(resumed)[0], want)
    # the state survives a round trip through torch.save (a checkpoint)
    with pytest.raises(ValueError, match="batch_size=5"):
        BatchSampler(data, 4).load_state_dict(state)
    with pytest.raises(ValueError, match="23 samples"):
        BatchSampler(torch.randn(30, 2), 5).load_state_dict(state)
    with pytest.raises(ValueError, match="batch_size=50 exceeds the 23"):
        BatchSampler(data, 50)


def test_batch_sampler_state_survives_a_checkpoint(tmp_path: Path) -> None:
    data = Dataset(x=torch.randn(17, 3))
    sampler = BatchSampler(data, 4, generator=5)
    for _ in range(7):
        next(sampler)
    torch.save(sampler.state_dict(), tmp_path / "state.pt")
    expected = [next(sampler)[0] for _ in range(5)]
    resumed = BatchSampler(data, 4)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(next(resumed)[0], want) for want in expected)


# --- one validator for counts and reals ----------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: load_dataset("moons", n=-1), r"n must be an integer >= 0, got n=-1"),
        (lambda: load_dataset("moons", n=2.5), r"n must be an integer >= 0, got n=2.5"),
        (lambda: load_dataset("moons", seed=True), r"seed must be an integer >= 0, got seed=True"),
        (lambda: load_dataset("moons", heldout_fraction=1.0), r"heldout_fraction must be a finite number in \(0, 1\)"),
        (lambda: load_dataset("pinwheel", num_arms=1), r"num_arms must be an integer >= 2, got num_arms=1"),
        (lambda: load_dataset("moons", noise=float("nan")), r"noise must be a finite number >= 0, got noise=nan"),
        (lambda: BatchSampler(torch.randn(8, 2), 0), r"batch_size must be an integer >= 1, got batch_size=0"),
    ],
)
def test_counts_and_reals_go_through_the_one_validator(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()


def test_integral_floats_are_counts_and_other_layers_share_the_validator() -> None:
    import flowdiff as fd

    assert load_dataset("moons", n=10.0).x.shape == (10, 2)  # an integral float is a count
    with pytest.raises(ValueError, match=r"data_shape\[1\] must be an integer >= 1, got data_shape\[1\]=2.5"):
        fd.nn.build_network("mlp", (1, 2.5))  # no silent truncation to 2
    assert fd.nn.build_network("mlp", (np.int64(2),)).dim == 2
    with pytest.raises(ValueError, match=r"max_iter must be an integer >= 1, got max_iter=0"):
        fd.couplings.MinibatchOT("sinkhorn", max_iter=0)
    with pytest.raises(ValueError, match=r"num_projections must be an integer >= 1, got num_projections=0"):
        fd.metrics.sliced_wasserstein(torch.randn(5, 2), torch.randn(5, 2), num_projections=0)
