r"""SDEs driven by fractional Brownian motion through its Markov approximation (issue 18, part 4).

Daems, Opper, Crevecoeur, Birdal (ICLR 2024), "Variational Inference for SDEs Driven by Fractional Noise".

* :class:`MAfBM` — fBM as a weighted sum of K Ornstein–Uhlenbeck processes sharing one Brownian motion
  (type I Mandelbrot–van Ness / type II Riemann–Liouville), with the closed-form optimal weights ω(H)
  (differentiable in H), the covariance of the approximation and of its target, exact samples.
* :class:`FractionalSDE` — the prior :math:`dX = [-\theta(X-\mu) + f(X,t)]dt + \sigma d\hat B^H` on the augmented
  state (X, Y_1..Y_K), with a learnable Hurst index; :class:`VariationalPosterior` — the controlled posterior
  (:class:`ControlNet` and/or the exact guided control of a linear prior); :func:`elbo`, :func:`fit`;
  :func:`fit_hurst` (learn H: exact likelihood by default, or the ELBO);
  :func:`log_likelihood` (exact, Kalman) and :func:`gp_posterior` (analytic GP posterior) as references.
* :func:`simulate_fbm` (Davies–Harte / Cholesky), :func:`simulate_fou`, :func:`estimate_hurst` (variogram).

Docs and measured numbers: docs/fractional.md; benchmark: benchmarks/fractional.py.
"""

from .markov import MAfBM, check_hurst, fbm_covariance, geometric_speeds, lower_gamma_regularized, ou_step_matrices
from .sde import (
    ControlNet,
    ELBOResult,
    FitResult,
    FractionalSDE,
    VariationalPosterior,
    elbo,
    HURST_METHODS,
    HurstFit,
    fit,
    fit_hurst,
    gp_posterior,
    log_likelihood,
)
from .simulate import estimate_hurst, fgn_autocovariance, simulate_fbm, simulate_fou

__all__ = [
    "MAfBM", "check_hurst", "fbm_covariance", "geometric_speeds", "lower_gamma_regularized", "ou_step_matrices",
    "FractionalSDE", "VariationalPosterior", "ControlNet", "ELBOResult", "FitResult", "elbo", "fit",
    "fit_hurst", "HurstFit", "HURST_METHODS", "log_likelihood", "gp_posterior", "simulate_fbm", "simulate_fou", "estimate_hurst", "fgn_autocovariance",
]
