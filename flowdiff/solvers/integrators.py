r"""Generic explicit integrators of :math:`\frac{dy}{ds} = f(s, y)`, shared by the samplers and the likelihood.

Nothing here knows about paths or fields: ``s`` is whatever variable the caller integrates in
(``t``, :math:`\tilde\sigma`, the flow time τ) and ``f(s, y)`` its right-hand side. The state ``y``
is a tensor or a tuple of tensors, **batch first** in every component (the likelihood's ``(x, ℓ)``:
``x`` ``(B, *S)``, ``ℓ`` ``(B,)`` or ``(B, P)``). A step size is a float, or a per-sample ``(B,)`` tensor.

**Runge–Kutta** (Butcher 2016, "Numerical Methods for Ordinary Differential Equations"): the
tableaus :data:`EULER`, :data:`MIDPOINT`, :data:`HEUN`, :data:`KUTTA3`, :data:`RK4` and the
embedded pair :data:`DOPRI5` (Dormand & Prince 1980, 5(4), first-same-as-last, error weights
``e = b − b̂``); :func:`rk_step` takes one step with any of them.

**Adaptive Dormand–Prince 5(4)**, error ratio :math:`|e| / (\mathrm{atol} + \mathrm{rtol}\max(|y|, |y'|))`.
:func:`dopri5_global`: one step size for the batch, error = RMS over every entry, Hairer's initial
step (Hairer, Nørsett & Wanner 1993, "Solving ODEs I", II.4), controller
:math:`h \leftarrow h\min(10, \max(0.2, 0.9\,\mathrm{err}^{-1/5}))`. :func:`dopri5_per_sample`: a
time and a step per sample, so one stiff sample never shrinks the steps of the others; error = RMS
over the first component (the state) and largest entry of the others (log-determinants), a PI
controller (Gustafsson 1991; Hairer & Wanner 1996, "Solving ODEs II", IV.2), steps that never pass
the end nor leave a sliver (when less than two steps remain the rest is split evenly).

**Adams predictor–corrector** (:func:`adams_pec`; "Solving ODEs I", §III.1): variable-step
Adams–Bashforth(3) predictor and Adams–Moulton(4) corrector in PEC mode, ONE evaluation per node,
the weights being exact integrals of Lagrange interpolants through the previous nodes
(:func:`lagrange_weights`). A second output of ``f`` that does not feed back into the state (a
log-determinant) is integrated by composite 6-point Lagrange quadrature over all nodes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = ["DOPRI5", "EULER", "HEUN", "KUTTA3", "LOWER_ORDER", "MIDPOINT", "RK4", "TABLEAUS", "StepSizeUnderflowError",
           "Tableau", "adams_pec", "adams_per_sample", "dopri5_global", "dopri5_per_sample", "lagrange_weights", "rk_step"]

State = Tensor | tuple[Tensor, ...]
Step = float | Tensor


@dataclass(frozen=True)
class Tableau:
    """A Butcher tableau: nodes ``c``, lower-triangular rows ``a``, weights ``b``; ``e = b − b̂`` for an
    embedded pair."""

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
RK4 = Tableau("rk4", 4, (0.0, 0.5, 0.5, 1.0), ((), (0.5,), (0.0, 0.5), (0.0, 0.0, 1.0)), (1 / 6, 1 / 3, 1 / 3, 1 / 6))
_DP_B = (35 / 384, 0.0, 500 / 1113, 125 / 192, -2187 / 6784, 11 / 84, 0.0)
_DP_B4 = (5179 / 57600, 0.0, 7571 / 16695, 393 / 640, -92097 / 339200, 187 / 2100, 1 / 40)
DOPRI5 = Tableau(
    "dopri5", 5, (0.0, 1 / 5, 3 / 10, 4 / 5, 8 / 9, 1.0, 1.0),
    ((), (1 / 5,), (3 / 40, 9 / 40), (44 / 45, -56 / 15, 32 / 9),
     (19372 / 6561, -25360 / 2187, 64448 / 6561, -212 / 729),
     (9017 / 3168, -355 / 33, 46732 / 5247, 49 / 176, -5103 / 18656),
     _DP_B[:6]),  # FSAL: the last stage is evaluated at the 5th-order solution
    _DP_B, tuple(b5 - b4 for b5, b4 in zip(_DP_B, _DP_B4)),
)
#: The fixed-step tableaus by name.
TABLEAUS = {t.name: t for t in (EULER, MIDPOINT, HEUN, KUTTA3, RK4)}
#: Lower-order rules by number of stages, for a first step that gets fewer evaluations than the others.
LOWER_ORDER = {1: EULER, 2: MIDPOINT, 3: KUTTA3}


class StepSizeUnderflowError(FloatingPointError):
    """An adaptive step size shrank below round-off (the field is non-finite or discontinuous there)."""


def _map(fn: Callable[[Tensor], Tensor], y: State) -> State:
    return tuple(fn(p) for p in y) if isinstance(y, tuple) else fn(y)


def _parts(y: State) -> tuple[Tensor, ...]:
    return y if isinstance(y, tuple) else (y,)


def _h(h: Step, c: float, like: Tensor) -> float | Tensor:
    """``h c``; a per-sample step ``(B,)`` is shaped to broadcast over ``like``'s trailing dimensions."""
    return c * h.to(dtype=like.dtype, device=like.device).reshape(-1, *[1] * (like.ndim - 1)) if isinstance(h, Tensor) else h * c


