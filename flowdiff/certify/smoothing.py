r"""Randomized smoothing: PREDICT and CERTIFY of Cohen, Rosenfeld & Kolter (2019).

Cohen, Rosenfeld & Kolter (ICML 2019), "Certified Adversarial Robustness via Randomized
Smoothing". A base classifier :math:`f` defines the smoothed classifier

.. math::
    g(x) = \arg\max_c\; P_{\varepsilon\sim N(0, \sigma^2 I)}\big(f(x + \varepsilon) = c\big).

If the top class has probability :math:`p_A \ge \underline{p_A} > 1/2`, then :math:`g` is constant
on the :math:`\ell_2` ball of radius :math:`R = \sigma\,\Phi^{-1}(\underline{p_A})` (their Theorem 1
with the one-class bound :math:`\overline{p_B} = 1 - \underline{p_A}`).

CERTIFY (their Algorithm, "certify"): count the classes of :math:`f(x + \varepsilon_i)` over
:math:`n_0` *selection* draws and take the most frequent :math:`\hat c`; count it again over
:math:`n` *fresh* draws, :math:`k`; the one-sided :math:`(1-\alpha)` Clopper–Pearson lower bound
:math:`\underline{p_A} = B^{-1}(\alpha;\, k,\, n - k + 1)` (a Beta quantile; 0 when :math:`k = 0`).
Return :math:`(\hat c, \sigma\Phi^{-1}(\underline{p_A}))` when :math:`\underline{p_A} > 1/2`, else
abstain. With probability at least :math:`1 - \alpha` over the draws a returned class is
:math:`g(x)` and :math:`g` is constant on the ball of the returned radius.

PREDICT: the two most frequent classes over :math:`n` draws, :math:`n_A \ge n_B`; a two-sided
binomial test of :math:`n_A` out of :math:`n_A + n_B` against :math:`1/2`; abstain when its
p-value exceeds :math:`\alpha` (otherwise the returned class is :math:`g(x)` with probability
:math:`\ge 1 - \alpha`).

When all :math:`n` draws agree the radius is capped at :math:`\sigma\Phi^{-1}(\alpha^{1/n})`
(:func:`radius_cap`): 1.50σ for n = 100, 2.46σ for 10³, 3.20σ for 10⁴, 3.81σ for 10⁵ at α = 0.001.

Noise draws are batched: the draws of all inputs are laid out in one row stream (input ``i``'s
draws are rows ``i·n … i·n + n − 1``) and pushed through the classifier ``batch_size`` rows at a
time, so a batch of small inputs fills each classifier call.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from flowdiff._utils import check_float, check_int

__all__ = [
    "ABSTAIN",
    "Certificate",
    "certified_accuracy",
    "certify",
    "class_counts",
    "clopper_pearson_lower",
    "predict",
    "radius_cap",
]

#: The class returned when the smoothed classifier abstains.
ABSTAIN = -1


class Certificate(NamedTuple):
    """What :func:`certify` returns; unpacks as ``prediction, radius = certify(...)``.

    For one input: ``prediction`` an ``int`` (``-1``: abstain) and ``radius`` a ``float`` (0 when
    abstaining). For a batch: ``prediction`` an int64 tensor ``(B,)`` and ``radius`` a tensor ``(B,)``
    in the input's floating dtype, both on the input's device.
    """

    prediction: Any
    radius: Any


def _check_classifier(classifier: Any) -> None:
    if not callable(classifier):
        raise TypeError(f"classifier must be callable (a batch of inputs -> class indices (N,) or logits (N, K)), "
                        f"got {type(classifier).__name__}")


def _check_common(sigma: Any, alpha: Any, batch_size: Any, num_classes: Any) -> tuple[float, float, int, int | None]:
    sigma = check_float("sigma", sigma, 0.0, low_open=True)
    alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    batch_size = check_int("batch_size", batch_size, 1)
    if num_classes is not None:
        num_classes = check_int("num_classes", num_classes, 1)
    return sigma, alpha, batch_size, num_classes


def _as_batch(x: Any, data_shape: Any) -> tuple[Tensor, bool]:
    """``(batch, single)``: ``x`` as ``(B, *data_shape)`` and whether it was one input.

    Without ``data_shape``, a 1-D tensor is one input vector and anything else a batch along dim 0.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor (one input or a batch), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension (one input vector (D,) or a batch (B, *shape)), got a scalar")
    if not torch.isfinite(x).all():
        raise ValueError("x holds non-finite values (nan or inf)")
    if data_shape is not None:
        shape = tuple(int(s) for s in data_shape)
        if tuple(x.shape) == shape:
            return x.unsqueeze(0), True
        if tuple(x.shape[1:]) == shape:
            return x, False
        raise ValueError(f"x must have shape data_shape={shape} (one input) or (B, *{shape}) (a batch), got {tuple(x.shape)}")
    if x.ndim == 1:
        return x.unsqueeze(0), True
    return x, False


