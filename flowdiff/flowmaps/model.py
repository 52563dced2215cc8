r"""Flow-map models: a network parametrised so that the boundary condition holds exactly.

The probability-flow ODE of a Gaussian path :math:`x_t = \alpha_t x_1 + \sigma_t\varepsilon` has a
*flow map* :math:`X_{s\to t}`, the solution at time ``t`` of the ODE started from ``x`` at time ``s``.
A consistency model (Song, Dhariwal, Chen & Sutskever 2023, "Consistency Models") learns the
one-time map :math:`f(x, s) = X_{s\to t_{end}}(x)`; a two-time model (Kim et al. 2024, "Consistency
Trajectory Models"; Boffi, Albergo & Vanden-Eijnden 2025, "Flow Map Matching"; Frans et al. 2025,
"One Step Diffusion via Shortcut Models") learns :math:`X_{s\to t}` for every ``s ≤ t``.

**Parametrisation.** Both are written as the DDIM step (Song, Meng & Ermon 2021) with a learned
data prediction :math:`g_\theta` in place of the denoiser:

.. math::

    X_{s\to t}(x) = c_{skip}(s, t)\,x + c_{out}(s, t)\,g_\theta(x, s, t), \qquad
    c_{skip} = \frac{\sigma_t}{\sigma_s}, \quad
    c_{out} = \alpha_t - \frac{\sigma_t\,\alpha_s}{\sigma_s}.

At ``t = s`` the coefficients are exactly ``(1, 0)``: :math:`X_{s\to s}(x) = x` holds for every
network (the boundary condition of Song et al. 2023, eq. 3, by construction rather than by
training); ``c_out`` is non-zero for every ``t > s`` (λ strictly increasing), so every map can be
represented. Its derivative in ``t`` at ``t = s`` is the probability-flow velocity with data
prediction :math:`g_\theta(x, s, s)`: the diagonal of a two-time model is a denoiser, which is
what a teacher-free model learns by regression (flow matching) and what makes a two-time model
initialised from a teacher's network start at the teacher's DDIM step (CTM's initialisation).

The network outputs the prediction type of the teacher (``"data"``, ``"noise"``, ``"velocity"``,
``"v"``, ``"score"``), read at ``(x, s)`` with the conversions of :class:`flowdiff.Field`, so a copy
of a trained network of any type is a valid student (:func:`student_from_teacher`).
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .._utils import batch_time, check_time_range, expand_like
from ..fields import Field
from ..nn import TimeEmbedding
from ..paths import PREDICTIONS, GaussianPath

__all__ = ["FlowMap", "TwoTimeNetwork", "student_from_teacher"]


class _Gap:
    """Holds the jump ``t − s`` of the call in progress (shared by a two-time network and its embedding)."""

    def __init__(self) -> None:
        self.value: Tensor | None = None


class _TwoTimeEmbedding(nn.Module):
    """The network's own time embedding of ``s`` plus a zero-initialised embedding of the jump ``t − s``."""

    def __init__(self, embedding: TimeEmbedding, gap: _Gap) -> None:
        super().__init__()
        self.embedding = embedding
        self.jump_embedding = TimeEmbedding(embedding.dim)
        nn.init.zeros_(self.jump_embedding.linear_out.weight)
        nn.init.zeros_(self.jump_embedding.linear_out.bias)
        self.gap = gap
        self.dim = embedding.dim

    def forward(self, t: Tensor) -> Tensor:
        out = self.embedding(t)
        if self.gap.value is None:  # called as a one-time network: the diagonal t = s
            return out + self.jump_embedding(torch.zeros_like(t))
        return out + self.jump_embedding(self.gap.value.to(t.dtype))


