r"""Reward steering at inference time: Feynman–Kac SMC, best-of-N, beam search, RBF, gradient guidance.

One entry point, :func:`sample`::

    res = fd.steer.sample(field, reward, method="smc", num_samples=256, nfe=500, temperature=0.5)
    res.x, res.reward, res.nfe   # samples, their rewards, model evaluations spent per sample

``reward(x) -> (B,)`` is evaluated on the denoised estimate :math:`\hat x(x_t)` during sampling.
``smc`` targets the tilted law :math:`p(x)\,e^{r(x)/\beta}/Z` exactly (as its particle count
grows); ``bon``, ``beam`` and ``rbf`` search for high reward; ``dps`` is gradient guidance.
:func:`available` lists the methods; see :mod:`flowdiff.steer.methods` for each one's options
and :mod:`flowdiff.particles` for the weights and resampling.
"""

from .api import MethodSpec, Reward, SteerResult, available, describe, register, sample
from .kernels import MIN_STEPS, Schedule, evaluation_grid
from .methods import POTENTIALS, plan

__all__ = ["sample", "available", "describe", "register", "SteerResult", "MethodSpec", "Reward", "plan",
           "POTENTIALS", "MIN_STEPS", "Schedule", "evaluation_grid"]
