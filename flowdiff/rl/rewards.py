r"""Rewards for RL fine-tuning: callables ``reward(x) -> (B,)`` on generated data, and their validation.

A reward is any callable mapping a batch ``x`` of shape ``(B, *)`` to a tensor of shape ``(B,)`` of finite
real numbers; it need not be differentiable (the GRPO family only uses its values). Shipped:

* :class:`GaussianFeatureReward` — :math:`r(x) = -\tfrac12\lVert Ax - b\rVert^2/s^2`, the log-density (up to
  a constant) of a target region in a linear feature. With a Gaussian-mixture prior the KL-regularised optimum
  :math:`p(x)e^{r(x)/\beta}/Z` is again a mixture in closed form (``flowdiff.testing.tilted_mixture``), which is
  what makes the toy checks exact.
* :class:`ClassifierReward` — a classifier's log-probability of one class (the 8×8 digits classifier of
  :mod:`flowdiff.metrics` by default).
* :class:`ThresholdReward` — non-differentiable: the indicator (or count, over the rows of ``A``) of
  :math:`Ax > c`.

:func:`check_reward` evaluates a reward and raises one clear error for a wrong shape or non-finite values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Reward", "GaussianFeatureReward", "ClassifierReward", "ThresholdReward", "check_reward", "reward_from_spec"]

Reward = Callable[[Tensor], Tensor]


def check_reward(reward: Reward, x: Tensor) -> Tensor:
    """``reward(x)`` checked: a floating tensor of shape ``(B,)`` with every entry finite (detached, ``x``'s dtype).

    Raises:
        TypeError: the reward is not callable or returns no tensor.
        ValueError: wrong shape, or non-finite values (how many, and the first offending row) — a NaN reward
            would otherwise turn into a zero advantage silently.
    """
    if not callable(reward):
        raise TypeError(f"reward must be a callable reward(x) -> Tensor of shape (B,), got {type(reward).__name__}")
    with torch.no_grad():
        value = reward(x)
    if not isinstance(value, Tensor):
        raise TypeError(f"the reward must return a torch.Tensor of shape ({x.shape[0]},), got {type(value).__name__}")
    if value.shape != (x.shape[0],):
        raise ValueError(f"the reward must return shape (B,) = ({x.shape[0]},) for a batch of shape {tuple(x.shape)}, "
                         f"got {tuple(value.shape)}")
    value = value.detach().to(dtype=x.dtype if x.is_floating_point() else torch.float32)
    bad = ~torch.isfinite(value)
    if bad.any():
        first = int(bad.nonzero()[0, 0])
        raise ValueError(f"the reward returned {int(bad.sum())} non-finite values of {value.numel()} "
                         f"(first at row {first}: {float(value[first])}); rewards must be finite")
    return value


def _matrix(name: str, value: Any, dim: int | None = None) -> Tensor:
    m = torch.as_tensor(value, dtype=torch.float64)
    if m.ndim == 1:
        m = m[None]
    if m.ndim != 2 or (dim is not None and m.shape[1] != dim):
        raise ValueError(f"{name} must be a matrix (m, D){'' if dim is None else f' with D={dim}'}, got shape "
                         f"{tuple(m.shape)}")
    if not torch.isfinite(m).all():
        raise ValueError(f"{name} must be finite")
    return m


class GaussianFeatureReward(nn.Module):
    r""":math:`r(x) = -\tfrac12\lVert A\,\mathrm{vec}(x) - b\rVert^2/s^2`: log-density of the target region
    :math:`Ax \approx b` up to a constant.

    Arguments:
        A: ``(m, D)`` feature matrix (a vector ``(D,)`` is one feature); b: ``(m,)`` target; scale: ``s > 0``.

    For a Gaussian-mixture prior the tilted target :math:`p\,e^{r/\beta}/Z` is
    ``flowdiff.testing.tilted_mixture(prior, A, b, scale=s, temperature=β)``.
    """

    def __init__(self, A: Tensor | Sequence, b: Tensor | Sequence | float, scale: float = 1.0):
        super().__init__()
        a = _matrix("A", A)
        bb = torch.as_tensor(b, dtype=torch.float64).reshape(-1)
        if bb.shape != (a.shape[0],) or not torch.isfinite(bb).all():
            raise ValueError(f"b must be {a.shape[0]} finite numbers (one per row of A), got shape {tuple(bb.shape)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0 or scale == float("inf"):
            raise ValueError(f"scale must be a finite number > 0, got scale={scale!r}")
        self.register_buffer("A", a)
        self.register_buffer("b", bb)
        self.scale = float(scale)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.A.shape[1]:
            raise ValueError(f"the reward's A has {self.A.shape[1]} columns, the samples have {flat.shape[1]} values each")
        feature = flat @ self.A.to(flat).T - self.b.to(flat)
        return -0.5 * (feature * feature).sum(-1) / self.scale**2

    def config(self) -> dict:
        return {"name": "gaussian", "A": self.A.tolist(), "b": self.b.tolist(), "scale": self.scale}


class ClassifierReward(nn.Module):
    r""":math:`r(x) = \log p_\phi(y = k \mid x)`, a classifier's log-probability of class ``label``.

    Arguments:
        classifier: ``classifier(x) -> (B, C)`` logits; ``None`` loads the 8×8 digits classifier of
            :class:`flowdiff.metrics.DigitsFeatureExtractor` (cached; images in ``[-1, 1]``).
        label: the class ``k``.
        clamp: images are clamped to ``[-clamp, clamp]`` before the classifier (``None``: not clamped).
    """

    def __init__(self, classifier: Callable[[Tensor], Tensor] | None = None, label: int = 0,
                 clamp: float | None = 1.0):
        super().__init__()
        if classifier is None:
            from ..metrics import DigitsFeatureExtractor

            classifier = DigitsFeatureExtractor.load_or_train()
        if not callable(classifier):
            raise TypeError(f"classifier must be callable classifier(x) -> logits, got {type(classifier).__name__}")
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise ValueError(f"label must be an integer >= 0, got label={label!r}")
        self.classifier, self.label, self.clamp = classifier, label, clamp
        if isinstance(classifier, nn.Module):
            classifier.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        images = x.clamp(-self.clamp, self.clamp) if self.clamp is not None else x
        if isinstance(self.classifier, nn.Module):
            p = next(self.classifier.parameters(), None)
            if p is not None:
                images = images.to(device=p.device, dtype=p.dtype)
        logits = self.classifier(images)
        if logits.ndim != 2 or self.label >= logits.shape[1]:
            raise ValueError(f"the classifier must return logits (B, C) with C > label={self.label}, got shape "
                             f"{tuple(logits.shape)}")
        return torch.log_softmax(logits, dim=-1)[:, self.label].to(x.dtype)

    def config(self) -> dict:
        return {"name": "classifier", "label": self.label, "clamp": self.clamp}


class ThresholdReward(nn.Module):
    r"""Non-differentiable: :math:`r(x) = \sum_j \mathbf 1[(A\,\mathrm{vec}(x))_j > c]` — an indicator for one
    feature, a count for several (e.g. ``A = I`` counts the pixels brighter than ``c``).

    Arguments:
        A: ``(m, D)`` (or ``(D,)``); threshold: ``c``; ``A=None`` uses the identity (counts coordinates).
    """

    def __init__(self, A: Tensor | Sequence | None = None, threshold: float = 0.0):
        super().__init__()
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or threshold != threshold:
            raise ValueError(f"threshold must be a real number, got {threshold!r}")
        self.register_buffer("A", _matrix("A", A) if A is not None else torch.zeros(0, 0, dtype=torch.float64))
        self.threshold = float(threshold)

    def forward(self, x: Tensor) -> Tensor:
        flat = x.reshape(x.shape[0], -1)
        feature = flat if self.A.numel() == 0 else flat @ self.A.to(flat).T
        return (feature > self.threshold).to(x.dtype if x.is_floating_point() else torch.float32).sum(-1)

    def config(self) -> dict:
        return {"name": "threshold", "A": self.A.tolist() if self.A.numel() else None, "threshold": self.threshold}


def reward_from_spec(spec: str) -> nn.Module:
    """Build a shipped reward from a command-line spec (the CLI's ``--reward``):

    * ``gaussian:A=1,0;b=2;scale=0.5`` — :class:`GaussianFeatureReward` (rows of ``A`` separated by ``|``);
    * ``classifier:label=3`` — :class:`ClassifierReward` with the digits classifier;
    * ``threshold:A=1,0;c=0.5`` or ``threshold:c=0.5`` — :class:`ThresholdReward`.
    """
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a reward spec must be a non-empty string like 'gaussian:A=1,0;b=2;scale=0.5', got {spec!r}")
    name, _, rest = spec.partition(":")
    fields: dict[str, str] = {}
    for part in filter(None, rest.split(";")):
        key, eq, value = part.partition("=")
        if not eq:
            raise ValueError(f"reward spec {spec!r}: expected key=value, got {part!r}")
        fields[key.strip()] = value.strip()

    def matrix(text: str) -> list[list[float]]:
        return [[float(v) for v in row.split(",")] for row in text.split("|")]

    try:
        if name == "gaussian":
            return GaussianFeatureReward(matrix(fields["A"]), [float(v) for v in fields["b"].split(",")],
                                         float(fields.get("scale", 1.0)))
        if name == "classifier":
            return ClassifierReward(label=int(fields.get("label", 0)))
        if name == "threshold":
            a = matrix(fields["A"]) if "A" in fields else None
            return ThresholdReward(a, float(fields.get("c", 0.0)))
    except KeyError as error:
        raise ValueError(f"reward spec {spec!r} misses {error.args[0]!r}") from None
    raise ValueError(f"unknown reward {name!r} in {spec!r}; valid: gaussian, classifier, threshold")
