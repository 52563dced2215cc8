"""flowdiff: generative models on stochastic interpolants and SDEs.

Time runs from the base (noise) at ``t = 0`` to the data at ``t = 1``; see DESIGN.md.
"""

from . import paths, testing
from .fields import Field, InterpolantField
from .paths import GaussianPath, StochasticInterpolant

__version__ = "0.1.0"

__all__ = ["paths", "testing", "Field", "InterpolantField", "GaussianPath", "StochasticInterpolant", "__version__"]