class TwoTimeNetwork(nn.Module):
    """A one-time network ``net(x, s, **cond)`` of :mod:`flowdiff.nn` made a two-time one ``(x, s, t, **cond)``.

    The network's (single) :class:`~flowdiff.nn.TimeEmbedding` is replaced by itself plus an
    embedding of the jump ``t − s`` whose last layer starts at zero, so that at initialisation the
    two-time network equals the one-time network for every ``t`` (a copy of a teacher's network
    starts as the teacher: Kim et al. 2024, "Consistency Trajectory Models", initialise the student
    from the teacher the same way). Works for every network of :mod:`flowdiff.nn` and the wrappers
    around them (:class:`~flowdiff.nn.Preconditioned`, the class-mixture wrapper of
    :func:`flowdiff.pipeline.load_field`). The network is modified in place (copy it first to keep it).

    Raises ``ValueError`` when the network does not hold exactly one ``TimeEmbedding``: write a
    ``net(x, s, t, **cond)`` yourself then.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        if not isinstance(network, nn.Module):
            raise TypeError(f"network must be a torch.nn.Module, got {type(network).__name__}")
        found = [(name, m) for name, m in network.named_modules() if isinstance(m, TimeEmbedding)]
        if len(found) != 1:
            raise ValueError(
                f"TwoTimeNetwork needs a network with exactly one flowdiff.nn.TimeEmbedding, found {len(found)}; "
                "pass a two-time network net(x, s, t, **cond) to FlowMap instead"
            )
        name, embedding = found[0]
        self.gap = _Gap()
        parent_name, _, attr = name.rpartition(".")
        parent = network.get_submodule(parent_name) if parent_name else network
        setattr(parent, attr, _TwoTimeEmbedding(embedding, self.gap))
        self.network = network

    def forward(self, x: Tensor, s: Tensor, t: Tensor, **cond: Any) -> Tensor:
        self.gap.value = t - s
        try:
            return self.network(x, s, **cond)
        finally:
            self.gap.value = None


class FlowMap(nn.Module):
    r"""The flow map :math:`X_{s\to t}` of a Gaussian path's probability-flow ODE (module docstring).

    Arguments:
        network: ``network(x, s, t, **cond)`` (``two_time=True``) or ``network(x, s, **cond)``
            (``two_time=False``: a consistency model, Song et al. 2023), returning a tensor of
            ``x``'s shape: the ``prediction`` at ``(x, s)``; ``s`` and ``t`` have shape ``(B,)``.
        path: the :class:`~flowdiff.paths.GaussianPath` of the ODE.
        prediction: what the network outputs: ``"data"``, ``"noise"``, ``"velocity"``, ``"v"``, ``"score"``.
        two_time: a two-time model (any target ``t``) or a one-time consistency model (target ``t_end``).
        t_start, t_end: the interval the map works on, default the path's safe interval
            ``[t_min, t_max]``; a consistency model maps every time to ``t_end``.

    Call ``flow_map(x, s, t, **cond)`` with ``s``, ``t`` scalars or ``(B,)``, ``s ≤ t`` inside
    ``[t_start, t_end]`` (a consistency model accepts ``t = None`` or ``t_end`` only); one network call.
    :meth:`data_prediction` is :math:`g_\theta`. :attr:`nfe` counts network calls.
    """

    def __init__(self, network: Callable[..., Tensor], path: GaussianPath, prediction: str = "data",
                 two_time: bool = True, t_start: float | None = None, t_end: float | None = None) -> None:
        super().__init__()
        if not callable(network):
            raise TypeError(f"network must be callable, got {type(network).__name__}")
        if not isinstance(path, GaussianPath):
            raise TypeError(f"path must be a flowdiff.paths.GaussianPath, got {type(path).__name__}")
        if prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction {prediction!r}; valid: {', '.join(PREDICTIONS)}")
        if not isinstance(two_time, bool):
            raise TypeError(f"two_time must be True or False, got {two_time!r}")
        lo, hi = float(path.t_min), float(path.t_max)
        t0 = lo if t_start is None else float(t_start)
        t1 = hi if t_end is None else float(t_end)
        if not (lo - 1e-12 <= t0 < t1 <= hi + 1e-12):
            raise ValueError(f"need t_min <= t_start < t_end <= t_max = [{lo!r}, {hi!r}], got t_start={t0!r}, t_end={t1!r}")
        self.network = network  # registered as a submodule when it is one
        self.path, self.prediction, self.two_time = path, prediction, two_time
        self.t_start, self.t_end = t0, t1
        self._converter = Field(network, path, prediction)
        self.nfe = 0

    def extra_repr(self) -> str:
        kind = "two-time" if self.two_time else "consistency (one-time)"
        return f"{kind}, path={self.path!r}, prediction={self.prediction!r}, t=[{self.t_start:g}, {self.t_end:g}]"

    def _times(self, x: Tensor, s: Any, t: Any) -> tuple[Tensor, Tensor]:
        if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 1:
            raise TypeError(f"x must be a floating-point tensor with a batch dimension, got {type(x).__name__}")
        sb = batch_time(s, x, "s")
        if t is None:
            if self.two_time:
                raise ValueError("a two-time flow map needs the target time t")
            t = self.t_end
        tb = batch_time(t, x, "t")
        check_time_range(sb, self.t_start - 1e-9, self.t_end + 1e-9, "s")
        check_time_range(tb, self.t_start - 1e-9, self.t_end + 1e-9, "t")
        if bool((tb < sb - 8 * torch.finfo(tb.dtype).eps).any()):
            raise ValueError(f"a flow map runs forward in time: need s <= t, got s up to {float(sb.max())!r} "
                             f"and t down to {float(tb.min())!r}")
        if not self.two_time and bool(((tb - self.t_end).abs() > 8 * torch.finfo(tb.dtype).eps).any()):
            raise ValueError(f"a consistency model maps to t_end={self.t_end!r} only, got t={tb.tolist()[:4]}; "
                             "use a two-time FlowMap for other targets")
        return sb, tb

    def data_prediction(self, x: Tensor, s: Any, t: Any = None, **cond: Any) -> Tensor:
        r""":math:`g_\theta(x, s, t)`: the network's output at ``(x, s)`` converted to a data prediction."""
        sb, tb = self._times(x, s, t)
        return self._data(x, sb, tb, cond)

    def _data(self, x: Tensor, sb: Tensor, tb: Tensor, cond: dict) -> Tensor:
        out = self.network(x, sb, tb, **cond) if self.two_time else self.network(x, sb, **cond)
        self.nfe += 1
        if not isinstance(out, Tensor) or out.shape != x.shape:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise ValueError(f"the flow-map network must return a tensor of the input's shape {tuple(x.shape)}, got {shape}")
        return self._converter.convert(out, x, sb, self.prediction, "data")

    def coefficients(self, s: Tensor, t: Tensor, like: Tensor) -> tuple[Tensor, Tensor]:
        """``(c_skip, c_out)`` at ``(s, t)`` (shapes ``(B,)``) broadcast against ``like``."""
        cs, ct = self.path.coefficients(s.to(like.dtype)), self.path.coefficients(t.to(like.dtype))
        c_skip = ct.sigma / cs.sigma
        c_out = ct.alpha - c_skip * cs.alpha
        return expand_like(c_skip, like), expand_like(c_out, like)

    def forward(self, x: Tensor, s: Any, t: Any = None, **cond: Any) -> Tensor:
        r""":math:`X_{s\to t}(x)`; ``t`` defaults to ``t_end`` for a consistency model."""
        sb, tb = self._times(x, s, t)
        c_skip, c_out = self.coefficients(sb, tb, x)
        return c_skip * x + c_out * self._data(x, sb, tb, cond)

    def jump(self, x: Tensor, s: Tensor, t: Tensor, data: Tensor) -> Tensor:
        r"""The DDIM step :math:`c_{skip}x + c_{out}\,\text{data}` from ``s`` to ``t`` with a given data prediction."""
        c_skip, c_out = self.coefficients(s, t, x)
        return c_skip * x + c_out * data


def student_from_teacher(teacher: Field, two_time: bool = True) -> FlowMap:
    """A student flow map initialised as the teacher: a copy of the teacher's network (trainable).

    With ``two_time=True`` the copy becomes a :class:`TwoTimeNetwork` (a zero-initialised jump
    embedding), so the student starts as the teacher's DDIM step for every ``(s, t)``; with
    ``two_time=False`` it is a consistency model starting as the one-step DDIM jump to ``t_end``
    (Song et al. 2023 initialise consistency distillation from the teacher's weights).
    """
    if not isinstance(teacher, Field):
        raise TypeError(f"teacher must be a fd.Field on a Gaussian path, got {type(teacher).__name__}")
    if not isinstance(teacher.model, nn.Module):
        raise TypeError(f"the teacher's model must be a torch.nn.Module to copy, got {type(teacher.model).__name__}")
    network = copy.deepcopy(teacher.model)
    network.requires_grad_(True)
    if two_time:
        network = TwoTimeNetwork(network)
    return FlowMap(network, teacher.path, teacher.prediction, two_time=two_time)
