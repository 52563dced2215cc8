"""flowdiff: generative models on stochastic interpolants and SDEs.

Time runs from the base (noise) at ``t = 0`` to the data at ``t = 1``; see DESIGN.md.
"""

from . import couplings, data, losses, metrics, nn, paths, solvers, testing, train
from .fields import Field, InterpolantField
from .paths import GaussianPath, StochasticInterpolant
from .solvers import SampleResult, sample

__version__ = "0.1.0"

__all__ = [
    "paths", "testing", "solvers", "losses", "couplings", "nn", "data", "metrics", "train",
    "Field", "InterpolantField", "GaussianPath", "StochasticInterpolant", "sample", "SampleResult", "__version__",
]
