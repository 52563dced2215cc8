"""Tests of flowdiff.couplings against brute-force optimal transport and structural truths."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from flowdiff.couplings import (
    COUPLINGS,
    Independent,
    LabelledPairs,
    MinibatchOT,
    available_couplings,
    make_coupling,
    sinkhorn_plan,
    squared_distances,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def batch(n: int, d: int = 2, seed: int = 0, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64) + shift


def pair_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Mean squared distance of row-wise pairs."""
    return float((x0 - x1).pow(2).sum(-1).mean())


def brute_force_cost(x0: torch.Tensor, x1: torch.Tensor) -> float:
    """Exact OT cost by enumerating every permutation."""
    cost = squared_distances(x0, x1)
    n = x0.shape[0]
    best = min(sum(float(cost[perm[j], j]) for j in range(n)) for perm in itertools.permutations(range(n)))
    return best / n


def row_set(*tensors: torch.Tensor) -> set[tuple[float, ...]]:
    """The set of concatenated rows (order-free view of a paired batch)."""
    joined = torch.cat([t.reshape(t.shape[0], -1).to(torch.float64) for t in tensors], dim=1)
    return {tuple(round(v, 12) for v in row.tolist()) for row in joined}


# --- exact OT ---------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_ot_equals_brute_force_optimum(n: int, seed: int) -> None:
    x0, x1 = batch(n, 3, seed), batch(n, 3, seed + 100, shift=0.5)
    p0, p1, _ = MinibatchOT("exact").pair(x0, x1)
    assert pair_cost(p0, p1) == pytest.approx(brute_force_cost(x0, x1), rel=1e-12, abs=1e-12)
    # A permutation: every x0 used exactly once, x1 unchanged and in order.
    assert torch.equal(p1, x1)
    assert row_set(p0) == row_set(x0)


def test_exact_ot_cost_below_independent_and_plan_is_permutation() -> None:
    x0, x1 = batch(64, 4, 3), batch(64, 4, 4, shift=1.0)
    p0, p1, _ = MinibatchOT("exact").pair(x0, x1)
    assert pair_cost(p0, p1) <= pair_cost(x0, x1)
    # Strict improvement on random data: the identity pairing is not optimal.
    assert pair_cost(p0, p1) < 0.9 * pair_cost(x0, x1)
    plan = MinibatchOT("exact").plan(x0, x1)
    torch.testing.assert_close(plan.sum(0), torch.full((64,), 1 / 64, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(1), torch.full((64,), 1 / 64, dtype=torch.float64))
    assert int((plan > 0).sum()) == 64


def test_exact_ot_result_is_permutation_invariant() -> None:
    x0, x1 = batch(12, 2, 5), batch(12, 2, 6)
    coupling = MinibatchOT("exact")
    reference = row_set(*coupling.pair(x0, x1)[:2])
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        q0, q1 = torch.randperm(12, generator=g), torch.randperm(12, generator=g)
        assert row_set(*coupling.pair(x0[q0], x1[q1])[:2]) == reference


def test_exact_ot_keeps_labels_attached_and_handles_images() -> None:
    x0 = batch(10, 12, 8).reshape(10, 3, 2, 2)
    x1 = batch(10, 12, 9).reshape(10, 3, 2, 2)
    y = torch.arange(10) * 10
    p0, p1, py = MinibatchOT("exact").pair(x0, x1, y)
    assert p0.shape == x0.shape
    for k in range(10):
        j = int(torch.nonzero((x1 == p1[k]).flatten(1).all(1)).item())
        assert int(py[k]) == int(y[j])


def test_exact_ot_with_replacement_samples_from_the_permutation() -> None:
    x0, x1 = batch(8, 2, 10), batch(8, 2, 11)
    y = torch.arange(8)
    p0, p1, py = MinibatchOT("exact", replace=True).pair(x0, x1, y, torch.Generator().manual_seed(0))
    optimal = row_set(*MinibatchOT("exact").pair(x0, x1)[:2])
    assert row_set(p0, p1) <= optimal  # every drawn pair is an optimal pair
    torch.testing.assert_close(p1, x1[py])


def test_exact_ot_unequal_batch_sizes_uses_the_emd_plan() -> None:
    x0, x1 = batch(6, 2, 12), batch(4, 2, 13)
    plan = MinibatchOT("exact").plan(x0, x1)
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 1 / 4, dtype=torch.float64))
    p0, p1, _ = MinibatchOT("exact").pair(x0, x1, generator=torch.Generator().manual_seed(0))
    assert p0.shape == (4, 2) and p1.shape == (4, 2)


