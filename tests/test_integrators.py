"""flowdiff.solvers.integrators against closed-form solutions of linear ODEs."""

from __future__ import annotations

import math

import pytest
import torch

from flowdiff.solvers.integrators import (
    DOPRI5,
    TABLEAUS,
    adams_pec,
    adams_per_sample,
    dopri5_global,
    dopri5_per_sample,
    lagrange_weights,
    rk_step,
)

pytestmark = pytest.mark.usefixtures("one_thread")

RATES = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64)


def _f(s, y):
    """dy/ds = -r y (x part) and dℓ/ds = -Σ r (a log-determinant-like scalar), per sample."""
    x, _ = y
    r = RATES[: x.shape[0]].reshape(-1, 1)
    return (-r * x, -(r * torch.ones_like(x)).sum(-1))


def _exact(s):
    x = torch.exp(-RATES * s).reshape(-1, 1).expand(3, 2)
    return x, -2 * RATES * s


@pytest.mark.parametrize("name", sorted(TABLEAUS))
def test_runge_kutta_tableaus_converge_at_their_order(name):
    tab = TABLEAUS[name]
    assert all(abs(sum(row) - c) < 1e-15 for row, c in zip(tab.a, tab.c) if row)
    errors = []
    for n in (10, 20):
        y = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
        for i in range(n):
            y, _ = rk_step(_f, i / n, y, 1.0 / n, tab, s_next=(i + 1) / n)
        errors.append(float((y[0] - _exact(1.0)[0]).abs().max()))
    assert errors[0] / errors[1] == pytest.approx(2**tab.order, rel=0.15)


def test_dopri5_drivers_reach_the_tolerance_and_the_end():
    y0 = (torch.ones(3, 2, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    assert abs(sum(DOPRI5.e)) < 1e-15 and abs(sum(DOPRI5.b) - 1) < 1e-15
    seen = []
    y = dopri5_global(_f, 0.0, 1.0, y0, rtol=1e-8, atol=1e-8, on_accept=lambda i, s, y: seen.append(s))
    assert seen[-1] == 1.0 and all(a < b for a, b in zip(seen, seen[1:]))
    torch.testing.assert_close(y[0], _exact(1.0)[0], rtol=0, atol=1e-7)
    torch.testing.assert_close(y[1], _exact(1.0)[1], rtol=0, atol=1e-7)
    calls = []
    y, steps = dopri5_per_sample(
        lambda s, y, idx: (calls.append(len(idx)), _f(s, (y[0], y[1])) if len(idx) == 3 else _sub(s, y, idx))[1],
        0.0, 1.0, y0, rtol=1e-8, atol=1e-8, max_calls=10_000,
    )
    torch.testing.assert_close(y[0], _exact(1.0)[0], rtol=0, atol=1e-7)
    # the stiffest sample takes the most steps; the others stop calling the field earlier
    assert steps[2] > steps[0] and min(calls) < 3
    with pytest.raises(RuntimeError, match="nfe=8"):
        dopri5_per_sample(lambda s, y, idx: _sub(s, y, idx), 0.0, 1.0, y0, rtol=1e-8, atol=1e-8, max_calls=8)


def _sub(s, y, idx):
    r = RATES[idx].reshape(-1, 1)
    return (-r * y[0], -(r * torch.ones_like(y[0])).sum(-1))


def test_adams_pec_converges_and_integrates_the_side_quantity():
    def run(n):
        nodes = [i / n for i in range(n + 1)]
        return adams_pec(lambda i, y: (-y, -2 * torch.ones(1, dtype=torch.float64)), nodes, torch.ones(1, 2, dtype=torch.float64))

    (y1, q1), (y2, _) = run(20), run(40)
    e1, e2 = abs(float(y1[0, 0]) - math.exp(-1)), abs(float(y2[0, 0]) - math.exp(-1))
    assert e1 / e2 > 7  # third order at least: the start-up steps (orders 1, 2) have no history
    assert float(q1) == pytest.approx(-2.0, abs=1e-12)
    # Lagrange weights integrate polynomials of their degree exactly
    w = lagrange_weights([0.0, 0.3, 0.7, 1.0], 0.0, 1.0)
    assert sum(wj * x**3 for wj, x in zip(w, [0.0, 0.3, 0.7, 1.0])) == pytest.approx(0.25, abs=1e-14)


def _rate_error(rates):
    def error(s, h, y_c, y_p, k, dq, idx):
        return (y_c - y_p).abs().reshape(len(idx), -1).amax(-1) + dq.abs()
    return error


def test_adams_per_sample_reaches_its_tolerance_with_a_step_per_sample():
    # dy/ds = -r y, dq/ds = -r (a log-det-like side quantity), per-sample rates over two decades
    rates = torch.tensor([0.5, 5.0, 50.0], dtype=torch.float64)

    def f(s, y, idx):
        r = rates[idx].reshape(-1, 1)
        return -r * y, -rates[idx]

    y0 = torch.ones(3, 2, dtype=torch.float64)
    errs, calls_by_tol = [], []
    for tol in (1e-4, 1e-7):
        y, q, steps, calls, est = adams_per_sample(f, 0.0, 1.0, y0, torch.zeros(3, dtype=torch.float64), error=_rate_error(rates),
                                                   tol=tol, max_calls=5000, order=5, per_unit_step=False)
        exact = torch.exp(-rates).reshape(-1, 1)
        errs.append(float((y - exact).abs().max()))
        torch.testing.assert_close(q, -rates, rtol=0, atol=1e-12)  # polynomial-exact quadrature of a constant
        assert (calls >= steps + 1).all() and (steps[1:] >= steps[:-1]).all()  # rejected tries cost calls; stiffer: more steps
        assert (est >= 0).all()
        calls_by_tol.append(calls)
    assert errs[1] < errs[0] / 100 and errs[1] < 1e-6
    assert (calls_by_tol[1] > calls_by_tol[0]).all()
    # each sample's steps are its own: the slow sample alone takes the same steps
    y_alone, _, steps_alone, _, _ = adams_per_sample(lambda s, y, idx: f(s, y, idx[:1] * 0), 0.0, 1.0, y0[:1],
                                                     torch.zeros(1, dtype=torch.float64), error=_rate_error(rates), tol=1e-4,
                                                     max_calls=5000, order=5, per_unit_step=False)
    y_all, _, steps_all, _, _ = adams_per_sample(f, 0.0, 1.0, y0, torch.zeros(3, dtype=torch.float64), error=_rate_error(rates),
                                                 tol=1e-4, max_calls=5000, order=5, per_unit_step=False)
    assert int(steps_alone[0]) == int(steps_all[0])
    torch.testing.assert_close(y_alone[0], y_all[0], rtol=0, atol=1e-14)
    with pytest.raises(RuntimeError, match="nfe=5"):
        adams_per_sample(f, 0.0, 1.0, y0, torch.zeros(3, dtype=torch.float64), error=_rate_error(rates), tol=1e-9, max_calls=5)
    with pytest.raises(ValueError, match="order"):
        adams_per_sample(f, 0.0, 1.0, y0, torch.zeros(3, dtype=torch.float64), error=_rate_error(rates), tol=1e-4, max_calls=50,
                         order=6)
