r"""Time samplers: the distribution of training times ``t`` and its importance weights.

A sampler returns ``(t, weight)``, both of shape ``(n,)``; the loss multiplies each sample's
loss by ``weight``. Samplers that *define* the time distribution of the objective return unit
weights:

* :class:`UniformTime`: :math:`t \sim U[t_{min}, t_{max}]`;
* :class:`LogitNormalTime`: :math:`t = \mathrm{sigmoid}(m + s\,n)`, :math:`n \sim N(0, 1)`
  (Esser et al. 2024, "Scaling Rectified Flow Transformers for High-Resolution Image
  Synthesis", SD3);
* :class:`EDMTime`: EDM's log-normal noise level :math:`\ln\tilde\sigma \sim N(P_{mean}, P_{std}^2)`,
  :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}` (Karras et al. 2022, "Elucidating the Design
  Space of Diffusion-Based Generative Models").

:class:`ImportanceTime` draws from any density :math:`q` on :math:`[t_{min}, t_{max}]` and returns
the likelihood ratio :math:`w = (t_{max} - t_{min})^{-1}/q(t)`, which keeps the *uniform-time*
objective unbiased: :math:`E_q[w\,\ell] = E_U[\ell]`. The losses clip sampled times into the
path's safe interval ``[t_min, t_max]``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .._utils import check_float, check_int
from ..paths import GaussianPath, StochasticInterpolant

__all__ = [
    "TIME_SAMPLERS",
    "EDMTime",
    "ImportanceTime",
    "LogitNormalTime",
    "TimeSampler",
    "UniformTime",
    "available_time_samplers",
    "make_time_sampler",
    "time_sampler_from_config",
]

#: Named time samplers accepted as ``time_sampler=`` strings.
TIME_SAMPLERS = ("uniform", "logit-normal", "edm")


def available_time_samplers() -> tuple[str, ...]:
    """Names accepted by ``time_sampler=`` (``"edm"`` only for Gaussian paths)."""
    return TIME_SAMPLERS


def _check_unit_interval(t_min: float, t_max: float) -> tuple[float, float]:
    t_min, t_max = check_float("t_min", t_min, 0.0, 1.0), check_float("t_max", t_max, 0.0, 1.0)
    if not t_min < t_max:
        raise ValueError(f"need 0 <= t_min < t_max <= 1, got t_min={t_min!r}, t_max={t_max!r}")
    return t_min, t_max


class TimeSampler:
    """Draws training times ``t`` and importance weights.

    ``sample(n, generator, dtype, device) -> (t, weight)``, both of shape ``(n,)``: the loss
    multiplies each sample by ``weight``. Samplers that *define* the time distribution of the
    objective (uniform, logit-normal, EDM) return unit weights; :class:`ImportanceTime`
    returns the likelihood ratio that keeps the uniform-time objective unbiased.
    """

    t_min: float = 0.0
    t_max: float = 1.0

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def config(self) -> dict:
        """A JSON-serialisable description (see :func:`time_sampler_from_config`)."""
        raise TypeError(f"{type(self).__name__} has no config; give it a config() method to record it in checkpoints")

    @staticmethod
    def _check_n(n: int) -> int:
        return check_int("n", n, 1)


class UniformTime(TimeSampler):
    """``t ~ U[t_min, t_max]`` with unit weights."""

    def __init__(self, t_min: float = 0.0, t_max: float = 1.0):
        self.t_min, self.t_max = _check_unit_interval(t_min, t_max)

    def __repr__(self) -> str:
        return f"UniformTime(t_min={self.t_min!r}, t_max={self.t_max!r})"

    def config(self) -> dict:
        return {"name": "uniform", "t_min": self.t_min, "t_max": self.t_max}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        u = torch.rand(n, generator=generator, dtype=dtype, device=device)
        return self.t_min + (self.t_max - self.t_min) * u, torch.ones(n, dtype=dtype, device=device)


class LogitNormalTime(TimeSampler):
    r"""Logit-normal times :math:`t = \mathrm{sigmoid}(m + s\,n)`, :math:`n \sim N(0, 1)`, unit weights.

    Esser et al. 2024 ("Scaling Rectified Flow Transformers for High-Resolution Image
    Synthesis", SD3) found ``m = 0, s = 1`` best for rectified flow: it concentrates training on
    intermediate times. Their convention has noise at t = 1; ours has noise at t = 0, so
    ``mean = m`` here corresponds to ``−m`` there. CDF:
    :math:`F(t) = \Phi((\mathrm{logit}(t) - m)/s)`.
    """

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        self.mean = check_float("mean", mean)
        self.std = check_float("std", std, 0.0, low_open=True)

    def __repr__(self) -> str:
        return f"LogitNormalTime(mean={self.mean!r}, std={self.std!r})"

    def config(self) -> dict:
        return {"name": "logit-normal", "mean": self.mean, "std": self.std}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        z = torch.randn(n, generator=generator, dtype=dtype, device=device)
        return torch.sigmoid(self.mean + self.std * z), torch.ones(n, dtype=dtype, device=device)


class EDMTime(TimeSampler):
    r"""EDM's training noise levels (Karras et al. 2022): :math:`\ln\tilde\sigma \sim N(P_{mean}, P_{std}^2)`.

    With :math:`\tilde\sigma = \sigma/\alpha = e^{-\lambda}`, the time is
    ``t = path.t_of_log_snr(−ln σ̃)``, so the same distribution of noise levels is used on any
    Gaussian path. Unit weights. Noise levels outside the path's range are clipped by the loss
    to its safe interval. Defaults ``P_mean = −1.2``, ``P_std = 1.2`` are EDM's.
    """

    def __init__(self, path: GaussianPath, p_mean: float = -1.2, p_std: float = 1.2):
        if not isinstance(path, GaussianPath):
            raise TypeError(f"EDMTime needs a flowdiff.paths.GaussianPath, got {type(path).__name__}")
        self.path = path
        self.p_mean = check_float("p_mean", p_mean)
        self.p_std = check_float("p_std", p_std, 0.0, low_open=True)
        self.t_min, self.t_max = path.t_min, path.t_max

    def __repr__(self) -> str:
        return f"EDMTime({self.path!r}, p_mean={self.p_mean!r}, p_std={self.p_std!r})"

    def config(self) -> dict:
        # The path is recorded by the loss that owns the sampler.
        return {"name": "edm", "p_mean": self.p_mean, "p_std": self.p_std}

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        log_sigma = self.p_mean + self.p_std * torch.randn(n, generator=generator, dtype=dtype, device=device)
        t = self.path.t_of_log_snr(-log_sigma)
        return t.clamp(self.t_min, self.t_max), torch.ones(n, dtype=dtype, device=device)


class ImportanceTime(TimeSampler):
    r"""Importance sampling of ``t`` from a density ``q`` on ``[t_min, t_max]``, unbiased for uniform time.

    The objective stays :math:`E_{t\sim U[t_{min}, t_{max}]}[\ell(t)]`: times are drawn from
    ``q`` and each sample gets the likelihood ratio

    .. math::  w(t) = \frac{1/(t_{max} - t_{min})}{q(t)}, \qquad E_q[w\,\ell] = E_U[\ell],\ E_q[w] = 1.

    A good ``q`` is proportional to the typical per-sample loss (e.g. Song et al. 2021 sample
    ∝ the likelihood weight to reduce the variance of the likelihood objective).

    ``density`` is a callable on ``[t_min, t_max]`` (unnormalised, vectorised over a float64
    tensor) or a table of values on ``num_points`` equally spaced points (``(K,)``, K ≥ 2) from
    ``t_min`` to ``t_max``. Either way ``q`` is the *piecewise-linear* interpolant of the table
    (``num_points = 1025`` samples of a callable), normalised exactly; it is sampled exactly
    by inverting its piecewise-quadratic CDF, so the weights are exact for the ``q`` that is
    really sampled. The density must be finite and > 0 at every table point.
    """

    def __init__(
        self,
        density: Callable[[Tensor], Tensor] | Sequence[float] | Tensor,
        t_min: float = 0.0,
        t_max: float = 1.0,
        num_points: int = 1025,
    ):
        self.t_min, self.t_max = _check_unit_interval(t_min, t_max)
        if callable(density):
            num_points = check_int("num_points", num_points, 2)
            grid = torch.linspace(self.t_min, self.t_max, num_points, dtype=torch.float64)
            values = torch.as_tensor(density(grid), dtype=torch.float64)
            if values.shape != grid.shape:
                raise ValueError(
                    f"density(t) must return one value per time: got shape {tuple(values.shape)} for t of shape {tuple(grid.shape)}"
                )
        else:
            values = torch.as_tensor(density, dtype=torch.float64).flatten().clone()
            if values.numel() < 2:
                raise ValueError(f"a tabulated density needs at least 2 values, got {values.numel()}")
            grid = torch.linspace(self.t_min, self.t_max, values.numel(), dtype=torch.float64)
        if not torch.isfinite(values).all() or (values <= 0).any():
            bad = values[~torch.isfinite(values) | (values <= 0)][0].item()
            raise ValueError(
                f"the importance density must be finite and > 0 on [t_min, t_max] (got {bad!r}); "
                "a zero density would leave times that are never sampled and bias the objective"
            )
        h = grid[1] - grid[0]
        masses = 0.5 * h * (values[1:] + values[:-1])  # trapezoids = exact mass of the linear interpolant
        total = masses.sum()
        self._grid, self._h = grid, float(h)
        self._values = values / total  # normalised density at the grid points
        self._cum = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(masses / total, 0)])
        self._cum[-1] = 1.0

    def __repr__(self) -> str:
        return f"ImportanceTime(num_points={self._grid.numel()}, t_min={self.t_min!r}, t_max={self.t_max!r})"

    def config(self) -> dict:
        # The normalised table defines q exactly, so it rebuilds the same sampler.
        return {"name": "importance", "values": self._values.tolist(), "t_min": self.t_min, "t_max": self.t_max}

    def density(self, t: Tensor) -> Tensor:
        """The normalised sampling density :math:`q(t)` (piecewise linear), same shape as ``t``."""
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu()
        k = ((t64 - self.t_min) / self._h).floor().clamp(0, self._grid.numel() - 2).long()
        frac = (t64 - self._grid[k]) / self._h
        q = self._values[k] * (1 - frac) + self._values[k + 1] * frac
        inside = (t64 >= self.t_min) & (t64 <= self.t_max)
        return torch.where(inside, q, torch.zeros_like(q)).to(torch.as_tensor(t).dtype)

    def cdf(self, t: Tensor) -> Tensor:
        """The exact CDF of :math:`q` (piecewise quadratic)."""
        t64 = torch.as_tensor(t, dtype=torch.float64).cpu().clamp(self.t_min, self.t_max)
        k = ((t64 - self.t_min) / self._h).floor().clamp(0, self._grid.numel() - 2).long()
        u = t64 - self._grid[k]
        qa, qb = self._values[k], self._values[k + 1]
        return self._cum[k] + qa * u + 0.5 * (qb - qa) / self._h * u * u

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> tuple[Tensor, Tensor]:
        n = self._check_n(n)
        dtype = dtype or torch.get_default_dtype()
        r = torch.rand(n, generator=generator, dtype=torch.float64, device=device)
        cum = self._cum.to(r.device)
        values = self._values.to(r.device)
        k = (torch.searchsorted(cum, r, right=True) - 1).clamp(0, values.numel() - 2)
        m = r - cum[k]  # mass to cover inside segment k
        qa, qb = values[k], values[k + 1]
        slope = (qb - qa) / self._h
        # Solve qa·u + ½ slope·u² = m for u in [0, h]; this form is stable for slope of either sign (and 0).
        u = 2 * m / (qa + torch.sqrt(torch.clamp(qa * qa + 2 * slope * m, min=0)))
        u = u.clamp(0, self._h)
        t = self._grid.to(r.device)[k] + u
        q = qa + slope * u
        weight = 1.0 / ((self.t_max - self.t_min) * q)
        return t.to(dtype), weight.to(dtype)


def make_time_sampler(
    sampler: str | TimeSampler,
    path: GaussianPath | StochasticInterpolant | None = None,
) -> TimeSampler:
    """A :class:`TimeSampler` from a name (:data:`TIME_SAMPLERS`) or an instance (returned as is).

    ``"uniform"`` is uniform on the path's safe interval; ``"logit-normal"`` is
    ``LogitNormalTime(0, 1)``; ``"edm"`` is ``EDMTime(path)`` (Gaussian paths only).
    """
    if isinstance(sampler, TimeSampler):
        return sampler
    if not isinstance(sampler, str):
        raise TypeError(f"time_sampler must be a name or a TimeSampler, got {type(sampler).__name__}")
    if sampler not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {sampler!r}; valid: {', '.join(TIME_SAMPLERS)}")
    if sampler == "uniform":
        return UniformTime(*(path.t_min, path.t_max) if path is not None else (0.0, 1.0))
    if sampler == "logit-normal":
        return LogitNormalTime()
    if not isinstance(path, GaussianPath):
        raise ValueError(  # noqa: TRY004 - the name is what is wrong here, not the path's type
            "time_sampler='edm' needs a GaussianPath (noise levels σ/α); valid here: uniform, logit-normal"
        )
    return EDMTime(path)


def time_sampler_from_config(config: dict, path: GaussianPath | StochasticInterpolant | None = None) -> TimeSampler:
    """Rebuild a time sampler from its :meth:`~TimeSampler.config` (``path`` is needed for ``"edm"``)."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name == "uniform":
        return UniformTime(**cfg)
    if name == "logit-normal":
        return LogitNormalTime(**cfg)
    if name == "importance":
        return ImportanceTime(cfg.pop("values"), **cfg)
    if name == "edm":
        if not isinstance(path, GaussianPath):
            raise ValueError("an 'edm' time sampler config needs the GaussianPath it samples for")
        return EDMTime(path, **cfg)
    raise ValueError(f"unknown time sampler config name {name!r}; valid: uniform, logit-normal, importance, edm")
