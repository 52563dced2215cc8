"""PDE solution fields: Random Grid Neural Processes (Vadeboncoeur et al., ICML 2023) for forward and inverse problems,
with reference solvers (issue 21).

* :class:`Problem` — a parametric PDE with hard Dirichlet constraints; :func:`sensors` — sensor points and readings.
* :func:`poisson`, :func:`burgers`, :func:`cavity` — the paper's three problems with their own reference solvers
  (:mod:`flowdiff.pde.reference`); :func:`get` by name.
* :class:`RGNP` — the random-grid neural process: physics-only ELBO, closed-form predictive with a calibrated std,
  amortised GICNet inverse (:meth:`RGNP.invert`) and the surrogate Bayesian posterior (:meth:`RGNP.posterior`).
* :class:`GICNet` — the grid-invariant convolutional network.
* :class:`PDDLVM` (fixed grid) and :class:`PINN` (deterministic, residual MSE) — physics-informed baselines;
  :class:`DiffusionPrior` — a flowdiff diffusion prior over (z, w, u on a mesh) trained on solver pairs, sampled
  through :mod:`flowdiff.inverse` (with optional DiffusionPDE residual guidance).
* :func:`gold_posterior` — MCMC with the reference solver; :func:`collocation_solve` — a spectral solver built from
  a problem's own residual (1-D).
"""

from .collocation import collocation_solve
from ..nn.gicnet import GICNet
from .mcmc import PriorModel, gold_posterior, sample_posterior
from .problem import Problem, grad, sensors
from .problems import available, burgers, cavity, get, poisson
from .rgnp import RGNP, NonFiniteTrainingError
from .baselines import PDDLVM, PINN
from .diffusion_prior import DiffusionPrior

__all__ = ["Problem", "sensors", "grad", "poisson", "burgers", "cavity", "get", "available", "RGNP", "GICNet",
           "NonFiniteTrainingError", "gold_posterior", "sample_posterior", "PriorModel", "collocation_solve",
           "PDDLVM", "PINN", "DiffusionPrior"]
