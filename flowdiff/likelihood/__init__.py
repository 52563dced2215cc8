r"""Exact log-likelihoods through the probability-flow ODE.

**What "the model's distribution" is here.** :func:`log_likelihood` returns the log-density, at
``t_end`` (default ``t_max``, the data side), of the distribution obtained by pushing the *prior* π
placed at ``t_start`` (default ``t_min``, the noise side) through the field's probability-flow ODE
— the time convention of :func:`flowdiff.sample` (``t_start < t_end``, noise → data) in every
function of this package. With the default ``prior="gaussian"`` that prior is
:math:`N(0, \sigma(t_{min})^2 I)`, exactly the law :meth:`~flowdiff.paths.GaussianPath.prior_sample`
draws, so the density is that of what the ODE samplers generate (up to their discretisation).
Passing ``prior=callable`` uses any other log-density at ``t_start``: with the exact marginal
:math:`\log p_{t_{min}}` of an analytic oracle the result *is* :math:`\log p_{t_{max}}(x)` of the
path, which is how the tests check it.

The augmented ODE, its flow coordinates, solvers and divergence estimators are
:mod:`flowdiff.solvers.logp` (also behind ``fd.sample(..., return_logp=True)``); :mod:`.api` adds the
prior term, batching, progress, standard errors and:

**Bits per dimension** (:func:`bits_per_dim`): data on a lattice of ``levels`` values in
``data_range = (lo, hi)`` (spacing :math:`\Delta = (hi - lo)/(levels - 1)`) is dequantised as
:math:`v = x + \Delta(U - \tfrac12)`, :math:`U \sim \mathcal U[0,1)^D`; by Jensen,
:math:`\log P(x) \ge E_U[\log p(v)] + D\log\Delta`, so

.. math::

    \mathrm{bpd}(x) = -\frac{E_U[\log p(v)] + D\log\Delta}{D\ln 2}

is an upper bound on the discrete model's code length (Theis, van den Oord & Bethge 2016; Ho et al.
2019, "Flow++"). For 8-bit images in [-1, 1] the offset :math:`-\log_2\Delta` is
:math:`\log_2 127.5 \approx 6.99` bits (score_sde's centred "offset 7").
"""

from ..solvers.logp import (DEFAULT_ADAPTIVE_CAP, DEFAULT_ATOL_NATS, DEFAULT_LIKELIHOOD_NFE, DIVERGENCES, LIKELIHOOD_GRIDS, LIKELIHOOD_SOLVERS,
                            PROBE_DISTRIBUTIONS, NonFiniteLikelihoodError, SampleLogpResult, augmented_velocity, divergence,
                            draw_probes, sample_with_logp)
from .api import BitsPerDimResult, LikelihoodResult, bits_per_dim, log_likelihood

__all__ = ["DEFAULT_ADAPTIVE_CAP", "DEFAULT_ATOL_NATS", "DEFAULT_LIKELIHOOD_NFE", "DIVERGENCES", "LIKELIHOOD_GRIDS", "LIKELIHOOD_SOLVERS",
           "PROBE_DISTRIBUTIONS", "BitsPerDimResult", "LikelihoodResult", "NonFiniteLikelihoodError", "SampleLogpResult",
           "augmented_velocity", "bits_per_dim", "divergence", "draw_probes", "log_likelihood", "sample_with_logp"]
