"""Certified robustness with randomized smoothing (Cohen et al., ICML 2019), denoised smoothing with diffusion models
(Carlini et al., ICLR 2023) and an rRCM-style encoder (Lei et al., 2025) (issue 19; docs/certify.md).

* :func:`certify` / :func:`predict`: Cohen, Rosenfeld & Kolter's CERTIFY and PREDICT, exact Clopper–Pearson bounds,
  batched noise draws; :func:`certified_accuracy`, :func:`radius_cap`.
* :class:`DenoisedClassifier`: a flowdiff model's one-shot (or few-step) denoiser at the time matching the smoothing
  noise, then any classifier.
* :func:`train_gaussian_augmentation` (Cohen et al.'s baseline) and :func:`train_rrcm` (contrastive + consistency
  pre-training on noisy inputs, then fine-tuning with Jeong & Shin's consistency regulariser).
"""

from .denoised import DenoisedClassifier, smoothing_time
from .smoothing import (
    ABSTAIN,
    Certificate,
    certified_accuracy,
    certify,
    class_counts,
    clopper_pearson_lower,
    predict,
    radius_cap,
)
from .training import RobustEncoder, karras_levels, train_gaussian_augmentation, train_rrcm

__all__ = [
    "ABSTAIN",
    "Certificate",
    "DenoisedClassifier",
    "RobustEncoder",
    "certified_accuracy",
    "certify",
    "class_counts",
    "clopper_pearson_lower",
    "karras_levels",
    "predict",
    "radius_cap",
    "smoothing_time",
    "train_gaussian_augmentation",
    "train_rrcm",
]
