r"""The transitions every steering method moves particles with: the DDIM-η family on any Gaussian path.

From :math:`x_t` with denoised estimate :math:`\hat x = E[x_1 \mid x_t]` to a later time
:math:`s > t` (toward the data), with :math:`\hat\varepsilon = (x_t - \alpha_t\hat x)/\sigma_t`
(Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models", eq. 12, in this library's time):

.. math::

    x_s = \alpha_s\hat x + \sqrt{\sigma_s^2 - v}\ \hat\varepsilon + \sqrt v\,z, \qquad
    v = \eta^2\,\sigma_s^2\Big(1 - \frac{\alpha_t^2\sigma_s^2}{\alpha_s^2\sigma_t^2}\Big),\quad z \sim N(0, I).

``η = 0`` is the deterministic DDIM step (first-order exponential integrator of the probability-flow
ODE); ``η = 1`` is the ancestral (DDPM) step, the Gaussian reverse kernel :math:`p(x_s \mid x_t)`
of the path; every ``η`` keeps the path's marginals for an exact denoiser as the steps shrink
(the marginal-preserving SDE family of flows, notes §1). Written as
:math:`x_s = c_x x_t + c_{\hat x}\hat x + \sqrt v z` with :math:`c_x = \sqrt{\sigma_s^2 - v}/\sigma_t`,
:math:`c_{\hat x} = \alpha_s - c_x\alpha_t`. With ``order=2`` the data term uses the
DPM-Solver++(2M) extrapolation :math:`\hat x + \tfrac{h}{2h'}(\hat x - \hat x')` of the previous
estimate :math:`\hat x'` (Lu et al. 2022, "DPM-Solver++"), :math:`h` the log-SNR step.

Evaluation grid: ``S`` times uniform in log-SNR from the path's ``t_min`` (noise) to ``t_max``
(data); a trajectory of ``S`` model evaluations denoises at each and returns the last estimate
:math:`\hat x(x_{t_{S-1}})`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["MIN_STEPS", "GRIDS", "Schedule", "evaluation_grid", "randn"]

#: the fewest model evaluations one trajectory may have (noise, two intermediate estimates, data).
MIN_STEPS = 4


GRIDS = ("log_snr", "vp", "time")


def evaluation_grid(path: Any, evals: int, kind: str = "log_snr") -> Tensor:
    """``evals`` times from ``t_min`` to ``t_max`` (float64).

    ``kind``: ``"log_snr"`` uniform in log-SNR; ``"vp"`` the log-SNRs of a uniform time grid of the
    VP path (β from 0.1 to 20), clipped to this path's range — the grid of the RBF paper's
    linear-to-VP interpolant conversion (Kim et al. 2025, §2.2 of the notes: more steps at low
    SNR, where the modes are chosen); ``"time"`` uniform in ``t``.
    """
    t_lo, t_hi = path.safe_interval
    if kind not in GRIDS:
        raise ValueError(f"grid must be one of {', '.join(GRIDS)}, got {kind!r}")
    if evals == 1:
        return torch.tensor([t_hi], dtype=torch.float64)
    if kind == "time":
        return torch.linspace(t_lo, t_hi, evals, dtype=torch.float64)
    lam_lo, lam_hi = float(path.log_snr(t_lo)), float(path.log_snr(t_hi))
    if kind == "vp":
        vp_lo, vp_hi = 0.0, 1.0 - 1e-3
        tab = torch.linspace(vp_lo, vp_hi, evals, dtype=torch.float64)
        s = 1 - tab
        log_alpha = -0.25 * s**2 * (20.0 - 0.1) - 0.5 * s * 0.1
        lam = (log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha)))
        # stretch VP's log-SNR range onto this path's, keeping the VP spacing
        lam = lam_lo + (lam - lam[0]) * (lam_hi - lam_lo) / (lam[-1] - lam[0])
    else:
        lam = torch.linspace(lam_lo, lam_hi, evals, dtype=torch.float64)
    t = path.t_of_log_snr(lam).to(torch.float64)
    t[0], t[-1] = t_lo, t_hi
    return t


@dataclass
class Schedule:
    """Coefficients of the DDIM-η step between consecutive grid times (index ``j``: from ``times[j]`` to ``times[j+1]``).

    Attributes:
        times: ``(S,)`` evaluation times; alpha, sigma: at those times;
        c_x, c_hat, var: ``(S-1,)`` the step ``x' = c_x x + c_hat x̂ + sqrt(var) z``;
        h: ``(S-1,)`` log-SNR steps (for the second-order data term).
    """

    times: Tensor
    alpha: Tensor
    sigma: Tensor
    c_x: Tensor
    c_hat: Tensor
    var: Tensor
    h: Tensor
    eta: float

    @classmethod
    def build(cls, path: Any, evals: int, eta: float, grid: str = "log_snr") -> "Schedule":
        times = evaluation_grid(path, evals, grid)
        tab = path.table(times)
        a, s = tab.alpha.to(torch.float64), tab.sigma.to(torch.float64)
        a_t, s_t, a_s, s_s = a[:-1], s[:-1], a[1:], s[1:]
        var = (eta * eta) * s_s**2 * (1 - (a_t * s_s / (a_s * s_t)) ** 2)
        var = var.clamp(min=0.0).minimum(s_s**2)
        c_x = torch.sqrt((s_s**2 - var).clamp_min(0.0)) / s_t
        c_hat = a_s - c_x * a_t
        lam = tab.log_snr.to(torch.float64)
        return cls(times, a, s, c_x, c_hat, var, lam[1:] - lam[:-1], float(eta))

    def __len__(self) -> int:
        return int(self.times.shape[0])

    def t(self, j: int) -> float:
        return float(self.times[j])

    def data_term(self, j: int, xhat: Tensor, prev: Tensor | None, order: int) -> Tensor:
        """The data estimate used by step ``j``: ``x̂`` or the 2M extrapolation with the previous one."""
        if order < 2 or prev is None or j == 0:
            return xhat
        return xhat + (xhat - prev) * (0.5 * float(self.h[j]) / float(self.h[j - 1]))

    def mean(self, j: int, x: Tensor, data: Tensor) -> Tensor:
        """Mean of step ``j`` from ``x`` at ``times[j]`` with data term ``data``."""
        return float(self.c_x[j]) * x + float(self.c_hat[j]) * data

    def std(self, j: int) -> float:
        return math.sqrt(float(self.var[j]))


def randn(shape: tuple[int, ...], generator: torch.Generator | None, dtype: torch.dtype,
          device: torch.device) -> Tensor:
    """Standard normal draws; on the generator's device, moved to ``device`` (a seed gives the same numbers anywhere)."""
    gen_dev = generator.device if generator is not None else torch.device(device)
    return torch.randn(shape, generator=generator, dtype=dtype, device=gen_dev).to(device)
