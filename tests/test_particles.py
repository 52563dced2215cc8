"""flowdiff.particles: weights, ESS and resampling against exact expectations; non-finite weights reported."""

import math

import pytest
import torch

from flowdiff.particles import (
    check_log_weights,
    effective_sample_size,
    log_normalize,
    multinomial_resample,
    normalize_log_weights,
    principal_order,
    resample,
    systematic_resample,
)

F64 = torch.float64
pytestmark = pytest.mark.usefixtures("one_thread")


def test_normalize_and_ess_exact_values():
    lw = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.0, math.log(3.0), -1e4, -1e4]], dtype=F64)
    w = normalize_log_weights(lw)
    torch.testing.assert_close(w[1, :2], torch.tensor([0.25, 0.75], dtype=F64))
    torch.testing.assert_close(effective_sample_size(lw), torch.tensor([4.0, 1 / (0.25**2 + 0.75**2)], dtype=F64))
    big = torch.tensor([1000.0, 1000.0], dtype=F64)  # no overflow
    torch.testing.assert_close(normalize_log_weights(big), torch.full((2,), 0.5, dtype=F64))
    torch.testing.assert_close(torch.logsumexp(log_normalize(torch.randn(7, dtype=F64)), 0), torch.tensor(0.0, dtype=F64))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_non_finite_log_weights_are_reported_not_zeroed(bad):
    lw = torch.tensor([0.0, 1.0, bad, 2.0], dtype=F64)
    with pytest.raises(FloatingPointError, match=r"1 non-finite value\(s\) \(first at index \(2,\)"):
        normalize_log_weights(lw)
    with pytest.raises(FloatingPointError):
        systematic_resample(lw, 4)
    with pytest.raises(FloatingPointError):
        effective_sample_size(lw)


def test_zero_weights_only_when_allowed_and_never_all():
    lw = torch.tensor([0.0, -math.inf, 0.0], dtype=F64)
    w = normalize_log_weights(lw, allow_zero=True)
    torch.testing.assert_close(w, torch.tensor([0.5, 0.0, 0.5], dtype=F64))
    idx = systematic_resample(lw, 100, allow_zero=True)
    assert not (idx == 1).any()
    with pytest.raises(FloatingPointError, match="collapsed"):
        normalize_log_weights(torch.full((3,), -math.inf, dtype=F64), allow_zero=True)
    with pytest.raises(FloatingPointError, match="NaN|nan"):
        check_log_weights(torch.tensor([math.nan], dtype=F64), allow_zero=True)


@pytest.mark.parametrize("ordered", [False, True])
def test_systematic_counts_within_one_and_unbiased(ordered):
    g = torch.Generator().manual_seed(0)
    lw = torch.randn(3, 40, generator=g, dtype=F64)
    w = normalize_log_weights(lw)
    order = torch.argsort(torch.randn(3, 40, generator=g), dim=1) if ordered else None
    total = torch.zeros(3, 40, dtype=F64)
    reps = 2000
    for _ in range(reps):
        idx = systematic_resample(lw, 40, g, order)
        counts = torch.stack([torch.bincount(r, minlength=40) for r in idx]).to(F64)
        assert torch.all(counts >= torch.floor(40 * w) - 1e-9) and torch.all(counts <= torch.ceil(40 * w) + 1e-9)
        total += counts
    torch.testing.assert_close(total / reps / 40, w, atol=3e-3, rtol=0)


def test_multinomial_is_unbiased_and_reproducible():
    lw = torch.log(torch.tensor([0.1, 0.2, 0.7], dtype=F64))
    idx = multinomial_resample(lw, 200_000, torch.Generator().manual_seed(1))
    freq = torch.bincount(idx, minlength=3).to(F64) / idx.numel()
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.7], dtype=F64), atol=4e-3, rtol=0)
    again = resample(lw, 200_000, "multinomial", torch.Generator().manual_seed(1))
    assert torch.equal(idx, again)
    with pytest.raises(ValueError, match="scheme"):
        resample(lw, 3, "stratified-typo")


def test_principal_order_keeps_modes_together():
    g = torch.Generator().manual_seed(2)
    pts = torch.cat([torch.randn(30, 3, generator=g) - 5, torch.randn(70, 3, generator=g) + 5]).to(F64)
    perm = torch.randperm(100, generator=g)
    pts = pts[perm]
    order = principal_order(pts)
    labels = (pts[order, 0] > 0).to(torch.int64)
    assert int((labels[1:] != labels[:-1]).sum()) == 1  # one switch between the two clusters
    # ordered systematic resampling gives each cluster its share to within one copy
    lw = torch.zeros(100, dtype=F64)
    lw[pts[:, 0] > 0] = math.log(0.5 / 70) - math.log(0.5 / 30)
    idx = systematic_resample(lw, 10, torch.Generator().manual_seed(3), order)
    assert int((pts[idx, 0] > 0).sum()) == 5


def test_shape_errors():
    with pytest.raises(ValueError, match="shape"):
        systematic_resample(torch.zeros(2, 2, 2, dtype=F64), 3)
    with pytest.raises(ValueError, match="num"):
        systematic_resample(torch.zeros(5, dtype=F64), 0)
    with pytest.raises(TypeError):
        check_log_weights([0.0, 1.0])
