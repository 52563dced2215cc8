"""Distances between sample sets and task metrics.

* Sample-set distances (:mod:`flowdiff.metrics.distances`):
  :func:`sliced_wasserstein`, :func:`energy_distance`, :func:`mmd`,
  :func:`wasserstein2_exact`, and :func:`data_floor` for the real-vs-real value
  a perfect generator reaches at the same sample size.
* Fréchet distances (:mod:`flowdiff.metrics.frechet`):
  :func:`frechet_distance_gaussians`, :func:`frechet_distance_from_features`
  (alias :func:`frechet_distance`), and the digits Fréchet distance
  :func:`digits_frechet_distance` in the features of a small cached CNN
  (:class:`DigitsFeatureExtractor`).
* :func:`histogram_w2` (:mod:`flowdiff.metrics.histogram`): exact W2² between the 2-D
  histograms of two sample sets (Deveney et al. 2025, §8.4 protocol).

This package depends on torch and numpy; scikit-learn (digits) and POT
(:func:`wasserstein2_exact`) are imported only when used.
"""

from flowdiff.metrics.distances import (
    DataFloor,
    data_floor,
    energy_distance,
    median_bandwidth,
    mmd,
    sliced_wasserstein,
    wasserstein2_exact,
)
from flowdiff.metrics.frechet import (
    DigitsFeatureExtractor,
    DigitsSplit,
    default_cache_dir,
    digits_frechet_distance,
    frechet_distance,
    frechet_distance_from_features,
    frechet_distance_gaussians,
    load_digits_split,
)
from flowdiff.metrics.histogram import histogram_w2

__all__ = [
    "DataFloor",
    "DigitsFeatureExtractor",
    "DigitsSplit",
    "data_floor",
    "default_cache_dir",
    "digits_frechet_distance",
    "energy_distance",
    "frechet_distance",
    "frechet_distance_from_features",
    "frechet_distance_gaussians",
    "histogram_w2",
    "load_digits_split",
    "median_bandwidth",
    "mmd",
    "sliced_wasserstein",
    "wasserstein2_exact",
]
