r"""Generic explicit integrators of :math:`\frac{dy}{ds} = f(s, y)`, shared by the samplers and the likelihood.

Nothing here knows about paths or fields: ``s`` is whatever variable the caller integrates in
(``t``, :math:`\tilde\sigma`, the flow time τ), and ``f(s, y)`` is the caller's right-hand side.
The state ``y`` is a tensor or a tuple of tensors with the **batch first** in every component (the
likelihood's augmented state ``(x, ℓ)``: ``x`` of shape ``(B, *S)``, ``ℓ`` of shape ``(B,)`` or
``(B, P)``); ``f`` returns the same structure. A step size is a float, or a per-sample ``(B,)``
tensor (broadcast over each component's trailing dimensions).

**Runge–Kutta tableaus** (Butcher 2016, "Numerical Methods for Ordinary Differential Equations"):
:data:`EULER`, :data:`MIDPOINT`, :data:`HEUN`, :data:`KUTTA3` (Kutta's third-order rule),
:data:`RK4`, and the embedded pair :data:`DOPRI5` (Dormand & Prince 1980, "A family of embedded
Runge–Kutta formulae", 5(4), first-same-as-last) with its error weights ``e = b − b̂``.
:func:`rk_step` takes one explicit step with any of them.

**Adaptive Dormand–Prince 5(4)**, two drivers on one attempted step (:func:`dopri5_attempt`):

* :func:`dopri5_global`: one step size for the whole batch; error
  :math:`\mathrm{RMS}\big(e / (\mathrm{atol} + \mathrm{rtol}\max(|y|, |y'|))\big)` over every entry,
  Hairer's initial step (Hairer, Nørsett & Wanner 1993, "Solving ODEs I", II.4), the standard
  controller :math:`h \leftarrow h\min(10, \max(0.2, 0.9\,\mathrm{err}^{-1/5}))`.
* :func:`dopri5_per_sample`: each sample has its own time and step, so one stiff sample never
  shrinks the steps of the others; error per sample = the RMS over the first component (the state)
  and the largest entry of the others (scalar integrals such as log-determinants), a PI controller
  (Gustafsson 1991; Hairer & Wanner 1996, "Solving ODEs II", IV.2) and steps that never pass the end
  and never leave a sliver (when less than two steps remain the rest is split evenly).

**Adams predictor–corrector** (:func:`adams_pec`; Hairer, Nørsett & Wanner, "Solving ODEs I",
§III.1): variable-step Adams–Bashforth(3) predictor, Adams–Moulton(4) corrector in PEC mode, ONE
evaluation per node, the weights being exact integrals of the Lagrange interpolants through the
previous nodes (:func:`lagrange_weights`). A second output of ``f`` that does not feed back into
the state (a log-determinant) is integrated by composite Lagrange quadrature over all nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "DOPRI5",
    "EULER",
    "HEUN",
    "KUTTA3",
    "LOWER_ORDER",
    "MIDPOINT",
    "RK4",
    "TABLEAUS",
    "StepSizeUnderflowError",
    "Tableau",
    "adams_pec",
    "adams_plan",
    "combine",
    "dopri5_attempt",
    "dopri5_global",
    "dopri5_per_sample",
    "lagrange_weights",
    "quadrature_weights",
    "rk_step",
]

State = Tensor | tuple[Tensor, ...]
Step = float | Tensor


@dataclass(frozen=True)
class Tableau:
    """A Butcher tableau: nodes ``c``, lower-triangular rows ``a``, weights ``b``; ``e = b − b̂``
    for an embedded pair (else ``None``)."""

    name: str
    order: int
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    e: tuple[float, ...] | None = None

    @property
    def stages(self) -> int:
        return len(self.c)


EULER = Tableau("euler", 1, (0.0,), ((),), (1.0,))
MIDPOINT = Tableau("midpoint", 2, (0.0, 0.5), ((), (0.5,)), (0.0, 1.0))
HEUN = Tableau("heun", 2, (0.0, 1.0), ((), (1.0,)), (0.5, 0.5))
KUTTA3 = Tableau("kutta3", 3, (0.0, 0.5, 1.0), ((), (0.5,), (-1.0, 2.0)), (1 / 6, 2 / 3, 1 / 6))
RK4 = Tableau(
    "rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6)
)
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = Tableau(
    "dopri5", 5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    (
        (),
        (1 / 5,),
        (3 / 40, 9 / 40),
        (44 / 45, -56 / 15, 32 / 9),
        (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
        (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
        _DP_B[:6],  # FSAL: the last stage is evaluated at the 5th-order solution
    ),
    _DP_B, tuple(b5 - b4 for b5, b4 in zip(_DP_B, _DP_B4)),
)
#: The fixed-step tableaus by name.
TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN, KUTTA3, RK4)}
#: Lower-order rules by number of stages, for a first step that gets fewer evaluations than the others.
LOWER_ORDER = {1: EULER, 2: MIDPOINT, 3: KUTTA3}


class StepSizeUnderflowError(FloatingPointError):
    """An adaptive step size shrank below round-off (the field is non-finite or discontinuous there)."""


# =========================================================================================
# Linear combinations of (tuple) states and one Runge–Kutta step
# =========================================================================================


def _coef(h: Step, c: float, like: Tensor) -> float | Tensor:
    if isinstance(h, Tensor):  # per-sample steps (B,): broadcast over the trailing dimensions
        return c * h.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.ndim - 1)))
    return h * c


def increment(h: Step, coeffs: Sequence[float], ks: Sequence[State]) -> State:
    """:math:`\\sum_j (h\\,c_j)\\,k_j` over the non-zero coefficients (needs at least one); with
    per-sample steps :math:`h\\sum_j c_j k_j` (see :func:`combine` on rounding orders)."""
    if isinstance(ks[0], tuple):
        return tuple(increment(h, coeffs, [k[i] for k in ks]) for i in range(len(ks[0])))  # type: ignore[index]
    if isinstance(h, Tensor):
        return _coef(h, 1.0, ks[0]) * sum(c * k for c, k in zip(coeffs, ks) if c != 0.0)  # type: ignore[operator]
    return sum(_coef(h, c, k) * k for c, k in zip(coeffs, ks) if c != 0.0)  # type: ignore[operator,return-value]


def combine(y: State, h: Step, coeffs: Sequence[float], ks: Sequence[State]) -> State:
    """:math:`y + \\sum_j (h\\,c_j)\\,k_j` (zero coefficients skipped).

    With a scalar step the terms are added to ``y`` one after the other, with per-sample steps
    they are summed first: the two rounding orders of the samplers and of the likelihood before
    the integrators were shared (kept so that both reproduce their earlier results bit for bit).
    """
    if isinstance(y, tuple):
        return tuple(combine(yc, h, coeffs, [k[i] for k in ks]) for i, yc in enumerate(y))  # type: ignore[index]
    if isinstance(h, Tensor):
        terms = [_coef(h, c, k) * k for c, k in zip(coeffs, ks) if c != 0.0]  # type: ignore[operator]
        return y + sum(terms) if terms else y
    out = y
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = out + _coef(h, c, k) * k  # type: ignore[operator]
    return out


def rk_step(
    f: Callable[[Step, State], State],
    s: Step,
    y: State,
    h: Step,
    tableau: Tableau,
    *,
    s_next: Step | None = None,
    k1: State | None = None,
) -> tuple[State, list[State]]:
    """One explicit Runge–Kutta step from ``(s, y)`` of size ``h``: ``(y_next, [k_1 … k_m])``.

    Stage ``i`` is evaluated at ``s + c_i h``; with ``s_next`` the stages with ``c_i = 1`` are
    evaluated exactly at ``s_next`` (no round-off of ``s + h``). ``k1``: ``f(s, y)`` when already
    known (first-same-as-last).
    """
    ks: list[State] = []
    for i, ci in enumerate(tableau.c):
        if i == 0 and k1 is not None:
            ks.append(k1)
            continue
        yi = combine(y, h, tableau.a[i], ks)
        si = s_next if (s_next is not None and ci == 1.0) else s + ci * h
        ks.append(f(si, yi))
    return combine(y, h, tableau.b, ks), ks


# =========================================================================================
# Dormand–Prince 5(4)
# =========================================================================================


def dopri5_attempt(
    f: Callable[[Step, State], State], s: Step, y: State, h: Step, k1: State, *, s_end: Step | None = None
) -> tuple[State, list[State], State]:
    """One attempted Dormand–Prince step: ``(y5, [k_1 … k_7], error vector e·h)``; ``k_7 = f(s+h, y5)``
    is the next step's ``k_1`` when the step is accepted. ``s_end``: the exact time of the ``c = 1``
    stages (a step that lands on the end)."""
    y_new, ks = rk_step(f, s, y, h, DOPRI5, s_next=s_end, k1=k1)
    return y_new, ks, increment(h, DOPRI5.e, ks)  # type: ignore[arg-type]


def _parts(y: State) -> tuple[Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def dopri5_global(
    f: Callable[[float, State], State],
    s0: float,
    s1: float,
    y: State,
    *,
    rtol: float,
    atol: float,
    first_step: float | None = None,
    safety: float = 0.9,
    on_accept: Callable[[int, float, State], None] | None = None,
    time_of: Callable[[float], float] = float,
) -> State:
    """Adaptive Dormand–Prince 5(4) from ``s0`` to ``s1`` with one step size for the batch (module
    docstring). ``f`` counts and caps its own evaluations; ``on_accept(step, s, y)`` after every
    accepted step; ``time_of(s)`` names the time in error messages. Stages never pass ``s1``."""

    def rms(parts: Sequence[Tensor]) -> float:
        flat = torch.cat([p.reshape(-1).to(torch.float64) for p in parts])
        return float(torch.sqrt(torch.mean(flat**2)))

    def scaled(u: State, a: State, b: State) -> list[Tensor]:
        return [ui / (atol + rtol * torch.maximum(ai.abs(), bi.abs())) for ui, ai, bi in zip(_parts(u), _parts(a), _parts(b))]

    direction = 1.0 if s1 > s0 else -1.0
    span = abs(s1 - s0)
    k1 = f(s0, y)
    if first_step is None:
        d0, d1 = rms(scaled(y, y, y)), rms(scaled(k1, y, y))
        h0 = 1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1
        h0 = min(h0, span)
        k_probe = f(s0 + direction * h0, combine(y, direction * h0, (1.0,), [k1]))
        diff = [a - b for a, b in zip(_parts(k_probe), _parts(k1))]
        d2 = rms(scaled(tuple(diff) if isinstance(y, tuple) else diff[0], y, y)) / h0
        h1 = max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5)
        h = min(100 * h0, h1)
    else:
        h = float(first_step)
    s, step = s0, 0
    while direction * (s1 - s) > 0:
        h = min(h, span)
        last = direction * (s1 - (s + direction * h)) <= 1e-12 * span
        hs = (s1 - s) if last else direction * h
        y_new, ks, err_vec = dopri5_attempt(f, s, y, hs, k1, s_end=s1 if last else None)
        err = rms(scaled(err_vec, y, y_new))
        if not math.isfinite(err):
            raise FloatingPointError(f"dopri5: non-finite error estimate at t={time_of(s)!r}")
        if err <= 1.0:
            s = s1 if last else s + hs
            y, k1 = y_new, ks[6]
            if on_accept is not None:
                on_accept(step, s, y)
            step += 1
        factor = 10.0 if err == 0.0 else min(10.0, max(0.2, safety * err ** (-1 / 5)))
        h = abs(hs) * factor
    return y


def _per_sample_error(err: State, y: State, y_new: State, rtol: float, atol: float) -> Tensor:
    """Per-sample error ratio (float64, CPU): RMS over the first component, max over the others."""
    ratios = []
    for i, (e, a, b) in enumerate(zip(_parts(err), _parts(y), _parts(y_new))):
        r = e.abs() / (atol + rtol * torch.maximum(a.abs(), b.abs()))
        r = r.reshape(r.shape[0], -1)
        ratios.append((r.double().pow(2).mean(-1).sqrt() if i == 0 else r.double().max(-1).values).cpu())
    out = torch.stack(ratios).max(0).values
    return torch.where(torch.isfinite(out), out, torch.full_like(out, 1e10))


def dopri5_per_sample(
    f: Callable[[Tensor, State, Tensor], State],
    s0: float,
    s1: float,
    y: State,
    *,
    rtol: float,
    atol: float,
    max_calls: int,
    first_step: float = 0.02,
    on_step: Callable[[Tensor, Tensor, State], None] | None = None,
    time_of: Callable[[Tensor], Tensor] = lambda s: s,
) -> tuple[State, Tensor]:
    """Adaptive Dormand–Prince 5(4) with a time and a step per sample (module docstring).

    ``f(s, y, index)``: the right-hand side for the samples ``index`` (a device tensor of batch
    indices) at their times ``s`` (float64 CPU ``(n,)``), ``y`` holding just those samples.
    ``max_calls``: cap on calls of ``f`` (a RuntimeError beyond it); ``on_step(s, index, y)`` after
    every attempted step with the active samples' state. Returns ``(y at s1, accepted steps per
    sample)``. Raises :class:`StepSizeUnderflowError` when a step shrinks below round-off.
    """
    parts = _parts(y)
    batch, device = parts[0].shape[0], parts[0].device
    direction = 1.0 if s1 > s0 else -1.0
    span = abs(s1 - s0)
    s = torch.full((batch,), s0, dtype=torch.float64)
    h = torch.full((batch,), direction * min(first_step, span), dtype=torch.float64)
    err_prev = torch.ones(batch, dtype=torch.float64)
    steps = torch.zeros(batch, dtype=torch.long)
    y = tuple(p.clone() for p in parts) if isinstance(y, tuple) else y.clone()
    k1 = f(s.clone(), y, torch.arange(batch, device=device))
    calls = 1
    active = torch.ones(batch, dtype=torch.bool)

    def take(v: State, idx: Tensor) -> State:
        return tuple(p[idx] for p in v) if isinstance(v, tuple) else v[idx]

    def put(dst: State, idx: Tensor, new: State, old: State, mask: Tensor) -> None:
        for d, n, o in zip(_parts(dst), _parts(new), _parts(old)):
            d[idx] = torch.where(mask.reshape(-1, *([1] * (n.ndim - 1))), n, o)

    while bool(active.any()):
        if calls + 6 > max_calls:
            raise RuntimeError(
                f"dopri5 needed more than nfe={max_calls} model evaluations ({int(active.sum())} of {batch} samples "
                "unfinished); loosen rtol/atol or raise nfe"
            )
        ia = active.nonzero().squeeze(1)
        ia_dev = ia.to(device)
        sa, ha = s[ia], h[ia]
        remaining = s1 - sa
        if bool((ha.abs() < 1e-14 * span).any()):
            raise StepSizeUnderflowError(
                f"dopri5: the step size underflowed near t={float(time_of(sa).min()):.6g} (the field is "
                "non-finite or discontinuous there)"
            )
        stretch = remaining.abs() <= ha.abs()
        halve = ~stretch & (remaining.abs() <= 2 * ha.abs())
        ha = torch.where(stretch, remaining, torch.where(halve, 0.5 * remaining, ha))
        ya = take(y, ia_dev)
        end = torch.where(stretch, torch.full_like(sa, s1), sa + ha)
        y_new, ks, err_vec = dopri5_attempt(
            lambda si, yi: f(si, yi, ia_dev), sa, ya, ha, take(k1, ia_dev), s_end=end
        )
        calls += 6
        err = _per_sample_error(err_vec, ya, y_new, rtol, atol)
        accept = err <= 1.0
        acc_dev = accept.to(device)
        safe_err = err.clamp_min(1e-10)
        factor = 0.9 * safe_err.pow(-0.7 / 5) * err_prev[ia].clamp_min(1e-10).pow(0.4 / 5)
        factor = torch.where(accept, factor.clamp(0.2, 5.0), (0.9 * safe_err.pow(-1 / 5)).clamp(0.1, 0.9))
        put(y, ia_dev, y_new, ya, acc_dev)
        put(k1, ia_dev, ks[6], ks[0], acc_dev)
        new_s = torch.where(accept, torch.where(stretch, torch.full_like(sa, s1), sa + ha), sa)
        s[ia] = new_s
        h[ia] = ha * factor
        err_prev[ia] = torch.where(accept, safe_err, err_prev[ia])
        steps[ia] += accept.long()
        active[ia] = ~(accept & (stretch | ((s1 - new_s).abs() <= 1e-12 * span)))
        if on_step is not None:
            on_step(sa, ia_dev, take(y, ia_dev))
    return y, steps


# =========================================================================================
# Adams predictor–corrector
# =========================================================================================


def lagrange_weights(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Weights ``w`` with :math:`\\int_a^b P = \\sum_j w_j f_j`, ``P`` interpolating ``f`` at ``nodes``."""
    z = np.asarray(nodes, dtype=np.float64)
    center = 0.5 * (z.max() + z.min())
    scale = max(float(np.ptp(z)), abs(b - a), 1e-300)
    zs = (z - center) / scale
    za, zb = (a - center) / scale, (b - center) / scale
    weights = np.empty(len(zs))
    P = np.polynomial.polynomial
    for j in range(len(zs)):
        others = np.delete(zs, j)
        coef = P.polyfromroots(others) / np.prod(zs[j] - others) if len(others) else np.array([1.0])
        integral = P.polyint(coef)
        weights[j] = (P.polyval(zb, integral) - P.polyval(za, integral)) * scale
    return weights.tolist()