def _predicted_classes(out: Any, rows: int, num_classes: int | None) -> tuple[Tensor, int | None]:
    """Class indices ``(rows,)`` from a classifier output (indices or logits); checks its shape and values."""
    if not isinstance(out, Tensor):
        raise TypeError(f"the classifier must return a tensor of class indices (N,) or logits (N, K), got {type(out).__name__}")
    if out.ndim == 0 or out.shape[0] != rows:
        raise ValueError(f"the classifier returned shape {tuple(out.shape)} for a batch of {rows} inputs; "
                         f"expected class indices ({rows},) or logits ({rows}, K)")
    if out.ndim == 2 and out.is_floating_point():
        if num_classes is not None and out.shape[1] != num_classes:
            raise ValueError(f"the classifier returned logits for {out.shape[1]} classes, but num_classes={num_classes}")
        if not torch.isfinite(out).all():
            raise ValueError("the classifier returned non-finite logits (nan or inf)")
        return out.argmax(dim=1), out.shape[1]
    if out.ndim == 1 and (out.dtype == torch.bool or not (out.is_floating_point() or out.is_complex())):
        indices = out.long()
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or (num_classes is not None and high >= num_classes):
            allowed = f"0..{num_classes - 1}" if num_classes is not None else ">= 0"
            raise ValueError(f"the classifier returned class index {low if low < 0 else high}; allowed: {allowed} "
                             f"(num_classes={num_classes})")
        return indices, num_classes
    raise ValueError(f"the classifier must return integer class indices (N,) or floating logits (N, K); "
                     f"got shape {tuple(out.shape)} and dtype {out.dtype}")


