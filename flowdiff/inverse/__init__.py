"""Inverse problems with a diffusion/flow prior: forward operators and posterior samplers.

``fd.inverse.sample_posterior(field, operator, y, sigma_y=..., method=..., num_samples=..., nfe=...)``
is the one entry point; ``fd.inverse.available()`` lists the methods.
"""

from .api import PosteriorResult, available, describe, register, sample_posterior

__all__ = ["PosteriorResult", "available", "describe", "register", "sample_posterior"]
