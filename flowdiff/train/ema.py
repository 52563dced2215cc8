r"""Power-function EMA of the weights and post-hoc EMA reconstruction (Karras et al. 2024, EDM2).

Karras, Aittala, Lehtinen, Hellsten, Aila & Laine (2024), "Analyzing and Improving the Training
Dynamics of Diffusion Models", §3: instead of a fixed decay, average the weights with a profile
that grows as a power of time, so the average always covers the same *fraction* of the run:

.. math::

    \hat\theta_\gamma(t) = \frac{\gamma + 1}{t^{\gamma + 1}}\int_0^t \tau^\gamma\,\theta(\tau)\,d\tau,
    \qquad
    \hat\theta_\gamma(t) = \beta_t\,\hat\theta_\gamma(t - 1) + (1 - \beta_t)\,\theta(t),\quad
    \beta_t = (1 - 1/t)^{\gamma + 1}

for update steps :math:`t = 1, 2, \dots` (so :math:`\hat\theta(1) = \theta(1)`). Its width is
named by the relative standard deviation of the profile :math:`p_\gamma(\tau) \propto \tau^\gamma`
on :math:`[0, t]`:

.. math::

    \sigma_{rel} = \sqrt{\frac{\gamma + 1}{(\gamma + 2)^2(\gamma + 3)}}
    \quad\Leftrightarrow\quad
    \gamma^3 + 7\gamma^2 + (16 - \sigma_{rel}^{-2})\gamma + (12 - \sigma_{rel}^{-2}) = 0 .

**Post-hoc reconstruction** (EDM2 §3.2, Appendix C.1). Save the averages of two profiles
(:math:`\sigma_{rel}` = 0.05 and 0.10 by default) as *snapshots* at several steps
:math:`t_i`. Any other profile :math:`p_r` (another :math:`\sigma_{rel}`, or an earlier end
:math:`t_r`) is approximated by the combination :math:`\sum_i x_i p_i` closest to it in
:math:`L^2`, which is linear in the weights, so the reconstructed average is
:math:`\sum_i x_i \hat\theta_i`. The normal equations need only the inner products of two
power profiles, in closed form (for :math:`t_a \le t_b`):

.. math::

    \langle p_a, p_b\rangle = \int_0^{\infty} p_a p_b\,d\tau
        = \frac{(\gamma_a + 1)(\gamma_b + 1)}{(\gamma_a + \gamma_b + 1)\,t_b}\Big(\frac{t_a}{t_b}\Big)^{\gamma_b},

:math:`A x = b` with :math:`A_{ij} = \langle p_i, p_j\rangle`, :math:`b_i = \langle p_i, p_r\rangle`;
the solution is rescaled to sum to 1 (an average of averages), as in EDM2's ``solve_posthoc_coefficients``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "sigma_rel_to_gamma",
    "gamma_to_sigma_rel",
    "power_ema_beta",
    "PowerEMA",
    "EMASnapshot",
    "posthoc_coefficients",
    "reconstruct_ema",
    "save_snapshot",
    "load_snapshots",
    "power_ema_multi_avg_fn",
]


def _check_sigma_rel(sigma_rel: float) -> float:
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not (
        math.isfinite(sigma_rel) and 0.0 < sigma_rel < 0.28
    ):
        # gamma -> 0 (a uniform average over the run) gives sigma_rel = 1/sqrt(12) ≈ 0.2887.
        raise ValueError(f"sigma_rel must lie in (0, 0.28) (0.2887 is the plain running mean), got {sigma_rel!r}")
    return float(sigma_rel)


def sigma_rel_to_gamma(sigma_rel: float) -> float:
    r"""The exponent :math:`\gamma` whose power profile has relative width ``sigma_rel`` (EDM2 eq. 3)."""
    sigma_rel = _check_sigma_rel(sigma_rel)
    inv = sigma_rel**-2
    roots = np.roots([1.0, 7.0, 16.0 - inv, 12.0 - inv])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9))


def gamma_to_sigma_rel(gamma: float) -> float:
    r""":math:`\sigma_{rel} = \sqrt{(\gamma+1)/((\gamma+2)^2(\gamma+3))}`."""
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not (math.isfinite(gamma) and gamma > 0):
        raise ValueError(f"gamma must be a finite number > 0, got {gamma!r}")
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_ema_beta(gamma: float, step: int) -> float:
    r"""Decay :math:`\beta_t = (1 - 1/t)^{\gamma + 1}` of the update at step ``t >= 1``."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def power_ema_multi_avg_fn(sigma_rel: float):
    r"""A ``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: the power-function EMA.

    ``AveragedModel`` counts the averaged points in ``num_averaged`` (``n``, the initial weights
    being the first), so the update after ``n`` points uses :math:`\beta = (n/(n+1))^{\gamma+1}`,
    which is :func:`power_ema_beta` at step ``n + 1`` with the initial weights as step 1.
    """
    gamma = sigma_rel_to_gamma(sigma_rel)

    @torch.no_grad()
    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor | int) -> None:
        n = float(num_averaged)
        beta = (n / (n + 1.0)) ** (gamma + 1.0)
        torch._foreach_lerp_(averaged, current, 1.0 - beta)

    return update


