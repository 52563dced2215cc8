"""flowdiff: generative models on stochastic interpolants and SDEs.

Time runs from the base (noise) at ``t = 0`` to the data at ``t = 1``; see DESIGN.md.
"""

from . import couplings, data, fokker_planck, likelihood, losses, metrics, nn, paths, solvers, testing, train
from . import inverse  # operators and posterior samplers
from . import forward_models  # priors learned from indirect observations (EM)
from . import interop  # diffusers models as fields; imports no diffusers itself
from . import particles, rl, steer  # reward steering and RL fine-tuning (issue 15)
from . import graphs, timeseries, trajectories, pde  # other modalities (issues 16, 17, 21)
from . import certify, quant  # deployment and trust (issue 19)
from . import flowmaps, fractional, mean_reverting  # more SDE families and few-step generation (issue 18)
from .fields import Field, InterpolantField
from .paths import GaussianPath, StochasticInterpolant
from .likelihood import bits_per_dim, log_likelihood, sample_with_logp
from .solvers import SampleResult, sample

__version__ = "0.1.0"

__all__ = [
    "paths", "testing", "solvers", "losses", "couplings", "nn", "data", "metrics", "train",
    "likelihood", "fokker_planck", "interop", "inverse", "forward_models", "particles", "steer", "rl",
    "graphs", "timeseries", "trajectories", "pde", "certify", "quant", "flowmaps", "fractional", "mean_reverting", "log_likelihood", "bits_per_dim", "sample_with_logp",
    "Field", "InterpolantField", "GaussianPath", "StochasticInterpolant", "sample", "SampleResult", "__version__",
]
