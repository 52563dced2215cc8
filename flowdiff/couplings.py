r"""Couplings: how the pairs :math:`(x_0, x_1)` of a training batch are drawn.

A flow-matching / stochastic-interpolant objective needs pairs :math:`(x_0, x_1)` from a
*coupling* :math:`\pi` whose marginals are the base :math:`p_0` and the data :math:`p_1`.
The independent coupling :math:`\pi = p_0\otimes p_1` is the default. *Minibatch optimal
transport* (Tong et al. 2023, "Improving and Generalizing Flow-Based Generative Models with
Minibatch Optimal Transport"; Pooladian et al. 2023, "Multisample Flow Matching: Straightening
Flows with Minibatch Couplings") re-pairs a batch of independent draws along the optimal
transport plan of the batch,

.. math::

    \pi^\star = \arg\min_{\pi\in\Pi(a, b)} \sum_{ij}\pi_{ij}\,\lVert x_0^{(i)} - x_1^{(j)}\rVert^2
    \;[-\;\varepsilon H(\pi)],

exactly (a linear assignment for equal batch sizes, a permutation) or with entropic
regularisation ε (Sinkhorn; Cuturi 2013, "Sinkhorn Distances"). The marginals of each batch
are unchanged for the exact permutation, so the learned field still transports :math:`p_0`
to :math:`p_1`; the paths become straighter (fewer solver steps). Minibatch OT is a biased
estimate of the full OT plan: the bias shrinks as the batch grows.

Conditional data: :class:`LabelledPairs` runs a coupling *within* each class, so that a
label ``y`` attached to :math:`x_1` stays with it and no noise sample is transported across
classes (the failure mode of plain minibatch OT on conditional tasks noted in
atong01/conditional-flow-matching#117).

Every coupling has ``pair(x0, x1, y=None, generator=None) -> (x0, x1, y)``; rows of the
returned ``x1`` carry their own ``y``. ``x0`` and ``x1`` have shape ``(B, *)``; costs are
squared Euclidean distances between the flattened rows, computed in float64.

``scipy`` (exact assignment) and ``POT`` (Sinkhorn, unequal batch sizes) are optional
dependencies, imported only when needed.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from ._utils import check_float, check_int

__all__ = [
    "COUPLINGS",
    "OT_METHODS",
    "SINKHORN_BACKENDS",
    "Coupling",
    "Independent",
    "LabelledPairs",
    "MinibatchOT",
    "available_couplings",
    "coupling_from_config",
    "make_coupling",
    "sinkhorn_plan",
    "squared_distances",
]

#: Names accepted by :func:`make_coupling` (the CLI's ``--coupling``).
COUPLINGS = ("independent", "ot", "ot-sinkhorn", "labelled-ot", "labelled-ot-sinkhorn")
#: Methods of :class:`MinibatchOT`.
OT_METHODS = ("exact", "sinkhorn")
#: Implementations of the Sinkhorn iterations.
SINKHORN_BACKENDS = ("torch", "pot")


def available_couplings() -> tuple[str, ...]:
    """The coupling names :func:`make_coupling` accepts."""
    return COUPLINGS


def squared_distances(x0: Tensor, x1: Tensor) -> Tensor:
    r"""Cost matrix :math:`C_{ij} = \lVert x_0^{(i)} - x_1^{(j)}\rVert^2` of flattened rows, float64, shape ``(B0, B1)``.

    Computed as :math:`|a|^2 + |b|^2 - 2a\cdot b` in float64 (memory ``B0·B1``, not ``B0·B1·D``;
    the cancellation error, ~1e-16 of the squared norms, is far below any OT decision), on the
    inputs' device.
    """
    a = x0.detach().reshape(x0.shape[0], -1).to(torch.float64)
    b = x1.detach().reshape(x1.shape[0], -1).to(torch.float64)
    cost = a.pow(2).sum(1)[:, None] + b.pow(2).sum(1)[None, :] - 2 * (a @ b.T)
    return cost.clamp_min(0)


def sinkhorn_plan(cost: Tensor, reg: float, max_iter: int = 1000, tol: float = 1e-4) -> Tensor:
    r"""Entropic OT plan with uniform marginals by log-domain Sinkhorn iterations (Cuturi 2013).

    Solves :math:`\min_\pi \langle\pi, C\rangle - \varepsilon H(\pi)` over plans with uniform marginals
    :math:`a = 1/B_0`, :math:`b = 1/B_1`, by alternating the dual (potential) updates

    .. math::

        f_i = \varepsilon\big(\log a_i - \mathrm{LSE}_j\,(g_j - C_{ij})/\varepsilon\big), \qquad
        g_j = \varepsilon\big(\log b_j - \mathrm{LSE}_i\,(f_i - C_{ij})/\varepsilon\big),

    with :math:`\pi_{ij} = \exp((f_i + g_j - C_{ij})/\varepsilon)`. The log domain never
    underflows, whatever ``C/ε`` (the plain scaling form returns a zero plan once
    :math:`C/\varepsilon \gtrsim 700`, e.g. images with small ε). ε-scaling (Schmitzer 2019,
    "Stabilized Sparse Scaling Algorithms for Entropy Regularized Transport Problems") starts
    from ε ≈ max C and halves it down to ``reg``, warm-starting the potentials, which cuts the
    iteration count at small ``reg``. Stops when the L1 error of the row marginal is below
    ``tol`` (column marginals are exact after each update); warns if ``max_iter`` (total) is hit.

    Arguments:
        cost: ``(B0, B1)`` cost matrix (any floating dtype; computed in float64).
        reg: ε > 0 in units of the cost.

    Returns:
        The plan, float64, on ``cost``'s device, total mass 1.
    """
    reg = check_float("reg", reg, 0.0, low_open=True)
    max_iter = check_int("max_iter", max_iter, 1)
    tol = check_float("tol", tol, 0.0, low_open=True)
    cost = cost.to(torch.float64)
    n0, n1 = cost.shape
    log_a, log_b = -math.log(n0), -math.log(n1)
    f = torch.zeros(n0, dtype=cost.dtype, device=cost.device)
    g = torch.zeros(n1, dtype=cost.dtype, device=cost.device)
    schedule = [float(reg)]
    top = float(cost.max())
    while schedule[-1] * 2 < top:
        schedule.append(schedule[-1] * 2)
    schedule.reverse()
    iterations, error = 0, float("inf")
    for stage, eps in enumerate(schedule):
        # Intermediate ε only need a rough warm start; the final one must meet tol.
        stage_tol = tol if stage == len(schedule) - 1 else max(tol, 1e-2)
        error = float("inf")
        while iterations < max_iter:
            f = eps * (log_a - torch.logsumexp((g[None, :] - cost) / eps, dim=1))
            g = eps * (log_b - torch.logsumexp((f[:, None] - cost) / eps, dim=0))
            iterations += 1
            # Checking needs a device sync; do it every few iterations.
            if iterations % 5 == 0 or iterations == max_iter:
                error = float((torch.exp((f[:, None] + g[None, :] - cost) / eps).sum(1) - 1.0 / n0).abs().sum())
                if error < stage_tol:
                    break
    if error >= tol:
        warnings.warn(
            f"Sinkhorn did not converge in max_iter={max_iter} iterations (row-marginal L1 error {error:.2e} "
            f"> tol={tol:g}); increase max_iter or reg",
            RuntimeWarning,
            stacklevel=3,
        )
    return torch.exp((f[:, None] + g[None, :] - cost) / reg)


def _check_batch(x0: Tensor, x1: Tensor, y: Tensor | None, same_size: bool = False) -> None:
    if not isinstance(x0, Tensor) or not isinstance(x1, Tensor):
        raise TypeError(f"x0 and x1 must be torch.Tensors, got {type(x0).__name__} and {type(x1).__name__}")
    if x0.ndim == 0 or x1.ndim == 0:
        raise ValueError("x0 and x1 must have a batch dimension, got a 0-d tensor")
    if x0.shape[1:] != x1.shape[1:]:
        raise ValueError(
            f"x0 and x1 must have the same per-sample shape, got x0 {tuple(x0.shape)} and x1 {tuple(x1.shape)}"
        )
    if same_size and x0.shape[0] != x1.shape[0]:
        raise ValueError(f"x0 and x1 must have the same batch size, got {x0.shape[0]} and {x1.shape[0]}")
    if y is not None:
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor or None, got {type(y).__name__}")
        if y.ndim == 0 or y.shape[0] != x1.shape[0]:
            raise ValueError(
                f"y must have one entry per row of x1: y has shape {tuple(y.shape)}, x1 has batch size {x1.shape[0]}"
            )


class Coupling:
    """Base class: re-pair a batch of independent draws ``(x0, x1)``.

    Subclasses implement :meth:`indices`, which returns the index pairs ``(i0, i1)`` (long
    tensors of equal length) so that the coupled batch is ``(x0[i0], x1[i1], y[i1])``; the
    labels of ``x1`` are therefore always carried with it.
    """

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def pair(
        self,
        x0: Tensor,
        x1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Return the coupled batch ``(x0', x1', y')``; ``y'`` stays attached to ``x1'`` row by row.

        Arguments:
            x0: base draws, shape ``(B0, *)``.
            x1: data, shape ``(B1, *)``.
            y: optional labels of ``x1``, shape ``(B1, ...)``.
            generator: randomness of the couplings that sample from a plan.
        """
        _check_batch(x0, x1, y)
        i0, i1 = self.indices(x0, x1, generator)
        i0, i1 = i0.to(x0.device), i1.to(x1.device)
        return x0[i0], x1[i1], (None if y is None else y[i1.to(y.device)])

    def __call__(
        self, x0: Tensor, x1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.pair(x0, x1, y, generator)

    def config(self) -> dict:
        """A JSON-serialisable description used by checkpoints."""
        return {"name": type(self).__name__}


class Independent(Coupling):
    r"""The independent coupling :math:`p_0\otimes p_1`: the batch is returned as it is.

    ``x0`` and ``x1`` must have the same batch size (each row of ``x0`` goes with the row of
    ``x1`` at the same index).
    """

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        if x0.shape[0] != x1.shape[0]:
            raise ValueError(f"Independent needs equal batch sizes, got x0 {x0.shape[0]} and x1 {x1.shape[0]}")
        idx = torch.arange(x1.shape[0])
        return idx, idx

    def pair(
        self, x0: Tensor, x1: Tensor, y: Tensor | None = None, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        _check_batch(x0, x1, y, same_size=True)
        return x0, x1, y

    def __repr__(self) -> str:
        return "Independent()"


def _sample_plan(plan: Tensor, num: int, replace: bool, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """Draw ``num`` index pairs ``(i, j)`` with probability ``plan[i, j]`` (normalised)."""
    probs = plan.reshape(-1).clamp_min(0)
    total = float(probs.sum())
    if not (total > 0) or not torch.isfinite(probs).all():
        raise ValueError(
            "the transport plan is degenerate (zero or non-finite mass); with method='sinkhorn' "
            "increase reg or rescale the data"
        )
    if not replace and int((probs > 0).sum()) < num:
        raise ValueError(
            f"cannot draw {num} distinct pairs without replacement from a plan with "
            f"{int((probs > 0).sum())} non-zero entries; use replace=True"
        )
    flat = torch.multinomial(probs / total, num, replacement=replace, generator=generator)
    return flat // plan.shape[1], flat % plan.shape[1]


class MinibatchOT(Coupling):
    r"""Minibatch optimal-transport coupling (Tong et al. 2023; Pooladian et al. 2023).

    The cost is :math:`C_{ij} = \lVert x_0^{(i)} - x_1^{(j)}\rVert^2` (flattened rows) and the
    marginals are uniform.

    * ``method="exact"``: the exact OT plan. For equal batch sizes it is a permutation σ
      (Birkhoff), found by the Hungarian/Jonker–Volgenant assignment
      ``scipy.optimize.linear_sum_assignment``; with ``replace=False`` the result is
      ``(x0[σ], x1, y)`` — every sample is used exactly once and ``x1, y`` keep their order.
      For unequal batch sizes the plan is a network-simplex solution (POT ``ot.emd``) and
      pairs are sampled from it.
    * ``method="sinkhorn"``: the entropic plan :math:`\arg\min\langle\pi, C\rangle - \varepsilon H(\pi)`
      with ``ε = reg`` in the units of ``C``. As ``reg → 0`` it tends to the exact plan (the
      gap in cost is at most ε·log(B0·B1)); the Schrödinger-bridge coupling of Tong et al.
      2024 is the case ``reg = 2σ²``. ``backend="torch"`` (default) runs log-domain Sinkhorn
      iterations with ε-scaling on the data's device (:func:`sinkhorn_plan`); ``backend="pot"``
      calls POT's ``ot.sinkhorn(..., method="sinkhorn_log")`` (Flamary et al. 2021), the
      reference implementation, which on CPU is 5–50× slower here (measured, B = 32–256).
      Sinkhorn is slow when ``reg`` is small against the costs (one CPU thread, B = 256:
      ~0.35 s for D = 2 and several seconds for D ≥ 64 at ``reg = 0.05``, versus ~12–70 ms for
      the exact assignment); for near-exact plans prefer ``method="exact"``.

    When pairs are *sampled* from the plan (Sinkhorn, unequal sizes, or ``replace=True``),
    ``B1`` cells ``(i, j)`` are drawn with probability :math:`\pi_{ij}` — with replacement
    if ``replace`` is true, otherwise distinct cells (torchcfm's ``OTPlanSampler.sample_map``).
    Labels follow their ``x1`` row.

    Arguments:
        method: ``"exact"`` or ``"sinkhorn"``.
        reg: entropic regularisation ε > 0 (Sinkhorn only), in units of squared distance.
        replace: sample pairs from the plan with replacement.
        max_iter: iteration cap of Sinkhorn (a warning is issued when it is reached).
        tol: Sinkhorn stops when the L1 error of the plan's row marginal is below ``tol``
            (the total-variation error of the sampled pairs' law is at most that).
        backend: ``"torch"`` or ``"pot"`` (Sinkhorn only).
    """

    def __init__(
        self,
        method: str = "exact",
        reg: float = 0.05,
        replace: bool = False,
        max_iter: int = 1000,
        tol: float = 1e-4,
        backend: str = "torch",
    ):
        if method not in OT_METHODS:
            raise ValueError(f"unknown OT method {method!r}; valid: {', '.join(OT_METHODS)}")
        reg = check_float("reg", reg, 0.0, low_open=True)
        if not isinstance(replace, bool):
            raise TypeError(f"replace must be a bool, got {type(replace).__name__}")
        max_iter = check_int("max_iter", max_iter, 1)
        tol = check_float("tol", tol, 0.0, low_open=True)
        if backend not in SINKHORN_BACKENDS:
            raise ValueError(f"unknown Sinkhorn backend {backend!r}; valid: {', '.join(SINKHORN_BACKENDS)}")
        self.method, self.reg, self.replace = method, reg, replace
        self.max_iter, self.tol, self.backend = max_iter, tol, backend

    def __repr__(self) -> str:
        return f"MinibatchOT(method={self.method!r}, reg={self.reg!r}, replace={self.replace!r})"

    def config(self) -> dict:
        return {"name": "MinibatchOT", "method": self.method, "reg": self.reg, "replace": self.replace,
                "max_iter": self.max_iter, "tol": self.tol, "backend": self.backend}

    def plan(self, x0: Tensor, x1: Tensor) -> Tensor:
        r"""The transport plan :math:`\pi` (float64 on the CPU, shape ``(B0, B1)``, total mass 1) of the batch."""
        _check_batch(x0, x1, None)
        cost = squared_distances(x0, x1)
        n0, n1 = cost.shape
        if self.method == "exact" and n0 == n1:
            i0, i1 = self._assignment(cost.cpu())
            plan = torch.zeros(n0, n1, dtype=torch.float64)
            plan[i0, i1] = 1.0 / n0
            return plan
        if self.method == "sinkhorn" and self.backend == "torch":
            return sinkhorn_plan(cost, self.reg, self.max_iter, self.tol).cpu()
        ot = _import_pot()
        cost_np = cost.cpu().numpy()
        a = torch.full((n0,), 1.0 / n0, dtype=torch.float64).numpy()
        b = torch.full((n1,), 1.0 / n1, dtype=torch.float64).numpy()
        if self.method == "exact":
            plan = ot.emd(a, b, cost_np)
        else:
            plan = ot.sinkhorn(a, b, cost_np, self.reg, method="sinkhorn_log", numItermax=self.max_iter,
                               stopThr=self.tol)
        return torch.as_tensor(plan, dtype=torch.float64)

    @staticmethod
    def _assignment(cost: Tensor) -> tuple[Tensor, Tensor]:
        """Optimal permutation for a square cost: returns ``(i0, i1)`` with ``i1 = 0..B-1``."""
        try:
            from scipy.optimize import linear_sum_assignment  # type: ignore[import-untyped]
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "MinibatchOT(method='exact') needs scipy: pip install scipy (or flowdiff[train])"
            ) from err
        rows, cols = linear_sum_assignment(cost.numpy())
        i0 = torch.empty(cost.shape[1], dtype=torch.long)
        i0[torch.as_tensor(cols, dtype=torch.long)] = torch.as_tensor(rows, dtype=torch.long)
        return i0, torch.arange(cost.shape[1])

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        n0, n1 = x0.shape[0], x1.shape[0]
        if self.method == "exact" and n0 == n1 and not self.replace:
            return self._assignment(squared_distances(x0, x1).cpu())
        plan = self.plan(x0, x1)
        i0, i1 = _sample_plan(plan, n1, self.replace, _cpu_generator(generator))
        return i0, i1


def _cpu_generator(generator: torch.Generator | None) -> torch.Generator | None:
    # Plans live on the CPU; a CUDA generator cannot drive CPU sampling, so derive a CPU one from it.
    if generator is None or generator.device.type == "cpu":
        return generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device).item())
    return torch.Generator().manual_seed(seed)