def _profile_inner_products(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """:math:`\\langle p_a, p_b\\rangle` for broadcastable arrays of ends and exponents (module docstring)."""
    ratio = np.minimum(t_a, t_b) / np.maximum(t_a, t_b)
    exponent = np.where(t_a <= t_b, g_b, g_a)
    return (g_a + 1) * (g_b + 1) / ((g_a + g_b + 1) * np.maximum(t_a, t_b)) * ratio**exponent


def posthoc_coefficients(
    steps: Sequence[int], sigma_rels: Sequence[float], target_sigma_rel: float, target_step: int | None = None
) -> np.ndarray:
    r"""Weights :math:`x_i` of the snapshots that best reproduce the target profile (EDM2 App. C.1).

    Arguments:
        steps: the step :math:`t_i` of each snapshot.
        sigma_rels: the :math:`\sigma_{rel}` of each snapshot's average (same length as ``steps``).
        target_sigma_rel: the width of the average to reconstruct.
        target_step: where the reconstructed average ends; default: the last snapshot step.

    Returns:
        ``x`` of shape ``(len(steps),)``, float64, summing to 1.
    """
    steps_arr = np.asarray([float(s) for s in steps], dtype=np.float64)
    if steps_arr.ndim != 1 or len(steps_arr) == 0 or len(sigma_rels) != len(steps_arr):
        raise ValueError(f"steps and sigma_rels must be non-empty and of equal length, got {len(steps_arr)} and {len(sigma_rels)}")
    if (steps_arr < 1).any():
        raise ValueError(f"snapshot steps must be >= 1, got {steps_arr.tolist()}")
    gammas = np.asarray([sigma_rel_to_gamma(s) for s in sigma_rels], dtype=np.float64)
    t_r = float(steps_arr.max() if target_step is None else target_step)
    if t_r < 1:
        raise ValueError(f"target_step must be >= 1, got {target_step!r}")
    g_r = sigma_rel_to_gamma(target_sigma_rel)
    a = _profile_inner_products(steps_arr[:, None], gammas[:, None], steps_arr[None, :], gammas[None, :])
    b = _profile_inner_products(steps_arr, gammas, np.float64(t_r), np.float64(g_r))
    # Snapshots of two profiles at many steps are nearly collinear: least squares, not a plain solve.
    x = np.linalg.lstsq(a, b, rcond=None)[0]
    return x / x.sum()


def _floating_state(model: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


class PowerEMA:
    r"""Power-function EMAs of a model's floating-point parameters and buffers, one per ``sigma_rel``.

    Arguments:
        model: the trained network (read at every :meth:`update`; not modified).
        sigma_rels: widths of the averages to track (EDM2 uses 0.05 and 0.10 for reconstruction).

    ``update(model, step)`` after optimizer update ``step`` (1, 2, ...); ``average(i)`` is the
    state dict of the ``i``-th average; :meth:`copy_to` loads one into a network.
    """

    def __init__(self, model: nn.Module, sigma_rels: Iterable[float] = (0.05, 0.10)) -> None:
        self.sigma_rels = tuple(_check_sigma_rel(float(s)) for s in sigma_rels)
        if not self.sigma_rels:
            raise ValueError("sigma_rels must name at least one width")
        self.gammas = tuple(sigma_rel_to_gamma(s) for s in self.sigma_rels)
        state = _floating_state(model)
        self.averages = [{k: v.detach().clone() for k, v in state.items()} for _ in self.sigma_rels]
        self.step = 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold the model's current weights in as the average's value at update ``step`` (>= 1)."""
        state = _floating_state(model)
        for gamma, average in zip(self.gammas, self.averages):
            beta = power_ema_beta(gamma, step)
            tensors = [average[k] for k in state]
            current = [state[k].detach() for k in state]
            torch._foreach_lerp_(tensors, current, 1.0 - beta)
        self.step = step

    def average(self, index: int = 0) -> dict[str, Tensor]:
        """The state dict (floating entries) of the ``index``-th average."""
        return self.averages[index]

    def copy_to(self, model: nn.Module, index: int = 0) -> nn.Module:
        """Load the ``index``-th average into ``model`` (non-floating buffers untouched); returns it."""
        model.load_state_dict(self.averages[index], strict=False)
        return model

    def snapshots(self) -> list[EMASnapshot]:
        """The current averages as snapshots (copies) for post-hoc reconstruction."""
        return [EMASnapshot(self.step, s, {k: v.clone() for k, v in avg.items()})
                for s, avg in zip(self.sigma_rels, self.averages)]

    def state_dict(self) -> dict:
        return {"sigma_rels": list(self.sigma_rels), "step": self.step, "averages": self.averages}

    def load_state_dict(self, state: dict) -> None:
        if [float(s) for s in state["sigma_rels"]] != list(self.sigma_rels):
            raise ValueError(f"saved sigma_rels {state['sigma_rels']} differ from this PowerEMA's {list(self.sigma_rels)}")
        self.step = int(state["step"])
        self.averages = [{k: v.clone() for k, v in avg.items()} for avg in state["averages"]]


@dataclass
class EMASnapshot:
    """One saved average: the step it ends at, its ``sigma_rel`` and its weights."""

    step: int
    sigma_rel: float
    state: dict[str, Tensor]


def reconstruct_ema(snapshots: Sequence[EMASnapshot], sigma_rel: float, step: int | None = None) -> dict[str, Tensor]:
    r"""The power-EMA of width ``sigma_rel`` ending at ``step`` (default: the last snapshot), rebuilt
    from saved snapshots as :math:`\sum_i x_i \hat\theta_i` (:func:`posthoc_coefficients`).

    Returns a state dict (float64 arithmetic, cast back to each entry's dtype).
    """
    if not snapshots:
        raise ValueError("reconstruct_ema needs at least one snapshot")
    x = posthoc_coefficients([s.step for s in snapshots], [s.sigma_rel for s in snapshots], sigma_rel, step)
    keys = snapshots[0].state.keys()
    out: dict[str, Tensor] = {}
    for key in keys:
        acc = sum(float(w) * s.state[key].double() for w, s in zip(x, snapshots))
        out[key] = acc.to(snapshots[0].state[key].dtype)  # type: ignore[union-attr]
    return out


def save_snapshot(snapshot: EMASnapshot, folder: str | Path) -> Path:
    """Write one snapshot to ``folder/ema_<step>_<sigma_rel>.safetensors`` (atomic rename)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    file = folder / f"ema_{snapshot.step:08d}_{snapshot.sigma_rel:.4f}.safetensors"
    tmp = file.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in snapshot.state.items()}, str(tmp),
              metadata={"step": str(snapshot.step), "sigma_rel": repr(snapshot.sigma_rel)})
    tmp.replace(file)
    return file


def load_snapshots(folder: str | Path) -> list[EMASnapshot]:
    """Every snapshot :func:`save_snapshot` wrote in ``folder``, ordered by step."""
    from safetensors import safe_open

    out = []
    for file in sorted(Path(folder).glob("ema_*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            meta = handle.metadata() or {}
            state = {k: handle.get_tensor(k) for k in handle.keys()}
        out.append(EMASnapshot(int(meta["step"]), float(meta["sigma_rel"]), state))
    if not out:
        raise ValueError(f"no EMA snapshots (ema_*.safetensors) in {folder}")
    return sorted(out, key=lambda s: (s.step, s.sigma_rel))
