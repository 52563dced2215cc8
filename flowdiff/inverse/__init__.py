"""Inverse problems with a diffusion/flow prior: forward operators and posterior samplers.

``fd.inverse.sample_posterior(field, operator, y, sigma_y=..., method=..., num_samples=..., nfe=...)``
is the one entry point; ``fd.inverse.available()`` lists the methods (docs/inverse.md).
"""

from .api import PosteriorResult, available, describe, register, sample_posterior
from .operators import SVD, Blur, Colorize, Inpaint, Matrix, Nonlinear, Operator, ParallelBeam, SubsampledFourier, SuperResolution
from . import guided, ddrm, variational, smc, afdps  # noqa: E402,F401  (each registers its methods)

__all__ = [
    "PosteriorResult", "available", "describe", "register", "sample_posterior",
    "SVD", "Operator", "Matrix", "Inpaint", "Blur", "SuperResolution", "Colorize", "SubsampledFourier",
    "ParallelBeam", "Nonlinear",
]