# --- Sinkhorn ----------------------------------------------------------------------------------


def test_sinkhorn_plan_cost_approaches_exact_cost_as_reg_shrinks() -> None:
    n = 24
    x0, x1 = batch(n, 2, 14), batch(n, 2, 15, shift=0.5)
    exact = pair_cost(*MinibatchOT("exact").pair(x0, x1)[:2])
    cost = squared_distances(x0, x1)
    uniform = torch.full((n,), 1 / n, dtype=torch.float64)
    gaps = []
    for reg in (1.0, 0.3, 0.1):
        plan = sinkhorn_plan(cost, reg, max_iter=10000, tol=1e-6)
        torch.testing.assert_close(plan.sum(1), uniform, atol=1e-6, rtol=0)
        torch.testing.assert_close(plan.sum(0), uniform, atol=1e-12, rtol=0)  # exact after each g-update
        gaps.append(float((plan * cost).sum()) - exact)
        # Entropic bound: <π_ε, C> - OT <= ε (H(π_ε) - H(π*)) <= ε log(n²) - ε log(n) = ε log n
        # (slack: a marginal error of 1e-6 moves the cost by at most 1e-6 · max C).
        slack = 1e-6 * float(cost.max())
        assert -slack <= gaps[-1] <= reg * math.log(n) + slack
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[2] < 0.05 * exact


def test_sinkhorn_torch_backend_matches_pot_reference() -> None:
    x0, x1 = batch(16, 3, 18), batch(16, 3, 19, shift=0.3)
    mine = MinibatchOT("sinkhorn", reg=0.5, tol=1e-10, max_iter=20000).plan(x0, x1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # POT warns on its own stopping rule
        pot = MinibatchOT("sinkhorn", reg=0.5, tol=1e-10, max_iter=20000, backend="pot").plan(x0, x1)
    torch.testing.assert_close(mine, pot, atol=1e-8, rtol=1e-5)


def test_sinkhorn_log_domain_survives_large_cost_over_reg() -> None:
    # C/ε ~ 1e5: the plain scaling form underflows to a zero plan here.
    x0, x1 = batch(8, 64, 20) * 3, batch(8, 64, 21) * 3
    plan = sinkhorn_plan(squared_distances(x0, x1), reg=0.01)
    assert torch.isfinite(plan).all()
    exact_plan = MinibatchOT("exact").plan(x0, x1)
    torch.testing.assert_close(plan, exact_plan, atol=1e-6, rtol=0)


def test_sinkhorn_warns_when_not_converged() -> None:
    cost = squared_distances(batch(16, 2, 22), batch(16, 2, 23))
    with pytest.warns(RuntimeWarning, match="did not converge"):
        sinkhorn_plan(cost, reg=0.001, max_iter=3)


def test_sinkhorn_sampled_pairs_are_cheap_and_keep_labels() -> None:
    x0, x1 = batch(48, 2, 16), batch(48, 2, 17, shift=1.0)
    y = torch.arange(48)
    coupling = MinibatchOT("sinkhorn", reg=0.2)
    p0, p1, py = coupling.pair(x0, x1, y, torch.Generator().manual_seed(1))
    exact = pair_cost(*MinibatchOT("exact").pair(x0, x1)[:2])
    assert pair_cost(p0, p1) < 0.5 * (exact + pair_cost(x0, x1))
    torch.testing.assert_close(p1, x1[py])
    assert len(set(zip(py.tolist(), [tuple(r) for r in p0.tolist()]))) == 48  # replace=False: distinct cells


# --- labelled pairs ----------------------------------------------------------------------------


def test_labelled_pairs_pair_only_within_class_and_solve_each_class_exactly() -> None:
    x1 = torch.cat([batch(5, 2, 20, shift=-3.0), batch(4, 2, 21, shift=3.0)])
    y = torch.tensor([0] * 5 + [1] * 4)
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    x1, y = x1[perm], y[perm]
    x0 = batch(9, 2, 22)
    g = torch.Generator().manual_seed(3)
    p0, p1, py = LabelledPairs(MinibatchOT("exact")).pair(x0, x1, y, g)
    # x1 and y keep their order and stay together.
    assert torch.equal(p1, x1) and torch.equal(py, y)
    assert row_set(p0) == row_set(x0)
    # Within each class the pairing is the exact OT of that class's block.
    for c in (0, 1):
        rows = y == c
        assert pair_cost(p0[rows], p1[rows]) == pytest.approx(brute_force_cost(p0[rows], p1[rows]), rel=1e-12)


def test_labelled_pairs_with_labelled_sources_never_cross_classes() -> None:
    x0 = torch.cat([batch(4, 2, 30, shift=10.0), batch(4, 2, 31, shift=-10.0)])
    y0 = torch.tensor([0] * 4 + [1] * 4)
    x1 = torch.cat([batch(4, 2, 32, shift=-10.0), batch(4, 2, 33, shift=10.0)])
    y = torch.tensor([0] * 4 + [1] * 4)  # class 0 sits near x0's class 1, and vice versa
    p0, p1, py = LabelledPairs().pair(x0, x1, y, y0=y0)
    # Plain OT would match by proximity (across classes); per-class OT keeps classes apart.
    for k in range(8):
        j0 = int(torch.nonzero((x0 == p0[k]).all(1)).item())
        assert int(y0[j0]) == int(py[k])
    p0_plain, _, _ = MinibatchOT().pair(x0, x1, y)
    assert pair_cost(p0_plain, x1) < pair_cost(p0, p1)


def test_labelled_pairs_without_labels_is_the_inner_coupling() -> None:
    x0, x1 = batch(6, 2, 40), batch(6, 2, 41)
    a = LabelledPairs().pair(x0, x1)
    b = MinibatchOT().pair(x0, x1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] is None


def test_labelled_pairs_multidimensional_labels() -> None:
    x0, x1 = batch(6, 2, 42), batch(6, 2, 43)
    y = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1], [1, 0], [0, 1]])
    p0, p1, py = LabelledPairs().pair(x0, x1, y, torch.Generator().manual_seed(0))
    assert torch.equal(p1, x1) and torch.equal(py, y)
    assert row_set(p0) == row_set(x0)
    for label in ([1, 0], [0, 1]):
        rows = (y == torch.tensor(label)).all(1)
        assert pair_cost(p0[rows], p1[rows]) == pytest.approx(brute_force_cost(p0[rows], p1[rows]), rel=1e-12)


