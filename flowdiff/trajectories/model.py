r"""GeoTDM: geometric trajectory diffusion (Han, Xu, Lou, Ye, Ermon, NeurIPS 2024, *Geometric
Trajectory Diffusion Models*), for N-body and other 3-D point-cloud trajectories.

**Conditional forecasting.** Given context frames :math:`x_c` ``(C, N, 3)``, the future ``(F, N, 3)`` is
generated as :math:`x = x_r + s\,r` where :math:`x_r = \mathrm{prior}(x_c)` is the learnable equivariant
prior mean (:class:`~flowdiff.trajectories.egtn.GeometricPrior`), :math:`s` a fixed scale per future frame
(the RMS of the constant-velocity residual of the training data in that frame: small for the first frames) and the residual :math:`r` follows a Gaussian path
of this library (default the cosine VP path; ``t = 0`` noise, ``t = 1`` data):
:math:`r_t = \alpha(t) r + \sigma(t)\varepsilon`. This is GeoTDM's data-dependent prior
:math:`q(x_t\mid x_0, x_c) = N(\sqrt{\bar\alpha} x_0 + (1 - \sqrt{\bar\alpha}) x_r, (1-\bar\alpha) I)`, i.e.
:math:`p_{\mathrm{noise}} = N(x_r, s^2 I)`. The denoiser sees positions :math:`x_r + s\,r_t` for the future
frames concatenated after the context frames along time, runs the EGTN and reads the prediction off the
future frames' output positions: ``"data"`` :math:`(x_{out} - x_r)/s`, or ``"noise"``
:math:`(x_{out} - x_{in})/s` (GeoTDM's ε-parametrisation). Both are translation-invariant and
rotation-equivariant, so with an equivariant prior every sample of the forecast distribution is
E(3)-equivariant. The prior is trained jointly with the denoiser; we add an explicit regression term
:math:`\lVert x_r - x_0\rVert^2 / s^2` to the diffusion loss (GeoTDM trains it through the diffusion loss
only), which makes the prior a useful deterministic forecast from the first steps.

**Sampling noise.** The initial noise :math:`\varepsilon` is drawn in the :func:`canonical_frame` of the
context and turned into world coordinates, so the same seed gives exactly rotated/translated samples for a
rotated/translated context (not only equal distributions).

**Unconditional generation** (``context_frames=0``): the whole trajectory is diffused on the
zero-centre-of-mass subspace (mean over frames and particles removed from data, noise and prediction),
GeoTDM's translation-invariant density; rotation invariance comes from the equivariant denoiser and the
isotropic noise.

Sampling uses the library's solvers (:func:`flowdiff.sample`) on a :class:`flowdiff.Field`.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from .. import paths as _paths
from .._utils import check_float, check_int
from ..fields import Field
from ..nn.embeddings import sinusoidal_features
from ..solvers import sample as _sample
from .egtn import EGTN, GeometricPrior, canonical_frame, pair_features

__all__ = ["GeoTDM", "DeterministicEGTN", "TrajectoryDenoiser", "check_trajectories"]

_PATHS = {"cosine": lambda: _paths.Cosine(), "vp": lambda: _paths.VP(), "linear": lambda: _paths.Linear()}
_HELDOUT_SAMPLES = 5  # K of the held-out best-of-K score (the check's and the papers' K)
_EXPECTED_EVALUATIONS = 4  # candidate temperatures the time plan reserves (a search usually needs 3-5)


def _search_grid(grid: tuple[float, ...], evaluate: Callable[[float], float | None]) -> float | None:
    """Local search on a sorted grid: start at the value nearest 0.4, move to the better neighbour while one
    improves the score (lower is better), stop at a point no worse than both neighbours. ``evaluate``
    returns None when there is no time left: the best value scored so far is returned (None if none)."""
    scores: dict[int, float] = {}

    def score(i: int) -> float | None:
        if i not in scores:
            value = evaluate(grid[i])
            if value is None:
                return None
            scores[i] = value
        return scores[i]

    i = min(range(len(grid)), key=lambda j: abs(grid[j] - 0.4))
    if score(i) is None:
        return None
    while True:
        for j in (i - 1, i + 1):
            if 0 <= j < len(grid) and score(j) is None:
                return grid[min(scores, key=scores.get)]
        best = min((j for j in (i, i - 1, i + 1) if j in scores), key=scores.get)  # ties: stay
        if best == i:
            return grid[i]
        i = best


def check_trajectories(data: Any, name: str = "trajectories", min_frames: int = 1) -> Tensor:
    """``data`` (array, tensor or a list of ``(frames, particles, 3)`` arrays) as a float64 tensor
    ``(N, frames, particles, 3)``; a ``ValueError`` for a wrong shape, inconsistent particle or frame
    counts, NaN/Inf or too few frames, a ``TypeError`` for a non-numeric input."""
    if isinstance(data, (list, tuple)):
        if not data:
            raise ValueError(f"{name} is an empty list")
        shapes = [tuple(np.shape(item)) for item in data]
        for i, s in enumerate(shapes):
            if len(s) != 3 or s[-1] != 3:
                raise ValueError(f"{name}[{i}] must have shape (frames, particles, 3), got {s}")
        if len({s[1] for s in shapes}) > 1:
            raise ValueError(f"{name} have inconsistent particle counts {sorted({s[1] for s in shapes})}; "
                             f"every trajectory must hold the same particles")
        if len({s[0] for s in shapes}) > 1:
            raise ValueError(f"{name} have inconsistent frame counts {sorted({s[0] for s in shapes})}")
        data = np.stack([np.asarray(item.detach().cpu() if isinstance(item, Tensor) else item) for item in data])
    if isinstance(data, Tensor):
        x = data.detach()
    else:
        try:
            arr = np.asarray(data)
        except ValueError as error:  # ragged nesting
            raise ValueError(f"{name} is ragged (inconsistent particle or frame counts): {error}") from None
        if arr.dtype == object:
            raise ValueError(f"{name} is ragged (inconsistent particle or frame counts)")
        if not np.issubdtype(arr.dtype, np.number):
            raise TypeError(f"{name} must be numeric, got dtype {arr.dtype}")
        x = torch.from_numpy(np.ascontiguousarray(arr))
    if not (x.is_floating_point() or x.dtype in (torch.int32, torch.int64)):
        raise TypeError(f"{name} must be a real array, got dtype {x.dtype}")
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (N, frames, particles, 3), got {tuple(x.shape)}")
    if x.shape[0] < 1 or x.shape[2] < 2:
        raise ValueError(f"{name} needs at least one trajectory of at least 2 particles, got shape {tuple(x.shape)}")
    if x.shape[1] < min_frames:
        raise ValueError(f"{name} has {x.shape[1]} frames, fewer than the {min_frames} required")
    x = x.to(torch.float64)
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = torch.nonzero(bad.flatten(1).any(1)).flatten()[:5].tolist()
        raise ValueError(f"{name} holds {int(bad.sum())} NaN/Inf values (trajectories {rows}...)")
    return x


class TrajectoryDenoiser(nn.Module):
    """The GeoTDM denoiser ``model(x, t, context=..., prior=...)`` for a :class:`flowdiff.Field`.

    ``x`` ``(B, F, N, 3)`` is the residual state on the path (units of ``scale``), ``t`` ``(B,)``,
    ``context`` ``(B, C, N, 3)`` and ``prior`` ``(B, F, N, 3)`` (both ``None`` when unconditional). Returns
    the ``prediction`` (``"data"`` or ``"noise"``) for ``x`` (module docstring of
    :mod:`flowdiff.trajectories.model`).
    """

    def __init__(self, context_frames: int, future_frames: int, hidden: int = 64, layers: int = 4,
                 heads: int = 4, prediction: str = "data", scale: float | list[float] = 1.0, path: Any = None,
                 sigma_data: float = 0.5):
        super().__init__()
        self.path, self.sigma_data = path, float(sigma_data)
        if prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {prediction!r}")
        self.context_frames, self.future_frames = context_frames, future_frames
        self.prediction = prediction
        scale_t = torch.as_tensor(scale, dtype=torch.float32).reshape(-1)
        self.register_buffer("scale", scale_t.expand(future_frames).clone().reshape(1, future_frames, 1, 1))
        self.egtn = EGTN(32 + 16 + 1, hidden, layers, heads, edge_features=3 * context_frames)

    def forward(self, x: Tensor, t: Tensor, context: Tensor | None = None, prior: Tensor | None = None) -> Tensor:
        b, f, n, _ = x.shape
        conditional = context is not None and context.shape[1] > 0
        future = x * self.scale + (prior if prior is not None else 0.0)
        pos = torch.cat([context, future], dim=1) if conditional else future
        frames = pos.shape[1]
        time_features = sinusoidal_features(t.to(x.dtype).reshape(-1), 32)
        frame_index = torch.arange(frames, dtype=x.dtype, device=x.device) - (frames - f)
        frame_features = sinusoidal_features(frame_index, 16, scale=1.0, max_period=200.0)
        flag = (frame_index >= 0).to(x.dtype).reshape(frames, 1)
        features = torch.cat([time_features[:, None, None, :].expand(b, frames, n, 32),
                              frame_features[None, :, None, :].expand(b, frames, n, 16),
                              flag[None, :, None, :].expand(b, frames, n, 1)], dim=-1)
        out, _ = self.egtn(pos, features, pair_features(context) if conditional else None)
        out = out[:, frames - f:]
        if self.prediction == "data" and self.path is not None:
            # EDM preconditioning (Karras et al. 2022) of the data prediction: D = c_skip x_t + c_out F with
            # F the network's displacement of the future frames; at init F = 0 and D is the Bayes-optimal
            # linear denoiser of a residual of scale sigma_data (near 0, i.e. the prior, at high noise)
            coef = self.path.table(t.reshape(-1))
            a = coef.alpha.to(x.dtype).reshape(-1, 1, 1, 1)
            sg = coef.sigma.to(x.dtype).reshape(-1, 1, 1, 1)
            sd2 = self.sigma_data ** 2
            norm = (a * a * sd2 + sg * sg).sqrt()
            pred = (a * sd2 / norm ** 2) * x + (sg * self.sigma_data / norm) * (out - future) / self.scale
        elif self.prediction == "data":
            pred = (out - (prior if prior is not None else 0.0)) / self.scale
        else:
            pred = (out - future) / self.scale
        if not conditional:  # zero centre of mass over frames and particles
            pred = pred - pred.mean(dim=(1, 2), keepdim=True)
        return pred


class _Net(nn.Module):
    def __init__(self, denoiser: TrajectoryDenoiser, prior: GeometricPrior | None):
        super().__init__()
        self.denoiser, self.prior = denoiser, prior


class GeoTDM:
    r"""Geometric trajectory diffusion: fit on trajectories, forecast or generate (module docstring).

    Arguments:
        hidden, layers, heads: EGTN width, number of (spatial, temporal) layer pairs, attention heads.
        prior_layers, prior_rank: layers of the prior's EGTN and rank of its learned correction (0: the
            constant-velocity prior, not learned).
        refine_layers: layers of the prior's refinement EGTN (0: the paper's affine prior alone).
        frame_scale: scale the residual per future frame instead of by one number.
        temperature: factor on the initial noise of :meth:`forecast` (1.0 samples the model's distribution;
            below 1, samples nearer the probability-flow image of the prior mean). ``"auto"`` (default):
            :meth:`fit` chooses it from ``temperature_grid`` by the best-of-5 ADE and FDE on training systems
            held out from training (``holdout``; see :meth:`fit`). A number fixes it (no hold-out, all
            systems train). Why: at CPU training budgets the denoiser spreads samples too widely (measured
            at 250 steps, best-of-5 ADE/FDE 0.375/0.578 at 1.0, 0.274/0.541 at 0.3 against constant
            velocity's 0.470/0.998), and the best factor depends on how far the fit got.
        temperature_grid: candidate temperatures for ``"auto"`` (searched from the one nearest 0.4 towards
            the better neighbour until neither neighbour improves).
        holdout: training systems held out for ``"auto"`` (at most a tenth of them; with fewer than 8 that
            way the choice is made on training systems instead, see :meth:`fit`).
        path: ``"cosine"`` (default), ``"vp"`` or ``"linear"``.
        prediction: ``"data"`` (default) or ``"noise"`` (GeoTDM's ε).
        steps, batch_size, lr: AdamW updates, batch, peak learning rate (linear warm-up, cosine decay).
        ema_decay: EMA of the weights used for sampling.
        solver, nfe: sampler (:func:`flowdiff.solvers.available`) and model calls per forecast.
        seed: seed of the initial weights and the training batches.
        time_limit: seconds of wall time for :meth:`fit`; when the speed measured over the first updates
            says ``steps`` would not fit, fewer steps are planned (and the schedule shortened to match),
            so a fit ends within the limit on a slow or loaded machine; the plan is renewed every 25
            updates from the speed since the last plan (shortened or lengthened, at most ``steps``; with
            ``temperature="auto"`` the time of the held-out search is reserved) and the fit stops at the
            limit. ``None``: no limit.
        threads: intra-op threads for :meth:`fit` and :meth:`forecast` (restored afterwards). ``"auto"``
            (default): with a ``time_limit``, the first updates are timed with torch's current thread count
            and with one thread and the faster is kept (on a loaded 2-core machine two threads were
            measured over 10x slower per update than one); without a time limit torch's setting is left
            alone. An int sets it; ``None`` never touches it.
        device, dtype: where and in which precision to train and sample (default CPU float32).
        verbose: print the loss every 200 steps.

    Attributes after :meth:`fit`: ``context_frames``, ``future_frames``, ``particles``, ``scale``,
    ``history`` (loss per step), ``fit_seconds``, ``steps_done``, ``forecast_temperature`` (the factor
    :meth:`forecast` uses), ``temperature_scores`` (``{temperature: (minADE, minFDE)}`` on the held-out
    systems, None for a fixed temperature), ``temperature_source``, ``heldout_index`` (held-out systems).
    """

    deterministic = False

    def __init__(self, hidden: int = 32, layers: int = 4, heads: int = 4, prior_layers: int = 2, prior_rank: int = 4,
                 refine_layers: int = 2, frame_scale: bool = False, temperature: float | str = "auto",
                 temperature_grid: tuple = (0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.8, 1.0), holdout: int = 40,
                 path: str = "cosine", prediction: str = "data", steps: int = 3000, batch_size: int = 32,
                 lr: float = 1e-3, ema_decay: float = 0.995, solver: str = "dpm-solver++", nfe: int = 20,
                 seed: int = 0, time_limit: float | None = 480.0, threads: int | str | None = "auto",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, verbose: bool = False):
        self.hidden, self.layers = check_int("hidden", hidden, 4), check_int("layers", layers, 1)
        self.heads = check_int("heads", heads, 1)
        if self.hidden % self.heads:
            raise ValueError(f"hidden={hidden} must be a multiple of heads={heads}")
        self.prior_layers = check_int("prior_layers", prior_layers, 0)
        self.prior_rank = check_int("prior_rank", prior_rank, 0)
        self.refine_layers = check_int("refine_layers", refine_layers, 0)
        self.frame_scale = bool(frame_scale)
        if isinstance(temperature, str):
            if temperature != "auto":
                raise ValueError(f"temperature must be 'auto' or a number >= 0, got {temperature!r}")
            self.temperature: float | str = "auto"
        else:
            self.temperature = check_float("temperature", temperature, 0.0)
        try:
            grid = sorted({float(v) for v in temperature_grid})
        except (TypeError, ValueError):
            raise ValueError(f"temperature_grid must be a sequence of numbers >= 0, got {temperature_grid!r}") from None
        if not grid or not all(math.isfinite(v) and v >= 0 for v in grid):
            raise ValueError(f"temperature_grid must be a non-empty sequence of finite numbers >= 0, "
                             f"got {temperature_grid!r}")
        self.temperature_grid = tuple(grid)
        self.holdout = check_int("holdout", holdout, 1)
        self.temperature_chosen: float | None = None
        self.temperature_scores: dict[float, tuple[float, float]] | None = None
        self.temperature_source: str | None = None
        self.heldout_index: list[int] | None = None
        if path not in _PATHS:
            raise ValueError(f"path must be one of {', '.join(_PATHS)}, got {path!r}")
        if prediction not in ("data", "noise"):
            raise ValueError(f"prediction must be 'data' or 'noise', got {prediction!r}")
        self.path_name, self.prediction = path, prediction
        self.steps, self.batch_size = check_int("steps", steps, 1), check_int("batch_size", batch_size, 1)
        self.lr = check_float("lr", lr, 0.0, low_open=True)
        self.ema_decay = check_float("ema_decay", ema_decay, 0.0, 1.0, high_open=True)
        self.solver, self.nfe = solver, check_int("nfe", nfe, 1)
        self.seed = check_int("seed", seed, 0)
        self.time_limit = None if time_limit is None else check_float("time_limit", time_limit, 0.0, low_open=True)
        if not (threads is None or threads == "auto" or (isinstance(threads, int) and not isinstance(threads, bool)
                                                          and threads >= 1)):
            raise ValueError(f"threads must be 'auto', None or a positive int, got {threads!r}")
        self.threads = threads
        self.threads_used: int | None = None  # chosen by fit ("auto"); forecast uses it too
        self.device, self.dtype = torch.device(device), dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        self.verbose = bool(verbose)
        self.net: _Net | None = None
        self.ema: _Net | None = None
        self.history: list[float] = []

    # ------------------------------------------------------------------ configuration / state
    def _config(self) -> dict:
        return dict(hidden=self.hidden, layers=self.layers, heads=self.heads, prior_layers=self.prior_layers,
                    prior_rank=self.prior_rank, refine_layers=self.refine_layers, frame_scale=self.frame_scale,
                    temperature=self.temperature, temperature_grid=self.temperature_grid,
                    holdout=self.holdout, path=self.path_name, prediction=self.prediction, steps=self.steps,
                    batch_size=self.batch_size, lr=self.lr, ema_decay=self.ema_decay, solver=self.solver,
                    nfe=self.nfe, seed=self.seed, time_limit=self.time_limit, threads=self.threads)

    def _build(self, context_frames: int, future_frames: int, particles: int, scale: list[float]) -> None:
        self.context_frames, self.future_frames, self.particles = context_frames, future_frames, particles
        self.scale = [float(v) for v in scale]
        self.path = _PATHS[self.path_name]()
        # the residual (x - x_r)/s has RMS 1 under the constant-velocity prior (s's definition) and less under
        # the learned prior; unconditional data are scaled to RMS 1
        denoiser = TrajectoryDenoiser(context_frames, future_frames, self.hidden, self.layers, self.heads,
                                      self.prediction, self.scale, self.path, 0.5 if context_frames else 1.0)
        prior = None
        if context_frames > 0:
            prior = GeometricPrior(context_frames, future_frames, self.hidden, self.prior_layers, self.prior_rank,
                                   self.refine_layers)
        self.net = _Net(denoiser, prior).to(self.device, self.dtype)
        self.ema = copy.deepcopy(self.net).requires_grad_(False)

    def _require_fit(self) -> _Net:
        if self.ema is None:
            raise RuntimeError("this GeoTDM is not fitted yet: call fit(trajectories, context_frames=...) first")
        return self.ema

    @property
    def field(self) -> Field:
        """The fitted (EMA) denoiser as a :class:`flowdiff.Field` on the residual; condition it with
        ``context=`` and ``prior=`` (see :meth:`prior_mean`)."""
        return Field(self._require_fit().denoiser, self.path, prediction=self.prediction)

    # ------------------------------------------------------------------ training
    def fit(self, trajectories: Any, context_frames: int = 10, future_frames: int | None = None,
            callback: Callable[[int, float], None] | None = None) -> "GeoTDM":
        """Train on ``trajectories`` ``(N, frames, particles, 3)`` (array, tensor or list of arrays).

        Arguments:
            trajectories: training trajectories; windows of ``context_frames + future_frames`` frames are
                drawn from them at random start frames.
            context_frames: observed frames a forecast is conditioned on (0: unconditional generation of
                ``future_frames`` frames).
            future_frames: forecast horizon (default: all remaining frames).
            callback: ``callback(step, loss)`` after every update (monitoring; the EMA model is usable).

        With ``temperature="auto"`` (conditional models), ``min(holdout, N // 10)`` systems (seeded random
        choice) are held out of training when that is at least 8 (3000 systems: 40, 1.3 % of the data; the
        default fit makes ~1000-2500 updates of batch 32, 10-25 passes over the data, and is limited by
        updates, not by data), and after training the forecast temperature is searched on
        ``temperature_grid`` by the best-of-5 ADE and FDE of one window of each (each relative to the
        learned prior mean's, summed; the same noise for every candidate). Smaller data sets are not
        split: the choice is scored on training systems. With a ``time_limit`` the plan reserves time for
        4 candidates (timed on the held-out batch) and the search stops when no candidate fits in the
        limit (no candidate scored: 0.4 is used; ``temperature_source`` says which happened).

        Returns:
            ``self``.
        """
        fit_start = time.perf_counter()
        context_frames = check_int("context_frames", context_frames, 0)
        data = check_trajectories(trajectories, "trajectories", min_frames=context_frames + 1)
        frames = data.shape[1]
        if future_frames is None:
            future_frames = frames - context_frames
        future_frames = check_int("future_frames", future_frames, 1, frames - context_frames)
        window = context_frames + future_frames
        data = data.to(self.device, self.dtype)
        # centre each trajectory (the model is translation-equivariant; this only helps float32)
        data = data - data.mean(dim=(1, 2), keepdim=True)
        data, heldout = self._split_heldout(data, context_frames, window)
        gen = torch.Generator(device="cpu").manual_seed(self.seed)
        torch.manual_seed(self.seed)
        scale = self._data_scale(data, context_frames, window)
        self._build(context_frames, future_frames, data.shape[2], scale)
        net = self.net
        assert net is not None and self.ema is not None
        params = [p for p in net.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        warmup = min(200, max(1, self.steps // 10))
        total = self.steps
        start = time.perf_counter()
        self.history = []
        step = 0
        original_threads = torch.get_num_threads()
        probe = self.threads == "auto" and self.time_limit is not None and original_threads > 1
        if isinstance(self.threads, int):
            torch.set_num_threads(self.threads)
        self.threads_used = torch.get_num_threads() if self.threads is not None else None
        marks: dict = {"reserve": 0.0, "heldout": heldout}
        try:
            self._train_loop(net, opt, params, data, window, gen, warmup, total, start, fit_start, probe, marks,
                             callback)
            if heldout is not None:
                self._choose_temperature(heldout, fit_start, marks.get("eval_seconds"))
            self.fit_seconds = time.perf_counter() - fit_start
        finally:
            if self.threads is not None:
                torch.set_num_threads(original_threads)
        return self

    def _train_loop(self, net, opt, params, data, window, gen, warmup, total, start, fit_start, probe, marks,
                    callback) -> None:
        original_threads = torch.get_num_threads()
        if probe:  # warm up and time 8 updates with one thread, then up to 8 with torch's thread count
            torch.set_num_threads(1)
        step = 0
        while step < total:
            lr = self.lr * (step + 1) / warmup if step < warmup else \
                self.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))
            for group in opt.param_groups:
                group["lr"] = lr
            batch = self._batch(data, window, gen)
            loss = self._loss(net, batch, gen)
            if not bool(torch.isfinite(loss)):
                raise FloatingPointError(f"GeoTDM training loss became {float(loss)} at step {step + 1}; "
                                         f"lower lr={self.lr} or check the data scale")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                decay = min(self.ema_decay, (1 + step) / (10 + step))
                for pe, p in zip(self.ema.parameters(), net.parameters()):
                    pe.lerp_(p, 1 - decay)
            self.history.append(float(loss.detach()))
            step += 1
            if callback is not None:
                callback(step, self.history[-1])
            if self.verbose and step % 200 == 0:
                print(f"step {step}/{total} loss {np.mean(self.history[-200:]):.4f} "
                      f"{time.perf_counter() - start:.0f}s", flush=True)
            if self.time_limit is not None and "planned" in marks:
                now = time.perf_counter()
                end = self.time_limit * 0.97 - marks["reserve"]  # time left for the held-out choice
                if now - fit_start >= end:  # hard stop (the load rose after planning)
                    break
                if step % 25 == 0:  # re-plan from the speed since the last plan (at most `steps`): a slow
                    # start (load) no longer leaves the rest of the budget unused (measured: 72 s of 480 idle)
                    per_step = (now - marks["last"]) / (step - marks["last_step"])
                    marks["last"], marks["last_step"] = now, step
                    budget = step + int((end - (now - fit_start)) / per_step)
                    total = min(self.steps, max(budget, step + 1))
            if self.time_limit is not None and "planned" not in marks:
                now = time.perf_counter()
                plan = False
                if step == 4:
                    marks[4] = now
                elif probe and step == 12:
                    marks["one"] = (now - marks[4]) / 8
                    marks[12] = now
                    torch.set_num_threads(original_threads)
                elif probe and step > 12:
                    elapsed = now - marks[12]
                    if step == 20 or elapsed > 8 * marks["one"]:  # done, or many threads can no longer win
                        per_many = elapsed / (step - 12)
                        if per_many >= marks["one"]:
                            torch.set_num_threads(1)
                        self.thread_timing = {original_threads: per_many, 1: marks["one"]}
                        self.threads_used = torch.get_num_threads()
                        per_step, plan = min(per_many, marks["one"]), True
                elif not probe and step == 20:
                    per_step, plan = (now - marks[4]) / 16, True
                if plan:  # plan the run from the measured speed
                    if marks["heldout"] is not None:  # reserve the held-out temperature choice
                        marks["eval_seconds"] = self._time_evaluation(marks["heldout"])
                        marks["reserve"] = _EXPECTED_EVALUATIONS * marks["eval_seconds"]
                        now = time.perf_counter()
                    marks["planned"], marks["last"], marks["last_step"] = True, now, step
                    left = self.time_limit * 0.97 - marks["reserve"] - (now - fit_start)
                    budget = step + int(max(left, 0.0) / per_step)
                    if budget < total:
                        total = max(budget, step + 1)
                        warmup = min(warmup, max(1, total // 10))  # the shortened schedule keeps its shape
        self.steps_done, self.fit_seconds = step, time.perf_counter() - fit_start

    # ------------------------------------------------------------------ held-out temperature choice
    def _split_heldout(self, data: Tensor, context_frames: int, window: int) -> tuple[Tensor, Tensor | None]:
        """Training systems and the held-out windows ``(V, window, N, 3)`` for ``temperature="auto"``.

        ``min(holdout, N // 10)`` systems (a seeded random choice) are removed from training when that is
        at least 8; otherwise (small data sets, where every system counts) ``min(holdout, N)`` training
        systems are scored instead. One window per system, at a seeded random start frame."""
        self.temperature_chosen = self.temperature_scores = self.temperature_source = None
        self.heldout_index = self.heldout_start = None
        if self.temperature != "auto" or context_frames == 0 or self.deterministic:
            return data, None
        n = data.shape[0]
        g = torch.Generator().manual_seed(self.seed + 7919)
        perm = torch.randperm(n, generator=g)
        k = min(self.holdout, n // 10)
        if k >= 8:
            index = perm[:k].sort().values
            keep = torch.ones(n, dtype=torch.bool)
            keep[index] = False
            train = data[keep.to(data.device)]
            self.temperature_source = f"{k} held-out training systems"
        else:
            index = perm[:min(self.holdout, n)].sort().values
            train = data
            self.temperature_source = f"{len(index)} training systems (too few to hold out {self.holdout})"
        start = torch.randint(data.shape[1] - window + 1, (len(index),), generator=g)
        frames = (start[:, None] + torch.arange(window)[None]).to(data.device)
        heldout = data[index.to(data.device)[:, None], frames]
        self.heldout_index, self.heldout_start = index.tolist(), start.tolist()
        return train, heldout

    def _time_evaluation(self, heldout: Tensor) -> float:
        """Seconds one candidate temperature is expected to cost (K = 5 samples of every held-out window):
        one timed denoiser call on that batch times ``nfe``."""
        net = self.ema
        c, k = self.context_frames, _HELDOUT_SAMPLES
        with torch.no_grad():
            ctx = heldout[:, :c] - heldout[:, :c].mean(dim=(1, 2), keepdim=True)
            ctx = ctx.repeat_interleave(k, 0)
            prior = net.prior(ctx)
            x = torch.zeros_like(prior)
            t = torch.full((x.shape[0],), 0.5, dtype=x.dtype, device=x.device)
            tic = time.perf_counter()
            net.denoiser(x, t, context=ctx, prior=prior)
            return (time.perf_counter() - tic) * self.nfe

    def _heldout_score(self, heldout: Tensor, temperature: float) -> tuple[float, float]:
        """Best-of-K (K = 5; 1 at temperature 0, where all samples coincide) ADE and FDE of the forecast
        of the held-out windows, with the fit's seed (the same noise for every temperature)."""
        c = self.context_frames
        k = 1 if temperature == 0 else _HELDOUT_SAMPLES
        samples = self.forecast(heldout[:, :c], k, seed=self.seed, temperature=temperature)
        dist = (samples - heldout[:, None, c:].to(samples.dtype)).norm(dim=-1)  # (V, K, F, N)
        ade = dist.mean(dim=(2, 3)).min(dim=1).values.mean()
        fde = dist[:, :, -1].mean(dim=-1).min(dim=1).values.mean()
        return float(ade), float(fde)

    def _choose_temperature(self, heldout: Tensor, fit_start: float, eval_seconds: float | None) -> None:
        """Set ``temperature_chosen``: a search over ``temperature_grid`` by the held-out score
        ``minADE / ADE_prior + minFDE / FDE_prior`` (both metrics relative to the learned prior mean's on the
        same windows, so they count equally), stopped when the time limit leaves no room for another
        candidate."""
        c = self.context_frames
        prior = self.prior_mean(heldout[:, :c])
        dist = (prior - heldout[:, c:].to(prior.dtype)).norm(dim=-1)  # (V, F, N)
        ref = (float(dist.mean()), float(dist[:, -1].mean()))
        self.temperature_reference = ref
        per = {"sample": None if eval_seconds is None else eval_seconds / _HELDOUT_SAMPLES}

        def evaluate(tau: float) -> float | None:
            k = 1 if tau == 0 else _HELDOUT_SAMPLES
            if self.time_limit is not None and per["sample"] is not None:
                left = self.time_limit * 0.99 - (time.perf_counter() - fit_start)
                if left < per["sample"] * k:
                    return None
            tic = time.perf_counter()
            ade, fde = self._heldout_score(heldout, tau)
            per["sample"] = max(per["sample"] or 0.0, (time.perf_counter() - tic) / k)
            scores[tau] = (ade, fde)
            return ade / ref[0] + fde / ref[1]

        scores: dict[float, tuple[float, float]] = {}
        best = _search_grid(self.temperature_grid, evaluate)
        self.temperature_scores = scores
        if best is None:
            self.temperature_chosen = min(self.temperature_grid, key=lambda v: abs(v - 0.4))
            self.temperature_source = f"fallback {self.temperature_chosen} (no time left for the held-out choice)"
        else:
            self.temperature_chosen = best

    @property
    def forecast_temperature(self) -> float:
        """The factor on the initial noise that :meth:`forecast` uses by default: the constructor's number,
        or the one :meth:`fit` chose (``temperature="auto"``; 0.4 before a fit)."""
        if self.temperature != "auto":
            return float(self.temperature)
        return 0.4 if self.temperature_chosen is None else float(self.temperature_chosen)

    def _data_scale(self, data: Tensor, context_frames: int, window: int) -> list[float]:
        """The RMS of the constant-velocity residual (conditional; per future frame with ``frame_scale``:
        unit variance in every frame, small noise where the future is nearly certain), or of the centred
        positions (unconditional), one value per future frame."""
        clip = data[:, :window]
        future = window - context_frames
        if context_frames == 0:
            centred = clip - clip.mean(dim=(1, 2), keepdim=True)
            return [float(centred.pow(2).mean().sqrt().clamp_min(1e-6))] * future
        probe = GeometricPrior(context_frames, future, rank=0).to(data.device, data.dtype)
        residual = clip[:, context_frames:] - probe(clip[:, :context_frames])
        if not self.frame_scale:
            return [float(residual.pow(2).mean().sqrt().clamp_min(1e-6))] * future
        rms = residual.pow(2).mean(dim=(0, 2, 3)).sqrt()
        return rms.clamp_min(max(1e-6, 1e-3 * float(rms.max()))).tolist()

    def _batch(self, data: Tensor, window: int, gen: torch.Generator) -> Tensor:
        idx = torch.randint(data.shape[0], (self.batch_size,), generator=gen)
        starts = torch.randint(data.shape[1] - window + 1, (self.batch_size,), generator=gen)
        frame_idx = starts[:, None] + torch.arange(window)[None]
        batch = data[idx[:, None].to(data.device), frame_idx.to(data.device)]
        return batch - batch[:, :max(self.context_frames, 1)].mean(dim=(1, 2), keepdim=True)

    def _scale_like(self, x: Tensor) -> Tensor:
        return torch.tensor(self.scale, dtype=x.dtype, device=x.device).reshape(1, -1, 1, 1)

    def _loss(self, net: _Net, batch: Tensor, gen: torch.Generator) -> Tensor:
        c = self.context_frames
        s = self._scale_like(batch)
        context, future = batch[:, :c], batch[:, c:]
        b = batch.shape[0]
        extra = 0.0
        if c > 0:
            assert net.prior is not None
            prior = net.prior(context)
            extra = ((prior - future) / s).pow(2).mean()
            residual = (future - prior) / s
        else:
            prior = None
            residual = (future - future.mean(dim=(1, 2), keepdim=True)) / s
        if self.deterministic:
            t = torch.full((b,), float(self.path.t_max), dtype=batch.dtype, device=batch.device)
            pred = net.denoiser(torch.zeros_like(residual), t, context=context if c else None, prior=prior)
            return (pred - residual).pow(2).mean() + extra
        lo, hi = float(self.path.t_min), float(self.path.t_max)
        t = (lo + (hi - lo) * torch.rand(b, generator=gen)).to(batch.device, batch.dtype)
        eps = torch.randn(residual.shape, generator=gen).to(batch.device, batch.dtype)
        if c == 0:
            eps = eps - eps.mean(dim=(1, 2), keepdim=True)
        coef = self.path.table(t)
        alpha = coef.alpha.to(batch.dtype).reshape(-1, 1, 1, 1)
        sigma = coef.sigma.to(batch.dtype).reshape(-1, 1, 1, 1)
        xt = alpha * residual + sigma * eps
        pred = net.denoiser(xt, t, context=context if c else None, prior=prior)
        target = residual if self.prediction == "data" else eps
        return (pred - target).pow(2).mean() + extra

    # ------------------------------------------------------------------ inference
    def _context(self, context: Any) -> tuple[Tensor, bool, Any]:
        is_tensor = isinstance(context, Tensor)
        like = context if is_tensor else None
        ctx = check_trajectories(context, "context", min_frames=1)
        if ctx.shape[1] != self.context_frames:
            raise ValueError(f"context has {ctx.shape[1]} frames; this model was fit with "
                             f"context_frames={self.context_frames}")
        if ctx.shape[2] != self.particles:
            raise ValueError(f"context has {ctx.shape[2]} particles; this model was fit on {self.particles}")
        return ctx.to(self.device, self.dtype), is_tensor, like

    @staticmethod
    def _out(x: Tensor, is_tensor: bool, like: Any) -> Any:
        if is_tensor:
            return x.to(like.device, like.dtype if like.is_floating_point() else torch.float64)
        return x.detach().cpu().double().numpy()

    @torch.no_grad()
    def prior_mean(self, context: Any) -> Any:
        """The learned prior mean :math:`x_r` ``(B, future_frames, N, 3)`` of a context ``(B, C, N, 3)``."""
        net = self._require_fit()
        if self.context_frames == 0:
            raise ValueError("an unconditional GeoTDM (context_frames=0) has no prior mean")
        ctx, is_tensor, like = self._context(context)
        centre = ctx.mean(dim=(1, 2), keepdim=True)
        return self._out(net.prior(ctx - centre) + centre, is_tensor, like)

    @torch.no_grad()
    def forecast(self, context: Any, num_samples: int = 5, seed: int | None = None,
                 generator: torch.Generator | None = None, nfe: int | None = None, solver: str | None = None,
                 batch_size: int = 1024, temperature: float | None = None) -> Any:
        """Forecast the future frames of each context.

        Arguments:
            context: ``(B, context_frames, particles, 3)`` array or tensor.
            num_samples: samples per context (K).
            seed / generator: the sampling noise (default: seed 0, so a call is reproducible).
            nfe, solver: override the sampler set at construction.
            batch_size: systems x samples per solver call.
            temperature: factor on the initial noise (default :attr:`forecast_temperature`: the constructor's
                number or the one ``fit`` chose; 1: the model's distribution; below 1: samples nearer the
                probability-flow image of the prior mean).

        Returns:
            ``(B, K, future_frames, particles, 3)``: numpy float64 for array input, else a tensor of the
            context's dtype and device.
        """
        net = self._require_fit()
        if self.context_frames == 0:
            raise ValueError("this GeoTDM was fit unconditionally (context_frames=0): use generate(num_samples)")
        num_samples = check_int("num_samples", num_samples, 1)
        ctx, is_tensor, like = self._context(context)
        gen = self._generator(seed, generator)
        b, f, n = ctx.shape[0], self.future_frames, self.particles
        centre = ctx.mean(dim=(1, 2), keepdim=True)
        ctx = ctx - centre
        prior = net.prior(ctx)
        frame = canonical_frame(ctx)  # (B, 3, 3)
        z = torch.randn((b, num_samples, f, n, 3), generator=gen, dtype=torch.float64).to(self.device, self.dtype)
        temperature = self.forecast_temperature if temperature is None else check_float("temperature", temperature, 0.0)
        noise = temperature * torch.einsum("bij,bkfnj->bkfni", frame, z)
        if self.deterministic:
            noise = torch.zeros_like(noise)
        rep = lambda a: a.unsqueeze(1).expand(b, num_samples, *a.shape[1:]).reshape(b * num_samples, *a.shape[1:])
        ctx_r, prior_r, noise = rep(ctx), rep(prior), noise.reshape(b * num_samples, f, n, 3)
        out = torch.empty_like(noise)
        with self._using_threads():
            for lo in range(0, b * num_samples, batch_size):
                sl = slice(lo, lo + batch_size)
                out[sl] = self._solve(net, noise[sl], ctx_r[sl], prior_r[sl], gen, nfe, solver)
        future = prior_r + self._scale_like(out) * out
        return self._out(future.reshape(b, num_samples, f, n, 3) + centre.unsqueeze(1), is_tensor, like)

    @contextlib.contextmanager
    def _using_threads(self):
        """torch's thread count set to ``threads`` (or the one ``fit`` chose with ``"auto"``), then restored."""
        n = self.threads if isinstance(self.threads, int) else (self.threads_used if self.threads == "auto" else None)
        old = torch.get_num_threads()
        if n is None or n == old:
            yield
            return
        torch.set_num_threads(n)
        try:
            yield
        finally:
            torch.set_num_threads(old)

    def _solve(self, net: _Net, x0: Tensor, context: Tensor | None, prior: Tensor | None, gen, nfe, solver) -> Tensor:
        if self.deterministic:
            t = torch.full((x0.shape[0],), float(self.path.t_max), dtype=x0.dtype, device=x0.device)
            return net.denoiser(x0, t, context=context, prior=prior)
        field = Field(net.denoiser, self.path, prediction=self.prediction)
        cond = {} if context is None else {"context": context, "prior": prior}
        res = _sample(field, x0, solver=solver or self.solver, nfe=nfe or self.nfe, cond=cond, generator=gen)
        return res.x

    def _generator(self, seed: int | None, generator: torch.Generator | None) -> torch.Generator:
        if generator is not None and seed is not None:
            raise ValueError("give either seed or generator, not both")
        if generator is not None:
            if not isinstance(generator, torch.Generator):
                raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
            return generator
        return torch.Generator().manual_seed(check_int("seed", 0 if seed is None else seed, 0))

    @torch.no_grad()
    def generate(self, num_samples: int, seed: int | None = None, generator: torch.Generator | None = None,
                 nfe: int | None = None, solver: str | None = None, noise: Tensor | None = None) -> np.ndarray:
        """Unconditional samples ``(num_samples, future_frames, particles, 3)`` (numpy float64) of a model
        fit with ``context_frames=0``, centred (zero mean over frames and particles). ``noise`` (optional,
        ``(num_samples, frames, particles, 3)``) replaces the drawn initial noise (it is centred first)."""
        net = self._require_fit()
        if self.context_frames != 0:
            raise ValueError(f"generate() needs a model fit with context_frames=0; this one conditions on "
                             f"{self.context_frames} frames: use forecast(context)")
        num_samples = check_int("num_samples", num_samples, 1)
        gen = self._generator(seed, generator)
        shape = (num_samples, self.future_frames, self.particles, 3)
        if noise is None:
            z = torch.randn(shape, generator=gen, dtype=torch.float64).to(self.device, self.dtype)
        else:
            z = check_trajectories(noise, "noise").to(self.device, self.dtype)
            if tuple(z.shape) != shape:
                raise ValueError(f"noise must have shape {shape}, got {tuple(z.shape)}")
        z = z - z.mean(dim=(1, 2), keepdim=True)
        with self._using_threads():
            x = self._solve(net, z, None, None, gen, nfe, solver)
        return (self._scale_like(x) * x).detach().cpu().double().numpy()

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict:
        """Everything :meth:`from_state` needs: the configuration, the shapes and the EMA weights."""
        self._require_fit()
        return {"config": self._config(), "deterministic": self.deterministic, "dtype": str(self.dtype).split(".")[-1],
                "shape": dict(context_frames=self.context_frames, future_frames=self.future_frames,
                              particles=self.particles, scale=self.scale),
                "temperature": {"chosen": self.temperature_chosen, "source": self.temperature_source,
                                "scores": None if self.temperature_scores is None else
                                [[k, *v] for k, v in self.temperature_scores.items()]},
                "weights": {k: v.detach().cpu() for k, v in self.ema.state_dict().items()}}

    def save(self, file: str | Path) -> Path:
        """Write :meth:`state_dict` to ``file`` atomically (temporary file, then rename)."""
        file = Path(file)
        tmp = file.with_name(file.name + ".tmp")
        torch.save(self.state_dict(), tmp)
        tmp.replace(file)
        return file

    @classmethod
    def from_state(cls, state: dict, device: str | torch.device = "cpu") -> "GeoTDM":
        kind = DeterministicEGTN if state.get("deterministic") else GeoTDM
        dtype = {"float32": torch.float32, "float64": torch.float64}[state.get("dtype", "float32")]
        model = kind(**state["config"], device=device, dtype=dtype)
        shape = state["shape"]
        model._build(shape["context_frames"], shape["future_frames"], shape["particles"], shape["scale"])
        model.ema.load_state_dict(state["weights"])
        chosen = state.get("temperature", {})
        model.temperature_chosen = chosen.get("chosen")
        model.temperature_source = chosen.get("source")
        if chosen.get("scores") is not None:
            model.temperature_scores = {float(k): (float(a), float(f)) for k, a, f in chosen["scores"]}
        model.net.load_state_dict(state["weights"])
        return model

    @classmethod
    def load(cls, file: str | Path, device: str | torch.device = "cpu") -> "GeoTDM":
        """A model written by :meth:`save`."""
        try:
            state = torch.load(Path(file), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as error:  # noqa: BLE001 - a corrupt or foreign file
            raise ValueError(f"{file} is not a GeoTDM checkpoint: {error}") from None
        if not isinstance(state, dict) or "config" not in state or "weights" not in state:
            raise ValueError(f"{file} is not a GeoTDM checkpoint")
        return cls.from_state(state, device)


class DeterministicEGTN(GeoTDM):
    """The deterministic baseline: the same prior and EGTN, trained by mean-square regression of the
    future (one network call at the data end of the path, no noise); ``forecast`` returns K identical
    samples. Its spatial layers are EGNN layers (Satorras et al. 2021), so this is the "deterministic
    EGNN" of the GeoTDM comparison with GeoTDM's temporal attention added."""

    deterministic = True