def _import_pot():
    try:
        import ot  # type: ignore[import-untyped]  # POT: Python Optimal Transport
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "this coupling needs POT (Python Optimal Transport): pip install POT (or flowdiff[train])"
        ) from err
    return ot


class LabelledPairs(Coupling):
    r"""Class-conditional coupling: apply ``coupling`` separately within each label.

    For labelled data :math:`(x_1, y)` the conditional flow of class ``c`` must transport the
    base to :math:`p_1(\cdot\mid c)`; plain minibatch OT would pair a noise sample with the
    nearest data point of *any* class. Here the rows of ``x1`` are grouped by label and each
    group is coupled with its own block of ``x0`` rows (Tong et al. 2023, §5, class-conditional
    OT-CFM). ``y`` stays attached to its ``x1``.

    Which ``x0`` rows go to which class: if the base draws are unlabelled (``y0=None``), they
    are i.i.d., so a uniformly random partition of ``x0`` (sizes = class counts, drawn with
    ``generator``) keeps every block a sample of the base. If ``x0`` is itself labelled
    (``y0``, e.g. data-to-data translation), ``x0`` rows of class ``c`` are coupled only with
    ``x1`` rows of class ``c``; then the class counts must match when ``x0`` and ``x1`` have
    the same batch size.

    Arguments:
        coupling: the within-class coupling (default ``MinibatchOT("exact")``).
    """

    def __init__(self, coupling: Coupling | None = None):
        coupling = MinibatchOT("exact") if coupling is None else coupling
        if not isinstance(coupling, Coupling):
            raise TypeError(f"coupling must be a flowdiff.couplings.Coupling, got {type(coupling).__name__}")
        if isinstance(coupling, LabelledPairs):
            raise TypeError("LabelledPairs cannot wrap another LabelledPairs")
        self.coupling = coupling

    def __repr__(self) -> str:
        return f"LabelledPairs({self.coupling!r})"

    def config(self) -> dict:
        return {"name": "LabelledPairs", "coupling": self.coupling.config()}

    def indices(self, x0: Tensor, x1: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        raise TypeError("LabelledPairs needs the labels: call pair(x0, x1, y, generator)")

    def pair(
        self,
        x0: Tensor,
        x1: Tensor,
        y: Tensor | None = None,
        generator: torch.Generator | None = None,
        y0: Tensor | None = None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Couple within classes. Without labels (``y=None``) this is ``coupling.pair``.

        Returns ``(x0', x1', y')`` where row ``k`` of ``x1'`` has label ``y'[k]``; when the
        inner coupling is a permutation (exact OT, equal sizes) ``x1'`` and ``y'`` are ``x1``
        and ``y`` in their original order.
        """
        _check_batch(x0, x1, y)
        if y is None:
            return self.coupling.pair(x0, x1, None, generator)
        if y0 is not None and (not isinstance(y0, Tensor) or y0.ndim == 0 or y0.shape[0] != x0.shape[0]):
            raise ValueError(f"y0 must have one entry per row of x0 ({x0.shape[0]}), got {getattr(y0, 'shape', y0)!r}")
        if x0.shape[0] != x1.shape[0] and y0 is None:
            raise ValueError(
                f"LabelledPairs with unlabelled x0 needs equal batch sizes, got x0 {x0.shape[0]} and x1 {x1.shape[0]}"
            )
        keys1 = _label_keys(y)
        classes = torch.unique(keys1)
        cpu_gen = _cpu_generator(generator)
        if y0 is None:
            order0 = torch.randperm(x0.shape[0], generator=cpu_gen)
        else:
            keys0 = _label_keys(y0)
        parts0, parts1 = [], []
        start = 0
        for c in classes:
            rows1 = torch.nonzero(keys1 == c).flatten()
            if y0 is None:
                rows0 = order0[start:start + rows1.numel()]
                start += rows1.numel()
            else:
                rows0 = torch.nonzero(keys0 == c).flatten()
                if rows0.numel() == 0:
                    raise ValueError(f"label {c.tolist()!r} of x1 has no x0 rows with the same label in y0")
                if x0.shape[0] == x1.shape[0] and rows0.numel() != rows1.numel():
                    raise ValueError(
                        f"label {c.tolist()!r} has {rows0.numel()} rows in x0 but {rows1.numel()} in x1; "
                        "per-class counts must match"
                    )
            d0, d1 = rows0.to(x0.device), rows1.to(x1.device)
            j0, j1 = self.coupling.indices(x0[d0], x1[d1], cpu_gen)
            parts0.append(rows0[j0.cpu()])
            parts1.append(rows1[j1.cpu()])
        i0, i1 = torch.cat(parts0), torch.cat(parts1)
        # Put the pairs back in x1's order when every x1 row appears once (a permutation).
        if i1.numel() == x1.shape[0] and torch.equal(torch.sort(i1).values, torch.arange(x1.shape[0])):
            inverse = torch.argsort(i1)
            i0, i1 = i0[inverse], i1[inverse]
        i0, i1 = i0.to(x0.device), i1.to(x1.device)
        return x0[i0], x1[i1], y[i1.to(y.device)]


def _label_keys(y: Tensor) -> Tensor:
    """One integer key per row: the label itself, or the index of the row's unique value (multi-dim labels)."""
    y = y.detach().cpu()
    if y.ndim == 1:
        return y
    return torch.unique(y.reshape(y.shape[0], -1), dim=0, return_inverse=True)[1]


def make_coupling(name: str, *, reg: float = 0.05, replace: bool = False) -> Coupling:
    """Build a coupling from its CLI name (see :data:`COUPLINGS`).

    ``independent`` → :class:`Independent`; ``ot`` / ``ot-sinkhorn`` → :class:`MinibatchOT`
    (exact / Sinkhorn); ``labelled-ot`` / ``labelled-ot-sinkhorn`` → :class:`LabelledPairs`
    around them.
    """
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; valid: {', '.join(COUPLINGS)}")
    if name == "independent":
        return Independent()
    inner = MinibatchOT("sinkhorn" if name.endswith("sinkhorn") else "exact", reg=reg, replace=replace)
    return LabelledPairs(inner) if name.startswith("labelled") else inner


def coupling_from_config(config: dict) -> Coupling:
    """Rebuild a coupling from the dict written by its ``config()`` method."""
    cfg = dict(config)
    name = cfg.pop("name", None)
    if name == "Independent":
        return Independent()
    if name == "MinibatchOT":
        return MinibatchOT(**cfg)
    if name == "LabelledPairs":
        return LabelledPairs(coupling_from_config(cfg["coupling"]))
    raise ValueError(f"unknown coupling config name {name!r}; valid: Independent, MinibatchOT, LabelledPairs")