def _combine(y: State | None, h: Step, coeffs: Sequence[float], ks: Sequence[State]) -> State:
    """:math:`y + \\sum_j (h\\,c_j)\\,k_j` over the non-zero ``c_j`` (``y=None``: the sum alone). Float
    steps add term by term, per-sample steps sum first (the sum alone: :math:`h\\sum_j c_j k_j`): the
    samplers' and the likelihood's rounding orders from before the integrators were shared."""
    if isinstance(first := ks[0] if y is None else y, tuple):
        return tuple(_combine(None if y is None else y[i], h, coeffs, [k[i] for k in ks]) for i in range(len(first)))
    if isinstance(h, Tensor):
        if y is None:
            return _h(h, 1.0, ks[0]) * sum(c * k for c, k in zip(coeffs, ks) if c != 0.0)  # type: ignore
        terms = [_h(h, c, k) * k for c, k in zip(coeffs, ks) if c != 0.0]
        return y + sum(terms) if terms else y  # type: ignore
    out = 0 if y is None else y
    for c, k in zip(coeffs, ks):
        if c != 0.0:
            out = out + _h(h, c, k) * k  # type: ignore
    return out  # type: ignore


def rk_step(
    f: Callable[[Step, State], State], s: Step, y: State, h: Step, tableau: Tableau, *,
    s_next: Step | None = None, k1: State | None = None,
) -> tuple[State, list[State]]:
    """One explicit Runge–Kutta step from ``(s, y)`` of size ``h``: ``(y_next, [k_1 … k_m])``.

    Stage ``i`` is evaluated at ``s + c_i h``, or exactly at ``s_next`` when ``c_i = 1`` and
    ``s_next`` is given (no round-off of ``s + h``); ``k1``: ``f(s, y)`` when already known (FSAL).
    """
    ks: list[State] = [] if k1 is None else [k1]
    for i in range(len(ks), tableau.stages):
        si = s_next if (s_next is not None and tableau.c[i] == 1.0) else s + tableau.c[i] * h
        ks.append(f(si, _combine(y, h, tableau.a[i], ks)))
    return _combine(y, h, tableau.b, ks), ks


def _dopri5_step(f: Callable, s: Step, y: State, h: Step, k1: State, s_end: Step | None) -> tuple[State, list[State], State]:
    """One attempted step: ``(y5, [k_1 … k_7], error h·Σ e_j k_j)``; ``k_7 = f(s + h, y5)`` is the next
    ``k_1`` (FSAL); ``s_end``: the exact time of the ``c = 1`` stages."""
    y_new, ks = rk_step(f, s, y, h, DOPRI5, s_next=s_end, k1=k1)
    return y_new, ks, _combine(None, h, DOPRI5.e, ks)


def _ratios(u: State, y: State, y_new: State, rtol: float, atol: float) -> list[Tensor]:
    return [e.abs() / (atol + rtol * torch.maximum(a.abs(), b.abs())) for e, a, b in zip(_parts(u), _parts(y), _parts(y_new))]


def _rms(parts: Sequence[Tensor]) -> float:
    return float(torch.sqrt(torch.mean(torch.cat([p.reshape(-1).to(torch.float64) for p in parts]) ** 2)))


