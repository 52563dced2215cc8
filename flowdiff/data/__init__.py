"""Built-in data sets and loaders for user data; this layer knows only torch and numpy.

* :func:`load_dataset` — one entry point: a built-in name (:func:`available_datasets`) or a path,
  split into reproducible, disjoint train / held-out parts; returns a :class:`Dataset`.
* 2-D toy sets standardised to mean 0 and ``E|x|² = 2``: :func:`checkerboard`,
  :func:`eight_gaussians`, :func:`moons`, :func:`spirals`, :func:`pinwheel`, :func:`rings`,
  and the asymmetric mixture :func:`gmm`.
* :func:`gaussian_mixture_samples` and :func:`mixture_parameters` — exact mixture samples and
  parameters for analytic oracles.
* :func:`load_digits` — scikit-learn's 8×8 digits in ``[-1, 1]``, ``(N, 1, 8, 8)``.
* :func:`load_folder`, :func:`load_array`, :func:`load_tensor_file`, :func:`load_path` — user data.
* :class:`BatchSampler` / :func:`batches` — infinite, seeded, resumable minibatches.
"""

from flowdiff.data.batches import BatchSampler, batches
from flowdiff.data.dataset import DataError, Dataset
from flowdiff.data.digits import load_digits
from flowdiff.data.files import load_array, load_folder, load_path, load_tensor_file
from flowdiff.data.loading import DATASET_ALIASES, DEFAULT_TOY_SIZE, available_datasets, load_dataset
from flowdiff.data.mixture import gaussian_mixture_samples, mixture_parameters
from flowdiff.data.toy import TOY_DATASETS, checkerboard, eight_gaussians, gmm, moons, pinwheel, rings, spirals

__all__ = [
    "DataError",
    "Dataset",
    "load_dataset",
    "available_datasets",
    "DATASET_ALIASES",
    "DEFAULT_TOY_SIZE",
    "TOY_DATASETS",
    "checkerboard",
    "eight_gaussians",
    "gmm",
    "moons",
    "pinwheel",
    "rings",
    "spirals",
    "gaussian_mixture_samples",
    "mixture_parameters",
    "load_digits",
    "load_folder",
    "load_array",
    "load_tensor_file",
    "load_path",
    "BatchSampler",
    "batches",
]
