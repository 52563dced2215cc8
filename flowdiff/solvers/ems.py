r"""Empirical model statistics (EMS) of DPM-Solver-v3: the container and their estimation.

Zheng, Lu, Chen & Zhu 2023, "DPM-Solver-v3: Improved Diffusion ODE Solver with Empirical Model
Statistics", §3.2: per dimension and per half log-SNR λ, the linear part
:math:`l = E[\sigma\,\mathrm{diag}\nabla_x\hat\varepsilon]` and the regression
:math:`f^{(1)} \approx s\odot f + b` of the nonlinear remainder
:math:`f = (\sigma\hat\varepsilon - l\odot x)/\alpha` on itself (see
:mod:`flowdiff.solvers.dpm_v3` for how the sampler uses them and :func:`estimate_ems` for the
estimators). Stored as one safetensors file (:meth:`EMS.save`, :meth:`EMS.load`).
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..guidance import model_num_classes, stratified_labels
from ..paths import GaussianPath
from .base import require_gaussian_path
from .grids import finite_log_snr
from .loop import interval, sample

__all__ = ["EMS", "HUTCHINSON_CHOICES", "estimate_ems", "jvp", "same_path_config"]

#: Values ``estimate_ems(hutchinson=...)`` accepts.
HUTCHINSON_CHOICES = (None, "auto", True, False)
#: Values ``estimate_ems(derivatives=...)`` accepts: forward differences or forward-mode AD.
DERIVATIVE_CHOICES = ("fd", "jvp")
#: Values ``estimate_ems(points=...)`` accepts: new points, noise and probes at every knot, or the same ones.
POINTS_CHOICES = ("fresh", "common")
#: Largest dimension for which ``hutchinson="auto"`` computes the exact Jacobian diagonal.
EXACT_DIAGONAL_MAX_DIM = 32
_FORMAT = "flowdiff-ems/1"


def _close(a: Any, b: Any, rtol: float = 1e-9) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=rtol, abs_tol=1e-12)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, rtol) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], rtol) for k in a)
    return a == b


def same_path_config(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    """Whether two ``path.config()`` dicts describe the same path (numbers to 1e-9 relative)."""
    return _close(dict(a), dict(b))


def _describe(config: Mapping[str, Any]) -> str:
    """A short description of a path config (Discrete tables are summarised, not printed)."""
    parts = [f"{k}={f'[{len(v)} values]' if isinstance(v, (list, tuple)) and len(v) > 4 else v}"
             for k, v in config.items() if k != "name"]
    return f"{config.get('name', '?')}({', '.join(parts)})"


class EMS:
    r"""Empirical model statistics ``l, s, b`` of one model on a log-SNR grid.

    Attributes:
        lambdas: ``(K,)`` float64, strictly increasing half log-SNR knots (noise side first).
        l, s, b: ``(K, *shape)`` float64, the statistics at the knots (linearly interpolated
            between them by the solver).
        settings: JSON-serialisable dict: ``path`` (the path's ``config()``), ``shape``,
            ``t_start``/``t_end``, ``num_lambdas``, ``num_samples``, ``hutchinson``, ``probes``,
            ``smooth``, ``guidance_scale``, ``prediction`` and ``cost`` (``seconds``,
            ``model_calls``, ``jvp_calls``).

    Build with :func:`estimate_ems` (or :meth:`degenerate`); store with :meth:`save` /
    :meth:`load` (one safetensors file, the settings in its JSON metadata).
    """

    def __init__(self, lambdas: Tensor, l: Tensor, s: Tensor, b: Tensor, settings: Mapping[str, Any]):
        lam = torch.as_tensor(lambdas, dtype=torch.float64).detach().cpu().flatten()
        if lam.numel() < 2:
            raise ValueError(f"EMS need at least 2 log-SNR knots, got {lam.numel()}")
        if not torch.isfinite(lam).all() or (torch.diff(lam) <= 0).any():
            raise ValueError("EMS lambdas must be finite and strictly increasing")
        tensors = []
        for name, v in (("l", l), ("s", s), ("b", b)):
            v = torch.as_tensor(v, dtype=torch.float64).detach().cpu()
            if v.ndim < 2 or v.shape[0] != lam.numel():
                raise ValueError(
                    f"EMS {name} must have shape (K, *shape) with K = {lam.numel()} knots, got {tuple(v.shape)}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"EMS {name} has non-finite entries")
            tensors.append(v.contiguous().clone())  # own storage (safetensors refuses shared tensors)
        if not (tensors[0].shape == tensors[1].shape == tensors[2].shape):
            raise ValueError(f"EMS l, s, b must have the same shape, got {[tuple(t.shape) for t in tensors]}")
        if not isinstance(settings, Mapping) or "path" not in settings:
            raise ValueError("EMS settings must be a mapping with at least the path config under 'path'")
        self.lambdas = lam
        self.l, self.s, self.b = tensors
        self.settings: dict[str, Any] = json.loads(json.dumps(dict(settings)))  # a JSON-clean copy
        self.settings["shape"] = list(self.shape)

    @property
    def shape(self) -> tuple[int, ...]:
        """The data shape (without the batch dimension) the statistics belong to."""
        return tuple(self.l.shape[1:])

    @property
    def num_lambdas(self) -> int:
        return int(self.lambdas.numel())

    @property
    def path_config(self) -> dict:
        return dict(self.settings["path"])

    @property
    def guidance_scale(self) -> float | None:
        g = self.settings.get("guidance_scale")
        return None if g is None else float(g)

    @property
    def cost(self) -> dict:
        """``{"seconds", "model_calls", "jvp_calls"}`` spent estimating the statistics."""
        return dict(self.settings.get("cost", {}))

    @property
    def lambda_range(self) -> tuple[float, float]:
        return float(self.lambdas[0]), float(self.lambdas[-1])

    def __repr__(self) -> str:
        lo, hi = self.lambda_range
        cost = self.cost
        spent = f", cost={cost.get('seconds', float('nan')):.3g}s/{cost.get('model_calls', '?')} calls" if cost else ""
        return (
            f"EMS(shape={self.shape}, knots={self.num_lambdas}, lambda=[{lo:.4g}, {hi:.4g}], "
            f"path={_describe(self.path_config)}, guidance_scale={self.guidance_scale}{spent})"
        )

    @classmethod
    def degenerate(cls, path: GaussianPath, shape: Sequence[int], t_start: float | None = None,
                   t_end: float | None = None) -> EMS:
        """The statistics ``l = 1, s = b = 0``, with which DPM-Solver-v3 is DPM-Solver++ (Taylor form)."""
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a GaussianPath, got {type(path).__name__}")
        shape = tuple(int(d) for d in shape)
        t0 = float(path.t_min if t_start is None else t_start)
        t1 = float(path.t_max if t_end is None else t_end)
        lam = torch.tensor(finite_log_snr(path, t0, t1, "degenerate EMS"), dtype=torch.float64)
        ones = torch.ones((2, *shape), dtype=torch.float64)
        zeros = torch.zeros_like(ones)
        settings = {"path": path.config(), "t_start": t0, "t_end": t1, "num_lambdas": 2, "degenerate": True,
                    "guidance_scale": None, "cost": {"seconds": 0.0, "model_calls": 0, "jvp_calls": 0}}
        return cls(lam, ones, zeros, zeros, settings)

    def save(self, path: str | Path) -> Path:
        """Write the statistics to ``path`` (safetensors; the settings as JSON metadata). Returns the path."""
        from ._files import save_tensors

        tensors = {"lambdas": self.lambdas, "l": self.l, "s": self.s, "b": self.b}
        return save_tensors(path, tensors, _FORMAT, self.settings)

    @classmethod
    def load(cls, path: str | Path) -> EMS:
        """Read statistics written by :meth:`save`; ValueError if the file is not an EMS file."""
        from ._files import load_tensors

        tensors, settings = load_tensors(path, _FORMAT, {"lambdas", "l", "s", "b"}, "EMS")
        return cls(tensors["lambdas"], tensors["l"], tensors["s"], tensors["b"], settings)

    def check(self, path: GaussianPath, shape: Sequence[int] | None = None, lambda_start: float | None = None,
              lambda_end: float | None = None) -> None:
        """Raise ValueError unless these statistics fit ``path``, data ``shape`` and the log-SNR range.

        The EMS belong to one model on one path: computed for another path, another data shape,
        or a narrower λ range than the sampling grid needs, they are rejected.
        """
        cfg = path.config()
        if not same_path_config(cfg, self.path_config):
            raise ValueError(f"these EMS were computed for the path {_describe(self.path_config)}, but the field's path is "
                             f"{_describe(cfg)}; recompute them with fd.solvers.estimate_ems(field, data)")
        if shape is not None and tuple(shape) != self.shape:
            raise ValueError(
                f"these EMS were computed for data of shape {self.shape}, but x has shape (B, *{tuple(shape)}); "
                f"recompute them for this model"
            )
        lo, hi = self.lambda_range
        slack = 1e-6 * max(1.0, hi - lo)
        for label, lam in (("start", lambda_start), ("end", lambda_end)):
            if lam is not None and not (lo - slack <= lam <= hi + slack):
                raise ValueError(
                    f"the sampling grid's {label} has log-SNR {lam:.6g}, outside the EMS range [{lo:.6g}, {hi:.6g}] "
                    f"(t in [{self.settings.get('t_start')}, {self.settings.get('t_end')}]); recompute the EMS with a "
                    f"t_start/t_end that covers the sampling interval"
                )


def _draw_data(data: Any, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
    """``n`` data points and their labels (``None`` where the data has none) from a tensor
    ``(N, *shape)``, a dataset (``.x`` and optionally ``.y``), an oracle (``.sample``) or a callable."""
    labels = None
    if hasattr(data, "x") and isinstance(data.x, Tensor):
        y = getattr(data, "y", None)
        labels = y if isinstance(y, Tensor) and y.ndim == 1 and y.shape[0] == data.x.shape[0] else None
        data = data.x
    if isinstance(data, Tensor):
        if data.ndim < 2 or data.shape[0] < 1:
            raise ValueError(f"data must have shape (N, *shape) with N >= 1, got {tuple(data.shape)}")
        if not data.is_floating_point():
            raise TypeError(f"data must be a floating-point tensor, got dtype {data.dtype}")
        m = data.shape[0]
        if m >= n:
            idx = torch.randperm(m, generator=generator)[:n]
        else:  # fewer points than samples: draw with replacement
            idx = torch.randint(0, m, (n,), generator=generator)
        return data[idx.to(data.device)], None if labels is None else labels[idx.to(labels.device)]
    if hasattr(data, "sample") and callable(data.sample):
        return data.sample(n, generator=generator), None
    if callable(data):
        return data(n, generator), None
    raise TypeError(f"data must be a tensor (N, *shape), a dataset with .x, an object with .sample(n, generator=...) or a "
                    f"callable (n, generator) -> tensor, got {type(data).__name__}")


def _noise_fn(field: Any, path: GaussianPath, cond: dict) -> Callable[[Tensor, Tensor], Tensor]:
    """ε̂(x, t) with ``t`` a (B,) tensor, differentiable in both (for torch.func.jvp)."""
    if hasattr(field, "noise") and callable(field.noise):
        return lambda x, t: field.noise(x, t, **cond)
    if hasattr(field, "denoise") and callable(field.denoise):

        def from_data(x: Tensor, t: Tensor) -> Tensor:
            shape = (-1,) + (1,) * (x.ndim - 1)
            a, s = path.alpha(t).reshape(shape), path.sigma(t).reshape(shape)
            return (x - a * field.denoise(x, t, **cond)) / s

        return from_data
    raise TypeError(f"field must have a noise(x, t) or denoise(x, t) method, got {type(field).__name__}")


def jvp(fn: Callable[[Tensor, Tensor], Tensor], primals: tuple[Tensor, Tensor], tangents: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``(fn(x, t), J·(dx, dt))`` by forward-mode AD.

    The same computation as :func:`torch.func.jvp`, through :mod:`torch.autograd.forward_ad`
    directly: on the mixture oracle it costs 2× a forward pass instead of 10× (measured, CPU).
    """
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        out = fn(*(fwad.make_dual(p, t) for p, t in zip(primals, tangents)))
        primal, tangent = fwad.unpack_dual(out)
    if tangent is None:  # the output does not depend on the inputs
        tangent = torch.zeros_like(primal)
    return primal, tangent


def _tangent_derivatives(eps_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, tangents_x: Tensor,
                         tangents_t: Tensor, eps_fn_wide: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """``(P, B, *shape)``: the JVPs of ε̂ at ``(x, t)`` along ``P`` tangents, the primal evaluated once.

    :func:`torch.func.vmap` over :func:`torch.func.jvp` with unbatched primals: one forward pass
    and ``P`` tangent passes (0.72 s for P = 2 at B = 256 on the digits UNet against 0.93 s for
    one forward-mode JVP of the doubled batch; CPU, one thread). Falls back to :func:`jvp` on
    the concatenated batch (``eps_fn_wide``, the conditioning repeated) where an operation has
    no batching rule.
    """
    try:
        return torch.func.vmap(lambda tx, tt: torch.func.jvp(eps_fn, (x, t), (tx, tt))[1])(tangents_x, tangents_t)
    except (RuntimeError, NotImplementedError):
        p = tangents_x.shape[0]
        _, tan = jvp(eps_fn_wide, (x.repeat(p, *([1] * (x.ndim - 1))), t.repeat(p)),
                     (tangents_x.flatten(0, 1), tangents_t.flatten(0, 1)))
        return tan.reshape(tangents_x.shape)


def _rows(make_eps: Callable[[int], Callable[[Tensor, Tensor], Tensor]], xb: Tensor, tb: Tensor, a: float, s: float,
          lam: float, dlog_a: float, dt: float, probes: Tensor | None, derivatives: str, fd_step: float
          ) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
    r"""Per point of one batch at one knot: ``A, B, C`` and the σ·diag estimate (``(n, D)`` float64).

    :math:`A = e^{-\lambda}\hat\varepsilon`, :math:`B = x/\alpha`,
    :math:`C = e^{-\lambda}(\hat\varepsilon_\lambda - \hat\varepsilon)`, so that
    :math:`f = A - lB` and :math:`f^{(1)} = lA + C - l'B`. ``make_eps(r)`` is ε̂ on a batch of
    ``r`` copies of the rows (the conditioning repeated). ``probes``: ``(P, n, *shape)``
    Rademacher vectors, or ``None`` for the exact diagonal. Also returns the JVP calls made.
    """
    n, shape = xb.shape[0], tuple(xb.shape[1:])
    dim = int(np.prod(shape))
    eps_fn = make_eps(1)
    eps = eps_fn(xb, tb)
    tangent = dlog_a * xb - s * eps  # dx/dλ along the probability-flow ODE
    calls = 0
    if probes is None:
        if derivatives == "jvp":
            eps_lam = _tangent_derivatives(eps_fn, xb, tb, tangent[None], torch.full_like(tb, dt)[None], make_eps(1))[0]
            calls += 1
        else:
            eps_lam = _fd_along(eps_fn, xb, tb, eps, tangent, dt, fd_step)
        diag = torch.zeros(n, dim, dtype=torch.float64)
        chunk = max(1, 4096 // max(n, 1))
        for j0 in range(0, dim, chunk):
            j1 = min(dim, j0 + chunk)
            m = j1 - j0
            basis = torch.zeros(m, n, dim, dtype=xb.dtype, device=xb.device)
            basis[torch.arange(m), :, torch.arange(j0, j1)] = 1.0
            xr = xb.reshape(1, n, dim).expand(m, n, dim).reshape(m * n, *shape)
            tr = tb.repeat(m)
            _, jd = jvp(make_eps(m), (xr, tr), (basis.reshape(m * n, *shape), torch.zeros_like(tr)))
            calls += 1
            jd = jd.reshape(m, n, dim).to(torch.float64)
            diag[:, j0:j1] = jd[torch.arange(m), :, torch.arange(j0, j1)].T
        l_rows = s * diag
    else:
        p = probes.shape[0]
        if derivatives == "jvp":
            # One call for all tangents: the ODE direction and the Hutchinson probes.
            tx = torch.cat([tangent[None], probes])
            tt = torch.cat([torch.full_like(tb, dt)[None], torch.zeros((p, n), dtype=tb.dtype, device=tb.device)])
            tan = _tangent_derivatives(eps_fn, xb, tb, tx, tt, make_eps(p + 1))
            calls += 1
            eps_lam, jv = tan[0], tan[1:].reshape(p, n, dim).to(torch.float64)
        else:
            # One forward call at the points moved along the ODE direction and along the probes.
            hx = fd_step * s  # the Jacobian of ε̂ varies on the scale σ
            xr = torch.cat([xb + fd_step * tangent] + [xb + hx * probes[i] for i in range(p)])
            tr = torch.cat([tb + fd_step * dt] + [tb] * p)
            out = make_eps(p + 1)(xr, tr)
            eps_lam = (out[:n] - eps) / fd_step
            jv = ((out[n:].reshape(p, n, dim) - eps.reshape(1, n, dim)) / hx).to(torch.float64)
        l_rows = s * (probes.reshape(p, n, dim).to(torch.float64) * jv).sum(0) / p
    e = math.exp(-lam)
    A = (e * eps).reshape(n, dim).to(torch.float64)
    B = (xb / a).reshape(n, dim).to(torch.float64)
    C = (e * (eps_lam - eps)).reshape(n, dim).to(torch.float64)
    return A, B, C, l_rows, calls


def _derivative(values: Tensor, lam: Tensor, window: int) -> Tensor:
    """d(values)/dλ along dim 0 by local quadratic least squares over 2·``window`` + 1 knots.

    A Savitzky–Golay derivative: it smooths like the official ±5-knot moving average of the
    central differences, but is exact for quadratics, also at the ends (where the window is
    shifted inwards instead of truncated, which would bias a moving average on curved l).
    ``window = 0`` gives second-order central differences.
    """
    k = values.shape[0]
    if window <= 0 or k < 3:
        return torch.gradient(values, spacing=(lam,), dim=0, edge_order=2 if k >= 3 else 1)[0]
    width = min(2 * window + 1, k)
    out = torch.empty_like(values)
    for i in range(k):
        lo = min(max(i - width // 2, 0), k - width)
        u = lam[lo : lo + width] - lam[i]
        design = torch.stack([torch.ones_like(u), u, u * u], 1)
        weights = torch.linalg.pinv(design)[1]  # row giving the linear coefficient
        out[i] = weights @ values[lo : lo + width]
    return out


def _fd_along(eps_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, t: Tensor, eps: Tensor, tangent: Tensor,
              dt: float, h: float) -> Tensor:
    """d ε̂ / dλ along the ODE by a forward difference of step ``h`` in λ (``eps`` = ε̂(x, t))."""
    return (eps_fn(x + h * tangent, t + h * dt) - eps) / h


def _f_moments(mom: dict[str, Tensor], shift: dict[str, Tensor], n: Any, l: Tensor,
               l_prime: Tensor) -> tuple[dict[str, Tensor], tuple[Tensor, ...], tuple[Tensor, ...], Tensor, Tensor]:
    """From the sums of A, B, C and their products over ``n`` points: the means, the central
    moments (Var A, Var B, Cov AB, Cov AC, Cov BC), E A, E B, E C (shifted back), and
    Var f and Cov(f, f⁽¹⁾) for f = A − l B, f⁽¹⁾ = l A + C − l′ B."""
    mean = {key: mom[key] / n for key in mom}
    var_a = mean["AA"] - mean["A"] ** 2
    var_b = mean["BB"] - mean["B"] ** 2
    cov_ab = mean["AB"] - mean["A"] * mean["B"]
    cov_ac = mean["AC"] - mean["A"] * mean["C"]
    cov_bc = mean["BC"] - mean["B"] * mean["C"]
    ea, eb, ec = mean["A"] + shift["A"], mean["B"] + shift["B"], mean["C"] + shift["C"]
    var_f = var_a - 2 * l * cov_ab + l * l * var_b
    cov_ff = l * var_a + cov_ac - l_prime * cov_ab - l * l * cov_ab - l * cov_bc + l * l_prime * var_b
    return mean, (var_a, var_b, cov_ab, cov_ac, cov_bc), (ea, eb, ec), var_f, cov_ff


def _statistics(l_sum: Tensor, mom: dict[str, Tensor], shift: dict[str, Tensor], n: float, lam: Tensor,
                smooth: int, shrink: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    r"""``l, s, b`` from the sums over ``n`` points of σ·diag and of the shifted moments of A, B, C.

    ``shrink``: replace the regression slope ``s`` by :math:`s\,s^2/(s^2 + \mathrm{se}^2)` with
    :math:`\mathrm{se}^2 = \mathrm{Var}(f^{(1)} - s f)/(n\,\mathrm{Var} f)` its standard error
    (Wiener/James–Stein shrinkage towards ``s = 0``): where ``f`` barely varies (the noise end)
    or the points are few, the slope is noise, and its integral in :math:`e^{-\int s}` would
    blow the solver up; ``b = E f⁽¹⁾ − s E f`` then uses the shrunk slope.
    """
    l = l_sum / n
    l_prime = _derivative(l, lam, smooth)
    mean, (var_a, var_b, cov_ab, cov_ac, cov_bc), (ea, eb, ec), var_f, cov_ff = _f_moments(mom, shift, n, l, l_prime)
    mean_f = ea - l * eb
    mean_f1 = l * ea + ec - l_prime * eb
    # Where f is (numerically) deterministic the regression has no slope: s = 0, b = E f⁽¹⁾.
    scale = var_a + l * l * var_b
    informative = var_f > 1e-10 * scale + 1e-300
    s_stat = torch.where(informative, cov_ff / torch.where(informative, var_f, torch.ones_like(var_f)),
                         torch.zeros_like(var_f))
    if shrink:
        var_c = mean["CC"] - mean["C"] ** 2
        var_f1 = (l * l * var_a + var_c + l_prime * l_prime * var_b + 2 * l * cov_ac - 2 * l * l_prime * cov_ab
                  - 2 * l_prime * cov_bc)
        resid = (var_f1 - s_stat * cov_ff).clamp_min(0.0)
        se2 = torch.where(informative, resid / (n * torch.where(informative, var_f, torch.ones_like(var_f))),
                          torch.zeros_like(var_f))
        s_stat = torch.where(informative, s_stat * s_stat * s_stat / (s_stat * s_stat + se2 + 1e-300), s_stat)
    b_stat = mean_f1 - s_stat * mean_f
    return l, s_stat, b_stat


def _local_weights(lam: Tensor, bandwidth: float, degree: int) -> tuple[Tensor, Tensor]:
    r"""``(K, K)`` hat matrices of a local polynomial fit in λ: value and slope at each knot.

    Row ``k`` fits a polynomial of ``degree`` in :math:`u = \lambda_j - \lambda_k` by least
    squares with tricube weights :math:`(1 - |u/h|^3)^3` (Cleveland 1979, LOESS); the window is
    widened where fewer than ``degree + 2`` knots fall in it, and is one-sided at the ends.
    """
    u = lam[None, :] - lam[:, None]
    w = _tricube(u, lam, bandwidth, degree + 2)
    design = torch.stack([u**p for p in range(degree + 1)], -1)  # (K, K, degree + 1)
    normal = design.transpose(1, 2) @ (w[..., None] * design)
    hat = torch.linalg.solve(normal, design.transpose(1, 2) * w[:, None, :])  # (K, degree + 1, K)
    return hat[:, 0], hat[:, 1] if degree >= 1 else torch.zeros_like(hat[:, 0])


def _tricube(u: Tensor, lam: Tensor, bandwidth: float, need: int = 3) -> Tensor:
    """Tricube weights of the offsets ``u`` (row k: λ_j − λ_k), each row's window at least wide
    enough to hold ``need`` knots."""
    h = torch.full((u.shape[0], 1), float(bandwidth), dtype=torch.float64)
    need = min(need, u.shape[1])
    h = torch.maximum(h, u.abs().sort(1).values[:, need - 1 : need] * 1.0001)
    return (1 - (u.abs() / h).clamp(max=1.0) ** 3) ** 3


def _pooled_statistics(l_sum: Tensor, mom: dict[str, Tensor], shift: dict[str, Tensor], n: float, lam: Tensor,
                       bandwidth: float, degree: int = 1) -> tuple[Tensor, Tensor, Tensor]:
    r"""``l, s, b`` from per-knot sums, pooled across knots within ``bandwidth`` (in λ).

    For points drawn afresh at every knot the per-knot estimates are independent, so pooling
    neighbouring knots averages their noise (with common random numbers it would not):

    * ``l`` and ``l'``: value and slope of a local cubic fit (:func:`_local_weights`) of the
      per-knot means of σ·diag (a quadratic one biased l′, and through it s, by 0.05 at a
      bandwidth of 1 on a Gaussian oracle);
    * ``s``: one weighted regression of :math:`f^{(1)}` on ``f`` over the knots of the window with
      a slope polynomial of ``degree`` in λ (default linear: on the digits UNet a quadratic slope
      doubled the 8-NFE error, a noisier fit at the ends), each knot's moments divided by its mean
      variance of ``f`` so that every knot counts alike, instead of a ratio of noisy per-knot
      moments;
    * ``b``: the local cubic fit of the per-knot :math:`E f^{(1)} - s_k E f`.
    """
    mL = l_sum / n
    value, slope = _local_weights(lam, bandwidth, 3)
    l = value @ mL
    l_prime = slope @ mL
    mean, (var_a, var_b, cov_ab, cov_ac, cov_bc), (ea, eb, ec), var_f, cov_ff = _f_moments(mom, shift, n, l, l_prime)
    # The regression f⁽¹⁾ ≈ s(λ_j) f + b_j over the window, with s(λ) a polynomial of ``degree``
    # in u = λ_j − λ_k (local polynomial regression, so that the slope's curvature does not bias
    # it), weighted so that every knot counts alike: per dimension a small normal system.
    scale = var_f.mean(1, keepdim=True).clamp_min(1e-300)
    u = lam[None, :] - lam[:, None]
    kernel = _tricube(u, lam, bandwidth, degree + 2)
    vn, cn = var_f / scale, cov_ff / scale
    powers = torch.stack([u**p for p in range(degree + 1)], -1)  # (K, K, p + 1)
    outer = powers[..., :, None] * powers[..., None, :]  # (K, K, p + 1, p + 1)
    normal = torch.einsum("kj,kjab,jd->kdab", kernel, outer, vn)
    right = torch.einsum("kj,kja,jd->kda", kernel, powers, cn)
    m0 = normal[..., 0, 0]
    ridge = 1e-9 * m0[..., None, None] * torch.eye(degree + 1, dtype=torch.float64)
    s_stat = torch.linalg.solve(normal + ridge, right[..., None])[..., 0, 0]
    informative = m0 > 1e-10 * (kernel @ ((var_a + l * l * var_b) / scale)) + 1e-300
    s_stat = torch.where(informative, s_stat, torch.zeros_like(s_stat))
    b_knot = (l * ea + ec - l_prime * eb) - s_stat * (ea - l * eb)
    return l, s_stat, value @ b_knot


def _error_estimate(lam: Tensor, full: tuple[Tensor, Tensor, Tensor],
                    halves: list[tuple[Tensor, Tensor, Tensor]]) -> dict[str, float]:
    r"""Standard errors of the statistics from two half-sample estimates (SE ≈ |X₁ − X₂|/2).

    ``l``, ``s``, ``b``: root mean square of the standard error over knots and dimensions,
    relative to the root mean square of the statistic (``s``: absolute, per unit λ). ``solver``:
    what the sampler feels: the root mean square over dimensions of the largest standard error of
    the running integral :math:`\int s\,dλ` (the exponent of the factor :math:`e^{-\int s}` of
    the nonlinear part, so a relative error of the steps' main term) and of
    :math:`\int b\,dλ` relative to the spread of :math:`\int E f` scale (|b| RMS × range).
    """
    out: dict[str, float] = {}
    dlam = torch.diff(lam).reshape(-1, *([1] * (full[0].ndim - 1)))
    for i, name in enumerate(("l", "s", "b")):
        se = (halves[0][i] - halves[1][i]) / 2
        rms = float(se.pow(2).mean().sqrt())
        ref = float(full[i].pow(2).mean().sqrt())
        out[name] = rms if name == "s" else rms / max(ref, 1e-300)
    se_s = (halves[0][1] - halves[1][1]) / 2
    run = torch.cumsum((se_s[1:] + se_s[:-1]) / 2 * dlam, 0)
    out["solver"] = float(run.abs().amax(0).pow(2).mean().sqrt())
    return {k: round(v, 6) for k, v in out.items()}


def _sampling_check(field: Any, path: GaussianPath, ems: EMS, halves: Sequence[EMS], shape: tuple[int, ...],
                    t0: float, t1: float, cond: dict, dtype: torch.dtype, device: torch.device, count: int, nfe: int,
                    generator: torch.Generator) -> dict[str, float]:
    r"""What the statistics do to DPM-Solver-v3 at ``nfe`` evaluations, measured on ``count`` starts.

    Median per-sample RMS errors against a 40-call third-order DPM-Solver++ solve of the same
    starts: ``v3`` with these EMS, ``dpm_solver++`` (the second-order multistep solver on the
    same grid kind, what v3 improves on) and ``noise`` = the median RMS of
    :math:`(x_1 - x_2)/2` between v3 with the two half-sample EMS, an estimate of the part of
    the v3 error due to the statistics' sampling noise (an upper estimate: the half-sample
    statistics are noisier than √2× the full ones where the fit is nonlinear in its noise;
    ``nan`` where a half-sample fit is not finite). Costs (40 + 4·nfe)·count model
    evaluations.
    """
    x0 = path.prior_sample((count, *shape), generator=generator, dtype=dtype, device=device)
    common = dict(t_start=t0, t_end=t1, cond=cond, check_finite=False)
    ref = sample(field, x0, solver="dpm-solver++3m", nfe=40, **common).x

    def rms(x: Tensor, y: Tensor) -> float:
        return float((x - y).flatten(1).pow(2).mean(1).sqrt().median())

    v3 = [sample(field, x0, solver="dpm-solver-v3", nfe=nfe, ems=e, **common).x for e in (ems, *halves)]
    base = sample(field, x0, solver="dpm-solver++", nfe=nfe, **common).x
    out = {"nfe": nfe, "count": count, "v3": rms(v3[0], ref), "dpm_solver++": rms(base, ref),
           "noise": rms(v3[1], v3[2]) / 2 if len(v3) == 3 else float("nan")}
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in out.items()}


def estimate_ems(field: Any, data: Any, *, num_lambdas: int = 200, num_samples: int = 64, batch_size: int = 256,
                 hutchinson: bool | str | None = "auto", probes: int = 1, smooth: int = 0, t_start: float | None = None,
                 t_end: float | None = None, guidance_scale: float | None = None, cond: dict | None = None,
                 dtype: torch.dtype | None = None, progress: bool = True,
                 generator: torch.Generator | None = None, derivatives: str = "jvp", fd_step: float | None = None,
                 max_error: float | None = 2.0, shrink: bool = False, points: str = "fresh",
                 bandwidth: float = 1.0, check: int | None = 64, check_nfe: int = 5,
                 record: Callable[..., None] | None = None) -> EMS:
    r"""Estimate the empirical model statistics l, s, b of ``field`` from ``data`` (Zheng et al. 2023, §3.2).

    On ``num_lambdas`` knots uniform in λ between ``t_start`` and ``t_end`` (default the path's
    safe interval), data noised along the path, :math:`x_\lambda = \alpha x_1 + \sigma z`, give

    * :math:`l = E[\sigma\,\mathrm{diag}\nabla_x\hat\varepsilon]`: the exact diagonal (one
      forward-mode JVP (:func:`jvp`) per basis vector) or Hutchinson's estimator
      :math:`E[\sigma\,v\odot(\nabla_x\hat\varepsilon\,v)]` with Rademacher ``v``
      (``hutchinson``: ``"auto"`` = exact up to :data:`EXACT_DIAGONAL_MAX_DIM` dimensions);
    * :math:`l' = dl/dλ`;
    * :math:`f = e^{-\lambda}\hat\varepsilon - l\,x/\alpha` and
      :math:`f^{(1)} = e^{-\lambda}((l - 1)\hat\varepsilon + \hat\varepsilon_\lambda) - l'x/\alpha`,
      with :math:`\hat\varepsilon_\lambda` the total derivative along the ODE (one JVP with
      tangent :math:`(dx/dλ, dt/dλ)`, batched with the probes' JVPs by :func:`torch.func.vmap`);
      :math:`s = \mathrm{Cov}(f, f^{(1)})/\mathrm{Var}(f)`, :math:`b = E f^{(1)} - s E f` per
      dimension (``s = 0`` where f does not vary).

    **Two estimators.** ``points="fresh", bandwidth > 0`` (the default): new points, noise and
    probes at every knot, so that the per-knot estimates are independent, and one local fit
    across the knots within ``bandwidth`` in λ (:func:`_pooled_statistics`: local cubic l and l′,
    a regression slope s pooled over the window with a local linear trend, local cubic b). The window
    averages the noise of about ``bandwidth·num_lambdas/range`` knots, so few points per knot
    suffice; its bias is the smoothing bias of the statistics on the scale ``bandwidth``.
    ``points="common", bandwidth=0`` (the former default): the same points at every knot
    (common random numbers, smooth in λ, the noise does not average across knots), per-knot
    statistics, l′ by central differences (``smooth = 0``) or a local quadratic over ±``smooth``
    knots; it needs about 8× the model evaluations for the same v3 accuracy on the digits UNet
    (docs/ems.md). f and f⁽¹⁾ are linear in l, l′, so running moments of three vectors in a single
    pass suffice for both.

    **Quality.** ``settings["error_estimate"]``: standard errors of l, s, b from two half-sample
    estimates (:func:`_error_estimate`). ``settings["quality"]`` (``check`` starts, default 64):
    DPM-Solver-v3 with these statistics at ``check_nfe`` evaluations against a 40-call
    third-order solve, next to DPM-Solver++ on the same starts, and the part of the v3 error due
    to the statistics' sampling noise (:func:`_sampling_check`); a ``UserWarning`` says when the
    statistics do not beat DPM-Solver++ there (too noisy, or too few knots, to help).

    **Class-conditional networks.** Every point is evaluated under one class in every call:
    the data's label where ``data`` has labels (a dataset with ``.x`` and ``.y``), else a
    stratified draw (``settings["labels"]``). A network that picks classes by batch size would
    otherwise mix classes between the call that gives the ODE direction and the JVPs.

    Arguments:
        field: a :class:`~flowdiff.Field` (or any object with ``path`` and ``noise``/``denoise``).
        data: training data ``(N, *shape)``, a dataset (``.x``), an oracle with
            ``.sample(n, generator=...)`` or a callable ``(n, generator) -> tensor``.
        num_lambdas: knots (the official scripts use 120–1200). The cost is proportional to
            ``num_lambdas × num_samples``.
        num_samples: data points per knot (the official scripts use 1024–4096 with fresh points
            and a ±5-knot moving average of l′).
        batch_size: points per model call.
        hutchinson: ``True``/``False``/``None`` (False and None: exact diagonal) or ``"auto"``.
        probes: Rademacher probes per point for Hutchinson.
        smooth: half-width (in knots) of the local fit that gives l′.
        t_start, t_end: the interval the statistics cover (must contain every sampling grid).
        guidance_scale: recorded with the statistics (one set per guidance scale); default the
            field's ``guidance_scale`` attribute if it has one.
        cond: conditioning keywords for the model.
        dtype: dtype of the model inputs (default: the data's).
        progress: show a progress bar (tqdm) over the knots.
        generator: for the data draw, the noise and the probes.
        derivatives: ``"jvp"`` (forward-mode AD) or ``"fd"`` (forward differences of step
            ``fd_step``: 3 forward passes per point instead of 1 + a JVP of twice the batch; equal
            to the JVPs to 1e-4 in float64, too inaccurate in float32 — see docs/dpm_v3.md).
        fd_step: the difference step (in λ along the ODE; ``fd_step·σ`` along the probes);
            default 1e-3 (float32) or 1e-6 (float64).
        max_error: warn (``UserWarning`` naming the settings and the values) when the estimated
            error ``settings["error_estimate"]["solver"]`` exceeds it; ``None``: never.
        shrink: shrink ``s`` by its standard error (``bandwidth = 0`` only; see :func:`_statistics`).
        points: ``"fresh"`` or ``"common"`` (see above).
        bandwidth: half-width in λ of the fit across knots; 0: per-knot statistics.
        check: starts of the sampling check (``None`` or 0: no check).
        check_nfe: the evaluations of that check.
        record: called as ``record(k, lo, A, B, C, l_rows)`` with every batch's per-point rows
            (benchmarks; see :func:`_rows`).

    The standard errors of the statistics, from two half-sample estimates, are in
    ``ems.settings["error_estimate"]`` (see :func:`_error_estimate`).

    Returns:
        :class:`EMS`, with the cost (seconds, model calls, JVP calls) in ``ems.cost``.
    """
    path = require_gaussian_path(field, "estimate_ems")
    for label, value, low in (("num_lambdas", num_lambdas, 2), ("num_samples", num_samples, 2),
                              ("batch_size", batch_size, 1), ("probes", probes, 1), ("smooth", smooth, 0)):
        check_int(label, value, low)
    if hutchinson not in HUTCHINSON_CHOICES:
        raise ValueError(f"hutchinson must be one of {HUTCHINSON_CHOICES}, got {hutchinson!r}")
    if derivatives not in DERIVATIVE_CHOICES:
        raise ValueError(f"derivatives must be one of {DERIVATIVE_CHOICES}, got {derivatives!r}")
    if fd_step is not None:
        check_float("fd_step", fd_step, 0.0, 1.0, low_open=True)
    if points not in POINTS_CHOICES:
        raise ValueError(f"points must be one of {POINTS_CHOICES}, got {points!r}")
    check_float("bandwidth", bandwidth, 0.0)
    if check is not None:
        check_int("check", check, 0)
    check_int("check_nfe", check_nfe, 2)
    if max_error is not None:
        check_float("max_error", max_error, 0.0, low_open=True)
    t0, t1 = interval(field, None, t_start, t_end)
    ends = finite_log_snr(path, t0, t1, "estimate_ems")
    cond = dict(cond or {})
    if guidance_scale is None:
        guidance_scale = getattr(field, "guidance_scale", None)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    start = time.perf_counter()
    nfe0 = getattr(field, "nfe", 0)
    x1, labels = _draw_data(data, num_samples, gen)
    if not isinstance(x1, Tensor) or x1.ndim < 2 or x1.shape[0] != num_samples:
        raise ValueError(f"the data source returned {type(x1).__name__} of shape {getattr(x1, 'shape', None)}, expected ({num_samples}, *shape)")
    work_dtype = dtype or (x1.dtype if x1.is_floating_point() else torch.get_default_dtype())
    device = x1.device
    shape = tuple(x1.shape[1:])
    dim = int(np.prod(shape))
    exact = hutchinson in (None, False) or (hutchinson == "auto" and dim <= EXACT_DIAGONAL_MAX_DIM)
    if fd_step is None:  # about sqrt of the unit round-off: ~1e-3 relative error of the differences
        fd_step = 1e-6 if work_dtype == torch.float64 else 1e-3
    num_classes = model_num_classes(getattr(field, "model", None))
    label_source = None
    if num_classes is not None and "y" not in cond:
        # A class-conditional network: every point is evaluated under one class in every call (a
        # network that draws classes by batch size would mix classes between the calls), its
        # own where the data has labels.
        label_source = "data" if labels is not None else "stratified"

    def draw(first: bool) -> tuple[Tensor, Tensor | None, Tensor, Tensor | None]:
        """Points, labels, noise and probes for one knot (``points="fresh"``) or all of them."""
        xs, ys = (x1, labels) if first else _draw_data(data, num_samples, gen)
        xs = xs.to(work_dtype)
        if label_source is None:  # an unconditional network (or labels given in cond): the data's labels unused
            ys = None
        elif label_source == "stratified":
            ys = stratified_labels(num_samples, num_classes, generator=gen)
        if ys is not None:
            ys = ys.to(device)
        zs = torch.randn(xs.shape, generator=gen, dtype=work_dtype).to(device)
        vs = None if exact else (torch.randint(0, 2, (probes, *xs.shape), generator=gen) * 2 - 1).to(work_dtype).to(device)
        return xs, ys, zs, vs

    lam = torch.linspace(ends[0], ends[1], num_lambdas, dtype=torch.float64)
    tk = path.t_of_log_snr(lam).clamp(t0, t1)
    tk[0], tk[-1] = t0, t1
    tab = path.table(tk)
    alpha, sigma, d_alpha, d_lam = tab.alpha, tab.sigma, tab.d_alpha, tab.d_log_snr

    # Per knot and dimension: sum of σ·diag estimate, and moments of A = e^{-λ}ε, B = x/α,
    # C = e^{-λ}(ε_λ − ε) (f = A − lB, f⁽¹⁾ = lA + C − l′B), shifted by the first batch's means.
    K = num_lambdas
    # Everything is accumulated separately over the two halves of the points (rows < N/2 and the
    # rest): the half-sample estimates give the statistical error of the statistics.
    l_sum = torch.zeros(2, K, dim, dtype=torch.float64)
    mom = {k: torch.zeros(2, K, dim, dtype=torch.float64) for k in ("A", "B", "C", "AA", "BB", "CC", "AB", "AC", "BC")}
    half_n = num_samples // 2
    shift = {k: torch.zeros(K, dim, dtype=torch.float64) for k in ("A", "B", "C")}
    jvp_calls = 0
    bar = None
    if progress:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=K, desc="EMS", unit="λ", leave=False)
        except ImportError:
            bar = None
    xs, ys, zs, vs = draw(True)
    with torch.no_grad():
        for k in range(K):
            if points == "fresh" and k > 0:
                xs, ys, zs, vs = draw(False)
            a, s = float(alpha[k]), float(sigma[k])
            dlog_a = float(d_alpha[k]) / a / float(d_lam[k])  # d log α / dλ
            dt = 1.0 / float(d_lam[k])  # dt / dλ
            for lo in range(0, num_samples, batch_size):
                hi = min(lo + batch_size, num_samples)
                xb = a * xs[lo:hi] + s * zs[lo:hi]
                n = hi - lo
                tb = torch.full((n,), float(tk[k]), dtype=work_dtype, device=device)
                yb = None if ys is None else ys[lo:hi]

                def make_eps(copies: int, yb: Tensor | None = yb) -> Callable[[Tensor, Tensor], Tensor]:
                    return _noise_fn(field, path, cond if yb is None else {**cond, "y": yb.repeat(copies)})

                A, B, C, l_rows, calls = _rows(make_eps, xb, tb, a, s, float(lam[k]), dlog_a, dt,
                                               None if vs is None else vs[:, lo:hi], derivatives, fd_step)
                jvp_calls += calls
                if record is not None:
                    record(k, lo, A, B, C, l_rows)
                if lo == 0:
                    shift["A"][k], shift["B"][k], shift["C"][k] = A.mean(0), B.mean(0), C.mean(0)
                A, B, C = A - shift["A"][k], B - shift["B"][k], C - shift["C"][k]
                split = min(max(half_n - lo, 0), n)  # rows of this batch in the first half
                for key, val in (("A", A), ("B", B), ("C", C), ("AA", A * A), ("BB", B * B), ("CC", C * C), ("AB", A * B),
                                 ("AC", A * C), ("BC", B * C), ("l", l_rows)):
                    acc = l_sum if key == "l" else mom[key]
                    acc[0, k] += val[:split].sum(0)
                    acc[1, k] += val[split:].sum(0)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    counts = (float(half_n), float(num_samples - half_n))

    def fit(l_part: Tensor, mom_part: dict[str, Tensor], count: float) -> tuple[Tensor, Tensor, Tensor]:
        if bandwidth > 0:
            return _pooled_statistics(l_part, mom_part, shift, count, lam, bandwidth)
        return _statistics(l_part, mom_part, shift, count, lam, smooth, shrink)

    l, s_stat, b_stat = fit(l_sum.sum(0), {k: m.sum(0) for k, m in mom.items()}, float(num_samples))
    halves = [fit(l_sum[i], {k: m[i] for k, m in mom.items()}, counts[i]) for i in range(2)]
    error = _error_estimate(lam, (l, s_stat, b_stat), halves)
    if max_error is not None and error["solver"] > max_error:
        warnings.warn(
            f"EMS from num_lambdas={num_lambdas} knots x num_samples={num_samples} points are too noisy to help "
            f"DPM-Solver-v3: estimated error of the step integrals {error['solver']:.3g} > max_error={max_error} "
            f"(standard errors from two half-sample estimates: l {error['l']:.3g}, s {error['s']:.3g}, "
            f"b {error['b']:.3g}); use more samples (and knots)", stacklevel=2)

    base_settings = {"path": path.config(), "t_start": t0, "t_end": t1}
    ems = EMS(lam, l.reshape(K, *shape), s_stat.reshape(K, *shape), b_stat.reshape(K, *shape), base_settings)
    quality = None
    if check:
        finite = all(bool(torch.isfinite(v).all()) for half in halves for v in half)
        halves_ems = [EMS(lam, *(v.reshape(K, *shape) for v in half), base_settings) for half in halves] if finite else []
        quality = _sampling_check(field, path, ems, halves_ems, shape, t0, t1, cond, work_dtype, device, check,
                                  check_nfe, torch.Generator(device=gen.device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen))))
        if not quality["v3"] < quality["dpm_solver++"]:  # a non-finite v3 error warns too
            warnings.warn(
                f"EMS from num_lambdas={num_lambdas} knots x num_samples={num_samples} points do not help DPM-Solver-v3: "
                f"at {check_nfe} NFE on {check} starts its error is {quality['v3']:.3g} against {quality['dpm_solver++']:.3g} "
                f"for DPM-Solver++ (of which about {quality['noise']:.3g} from the statistics' sampling noise); use "
                f"more samples and knots, or DPM-Solver++", stacklevel=2)

    seconds = time.perf_counter() - start
    model_calls = getattr(field, "nfe", 0) - nfe0
    settings = {
        **base_settings, "num_lambdas": num_lambdas, "num_samples": num_samples,
        "hutchinson": not exact, "probes": probes if not exact else 0, "smooth": smooth,
        "guidance_scale": None if guidance_scale is None else float(guidance_scale),
        "prediction": getattr(field, "prediction", None), "dtype": str(work_dtype).replace("torch.", ""),
        "derivatives": derivatives, "shrink": bool(shrink), "points": points, "bandwidth": float(bandwidth),
        "labels": label_source, "fd_step": fd_step if derivatives == "fd" else None,
        "error_estimate": error, "quality": quality,
        "cost": {"seconds": round(seconds, 3), "model_calls": int(model_calls), "jvp_calls": jvp_calls},
    }
    return EMS(lam, l.reshape(K, *shape), s_stat.reshape(K, *shape), b_stat.reshape(K, *shape), settings)


