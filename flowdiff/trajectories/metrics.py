r"""Trajectory metrics and trivial forecasters.

ADE/FDE as in GeoTDM (Han et al., NeurIPS 2024) and the trajectory-forecasting literature: for one
sample :math:`\hat x` and the truth :math:`x` over :math:`F` forecast frames and :math:`N` particles,

.. math:: \mathrm{ADE} = \frac1{FN}\sum_{f,i} \lVert \hat x_{f,i} - x_{f,i} \rVert, \qquad
          \mathrm{FDE} = \frac1N \sum_i \lVert \hat x_{F,i} - x_{F,i} \rVert ;

``minADE_K``/``minFDE_K`` take the minimum over K samples per system (each metric minimised on its own),
``aveADE``/``aveFDE`` the mean over samples; both are averaged over systems.

Unconditional generation (GeoTDM after LS4, Zhou et al. 2023): the *marginal score* compares, per
coordinate and frame, 50-bin histograms of real and generated values (mean absolute density difference,
lower is better); :func:`classification_score` is a cheap classifier two-sample test on invariant
features (sorted pairwise distances per frame) in place of the paper's trained EqMotion classifier.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ade_fde", "constant_velocity", "last_frame", "marginal_score", "classification_score"]


def _np(a, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ValueError(f"{name} holds NaN or Inf values")
    return a


def ade_fde(samples, target) -> dict[str, float]:
    """ADE/FDE of forecasts ``samples`` ``(B, K, F, N, 3)`` (or ``(B, F, N, 3)`` for one sample)
    against ``target`` ``(B, F, N, 3)``: ``{"min_ade", "min_fde", "mean_ade", "mean_fde"}`` (module
    docstring; min over the K samples of each system, then mean over systems)."""
    s, y = _np(samples, "samples"), _np(target, "target")
    if s.ndim == 4:
        s = s[:, None]
    if s.ndim != 5 or y.ndim != 4 or s.shape[-1] != 3 or s.shape[:1] + s.shape[2:] != y.shape:
        raise ValueError(f"samples must be (B, K, F, N, 3) and target (B, F, N, 3) with the same B, F, N; "
                         f"got {tuple(s.shape)} and {tuple(y.shape)}")
    dist = np.linalg.norm(s - y[:, None], axis=-1)  # (B, K, F, N)
    ade = dist.mean(axis=(2, 3))
    fde = dist[:, :, -1].mean(axis=-1)
    return {"min_ade": float(ade.min(1).mean()), "min_fde": float(fde.min(1).mean()),
            "mean_ade": float(ade.mean()), "mean_fde": float(fde.mean())}


def constant_velocity(context, future_frames: int):
    """Constant-velocity forecast ``(B, future_frames, N, 3)`` from the last two context frames
    ``(B, C, N, 3)`` (C >= 2); follows a tensor's dtype/device, else returns numpy."""
    is_tensor = isinstance(context, torch.Tensor)
    c = context if is_tensor else np.asarray(context, dtype=np.float64)
    if c.ndim != 4 or c.shape[1] < 2 or c.shape[-1] != 3:
        raise ValueError(f"context must be (B, C >= 2, N, 3), got {tuple(c.shape)}")
    last, vel = c[:, -1:], c[:, -1:] - c[:, -2:-1]
    steps = (torch.arange(1, future_frames + 1, dtype=c.dtype, device=c.device) if is_tensor
             else np.arange(1, future_frames + 1, dtype=np.float64)).reshape(1, -1, 1, 1)
    return last + steps * vel


def last_frame(context, future_frames: int):
    """Copy-last-frame forecast ``(B, future_frames, N, 3)``."""
    c = context if isinstance(context, torch.Tensor) else np.asarray(context, dtype=np.float64)
    reps = (1, future_frames, 1, 1)
    return c[:, -1:].repeat(*reps) if isinstance(c, torch.Tensor) else np.tile(c[:, -1:], reps)


def marginal_score(real, generated, bins: int = 50) -> float:
    """Mean over coordinates and frames of the mean absolute difference between 50-bin density
    histograms of ``real`` and ``generated`` ``(n, F, N, 3)`` (on the range of both; lower is better).
    Positions are centred per system (mean over frames and particles) first, as the model generates
    on the zero-centre-of-mass subspace."""
    r, g = _np(real, "real"), _np(generated, "generated")
    if r.ndim != 4 or g.shape[1:] != r.shape[1:]:
        raise ValueError(f"real and generated must be (n, F, N, 3) with equal F, N; got {r.shape} and {g.shape}")
    r = (r - r.mean(axis=(1, 2), keepdims=True)).reshape(r.shape[0], -1)
    g = (g - g.mean(axis=(1, 2), keepdims=True)).reshape(g.shape[0], -1)
    total = 0.0
    for c in range(r.shape[1]):
        lo, hi = min(r[:, c].min(), g[:, c].min()), max(r[:, c].max(), g[:, c].max())
        if hi <= lo:
            continue
        hr, edges = np.histogram(r[:, c], bins=bins, range=(lo, hi), density=True)
        hg, _ = np.histogram(g[:, c], bins=edges, density=True)
        total += np.abs(hr - hg).mean()
    return float(total / r.shape[1])


def _invariant_features(x: np.ndarray) -> np.ndarray:
    d = np.linalg.norm(x[:, :, :, None] - x[:, :, None], axis=-1)
    iu = np.triu_indices(x.shape[2], 1)
    return np.sort(d[..., iu[0], iu[1]], axis=-1).reshape(x.shape[0], -1)


def classification_score(real, generated, seed: int = 0) -> dict[str, float]:
    """Classifier two-sample test: a logistic regression (scikit-learn) on sorted pairwise distances
    per frame, trained on half of ``real`` vs ``generated`` and tested on the other half. Returns the
    test ``accuracy`` (0.5: indistinguishable) and the test binary cross-entropy ``bce`` (higher is
    better, log 2 = 0.693 at chance), GeoTDM's *classification score* with a cheaper classifier."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    r, g = _invariant_features(_np(real, "real")), _invariant_features(_np(generated, "generated"))
    n = min(len(r), len(g))
    rng = np.random.default_rng(seed)
    r, g = r[rng.permutation(len(r))[:n]], g[rng.permutation(len(g))[:n]]
    half = n // 2
    if half < 2:
        raise ValueError(f"classification_score needs at least 4 systems of each kind, got {n}")
    xtr = np.concatenate([r[:half], g[:half]])
    ytr = np.r_[np.zeros(half), np.ones(half)]
    xte = np.concatenate([r[half:], g[half:]])
    yte = np.r_[np.zeros(n - half), np.ones(n - half)]
    scaler = StandardScaler().fit(xtr)
    clf = LogisticRegression(max_iter=2000).fit(scaler.transform(xtr), ytr)
    p = np.clip(clf.predict_proba(scaler.transform(xte))[:, 1], 1e-7, 1 - 1e-7)
    bce = -np.mean(yte * np.log(p) + (1 - yte) * np.log1p(-p))
    return {"accuracy": float(((p > 0.5) == yte).mean()), "bce": float(bce)}