# --- independent, registry, errors -------------------------------------------------------------


def test_independent_returns_the_batch_unchanged() -> None:
    x0, x1, y = batch(5, 2, 50), batch(5, 2, 51), torch.arange(5)
    p0, p1, py = Independent().pair(x0, x1, y)
    assert p0 is x0 and p1 is x1 and py is y


def test_make_coupling_builds_every_name() -> None:
    assert available_couplings() == COUPLINGS
    x0, x1, y = batch(6, 2, 52), batch(6, 2, 53), torch.tensor([0, 1, 0, 1, 0, 1])
    for name in COUPLINGS:
        c = make_coupling(name, reg=0.05)
        p0, p1, py = c.pair(x0, x1, y, torch.Generator().manual_seed(0))
        assert p0.shape == x0.shape and py.shape == y.shape
        torch.testing.assert_close(p1, x1[torch.tensor([int(torch.nonzero((x1 == r).all(1)).item()) for r in p1])])


def test_config_round_trip() -> None:
    from flowdiff.couplings import coupling_from_config

    for coupling in (Independent(), MinibatchOT("sinkhorn", reg=0.3, replace=True), LabelledPairs(MinibatchOT())):
        rebuilt = coupling_from_config(coupling.config())
        assert type(rebuilt) is type(coupling) and rebuilt.config() == coupling.config()
    with pytest.raises(ValueError, match="unknown coupling config name"):
        coupling_from_config({"name": "Greedy"})


def test_errors_name_the_bad_value() -> None:
    with pytest.raises(ValueError, match="unknown OT method 'hungarian'.*exact, sinkhorn"):
        MinibatchOT("hungarian")
    with pytest.raises(ValueError, match="reg"):
        MinibatchOT("sinkhorn", reg=0.0)
    with pytest.raises(ValueError, match="unknown Sinkhorn backend 'numpy'.*torch, pot"):
        MinibatchOT("sinkhorn", backend="numpy")
    with pytest.raises(ValueError, match="unknown coupling 'ot2'.*independent"):
        make_coupling("ot2")
    with pytest.raises(ValueError, match="batch size 4"):
        MinibatchOT().pair(batch(4), batch(4), torch.arange(3))
    with pytest.raises(ValueError, match="same per-sample shape"):
        MinibatchOT().pair(batch(4, 2), batch(4, 3))
    with pytest.raises(ValueError, match="same batch size, got 4 and 5"):
        Independent().pair(batch(4), batch(5))
    with pytest.raises(TypeError, match="Coupling"):
        LabelledPairs("exact")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="per-class counts must match"):
        LabelledPairs().pair(batch(4), batch(4), torch.tensor([0, 0, 0, 1]), y0=torch.tensor([0, 0, 1, 1]))