def dopri5_global(
    f: Callable[[float, State], State], s0: float, s1: float, y: State, *, rtol: float, atol: float,
    first_step: float | None = None, safety: float = 0.9, on_accept: Callable[[int, float, State], None] | None = None,
    time_of: Callable[[float], float] = float,
) -> State:
    """Dormand–Prince 5(4) from ``s0`` to ``s1``, one step size for the batch (module docstring).

    ``f`` counts and caps its own evaluations; ``on_accept(step, s, y)`` after every accepted step;
    ``time_of(s)`` names the time in error messages. Stages never pass ``s1``.
    """
    direction, span = (1.0 if s1 > s0 else -1.0), abs(s1 - s0)
    k1 = f(s0, y)
    if first_step is None:  # Hairer's initial step: an Euler probe of the second derivative
        d0, d1 = _rms(_ratios(y, y, y, rtol, atol)), _rms(_ratios(k1, y, y, rtol, atol))
        h0 = min(1e-6 if d0 < 1e-5 or d1 < 1e-5 else 0.01 * d0 / d1, span)
        k_probe = f(s0 + direction * h0, _combine(y, direction * h0, (1.0,), [k1]))
        d2 = _rms(_ratios(tuple(a - b for a, b in zip(_parts(k_probe), _parts(k1))), y, y, rtol, atol)) / h0
        h = min(100 * h0, max(1e-6, h0 * 1e-3) if max(d1, d2) <= 1e-15 else (0.01 / max(d1, d2)) ** (1 / 5))
    else:
        h = float(first_step)
    s, step = s0, 0
    while direction * (s1 - s) > 0:
        h = min(h, span)
        last = direction * (s1 - (s + direction * h)) <= 1e-12 * span
        hs = (s1 - s) if last else direction * h
        y_new, ks, error = _dopri5_step(f, s, y, hs, k1, s1 if last else None)
        err = _rms(_ratios(error, y, y_new, rtol, atol))
        if not math.isfinite(err):
            raise FloatingPointError(f"dopri5: non-finite error estimate at t={time_of(s)!r}")
        if err <= 1.0:
            s, y, k1 = (s1 if last else s + hs), y_new, ks[6]
            if on_accept is not None:
                on_accept(step, s, y)
            step += 1
        h = abs(hs) * (10.0 if err == 0.0 else min(10.0, max(0.2, safety * err ** (-1 / 5))))
    return y


