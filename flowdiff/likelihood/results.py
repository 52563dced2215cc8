"""The result types of :mod:`flowdiff.likelihood` (every log-density is called ``log_prob``, in nats)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["BitsPerDimResult", "LikelihoodResult"]


@dataclass
class LikelihoodResult:
    """What :func:`~flowdiff.likelihood.log_likelihood` returns (per-sample tensors have shape ``(B,)``).

    Attributes:
        log_prob: :math:`\\log p(x)` in nats, the model's density at ``t_end`` (the data side); for
            Hutchinson the mean over probes.
        prior_term: :math:`\\log\\pi(x(t_{start}))`, the prior at the end of the backward solve.
        delta_logdet: ``log_prob - prior_term`` (the integrated log-determinant, flow-coordinate
            scaling included).
        nfe: model calls really made (the field's counter; summed over ``batch_size`` chunks).
        std_error: Hutchinson only: the standard error of ``log_prob`` over the probes
            (``std/sqrt(probes)``; NaN with one probe); ``None`` for the exact divergence.
        x_prior: the state at ``t_start`` (the latent code of ``x``).
        solver, divergence, probes: what was used (``probes`` = 0 for the exact divergence).
        t_start, t_end: the interval, ``t_start < t_end`` as in :func:`flowdiff.sample` (the solve
            runs from the data at ``t_end`` back to the prior at ``t_start``).
        grid: the nodes of the fixed-step grid, increasing from ``t_start`` to ``t_end`` (float64;
            the solve walks it backwards); ``None`` for ``dopri5``.
        steps: accepted steps per sample (``dopri5``), else ``None``.
        log_prob_probes: Hutchinson only: the ``(probes, B)`` per-probe estimates.
        refined: ``adams`` with ``refine_tol``: ``(B,)`` bool, the samples whose Milne indicator
            exceeded it and that were solved again by per-sample ``dopri5``; else ``None``.
        evals_per_sample: model evaluations per sample, averaged over the batch (a model call on
            k samples counts k): equals ``nfe`` for fixed steps without refinement, and is the fair
            cost measure for per-sample adaptive solves, whose later calls hold fewer samples.
    """

    log_prob: Tensor
    prior_term: Tensor
    delta_logdet: Tensor
    nfe: int
    std_error: Tensor | None
    x_prior: Tensor
    solver: str
    divergence: str
    probes: int
    t_start: float
    t_end: float
    grid: Tensor | None = None
    steps: Tensor | None = None
    log_prob_probes: Tensor | None = None
    refined: Tensor | None = None
    evals_per_sample: float = float("nan")

    def __repr__(self) -> str:
        mean = float(self.log_prob.detach().double().mean()) if self.log_prob.numel() else float("nan")
        return (
            f"LikelihoodResult(B={self.log_prob.shape[0]}, mean log_prob={mean:.6g} nats, nfe={self.nfe}, "
            f"solver={self.solver!r}, divergence={self.divergence!r})"
        )


@dataclass
class BitsPerDimResult:
    """What :func:`~flowdiff.likelihood.bits_per_dim` returns.

    Attributes:
        bpd: ``(B,)`` bits per dimension of each datum (averaged over its dequantisation draws).
        mean: the mean over the batch (a float).
        std_error: the standard error of ``mean`` (sample std of ``bpd`` over √B; it includes the
            dequantisation and Hutchinson noise because each datum's value carries both).
        ci_low, ci_high: the normal-approximation confidence interval at ``confidence``.
        confidence: the level of the interval.
        log_prob: ``(B, draws)`` log-density of the dequantised points, nats.
        offset_bits: :math:`-\\log_2\\Delta`, the dequantisation term per dimension.
        nfe: model calls.
        dims: D, the number of dimensions per datum.
    """

    bpd: Tensor
    mean: float
    std_error: float
    ci_low: float
    ci_high: float
    confidence: float
    log_prob: Tensor
    offset_bits: float
    nfe: int
    dims: int

    def __repr__(self) -> str:
        return (
            f"BitsPerDimResult(mean={self.mean:.4f} bpd, {100 * self.confidence:.0f}% CI "
            f"[{self.ci_low:.4f}, {self.ci_high:.4f}], B={self.bpd.shape[0]}, nfe={self.nfe})"
        )
