r"""Base classifiers trained for smoothing: Gaussian augmentation and an rRCM-style encoder.

**Gaussian augmentation** (Cohen, Rosenfeld & Kolter, ICML 2019, "Certified Adversarial
Robustness via Randomized Smoothing", §4): train the base classifier on :math:`x + \sigma\varepsilon`
with the smoothing :math:`\sigma`, so that :math:`f` is accurate under the noise :math:`g` averages over.

**rRCM-style encoder** (Lei et al., 2025, "Robust Representation Consistency Model via Contrastive
Denoising", the rRCM repository): a small encoder conditioned on the noise level, pre-trained on
noisy inputs with two InfoNCE objectives (van den Oord et al., 2018, "Representation Learning with
Contrastive Predictive Coding"),

* *contrastive*: two augmentations (here: ±1-pixel shifts, or small jitter for vectors) of the
  same input at the smallest noise level, student against an EMA teacher, symmetric InfoNCE with
  the rest of the batch as negatives;
* *consistency*: the representation of :math:`x + \sigma_n z` (student) is pulled towards that of
  the adjacent, less noisy :math:`x + \sigma_{n+1} z` (the same :math:`z`; the same network under
  stop-gradient), other inputs as negatives — the consistency-model objective (Song et al., 2023)
  as instance discrimination along the noise schedule.

The noise levels are Karras et al.'s (2022) grid :math:`\sigma_i = (\sigma_{max}^{1/\rho} + \tfrac{i}{N-1}
(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}))^\rho`, :math:`\rho = 7`, in input units. Fine-tuning
trains a linear head and the encoder on :math:`x + \sigma z` at the smoothing :math:`\sigma` with the
consistency regulariser of Jeong & Shin (NeurIPS 2020, "Consistency Regularization for Certified
Robustness of Smoothed Classifiers"): for :math:`m` noisy copies with softmax outputs :math:`p_j` and
mean :math:`\bar p`, :math:`\lambda\,\frac1m\sum_j \mathrm{KL}(\bar p\,\|\,p_j) + \eta\,H(\bar p)` added to the
cross-entropy. Certification then costs one encoder pass per noise draw (no diffusion model).

This is the "lite" version of the notes (modalities.md §6.3): a CNN/MLP instead of a ViT, a few
epochs on CPU; it is a baseline next to denoised smoothing, not a reproduction of the paper's numbers.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowdiff._utils import check_float, check_int

__all__ = ["RobustEncoder", "karras_levels", "train_gaussian_augmentation", "train_rrcm"]


def _check_data(images: Any, labels: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(images, Tensor) or not images.is_floating_point():
        raise TypeError(f"images must be a floating torch.Tensor (N, *shape), got {type(images).__name__}")
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"labels must be an integer torch.Tensor (N,), got {getattr(labels, 'dtype', type(labels).__name__)}")
    if images.ndim < 2 or labels.shape != images.shape[:1]:
        raise ValueError(f"images (N, *shape) and labels (N,) must agree, got {tuple(images.shape)} and {tuple(labels.shape)}")
    if not torch.isfinite(images).all():
        raise ValueError("images hold non-finite values (nan or inf)")
    return images, labels.long()


def train_gaussian_augmentation(classifier: nn.Module, images: Tensor, labels: Tensor, sigma: float, *, epochs: int = 30,
                                batch_size: int = 64, lr: float = 2e-3, weight_decay: float = 1e-4,
                                seed: int = 0) -> nn.Module:
    r"""Train ``classifier`` (logits ``(N, K)``) in place with cross-entropy on :math:`x + \sigma\varepsilon` (Cohen et al.).

    Adam, cosine learning-rate decay, fresh noise every batch; a seeded generator for the noise
    and the order (the global RNG is untouched). Returns the classifier in eval mode.
    """
    images, labels = _check_data(images, labels)
    sigma = check_float("sigma", sigma, 0.0)
    epochs, batch_size = check_int("epochs", epochs, 1), check_int("batch_size", batch_size, 1)
    generator = torch.Generator(device=images.device).manual_seed(check_int("seed", seed, 0))
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr, weight_decay=weight_decay)
    steps = epochs * math.ceil(len(labels) / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    classifier.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator, device=images.device).split(batch_size):
            x = images[batch]
            noisy = x + sigma * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
            loss = F.cross_entropy(classifier(noisy), labels[batch])
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)} in Gaussian-augmentation training")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return classifier.eval()


def karras_levels(count: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    r"""Karras et al.'s (2022) noise levels, decreasing from ``sigma_max`` to ``sigma_min`` (float64, ``(count,)``)."""
    count = check_int("count", count, 2)
    sigma_min = check_float("sigma_min", sigma_min, 0.0, low_open=True)
    sigma_max = check_float("sigma_max", sigma_max, sigma_min, low_open=True)
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


