r"""Few-step sampling with a flow map or a consistency model, and the reference flow map of a field.

* Two-time model: :math:`x \leftarrow X_{\tau_k\to\tau_{k+1}}(x)` for ``k = 0 … K−1``, one network call
  per step, deterministic (the few-step sampler of Kim et al. 2024, "Consistency Trajectory
  Models", with γ = 0; Boffi et al. 2025, "Flow Map Matching").
* Consistency model (Song et al. 2023, "Consistency Models", Algorithm 1): :math:`\hat x = f(x, \tau_0)`,
  then for ``k ≥ 1`` re-noise :math:`x_{\tau_k} = \alpha_{\tau_k}\hat x + \sigma_{\tau_k} z` and
  :math:`\hat x = f(x_{\tau_k}, \tau_k)`. ``renoise="fresh"`` draws :math:`z \sim N(0, I)` (the
  paper's sampler); ``"deterministic"`` reuses the noise the current state implies,
  :math:`z = (x_{\tau_{k-1}} - \alpha_{\tau_{k-1}}\hat x)/\sigma_{\tau_{k-1}}` (a DDIM step with
  :math:`\hat x`), so that the result is a function of the initial noise alone and can be compared
  with the ODE solution from the same noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..fields import Field
from ..solvers import NonFiniteStateError, SampleResult, make_grid, validate_grid
from ..solvers import sample as solve
from .model import FlowMap

__all__ = ["sample", "sample_times", "ode_flow_map", "RENOISE"]

RENOISE = ("deterministic", "fresh")


def sample_times(model: FlowMap, steps: int) -> Tensor:
    """The ``steps + 1`` times a ``steps``-step sampler visits: every ``(N/steps)``-th node of the
    model's training grid when ``steps`` divides its ``N`` intervals, else a log-SNR-uniform grid."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    grid = getattr(model, "grid", None)
    if isinstance(grid, Tensor) and (len(grid) - 1) % steps == 0:
        return grid[:: (len(grid) - 1) // steps].clone()
    return make_grid(model.path, "logsnr", steps, model.t_start, model.t_end)


def sample(model: FlowMap, noise_or_shape: Tensor | Sequence[int], steps: int = 1,
           times: Tensor | Sequence[float] | None = None, cond: dict | None = None,
           generator: torch.Generator | None = None, renoise: str = "deterministic",
           dtype: torch.dtype | None = None, device: torch.device | str | None = None,
           return_trajectory: bool = False, check_finite: bool = True) -> SampleResult:
    r"""Draw samples with ``steps`` network calls of a :class:`~flowdiff.flowmaps.FlowMap` (module docstring).

    Arguments:
        model: a two-time flow map or a consistency model.
        noise_or_shape: the state at ``t_start`` ``(B, *)``, or a shape to draw it from the path's
            prior (``path.prior_sample``, with ``generator``, ``dtype`` and ``device``).
        steps: number of network calls (1, 2, 4, ...).
        times: the ``steps + 1`` increasing times from ``model.t_start`` to ``model.t_end``;
            default :func:`sample_times`.
        cond: keyword arguments of every network call (e.g. ``{"y": labels}``).
        generator: for the prior draw and for ``renoise="fresh"``.
        renoise: consistency models only: ``"deterministic"`` or ``"fresh"``.
        return_trajectory: keep the state at every time.
        check_finite: raise :class:`~flowdiff.solvers.NonFiniteStateError` at the first step with a
            non-finite state.

    Returns:
        :class:`flowdiff.SampleResult` with ``x`` = ``state`` = the map's value at ``t_end``,
        ``nfe = steps``, ``grid`` = the times, ``solver`` = ``"flow-map"`` or ``"consistency"``.
    """
    if not isinstance(model, FlowMap):
        raise TypeError(f"model must be a fd.flowmaps.FlowMap, got {type(model).__name__}")
    if renoise not in RENOISE:
        raise ValueError(f"unknown renoise {renoise!r}; valid: {', '.join(RENOISE)}")
    if isinstance(noise_or_shape, Tensor):
        x = noise_or_shape
        if not x.is_floating_point() or x.ndim < 1:
            raise TypeError(f"noise must be a floating-point tensor with a batch dimension, got dtype {x.dtype}, "
                            f"shape {tuple(x.shape)}")
    else:
        try:
            shape = tuple(int(n) for n in noise_or_shape)
        except TypeError:
            raise TypeError(f"noise_or_shape must be a tensor or a shape, got {type(noise_or_shape).__name__}") from None
        if not shape or any(n < 1 for n in shape):
            raise ValueError(f"shape must be positive integers with a batch dimension, got {shape}")
        if dtype is None:
            params = [p for p in model.parameters() if p.is_floating_point()]
            dtype = params[0].dtype if params else torch.get_default_dtype()
            device = params[0].device if params and device is None else device
        x = model.path.prior_sample(shape, generator=generator, dtype=dtype, device=device)
    if times is None:
        grid = sample_times(model, steps)
    else:
        grid = validate_grid(times, model.t_start, model.t_end)
        if len(grid) != steps + 1:
            raise ValueError(f"times must have steps + 1 = {steps + 1} entries, got {len(grid)}")
    cond = dict(cond or {})
    nodes = grid.tolist()
    trajectory = [x] if return_trajectory else None
    start = model.nfe

    def check(k: int, value: Tensor) -> None:
        if check_finite and not bool(torch.isfinite(value).all()):
            raise NonFiniteStateError(f"flow-map sampler: the state became non-finite at step {k} (t={nodes[k + 1]:.6g})")

    with torch.no_grad():
        if model.two_time:
            for k in range(steps):
                x = model(x, nodes[k], nodes[k + 1], **cond)
                check(k, x)
                if trajectory is not None:
                    trajectory.append(x)
        else:
            state, s = x, nodes[0]
            data = model(state, s, **cond)
            check(0, data)
            for k in range(1, steps):
                tau = nodes[k]
                a_prev, s_prev = model.path.table(s).floats(0)[:2]
                a, sig = model.path.table(tau).floats(0)[:2]
                if renoise == "fresh":
                    z = torch.randn(state.shape, generator=generator, dtype=state.dtype, device=state.device)
                else:
                    z = (state - a_prev * data) / s_prev
                state, s = a * data + sig * z, tau
                if trajectory is not None:
                    trajectory.append(state)
                data = model(state, s, **cond)
                check(k, data)
            x = data
            if trajectory is not None:
                trajectory.append(x)
    return SampleResult(x=x, nfe=model.nfe - start, grid=grid, solver="flow-map" if model.two_time else "consistency",
                        state=x, trajectory=trajectory, nfe_budget=steps, options={"renoise": renoise})


def ode_flow_map(field: Field, x: Tensor, s: float, t: float, solver: str = "dpm-solver++3m", nfe: int = 200,
                 cond: dict | None = None, **options: Any) -> Tensor:
    r"""The reference :math:`X_{s\to t}(x)` of a field: its probability-flow ODE from ``s`` to ``t`` by ``solver``
    with ``nfe`` evaluations on a log-SNR grid (no final denoise). Scalar ``s < t``."""
    if not isinstance(field, Field):
        raise TypeError(f"field must be a fd.Field on a Gaussian path, got {type(field).__name__}")
    return solve(field, x, solver=solver, nfe=nfe, t_start=float(s), t_end=float(t), denoise_final=False,
                 grid="logsnr", cond=cond, **options).state