@torch.no_grad()
def class_counts(
    classifier: Callable[[Tensor], Tensor],
    x: Tensor,
    sigma: float,
    num_draws: int,
    *,
    batch_size: int = 1000,
    num_classes: int | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    r"""Counts of :math:`f(x_i + \varepsilon)`, :math:`\varepsilon\sim N(0,\sigma^2 I)`, over ``num_draws`` draws per input.

    Arguments:
        classifier: maps a batch ``(N, *shape)`` to class indices ``(N,)`` or logits ``(N, K)``.
        x: a batch of inputs ``(B, *shape)``.
        sigma: the smoothing noise level.
        num_draws: draws per input.
        batch_size: rows per classifier call (draws of several inputs share a call).
        num_classes: the number of classes ``K`` (checked against the classifier's output);
            default: the logits' width, or the largest index seen + 1.
        generator: the noise's generator (on ``x``'s device).

    Returns:
        int64 counts ``(B, K)`` on ``x``'s device.
    """
    _check_classifier(classifier)
    batch = x.shape[0]
    num_draws = check_int("num_draws", num_draws, 1)
    counts = torch.zeros(batch, num_classes or 1, dtype=torch.long, device=x.device)
    total = batch * num_draws
    for start in range(0, total, batch_size):
        rows = torch.arange(start, min(start + batch_size, total), device=x.device) // num_draws
        noise = torch.randn((len(rows), *x.shape[1:]), generator=generator, device=x.device, dtype=x.dtype)
        predicted, width = _predicted_classes(classifier(x[rows] + sigma * noise), len(rows), num_classes)
        needed = max(int(predicted.max()) + 1, width or 0)
        if num_classes is None and width is not None:
            num_classes = width
        if needed > counts.shape[1]:
            counts = torch.cat([counts, counts.new_zeros(batch, needed - counts.shape[1])], dim=1)
        counts.index_put_((rows, predicted.to(x.device)), torch.ones_like(rows), accumulate=True)
    return counts


def clopper_pearson_lower(successes: Any, trials: Any, alpha: float) -> Tensor:
    r"""One-sided :math:`(1-\alpha)` Clopper–Pearson lower bound :math:`B^{-1}(\alpha; k, n-k+1)` (0 when :math:`k=0`).

    Clopper & Pearson (1934), "The use of confidence or fiducial limits illustrated in the case of the
    binomial". Exact (scipy's Beta quantile), float64; the same as
    ``statsmodels.stats.proportion.proportion_confint(k, n, alpha=2 * alpha, method="beta")[0]``.
    """
    from scipy.stats import beta

    alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    k = torch.as_tensor(successes, dtype=torch.float64).cpu()
    n = torch.as_tensor(trials, dtype=torch.float64).cpu()
    if (k < 0).any() or (k > n).any():
        raise ValueError(f"successes must lie in [0, trials], got successes={successes} and trials={trials}")
    k_np, n_np = k.numpy(), n.numpy()
    safe = k_np > 0
    bound = beta.ppf(alpha, k_np.clip(min=1), (n_np - k_np + 1))
    return torch.as_tensor(bound * safe, dtype=torch.float64)


def radius_cap(sigma: float, n: int, alpha: float) -> float:
    r"""The largest radius CERTIFY can return with ``n`` draws: :math:`\sigma\Phi^{-1}(\alpha^{1/n})` (all draws agree)."""
    from scipy.stats import norm

    sigma = check_float("sigma", sigma, 0.0, low_open=True)
    n = check_int("n", n, 1)
    alpha = check_float("alpha", alpha, 0.0, 1.0, low_open=True, high_open=True)
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def _finish(prediction: Tensor, radius: Tensor, single: bool) -> Certificate:
    if single:
        return Certificate(int(prediction[0]), float(radius[0]))
    return Certificate(prediction, radius)


def certify(
    classifier: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 100_000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    data_shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Certificate:
    r"""Cohen et al.'s CERTIFY for one input or a batch: the smoothed class and its certified :math:`\ell_2` radius.

    Arguments:
        classifier: the base classifier :math:`f`, mapping a batch ``(N, *shape)`` to class indices
            ``(N,)`` or logits ``(N, K)`` (called under ``torch.no_grad``; put a module in eval mode).
        x: one input vector ``(D,)``, or a batch ``(B, *shape)``; with ``data_shape`` also one input
            of that shape.
        sigma: the smoothing noise level :math:`\sigma > 0` (in ``x``'s units).
        n0: selection draws (:math:`1 \le n_0 < n`).
        n: estimation draws (fresh, independent of the selection).
        alpha: the failure probability, in ``(0, 1)``.
        batch_size: noisy inputs per classifier call.
        num_classes: the number of classes; a classifier whose output disagrees raises ``ValueError``.
        data_shape: the shape of one input, to tell one input from a batch.
        generator: the noise's ``torch.Generator`` (on ``x``'s device) for reproducible draws.

    Returns:
        :class:`Certificate` ``(prediction, radius)``: ``-1`` and radius 0 where it abstains;
        ``int``/``float`` for one input, tensors ``(B,)`` for a batch.
    """
    from scipy.stats import norm

    _check_classifier(classifier)
    sigma, alpha, batch_size, num_classes = _check_common(sigma, alpha, batch_size, num_classes)
    n0 = check_int("n0", n0, 1)
    n = check_int("n", n, 1)
    if n0 >= n:
        raise ValueError(f"n0 (selection draws) must be smaller than n (estimation draws), got n0={n0}, n={n}")
    batch, single = _as_batch(x, data_shape)
    options = {"batch_size": batch_size, "num_classes": num_classes, "generator": generator}
    selection = class_counts(classifier, batch, sigma, n0, **options)
    guess = selection.argmax(dim=1)
    estimation = class_counts(classifier, batch, sigma, n, **options)
    hits = torch.where(guess < estimation.shape[1], estimation.gather(1, guess.clamp_max(estimation.shape[1] - 1)[:, None])[:, 0],
                       torch.zeros_like(guess))
    lower = clopper_pearson_lower(hits.cpu(), n, alpha).numpy()
    certified = torch.as_tensor(lower > 0.5, device=batch.device)
    radius = torch.as_tensor(sigma * norm.ppf(lower.clip(0.5, 1.0)), dtype=batch.dtype, device=batch.device)
    prediction = torch.where(certified, guess, torch.full_like(guess, ABSTAIN))
    radius = torch.where(certified, radius, torch.zeros_like(radius))
    return _finish(prediction, radius, single)


def predict(
    classifier: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    sigma: float,
    n: int = 1000,
    alpha: float = 0.001,
    batch_size: int = 1000,
    num_classes: int | None = None,
    data_shape: tuple[int, ...] | None = None,
    generator: torch.Generator | None = None,
) -> Any:
    r"""Cohen et al.'s PREDICT: the smoothed class, or ``-1`` when a binomial test cannot tell the top two apart.

    The two most frequent classes of :math:`f(x+\varepsilon)` over ``n`` draws, counts
    :math:`n_A \ge n_B`; abstain when the two-sided binomial test of :math:`n_A` in :math:`n_A + n_B`
    against 1/2 has p-value :math:`> \alpha`. Arguments as :func:`certify`. Returns an ``int`` for
    one input, an int64 tensor ``(B,)`` for a batch.
    """
    from scipy.stats import binomtest

    _check_classifier(classifier)
    sigma, alpha, batch_size, num_classes = _check_common(sigma, alpha, batch_size, num_classes)
    n = check_int("n", n, 1)
    batch, single = _as_batch(x, data_shape)
    counts = class_counts(classifier, batch, sigma, n, batch_size=batch_size, num_classes=num_classes, generator=generator)
    if counts.shape[1] < 2:
        counts = torch.cat([counts, counts.new_zeros(counts.shape[0], 2 - counts.shape[1])], dim=1)
    top = counts.topk(2, dim=1)
    prediction = top.indices[:, 0].clone()
    for i, (count_a, count_b) in enumerate(top.values.tolist()):
        if binomtest(count_a, count_a + count_b, 0.5).pvalue > alpha:
            prediction[i] = ABSTAIN
    return int(prediction[0]) if single else prediction


def certified_accuracy(prediction: Tensor, radius: Tensor, labels: Tensor, radii: Any = (0.0, 0.25, 0.5, 0.75, 1.0)) -> Tensor:
    r"""Certified accuracy at each radius :math:`r`: the fraction of inputs predicted correctly with :math:`R \ge r`.

    Arguments:
        prediction: int64 ``(B,)`` from :func:`certify` (``-1``: abstain, never correct).
        radius: ``(B,)`` certified radii.
        labels: true classes ``(B,)``.
        radii: the radii to evaluate.

    Returns:
        float64 ``(len(radii),)``.
    """
    prediction, radius, labels = (torch.as_tensor(v) for v in (prediction, radius, labels))
    if not (prediction.shape == radius.shape == labels.shape) or prediction.ndim != 1:
        raise ValueError(f"prediction, radius and labels must have the same shape (B,), got {tuple(prediction.shape)}, "
                         f"{tuple(radius.shape)}, {tuple(labels.shape)}")
    grid = torch.as_tensor(radii, dtype=torch.float64).reshape(-1)
    correct = (prediction.cpu() == labels.cpu())
    ok = correct[None, :] & (radius.cpu().double()[None, :] >= grid[:, None])
    return ok.double().mean(dim=1) if len(labels) else torch.full_like(grid, math.nan)