def adams_plan(nodes: Sequence[float], order_pred: int = 3, order_corr: int = 4) -> list[tuple[int, list[float], int, list[float]]]:
    """Per step ``i``: ``(k_p, predictor weights on the last k_p nodes, k_c, corrector weights on the
    last k_c nodes including node i+1)``; the orders grow from 1 and 2 at the start."""
    plan = []
    for i in range(len(nodes) - 1):
        kp = min(order_pred, i + 1)
        kc = min(order_corr, i + 2)
        plan.append((
            kp, lagrange_weights(nodes[i - kp + 1 : i + 1], nodes[i], nodes[i + 1]),
            kc, lagrange_weights(nodes[i + 2 - kc : i + 2], nodes[i], nodes[i + 1]),
        ))
    return plan


def quadrature_weights(nodes: Sequence[float], order: int = 6) -> list[float]:
    """Composite Lagrange quadrature: weight of each node in :math:`\\int_{s_0}^{s_N}`, each interval
    integrated with the ``order`` nodes around it."""
    n = len(nodes)
    quad = np.zeros(n)
    q = min(order, n)
    for i in range(n - 1):
        lo = max(0, min(i - (q // 2 - 1), n - q))
        idx = list(range(lo, lo + q))
        quad[idx] += lagrange_weights([nodes[j] for j in idx], nodes[i], nodes[i + 1])
    return quad.tolist()


def adams_pec(
    f: Callable[[int, Tensor], tuple[Tensor, Tensor]],
    nodes: Sequence[float],
    y: Tensor,
    *,
    on_step: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Adams–Bashforth(3)/Adams–Moulton(4) PEC over ``nodes``, one call of ``f`` per node.

    ``f(i, y) -> (dy/ds, q)`` at node ``i``; ``q`` does not feed back and is integrated by
    :func:`quadrature_weights`. ``on_step(i, predicted, corrected, ∫q so far)`` after step ``i``.
    Returns ``(y at the last node, ∫ q ds)``.
    """
    plan, quad = adams_plan(nodes), quadrature_weights(nodes)
    k, g = f(0, y)
    history = [k]
    total = quad[0] * g
    for i, (kp, wp, kc, wc) in enumerate(plan):
        pred = y + sum(w * kj for w, kj in zip(wp, history[-kp:]))
        k_new, g_new = f(i + 1, pred)
        window = (history + [k_new])[-kc:]
        y = y + sum(w * kj for w, kj in zip(wc, window))
        total = total + quad[i + 1] * g_new
        history = (history + [k_new])[-4:]
        if on_step is not None:
            on_step(i, pred, y, total)
    return y, total