def dopri5_per_sample(
    f: Callable[[Tensor, State, Tensor], State], s0: float, s1: float, y: State, *, rtol: float, atol: float,
    max_calls: int, first_step: float = 0.02, on_step: Callable[[Tensor, Tensor, State], None] | None = None,
    time_of: Callable[[Tensor], Tensor] = lambda s: s,
) -> tuple[State, Tensor]:
    """Dormand–Prince 5(4) with a time and a step per sample (module docstring).

    ``f(s, y, index)``: the right-hand side for the samples ``index`` (batch indices on the state's
    device) at their times ``s`` (float64 CPU), ``y`` holding just those samples. ``max_calls``: cap
    on calls of ``f`` (RuntimeError beyond); ``on_step(s, index, y)`` after every attempted step with
    the active samples' state. Returns ``(y at s1, accepted steps per sample)``; raises
    :class:`StepSizeUnderflowError` when a step shrinks below round-off.
    """
    batch, device = _parts(y)[0].shape[0], _parts(y)[0].device
    span = abs(s1 - s0)
    s = torch.full((batch,), s0, dtype=torch.float64)
    h = torch.full((batch,), (1.0 if s1 > s0 else -1.0) * min(first_step, span), dtype=torch.float64)
    err_prev = torch.ones(batch, dtype=torch.float64)
    steps = torch.zeros(batch, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    y = _map(torch.clone, y)
    k1, calls = f(s.clone(), y, torch.arange(batch, device=device)), 1
    while bool(active.any()):
        if calls + 6 > max_calls:
            raise RuntimeError(f"dopri5 needed more than nfe={max_calls} model evaluations ({int(active.sum())} of "
                               f"{batch} samples unfinished); loosen rtol/atol or raise nfe")
        ia = active.nonzero().squeeze(1)
        ia_dev = ia.to(device)
        sa, ha = s[ia], h[ia]
        if bool((ha.abs() < 1e-14 * span).any()):
            raise StepSizeUnderflowError(f"dopri5: the step size underflowed near t={float(time_of(sa).min()):.6g} "
                                         "(the field is non-finite or discontinuous there)")
        remaining = s1 - sa
        stretch = remaining.abs() <= ha.abs()
        ha = torch.where(stretch | (remaining.abs() <= 2 * ha.abs()), torch.where(stretch, remaining, 0.5 * remaining), ha)
        end = torch.where(stretch, torch.full_like(sa, s1), sa + ha)
        ya = _map(lambda p: p[ia_dev], y)
        y_new, ks, error = _dopri5_step(lambda si, yi: f(si, yi, ia_dev), sa, ya, ha, _map(lambda p: p[ia_dev], k1), end)
        calls += 6
        ratios = [r.reshape(r.shape[0], -1).double().cpu() for r in _ratios(error, ya, y_new, rtol, atol)]
        err = torch.stack([ratios[0].pow(2).mean(-1).sqrt()] + [r.max(-1).values for r in ratios[1:]]).max(0).values
        err = torch.where(torch.isfinite(err), err, torch.full_like(err, 1e10)).clamp_min(1e-10)
        accept = err <= 1.0
        factor = torch.where(accept, (0.9 * err.pow(-0.7 / 5) * err_prev[ia].clamp_min(1e-10).pow(0.4 / 5)).clamp(0.2, 5.0),
                             (0.9 * err.pow(-1 / 5)).clamp(0.1, 0.9))
        acc_dev = accept.to(device)
        for dst, new in zip(_parts(y) + _parts(k1), _parts(y_new) + _parts(ks[6])):
            dst[ia_dev[acc_dev]] = new[acc_dev]
        s[ia] = torch.where(accept, end, sa)
        h[ia] = ha * factor
        err_prev[ia] = torch.where(accept, err, err_prev[ia])
        steps[ia] += accept.long()
        active[ia] = ~(accept & (stretch | ((s1 - s[ia]).abs() <= 1e-12 * span)))
        if on_step is not None:
            on_step(sa, ia_dev, _map(lambda p: p[ia_dev], y))
    return y, steps


def lagrange_weights(nodes: Sequence[float], a: float, b: float) -> list[float]:
    """Weights ``w`` with :math:`\\int_a^b P = \\sum_j w_j f_j`, ``P`` interpolating ``f`` at ``nodes``."""
    z = np.asarray(nodes, dtype=np.float64)
    center, scale = 0.5 * (z.max() + z.min()), max(float(np.ptp(z)), abs(b - a), 1e-300)
    zs, za, zb = (z - center) / scale, (a - center) / scale, (b - center) / scale
    P = np.polynomial.polynomial
    weights = []
    for j in range(len(zs)):
        others = np.delete(zs, j)
        integral = P.polyint(P.polyfromroots(others) / np.prod(zs[j] - others) if len(others) else np.array([1.0]))
        weights.append(float((P.polyval(zb, integral) - P.polyval(za, integral)) * scale))
    return weights


def adams_pec(
    f: Callable[[int, Tensor], tuple[Tensor, Tensor]], nodes: Sequence[float], y: Tensor, *,
    on_step: Callable[[int, Tensor, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor]:
    """Adams–Bashforth(3)/Adams–Moulton(4) PEC over ``nodes``, one call of ``f`` per node (module docstring).

    ``f(i, y) -> (dy/ds, q)`` at node ``i``; ``q`` does not feed back and is integrated by composite
    6-point Lagrange quadrature. ``on_step(i, predicted, corrected, ∫q so far)`` after step ``i``.
    Returns ``(y at the last node, ∫ q ds)``. The orders grow from 1 and 2 at the start.
    """
    n = len(nodes)
    quad = np.zeros(n)  # each interval integrated with the 6 nodes around it
    for i in range(n - 1):
        lo = max(0, min(i - 2, n - min(6, n)))
        quad[lo : lo + min(6, n)] += lagrange_weights(nodes[lo : lo + min(6, n)], nodes[i], nodes[i + 1])
    quad = quad.tolist()
    k, g = f(0, y)
    history, total = [k], quad[0] * g
    for i in range(n - 1):
        kp, kc = min(3, i + 1), min(4, i + 2)
        wp = lagrange_weights(nodes[i + 1 - kp : i + 1], nodes[i], nodes[i + 1])
        wc = lagrange_weights(nodes[i + 2 - kc : i + 2], nodes[i], nodes[i + 1])
        pred = y + sum(w * kj for w, kj in zip(wp, history[-kp:]))
        k_new, g_new = f(i + 1, pred)
        history = (history + [k_new])[-4:]
        y = y + sum(w * kj for w, kj in zip(wc, history[-kc:]))
        total = total + quad[i + 1] * g_new
        if on_step is not None:
            on_step(i, pred, y, total)
    return y, total


def _interp_weights(nodes: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """Batched :func:`lagrange_weights`: ``nodes`` ``(n, m)`` float64, intervals ``[a, b]`` ``(n,)``; returns
    ``(n, m)`` weights with :math:`\\int_a^b P = \\sum_j w_j f_j` (``P`` interpolating at the nodes), from the
    moments of the Vandermonde system in coordinates centred at ``a`` and scaled by ``b - a``."""
    h = (b - a).unsqueeze(-1)
    z = (nodes - a.unsqueeze(-1)) / h  # the step is [0, 1] in these coordinates
    m = nodes.shape[-1]
    powers = torch.arange(m, dtype=torch.float64)
    vander = z.unsqueeze(-1) ** powers  # (n, m nodes, m powers)
    moments = (1.0 / (powers + 1.0)).expand(nodes.shape[0], m)
    return torch.linalg.solve(vander.transpose(1, 2), moments.unsqueeze(-1)).squeeze(-1) * h


def adams_per_sample(
    f: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]], s0: float, s1: float, y: Tensor, g0: Tensor, *,
    error: Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor], tol: float, max_calls: int,
    first_step: float = 1 / 64, order: int = 4, max_growth: float = 2.0, safety: float = 0.9, per_unit_step: bool = True,
    on_step: Callable[[Tensor, Tensor, Tensor], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Variable-step Adams–Bashforth/Adams–Moulton PEC with a time, a step and a history per sample.

    ``f(s, y, index) -> (k, q)``: ``dy/ds`` and a side quantity ``q`` (``(n,)`` or ``(n, P)``) to be
    integrated, that does not feed back, for the samples ``index`` at their times ``s`` (float64,
    CPU). One call of ``f`` per attempted step. The predictor is Adams–Bashforth and the corrector
    Adams–Moulton of the same order (``order`` ≤ 5 nodes; lower at the start while the history
    fills), both with the exact integrals of the Lagrange interpolants through the sample's own
    previous nodes ("Solving ODEs I", §III.5, variable steps); ``q`` is integrated with the
    corrector's weights. Milne's device: the corrector's local error is a fixed fraction of
    ``corrected − predicted``; ``error(s_new, h, y_c, y_p, k_new, q_c − q_p, index)`` turns the two
    differences into a local error estimate per sample, in the caller's units, and a step is
    accepted when it is at most ``tol·|h|/|s1 − s0|`` (error per unit step: the estimates of a
    whole solve add up to at most ``tol``). With the ratio ``r`` of the two, the step follows
    :math:`h \\leftarrow h\\,\\min(g, \\max(0.2, \\mathrm{safety}\\,r^{-1/\\mathrm{order}}))` (``g = max_growth``,
    no growth right after a rejection; the ratio of successive steps stays bounded, which keeps
    variable-step Adams stable); a rejected step keeps the history and retries smaller. Returns
    ``(y at s1, ∫q ds, accepted steps, calls, Σ accepted error estimates)`` per sample;
    ``max_calls`` caps the calls of ``f`` per sample (RuntimeError beyond).
    """
    if not 1 <= order <= 5:
        raise ValueError(f"order must be in 1..5, got {order!r}")
    batch, device = y.shape[0], y.device
    span, direction = abs(s1 - s0), (1.0 if s1 > s0 else -1.0)
    s = torch.full((batch,), s0, dtype=torch.float64)
    h = torch.full((batch,), direction * first_step * span, dtype=torch.float64)
    hist_s = torch.full((batch, order), math.nan, dtype=torch.float64)
    k0, q0 = f(s.clone(), y, torch.arange(batch, device=device))
    hist_k = k0.new_zeros((batch, order, *k0.shape[1:]))
    hist_q = q0.new_zeros((batch, order, *q0.shape[1:]))
    hist_s[:, -1], hist_k[:, -1], hist_q[:, -1] = s, k0, q0
    filled = torch.ones(batch, dtype=torch.long)
    y, total = y.clone(), g0.clone()
    steps = torch.zeros(batch, dtype=torch.long)
    calls = torch.ones(batch, dtype=torch.long)
    active = torch.ones(batch, dtype=torch.bool)
    rejected = torch.zeros(batch, dtype=torch.bool)  # the last attempt was rejected: no growth on the next step
    estimate = torch.zeros(batch, dtype=torch.float64)

    def bcast(w: Tensor, like: Tensor) -> Tensor:
        return w.to(dtype=like.dtype, device=like.device).reshape(*w.shape, *[1] * (like.ndim - 2))

    while bool(active.any()):
        if int(calls.max()) >= max_calls:
            raise RuntimeError(f"the adaptive Adams solve needed more than nfe={max_calls} model evaluations per sample "
                               f"({int(active.sum())} of {batch} samples unfinished); loosen the tolerance or raise nfe")
        ia = active.nonzero().squeeze(1)
        ia_dev = ia.to(device)
        sa, ha = s[ia], h[ia]
        if bool((ha.abs() < 1e-13 * span).any()):
            raise StepSizeUnderflowError("adaptive Adams: the step size underflowed (the field is non-finite or discontinuous)")
        remaining = s1 - sa
        last = remaining.abs() <= ha.abs() * 1.000001
        ha = torch.where(last, remaining, torch.where(remaining.abs() <= 2 * ha.abs(), 0.5 * remaining, ha))
        s_new = torch.where(last, torch.full_like(sa, s1), sa + ha)
        y_new, q_step, q_pred_step = torch.empty_like(y[ia_dev]), None, None
        ya = y[ia_dev]
        pred = torch.empty_like(ya)
        groups = []
        for m in range(1, order + 1):  # samples grouped by how many history nodes they have
            sel = (filled[ia].clamp(max=order) == m).nonzero().squeeze(1)
            if len(sel):
                groups.append((m, sel))
        for m, sel in groups:
            nodes_p = hist_s[ia[sel], order - m:]
            wp = _interp_weights(nodes_p, sa[sel], s_new[sel])
            sd = sel.to(device)
            pred[sd] = ya[sd] + (bcast(wp, hist_k) * hist_k[ia_dev[sd], order - m:]).sum(1)
        k_new, q_new = f(s_new.clone(), pred, ia_dev)
        calls[ia] += 1
        q_c, q_p = torch.empty_like(q_new), torch.empty_like(q_new)
        for m, sel in groups:
            sd = sel.to(device)
            mc = min(m + 1, order)  # corrector nodes: the last mc − 1 history nodes and the new one
            nodes_p = hist_s[ia[sel], order - m:]
            nodes_c = torch.cat([hist_s[ia[sel], order - mc + 1:], s_new[sel].unsqueeze(-1)], dim=1)
            wp = _interp_weights(nodes_p, sa[sel], s_new[sel])
            wc = _interp_weights(nodes_c, sa[sel], s_new[sel])
            kc = torch.cat([hist_k[ia_dev[sd], order - mc + 1:], k_new[sd].unsqueeze(1)], dim=1)
            qc = torch.cat([hist_q[ia_dev[sd], order - mc + 1:], q_new[sd].unsqueeze(1)], dim=1)
            y_new[sd] = ya[sd] + (bcast(wc, kc) * kc).sum(1)
            q_c[sd] = (bcast(wc, qc) * qc).sum(1)
            q_p[sd] = (bcast(wp, hist_q) * hist_q[ia_dev[sd], order - m:]).sum(1)
        local = error(s_new, ha, y_new, pred, k_new, q_c - q_p, ia_dev).detach().double().cpu()
        ratio = local / (tol * ha.abs() / span) if per_unit_step else local / tol
        ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, 1e10)).clamp_min(1e-10)
        accept = ratio <= 1.0
        acc, acc_dev = ia[accept], ia_dev[accept.to(device)]
        y[acc_dev] = y_new[accept.to(device)]
        total[acc_dev] = total[acc_dev] + q_c[accept.to(device)]
        hist_s[acc] = torch.cat([hist_s[acc, 1:], s_new[accept].unsqueeze(-1)], dim=1)
        hist_k[acc_dev] = torch.cat([hist_k[acc_dev, 1:], k_new[accept.to(device)].unsqueeze(1)], dim=1)
        hist_q[acc_dev] = torch.cat([hist_q[acc_dev, 1:], q_new[accept.to(device)].unsqueeze(1)], dim=1)
        filled[acc] += 1
        estimate[acc] += local[accept]
        s[acc] = s_new[accept]
        steps[acc] += 1
        grow = (safety * ratio.pow(-1.0 / (order if per_unit_step else order + 1))).clamp(0.2, max_growth)
        h[ia] = ha * torch.where(accept, torch.where(rejected[ia], grow.clamp(max=1.0), grow), grow.clamp(max=0.9))
        rejected[ia] = ~accept
        active[acc] = ~last[accept]
        if on_step is not None:
            on_step(s_new, ia_dev, accept)
    return y, total, steps, calls, estimate