class RobustEncoder(nn.Module):
    """A small noise-level-conditioned encoder with contrastive, consistency and classification heads.

    Images ``(N, C, H, W)``: two 3×3 convolutions (the second stride 2), global features by a
    linear layer; vectors ``(N, D)``: a two-layer MLP. The noise level enters as ``log σ`` through
    a learnt per-feature scale and shift (FiLM). ``forward(x, sigma)`` returns class logits.
    """

    def __init__(self, data_shape: tuple[int, ...], num_classes: int, width: int = 64, projection_dim: int = 64) -> None:
        super().__init__()
        self.data_shape = tuple(int(s) for s in data_shape)
        self.num_classes = check_int("num_classes", num_classes, 2)
        if len(self.data_shape) == 3:
            channels, height, width_px = self.data_shape
            self.body = nn.Sequential(
                nn.Conv2d(channels, 32, 3, padding=1), nn.SiLU(),
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(), nn.Flatten(),
                nn.Linear(64 * math.ceil(height / 2) * math.ceil(width_px / 2), width),
            )
        elif len(self.data_shape) == 1:
            self.body = nn.Sequential(nn.Linear(self.data_shape[0], width), nn.SiLU(), nn.Linear(width, width))
        else:
            raise ValueError(f"data_shape must be (C, H, W) or (D,), got {self.data_shape}")
        self.film = nn.Sequential(nn.Linear(1, width), nn.SiLU(), nn.Linear(width, 2 * width))
        self.contrastive_head = nn.Sequential(nn.SiLU(), nn.Linear(width, projection_dim))
        self.consistency_head = nn.Sequential(nn.SiLU(), nn.Linear(width, projection_dim))
        self.head = nn.Sequential(nn.SiLU(), nn.Linear(width, self.num_classes))

    def features(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).expand(x.shape[0])
        scale, shift = self.film(sigma.log()[:, None]).chunk(2, dim=1)
        return self.body(x) * (1 + scale) + shift

    def forward(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        return self.head(self.features(x, sigma))

    def classifier(self, sigma: float) -> Any:
        """The base classifier at the smoothing level ``sigma``: a function of a batch giving logits."""
        sigma = check_float("sigma", sigma, 0.0, low_open=True)

        @torch.no_grad()
        def classify(x: Tensor) -> Tensor:
            return self(x, sigma)

        return classify


def _info_nce(query: Tensor, key: Tensor, temperature: float) -> Tensor:
    """InfoNCE with the matching row as the positive and the other rows as negatives."""
    logits = F.normalize(query, dim=1) @ F.normalize(key, dim=1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(query), device=query.device))


