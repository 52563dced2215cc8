"""Mean-reverting SDEs (IR-SDE, Luo et al., ICML 2023) and their semi-analytic MRS sampler (Li et al., ICLR 2025) (issue 18).

>>> path = fd.mean_reverting.IRSDE(stationary_std=0.5)                          # doctest: +SKIP
>>> res = fd.mean_reverting.mrs_sample(model, mu, path, "noise", kind="ode", form="data", order=2, nfe=10)  # doctest: +SKIP

* :mod:`.sde`: the IR-SDE as a Gaussian path of ``y = x − μ`` (θ schedules, stationary std λ);
* :mod:`.field`: a network ``model(x, t, mu=μ)`` as a field of ``y``; exact mixture networks;
* :mod:`.sampling`: MRS (shift – solve – unshift of the exponential integrators) and the baselines;
* :mod:`.train`: the conditional training loss, a μ-conditioned UNet, and the digits restoration tasks;
* :mod:`.restore`: train / save / load a restoration model (``flowdiff restore-train``, ``flowdiff restore --method mrs``).
"""

from .field import MU, ShiftedModel, check_mu, mixture_model, shifted_field
from .restore import (
    RESTORATION_FILE, build_restoration_model, is_restoration_folder, load_restoration_model, save_restoration_model,
    train_restoration,
)
from .sampling import BASELINES, DEFAULT_SOLVER, MRS_SOLVERS, mrs_grid, mrs_sample, mrs_solver
from .sde import IRSDE, SCHEDULES
from .train import DEGRADATIONS, MeanConditioned, degrade, mean_reverting_loss

__all__ = [
    "DEFAULT_SOLVER", "mrs_grid", "RESTORATION_FILE", "build_restoration_model", "is_restoration_folder",
    "load_restoration_model", "save_restoration_model", "train_restoration",
    "BASELINES", "DEGRADATIONS", "IRSDE", "MRS_SOLVERS", "MU", "MeanConditioned", "SCHEDULES", "ShiftedModel",
    "check_mu", "degrade", "mean_reverting_loss", "mixture_model", "mrs_sample", "mrs_solver", "shifted_field",
]