def _augment(x: Tensor, generator: torch.Generator) -> Tensor:
    """±1-pixel random shifts (images) or 2 % jitter (vectors)."""
    if x.ndim == 4:
        shifts = torch.randint(-1, 2, (2,), generator=generator, device=x.device).tolist()
        return torch.roll(x, shifts=tuple(shifts), dims=(2, 3))
    return x + 0.02 * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def train_rrcm(images: Tensor, labels: Tensor, sigma: float, *, num_classes: int | None = None, pretrain_epochs: int = 20,
               finetune_epochs: int = 20, batch_size: int = 128, lr: float = 2e-3, levels: int = 18,
               sigma_min: float = 0.002, sigma_max: float = 2.0, temperature: float = 0.2, ema_decay: float = 0.99,
               copies: int = 2, consistency_weight: float = 10.0, entropy_weight: float = 0.5, width: int = 64,
               seed: int = 0) -> RobustEncoder:
    r"""Pre-train a :class:`RobustEncoder` (contrastive + consistency InfoNCE), then fine-tune it at ``sigma``.

    Arguments:
        images: training inputs ``(N, *shape)`` in the units smoothing will use.
        labels: classes ``(N,)``.
        sigma: the smoothing noise level the classifier is fine-tuned for.
        pretrain_epochs, finetune_epochs: passes over the data in each phase.
        levels, sigma_min, sigma_max: the Karras noise grid of the consistency objective.
        temperature: InfoNCE temperature.
        ema_decay: the teacher of the contrastive objective.
        copies, consistency_weight, entropy_weight: Jeong & Shin's regulariser (m, λ, η).

    Returns:
        The encoder in eval mode; ``encoder.classifier(sigma)`` is the base classifier for
        :func:`flowdiff.certify.certify`.
    """
    images, labels = _check_data(images, labels)
    sigma = check_float("sigma", sigma, 0.0, low_open=True)
    num_classes = int(labels.max()) + 1 if num_classes is None else check_int("num_classes", num_classes, 2)
    copies = check_int("copies", copies, 1)
    generator = torch.Generator(device=images.device).manual_seed(check_int("seed", seed, 0))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = RobustEncoder(tuple(images.shape[1:]), num_classes, width=width).to(images.device, images.dtype)
    teacher = copy.deepcopy(model).requires_grad_(False)
    grid = karras_levels(levels, sigma_min, sigma_max).to(images.device, images.dtype)

    def randn(x: Tensor) -> Tensor:
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)

    def shape(level: Tensor, x: Tensor) -> Tensor:
        return level.reshape(-1, *([1] * (x.ndim - 1)))

    # --- pre-training ---------------------------------------------------------------------
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(check_int("pretrain_epochs", pretrain_epochs, 0)):
        for batch in torch.randperm(len(labels), generator=generator, device=images.device).split(batch_size):
            if len(batch) < 2:
                continue
            x = images[batch]
            view_a, view_b = _augment(x, generator), _augment(x, generator)
            small = grid[-1]
            student_a = model.contrastive_head(model.features(view_a + small * randn(x), small))
            student_b = model.contrastive_head(model.features(view_b + small * randn(x), small))
            with torch.no_grad():
                teacher_a = teacher.contrastive_head(teacher.features(view_a + small * randn(x), small))
                teacher_b = teacher.contrastive_head(teacher.features(view_b + small * randn(x), small))
            contrastive = 0.5 * (_info_nce(student_a, teacher_b, temperature) + _info_nce(student_b, teacher_a, temperature))
            index = torch.randint(0, levels - 1, (len(batch),), generator=generator, device=x.device)
            z = randn(x)
            noisy, cleaner = grid[index], grid[index + 1]
            query = model.consistency_head(model.features(x + shape(noisy, x) * z, noisy))
            with torch.no_grad():
                target = model.consistency_head(model.features(x + shape(cleaner, x) * z, cleaner))
            loss = contrastive + _info_nce(query, target, temperature)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)} in rRCM pre-training")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                for p_teacher, p_student in zip(teacher.parameters(), model.parameters()):
                    p_teacher.lerp_(p_student, 1 - ema_decay)

    # --- fine-tuning at the smoothing level with the consistency regulariser ------------------
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(check_int("finetune_epochs", finetune_epochs, 0)):
        for batch in torch.randperm(len(labels), generator=generator, device=images.device).split(batch_size):
            x, y = images[batch], labels[batch]
            logits = torch.stack([model(x + sigma * randn(x), sigma) for _ in range(copies)])  # (m, B, K)
            log_probs = logits.log_softmax(dim=-1)
            loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(copies))
            if copies > 1:
                mean = log_probs.exp().mean(dim=0)
                kl = (mean * (mean.clamp_min(1e-12).log() - log_probs)).sum(dim=-1).mean()
                entropy = -(mean * mean.clamp_min(1e-12).log()).sum(dim=-1).mean()
                loss = loss + consistency_weight * kl + entropy_weight * entropy
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)} in rRCM fine-tuning")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval()
